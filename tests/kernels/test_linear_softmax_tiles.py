"""The vocabulary split plan of the fused-loss forwards as a GPU computes it, the tile configurations its
autotuner benchmarks, and the shared logits tiles at the edge of their K loop and with a reference head of its own
width, and the logit soft cap's precision."""
import pytest
import torch
import triton
import triton.language as tl

import fastalign
from fastalign.kernels import linear_cross_entropy as ce, linear_kl_div as kl, linear_softmax_tiles as tiles
from fastalign.reference.linear_losses import linear_cross_entropy_reference, linear_kl_div_reference
from tests.compare import REL_TOL, assert_rel_close
from tests.conftest import TRITON_DEVICE
from tests.kernels import test_linear_cross_entropy as ce_tests, test_linear_kl_div as kl_tests
from tests.kernels.gpu_plans import use_gpu_plans


def test_gpu_vocab_split_plan_covers_the_vocabulary_in_non_empty_aligned_ranges(monkeypatch):
    use_gpu_plans(monkeypatch)
    for num_rows in [1, 63, 64, 300, 3000, 8192, 65536]:
        for vocab in [1, 255, 256, 257, 5003, 32000, 128256]:
            num_splits, per_split = tiles.vocab_splits(num_rows, vocab, "cpu")
            assert per_split % 256 == 0 and (num_splits - 1) * per_split < vocab <= num_splits * per_split


def test_gpu_vocab_split_plan_keeps_every_sm_busy(monkeypatch):
    """Few rows (of a vocabulary of 128256 words): split among about twice as many programs as the GPU has SMs (at
    least 1.5x once the ranges are rounded up to 256 words); many rows: still 16 splits, which forward_grid's order
    relies on."""
    use_gpu_plans(monkeypatch, sms=132)
    for num_rows in [1, 64, 300]:
        num_splits, _ = tiles.vocab_splits(num_rows, 128256, "cpu")
        assert num_splits * triton.cdiv(num_rows, 64) >= 1.5 * 132, (num_rows, num_splits)
    for num_rows in [8192, 65536]:
        assert tiles.vocab_splits(num_rows, 128256, "cpu")[0] == 16


def test_fp32_operands_benchmark_only_the_small_tile():
    """On a GPU the autotuner compiles and times every candidate for each new key and argument specialisation;
    with fp32 operands the 16-bit tile shapes spill registers and take seconds each to build, so only the small
    tile (the last candidate, the one that always fits) is kept for them."""
    configs = [triton.Config({"BLOCK_M": bm, "BLOCK_V": bv, "BLOCK_K": bk}, num_warps=w, num_stages=st)
               for bm, bv, bk, w, st in tiles._TILE_SHAPES[1] + [tiles._SMALL_TILE]]
    t = {dtype: torch.empty(2, 2, dtype=dtype) for dtype in (torch.float32, torch.bfloat16, torch.float16)}
    for half in (torch.bfloat16, torch.float16):
        assert tiles.prune_for_dtype(configs, {"x_ptr": t[half], "w_ptr": t[half]}) == configs
        assert tiles.prune_for_dtype(configs, {"x_ptr": t[half], "xr_ptr": t[half]}) == configs
        # a 16-bit policy against an fp32 reference: the reference's dots are fp32 ones
        assert tiles.prune_for_dtype(configs, {"x_ptr": t[half], "xr_ptr": t[torch.float32]}) == configs[-1:]
    assert tiles.prune_for_dtype(configs, {"x_ptr": t[torch.float32], "w_ptr": t[torch.float32]}) == configs[-1:]
    (bm, bv, bk, w, st), = [tiles._SMALL_TILE]
    assert configs[-1].kwargs == {"BLOCK_M": bm, "BLOCK_V": bv, "BLOCK_K": bk}
    assert (configs[-1].num_warps, configs[-1].num_stages) == (w, st)
    for tuner in (ce._forward_kernel, ce._gradient_kernel, kl._forward_kernel, kl._gradient_kernel):
        assert tuner.early_config_prune is tiles.prune_for_dtype


@pytest.mark.parametrize("loss", ["ce", "kl", "kl_shared_weight"])
def test_hidden_size_one_past_a_k_block_takes_its_last_column(loss):
    """H = BLOCK_K + 1 (17 under the interpreter): the K loop's last chunk holds one column, which a loop that stops
    one short of H (range(0, H - 1, BLOCK_K)) would drop from every logit, in the one- and two-stream tiles."""
    hidden_size = (tiles._INTERPRET_BLOCKS["BLOCK_K"] if tiles.INTERPRET else 64) + 1
    if loss == "ce":
        ce_tests.check_against_reference(5, hidden_size, 40, torch.float32, with_bias=False, tol=1e-4)
    else:
        kl_tests.check_against_reference(5, hidden_size, 40, torch.float32, tol=1e-4,
                                         shared_weight=loss == "kl_shared_weight")


@pytest.mark.parametrize("ref_width", [8, 40])
def test_reference_head_of_its_own_width(ref_width):
    """A reference model narrower or wider than the policy (a distilled or a larger teacher): the reference's
    logits take their K loop over its own width H_REF, not the policy's H (24 here)."""
    hidden, weight, _, _, _, _, grad_scale = kl_tests.make_inputs(5, 24, 40, torch.float32, None, False)
    _, _, _, ref_hidden, ref_weight, _, _ = kl_tests.make_inputs(5, ref_width, 40, torch.float32, None, False)
    heads = (hidden, weight, None, ref_hidden, ref_weight, None)
    ref_kl, ref_lse, ref_ref_lse, ref_dh, ref_dw, _ = kl_tests.float64_reference(*heads, grad_scale)
    kl_out, lse, ref_lse_out = kl.forward(*heads)
    torch.testing.assert_close(kl_out.double(), ref_kl, rtol=1e-4, atol=1e-9)
    kl_tests.assert_matches(lse, ref_lse, 1e-4)
    kl_tests.assert_matches(ref_lse_out, ref_ref_lse, 1e-4)
    d_hidden, d_weight, _ = kl.backward(*heads, lse, ref_lse_out, grad_scale, True, False)
    kl_tests.assert_matches(d_hidden, ref_dh, 1e-4)
    kl_tests.assert_matches(d_weight, ref_dw, 1e-4)


@triton.jit
def _soft_cap_kernel(z_ptr, out_ptr, cap, N, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    tl.store(out_ptr + offs, tiles.soft_cap(tl.load(z_ptr + offs, mask=mask), cap), mask=mask)


@pytest.mark.parametrize("cap", [0.5, 50.0, 1e4, 1e6])
def test_soft_cap_keeps_fp32_precision_at_every_ratio_to_the_cap(cap):
    """soft_cap took tanh(x) as 1 - 2 / (exp(2x) + 1), which cancels for |x| = |z / cap| << 1: an absolute error
    ~1e-7 cap, so a cap far above the logits (1e4-1e6) moved every logit by 1e-3-1e-1 (the cross-entropy off by 0.15
    at 1e6; Gemma 2's attention cap 50 10x less accurate than torch.tanh). Now ~1e-6 relative at every ratio, and
    +-cap at +-inf."""
    ratios = torch.cat([torch.logspace(-30, 1.5, 301), torch.linspace(0.4, 0.7, 301), torch.zeros(1)])
    z = torch.cat([ratios, -ratios]) * cap
    z = torch.cat([z, torch.tensor([float("inf"), float("-inf")])]).to(TRITON_DEVICE)
    out = torch.empty_like(z)
    _soft_cap_kernel[(triton.cdiv(z.numel(), 128),)](z, out, cap, z.numel(), BLOCK=128)
    want = cap * torch.tanh(z.cpu().double() / cap)
    torch.testing.assert_close(out.cpu().double(), want, rtol=2e-6, atol=0.0)   # a GPU's exp and division: 2 ulp


@pytest.mark.parametrize("softcap", [1e4, 1e6])
def test_losses_with_a_cap_far_above_the_logits_match_the_reference(softcap):
    """The fused losses through that soft cap: a cap that barely changes logits of ~10 left their cross-entropy and
    KL 1e-4-1e-2 off the float64 reference."""
    torch.manual_seed(0)
    hidden, ref_hidden = torch.randn(8, 16), torch.randn(8, 16)
    weight = torch.randn(64, 16) * 5
    target = torch.randint(0, 64, (8,))
    on_device = [t.to(TRITON_DEVICE) for t in (hidden, ref_hidden, weight, target)]
    out = fastalign.linear_cross_entropy(on_device[0], on_device[2], on_device[3], softcap=softcap, reduction="none",
                                         backend="triton")
    ref = linear_cross_entropy_reference(hidden, weight, target, softcap=softcap, reduction="none")
    assert_rel_close("loss", out.cpu(), ref, REL_TOL[torch.float32])
    out = fastalign.linear_kl_div(on_device[0], on_device[2], on_device[1], on_device[2], softcap=softcap,
                                  reduction="none", backend="triton")
    ref = linear_kl_div_reference(hidden, weight, ref_hidden, weight, softcap=softcap, reduction="none")
    assert_rel_close("kl", out.cpu(), ref, REL_TOL[torch.float32])


@pytest.mark.parametrize("cap", [0.5, 50.0, 1e6])
def test_soft_cap_below_the_polynomials_limit_is_within_its_stated_precision(cap):
    """|z / cap| < 0.55 takes the odd minimax polynomial alone (no exp; a GPU rounds it as the interpreter does but for
    the division z / cap): ~5e-7 relative, as the docstring says. The test of every ratio allows 2e-6 for a GPU's exp
    and division, which passed a coefficient off by 4e-6 (Taylor's -1/3 for the minimax -0.333329469)."""
    ratios = torch.linspace(0.0, 0.549, 1099)
    z = (torch.cat([ratios, -ratios]) * cap).to(TRITON_DEVICE)
    out = torch.empty_like(z)
    _soft_cap_kernel[(triton.cdiv(z.numel(), 128),)](z, out, cap, z.numel(), BLOCK=128)
    want = cap * torch.tanh(z.cpu().double() / cap)
    torch.testing.assert_close(out.cpu().double(), want, rtol=8e-7, atol=0.0)   # ~5e-7, and a GPU division's ulp
