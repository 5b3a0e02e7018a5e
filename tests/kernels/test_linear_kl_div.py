"""The fused linear forward-KL kernels against plain float64 logits, forward and every gradient.

Without CUDA the kernels run under the Triton interpreter (tests/conftest.py), at small odd shapes.
Besides unrelated P and Q, the cases that matter in unlearning: P close to Q (KL ~ 1e-5, where a
difference of two logsumexps would lose every digit), P equal to Q (the first step), one shared lm_head, an
lm_head with a bias (Phi-2, GPT-J), shared or not.
"""
import pytest
import torch
import triton
import triton.language as tl

import fastalign
from fastalign.kernels import linear_kl_div as kernel
from fastalign.kernels import linear_softmax_tiles as tiles
from fastalign.kernels.linear_kl_div import _expm1_series
from tests.conftest import HAS_CUDA, requires_cuda
from tests.kernels.gpu_plans import GPU_PLAN_SHAPES, force_tile_config, use_gpu_plans
from tests.kernels.test_linear_cross_entropy import GPU_SHAPES

DEVICE = "cuda" if HAS_CUDA else "cpu"


def make_inputs(num_rows, hidden_size, vocab, dtype, ref_distance, shared_weight, logit_scale=3.0, bias=None):
    """(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, grad_scale): current and reference heads whose
    logits differ by ~ref_distance (ref_distance None: unrelated reference); ref_weight is weight itself when
    shared_weight. bias: None (no biases), "own" (one per head) or "shared" (ref_bias is bias itself)."""
    def rand(*shape, scale=1.0):
        return torch.randn(*shape, device=DEVICE) * scale

    hidden = rand(num_rows, hidden_size)
    weight = rand(vocab, hidden_size, scale=logit_scale / hidden_size ** 0.5)
    head_bias = rand(vocab)
    if ref_distance is None:
        ref_hidden = rand(num_rows, hidden_size)
        ref_weight = rand(vocab, hidden_size, scale=logit_scale / hidden_size ** 0.5)
        ref_bias = rand(vocab)
    else:
        ref_hidden = hidden + rand(num_rows, hidden_size, scale=ref_distance / logit_scale)
        ref_weight = weight + rand(vocab, hidden_size, scale=ref_distance / hidden_size ** 0.5)
        ref_bias = head_bias + rand(vocab, scale=ref_distance)
    hidden, weight, head_bias, ref_hidden, ref_weight, ref_bias = (
        t.to(dtype) for t in (hidden, weight, head_bias, ref_hidden, ref_weight, ref_bias))
    if shared_weight:
        ref_weight = weight
    if bias is None:
        head_bias = ref_bias = None
    elif bias == "shared":
        ref_bias = head_bias
    grad_scale = rand(num_rows)  # mixed signs
    return hidden, weight, head_bias, ref_hidden, ref_weight, ref_bias, grad_scale


def float64_reference(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, grad_scale):
    """KL(P || Q), both logsumexps and the gradients of sum_t grad_scale_t KL_t (P constant) wrt hidden, weight and
    bias (None without a bias), in float64."""
    leaves = [None if t is None else t.detach().double().requires_grad_() for t in (hidden, weight, bias)]
    logits = leaves[0] @ leaves[1].T + (0.0 if bias is None else leaves[2])
    ref_logits = ref_hidden.double() @ ref_weight.detach().double().T + (0.0 if ref_bias is None else ref_bias.double())
    log_q = torch.log_softmax(logits, dim=1)
    log_p = torch.log_softmax(ref_logits, dim=1)
    kl = torch.where(log_p > float("-inf"), log_p.exp() * (log_p - log_q), 0.0).sum(dim=1)  # 0 log 0 = 0
    (grad_scale.double() * kl).sum().backward()
    return (kl.detach(), torch.logsumexp(logits, dim=1).detach(), torch.logsumexp(ref_logits, dim=1),
            *(None if leaf is None else leaf.grad for leaf in leaves))


def assert_matches(actual, expected, tol):
    """|actual - expected| <= tol * max|expected| elementwise: relative error at the tensor's own scale."""
    torch.testing.assert_close(actual.double(), expected, rtol=0, atol=tol * expected.abs().max().item())


def check_against_reference(num_rows, hidden_size, vocab, dtype, tol, ref_distance=None, shared_weight=False,
                            logit_scale=3.0, bias=None):
    *heads, grad_scale = make_inputs(num_rows, hidden_size, vocab, dtype, ref_distance, shared_weight, logit_scale,
                                     bias)
    ref_kl, ref_lse, ref_ref_lse, ref_dh, ref_dw, ref_db = float64_reference(*heads, grad_scale)

    kl, lse, ref_lse_out = kernel.forward(*heads)
    assert kl.shape == lse.shape == ref_lse_out.shape == (num_rows,)
    assert_matches(lse, ref_lse, tol)
    assert_matches(ref_lse_out, ref_ref_lse, tol)
    # each token's KL to its own relative accuracy: KL spans orders of magnitude across tokens
    torch.testing.assert_close(kl.double(), ref_kl, rtol=tol, atol=1e-9)

    d_hidden, d_weight, d_bias = kernel.backward(*heads, lse, ref_lse_out, grad_scale, need_weight_grad=True,
                                                 need_bias_grad=bias is not None)
    assert d_hidden.dtype == d_weight.dtype == dtype
    assert_matches(d_hidden, ref_dh, tol)
    assert_matches(d_weight, ref_dw, tol)
    if bias is None:
        assert d_bias is None
    else:
        assert d_bias.dtype == torch.float32
        assert_matches(d_bias, ref_db, tol)


@pytest.mark.parametrize("num_rows, hidden_size, vocab, shared_weight, bias", [
    (1, 24, 37, False, None),      # a single row, one split
    (1, 40, 131, True, "shared"),  # a single row, several vocabulary splits, one lm_head for both models
    (21, 40, 131, False, "own"),   # rows and vocabulary off the block sizes, a bias per head
    (33, 24, 333, True, None),     # several row blocks and splits
    (33, 24, 333, False, "shared"),
])
def test_fp32_unrelated_reference_matches_float64(num_rows, hidden_size, vocab, shared_weight, bias):
    check_against_reference(num_rows, hidden_size, vocab, torch.float32, tol=1e-4, shared_weight=shared_weight,
                            bias=bias)


@pytest.mark.parametrize("bias", ["own", "shared"])
def test_fp32_biases_of_one_head_only(bias):
    """A bias on one head only: the policy's (HAS_BIAS alone) or the reference's (HAS_REF_BIAS alone)."""
    hidden, weight, head_bias, ref_hidden, ref_weight, ref_bias, grad_scale = make_inputs(21, 24, 131, torch.float32,
                                                                                         None, False, bias="own")
    heads = ((hidden, weight, head_bias, ref_hidden, ref_weight, None) if bias == "own"
             else (hidden, weight, None, ref_hidden, ref_weight, ref_bias))
    ref_kl, _, _, ref_dh, ref_dw, ref_db = float64_reference(*heads, grad_scale)
    kl, lse, ref_lse = kernel.forward(*heads)
    torch.testing.assert_close(kl.double(), ref_kl, rtol=1e-4, atol=1e-9)
    d_hidden, d_weight, d_bias = kernel.backward(*heads, lse, ref_lse, grad_scale, True, heads[2] is not None)
    assert_matches(d_hidden, ref_dh, 1e-4)
    assert_matches(d_weight, ref_dw, 1e-4)
    if heads[2] is None:
        assert d_bias is None
    else:
        assert_matches(d_bias, ref_db, 1e-4)


@pytest.mark.parametrize("bias", ["own", "shared"])
def test_bias_of_minus_inf_over_a_whole_vocabulary_split(bias):
    """Words masked out by a bias of -inf over the first split (and its first tiles), in the reference's bias alone
    ("own": P gives them no mass, Q some) or in the one bias of both heads ("shared"): they add 0 log 0 = 0 to the
    KL, where p (log p - log q) alone would be 0 * inf = NaN, and the gradients stay finite."""
    vocab = 3 * tiles._SPLIT_ALIGN + 5
    *heads, grad_scale = make_inputs(9, 24, vocab, torch.float32, 1e-1, False, bias=bias)
    heads[5][:tiles._SPLIT_ALIGN + 3] = float("-inf")  # ref_bias, the policy's bias too when shared
    ref_kl, ref_lse, ref_ref_lse, ref_dh, ref_dw, ref_db = float64_reference(*heads, grad_scale)
    assert torch.isfinite(ref_kl).all() and (ref_kl > 1e-4).all()
    kl, lse, ref_lse_out = kernel.forward(*heads)
    torch.testing.assert_close(kl.double(), ref_kl, rtol=1e-4, atol=1e-9)
    assert_matches(lse, ref_lse, 1e-4)
    assert_matches(ref_lse_out, ref_ref_lse, 1e-4)
    grads = kernel.backward(*heads, lse, ref_lse_out, grad_scale, need_weight_grad=True, need_bias_grad=True)
    for got, want in zip(grads, (ref_dh, ref_dw, ref_db)):
        assert_matches(got, want, 1e-4)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's matmul of inf
@pytest.mark.parametrize("where", ["hidden", "ref_weight"])
def test_an_infinite_logit_gives_infinite_logsumexps_as_torch_does(where):
    """A hidden state or weight holding +inf: both logsumexps are +inf where torch.logsumexp gives it (the shared
    online logsumexp took exp(inf - inf) = NaN), and the KL the torch backend's (NaN where P's or Q's is inf)."""
    vocab = 3 * tiles._SPLIT_ALIGN + 5
    hidden, weight, _, ref_hidden, ref_weight, _, _ = make_inputs(9, 24, vocab, torch.float32, None, False)
    if where == "hidden":
        hidden[1, 0] = float("inf")
    else:
        ref_weight[tiles._SPLIT_ALIGN + 3, 2] = float("inf")   # in the second split
    logits, ref_logits = hidden.double() @ weight.double().T, ref_hidden.double() @ ref_weight.double().T
    expected = [torch.logsumexp(z, dim=1) for z in (logits, ref_logits)]
    assert any((e == float("inf")).any() for e in expected)
    expected_kl = fastalign.linear_kl_div(*(t.cpu() for t in (hidden, weight, ref_hidden, ref_weight)),
                                          reduction="none", backend="torch")
    kl, lse, ref_lse = kernel.forward(hidden, weight, None, ref_hidden, ref_weight, None)
    torch.testing.assert_close(kl.cpu(), expected_kl, rtol=1e-4, atol=1e-6, equal_nan=True)
    for got, want in zip((lse, ref_lse), expected):
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=0)


@pytest.mark.parametrize("shared_weight, bias", [(False, None), (True, None), (False, "own"), (True, "shared")])
def test_fp32_reference_close_to_current_keeps_kl_digits(shared_weight, bias):
    """Logits ~1e-2 apart, KL ~1e-5 per token. Here the problem itself is ill-conditioned: fp32 logits carry
    ~1e-6 rounding, i.e. ~1e-4 relative error in q - p and in the KL, so the bound is 1e-3. KL computed as
    E_p[zp - zq] minus the difference of two fp32 logsumexps would be off by ~1e-2."""
    check_against_reference(21, 40, 131, torch.float32, tol=1e-3, ref_distance=1e-2, shared_weight=shared_weight,
                            bias=bias)


@triton.jit
def _expm1_series_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    mask = offs < n
    tl.store(out_ptr + offs, _expm1_series(tl.load(x_ptr + offs, mask=mask, other=0.0)), mask=mask)


def test_expm1_series_is_exact_to_fp32_rounding_below_its_limit():
    """The series takes expm1(-d) for |d| below _EXPM1_SERIES_LIMIT, where the KL of a close reference lives: it
    must match expm1 to ~2 fp32 roundings (measured: under 1). Cut after its x^6 term, the series is off by 4e-6
    relative at the limit, which the KL tests' tolerance of 1e-3 cannot see (its x^8 term alone is ~2 roundings)."""
    x = torch.linspace(-kernel._EXPM1_SERIES_LIMIT, kernel._EXPM1_SERIES_LIMIT, 257, device=DEVICE)
    out = torch.empty_like(x)
    _expm1_series_kernel[(1,)](x, out, x.numel(), BLOCK=512)
    torch.testing.assert_close(out.double(), torch.expm1(x.double()), rtol=3e-7, atol=0)


def test_identical_models_give_zero_kl_and_zero_grads():
    """The first unlearning step: the current model is the reference (its lm_head with a bias here)."""
    hidden, weight, bias, _, _, _, grad_scale = make_inputs(13, 24, 131, torch.float32, None, shared_weight=False,
                                                            bias="shared")
    heads = (hidden, weight, bias, hidden.clone(), weight, bias)
    kl, lse, ref_lse = kernel.forward(*heads)
    assert kl.abs().max().item() <= 1e-7
    d_hidden, d_weight, d_bias = kernel.backward(*heads, lse, ref_lse, grad_scale, need_weight_grad=True,
                                                 need_bias_grad=True)
    assert max(d.abs().max().item() for d in (d_hidden, d_weight, d_bias)) <= 1e-7


def test_detached_weight_is_recognised_as_shared():
    """weight.detach() is the same memory as weight: the shared-weight path must give the same answer."""
    hidden, weight, _, ref_hidden, _, _, grad_scale = make_inputs(9, 24, 37, torch.float32, 1e-2, shared_weight=True)
    assert kernel._same_tensor(weight, weight.detach()) and not kernel._same_tensor(weight, weight.clone())
    ref_kl, *_ = float64_reference(hidden, weight, None, ref_hidden, weight, None, grad_scale)
    kl, _, _ = kernel.forward(hidden, weight, None, ref_hidden, weight.detach(), None)
    torch.testing.assert_close(kl.double(), ref_kl, rtol=1e-4, atol=1e-9)


def check_forward_and_backward(hidden, weight, ref_hidden, ref_weight, grad_scale, tol):
    heads = (hidden, weight, None, ref_hidden, ref_weight, None)
    ref_kl, _, _, ref_dh, ref_dw, _ = float64_reference(*heads, grad_scale)
    kl, lse, ref_lse = kernel.forward(*heads)
    assert torch.isfinite(kl).all()
    torch.testing.assert_close(kl.double(), ref_kl, rtol=tol, atol=1e-9)
    d_hidden, d_weight, _ = kernel.backward(*heads, lse, ref_lse, grad_scale, need_weight_grad=True,
                                            need_bias_grad=False)
    assert_matches(d_hidden, ref_dh, tol)
    assert_matches(d_weight, ref_dw, tol)


def logits_column(hidden, value):
    """A weight row w with hidden @ w = value on every row (least-norm solution; needs rows <= H)."""
    return torch.linalg.pinv(hidden) @ torch.full((hidden.shape[0],), value, device=DEVICE)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter reports the overflow it is meant to hit
@pytest.mark.parametrize("dominant, logit", [("current", 200.0), ("reference", 20.0)])
def test_one_model_dwarfing_the_other_uses_the_direct_form(dominant, logit):
    """One column's logit far above the rest in one model only, so |lse_q - lse_p| >> 1. Q dwarfing P
    overflows the log1p form's sum; P dwarfing Q leaves E_p[exp(zq - zp)] ~ e^-13, whose log1p(-1 + tiny)
    has lost most digits to rounding."""
    hidden, weight, _, ref_hidden, ref_weight, _, grad_scale = make_inputs(7, 24, 131, torch.float32, 1e-2, False)
    weight, ref_weight = weight.clone(), ref_weight.clone()
    if dominant == "current":
        weight[3] = logits_column(hidden, logit)
    else:
        ref_weight[3] = logits_column(ref_hidden, logit)
    check_forward_and_backward(hidden, weight, ref_hidden, ref_weight, grad_scale, tol=1e-4)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_overflow_of_a_running_sum_falls_back_to_the_direct_form():
    """The first 256 columns (a whole tile and split for every block size): zq = -100, zp = -300. There
    exp(zq - running max of zp) overflows, though these columns carry no mass and lse_q ~ lse_p in the end."""
    hidden, weight, _, ref_hidden, ref_weight, _, grad_scale = make_inputs(7, 24, 300, torch.float32, 0.3, False)
    weight, ref_weight = weight.clone(), ref_weight.clone()
    weight[:256] = logits_column(hidden, -100.0)
    ref_weight[:256] = logits_column(ref_hidden, -300.0)
    kl, lse, ref_lse = kernel.forward(hidden, weight, None, ref_hidden, ref_weight, None)
    assert (lse - ref_lse).abs().max() < 1.0  # the log1p form's range, so the overflow guard is what acts
    check_forward_and_backward(hidden, weight, ref_hidden, ref_weight, grad_scale, tol=1e-4)


def test_unrequested_weight_and_bias_grads_are_none_and_d_hidden_unchanged():
    *heads, grad_scale = make_inputs(9, 24, 131, torch.float32, 1e-1, False, bias="own")
    _, _, _, ref_dh, _, _ = float64_reference(*heads, grad_scale)
    kl, lse, ref_lse = kernel.forward(*heads)
    d_hidden, d_weight, d_bias = kernel.backward(*heads, lse, ref_lse, grad_scale, need_weight_grad=False,
                                                 need_bias_grad=False)
    assert d_weight is None and d_bias is None
    assert_matches(d_hidden, ref_dh, 1e-4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shared_weight", [False, True])
def test_half_precision_matches_float64(dtype, shared_weight):
    """16-bit inputs (the interpreter computes bf16 dots by value since kernels/interpreter_fixes.py)."""
    check_against_reference(21, 40, 131, dtype, tol=2e-2, ref_distance=1e-1, shared_weight=shared_weight,
                            bias="shared" if shared_weight else "own")


def test_fp16_gradient_chunks_are_scaled_out_of_the_subnormal_range():
    """With grad_scale ~1e-3 the entries of G = (q - p) * grad_scale (~1e-6) are fp16 subnormals with a few
    bits left; written as G / max|grad_scale| they keep full fp16 precision (norm error ~4e-4 here, ~2e-3
    if written unscaled)."""
    torch.manual_seed(0)
    *heads, grad_scale = make_inputs(21, 40, 1000, torch.float16, 1.0, True)
    grad_scale = grad_scale * 1e-3
    *_, ref_dh, ref_dw, _ = float64_reference(*heads, grad_scale)
    _, lse, ref_lse = kernel.forward(*heads)
    d_hidden, d_weight, _ = kernel.backward(*heads, lse, ref_lse, grad_scale, need_weight_grad=True,
                                            need_bias_grad=False)
    for actual, expected in ((d_hidden, ref_dh), (d_weight, ref_dw)):
        assert (actual.double() - expected).norm() <= 1.2e-3 * expected.norm()


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shared_weight", [False, True])
@pytest.mark.parametrize("num_rows, hidden_size, vocab", GPU_SHAPES)
def test_half_precision_on_gpu_matches_float64(dtype, shared_weight, num_rows, hidden_size, vocab):
    check_against_reference(num_rows, hidden_size, vocab, dtype, tol=2e-2, ref_distance=1e-1,
                            shared_weight=shared_weight, bias="shared" if shared_weight else "own")


@requires_cuda
def test_fp32_on_gpu_matches_float64():
    """A close reference (KL ~1e-5), ill-conditioned as in test_fp32_reference_close_to_current_keeps_kl_digits: the
    KL of fp32 logits, even rounded exactly, is up to 2e-4 off the float64 one here (the gradients as much), hence
    1e-3; TF32 dots would put the KL ~0.2 off."""
    check_against_reference(300, 264, 5003, torch.float32, tol=1e-3, ref_distance=1e-2, shared_weight=True,
                            bias="shared")


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-4), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("tile", tiles._TILE_SHAPES[2] + [tiles._SMALL_TILE], ids=str)
@pytest.mark.parametrize("shape", GPU_PLAN_SHAPES, ids=str)
def test_kl_in_each_gpu_tile_config_with_the_gpu_plans(monkeypatch, shape, tile, dtype, tol):
    for tuner in (kernel._forward_kernel, kernel._gradient_kernel):
        force_tile_config(monkeypatch, tuner, *tile)
    use_gpu_plans(monkeypatch)
    check_against_reference(*shape, dtype, tol=tol, shared_weight=tile[0] == 64,
                            bias="shared" if tile[0] == 64 else "own")
