"""paged_attention and write_kv against the float64 reference, on both backends, and their input checks."""
import contextlib
import math

import numpy as np
import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import fastalign.ops.paged_attention as pa_module
from fastalign.kernels.paged_attention import paged_attention_triton
from fastalign.ops.paged_attention import check_paged_metadata, paged_attention, plan_shared_prefix, write_kv
from fastalign.reference.paged_attention import paged_attention_reference
from tests.conftest import TRITON_DEVICE, device_for, requires_cuda

UNUSED_BLOCK_ID = 1 << 30  # block table entries past a row's last block: must never be read


def make_paged_batch(rows, block_size, num_heads, num_kv_heads, head_dim, *, shared_blocks=0, groups=None,
                     dtype=torch.float32, device="cpu", window=None):
    """Random queries and a random paged pool for rows given as (seq_len, q_len).

    Block ids are a random permutation (non-contiguous tables); rows with the same label in `groups`
    (default: all rows) have the same first `shared_blocks` blocks. Pool slots that no row reads hold
    NaN, and table entries past a row's last block hold an id outside the pool, so that reading anything
    outside a context shows up. With a sliding `window`, a row reads no position before its first query's
    window: those slots hold NaN too, so that attending to them (even masked: 0 * NaN) shows up.
    """
    groups = [0] * len(rows) if groups is None else groups
    labels = sorted(set(groups))
    blocks_per_row = [-(-seq_len // block_size) for seq_len, _ in rows]
    num_private = sum(max(0, n - shared_blocks) for n in blocks_per_row)
    num_blocks = len(labels) * shared_blocks + num_private + 2
    ids = torch.randperm(num_blocks).tolist()
    shared_ids = {label: ids[i * shared_blocks:(i + 1) * shared_blocks] for i, label in enumerate(labels)}
    private_ids = iter(ids[len(labels) * shared_blocks:])
    table = torch.full((len(rows), max(blocks_per_row, default=0) + 1), UNUSED_BLOCK_ID, dtype=torch.int32)
    k_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim)
    v_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim)
    read = torch.zeros(num_blocks, block_size, dtype=torch.bool)
    for r, ((seq_len, q_len), n) in enumerate(zip(rows, blocks_per_row)):
        row_ids = (shared_ids[groups[r]] + [next(private_ids) for _ in range(n - shared_blocks)])[:n]
        table[r, :n] = torch.tensor(row_ids, dtype=torch.int32)
        for p in range(0 if window is None else max(0, seq_len - q_len - window + 1), seq_len):
            read[row_ids[p // block_size], p % block_size] = True
    k_cache[~read] = float("nan")
    v_cache[~read] = float("nan")
    q_lens = torch.tensor([q_len for _, q_len in rows], dtype=torch.int32)
    cu_q_lens = torch.zeros(len(rows) + 1, dtype=torch.int32)
    cu_q_lens[1:] = torch.cumsum(q_lens, 0)
    q = torch.randn(int(cu_q_lens[-1]), num_heads, head_dim)
    seq_lens = torch.tensor([seq_len for seq_len, _ in rows], dtype=torch.int32)
    batch = dict(q=q.to(dtype), k_cache=k_cache.to(dtype), v_cache=v_cache.to(dtype), block_table=table,
                 seq_lens=seq_lens, cu_q_lens=cu_q_lens)
    return {name: t.to(device) for name, t in batch.items()}


# (rows as (seq_len, q_len), block_size, num_heads, num_kv_heads, head_dim, shared_blocks)
CASES = {
    "prefill_q_len_eq_seq_len": ([(13, 13)], 5, 4, 4, 16, 0),
    "single_token": ([(1, 1)], 4, 2, 1, 16, 0),
    "decode_gqa": ([(17, 1), (9, 1), (30, 1)], 8, 8, 2, 16, 0),
    "extend_shared_prefix_mha": ([(20, 4), (11, 3), (7, 7)], 3, 3, 3, 16, 2),
    "extend_shared_gqa_d32": ([(40, 3), (40, 1), (35, 2), (33, 5)], 16, 6, 2, 32, 2),
    "row_inside_shared_block": ([(14, 2), (10, 1)], 8, 4, 2, 16, 2),
    "head_dim_not_pow2": ([(12, 5), (6, 1)], 4, 4, 2, 24, 1),
    "empty_rows": ([(9, 2), (5, 0), (0, 0), (6, 1)], 4, 2, 2, 16, 0),   # (0, 0): a row with no context yet
    "decode_group_of_7": ([(33, 1), (20, 2), (70, 1)], 16, 14, 2, 16, 1),
    "prefill_several_query_tiles": ([(70, 70), (75, 38)], 7, 8, 2, 16, 0),
}


def run_batch(shape, backend, dtype, device, *, shared_blocks=0, window=None, softcap=None, sinks=False):
    """(op output, float64 reference) on a random batch of `shape` (rows, block_size, num_heads, num_kv_heads,
    head_dim), with make_paged_batch's NaN in every slot the rows must not read; `sinks`: random attention sinks,
    one per head, of q's dtype (a share of a query's attention from ~1% to most of it)."""
    batch = make_paged_batch(*shape, shared_blocks=shared_blocks, dtype=dtype, device=device or device_for(backend),
                             window=window)
    if sinks:
        batch["sinks"] = (2 * torch.randn(shape[2]) + 1).to(dtype=dtype, device=batch["q"].device)
    out = paged_attention(**batch, backend=backend, window=window, softcap=softcap)
    ref = paged_attention_reference(**{name: t.cpu() for name, t in batch.items()}, window=window, softcap=softcap)
    assert out.dtype == dtype and out.shape == batch["q"].shape
    return out.cpu().double(), ref


def run_case(case, backend, dtype=torch.float32, device=None, softcap=None, sinks=False):
    *shape, shared = CASES[case]
    return run_batch(shape, backend, dtype, device, shared_blocks=shared, softcap=softcap, sinks=sinks)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("case", CASES)
def test_fp32_matches_reference(case, backend):
    out, ref = run_case(case, backend)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


# Sliding windows: (rows as (seq_len, q_len), block_size, num_heads, num_kv_heads, head_dim, window). The fp32
# Triton tiles here hold BLOCK_N 32 keys and 32 // group queries.
WINDOW_CASES = {
    "window_1": ([(17, 1), (9, 4), (6, 6)], 4, 4, 2, 16, 1),
    "window_under_a_page": ([(30, 1), (21, 5), (3, 2)], 8, 4, 2, 16, 5),
    "window_19_of_pages_of_7": ([(70, 70), (75, 38), (40, 1)], 7, 8, 2, 16, 19),
    "window_past_every_context": ([(20, 4), (11, 3), (7, 7)], 3, 3, 3, 16, 100),
    "mixed_rows_some_shorter_than_window": ([(9, 2), (5, 0), (33, 1), (12, 12), (50, 3), (47, 9)], 4, 6, 2, 16, 13),
    "decode_group_of_7": ([(33, 1), (20, 2), (70, 1)], 16, 14, 2, 16, 10),
}


def run_window_case(case, backend, dtype=torch.float32, device=None, softcap=None, sinks=False):
    """run_batch on a window case; slots before every query's window hold NaN."""
    *shape, window = WINDOW_CASES[case]
    return run_batch(shape, backend, dtype, device, window=window, softcap=softcap, sinks=sinks)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("case", WINDOW_CASES)
def test_sliding_window_fp32_matches_reference(case, backend):
    out, ref = run_window_case(case, backend)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_reference_window_is_hugging_face_sliding_window():
    """Query at position p sees keys p - W < k <= p: with values one-hot by position, the output of a query whose
    keys are all equal is the mean of the one-hot rows it sees."""
    seq_len, window = 9, 3
    k_cache = torch.zeros(3, 4, 1, seq_len)  # 3 blocks of 4 slots, one head, head_dim = positions
    v_cache = torch.eye(seq_len).reshape(seq_len, 1, seq_len)
    v_cache = torch.cat([v_cache, torch.zeros(3, 1, seq_len)]).reshape(3, 4, 1, seq_len)
    index = dict(dtype=torch.int32)
    batch = dict(q=torch.randn(seq_len, 1, seq_len), k_cache=k_cache, v_cache=v_cache,
                 block_table=torch.tensor([[0, 1, 2]], **index), seq_lens=torch.tensor([seq_len], **index),
                 cu_q_lens=torch.tensor([0, seq_len], **index))
    out = paged_attention_reference(**batch, window=window)
    for p in range(seq_len):
        seen = [k for k in range(seq_len) if k > p - window and k <= p]  # transformers: kv_idx > q_idx - window
        expected = torch.zeros(seq_len, dtype=torch.float64)
        expected[seen] = 1 / len(seen)
        torch.testing.assert_close(out[p, 0], expected)
    torch.testing.assert_close(paged_attention(**batch, window=window, backend="torch").double(), out)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_window_past_every_context_is_no_window(backend):
    rows, block_size, num_heads, num_kv_heads, head_dim, window = WINDOW_CASES["window_past_every_context"]
    batch = make_paged_batch(rows, block_size, num_heads, num_kv_heads, head_dim, device=device_for(backend))
    torch.testing.assert_close(paged_attention(**batch, backend=backend, window=window),
                               paged_attention(**batch, backend=backend), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(paged_attention(**batch, backend=backend, window=np.int64(max(r[0] for r in rows))),
                               paged_attention(**batch, backend=backend), rtol=1e-6, atol=1e-6)  # a NumPy int too
    # one past int64 too: the torch path made a tensor of it (an OverflowError)
    torch.testing.assert_close(paged_attention(**batch, backend=backend, window=10 ** 30),
                               paged_attention(**batch, backend=backend), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_a_batch_of_no_rows_with_a_window_is_empty(backend):
    """The torch path bounded the window by max(1, *seq_lens): with no rows, max(1) raised a TypeError."""
    device = device_for(backend)
    q = torch.zeros(0, 2, 8, device=device)
    k_cache, v_cache = torch.randn(3, 4, 1, 8, device=device), torch.randn(3, 4, 1, 8, device=device)
    no_rows = dict(block_table=torch.zeros(0, 2, dtype=torch.int32, device=device),
                   seq_lens=torch.zeros(0, dtype=torch.int32, device=device),
                   cu_q_lens=torch.zeros(1, dtype=torch.int32, device=device))
    assert paged_attention(q, k_cache, v_cache, **no_rows, backend=backend, window=4).shape == (0, 2, 8)


def test_torch_path_query_chunks_with_a_window_match_reference(monkeypatch):
    """A score budget of a few elements forces the query-chunk loop: each chunk starts at its own first key."""
    monkeypatch.setattr(pa_module, "_SCORE_BUDGET", 200)
    out, ref = run_window_case("mixed_rows_some_shorter_than_window", "torch")
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_bf16_torch_path_with_a_window_matches_reference():
    out, ref = run_window_case("window_19_of_pages_of_7", "torch", dtype=torch.bfloat16)
    torch.testing.assert_close(out, ref, rtol=2e-2, atol=2e-2)


@requires_cuda
@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("case", WINDOW_CASES)
def test_sliding_window_fp32_on_cuda_matches_reference(case, backend):
    out, ref = run_window_case(case, backend, device="cuda")
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", WINDOW_CASES)
def test_sliding_window_half_precision_triton_on_cuda_matches_reference(case, dtype):
    out, ref = run_window_case(case, "triton", dtype=dtype, device="cuda")
    torch.testing.assert_close(out, ref, rtol=2e-2, atol=2e-2)


# Batches whose rows share prefixes: (rows, block_size, num_heads, num_kv_heads, head_dim, shared_blocks, groups)
SHARED_CASES = {
    "one_group_decode_and_extend": ([(45, 1), (50, 2), (47, 1), (60, 3)], 5, 4, 2, 16, 8, None),
    "two_groups_and_a_loner": ([(45, 1), (50, 2), (47, 1), (30, 1), (33, 2), (12, 1)], 5, 6, 2, 16, 6,
                               [0, 0, 0, 1, 1, 2]),
    "child_inside_parent_block": ([(14, 2), (10, 1)], 8, 4, 2, 16, 2, None),
    # groups starting deep in a batch of 14 rows: a cascade's search for a query's row within its group covers
    # the group's rows only, in as few steps as the batch's row count needs (not as many as its row index); a row
    # inside its group's shared blocks makes the prefixes differ (30, 25, 30, 20), so a row given another group's
    # prefix starts its own keys at the wrong place
    "four_groups_of_14_rows": ([(34, 2), (37, 1), (40, 3), (31, 1), (36, 2), (27, 2), (38, 2), (35, 1), (41, 3),
                                (32, 1), (39, 2), (36, 1), (24, 3), (44, 3)], 5, 4, 2, 16, 6,
                               [0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3]),
}


def make_shared_case(case, dtype=torch.float32, device="cpu", window=None):
    rows, block_size, num_heads, num_kv_heads, head_dim, shared, groups = SHARED_CASES[case]
    batch = make_paged_batch(rows, block_size, num_heads, num_kv_heads, head_dim, shared_blocks=shared,
                             groups=groups, dtype=dtype, window=window)
    plan = plan_shared_prefix(batch["block_table"], batch["seq_lens"], batch["cu_q_lens"], block_size)
    assert plan is not None, "the case must share a prefix"
    return {name: t.to(device) for name, t in batch.items()}, tuple(t.to(device) for t in plan)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("case", SHARED_CASES)
def test_shared_prefix_cascade_matches_reference(case, backend):
    batch, plan = make_shared_case(case, device=device_for(backend))
    out = paged_attention(**batch, backend=backend, shared_prefix=plan)
    ref = paged_attention_reference(**{name: t.cpu() for name, t in batch.items()})
    torch.testing.assert_close(out.cpu().double(), ref, rtol=1e-5, atol=1e-5)


# Sliding windows over rows that share prefixes: (a case of SHARED_CASES, window). The shared pass masks each query by
# its own position: a window of 1 sees no prefix key; 9 reaches into the last prefix blocks of the first group's
# rows; 8 over the two groups leaves the first group's rows nothing of their prefix and the second's a part; 64 spans
# every row; 5 cuts into a parent's block; 8 over four groups of 14 rows cuts into each group's prefix.
SHARED_WINDOW_CASES = {
    "window_1_over_a_group": ("one_group_decode_and_extend", 1),
    "window_into_the_prefix": ("one_group_decode_and_extend", 9),
    "window_past_one_groups_prefix": ("two_groups_and_a_loner", 8),
    "window_spanning_every_row": ("two_groups_and_a_loner", 64),
    "window_inside_a_parent_block": ("child_inside_parent_block", 5),
    "window_into_four_groups_prefixes": ("four_groups_of_14_rows", 8),
}


def run_shared_window_case(case, backend, dtype=torch.float32, device=None, **options):
    """(op output with the cascade, float64 reference) on a SHARED_WINDOW_CASES case; slots before every row's
    window hold NaN."""
    shared_case, window = SHARED_WINDOW_CASES[case]
    batch, plan = make_shared_case(shared_case, dtype=dtype, device=device or device_for(backend), window=window)
    sinks = options.pop("sinks", None)
    extra = {} if sinks is None else {"sinks": sinks.to(batch["q"].device)}
    if backend == "triton_launcher":   # the kernels called directly, to force the parts that each pass writes
        out = paged_attention_triton(**batch, scale=batch["q"].shape[2] ** -0.5, shared_prefix=plan, window=window,
                                     **extra, **options)
    else:
        out = paged_attention(**batch, backend=backend, shared_prefix=plan, window=window, **extra, **options)
    options.pop("num_splits", None)
    ref = paged_attention_reference(**{name: t.cpu() for name, t in batch.items()}, window=window, **options,
                                    **({} if sinks is None else {"sinks": sinks.cpu()}))
    return out.cpu().double(), ref


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("case", SHARED_WINDOW_CASES)
def test_shared_prefix_cascade_with_a_window_matches_reference(case, backend):
    out, ref = run_shared_window_case(case, backend)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("num_splits", [2, 5])
@pytest.mark.parametrize("case", ["window_into_the_prefix", "window_past_one_groups_prefix"])
def test_windowed_cascade_in_forced_parts_matches_reference(case, num_splits):
    """Each pass's keys cut into parts, some of which see no key of a query's window."""
    out, ref = run_shared_window_case(case, "triton_launcher", device=TRITON_DEVICE, num_splits=num_splits)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_windowed_cascade_with_a_softcap_and_sinks_matches_reference(backend):
    """Gemma-style capped scores and gpt-oss-style sinks in a windowed layer that reads the cascade."""
    sinks = 2 * torch.randn(6)
    out, ref = run_shared_window_case("window_past_one_groups_prefix", backend, softcap=1.2, sinks=sinks)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("case", SHARED_WINDOW_CASES)
def test_windowed_cascade_triton_on_cuda_matches_reference(case, dtype):
    out, ref = run_shared_window_case(case, "triton", dtype=dtype, device="cuda")
    tolerance = 2e-2 if dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(out, ref, rtol=tolerance, atol=tolerance)


@requires_cuda
@pytest.mark.parametrize("case", SHARED_CASES)
def test_shared_prefix_cascade_bf16_on_cuda_matches_reference(case):
    batch, plan = make_shared_case(case, dtype=torch.bfloat16, device="cuda")
    out = paged_attention(**batch, shared_prefix=plan, validate=True)
    ref = paged_attention_reference(**{name: t.cpu() for name, t in batch.items()})
    torch.testing.assert_close(out.cpu().double(), ref, rtol=2e-2, atol=2e-2)


# Soft-capped scores (Gemma 2's attn_logit_softcapping): a case of CASES and its cap. At the default scale the scores
# have a standard deviation near 1, so these caps bend most of them (the outputs move by ~0.1 to 1 without the cap).
SOFTCAP_CASES = {
    "decode_gqa": 0.8,
    "extend_shared_prefix_mha": 2.0,
    "head_dim_not_pow2": 1.0,
    "empty_rows": 0.5,
    "decode_group_of_7": 1.5,
    "prefill_several_query_tiles": 1.2,
}


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("case", SOFTCAP_CASES)
def test_softcap_fp32_matches_reference(case, backend):
    out, ref = run_case(case, backend, softcap=SOFTCAP_CASES[case])
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's exp(2 s / c) overflows at s = 500
@pytest.mark.parametrize("backend", ["reference", "torch", "triton"])
def test_softcap_is_c_tanh_of_the_scaled_scores_before_the_mask(backend):
    """Hugging Face's eager Gemma 2 attention: s = scale * q . k, then c * tanh(s / c), then the causal mask and the
    softmax. Keys 2 t_j e_j, queries of ones and scale 0.5 give the scores t_j; values one-hot by position make the
    output the attention weights, written out here in float64. Scores of +-500 saturate to +-c (no NaN, no inf);
    a cap taken after the mask would give the hidden keys the score -c, and so weight, in the first queries."""
    scores, cap = [500.0, 7.0, 0.5, -3.0, -500.0], 4
    n = len(scores)
    slots = torch.full((6, 1, n), float("nan"))  # 3 blocks of 2 slots; the last slot lies past the context
    k_cache, v_cache = slots.clone(), slots.clone()
    k_cache[:n, 0] = torch.diag(2 * torch.tensor(scores))
    v_cache[:n, 0] = torch.eye(n)
    order = [2, 0, 1]  # the table's blocks, out of order
    k_cache, v_cache = (t.reshape(3, 2, 1, n)[torch.argsort(torch.tensor(order))] for t in (k_cache, v_cache))
    index = dict(dtype=torch.int32, device=device_for(backend))
    batch = dict(q=torch.ones(n, 1, n), k_cache=k_cache, v_cache=v_cache, block_table=torch.tensor([order], **index),
                 seq_lens=torch.tensor([n], **index), cu_q_lens=torch.tensor([0, n], **index))
    batch = {name: t.to(device_for(backend)) for name, t in batch.items()}
    if backend == "reference":
        out, tol = paged_attention_reference(**batch, scale=0.5, softcap=cap), 1e-12
    else:
        out, tol = paged_attention(**batch, scale=0.5, softcap=cap, backend=backend).cpu().double(), 1e-6
    for p in range(n):
        exps = [math.exp(cap * math.tanh(t / cap)) for t in scores[: p + 1]]
        expected = torch.zeros(n, dtype=torch.float64)
        expected[: p + 1] = torch.tensor(exps, dtype=torch.float64) / sum(exps)
        torch.testing.assert_close(out[p, 0], expected, rtol=tol, atol=tol)


# A window of 1 leaves each query its own key alone, whose weight is 1 with or without a cap.
CAPPED_WINDOW_CASES = [case for case in WINDOW_CASES if case != "window_1"]


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("case", CAPPED_WINDOW_CASES)
def test_sliding_window_with_a_softcap_fp32_matches_reference(case, backend):
    out, ref = run_window_case(case, backend, softcap=1.0)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("case", SHARED_CASES)
def test_shared_prefix_cascade_with_a_softcap_matches_reference(case, backend):
    """The cap acts on each score alone: both cascade passes cap theirs and the merge stays exact."""
    batch, plan = make_shared_case(case, device=device_for(backend))
    out = paged_attention(**batch, backend=backend, shared_prefix=plan, softcap=0.9)
    ref = paged_attention_reference(**{name: t.cpu() for name, t in batch.items()}, softcap=0.9)
    torch.testing.assert_close(out.cpu().double(), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_gemma_2s_cap_of_50_over_scores_that_reach_it_matches_reference(backend):
    """Gemma 2's attn_logit_softcapping (50.0, given as a NumPy scalar here) at scale 10, where the scores reach
    +-50: the Triton cap's error stays in fp32's (its tanh is ~5e-7 relative at every s / c)."""
    rows, block_size, num_heads, num_kv_heads, head_dim, _ = CASES["extend_shared_gqa_d32"]
    batch = make_paged_batch(rows, block_size, num_heads, num_kv_heads, head_dim, device=device_for(backend))
    out = paged_attention(**batch, backend=backend, scale=10.0, softcap=np.float32(50.0))
    ref = paged_attention_reference(**{name: t.cpu() for name, t in batch.items()}, scale=10.0, softcap=50.0)
    assert not torch.allclose(ref, paged_attention_reference(**{name: t.cpu() for name, t in batch.items()},
                                                             scale=10.0), atol=1e-2)
    torch.testing.assert_close(out.cpu().double(), ref, rtol=1e-5, atol=1e-5)


def test_torch_path_query_chunks_with_a_softcap_and_a_window_match_reference(monkeypatch):
    """A score budget of a few elements forces the query-chunk loop, each chunk masked after its cap."""
    monkeypatch.setattr(pa_module, "_SCORE_BUDGET", 200)
    out, ref = run_window_case("mixed_rows_some_shorter_than_window", "torch", softcap=0.7)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_bf16_torch_path_with_a_softcap_matches_reference():
    out, ref = run_case("extend_shared_gqa_d32", "torch", dtype=torch.bfloat16, softcap=1.0)
    torch.testing.assert_close(out, ref, rtol=2e-2, atol=2e-2)


def test_torch_path_with_a_softcap_is_differentiable():
    """The torch path is the differentiable one: its capped scores carry the gradient of the reference's."""
    batch = make_paged_batch([(9, 3), (6, 1)], 4, 4, 2, 16, dtype=torch.float64)
    for name in ("q", "k_cache", "v_cache"):
        batch[name] = torch.nan_to_num(batch[name]).requires_grad_()
    paged_attention(**batch, backend="torch", softcap=0.6).square().sum().backward()
    grads = [batch[name].grad for name in ("q", "k_cache", "v_cache")]
    ref_inputs = {name: t.detach().clone().requires_grad_(t.requires_grad) for name, t in batch.items()}
    paged_attention_reference(**ref_inputs, softcap=0.6).square().sum().backward()
    for name, grad in zip(("q", "k_cache", "v_cache"), grads):
        torch.testing.assert_close(grad, ref_inputs[name].grad, rtol=1e-5, atol=1e-5)


# Attention sinks (gpt-oss): one more score per head in every softmax, with a zero value.

@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("case", CASES)
def test_sinks_fp32_match_reference(case, backend):
    out, ref = run_case(case, backend, sinks=True)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("case", WINDOW_CASES)
def test_sinks_with_a_sliding_window_fp32_match_reference(case, backend):
    """gpt-oss's sliding layers: the sink joins the softmax over the window's keys."""
    out, ref = run_window_case(case, backend, sinks=True)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("case", SHARED_CASES)
def test_sinks_with_the_shared_prefix_cascade_match_reference(case, backend):
    """The sink joins once, where the cascade's two passes merge, with a soft cap on the scores too."""
    batch, plan = make_shared_case(case, device=device_for(backend))
    sinks = 2 * torch.randn(batch["q"].shape[1], device=batch["q"].device)
    out = paged_attention(**batch, backend=backend, shared_prefix=plan, sinks=sinks, softcap=1.5)
    ref = paged_attention_reference(**{name: t.cpu() for name, t in batch.items()}, sinks=sinks.cpu(), softcap=1.5)
    torch.testing.assert_close(out.cpu().double(), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["reference", "torch", "triton"])
def test_a_sink_takes_its_share_of_each_querys_attention(backend):
    """Hugging Face's eager gpt-oss attention: softmax over [scores, sink], the sink's column dropped. Keys of zeros
    give every visible key the score 0, so query p (p + 1 keys) weights each key 1 / (p + 1 + e^sink); values
    one-hot by position make the output those weights. A sink of -inf would be no sink; -30 nearly none, 30 takes
    almost all."""
    n, sinks = 5, torch.tensor([0.0, 2.0, -30.0, 30.0])
    k_cache = torch.zeros(3, 2, 1, n)
    v_cache = torch.cat([torch.eye(n), torch.zeros(1, n)]).reshape(3, 2, 1, n)
    device = device_for("torch" if backend == "reference" else backend)
    index = dict(dtype=torch.int32, device=device)
    batch = dict(q=torch.randn(n, 4, n, device=device), k_cache=k_cache.to(device), v_cache=v_cache.to(device),
                 block_table=torch.tensor([[0, 1, 2]], **index), seq_lens=torch.tensor([n], **index),
                 cu_q_lens=torch.tensor([0, n], **index), sinks=sinks.to(device))
    out = (paged_attention_reference(**batch) if backend == "reference"
           else paged_attention(**batch, backend=backend).cpu().double())
    for p in range(n):
        for h, sink in enumerate(sinks.tolist()):
            expected = torch.zeros(n, dtype=torch.float64)
            expected[: p + 1] = 1 / (p + 1 + math.exp(sink))
            torch.testing.assert_close(out[p, h], expected, rtol=1e-6, atol=1e-12)


def test_torch_path_with_sinks_is_differentiable_in_the_sinks_too():
    batch = make_paged_batch([(9, 3), (6, 1)], 4, 4, 2, 16, dtype=torch.float64)
    for name in ("q", "k_cache", "v_cache"):
        batch[name] = torch.nan_to_num(batch[name]).requires_grad_()
    batch["sinks"] = torch.randn(4, dtype=torch.float64, requires_grad=True)
    names = ("q", "k_cache", "v_cache", "sinks")
    paged_attention(**batch, backend="torch").square().sum().backward()
    grads = [batch[name].grad for name in names]
    ref_inputs = {name: t.detach().clone().requires_grad_(t.requires_grad) for name, t in batch.items()}
    paged_attention_reference(**ref_inputs).square().sum().backward()
    for name, grad in zip(names, grads):
        torch.testing.assert_close(grad, ref_inputs[name].grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("sinks, message", [
    (torch.zeros(3), r"sinks: expected None or a floating tensor \[num_heads=4\] on cpu .*got torch.float32 \[3\]"),
    (torch.zeros(4, dtype=torch.long), r"got torch.int64 \[4\] on cpu"),
    (torch.zeros(1, 4), r"got torch.float32 \[1, 4\] on cpu"),
    ([0.0] * 4, r"got list"),
    (torch.zeros(4, device="meta"), r"on cpu .*got torch.float32 \[4\] on meta")])
def test_bad_sinks_are_refused_by_name(sinks, message):
    batch = make_paged_batch([(9, 3), (6, 1)], 4, 4, 2, 16)
    with pytest.raises(ValueError, match=message):
        paged_attention(**batch, sinks=sinks)


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("case", ["decode_gqa", "extend_shared_gqa_d32", "prefill_several_query_tiles"])
def test_sinks_triton_on_cuda_match_reference(case, dtype):
    out, ref = run_case(case, "triton", dtype=dtype, device="cuda", sinks=True)
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(out, ref, rtol=tol, atol=tol)


@requires_cuda
@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("case", SOFTCAP_CASES)
def test_softcap_fp32_on_cuda_matches_reference(case, backend):
    out, ref = run_case(case, backend, device="cuda", softcap=SOFTCAP_CASES[case])
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", SOFTCAP_CASES)
def test_softcap_half_precision_triton_on_cuda_matches_reference(case, dtype):
    out, ref = run_case(case, "triton", dtype=dtype, device="cuda", softcap=SOFTCAP_CASES[case])
    torch.testing.assert_close(out, ref, rtol=2e-2, atol=2e-2)


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", CAPPED_WINDOW_CASES)
def test_sliding_window_with_a_softcap_half_precision_triton_on_cuda_matches_reference(case, dtype):
    out, ref = run_window_case(case, "triton", dtype=dtype, device="cuda", softcap=1.0)
    torch.testing.assert_close(out, ref, rtol=2e-2, atol=2e-2)


@requires_cuda
@pytest.mark.parametrize("case", SHARED_CASES)
def test_shared_prefix_cascade_with_a_softcap_bf16_on_cuda_matches_reference(case):
    batch, plan = make_shared_case(case, dtype=torch.bfloat16, device="cuda")
    out = paged_attention(**batch, shared_prefix=plan, validate=True, softcap=0.9)
    ref = paged_attention_reference(**{name: t.cpu() for name, t in batch.items()}, softcap=0.9)
    torch.testing.assert_close(out.cpu().double(), ref, rtol=2e-2, atol=2e-2)


def test_plan_shared_prefix_groups_rows_by_their_common_whole_blocks():
    table = torch.tensor([[7, 3, 9, 1, 0],
                          [7, 3, 9, 4, 0],    # shares 3 blocks with row 0
                          [7, 3, 9, 1, 5],    # 3 again (the group's prefix never grows back)
                          [8, 2, 6, 0, 0],    # shares nothing: a new group (2 whole blocks before its token)
                          [8, 2, 6, 0, 0],    # only 1 whole block before its 8 new tokens: joins with 1
                          [8, 1, 0, 0, 0]], dtype=torch.int32)  # no whole block before its token: alone
    seq_lens = torch.tensor([16, 16, 20, 12, 12, 3], dtype=torch.int32)
    cu_q_lens = torch.tensor([0, 1, 2, 3, 4, 12, 13], dtype=torch.int32)
    cu_group_rows, prefix_lens = plan_shared_prefix(table, seq_lens, cu_q_lens, 4)
    assert cu_group_rows.tolist() == [0, 3, 5, 6] and prefix_lens.tolist() == [12, 4, 0]
    assert cu_group_rows.dtype == prefix_lens.dtype == torch.int32


def _plan_rule_row_by_row(table, seq_lens, cu_q_lens, block_size):
    """The grouping rule of plan_shared_prefix written plainly: each row compared with its group's first row."""
    usable = [(int(s) - (int(cu_q_lens[r + 1]) - int(cu_q_lens[r]))) // block_size for r, s in enumerate(seq_lens)]
    starts, prefixes, first, shared = [0], [], 0, usable[0]
    for r in range(1, len(usable)):
        limit = min(shared, usable[r])
        common = next((j for j in range(limit) if table[r][j] != table[first][j]), limit)
        if common >= max(1, (shared + 1) // 2):
            shared = common
        else:
            starts.append(r)
            prefixes.append(shared)
            first, shared = r, usable[r]
    prefixes.append(shared)
    return None if len(prefixes) == len(usable) else (starts + [len(usable)], [p * block_size for p in prefixes])


def test_plan_shared_prefix_follows_its_rule_on_random_batches():
    rng = np.random.default_rng(0)
    grouped = 0
    for _ in range(500):
        rows, width, block_size = int(rng.integers(1, 10)), int(rng.integers(1, 7)), int(rng.choice([1, 2, 4]))
        common_ids = rng.integers(0, 4, size=(1, width))
        table = np.where(rng.random((rows, width)) < 0.25, rng.integers(0, 4, size=(rows, width)), common_ids)
        table = table[np.lexsort(table.T[::-1])] if rng.random() < 0.5 else table  # long runs, or not
        seq_lens = rng.integers(1, width * block_size + 1, size=rows)
        q_lens = np.minimum(rng.integers(1, 4, size=rows), seq_lens)
        cu_q_lens = np.concatenate([[0], np.cumsum(q_lens)])
        expected = _plan_rule_row_by_row(table.tolist(), seq_lens, cu_q_lens, block_size)
        plan = plan_shared_prefix(table.astype(np.int32), seq_lens, cu_q_lens, block_size)
        assert (None if plan is None else tuple(t.tolist() for t in plan)) == expected
        grouped += expected is not None
    assert grouped > 100  # both outcomes are covered


def test_plan_shared_prefix_is_none_without_sharing():
    table = torch.tensor([[0, 1], [2, 3]], dtype=torch.int32)
    assert plan_shared_prefix(table, torch.tensor([8, 8]), torch.tensor([0, 1, 2]), 4) is None


def test_torch_path_query_chunks_match_reference(monkeypatch):
    """A score budget of a few elements forces the query-chunk loop of the torch path."""
    monkeypatch.setattr(pa_module, "_SCORE_BUDGET", 64)
    out, ref = run_case("extend_shared_prefix_mha", "torch")
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_scale_argument_is_used():
    batch = make_paged_batch([(9, 3)], 4, 2, 1, 16)
    out = paged_attention(**batch, scale=0.3, backend="torch")
    torch.testing.assert_close(out.double(), paged_attention_reference(**batch, scale=0.3), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(out, paged_attention(**batch, backend="torch"))
    assert torch.equal(paged_attention(**batch, scale=np.float32(0.3), backend="torch"), out)  # a NumPy scalar too


def test_bf16_torch_path_matches_reference():
    out, ref = run_case("extend_shared_gqa_d32", "torch", dtype=torch.bfloat16)
    torch.testing.assert_close(out, ref, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_fp32_inputs_under_bf16_autocast_keep_fp32(backend):
    """autocast does not reach inside the op: the torch path's scaled_dot_product_attention, on autocast's list of
    ops it runs in bf16, computed fp32 inputs in bf16 (an error of ~5e-3 instead of ~3e-7)."""
    device = device_for(backend)
    with torch.autocast(torch.device(device).type, dtype=torch.bfloat16):
        out, ref = run_case("extend_shared_gqa_d32", backend)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@requires_cuda
@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("case", CASES)
def test_fp32_on_cuda_matches_reference(case, backend):
    out, ref = run_case(case, backend, device="cuda")
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", CASES)
def test_half_precision_triton_on_cuda_matches_reference(case, dtype):
    out, ref = run_case(case, "triton", dtype=dtype, device="cuda")
    torch.testing.assert_close(out, ref, rtol=2e-2, atol=2e-2)


def test_triton_path_rejects_float64():
    batch = make_paged_batch([(5, 2)], 4, 2, 1, 16, dtype=torch.float64, device=TRITON_DEVICE)
    with pytest.raises(TypeError, match="use backend='torch'"):
        paged_attention(**batch, backend="triton")


@pytest.mark.parametrize("name", ["q", "k_cache", "v_cache", "sinks"])
def test_triton_path_refuses_inputs_that_need_a_gradient(name):
    """The Triton kernels have no backward: an input that requires grad got a detached output (no gradient, no
    error). Under no_grad, as the runtime calls it, the same inputs run."""
    batch = make_paged_batch([(9, 3), (6, 1)], 4, 4, 2, 16, device=TRITON_DEVICE)
    if name == "sinks":
        batch["sinks"] = torch.randn(4, device=TRITON_DEVICE)
    batch[name].requires_grad_()
    with pytest.raises(RuntimeError, match=f"paged_attention: {name} requires grad, but the Triton backend has no"):
        paged_attention(**batch, backend="triton")
    with torch.no_grad():
        out = paged_attention(**batch, backend="triton")
    ref = paged_attention_reference(**{key: t.detach().cpu() for key, t in batch.items()})
    torch.testing.assert_close(out.cpu().double(), ref, rtol=1e-5, atol=1e-5)


def test_write_kv_writes_slots_and_nothing_else():
    k_cache, v_cache = torch.zeros(4, 3, 2, 8), torch.zeros(4, 3, 2, 8)
    k, v = torch.randn(5, 2, 8), torch.randn(5, 2, 8)
    slots = torch.tensor([11, 0, 4, 5, 7])
    write_kv(k, v, k_cache, v_cache, slots)
    expected_k, expected_v = torch.zeros(12, 2, 8), torch.zeros(12, 2, 8)
    for t, s in enumerate(slots.tolist()):
        expected_k[s], expected_v[s] = k[t], v[t]
    assert torch.equal(k_cache.view(12, 2, 8), expected_k) and torch.equal(v_cache.view(12, 2, 8), expected_v)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_head_major_queries_are_read_by_their_strides(backend):
    """q as transformers' attention modules lay it out ([heads, tokens, head_dim] in memory, seen as [tokens,
    heads, head_dim]: PagedHF passes it so, without a copy per layer), with sinks on the merge path too."""
    batch = make_paged_batch([(20, 4), (11, 3), (7, 7)], 3, 4, 2, 16, device=device_for(backend))
    batch["q"] = batch["q"].transpose(0, 1).contiguous().transpose(0, 1)
    assert not batch["q"].is_contiguous()
    for sinks in (None, torch.randn(4, device=batch["q"].device)):
        out = paged_attention(**batch, backend=backend, sinks=sinks)
        ref = paged_attention_reference(**{name: t.cpu() for name, t in batch.items()},
                                        sinks=None if sinks is None else sinks.cpu())
        torch.testing.assert_close(out.cpu().double(), ref, rtol=1e-5, atol=1e-5)


def test_write_kv_into_non_contiguous_cache_view():
    """Caches that are strided views of a bigger pool (K and V interleaved per slot) are written in place;
    a layout whose blocks and slots do not form one dimension is refused, not written into a copy."""
    pool = torch.zeros(4, 3, 2, 2, 8)  # [blocks, slots, K|V, kv_heads, head_dim]
    k_cache, v_cache = pool[:, :, 0], pool[:, :, 1]  # each [4, 3, 2, 8], non-contiguous
    assert not k_cache.is_contiguous()
    k, v = torch.randn(2, 2, 8), torch.randn(2, 2, 8)
    write_kv(k, v, k_cache, v_cache, torch.tensor([10, 2]))
    assert torch.equal(pool[3, 1, 0], k[0]) and torch.equal(pool[0, 2, 1], v[1])
    assert int((pool != 0).sum()) == 4 * 16
    slot_major = torch.zeros(3, 4, 2, 8).transpose(0, 1)  # [blocks, slots] with slots outermost in memory
    with pytest.raises(ValueError, match="k_cache: its blocks and their slots must form one dimension"):
        write_kv(k, v, slot_major, slot_major.clone(), torch.tensor([10, 2]))


def test_write_kv_then_attention_equals_dense_causal_attention():
    """End to end: prefill a sequence through write_kv at scattered slots, then attend."""
    seq_len, block_size, heads, kv_heads, dim = 11, 4, 4, 2, 16
    k_cache = torch.full((6, block_size, kv_heads, dim), float("nan"))
    v_cache = torch.zeros(6, block_size, kv_heads, dim)
    table = torch.tensor([[5, 1, 3]], dtype=torch.int32)
    k, v, q = torch.randn(seq_len, kv_heads, dim), torch.randn(seq_len, kv_heads, dim), torch.randn(seq_len, heads, dim)
    slots = torch.tensor([int(table[0, p // block_size]) * block_size + p % block_size for p in range(seq_len)])
    write_kv(k, v, k_cache, v_cache, slots)
    out = paged_attention(q, k_cache, v_cache, table, torch.tensor([seq_len], dtype=torch.int32),
                          torch.tensor([0, seq_len], dtype=torch.int32), backend="torch")
    dense = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(0, 1), k.repeat_interleave(2, 1).transpose(0, 1), v.repeat_interleave(2, 1).transpose(0, 1),
        is_causal=True).transpose(0, 1)
    torch.testing.assert_close(out, dense, rtol=1e-5, atol=1e-5)


def _bad(batch, **changes):
    return {**batch, **changes}


BASE = dict(rows=[(9, 2), (6, 1)], block_size=4, num_heads=4, num_kv_heads=2, head_dim=16)


@pytest.mark.parametrize("change, match", [
    (lambda b: dict(q=b["q"][0]), "q: expected a tensor"),
    (lambda b: dict(q=b["q"].tolist()), "q: expected a tensor \\[T, num_heads, head_dim\\], got list"),
    (lambda b: dict(k_cache=b["k_cache"][0]), "k_cache: expected a tensor"),
    (lambda b: dict(v_cache=b["v_cache"][:-1]), "v_cache: expected the shape"),
    (lambda b: dict(v_cache=b["v_cache"].tolist()), "v_cache: expected the shape of k_cache .*, got list"),
    (lambda b: dict(q=b["q"][..., :8]), "head_dim 8 differs"),
    (lambda b: dict(q=b["q"][:, :3]), "multiple of k_cache's num_kv_heads 2"),
    (lambda b: dict(q=b["q"].double()), "q: expected dtype torch.float32"),
    (lambda b: dict(v_cache=b["v_cache"].half()), "v_cache: expected dtype"),
    (lambda b: dict(block_table=b["block_table"].long()), "block_table: expected shape .* of torch.int32"),
    (lambda b: dict(block_table=b["block_table"][0]), "block_table: expected \\[R, max_blocks\\] int32, got \\[4\\]"),
    # were an AttributeError ('list' object has no attribute 'dim') and ZeroDivisionErrors deep in the checks, the
    # default scale and the kernels
    (lambda b: dict(block_table=b["block_table"].tolist()),
     "block_table: expected \\[R, max_blocks\\] int32, got list"),
    (lambda b: dict(k_cache=b["k_cache"][:, :0], v_cache=b["v_cache"][:, :0]),
     "k_cache: expected block_size, num_kv_heads and head_dim >= 1, got shape \\[7, 0, 2, 16\\]"),
    (lambda b: dict(k_cache=b["k_cache"][:, :, :0], v_cache=b["v_cache"][:, :, :0]),
     "k_cache: expected block_size, num_kv_heads and head_dim >= 1, got shape \\[7, 4, 0, 16\\]"),
    (lambda b: dict(q=b["q"][..., :0], k_cache=b["k_cache"][..., :0], v_cache=b["v_cache"][..., :0]),
     "k_cache: expected block_size, num_kv_heads and head_dim >= 1"),
    (lambda b: dict(q=b["q"][:, :0]), "q: num_heads 0 must be a positive multiple of k_cache's num_kv_heads 2"),
    (lambda b: dict(seq_lens=b["seq_lens"][:1]), "seq_lens: expected shape \\[2\\]"),
    (lambda b: dict(cu_q_lens=b["cu_q_lens"][:2]), "cu_q_lens: expected shape \\[3\\]"),
    (lambda b: dict(cu_q_lens=torch.tensor([0, 2, 4], dtype=torch.int32)), "cu_q_lens\\[-1\\] == T == 3"),
    # short of T: the output of the third query token was left as torch.empty_like wrote it
    (lambda b: dict(cu_q_lens=torch.tensor([0, 1, 2], dtype=torch.int32)), "cu_q_lens\\[-1\\] == T == 3"),
    (lambda b: dict(cu_q_lens=torch.tensor([1, 2, 3], dtype=torch.int32)), "cu_q_lens\\[0\\] == 0"),
    (lambda b: dict(cu_q_lens=torch.tensor([0, 4, 3], dtype=torch.int32), q=torch.randn(3, 4, 16)),
     "non-decreasing"),
    (lambda b: dict(seq_lens=torch.tensor([1, 6], dtype=torch.int32)), "q_len <= seq_len"),
    (lambda b: dict(seq_lens=torch.tensor([9, 30], dtype=torch.int32)), "longer than its block table row"),
    # one token past the 4 columns of 4 tokens (the check bounds the blocks a row uses, not their ids)
    (lambda b: dict(seq_lens=torch.tensor([9, 17], dtype=torch.int32)), "longer than its block table row"),
    (lambda b: dict(block_table=torch.where(b["block_table"] == b["block_table"][0, 0], 99, b["block_table"])),
     "outside \\[0, 7\\)"),
    # was silent: the torch path read block -1 as the last block, the Triton kernel out of bounds
    (lambda b: dict(block_table=torch.where(b["block_table"] == b["block_table"][0, 0], -1, b["block_table"])),
     "outside \\[0, 7\\)"),
    (lambda b: dict(q=b["q"].int(), k_cache=b["k_cache"].int(), v_cache=b["v_cache"].int()),
     "k_cache: expected a floating-point dtype"),
    (lambda b: dict(q=b["q"].to("meta")), "q: expected device"),
    (lambda b: dict(seq_lens=b["seq_lens"].to("meta")), "seq_lens: expected device cpu"),   # deep in torch otherwise
    (lambda b: dict(scale=-1.0), "scale: expected a positive finite number"),
    (lambda b: dict(scale=0), "scale: expected a positive finite number"),   # uniform attention otherwise
    (lambda b: dict(scale=float("inf")), "scale: expected a positive finite number"),  # NaN output otherwise
    (lambda b: dict(scale=True), "scale: expected a positive finite number"),
    # finite, but inf in fp32, where the math is done: the output was NaN
    (lambda b: dict(scale=1e300), "scale: expected a positive finite number that float32 holds \\(at most 8.51e\\+37"),
    (lambda b: dict(softcap=1e300), "softcap: expected None or a positive finite number that float32 holds"),
    (lambda b: dict(window=0), "window: expected None or a positive int"),
    (lambda b: dict(window=-1), "window: expected None or a positive int"),
    (lambda b: dict(window=2.5), "window: expected None or a positive int"),
    (lambda b: dict(window=True), "window: expected None or a positive int"),
    (lambda b: dict(window=torch.tensor(4)), "window: expected None or a positive int"),
    (lambda b: dict(softcap=0), "softcap: expected None or a positive finite number"),
    (lambda b: dict(softcap=-1.0), "softcap: expected None or a positive finite number"),
    (lambda b: dict(softcap=float("nan")), "softcap: expected None or a positive finite number"),
    (lambda b: dict(softcap=float("inf")), "softcap: expected None or a positive finite number"),
    (lambda b: dict(softcap=True), "softcap: expected None or a positive finite number"),
    (lambda b: dict(softcap=torch.tensor(30.0)), "softcap: expected None or a positive finite number"),
    (lambda b: dict(backend="cuda"), "backend must be one of"),
])
def test_bad_input_is_rejected_with_a_clear_error(change, match):
    batch = make_paged_batch(**BASE)
    with pytest.raises(ValueError, match=match):
        paged_attention(**_bad(batch, **change(batch)))


@pytest.mark.parametrize("error", [RuntimeError, ValueError])   # (as it was, and as the other ops raise it)
def test_triton_backend_on_cpu_without_interpreter_is_a_clear_error(monkeypatch, error):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(error, match=r"backend='triton' needs CUDA tensors \(got tensors on cpu\); set TRITON_INTER"):
        paged_attention(**make_paged_batch(**BASE), backend="triton")


def test_check_paged_metadata_accepts_a_valid_batch():
    b = make_paged_batch(**BASE)
    check_paged_metadata(b["block_table"], b["seq_lens"], b["cu_q_lens"], num_tokens=3,
                         num_blocks=b["k_cache"].shape[0], block_size=4)


def _groups(*values):
    return torch.tensor(values, dtype=torch.int32)


@pytest.mark.parametrize("shared_prefix, match", [
    ((_groups(0, 4),), "expected a pair"),
    (5, "expected a pair"),   # was a TypeError (len() of an int)
    ((_groups(0, 4).long(), _groups(8)), "cu_group_rows: expected shape \\[2\\] of torch.int32"),
    ((_groups(0, 2, 4), _groups(8)), "cu_group_rows: expected shape \\[2\\]"),
    ((_groups(1, 4), _groups(8)), "cu_group_rows\\[0\\] == 0"),
    ((_groups(0, 3), _groups(8)), "cu_group_rows\\[-1\\] == R == 4"),
    ((_groups(0, 0, 4), _groups(0, 8)), "at least one row"),
    ((_groups(0, 4), _groups(6)), "multiple of block_size 4"),
    # a multiple of the block all the same: the Triton suffix pass then read the keys before position 0
    ((_groups(0, 2, 4), _groups(-4, 8)), "non-negative multiple of block_size 4"),
    ((_groups(0, 4), _groups(32)), "reaches into a row's new tokens"),
    ((_groups(0, 4), _groups(8)), "disagree on the block ids"),
    ((_groups(0, 4), [8]), "expected prefix_lens to be a tensor \\[G\\] of torch.int32"),
    ((_groups(0, 1, 2, 3, 4, 4), _groups(0, 0, 0, 0, 0)), "between 1 and R == 4 groups, got 5"),
    ((_groups(0), _groups()), "between 1 and R == 4 groups, got 0"),
])
def test_bad_shared_prefix_is_rejected(shared_prefix, match):
    """Rows 0-1 and rows 2-3 share two blocks each: (cu_group_rows [0, 2, 4], prefix_lens [8, 8]) is valid."""
    batch = make_paged_batch([(17, 1), (21, 2), (13, 1), (25, 1)], 4, 4, 2, 16, shared_blocks=2, groups=[0, 0, 1, 1])
    paged_attention(**batch, shared_prefix=(_groups(0, 2, 4), _groups(8, 8)))
    with pytest.raises(ValueError, match=match):
        paged_attention(**batch, shared_prefix=shared_prefix)


@pytest.mark.parametrize("change, match", [
    (lambda k, v, s: dict(k=k[:, :1]), "k: expected shape \\[T, 2, 8\\]"),
    (lambda k, v, s: dict(v=v[:1]), "v: expected the shape of k"),
    (lambda k, v, s: dict(k=k.double(), v=v.double()), "k: expected dtype torch.float32"),
    (lambda k, v, s: dict(v=v.double()), "v: expected dtype torch.float32"),
    # were AttributeErrors ('NoneType' object has no attribute 'dim' / 'shape')
    (lambda k, v, s: dict(k=None), "k: expected a tensor \\[T, num_kv_heads, head_dim\\], got NoneType"),
    (lambda k, v, s: dict(v=v.tolist()), "v: expected a tensor \\[T, num_kv_heads, head_dim\\], got list"),
    (lambda k, v, s: dict(slot_mapping=s.int()), "slot_mapping: expected shape \\[2\\] of torch.int64"),
    (lambda k, v, s: dict(slot_mapping=torch.tensor([0, 12])), "slot_mapping: every slot must lie in \\[0, 12\\)"),
    (lambda k, v, s: dict(slot_mapping=torch.tensor([-1, 0])), "slot_mapping: every slot"),
])
def test_write_kv_bad_input_is_rejected(change, match):
    args = dict(k=torch.randn(2, 2, 8), v=torch.randn(2, 2, 8), slot_mapping=torch.tensor([0, 1]))
    args.update(change(args["k"], args["v"], args["slot_mapping"]))
    with pytest.raises(ValueError, match=match):
        write_kv(args["k"], args["v"], torch.zeros(4, 3, 2, 8), torch.zeros(4, 3, 2, 8), args["slot_mapping"])


def test_block_id_equal_to_num_blocks_is_rejected():
    batch = make_paged_batch([(9, 2), (6, 1)], 4, 4, 2, 16)
    table = batch["block_table"].clone()
    table[0, 0] = batch["k_cache"].shape[0]
    with pytest.raises(ValueError, match="outside \\[0, 7\\)"):
        paged_attention(**{**batch, "block_table": table})


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("shared_prefix", [(_groups(0, 1, 2, 3, 4), _groups(0, 0, 0, 0)),   # a group per row
                                           (_groups(0, 2, 3, 4), _groups(8, 0, 4)),          # empty prefixes
                                           (_groups(0, 4), _groups(0))])
def test_groups_of_one_row_and_empty_prefixes_are_valid_and_change_nothing(shared_prefix, backend):
    batch = make_paged_batch([(17, 1), (21, 2), (13, 1), (25, 1)], 4, 4, 2, 16, shared_blocks=2, groups=[0, 0, 1, 1])
    out = paged_attention(**batch, shared_prefix=shared_prefix, backend=backend)
    torch.testing.assert_close(out.double(), paged_attention_reference(**batch), rtol=1e-5, atol=1e-5)


def test_validate_true_checks_the_metadata_and_false_skips_it():
    """validate=True checks the index tensors' contents as the CPU default does; validate=False trusts them (the
    torch path ignores a shared prefix, so one whose rows disagree still runs there)."""
    batch = make_paged_batch([(17, 1), (21, 2)], 4, 4, 2, 16, shared_blocks=1)
    wrong = (_groups(0, 2), _groups(8))   # the rows share block 0 only
    for validate in (True, None):
        with pytest.raises(ValueError, match="disagree on the block ids"):
            paged_attention(**batch, shared_prefix=wrong, backend="torch", validate=validate)
    out = paged_attention(**batch, shared_prefix=wrong, backend="torch", validate=False)
    torch.testing.assert_close(out.double(), paged_attention_reference(**batch), rtol=1e-5, atol=1e-5)
    cache = torch.zeros(4, 3, 2, 8)
    for validate in (True, None):
        with pytest.raises(ValueError, match="slot_mapping: every slot must lie in \\[0, 12\\)"):
            write_kv(torch.randn(1, 2, 8), torch.randn(1, 2, 8), cache, cache.clone(), torch.tensor([12]),
                     validate=validate)


@pytest.mark.parametrize("backend", ["torch", "triton"])   # (the torch path reads no plan: the cascade is Triton's)
def test_shared_prefix_may_end_where_the_new_tokens_start(backend):
    batch = make_paged_batch([(9, 1), (10, 2)], 4, 4, 2, 16, shared_blocks=2, device=device_for(backend))
    plan = plan_shared_prefix(batch["block_table"], batch["seq_lens"], batch["cu_q_lens"], 4)
    assert [t.tolist() for t in plan] == [[0, 2], [8]]
    out = paged_attention(**batch, shared_prefix=plan, backend=backend)
    torch.testing.assert_close(out.double(), paged_attention_reference(**batch), rtol=1e-5, atol=1e-5)


def test_shared_prefix_whose_later_block_differs_is_rejected():
    batch = make_paged_batch([(17, 1), (21, 2)], 4, 4, 2, 16, shared_blocks=1)  # only block 0 shared
    with pytest.raises(ValueError, match="disagree on the block ids"):
        paged_attention(**batch, shared_prefix=(_groups(0, 2), _groups(8)))


def test_shared_prefix_one_token_into_the_new_tokens_is_rejected():
    """The shared pass has no causal mask: a prefix holding a row's first new token would show it to that
    row's earlier queries. Row 0 has 7 tokens before its 2 new ones, so its 2 shared blocks (8 tokens) are refused."""
    batch = make_paged_batch([(9, 2), (10, 1)], 4, 4, 2, 16, shared_blocks=2)
    with pytest.raises(ValueError, match="reaches into a row's new tokens"):
        paged_attention(**batch, shared_prefix=(_groups(0, 2), _groups(8)))


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("window", [8, 9, 100])
def test_a_window_as_wide_as_a_full_block_table_sees_every_key(backend, window):
    """One row of 8 tokens in a table of exactly 2 blocks of 4 (no spare column: the context is the table's whole
    length, as in the runner) with a window of at least 8: every key is seen, as without a window."""
    torch.manual_seed(0)
    device = device_for(backend)
    index = dict(dtype=torch.int32, device=device)
    batch = dict(q=torch.randn(8, 4, 16, device=device), k_cache=torch.randn(3, 4, 2, 16, device=device),
                 v_cache=torch.randn(3, 4, 2, 16, device=device), block_table=torch.tensor([[2, 0]], **index),
                 seq_lens=torch.tensor([8], **index), cu_q_lens=torch.tensor([0, 8], **index))
    out = paged_attention(**batch, backend=backend, window=window)
    on_host = {name: t.cpu() for name, t in batch.items()}
    expected = paged_attention_reference(**on_host)
    assert torch.allclose(paged_attention_reference(**on_host, window=window), expected)
    torch.testing.assert_close(out.cpu().double(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend, validate", [("torch", None), ("torch", False), ("triton", False)])
def test_fake_tensors_are_refused_naming_the_op(backend, validate):
    """Under FakeTensorMode (torch.export, FLOP counters) either backend failed deep inside torch (a data-dependent
    guard in the metadata check, aten._local_scalar_dense in the torch path, a data pointer in the Triton one),
    naming neither the op nor the cause: the keys a query reads depend on the index tensors' values."""
    with FakeTensorMode():
        device = device_for(backend)
        q, cache = torch.empty(5, 4, 8, device=device), torch.empty(16, 4, 2, 8, device=device)
        block_table = torch.zeros(2, 4, dtype=torch.int32, device=device)
        seq_lens = torch.tensor([5, 9], dtype=torch.int32, device=device)
        cu_q_lens = torch.tensor([0, 2, 5], dtype=torch.int32, device=device)
        with pytest.raises(ValueError, match="paged_attention cannot run on fake tensors"):
            paged_attention(q, cache, cache, block_table, seq_lens, cu_q_lens, backend=backend, validate=validate)


@pytest.mark.parametrize("validate", [None, True])
def test_write_kv_on_fake_tensors_writes_without_validation_and_refuses_it_naming_slot_mapping(validate):
    """Under FakeTensorMode write_kv's check of the slots (validate, the default on CPU tensors) failed deep inside
    torch (DataDependentOutputException on aten._local_scalar_dense), naming neither the op nor the cause: it reads
    slot_mapping's values, which fake tensors do not hold. It is refused naming slot_mapping and validate=False; with
    validate=False the write, plain torch, runs on them (fake tensors used outside the mode too)."""
    fake = FakeTensorMode()
    with fake:
        kv, cache, slots = torch.empty(3, 2, 8), torch.empty(4, 4, 2, 8), torch.tensor([0, 5, 9])
    for mode in (fake, contextlib.nullcontext()):
        with mode:
            write_kv(kv, kv, cache, cache, slots, validate=False)
            with pytest.raises(ValueError, match=r"write_kv with validate=True .* cannot run on fake tensors .*: "
                                                 r"checking slot_mapping reads its values.*pass validate=False"):
                write_kv(kv, kv, cache, cache, slots, validate=validate)


def test_auto_keeps_float64_on_the_torch_path_on_cuda_too(monkeypatch):
    """"auto" on CUDA float64 tensors picked the Triton kernel, which takes no float64 (a TypeError naming q), where
    the same call on the CPU ran: shown on CPU tensors with the backend resolved as for CUDA ones."""
    resolve = pa_module.resolve_backend
    monkeypatch.setattr(pa_module, "resolve_backend", lambda backend, device, *rest, **options: resolve(
        backend, torch.device("cuda"), *rest, **options))
    out, ref = run_case("decode_gqa", "auto", dtype=torch.float64, device="cpu")
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)   # (the torch path computes in fp32)
