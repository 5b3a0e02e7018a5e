"""Attention of packed new-token queries over a paged KV pool, and the KV append into that pool.

Layout (one layer of the pool): k_cache, v_cache [num_blocks, block_size, num_kv_heads, head_dim].
Each of R rows owns a context of seq_lens[r] tokens stored in the blocks block_table[r, :ceil(seq_len /
block_size)] (rows may share blocks; nothing is ever copied). The last q_len_r tokens of a row are new:
their queries are q[cu_q_lens[r]:cu_q_lens[r + 1]] and their K/V are already written (`write_kv`).
Query i of row r sits at position seq_lens[r] - q_len_r + i and attends causally to positions <= it, so
one call covers decode (q_len 1), extension by a few tokens, and prefill of a long new span.

Sliding window. With window=W (Hugging Face's sliding_window), the query at position p sees only the keys
at positions p - W < k <= p: the last W positions, its own included. Both backends skip the keys before a
query tile's (or chunk's) first window instead of masking them, so a windowed layer over a long context
reads about W keys per query, not the whole context. A window composes with the shared-prefix cascade: its shared
pass masks each query's keys by the query's own position.

Soft-capped logits. With softcap=c (Gemma 2's attn_logit_softcapping), the scores s = scale * q . k become
c * tanh(s / c) before the causal or window mask and the softmax, as in Hugging Face's eager attention. The cap
acts on each score alone, so it composes with the window and with the shared-prefix cascade (both of its passes
cap their scores, and their merge stays exact).

Attention sinks. With sinks (a [num_heads] tensor, gpt-oss's per-head sinks), head h's softmax has one more score,
sinks[h], in the units of the scaled scores, whose value is zero: it takes a share of each query's attention away
from the keys. The Triton path adds it when it merges a query's parts (their log-sum-exp with the sink's), so it
composes with the window and the cascade.

Backends: "triton" (the kernels in `fastalign.kernels.paged_attention`; on CPU only under
TRITON_INTERPRET=1), "torch" (any device, row by row), "auto" (triton on CUDA, torch otherwise).

Shared prefixes. Rows that share the first blocks of their contexts (the children of one span) can say
so with `shared_prefix` (build it on the host with `plan_shared_prefix`): the Triton path then reads
those blocks once per group of rows instead of once per row (cascade attention). The result is the
same with or without it; the torch path ignores it.

Checks. Shapes, dtypes and devices are always checked (free: host metadata only). The contents of the
index tensors (cu_q_lens monotone and ending at T, q_len <= seq_len, context within the block table,
block ids within the pool, slots within the pool, shared prefixes really shared) are checked when `validate`
is True, or when it is None and the tensors are on the CPU. On CUDA that check needs one device sync, so by
default it is skipped there: callers that build their metadata on the host should validate it once, there,
with `check_paged_metadata`, before copying it to the device.
"""

import numpy as np
import torch
import torch.nn.functional as F

from fastalign.ops.backend import autocast_off, refuse_fake_tensors, resolve_backend
from fastalign.ops.checks import is_integer, is_real

_INDEX_DTYPE = torch.int32
_SCORE_BUDGET = 1 << 24  # fp32 score elements held at once by the torch path (64 MiB)
# The largest scale and softcap: the math is fp32's (the kernels' times LOG2E, the soft cap doubled too), where a
# larger one, e.g. 1e300, became inf and the output NaN.
_FP32_MAX_SCALAR = torch.finfo(torch.float32).max / 4
_IN_FP32_RANGE = f"that float32 holds (at most {_FP32_MAX_SCALAR:.3g})"


def paged_attention(q, k_cache, v_cache, block_table, seq_lens, cu_q_lens, *, scale=None, backend="auto",
                    validate=None, shared_prefix=None, window=None, softcap=None, sinks=None):
    """Causal attention of the new tokens of R rows over their paged contexts.

    q [T, num_heads, head_dim]; k_cache, v_cache [num_blocks, block_size, num_kv_heads, head_dim] of
    q's dtype and device; block_table [R, max_blocks] int32; seq_lens [R] int32 (context length
    including the new tokens); cu_q_lens [R + 1] int32. num_heads must be a multiple of num_kv_heads
    (GQA). scale defaults to head_dim ** -0.5. Returns [T, num_heads, head_dim] in q's dtype, with the
    softmax accumulated in fp32 (an enclosing autocast does not apply inside). Only the torch path is
    differentiable: the Triton one has no backward and refuses inputs that require grad unless grad mode is off
    (torch.no_grad, as the runtime calls it).

    shared_prefix: None, or (cu_group_rows [G + 1] int32, prefix_lens [G] int32) on q's device: rows
    cu_group_rows[g]:cu_group_rows[g + 1] (consecutive, every row in one group) share their first
    prefix_lens[g] context tokens, a whole number of blocks that all lie before each row's new tokens.

    window: None (no window), or a positive int W: the query at position p sees the keys at p - W < k <= p
    only.

    softcap: None (no cap), or a positive finite number c: the scores s = scale * q . k are c * tanh(s / c).
    scale and c must be at most 8.5e37: the math is fp32's, where 1e300 would be inf.

    sinks: None, or a floating tensor [num_heads] on q's device: one more score per head in each softmax, with a
    zero value (gpt-oss's attention sinks).

    Fake tensors (FakeTensorMode: torch.export, FLOP counters) raise a ValueError on either backend: the keys a query
    reads depend on the values of the index tensors.
    """
    scale, backend = check_paged_attention(q, k_cache, v_cache, block_table, seq_lens, cu_q_lens, scale=scale,
                                           backend=backend, validate=validate, shared_prefix=shared_prefix,
                                           window=window, softcap=softcap, sinks=sinks)
    return paged_attention_unchecked(q, k_cache, v_cache, block_table, seq_lens, cu_q_lens, scale=scale,
                                     backend=backend, shared_prefix=shared_prefix, window=window, softcap=softcap,
                                     sinks=sinks)


def check_paged_attention(q, k_cache, v_cache, block_table, seq_lens, cu_q_lens, *, scale=None, backend="auto",
                          validate=None, shared_prefix=None, window=None, softcap=None, sinks=None):
    """Every check of `paged_attention` on these arguments; returns the (float) scale and the backend ("triton"
    or "torch") that `paged_attention_unchecked` then takes."""
    _check_attention_args(q, k_cache, v_cache, block_table, seq_lens, cu_q_lens)
    refuse_fake_tensors("paged_attention", (q, k_cache, v_cache, block_table, seq_lens, cu_q_lens, sinks),
                        "the keys each query reads are found from the values of block_table, seq_lens and cu_q_lens, "
                        "which fake tensors do not hold; run it on real tensors")
    if scale is None:
        scale = q.shape[2] ** -0.5
    elif not _in_fp32_range(scale):
        raise ValueError(f"scale: expected a positive finite number {_IN_FP32_RANGE}, got {scale!r}")
    if softcap is not None and not _in_fp32_range(softcap):
        raise ValueError(f"softcap: expected None or a positive finite number {_IN_FP32_RANGE}, the c of "
                         f"c * tanh(s / c) (Gemma 2's attn_logit_softcapping), got {softcap!r}")
    if sinks is not None and not (isinstance(sinks, torch.Tensor) and sinks.is_floating_point()
                                  and sinks.shape == (q.shape[1],) and sinks.device == q.device):
        got = (f"{sinks.dtype} {list(sinks.shape)} on {sinks.device}" if isinstance(sinks, torch.Tensor)
               else type(sinks).__name__)
        raise ValueError(f"sinks: expected None or a floating tensor [num_heads={q.shape[1]}] on {q.device} (one "
                         f"score per query head), got {got}")
    if window is not None:
        if not is_integer(window) or window < 1:
            raise ValueError(f"window: expected None or a positive int (the positions a query sees, its own "
                             f"included), got {window!r}")
    if shared_prefix is not None:
        _check_shared_prefix_args(shared_prefix, block_table.shape[0], q.device)
    if validate or (validate is None and q.device.type == "cpu"):
        check_paged_metadata(block_table, seq_lens, cu_q_lens, num_tokens=q.shape[0],
                             num_blocks=k_cache.shape[0], block_size=k_cache.shape[1], shared_prefix=shared_prefix)
    backend = resolve_backend(backend, q.device, dtype=q.dtype)
    if backend == "triton":
        _refuse_gradients(q=q, k_cache=k_cache, v_cache=v_cache, sinks=sinks)
    return float(scale), backend


def paged_attention_unchecked(q, k_cache, v_cache, block_table, seq_lens, cu_q_lens, *, scale, backend,
                              shared_prefix=None, window=None, softcap=None, sinks=None):
    """`paged_attention` after `check_paged_attention` passed on arguments of these shapes, dtypes and devices
    (the layers of one forward: one check, then a call per layer; the checks cost ~10 us of host time per call).
    scale and backend: as that check returns them."""
    if backend == "triton":
        from fastalign.kernels.paged_attention import paged_attention_triton
        return paged_attention_triton(q, k_cache, v_cache, block_table, seq_lens, cu_q_lens, scale,
                                      shared_prefix=shared_prefix, window=window, softcap=softcap, sinks=sinks)
    with autocast_off(q.device):
        return _paged_attention_torch(q, k_cache, v_cache, block_table, seq_lens, cu_q_lens, scale, window=window,
                                      softcap=softcap, sinks=sinks)


def plan_shared_prefix(block_table, seq_lens, cu_q_lens, block_size):
    """The `shared_prefix` argument for a batch, computed on the host (numpy or CPU tensors in, int32 CPU
    tensors out), or None when no two consecutive rows share a block.

    Consecutive rows form a group while each new row shares, with the group's first row, at least half
    of the group's current prefix (and at least one block); the group's prefix is the blocks all its rows
    share, counting only whole blocks before each row's new tokens. The block comparisons are one numpy
    pass (a runtime plans every forward); the walk over rows only compares integers.
    """
    table = np.asarray(block_table)
    seq = np.asarray(seq_lens, dtype=np.int64)
    cu = np.asarray(cu_q_lens, dtype=np.int64)
    usable = (seq - np.diff(cu)) // block_size  # whole blocks before each row's new tokens
    width = min(table.shape[1], int(usable.max(initial=0)))
    if len(usable) < 2 or width == 0:
        return None
    # Blocks that row r shares with row r - 1: the leading run of equal ids, within both rows' usable blocks.
    # Inside a group, rows agree with its first row on the group's prefix, so for those blocks, agreeing
    # with the previous row is agreeing with the first.
    same = (table[1:, :width] == table[:-1, :width]) & (
        np.arange(width)[None, :] < np.minimum(usable[1:], usable[:-1])[:, None])
    with_previous = np.where(same.all(axis=1), width, same.argmin(axis=1)).tolist()
    usable = usable.tolist()
    cu_group_rows, prefix_blocks = [0], []
    shared = usable[0]
    for r, common in enumerate(with_previous, start=1):
        if common >= shared > 0:
            continue  # the row shares the group's whole prefix
        if 0 < common < shared <= 2 * common:
            shared = common
        else:
            cu_group_rows.append(r)
            prefix_blocks.append(shared)
            shared = usable[r]
    cu_group_rows.append(len(usable))
    prefix_blocks.append(shared)
    if len(prefix_blocks) == len(usable):
        return None
    return (torch.tensor(cu_group_rows, dtype=_INDEX_DTYPE),
            torch.tensor(prefix_blocks, dtype=_INDEX_DTYPE) * block_size)


def write_kv(k, v, k_cache, v_cache, slot_mapping, *, validate=None):
    """Write the K/V of T new tokens into the pool in place: token t goes to slot slot_mapping[t].

    k, v [T, num_kv_heads, head_dim] of the cache's dtype and device; slot_mapping [T] int64 with
    slot = block * block_size + offset; in each cache the slots of consecutive blocks follow each other
    (stride(0) == block_size * stride(1), as in a KVPool layer). Slots must be distinct (a repeated slot
    keeps an arbitrary one). validate (default: on CPU tensors) checks that every slot lies in the pool, which reads
    slot_mapping's values: on fake tensors (FakeTensorMode) it is refused, and validate=False writes.
    """
    check_write_kv(k, v, k_cache, v_cache, slot_mapping, validate=validate)
    write_kv_unchecked(k, v, k_cache, v_cache, slot_mapping)


def check_write_kv(k, v, k_cache, v_cache, slot_mapping, *, validate=None):
    """Every check of `write_kv` on these arguments."""
    _check_cache_pair(k_cache, v_cache)
    for name, t in (("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name}: expected a tensor [T, num_kv_heads, head_dim], got {type(t).__name__}")
    if k.dim() != 3 or k.shape[1:] != k_cache.shape[2:]:
        raise ValueError(f"k: expected shape [T, {k_cache.shape[2]}, {k_cache.shape[3]}] "
                         f"(num_kv_heads, head_dim of k_cache), got {list(k.shape)}")
    if v.shape != k.shape:
        raise ValueError(f"v: expected the shape of k {list(k.shape)}, got {list(v.shape)}")
    for name, t in (("k", k), ("v", v)):
        _check_like(name, t, k_cache, "k_cache")
    _check_index(slot_mapping, "slot_mapping", [k.shape[0]], torch.int64, k_cache.device)
    for name, cache in (("k_cache", k_cache), ("v_cache", v_cache)):
        if cache.stride(0) != cache.shape[1] * cache.stride(1):
            raise ValueError(f"{name}: its blocks and their slots must form one dimension (stride(0) == "
                             "block_size * stride(1)), as in a KVPool layer: it is written through that view")
    num_slots = k_cache.shape[0] * k_cache.shape[1]
    if validate or (validate is None and k.device.type == "cpu"):
        refuse_fake_tensors("write_kv with validate=True (the default on the CPU)", (slot_mapping,),
                            "checking slot_mapping reads its values, which fake tensors do not hold; pass "
                            "validate=False, with which the write runs on them")
        if slot_mapping.numel() and not bool(((slot_mapping >= 0) & (slot_mapping < num_slots)).all()):
            raise ValueError(f"slot_mapping: every slot must lie in [0, {num_slots}) "
                             "(num_blocks * block_size)")


def write_kv_unchecked(k, v, k_cache, v_cache, slot_mapping):
    """`write_kv` after `check_write_kv` passed on arguments of these shapes, dtypes and devices."""
    # one scatter per tensor over the pool seen as [num_slots, num_kv_heads, head_dim]
    slot_shape = (k_cache.shape[0] * k_cache.shape[1],) + tuple(k_cache.shape[2:])
    k_cache.view(slot_shape).index_copy_(0, slot_mapping, k)
    v_cache.view(slot_shape).index_copy_(0, slot_mapping, v)


def check_paged_metadata(block_table, seq_lens, cu_q_lens, *, num_tokens, num_blocks, block_size,
                         shared_prefix=None):
    """Raise ValueError unless the index tensors describe a valid batch (device syncs on CUDA).

    Checks: cu_q_lens starts at 0, never decreases and ends at num_tokens; q_len <= seq_len for every
    row; every context fits in its block table row; the block ids it uses lie in [0, num_blocks); and,
    with shared_prefix, that its groups cover the rows and really share their prefix blocks.
    """
    cu = cu_q_lens.long()
    q_lens = cu[1:] - cu[:-1]
    seq = seq_lens.long()
    used_blocks = torch.div(seq + block_size - 1, block_size, rounding_mode="floor")
    used = torch.arange(block_table.shape[1], device=block_table.device)[None, :] < used_blocks[:, None]
    ids = block_table[used]
    failures = torch.stack([
        cu[0] != 0,
        cu[-1] != num_tokens,
        (q_lens < 0).any(),
        (q_lens > seq).any(),
        (used_blocks > block_table.shape[1]).any(),
        ((ids < 0) | (ids >= num_blocks)).any(),
    ]).tolist()
    messages = [
        "cu_q_lens: expected cu_q_lens[0] == 0",
        f"cu_q_lens: expected cu_q_lens[-1] == T == {num_tokens} (the number of query tokens)",
        "cu_q_lens: expected a non-decreasing sequence",
        "seq_lens: every row needs q_len <= seq_len (seq_len counts the new tokens too)",
        f"seq_lens: a context is longer than its block table row holds "
        f"(max_blocks {block_table.shape[1]} * block_size {block_size})",
        f"block_table: a block id used by a row lies outside [0, {num_blocks}) (num_blocks of the pool)",
    ]
    _raise_first(failures, messages)
    if shared_prefix is not None:
        _check_shared_prefix_contents(shared_prefix, block_table, seq - q_lens, block_size)


def _check_shared_prefix_contents(shared_prefix, block_table, context_before_new, block_size):
    cu_group_rows, prefix_lens = (t.long() for t in shared_prefix)
    sizes = cu_group_rows[1:] - cu_group_rows[:-1]
    _raise_first(torch.stack([
        cu_group_rows[0] != 0,
        cu_group_rows[-1] != block_table.shape[0],
        (sizes <= 0).any(),
        ((prefix_lens < 0) | (prefix_lens % block_size != 0)).any(),
    ]).tolist(), [
        "shared_prefix: expected cu_group_rows[0] == 0",
        f"shared_prefix: expected cu_group_rows[-1] == R == {block_table.shape[0]}",
        "shared_prefix: every group needs at least one row (cu_group_rows strictly increasing)",
        f"shared_prefix: every prefix length must be a non-negative multiple of block_size {block_size}",
    ])
    row_prefix = torch.repeat_interleave(prefix_lens, sizes)
    first_row = torch.repeat_interleave(cu_group_rows[:-1], sizes)
    prefix_columns = torch.arange(block_table.shape[1], device=block_table.device)[None, :] < (
        row_prefix // block_size)[:, None]
    _raise_first(torch.stack([
        (row_prefix > context_before_new).any(),
        (row_prefix > block_table.shape[1] * block_size).any(),
        (block_table != block_table[first_row])[prefix_columns].any(),
    ]).tolist(), [
        "shared_prefix: a group's prefix reaches into a row's new tokens (prefix <= seq_len - q_len)",
        "shared_prefix: a group's prefix is longer than the block table rows",
        "shared_prefix: rows of a group disagree on the block ids of the shared prefix",
    ])


def _refuse_gradients(**inputs):
    """The Triton kernels have no backward: their output would silently carry no gradient to these inputs."""
    if torch.is_grad_enabled():
        for name, t in inputs.items():
            if t is not None and t.requires_grad:
                raise RuntimeError(f"paged_attention: {name} requires grad, but the Triton backend has no backward; "
                                   "call it under torch.no_grad() or use backend='torch'")


def _raise_first(failures, messages):
    for failed, message in zip(failures, messages):
        if failed:
            raise ValueError(message)


def _check_shared_prefix_args(shared_prefix, num_rows, device):
    if not isinstance(shared_prefix, (tuple, list)) or len(shared_prefix) != 2:
        raise ValueError("shared_prefix: expected a pair (cu_group_rows [G + 1] int32, prefix_lens [G] int32)")
    cu_group_rows, prefix_lens = shared_prefix
    if not isinstance(prefix_lens, torch.Tensor) or prefix_lens.dim() != 1:
        raise ValueError("shared_prefix: expected prefix_lens to be a tensor [G] of torch.int32")
    _check_index(prefix_lens, "shared_prefix prefix_lens", [prefix_lens.shape[0]], _INDEX_DTYPE, device)
    _check_index(cu_group_rows, "shared_prefix cu_group_rows", [prefix_lens.shape[0] + 1], _INDEX_DTYPE, device)
    if prefix_lens.shape[0] > num_rows or prefix_lens.shape[0] == 0 and num_rows:
        raise ValueError(f"shared_prefix: expected between 1 and R == {num_rows} groups, got {prefix_lens.shape[0]}")


def _check_attention_args(q, k_cache, v_cache, block_table, seq_lens, cu_q_lens):
    """Shape, dtype and device checks (host metadata only, no device sync)."""
    if not isinstance(q, torch.Tensor) or q.dim() != 3:
        raise ValueError(f"q: expected a tensor [T, num_heads, head_dim], got "
                         f"{list(q.shape) if isinstance(q, torch.Tensor) else type(q).__name__}")
    _check_cache_pair(k_cache, v_cache)
    _check_like("q", q, k_cache, "k_cache")
    num_heads, head_dim = q.shape[1], q.shape[2]
    num_kv_heads = k_cache.shape[2]
    if head_dim != k_cache.shape[3]:
        raise ValueError(f"q: head_dim {head_dim} differs from k_cache's head_dim {k_cache.shape[3]}")
    if num_heads == 0 or num_heads % num_kv_heads:
        raise ValueError(f"q: num_heads {num_heads} must be a positive multiple of k_cache's num_kv_heads "
                         f"{num_kv_heads}")
    if not isinstance(block_table, torch.Tensor) or block_table.dim() != 2:
        got = list(block_table.shape) if isinstance(block_table, torch.Tensor) else type(block_table).__name__
        raise ValueError(f"block_table: expected [R, max_blocks] int32, got {got}")
    rows = block_table.shape[0]
    _check_index(block_table, "block_table", [rows, block_table.shape[1]], _INDEX_DTYPE, q.device)
    _check_index(seq_lens, "seq_lens", [rows], _INDEX_DTYPE, q.device)
    _check_index(cu_q_lens, "cu_q_lens", [rows + 1], _INDEX_DTYPE, q.device)


def _check_cache_pair(k_cache, v_cache):
    if not isinstance(k_cache, torch.Tensor) or k_cache.dim() != 4:
        raise ValueError("k_cache: expected a tensor [num_blocks, block_size, num_kv_heads, head_dim]")
    if 0 in k_cache.shape[1:]:  # else divisions by zero deep in the checks, the default scale and the kernels
        raise ValueError(f"k_cache: expected block_size, num_kv_heads and head_dim >= 1, got shape "
                         f"{list(k_cache.shape)}")
    if not k_cache.is_floating_point():
        raise ValueError(f"k_cache: expected a floating-point dtype, got {k_cache.dtype}")
    if not isinstance(v_cache, torch.Tensor) or v_cache.shape != k_cache.shape:
        raise ValueError(f"v_cache: expected the shape of k_cache {list(k_cache.shape)}, got "
                         f"{list(v_cache.shape) if isinstance(v_cache, torch.Tensor) else type(v_cache).__name__}")
    _check_like("v_cache", v_cache, k_cache, "k_cache")


def _in_fp32_range(x):
    """Whether x is a real number (not a bool) in (0, _FP32_MAX_SCALAR]."""
    return is_real(x) and 0 < x <= _FP32_MAX_SCALAR


def _check_like(name, t, ref, ref_name):
    if t.dtype != ref.dtype:
        raise ValueError(f"{name}: expected dtype {ref.dtype} (that of {ref_name}), got {t.dtype}")
    if t.device != ref.device:
        raise ValueError(f"{name}: expected device {ref.device} (that of {ref_name}), got {t.device}")


def _check_index(t, name, shape, dtype, device):
    if not isinstance(t, torch.Tensor) or list(t.shape) != list(shape) or t.dtype != dtype:
        got = f"{list(t.shape)} {t.dtype}" if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(f"{name}: expected shape {list(shape)} of {dtype}, got {got}")
    if t.device != device:
        raise ValueError(f"{name}: expected device {device} (that of q / the cache), got {t.device}")


def _paged_attention_torch(q, k_cache, v_cache, block_table, seq_lens, cu_q_lens, scale, window=None, softcap=None,
                           sinks=None):
    """Row by row: gather the row's context once, then torch's scaled_dot_product_attention in fp32 over
    query chunks whose score matrices stay within _SCORE_BUDGET elements. The mask places query i of a row
    at position seq_len - q_len + i; a chunk that is only the row's last query sees every key and needs
    none (decode). With a window, a chunk attends only from its first query's first key on, and the mask
    also hides keys at or before position - window. A soft cap or sinks take `_attention_by_scores` instead of sdpa.
    Reads the index tensors on the host (a device sync on CUDA)."""
    num_heads = q.shape[1]
    block_size = k_cache.shape[1]
    out = torch.empty_like(q)
    seq_list, cu_list = seq_lens.tolist(), cu_q_lens.tolist()
    if window is not None:  # wider than every context is no window, and one past int64 fits in no tensor
        window = min(int(window), max([1, *seq_list]))
    for r, seq_len in enumerate(seq_list):
        start, q_len = cu_list[r], cu_list[r + 1] - cu_list[r]
        if q_len == 0:
            continue
        blocks = block_table[r, : -(-seq_len // block_size)].long()
        # [1, num_kv_heads, seq_len, head_dim]: the row's context (sdpa broadcasts it over each GQA group)
        k = k_cache[blocks].flatten(0, 1)[:seq_len].float().transpose(0, 1)[None]
        v = v_cache[blocks].flatten(0, 1)[:seq_len].float().transpose(0, 1)[None]
        key_pos = torch.arange(seq_len, device=q.device)
        chunk = max(1, _SCORE_BUDGET // (num_heads * seq_len))
        for c0 in range(0, q_len, chunk):
            c1 = min(q_len, c0 + chunk)
            lo = 0 if window is None else max(0, seq_len - q_len + c0 - window + 1)  # the chunk's first key
            mask = None
            if c0 < q_len - 1:
                query_pos = torch.arange(seq_len - q_len + c0, seq_len - q_len + c1, device=q.device)
                mask = key_pos[None, lo:] <= query_pos[:, None]
                if window is not None:
                    mask &= key_pos[None, lo:] > query_pos[:, None] - window
            qc = q[start + c0: start + c1].float().transpose(0, 1)[None]  # [1, num_heads, c, head_dim]
            if softcap is None and sinks is None:
                o = F.scaled_dot_product_attention(qc, k[:, :, lo:], v[:, :, lo:], attn_mask=mask, scale=scale,
                                                   enable_gqa=True)
            else:
                o = _attention_by_scores(qc, k[:, :, lo:], v[:, :, lo:], mask, scale, softcap, sinks)
            out[start + c0: start + c1] = o[0].transpose(0, 1)
    return out


def _attention_by_scores(q, k, v, mask, scale, softcap, sinks):
    """What sdpa computes on q [1, H, c, D], k and v [1, Hkv, S, D] (head h reads KV head h // (H // Hkv)) and the
    boolean mask [c, S] (None: all visible), with the scores s capped to softcap * tanh(s / softcap) first (softcap
    None: not capped) and sinks[h] (None: none) one more score of head h, with a zero value."""
    group = q.shape[1] // k.shape[1]
    scores = q @ k.repeat_interleave(group, dim=1).transpose(-1, -2) * scale
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    if sinks is not None:
        sink = sinks.float()[None, :, None, None].expand(*scores.shape[:-1], 1)
        scores = torch.cat([scores, sink], dim=-1)
    weights = torch.softmax(scores, dim=-1)[..., : k.shape[2]]
    return weights @ v.repeat_interleave(group, dim=1)
