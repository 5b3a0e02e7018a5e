"""Triton paged attention: packed new-token queries of many rows against a paged KV pool.

One kernel serves decode (one new token per row), extension by a few tokens and prefill of a long span.
A program owns one query tile of one row and one KV head: its BLOCK_M rows are (query token, query
head) pairs, the GROUP query heads that read this KV head times BLOCK_M // GROUP consecutive new
tokens, so each K/V tile is loaded once for the whole GQA group. It walks the row's context through
the block table BLOCK_N keys at a time (any pool block size: each key finds its page) with an online
softmax in fp32, causal per query: query i of a row with q_len new tokens and seq_len context tokens
sits at position seq_len - q_len + i.

Sliding window (SLIDING, a compile-time flag, so that the windowless build is the same as without it; the
window W itself is a runtime argument): the query at position p sees the keys p - W < k <= p only. A tile's
key loop starts at the first key its first query sees (the tile's later queries see no earlier key), so key
tiles wholly before the window are never loaded, and keys inside the loop that a later query of the tile no
longer sees are masked. The split of keys below divides that visible range only. In the shared pass of a cascade
(below) a tile holds queries of several rows: each finds its row among its group's (a binary search over
cu_q_lens), hence its position, and the tile's keys start at the first that any of its queries sees.

Soft-capped logits (SOFTCAP, a compile-time flag likewise; the cap c a runtime float): each score
s = scale * q . k becomes c * tanh(s / c) before any mask (Gemma 2's attn_logit_softcapping). The scores live in
the log2 domain (s * LOG2E, so that exp2 gives the softmax), where the cap reads c' * tanh(s' / c') with
c' = c * LOG2E: the launcher passes c' and the kernel caps its scores as they are, with no conversion. The cap is
per score, so both passes of the cascade below apply it and their merge stays exact.

Query tiles are laid out without knowing q_len on the host (no device sync): row r owns tile slots
[cu_q_lens[r] // Q + r, cu_q_lens[r + 1] // Q + r + 1), which is at least ceil(q_len_r / Q) slots
(Q = BLOCK_M // GROUP), so T // Q + R programs cover any batch; a program finds its row by binary
search over cu_q_lens and returns at once if its slot lies past the row's queries.

When rows x tiles x KV heads are too few to fill the GPU (decode over long contexts), each row's keys
are cut into num_splits equal parts handled by separate programs, which write an fp32 partial output
and its log-sum-exp; a second kernel merges the parts. num_splits is a runtime argument, so a decode whose
split count changes as its context grows compiles nothing new.

Shared prefixes (cascade): when consecutive rows share the first blocks of their contexts (children of
one span), a first pass treats each group as one row whose queries are all the group's new tokens and
attends them, without causal mask, to the shared blocks only: those blocks are read once per group
instead of once per row. A second pass attends each row, causally, to the rest of its context, from the
first key after its group's prefix; the merge kernel combines both passes' parts. Both passes read the
groups (cu_group_rows, prefix_lens) as they are, so the cascade costs no extra launch per layer.

Attention sinks (gpt-oss): one more score per query head, with a zero value, in every query's softmax. It joins
where the parts of a query are merged: the merge kernel adds 2^(sink * LOG2E) to the sum of the parts' 2^lse, so a
call with sinks always writes parts (one, when its keys are not split) and merges them.

Index safety: key positions start at 0 (a negative prefix length counts as 0), and table columns, page ids
and token indices are clamped into their tensors, so metadata that was not validated can give a wrong answer
but never an out-of-bounds access.
"""
import functools

import torch
import triton
import triton.language as tl

from .device_guard import on_device_of_first_input
from .linear_softmax_tiles import multiprocessor_count, soft_cap

LOG2E = 1.4426950408889634
_LOG2E_IN_KERNELS = tl.constexpr(LOG2E)   # a kernel reads a global only as a constexpr
_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# Arguments that change from call to call are not specialised, so that a runtime whose batch shape changes
# every step reuses one compiled kernel per tile configuration.
@triton.jit
def _first_row(CuGroupRows, i, num_table_rows, PREFIX_PASS: tl.constexpr):
    """The first block table row of program row i: i itself, or in the prefix pass its group's first row."""
    if PREFIX_PASS:
        i = tl.minimum(tl.maximum(tl.load(CuGroupRows + i), 0), num_table_rows)
    return i


@triton.jit
def _positions_in_group(CuQLens, RowSeqLens, token, first_row, last_row, num_table_rows, STEPS: tl.constexpr):
    """The positions of the query tokens `token` (indices into q) of a cascade group whose table rows are
    first_row..last_row (at most 2^STEPS of them): each token's row is the last one whose first query is at or
    before it. Unrolled: a loop of runtime length here kept Triton from pipelining the key loop after it. Rows are
    clamped into the table (unvalidated metadata gives wrong positions, never an access outside it)."""
    lo = tl.zeros_like(token) + first_row
    hi = tl.zeros_like(token) + last_row
    for _ in tl.static_range(STEPS):
        mid = tl.minimum(tl.maximum((lo + hi + 1) // 2, 0), num_table_rows - 1)
        later = tl.load(CuQLens + mid) <= token
        lo = tl.where(later, mid, lo)
        hi = tl.where(later, hi, mid - 1)
    row = tl.minimum(tl.maximum(lo, 0), num_table_rows - 1)
    return tl.load(RowSeqLens + row) - (tl.load(CuQLens + row + 1) - token)


@triton.jit(do_not_specialize=["num_rows", "num_table_rows", "num_groups", "num_tokens", "num_blocks", "max_blocks",
                               "num_splits", "window", "stride_bt", "stride_os", "stride_ls"])
def _paged_attention_kernel(
    Q, K, V, BlockTable, SeqLens, RowSeqLens, CuQLens, CuGroupRows, PrefixLens, Out, Lse,
    qk_scale, softcap, num_rows, num_table_rows, num_groups, num_tokens, num_blocks, max_blocks, num_splits, window,
    stride_qt, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_bt,
    stride_os, stride_ot, stride_oh,
    stride_ls, stride_lt,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, GROUP: tl.constexpr, PAGE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    PREFIX_PASS: tl.constexpr, SUFFIX_PASS: tl.constexpr, WRITE_LSE: tl.constexpr, SLIDING: tl.constexpr,
    SOFTCAP: tl.constexpr, SEARCH_STEPS: tl.constexpr,
):
    """One query tile of one program row and KV head, over one split of its keys.

    Program rows are the block table's rows, except in the prefix pass of a cascade, where they are the
    groups of CuGroupRows: group g's queries are those of its table rows, its context the PrefixLens[g]
    keys of its first row (SeqLens is PrefixLens; RowSeqLens, the table rows' own, give the queries' positions
    under a window), seen without causal mask. In the suffix pass a row's keys start after its group's prefix.
    Both read the group metadata directly, so a forward computes nothing per layer for them. SLIDING: each query
    sees its last `window` positions only (SEARCH_STEPS, in the prefix pass: binary search steps that find any
    row of a group).
    SOFTCAP: the log2-domain scores are capped to softcap * tanh(s / softcap) (softcap: the cap times LOG2E).
    """
    QUERIES: tl.constexpr = BLOCK_M // GROUP  # new tokens per tile
    slot = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)

    # The program row owning this tile slot: the last r with (its first query) // QUERIES + r <= slot.
    lo = 0
    hi = num_rows - 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if tl.load(CuQLens + _first_row(CuGroupRows, mid, num_table_rows, PREFIX_PASS)) // QUERIES + mid <= slot:
            lo = mid
        else:
            hi = mid - 1
    row = lo
    table_row_index = _first_row(CuGroupRows, row, num_table_rows, PREFIX_PASS)
    q_begin = tl.load(CuQLens + table_row_index)
    q_len = tl.load(CuQLens + _first_row(CuGroupRows, row + 1, num_table_rows, PREFIX_PASS)) - q_begin
    first_query = (slot - (q_begin // QUERIES + row)) * QUERIES
    if first_query >= q_len:
        return
    seq_len = tl.load(SeqLens + row)
    context_start = seq_len - q_len  # position of the row's first new token

    offs_m = tl.arange(0, BLOCK_M)
    query = first_query + offs_m // GROUP
    head = kv_head * GROUP + offs_m % GROUP
    row_ok = (offs_m < QUERIES * GROUP) & (query < q_len)
    # int64: token * stride_qt and the partial outputs' split * stride_os pass 2^31 in long prefills
    token = tl.minimum(tl.maximum(q_begin + query, 0), num_tokens - 1).to(tl.int64)
    query_pos = context_start + query
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    q = tl.load(Q + token[:, None] * stride_qt + head[:, None] * stride_qh + offs_d[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)

    # Keys this tile may see (from the row's first key, or its first query's first key in the window, to the
    # causal bound of its last query), and this split's share of them.
    if PREFIX_PASS:
        kv_end = seq_len
    else:
        kv_end = tl.minimum(seq_len, context_start + tl.minimum(q_len, first_query + QUERIES))
    kv_begin = 0
    if SUFFIX_PASS:
        # the row's group: the last g with cu_group_rows[g] <= row
        g_lo = 0
        g_hi = num_groups - 1
        while g_lo < g_hi:
            g_mid = (g_lo + g_hi + 1) // 2
            if tl.load(CuGroupRows + g_mid) <= row:
                g_lo = g_mid
            else:
                g_hi = g_mid - 1
        # clamped at 0 too: a negative prefix length would start the keys before the table and the pool
        kv_begin = tl.minimum(tl.maximum(tl.load(PrefixLens + g_lo), 0), kv_end)
    if SLIDING:
        if PREFIX_PASS:   # the tile's queries come from several rows
            query_pos = _positions_in_group(CuQLens, RowSeqLens, q_begin + query, table_row_index,
                                            _first_row(CuGroupRows, row + 1, num_table_rows, PREFIX_PASS) - 1,
                                            num_table_rows, SEARCH_STEPS)
            # (a query at seq_len + window - 1 or later sees nothing of the prefix: the filler of the other slots)
            first_seen = tl.min(tl.where(row_ok, query_pos, seq_len + window - 1), 0) - window + 1
            kv_begin = tl.minimum(tl.maximum(kv_begin, first_seen), kv_end)
        else:
            kv_begin = tl.maximum(kv_begin, context_start + first_query - window + 1)  # <= kv_end: sees itself
    split_len = tl.cdiv(tl.cdiv(kv_end - kv_begin, num_splits), BLOCK_N) * BLOCK_N
    kv_lo = kv_begin + split * split_len
    kv_hi = tl.minimum(kv_end, kv_lo + split_len)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    table_row = BlockTable + tl.minimum(table_row_index, num_table_rows - 1) * stride_bt
    for start in range(kv_lo, kv_hi, BLOCK_N):
        pos = start + tl.arange(0, BLOCK_N)
        key_ok = pos < kv_hi
        column = tl.minimum(pos // PAGE, max_blocks - 1)
        page = tl.load(table_row + column, mask=key_ok, other=0)
        page = tl.minimum(tl.maximum(page, 0), num_blocks - 1).to(tl.int64)
        within = pos % PAGE
        kv_mask = key_ok[:, None] & d_ok[None, :]
        k = tl.load(K + page[:, None] * stride_kb + within[:, None] * stride_ks + kv_head * stride_kh
                    + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(V + page[:, None] * stride_vb + within[:, None] * stride_vs + kv_head * stride_vh
                    + offs_d[None, :], mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision="ieee") * qk_scale
        if SOFTCAP:
            s = soft_cap(s, softcap)
        if PREFIX_PASS:
            visible = key_ok[None, :]
            if SLIDING:
                visible = visible & (pos[None, :] > query_pos[:, None] - window)
            s = tl.where(visible, s, float("-inf"))
        else:
            visible = key_ok[None, :] & (pos[None, :] <= query_pos[:, None])
            if SLIDING:
                visible = visible & (pos[None, :] > query_pos[:, None] - window)
            s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows that see no key yet
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
        m_i = m_new

    seen = l_i > 0
    out = acc / tl.where(seen, l_i, 1.0)[:, None]
    out_ptrs = (Out + split.to(tl.int64) * stride_os + token[:, None] * stride_ot + head[:, None] * stride_oh
                + offs_d[None, :])
    tl.store(out_ptrs, out.to(Out.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
    if WRITE_LSE:
        lse = tl.where(seen, m_i + tl.log2(tl.where(seen, l_i, 1.0)), float("-inf"))
        tl.store(Lse + split.to(tl.int64) * stride_ls + token * stride_lt + head, lse, mask=row_ok)


@triton.jit(do_not_specialize=["num_splits", "stride_ps", "stride_ls"])
def _merge_splits_kernel(
    Partial, Lse, Out, Sinks, num_splits,
    stride_ps, stride_pt, stride_ph,
    stride_ls, stride_lt,
    stride_ot, stride_oh,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr, SINKS: tl.constexpr,
):
    """out[t, h] = sum_s 2^(lse_s - lse) partial_s[t, h], lse = log2 sum_s 2^lse_s (empty parts: -inf), plus
    2^(Sinks[h] * LOG2E) in that sum with SINKS."""
    token = tl.program_id(0).to(tl.int64)   # int64 offsets: parts of long prefills pass 2^31 elements
    head = tl.program_id(1)
    offs_s = tl.arange(0, BLOCK_S).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    s_ok = offs_s < num_splits
    lse = tl.load(Lse + offs_s * stride_ls + token * stride_lt + head, mask=s_ok, other=float("-inf"))
    lse_max = tl.max(lse, 0)
    if SINKS:
        sink = tl.load(Sinks + head).to(tl.float32) * _LOG2E_IN_KERNELS   # into the parts' log2 domain
        lse_max = tl.maximum(lse_max, sink)
    weight = tl.exp2(lse - tl.where(lse_max == float("-inf"), 0.0, lse_max))
    total = tl.sum(weight, 0)
    if SINKS:
        total += tl.exp2(sink - lse_max)
    weight = weight / tl.maximum(total, 1e-30)
    mask = s_ok[:, None] & (offs_d[None, :] < HEAD_DIM)
    part = tl.load(Partial + offs_s[:, None] * stride_ps + token * stride_pt + head * stride_ph + offs_d[None, :],
                   mask=mask, other=0.0)
    out = tl.sum(part * weight[:, None], 0)
    tl.store(Out + token * stride_ot + head * stride_oh + offs_d, out.to(Out.dtype.element_ty),
             mask=offs_d < HEAD_DIM)


@functools.lru_cache(maxsize=None)
def _num_sms(device):
    if device.type == "cuda":
        return multiprocessor_count(device)
    return 4  # the interpreter: a small number so that splitting is exercised on small tests


def launch_config(num_tokens, num_rows, group, head_dim, itemsize):
    """Tile sizes from shapes alone (no device sync): (BLOCK_M, BLOCK_N, num_warps, num_stages).

    BLOCK_M covers the mean new tokens of a row times the GQA group: at least 16 (tensor cores) and the group (a
    tile holds whole groups), at most 128 in 16-bit (64 past head_dim 128, 32 past 256, with 8 warps: Gemma 4's
    head_dim 512), so that the tile fits the 99 KiB of shared memory of an L4's, an RTX 4090's or an RTX 50's block;
    32, or 16 past head_dim 128, in fp32, which is for tests. A group wider than that cap takes narrower key tiles
    instead (BLOCK_N down to 16), which fit the 99 KiB up to a group of 128 at head_dim 256 and of 64 at 512.
    Chosen from builds for sm_90 (Triton 3.6 and 3.9), not yet tuned by measurement on a GPU: the 16-bit tiles spill
    no registers there but for a few bytes in some builds (40 at head_dim 96 with BLOCK_M 128, 4 at head_dim 256,
    32 at head_dim 512 with a group of 64); fp32's spill 0.5-5 KB.
    """
    mean_q_len = -(-num_tokens // max(num_rows, 1))
    if itemsize <= 2:
        largest, block_n = (128, 64) if head_dim <= 128 else (64, 32) if head_dim <= 256 else (32, 32)
    else:
        largest, block_n = (16, 16) if head_dim > 128 else (32, 32)
    block_m = max(16, triton.next_power_of_2(group), min(largest, triton.next_power_of_2(group * mean_q_len)))
    block_n = max(16, block_n // max(1, block_m // largest))
    num_warps = 8 if block_m >= 64 or (head_dim > 256 and block_m >= 32) else 4
    num_stages = 3 if block_m <= 32 else 2
    return block_m, block_n, num_warps, num_stages


def choose_num_splits(programs, max_context, block_n, device):
    """Split each row's keys while the grid is under two waves and every part keeps >= 4 key tiles."""
    target = 2 * _num_sms(device)
    if programs >= target:
        return 1
    return max(1, min(-(-target // programs), max_context // (4 * block_n), 16))


@on_device_of_first_input
def paged_attention_triton(q, k_cache, v_cache, block_table, seq_lens, cu_q_lens, scale, *, shared_prefix=None,
                           num_splits=None, window=None, softcap=None, sinks=None):
    """Launch the paged attention kernels (arguments already checked by `fastalign.ops.paged_attention`).

    shared_prefix: None, or (cu_group_rows [G + 1] int32, prefix_lens [G] int32) for the cascade passes.
    num_splits: parts per row's keys (in both passes); None picks from the grid size (the second pass of
    a cascade, which reads only each row's own suffix, then takes one part).
    window: None, or a positive int W: each query sees its last W positions only (in both passes of a cascade).
    softcap: None, or a positive number c: the scores s = scale * q . k are c * tanh(s / c) (in every pass).
    sinks: None, or [num_heads] floats: one more score per head, with a zero value, joined at the merge.
    """
    if q.dtype not in _SUPPORTED_DTYPES:
        raise TypeError(f"q: the Triton backend takes {_SUPPORTED_DTYPES}, got {q.dtype}; use backend='torch'")
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        if t.stride(-1) != 1:
            raise ValueError(f"{name}: the Triton backend needs a contiguous last (head_dim) dimension")
    # The kernels step through the index tensors (a block table row along its columns) one element at a time:
    # strided views of them, e.g. columns of a packed metadata tensor, are copied (they are tiny).
    if block_table.stride(1) != 1:
        block_table = block_table.contiguous()
    seq_lens, cu_q_lens = seq_lens.contiguous(), cu_q_lens.contiguous()
    if shared_prefix is not None:
        shared_prefix = tuple(t.contiguous() for t in shared_prefix)
    out = torch.empty_like(q)
    if q.shape[0] == 0 or block_table.shape[0] == 0 or block_table.shape[1] == 0 or k_cache.shape[0] == 0:
        return out.zero_()
    max_context = block_table.shape[1] * k_cache.shape[1]
    if window is not None:
        window = min(int(window), max_context)  # wider is no window for a context the table holds; an int32
    if shared_prefix is None:
        config = _pass_config(q, k_cache, block_table.shape[0], max_context, num_splits, window)
        if config["num_splits"] == 1 and sinks is None:
            _attention_pass(q, k_cache, v_cache, block_table, seq_lens, cu_q_lens, scale, config, out, None,
                            window=window, softcap=softcap)
            return out
        partial, lse = _partials(q, config["num_splits"])
        _attention_pass(q, k_cache, v_cache, block_table, seq_lens, cu_q_lens, scale, config, partial, lse,
                        window=window, softcap=softcap)
    else:
        prefix_lens = shared_prefix[1]
        prefix = _pass_config(q, k_cache, prefix_lens.shape[0], max_context, num_splits, window)
        suffix = _pass_config(q, k_cache, block_table.shape[0], max_context, num_splits or 1)
        partial, lse = _partials(q, prefix["num_splits"] + suffix["num_splits"])
        cut = prefix["num_splits"]
        _attention_pass(q, k_cache, v_cache, block_table, seq_lens, cu_q_lens, scale, prefix, partial[:cut],
                        lse[:cut], cascade=("prefix", shared_prefix), window=window, softcap=softcap)
        _attention_pass(q, k_cache, v_cache, block_table, seq_lens, cu_q_lens, scale, suffix, partial[cut:],
                        lse[cut:], cascade=("suffix", shared_prefix), window=window, softcap=softcap)
    head_dim = q.shape[2]
    _merge_splits_kernel[(q.shape[0], q.shape[1])](
        partial, lse, out, lse if sinks is None else sinks.contiguous(), partial.shape[0],
        partial.stride(0), partial.stride(1), partial.stride(2),
        lse.stride(0), lse.stride(1),
        out.stride(0), out.stride(1),
        HEAD_DIM=head_dim, BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
        BLOCK_S=max(2, triton.next_power_of_2(partial.shape[0])), SINKS=sinks is not None,
        num_warps=1 if head_dim <= 64 else 2, enable_fp_fusion=True,
    )
    return out


def _pass_config(q, k_cache, num_rows, max_context, num_splits, window=None):
    """Tiles, grid and number of key parts of one pass over num_rows rows (with a window, a tile sees at most
    window + its queries - 1 keys: the parts are chosen for those)."""
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[2]
    group = num_heads // num_kv_heads
    block_m, block_n, num_warps, num_stages = launch_config(num_tokens, num_rows, group, head_dim, q.element_size())
    slots = num_tokens // (block_m // group) + num_rows
    if num_splits is None:
        visible = max_context if window is None else min(max_context, window + block_m // group - 1)
        num_splits = choose_num_splits(slots * num_kv_heads, visible, block_n, q.device)
    return dict(block_m=block_m, block_n=block_n, num_warps=num_warps, num_stages=num_stages, slots=slots,
                num_splits=num_splits)


def _partials(q, num_splits):
    """fp32 partial outputs [num_splits, T, H, D] and their log2-sum-exp [num_splits, T, H]."""
    num_tokens, num_heads, head_dim = q.shape
    return (torch.empty((num_splits, num_tokens, num_heads, head_dim), device=q.device, dtype=torch.float32),
            torch.empty((num_splits, num_tokens, num_heads), device=q.device, dtype=torch.float32))


def _attention_pass(q, k_cache, v_cache, block_table, seq_lens, cu_q_lens, scale, config, dest, lse, *,
                    cascade=None, window=None, softcap=None):
    """One launch: dest is the output (lse None, one part) or fp32 parts [num_splits, T, H, D] with lse.

    cascade: None, or ("prefix" | "suffix", (cu_group_rows, prefix_lens)) for one pass of a cascade (the program
    rows of the prefix pass are the groups, their contexts prefix_lens). window: None or a positive int.
    softcap: None or the positive cap c of the natural-log scores.
    """
    head_dim = q.shape[2]
    num_blocks, page, num_kv_heads, _ = k_cache.shape
    parts = dest if lse is not None else dest.unsqueeze(0)
    which, (cu_group_rows, prefix_lens) = cascade or (None, (seq_lens, seq_lens))
    program_seq_lens = prefix_lens if which == "prefix" else seq_lens
    _paged_attention_kernel[(config["slots"], num_kv_heads, config["num_splits"])](
        q, k_cache, v_cache, block_table, program_seq_lens, seq_lens, cu_q_lens, cu_group_rows, prefix_lens,
        parts, parts if lse is None else lse,
        scale * LOG2E, 0.0 if softcap is None else float(softcap) * LOG2E, program_seq_lens.shape[0],
        block_table.shape[0], prefix_lens.shape[0], q.shape[0], num_blocks, block_table.shape[1],
        config["num_splits"], window or 0,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_table.stride(0),
        parts.stride(0), parts.stride(1), parts.stride(2),
        *((0, 0) if lse is None else (lse.stride(0), lse.stride(1))),
        HEAD_DIM=head_dim, BLOCK_D=max(16, triton.next_power_of_2(head_dim)), GROUP=q.shape[1] // num_kv_heads,
        PAGE=page, BLOCK_M=config["block_m"], BLOCK_N=config["block_n"],
        PREFIX_PASS=which == "prefix", SUFFIX_PASS=which == "suffix", WRITE_LSE=lse is not None,
        SLIDING=window is not None, SOFTCAP=softcap is not None,
        # steps for any group of the table's rows, in multiples of 4 (few builds: 4 below 16 rows, 8 below 256)
        SEARCH_STEPS=-(-block_table.shape[0].bit_length() // 4) * 4 if which == "prefix" and window else 0,
        num_warps=config["num_warps"], num_stages=config["num_stages"], enable_fp_fusion=True,
    )
