"""Kernel-level edge cases of the Triton paged attention: split keys, tile layout, index safety, GPU build."""
import inspect

import pytest
import torch

import fastalign.kernels.paged_attention as pak
from fastalign.kernels.paged_attention import launch_config, paged_attention_triton
from fastalign.ops.paged_attention import paged_attention
from fastalign.reference.paged_attention import paged_attention_reference
from tests.conftest import TRITON_DEVICE
from tests.kernels.gpu_build import assert_builds
from tests.ops.test_paged_attention import CASES, SHARED_CASES, make_paged_batch, make_shared_case


TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}  # P is rounded to the input dtype


def assert_matches_reference(out, batch, scale, window=None, softcap=None):
    """out equals the float64 reference of the op on `batch`, within the tolerance of the queries' dtype."""
    ref = paged_attention_reference(**{name: t.cpu() for name, t in batch.items()}, scale=scale, window=window,
                                    softcap=softcap)
    tol = TOLERANCE[batch["q"].dtype]
    torch.testing.assert_close(out.cpu().double(), ref, rtol=tol, atol=tol)


@pytest.mark.parametrize("num_splits", [2, 5])
def test_split_keys_merge_to_the_reference(num_splits):
    """Contexts of several key tiles cut into parts, some of them empty for the shorter rows."""
    batch = make_paged_batch([(200, 1), (150, 3), (64, 2), (3, 1)], 16, 4, 2, 16, shared_blocks=4,
                             device=TRITON_DEVICE)
    out = paged_attention_triton(**batch, scale=0.25, num_splits=num_splits)
    assert_matches_reference(out, batch, 0.25)


@pytest.mark.parametrize("num_splits", [2, 5])
def test_split_keys_of_heads_narrower_than_their_tile_merge_to_the_reference(num_splits):
    """The merge of heads whose width is not a power of two (24, in tiles of 32; the other split tests are 16 wide).
    Under the interpreter a store of a 25th column would go unseen (the next program writes that element again
    after it, in grid order); on a GPU the two race."""
    batch = make_paged_batch([(200, 1), (150, 3), (64, 2), (3, 1)], 16, 4, 2, 24, shared_blocks=4,
                             device=TRITON_DEVICE)
    out = paged_attention_triton(**batch, scale=24 ** -0.5, num_splits=num_splits)
    assert_matches_reference(out, batch, 24 ** -0.5)


def test_split_keys_merge_scores_whose_exponential_overflows_float32():
    """Scores up to ~150 (lse past 128 in the kernels' log2 domain, so 2^lse overflows fp32; outlier queries of a
    model without QK norm reach such scores): the merge shifts every part by the largest lse before exponentiating,
    also when some of its part slots are empty (3 parts in 4 slots)."""
    batch = make_paged_batch([(200, 1), (150, 3), (64, 2)], 16, 4, 2, 16, device=TRITON_DEVICE)
    batch["q"] = batch["q"] * 60
    out = paged_attention_triton(**batch, scale=0.25, num_splits=3)
    assert torch.isfinite(out).all()
    assert_matches_reference(out, batch, 0.25)


@pytest.mark.parametrize("num_splits", [2, 5])
def test_split_keys_of_a_window_merge_to_the_reference(num_splits):
    """Only the keys a tile sees are split: the decode of row 0 sees its last 37 keys, which 5 parts of 16 keys
    cover with 2 empty parts (their lse -inf weighs nothing in the merge). Slots before the windows hold NaN."""
    batch = make_paged_batch([(200, 1), (150, 3), (64, 2), (3, 1)], 16, 4, 2, 16, window=37, device=TRITON_DEVICE)
    out = paged_attention_triton(**batch, scale=0.25, num_splits=num_splits, window=37)
    assert_matches_reference(out, batch, 0.25, window=37)


@pytest.mark.parametrize("window", [None, 37])
@pytest.mark.parametrize("num_splits", [2, 5])
def test_split_keys_with_a_softcap_merge_to_the_reference(num_splits, window):
    """Each part caps its own scores before its softmax; the merge of the parts is the capped softmax's."""
    batch = make_paged_batch([(200, 1), (150, 3), (64, 2), (3, 1)], 16, 4, 2, 16, window=window,
                             device=TRITON_DEVICE)
    out = paged_attention_triton(**batch, scale=0.25, num_splits=num_splits, window=window, softcap=0.8)
    assert_matches_reference(out, batch, 0.25, window=window, softcap=0.8)


def test_a_softcap_far_above_the_scores_keeps_fp32_precision():
    """The soft cap took tanh(x) as 1 - 2 / (exp(2x) + 1), whose absolute error ~1e-7 cap (x = s / cap << 1) moved
    every score by ~1e-3 under a cap of 1e4: the output 1e-4 off the reference instead of ~1e-7."""
    batch = make_paged_batch([(200, 1), (150, 3), (64, 2), (3, 1)], 16, 4, 2, 16, device=TRITON_DEVICE)
    out = paged_attention_triton(**batch, scale=0.25, num_splits=2, softcap=1e4)
    assert_matches_reference(out, batch, 0.25, softcap=1e4)


def test_window_queries_that_see_no_key_in_a_part_merge_to_the_reference():
    """A bf16 tile of 128 queries (GROUP 1) with a window of 3 sees 130 keys, cut into 3 parts of 64: its first
    queries see no key of the last part, its last queries none of the first (both merge with weight 0)."""
    batch = make_paged_batch([(300, 200), (20, 1)], 16, 2, 2, 16, dtype=torch.bfloat16, window=3,
                             device=TRITON_DEVICE)
    config = pak._pass_config(batch["q"], batch["k_cache"], 2, batch["block_table"].shape[1] * 16, 3)
    assert (config["block_m"], config["block_n"]) == (128, 64)
    out = paged_attention_triton(**batch, scale=0.25, num_splits=3, window=3)
    assert_matches_reference(out, batch, 0.25, window=3)


def test_a_window_bounds_the_automatic_split_choice(monkeypatch):
    """With a GPU's SM count, long contexts split their keys (test_long_contexts_split_their_keys_through_the_op);
    a window of 40 leaves each tile under 4 key tiles to see, so the same batch takes one part."""
    monkeypatch.setattr(pak, "_num_sms", lambda device: 132)
    chosen, real = [], pak.choose_num_splits
    monkeypatch.setattr(pak, "choose_num_splits", lambda *args: chosen.append(real(*args)) or chosen[-1])
    batch = make_paged_batch([(300, 1), (260, 9), (140, 1)], 16, 4, 2, 16, window=40, device=TRITON_DEVICE)
    out = paged_attention(**batch, backend="triton", scale=0.25, window=40)
    assert chosen == [1]
    assert_matches_reference(out, batch, 0.25, window=40)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("num_splits", [3])
@pytest.mark.parametrize("case", SHARED_CASES)
def test_cascade_passes_with_split_keys_merge_to_the_reference(case, num_splits, dtype):
    batch, plan = make_shared_case(case, dtype=dtype, device=TRITON_DEVICE)
    out = paged_attention_triton(**batch, scale=0.3, shared_prefix=plan, num_splits=num_splits)
    assert_matches_reference(out, batch, 0.3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", SHARED_CASES)
def test_cascade_passes_with_split_keys_and_a_softcap_merge_to_the_reference(case, dtype):
    """Both cascade passes cap their scores (the shared blocks' without causal mask, then each row's own)."""
    batch, plan = make_shared_case(case, dtype=dtype, device=TRITON_DEVICE)
    out = paged_attention_triton(**batch, scale=0.3, shared_prefix=plan, num_splits=3, softcap=0.9)
    assert_matches_reference(out, batch, 0.3, softcap=0.9)


@pytest.mark.parametrize("num_tokens, num_rows, group", [(1, 1, 1), (8, 8, 7), (1000, 1, 4), (30, 3, 128), (5, 5, 3)])
def test_tiles_hold_whole_groups_and_fit_tensor_cores(num_tokens, num_rows, group):
    block_m, block_n, _, _ = launch_config(num_tokens, num_rows, group, 64, 2)
    assert block_m >= max(16, group) and block_m & (block_m - 1) == 0
    assert block_m // group >= 1 and block_n >= 16


def test_unvalidated_bad_block_ids_stay_in_bounds():
    """Block ids outside the pool (validation skipped) must not read outside the pool: the kernel clamps."""
    batch = make_paged_batch([(40, 2), (17, 1)], 8, 4, 2, 16, device=TRITON_DEVICE)
    for pool in (batch["k_cache"], batch["v_cache"]):
        pool.copy_(torch.randn_like(pool))  # no NaN slots: every block read is some finite context
    batch["block_table"].fill_(1 << 30)
    batch["seq_lens"][0] = 300  # also past the table's capacity
    out = paged_attention(**batch, backend="triton", validate=False)
    assert out.shape == batch["q"].shape and bool(torch.isfinite(out).all())
    # the clamps read the pool's last block, at every column past the table's: a table of it, wide enough
    last_block = torch.full((2, -(-300 // 8)), batch["k_cache"].shape[0] - 1, dtype=torch.int32, device=TRITON_DEVICE)
    torch.testing.assert_close(out, paged_attention(**{**batch, "block_table": last_block}, backend="torch"))


def test_unvalidated_metadata_reads_nothing_next_to_the_pool_or_the_table():
    """Block ids just outside the pool and a context longer than its table row (validation skipped) must read
    the pool's first or last block and the row's last column again (the kernel clamps them), not the memory next
    to them: here that memory is the hidden part of wider tensors, and what it holds must not change the result."""
    torch.manual_seed(0)
    keys, values = (torch.randn(8, 4, 1, 16, device=TRITON_DEVICE) for _ in range(2))
    wide = torch.zeros(1, 8, dtype=torch.int32, device=TRITON_DEVICE)
    wide[0, :2] = torch.tensor([-1, 6])   # both outside the pool of blocks 0..5 (keys[1:7])
    index = dict(dtype=torch.int32, device=TRITON_DEVICE)
    batch = dict(q=torch.randn(1, 2, 16, device=TRITON_DEVICE), k_cache=keys[1:7], v_cache=values[1:7],
                 block_table=wide[:, :2], seq_lens=torch.tensor([16], **index), cu_q_lens=torch.tensor([0, 1], **index))
    outs = []
    for hidden in (2, 5):  # table columns 2 and 3, and the blocks before and after the pool, change
        wide[0, 2:] = hidden
        for t in (keys, values):
            t[[0, 7]] = torch.randn(2, 4, 1, 16, device=TRITON_DEVICE)
        outs.append(paged_attention(**batch, backend="triton", validate=False))
    assert torch.equal(outs[0], outs[1])



def test_unvalidated_negative_shared_prefix_reads_nothing_before_the_table_or_the_pool():
    """A shared_prefix whose prefix length is negative (validation skipped) started the suffix pass's keys at a
    negative position: the table column and the slot within the page went negative, and the kernel read the memory
    before the table and the pool. Here that memory is the hidden part of wider tensors, and what it holds must not
    change the result (it did: the output turned NaN)."""
    torch.manual_seed(0)
    keys, values = (torch.randn(5, 4, 1, 16, device=TRITON_DEVICE) for _ in range(2))
    index = dict(dtype=torch.int32, device=TRITON_DEVICE)
    wide = torch.tensor([[0, 0, 1], [0, 0, 2]], **index)
    batch = dict(q=torch.randn(2, 1, 16, device=TRITON_DEVICE), k_cache=keys[1:], v_cache=values[1:],
                 block_table=wide[:, 1:], seq_lens=torch.tensor([6, 6], **index),
                 cu_q_lens=torch.tensor([0, 1, 2], **index))
    shared_prefix = (torch.tensor([0, 2], **index), torch.tensor([-8], **index))
    outs = []
    for hidden_block, hidden in ((0, 0.0), (3, float("nan"))):  # the table column and the block before them change
        wide[:, 0] = hidden_block
        keys[0], values[0] = hidden, hidden
        outs.append(paged_attention(**batch, backend="triton", shared_prefix=shared_prefix, validate=False))
    assert bool(torch.isfinite(outs[1]).all())
    assert torch.equal(outs[0], outs[1])

COMPILE_FOR_GPUS = r"""
import triton
from fastalign.kernels.paged_attention import _merge_splits_kernel, _paged_attention_kernel, launch_config
from tests.kernels.gpu_build import build_for_gpu, check_build, uses_tensor_cores

# decode with split keys; a long bf16 prefill, also of heads wider than 128; the two cascade passes (shared
# blocks without causal mask, then each row from the first key after its group's prefix); an fp32 extension with a
# group of 7 and head_dim 96 (for tests, not tuned); the sliding window's decode with split keys, prefills and fp32
# extension; the soft cap's decode with split keys and prefill, alone and with the window; both cascade passes under a
# window (the shared pass finding each query's row), also with head_dim 256 and the cap (Gemma 2 and 3's local
# layers); a prefill of head_dim 512 (Gemma 4's full-attention layers: its first tiles needed 132 KiB, an L4's block
# has 99); a decode of 128 query heads on one KV head (a group wider than the largest tile). The tiles come from shapes
# alone, with no fallback: the 16-bit ones must also fit an A100's, an L4's (sm_89) and Blackwell's (a B200's sm_100,
# an RTX 50's sm_120) block, their dots on each one's tensor cores.
for dtype, itemsize, tokens, rows, group, head_dim, prefix_pass, suffix_pass, partial, sliding, softcap in (
        ("bf16", 2, 8, 8, 4, 64, False, False, True, False, False),
        ("bf16", 2, 4096, 1, 4, 128, False, False, False, False, False),
        ("bf16", 2, 4096, 1, 4, 256, False, False, False, False, False),
        ("bf16", 2, 64, 1, 4, 64, True, False, True, False, False),
        ("bf16", 2, 64, 64, 4, 64, False, True, True, False, False),
        ("fp32", 4, 40, 4, 7, 96, False, False, False, False, False),
        ("bf16", 2, 8, 8, 4, 64, False, False, True, True, False),
        ("bf16", 2, 4096, 1, 4, 128, False, False, False, True, False),
        ("bf16", 2, 4096, 1, 4, 256, False, False, False, True, False),
        ("fp32", 4, 40, 4, 7, 96, False, False, False, True, False),
        ("bf16", 2, 8, 8, 4, 64, False, False, True, False, True),
        ("bf16", 2, 4096, 1, 4, 128, False, False, False, False, True),
        ("bf16", 2, 4096, 1, 4, 256, False, False, False, False, True),
        ("bf16", 2, 4096, 1, 4, 256, False, False, False, True, True),
        ("bf16", 2, 64, 1, 4, 64, True, False, True, True, False),
        ("bf16", 2, 64, 64, 4, 64, False, True, True, True, False),
        ("bf16", 2, 64, 1, 2, 256, True, False, True, True, True),
        ("bf16", 2, 4096, 1, 8, 512, False, False, False, False, False),
        ("bf16", 2, 8, 8, 128, 256, False, False, True, False, False)):
    block_m, block_n, num_warps, num_stages = launch_config(tokens, rows, group, head_dim, itemsize)
    types = dict(Q="*" + dtype, K="*" + dtype, V="*" + dtype, BlockTable="*i32", SeqLens="*i32", RowSeqLens="*i32",
                 CuQLens="*i32",
                 CuGroupRows="*i32", PrefixLens="*i32", Out="*fp32" if partial else "*" + dtype, Lse="*fp32",
                 qk_scale="fp32", softcap="fp32")
    constants = dict(HEAD_DIM=head_dim, BLOCK_D=max(16, triton.next_power_of_2(head_dim)), GROUP=group, PAGE=16,
                     BLOCK_M=block_m, BLOCK_N=block_n, PREFIX_PASS=prefix_pass,
                     SUFFIX_PASS=suffix_pass, WRITE_LSE=partial, SLIDING=sliding, SOFTCAP=softcap,
                     SEARCH_STEPS=8 if prefix_pass and sliding else 0)
    what = (dtype, tokens, rows, group, head_dim, "sliding" if sliding else "", "softcap" if softcap else "")
    for capability in (90, 80, 89, 100, 120) if dtype == "bf16" else (90,):
        compiled = build_for_gpu(_paged_attention_kernel, types, constants, num_warps, num_stages, capability)
        assert dtype == "fp32" or uses_tensor_cores(compiled), (what, capability, "bf16 dots off the tensor cores")
        check_build(compiled, what, tuned=dtype == "bf16" and capability == 90, capability=capability)
for sinks in (False, True):  # gpt-oss's attention sinks join at the merge
    check_build(build_for_gpu(_merge_splits_kernel, dict(Partial="*fp32", Lse="*fp32", Out="*bf16",
                                                         Sinks="*bf16" if sinks else "*fp32"),
                              dict(HEAD_DIM=64, BLOCK_D=64, BLOCK_S=4, SINKS=sinks), 1, 1), "merge", tuned=False)
"""


def test_kernels_compile_for_sm90_and_fit_sm80_sm89_sm100_sm120_without_a_gpu():
    assert_builds(COMPILE_FOR_GPUS)


# Paths a GPU takes and the interpreter would not: split keys on prefill tiles, the automatic split choice,
# programs that run at once on a GPU (run alone here), 16-bit and wide-head tiles.

def test_prefill_tiles_with_split_keys_merge_to_the_reference():
    """Query tiles of several queries whose key range is split (on a GPU: prefill of few rows over long
    contexts): here BLOCK_M 32 holds 8 queries, and the tile of positions 61..68 has its second part start at
    key 64, so queries 61-63 see no key in that part's first key tile (the m_safe guard)."""
    batch = make_paged_batch([(75, 38)], 7, 8, 2, 16, device=TRITON_DEVICE)
    out = paged_attention_triton(**batch, scale=0.25, num_splits=2)
    assert_matches_reference(out, batch, 0.25)


def test_long_contexts_split_their_keys_through_the_op(monkeypatch):
    """The automatic choice of splits (paged_attention passes no num_splits) with a GPU's SM count: the op's
    tests never reach it, their contexts being under 4 key tiles."""
    monkeypatch.setattr(pak, "_num_sms", lambda device: 132)
    chosen, real = [], pak.choose_num_splits
    monkeypatch.setattr(pak, "choose_num_splits", lambda *args: chosen.append(real(*args)) or chosen[-1])
    batch = make_paged_batch([(300, 1), (260, 9), (140, 1)], 16, 4, 2, 16, device=TRITON_DEVICE)
    out = paged_attention(**batch, backend="triton", scale=0.25)
    assert max(chosen) > 1
    assert_matches_reference(out, batch, 0.25)


@pytest.mark.parametrize("case", SHARED_CASES)
def test_cascade_with_split_shared_pass_and_one_part_per_row(monkeypatch, case):
    """What a GPU does by default: the shared pass (few groups, long prefixes) splits its keys, the rows' own
    pass takes one part, so the two passes own different numbers of parts."""
    monkeypatch.setattr(pak, "choose_num_splits", lambda *args: 3)
    batch, plan = make_shared_case(case, device=TRITON_DEVICE)
    out = paged_attention_triton(**batch, scale=0.3, shared_prefix=plan)
    assert_matches_reference(out, batch, 0.3)


def test_a_query_tile_writes_only_its_own_queries():
    """GROUP 3 does not divide BLOCK_M: the tile's last rows map to the next tile's first query. The interpreter
    runs the next tile afterwards and overwrites them, a GPU runs both at once; run the first tile alone."""
    batch = make_paged_batch([(20, 12)], 4, 6, 2, 16, device=TRITON_DEVICE)
    q, k_cache = batch["q"], batch["k_cache"]
    max_context = batch["block_table"].shape[1] * k_cache.shape[1]
    config = pak._pass_config(q, k_cache, 1, max_context, 1)
    queries = config["block_m"] // 3
    assert config["block_m"] % 3 and queries < 12
    out = torch.full_like(q, float("nan"))
    pak._attention_pass(q, k_cache, batch["v_cache"], batch["block_table"], batch["seq_lens"], batch["cu_q_lens"],
                        0.25, dict(config, slots=1), out, None)
    ref = paged_attention_reference(**{name: t.cpu() for name, t in batch.items()}, scale=0.25)
    torch.testing.assert_close(out[:queries].cpu().double(), ref[:queries], rtol=1e-5, atol=1e-5)
    assert out[queries:].isnan().all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", ["decode_gqa", "extend_shared_gqa_d32", "prefill_several_query_tiles"])
def test_16_bit_tiles_match_the_reference(case, dtype):
    """16-bit inputs take the GPU's tiles (BLOCK_M up to 128, BLOCK_N 64) and round P to the input dtype before
    P @ V (the interpreter computes bf16 dots by value since kernels/interpreter_fixes.py)."""
    rows, block_size, num_heads, num_kv_heads, head_dim, shared = CASES[case]
    batch = make_paged_batch(rows, block_size, num_heads, num_kv_heads, head_dim, shared_blocks=shared,
                             dtype=dtype, device=TRITON_DEVICE)
    out = paged_attention(**batch, backend="triton")
    ref = paged_attention_reference(**{name: t.cpu() for name, t in batch.items()})
    torch.testing.assert_close(out.cpu().double(), ref, rtol=TOLERANCE[dtype], atol=TOLERANCE[dtype])


@pytest.mark.parametrize("window", [None, 5])
@pytest.mark.parametrize("case", ["decode_gqa", "prefill_several_query_tiles"])
def test_bf16_tiles_with_a_softcap_match_the_reference(case, window):
    """The cap on the GPU's 16-bit tiles (fp32 scores from bf16 dots), alone and with a window."""
    rows, block_size, num_heads, num_kv_heads, head_dim, _ = CASES[case]
    batch = make_paged_batch(rows, block_size, num_heads, num_kv_heads, head_dim, dtype=torch.bfloat16,
                             window=window, device=TRITON_DEVICE)
    out = paged_attention(**batch, backend="triton", window=window, softcap=1.0)
    assert_matches_reference(out, batch, None, window=window, softcap=1.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_heads_wider_than_128_take_their_own_tiles(dtype):
    """head_dim 160 (BLOCK_D 256, masked) selects the narrow key tiles of wide heads."""
    batch = make_paged_batch([(40, 3), (25, 1)], 8, 4, 2, 160, dtype=dtype, device=TRITON_DEVICE)
    out = paged_attention(**batch, backend="triton")
    ref = paged_attention_reference(**{name: t.cpu() for name, t in batch.items()})
    torch.testing.assert_close(out.cpu().double(), ref, rtol=TOLERANCE[dtype], atol=TOLERANCE[dtype])


def test_strided_index_tensors_are_read_by_their_strides():
    """Index tensors given as strided views (columns of packed metadata, a column-major block table, a
    strided prefix_lens) give the reference result, as on the torch path, not elements of their neighbours."""
    batch, plan = make_shared_case("two_groups_and_a_loner", device=TRITON_DEVICE)

    def column(t):  # the same values, as column 0 of a [n, 2] tensor whose column 1 holds zeros
        return torch.stack([t, torch.zeros_like(t)], 1)[:, 0]

    strided = dict(batch, seq_lens=column(batch["seq_lens"]), cu_q_lens=column(batch["cu_q_lens"]),
                   block_table=batch["block_table"].t().contiguous().t())
    assert strided["block_table"].stride(1) != 1 and strided["seq_lens"].stride(0) != 1
    out = paged_attention(**strided, backend="triton")
    assert_matches_reference(out, batch, None)
    out = paged_attention(**strided, backend="triton", shared_prefix=tuple(column(t) for t in plan))
    assert_matches_reference(out, batch, None)


def test_the_split_count_is_a_runtime_argument():
    """A decode's split count changes as its context grows (choose_num_splits): as a constexpr, or an int that
    Triton specialises (== 1, multiple of 16), each new value compiled the kernels again, in the timed loop."""
    for kernel in (pak._paged_attention_kernel, pak._merge_splits_kernel):   # jitted, or interpreted in CPU tests
        unspecialised = getattr(kernel, "do_not_specialize", None) or kernel.kwargs["do_not_specialize"]
        annotation = inspect.signature(kernel.fn).parameters["num_splits"].annotation
        assert "num_splits" in unspecialised and annotation is inspect.Parameter.empty


def test_the_window_is_a_runtime_argument_behind_a_compile_time_flag():
    """Models with windows of different sizes share one build; a windowless call builds the kernel without the
    window's code (SLIDING False)."""
    kernel = pak._paged_attention_kernel
    unspecialised = getattr(kernel, "do_not_specialize", None) or kernel.kwargs["do_not_specialize"]
    parameters = inspect.signature(kernel.fn).parameters
    assert "window" in unspecialised and parameters["window"].annotation is inspect.Parameter.empty
    assert "constexpr" in str(parameters["SLIDING"].annotation)


def test_the_softcap_is_a_runtime_argument_behind_a_compile_time_flag():
    """Models with different caps share one build; an uncapped call builds the kernel without the cap's code
    (SOFTCAP False)."""
    parameters = inspect.signature(pak._paged_attention_kernel.fn).parameters
    assert parameters["softcap"].annotation is inspect.Parameter.empty
    assert "constexpr" in str(parameters["SOFTCAP"].annotation)
