"""fastalign.linear_cross_entropy against its float64 reference, on every backend."""
import functools

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import fastalign
from fastalign.ops.torch_chunked import chunking
from fastalign.reference.linear_losses import linear_cross_entropy_reference
from tests.compare import (COMPILED_CALLER_DIFFERENTIATIONS, REL_TOL, assert_func_grad_is_autograds, assert_grads_close,
                           assert_grads_of_a_compiled_caller_close, assert_only_first_order,
                           assert_per_sample_grads_close, assert_rel_close, assert_vjp_and_jacrev_close, grads_of)
from tests.conftest import HAS_CUDA, TRITON_DEVICE, device_for, triton_cases

BACKENDS = ["torch", "triton"]
SHAPES = [(1, 16, 37), (13, 24, 131), (40, 40, 1000)]  # (N, H, V): V a multiple of no block size


def make_inputs(n, h, v, *, dtype=torch.float32, device="cpu", bias=False, weighted=False, ignored=0.2):
    hidden = torch.randn(n, h, dtype=dtype, device=device, requires_grad=True)
    weight = (torch.randn(v, h, dtype=dtype, device=device) / h ** 0.5).requires_grad_()
    target = torch.randint(0, v, (n,), device=device)
    target[torch.rand(n, device=device) < ignored] = -100
    extra = {}
    if bias:
        extra["bias"] = torch.randn(v, dtype=dtype, device=device, requires_grad=True)
    if weighted:
        extra["token_weight"] = torch.randn(n, device=device)  # mixed signs, as in unlearning
    return hidden, weight, target, extra


def check_against_reference(hidden, weight, target, extra, reduction, backend, rel, **op_options):
    """The loss and its gradients under a random upstream gradient agree with the reference's; op_options go to the
    op alone (grads_in_forward)."""
    out = fastalign.linear_cross_entropy(hidden, weight, target, reduction=reduction, backend=backend, **extra,
                                         **op_options)
    ref = linear_cross_entropy_reference(hidden, weight, target, reduction=reduction, **extra)
    assert out.dtype == (torch.float64 if hidden.dtype == torch.float64 else torch.float32)
    assert_rel_close("loss", out, ref, rel)
    inputs = [hidden, weight] + ([extra["bias"]] if "bias" in extra else [])
    seed = torch.randn(out.shape, device=out.device)
    for name, got, want in zip(["d_hidden", "d_weight", "d_bias"], grads_of(out, inputs, seed),
                               grads_of(ref, inputs, seed)):
        assert got.dtype == want.dtype
        assert_rel_close(name, got, want, rel)



@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(0, 16, 37), (5, 0, 37), (5, 16, 1)])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_empty_shapes_and_a_one_word_vocabulary_match_reference(backend, shape, reduction):
    """No tokens, hidden states of width 0 (every logit the bias), one word (every loss 0): as the reference."""
    hidden, weight, target, extra = make_inputs(*shape, bias=True, weighted=True, device=device_for(backend))
    check_against_reference(hidden, weight, target, extra, reduction, backend, REL_TOL[torch.float32])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("bias,weighted", [(False, False), (True, True)])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_matches_reference_fp32(backend, shape, bias, weighted, reduction):
    hidden, weight, target, extra = make_inputs(*shape, bias=bias, weighted=weighted, device=device_for(backend))
    check_against_reference(hidden, weight, target, extra, reduction, backend, REL_TOL[torch.float32])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_soft_capped_logits_match_reference(backend, shape, reduction):
    """softcap c: z = c tanh((h W^T + b) / c), Gemma's final_logit_softcapping; logits up to ~4c here, so the cap
    bends most of them and its derivative (1 - tanh^2) ranges over (0, 1]."""
    hidden, weight, target, extra = make_inputs(*shape, bias=True, weighted=True, device=device_for(backend))
    with torch.no_grad():
        weight.mul_(8.0)
    check_against_reference(hidden, weight, target, {**extra, "softcap": 2.5}, reduction, backend,
                            REL_TOL[torch.float32])


@pytest.mark.parametrize("shape", triton_cases(SHAPES[1:2]))  # one shape: each autotunes the capped kernels anew
def test_soft_capped_bf16_on_the_triton_backend(shape):
    hidden, weight, target, extra = make_inputs(*shape, dtype=torch.bfloat16, weighted=True, device=TRITON_DEVICE)
    with torch.no_grad():
        weight.mul_(8.0)
    check_against_reference(hidden, weight, target, {**extra, "softcap": 2.5}, "mean", "triton",
                            REL_TOL[torch.bfloat16])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("label_smoothing", [0.1, 1.0])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_label_smoothing_matches_reference(backend, shape, label_smoothing, reduction):
    """label_smoothing eps: CE_t = lse_t - (1 - eps) z_t[y_t] - eps mean_v z_t[v], with a bias, signed token weights
    and a soft cap that bends the logits (the mean is of the capped logits, and its gradient goes through the cap)."""
    hidden, weight, target, extra = make_inputs(*shape, bias=True, weighted=True, device=device_for(backend))
    with torch.no_grad():
        weight.mul_(8.0)
    check_against_reference(hidden, weight, target, {**extra, "softcap": 2.5, "label_smoothing": label_smoothing},
                            reduction, backend, REL_TOL[torch.float32])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("label_smoothing", [0.1, 1.0])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_label_smoothing_with_gradients_taken_in_the_forward(backend, shape, label_smoothing, reduction):
    """grads_in_forward=True: the gradients from whole logits rows (the Triton kernels' FROM_BUFFER builds)."""
    hidden, weight, target, extra = make_inputs(*shape, bias=True, weighted=True, device=device_for(backend))
    check_against_reference(hidden, weight, target, {**extra, "label_smoothing": label_smoothing}, reduction,
                            backend, REL_TOL[torch.float32], grads_in_forward=True)


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1, 1.0])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_the_references_label_smoothing_is_torchs(label_smoothing, reduction):
    """In float64: the reference's smoothed loss and gradients are torch's cross_entropy(label_smoothing=) of the
    logits (token weight 1, no soft cap), ignored tokens left out of the mean."""
    hidden, weight, target, extra = make_inputs(13, 24, 131, dtype=torch.float64, bias=True)
    inputs = [hidden, weight, extra["bias"]]
    ref = linear_cross_entropy_reference(hidden, weight, target, reduction=reduction, label_smoothing=label_smoothing,
                                         **extra)
    torchs = torch.nn.functional.cross_entropy(hidden @ weight.T + extra["bias"], target, reduction=reduction,
                                               label_smoothing=label_smoothing)
    torch.testing.assert_close(ref, torchs, rtol=1e-12, atol=1e-12)
    seed = torch.randn(ref.shape, dtype=torch.float64)
    for got, want in zip(grads_of(ref, inputs, seed), grads_of(torchs, inputs, seed)):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_label_smoothing_is_torchs_cross_entropy_in_fp32(backend, reduction):
    """A drop-in for torch's cross_entropy(logits, y, label_smoothing=eps) on materialised fp32 logits."""
    hidden, weight, target, extra = make_inputs(13, 24, 131, bias=True, device=device_for(backend))
    inputs = [hidden, weight, extra["bias"]]
    out = fastalign.linear_cross_entropy(hidden, weight, target, reduction=reduction, backend=backend,
                                         label_smoothing=0.1, **extra)
    torchs = torch.nn.functional.cross_entropy(hidden @ weight.T + extra["bias"], target, reduction=reduction,
                                               label_smoothing=0.1)
    assert_rel_close("loss", out, torchs, REL_TOL[torch.float32])
    seed = torch.randn(out.shape, device=out.device)
    for name, got, want in zip(["d_hidden", "d_weight", "d_bias"], grads_of(out, inputs, seed),
                               grads_of(torchs, inputs, seed)):
        assert_rel_close(name, got, want, REL_TOL[torch.float32])


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_minus_inf_bias_at_words_never_targeted_matches_torch_without_label_smoothing(backend):
    """A padded vocabulary masked by a -inf bias, label_smoothing 0: the loss and gradients are finite and torch's
    cross_entropy's (the smoothing term, 0 * mean(-inf) = nan, must stay out of the computation)."""
    device = device_for(backend)
    hidden, weight, _, extra = make_inputs(13, 24, 131, bias=True, device=device)
    with torch.no_grad():
        extra["bias"][100:] = float("-inf")
    target = torch.randint(0, 100, (13,), device=device)
    inputs = [hidden, weight, extra["bias"]]
    out = fastalign.linear_cross_entropy(hidden, weight, target, backend=backend, **extra)
    torchs = torch.nn.functional.cross_entropy(hidden @ weight.T + extra["bias"], target)
    assert torch.isfinite(out)
    assert_rel_close("loss", out, torchs, REL_TOL[torch.float32])
    for name, got, want in zip(["d_hidden", "d_weight", "d_bias"], grads_of(out, inputs, torch.ones_like(out)),
                               grads_of(torchs, inputs, torch.ones_like(torchs))):
        assert torch.isfinite(got).all(), name
        assert_rel_close(name, got, want, REL_TOL[torch.float32])


@pytest.mark.parametrize("label_smoothing, error, message", [
    (-0.1, ValueError, r"label_smoothing must lie in \[0, 1\], got -0.1"),
    (1.5, ValueError, r"label_smoothing must lie in \[0, 1\], got 1.5"),
    (float("nan"), ValueError, r"label_smoothing must lie in \[0, 1\], got nan"),
    ("0.1", TypeError, r"label_smoothing must be a real number in \[0, 1\], got '0.1'"),
    (None, TypeError, r"label_smoothing must be a real number in \[0, 1\], got None"),
    (True, TypeError, r"label_smoothing must be a real number in \[0, 1\], got True"),
])
def test_bad_label_smoothing_is_refused_by_name(label_smoothing, error, message):
    hidden, weight, target, _ = make_inputs(6, 16, 37)
    with pytest.raises(error, match=message):
        fastalign.linear_cross_entropy(hidden, weight, target, label_smoothing=label_smoothing)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_all_tokens_ignored_gives_zero_loss_and_gradients(backend, reduction, label_smoothing):
    hidden, weight, target, extra = make_inputs(5, 16, 37, bias=True, weighted=True, ignored=1.0,
                                                device=device_for(backend))
    out = fastalign.linear_cross_entropy(hidden, weight, target, reduction=reduction, backend=backend,
                                         label_smoothing=label_smoothing, **extra)
    assert torch.all(out == 0) and not torch.isnan(out).any()
    for grad in grads_of(out, [hidden, weight, extra["bias"]], torch.ones_like(out)):
        assert torch.all(grad == 0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_zero_weight_tokens_contribute_nothing(backend, reduction):
    """Zero-weight tokens are skipped but still counted by "mean" (they are not ignored)."""
    hidden, weight, target, extra = make_inputs(9, 16, 37, weighted=True, ignored=0.0, device=device_for(backend))
    extra["token_weight"][::2] = 0
    check_against_reference(hidden, weight, target, extra, reduction, backend, REL_TOL[torch.float32])


@pytest.mark.parametrize("backend", BACKENDS)
def test_dropped_rows_never_reach_the_matmul(backend):
    """Ignored and zero-weight rows are gathered out before any product: NaN there changes nothing."""
    device = device_for(backend)
    hidden, weight, target, extra = make_inputs(9, 16, 37, weighted=True, ignored=0.0, device=device)
    extra["token_weight"][::3] = 0
    target[1] = -100
    dropped = (extra["token_weight"] == 0) | (target == -100)
    poisoned = hidden.detach().masked_fill(dropped[:, None], float("nan")).requires_grad_()
    clean = hidden.detach().masked_fill(dropped[:, None], 0.0).requires_grad_()
    for reduction in ("mean", "sum", "none"):
        got, want = (fastalign.linear_cross_entropy(h, weight, target, reduction=reduction, backend=backend, **extra)
                     for h in (poisoned, clean))
        assert torch.equal(got, want)
        seed = torch.ones_like(got)
        for g, w in zip(grads_of(got, [poisoned, weight], seed), grads_of(want, [clean, weight], seed)):
            assert torch.equal(g, w)


@pytest.mark.parametrize("ignore_index", [0, -1, -2 ** 63, 2 ** 63 - 1])  # int64's ends are accepted
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_custom_ignore_index(ignore_index, reduction):
    hidden, weight, target, extra = make_inputs(13, 24, 131, bias=True, weighted=True, ignored=0.0)
    target[::3] = ignore_index
    check_against_reference(hidden, weight, target, {**extra, "ignore_index": ignore_index}, reduction, "torch",
                            REL_TOL[torch.float32])


@pytest.mark.skipif(not hasattr(torch.nn.functional, "linear_cross_entropy"), reason="this torch has no such op")
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_agrees_with_torchs_own_linear_cross_entropy(backend, bias, reduction):
    """A drop-in for torch.nn.functional.linear_cross_entropy (in torch 2.13) where both define the loss (some token
    counted; without token weights, torch's op weighing classes instead): the same loss and gradients, whichever
    of torch's paths (its reference, or its chunked one)."""
    hidden, weight, target, extra = make_inputs(13, 24, 131, bias=bias, device=device_for(backend))
    target[3] = 7   # some token counted whatever the draw
    out = fastalign.linear_cross_entropy(hidden, weight, target, reduction=reduction, backend=backend, **extra)
    inputs = [hidden, weight, *extra.values()]
    seed = torch.randn(out.shape, device=out.device)
    ours = grads_of(out, inputs, seed)
    for options in (None, torch.nn.LinearCrossEntropyOptions()):
        theirs = torch.nn.functional.linear_cross_entropy(hidden, weight, target, linear_bias=extra.get("bias"),
                                                          reduction=reduction, ignore_index=-100, options=options)
        assert_rel_close("loss", out, theirs, REL_TOL[torch.float32])
        for name, got, want in zip(["d_hidden", "d_weight", "d_bias"], ours, grads_of(theirs, inputs, seed)):
            assert_rel_close(name, got, want, REL_TOL[torch.float32])


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_inputs(backend):
    device = device_for(backend)
    hidden = torch.randn(24, 11, device=device, requires_grad=True).t()  # [11, 24], column-major
    weight = torch.randn(131, 48, device=device, requires_grad=True)[:, ::2]  # [131, 24], strided
    target = torch.randint(0, 131, (22,), device=device)[::2]
    assert not hidden.is_contiguous() and not weight.is_contiguous() and not target.is_contiguous()
    check_against_reference(hidden, weight, target, {}, "mean", backend, REL_TOL[torch.float32])


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int16, torch.int32])
def test_narrow_integer_targets(dtype):
    """Targets are compared with ignore_index in int64: in uint8, -100 would wrap to 156 and drop that class."""
    hidden, weight, target, extra = make_inputs(13, 24, 200, bias=True, weighted=True, ignored=0.0)
    target[::2] = 156
    for reference_target in (target, target.to(dtype)):  # the reference widens its target too
        out = fastalign.linear_cross_entropy(hidden, weight, target.to(dtype), reduction="none", backend="torch",
                                             **extra)
        ref = linear_cross_entropy_reference(hidden, weight, reference_target, reduction="none", **extra)
        assert_rel_close("loss", out, ref, REL_TOL[torch.float32])


@pytest.mark.parametrize("backend", BACKENDS)
def test_fp32_inputs_under_bf16_autocast_keep_fp32(backend):
    """autocast does not reach inside the op: fp32 inputs are computed in fp32 on every backend, and the
    backward runs inside the autocast region too (the torch path rounded logits to bf16 and then crashed).
    Per token ("none"): the signed weights' sum cancels to a tenth of its terms, where fp32 rounding alone
    came to 1.1e-5 of it on one CPU."""
    hidden, weight, target, extra = make_inputs(13, 24, 131, bias=True, weighted=True, device=device_for(backend))
    hidden = (hidden.detach() * 8).requires_grad_()  # logits ~10, where bf16 keeps only ~1e-1
    with torch.autocast(hidden.device.type, dtype=torch.bfloat16):
        check_against_reference(hidden, weight, target, extra, "none", backend, REL_TOL[torch.float32])


@pytest.mark.parametrize("backend", BACKENDS)
def test_second_derivatives_are_refused_by_name(backend):
    """create_graph=True gives the exact first-order gradients (torch.func runs every backward so), and
    differentiating them raises by name, as do transforms of torch.func's grad, jacrev and vjp; forward mode (jvp,
    jacfwd, hessian) is refused by name too."""
    hidden, weight, target, extra = make_inputs(6, 16, 37, bias=True, device=device_for(backend))
    for inputs in ([hidden, weight, extra["bias"]], [hidden]):  # a frozen weight once gave silently no graph
        out = fastalign.linear_cross_entropy(hidden, weight, target, backend=backend, **extra)
        grads = torch.autograd.grad(out, inputs, create_graph=True)
        ref = linear_cross_entropy_reference(hidden, weight, target, **extra)
        for got, want in zip(grads, torch.autograd.grad(ref, inputs)):
            assert_rel_close("gradient", got, want, REL_TOL[torch.float32])
        with pytest.raises(RuntimeError, match="linear_cross_entropy is not twice differentiable"):
            torch.autograd.grad(sum(g.sum() for g in grads), inputs)
    hidden, weight = hidden.detach(), weight.detach()

    def loss(h):
        return fastalign.linear_cross_entropy(h, weight, target, backend=backend)

    assert_only_first_order("linear_cross_entropy", loss, hidden)


@pytest.mark.parametrize("backend", BACKENDS)
def test_inside_a_compiled_caller(backend):
    """torch.compile of a caller runs the op as it is (a graph break), with exact gradients; dynamo tracing into
    the kernel launches crashed under the Triton interpreter."""
    hidden, weight, target, extra = make_inputs(13, 24, 131, bias=True, weighted=True, device=device_for(backend))

    def caller(loss, h, w):
        return loss(torch.tanh(h), w, target, reduction="none", **extra)

    out = torch.compile(caller, backend="eager")(
        functools.partial(fastalign.linear_cross_entropy, backend=backend), hidden, weight)
    ref = caller(linear_cross_entropy_reference, hidden, weight)
    assert_rel_close("loss", out, ref, REL_TOL[torch.float32])
    assert_grads_close(["d_hidden", "d_weight", "d_bias"], out, ref, [hidden, weight, extra["bias"]],
                       REL_TOL[torch.float32])



@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("differentiate", COMPILED_CALLER_DIFFERENTIATIONS)
def test_gradients_taken_inside_a_compiled_caller(backend, differentiate):
    """torch.compile of a caller that differentiates the loss itself: the backward runs inside the compiled frame,
    where dynamo traced into the kernel launches (the Triton interpreter crashed) unless they are a graph break."""
    hidden, weight, target, extra = make_inputs(13, 24, 131, bias=True, weighted=True, device=device_for(backend))
    assert_grads_of_a_compiled_caller_close(
        differentiate, functools.partial(fastalign.linear_cross_entropy, backend=backend),
        linear_cross_entropy_reference, hidden.detach(), weight.detach(), (target,), extra, REL_TOL[torch.float32])


def test_fullgraph_compile_is_refused_with_the_reason():
    """fullgraph=True cannot hold the op's graph break: dynamo's error says why (it said 'reason: None' and
    hinted at removing fastalign's decorator)."""
    hidden, weight, target, _ = make_inputs(6, 16, 37)
    caller = torch.compile(lambda h, w: fastalign.linear_cross_entropy(h, w, target, backend="torch"),
                           backend="eager", fullgraph=True)
    with pytest.raises(torch._dynamo.exc.Unsupported, match="linear_cross_entropy runs outside the compiled graph"):
        caller(hidden, weight)


@pytest.mark.parametrize("chunk_bytes", [3 * 4 * 131, 100])
def test_torch_backend_across_chunk_boundaries(monkeypatch, chunk_bytes):
    """3 rows of V=131 fp32 logits per chunk; and a budget under one row's logits (a vocabulary past CHUNK_BYTES / 4
    words), which still takes a row a chunk (not a range of step 0)."""
    monkeypatch.setattr(chunking, "CHUNK_BYTES", chunk_bytes)
    hidden, weight, target, extra = make_inputs(14, 24, 131, bias=True, weighted=True)
    check_against_reference(hidden, weight, target, extra, "sum", "torch", REL_TOL[torch.float32])


def test_weight_without_grad_skips_its_gradient():
    hidden, weight, target, _ = make_inputs(6, 16, 37)
    weight.requires_grad_(False)
    out = fastalign.linear_cross_entropy(hidden, weight, target, backend="torch")
    (d_hidden,) = torch.autograd.grad(out, [hidden])
    ref = linear_cross_entropy_reference(hidden, weight, target)
    assert_rel_close("d_hidden", d_hidden, torch.autograd.grad(ref, [hidden])[0], REL_TOL[torch.float32])


@pytest.mark.parametrize("backend", BACKENDS)
def test_frozen_hidden_gets_no_gradient_products(backend):
    """Hidden states of a frozen backbone (only the head trains): the backward takes no G @ W product for them,
    a third of its matmul work, and the head's gradients are still exact."""
    hidden, weight, target, extra = make_inputs(13, 24, 131, bias=True, weighted=True, device=device_for(backend))
    flops = {}
    for frozen in (False, True):
        hidden.requires_grad_(not frozen)
        out = fastalign.linear_cross_entropy(hidden, weight, target, reduction="none", backend=backend, **extra)
        seed = torch.randn(out.shape, device=out.device)
        with FlopCounterMode(display=False) as counter:
            grads = grads_of(out, [weight, extra["bias"]], seed)
        flops[frozen] = counter.get_total_flops()
    ref = linear_cross_entropy_reference(hidden, weight, target, reduction="none", **extra)
    for name, got, want in zip(["d_weight", "d_bias"], grads, grads_of(ref, [weight, extra["bias"]], seed)):
        assert_rel_close(name, got, want, REL_TOL[torch.float32])
    num_live = int(((target != -100) & (extra["token_weight"] != 0)).sum())
    assert flops[False] - flops[True] == 2 * num_live * 131 * 24


def test_gradcheck_float64():
    hidden, weight, target, extra = make_inputs(4, 5, 7, dtype=torch.float64, bias=True, weighted=True, ignored=0.3)

    def loss(h, w, b):
        return fastalign.linear_cross_entropy(h, w, target, bias=b, token_weight=extra["token_weight"],
                                              reduction="none", backend="torch")

    assert torch.autograd.gradcheck(loss, (hidden, weight, extra["bias"]))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_torch_backend_accumulates_half_precision_in_fp32(dtype, reduction):
    """Half-precision inputs, exactly representable: the fp32 loss is within fp32 rounding of the float64
    reference (accumulating in the input dtype is off by 1e-4 to 3e-2 here), gradients within one rounding
    to the input dtype."""
    hidden, weight, target, extra = make_inputs(13, 24, 131, dtype=dtype, bias=True, weighted=True)
    out = fastalign.linear_cross_entropy(hidden, weight, target, reduction=reduction, backend="torch", **extra)
    ref = linear_cross_entropy_reference(hidden, weight, target, reduction=reduction, **extra)
    assert out.dtype == torch.float32
    assert_rel_close("loss", out, ref, 1e-5)
    inputs, seed = [hidden, weight, extra["bias"]], torch.randn(out.shape)
    for name, got, want in zip(["d_hidden", "d_weight", "d_bias"], grads_of(out, inputs, seed),
                               grads_of(ref, inputs, seed)):
        assert got.dtype == dtype
        assert_rel_close(name, got, want, 2 ** -7)


def test_bf16_backward_takes_the_fp32_logsumexp():
    """Logits ~40, where bf16's spacing is 0.25: the backward's softmax takes the forward's logsumexp in fp32; kept
    in bf16, it put every probability off by up to ~13%, and the gradients by ~5%."""
    hidden, weight, target, extra = make_inputs(13, 24, 131, dtype=torch.bfloat16, bias=True, weighted=True)
    hidden = (hidden.detach() * 16).requires_grad_()
    out = fastalign.linear_cross_entropy(hidden, weight, target, reduction="none", backend="torch", **extra)
    ref = linear_cross_entropy_reference(hidden, weight, target, reduction="none", **extra)
    assert_grads_close(["d_hidden", "d_weight", "d_bias"], out, ref, [hidden, weight, extra["bias"]], 2 ** -7)


@pytest.mark.parametrize("shape", triton_cases(SHAPES, gpu_only=[(300, 64, 5000)]))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_matches_reference_half_precision_on_the_triton_backend(shape, dtype):
    hidden, weight, target, extra = make_inputs(*shape, dtype=dtype, device=TRITON_DEVICE, bias=True, weighted=True)
    check_against_reference(hidden, weight, target, extra, "mean", "triton", REL_TOL[dtype])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_a_models_batch_of_sequences_is_taken_as_it_is(backend, reduction):
    """hidden [B, T, H] and target [B, T] (a model's outputs, shifted by slicing: not contiguous), token_weight
    [B, T]: the loss of their rows ([B, T] for "none"), and gradients in the inputs' own shapes."""
    device = device_for(backend)
    states = torch.randn(3, 6, 16, device=device, requires_grad=True)
    weight = (torch.randn(37, 16, device=device) / 4).requires_grad_()
    labels = torch.randint(0, 37, (3, 6), device=device)
    labels[0, 2] = -100
    hidden, target, token_weight = states[:, :-1], labels[:, 1:], torch.randn(3, 5, device=device)
    out = fastalign.linear_cross_entropy(hidden, weight, target, token_weight=token_weight, reduction=reduction,
                                         backend=backend)
    ref = linear_cross_entropy_reference(hidden, weight, target, token_weight=token_weight, reduction=reduction)
    rows = linear_cross_entropy_reference(hidden.reshape(15, 16), weight, target.reshape(15),
                                          token_weight=token_weight.reshape(15), reduction=reduction)
    assert out.shape == ref.shape == ((3, 5) if reduction == "none" else ())
    assert torch.equal(ref.reshape(rows.shape), rows)   # the reference takes the same shapes, as its rows
    assert_rel_close("loss", out, ref, REL_TOL[torch.float32])
    assert_grads_close(["d_states", "d_weight"], out, ref, [states, weight], REL_TOL[torch.float32])


BAD_INPUTS = [
    (lambda h, w, t: (h[0], w, t), "hidden must have at least 2 dimensions \\(\\[..., H\\]"),
    (lambda h, w, t: (h, w[:, :-1], t), "weight must be \\[V, H\\] with H"),
    (lambda h, w, t: (h, w.double(), t), "weight must have the dtype of hidden"),
    (lambda h, w, t: (h, w, t[:-1]), "target must have shape \\[6\\]"),
    (lambda h, w, t: (h.view(2, 3, 16), w, t), "target must have shape \\[2, 3\\] \\(one entry per token of hidden\\)"),
    (lambda h, w, t: (h, w, t.view(6, 1)), "target must have shape \\[6\\]"),
    (lambda h, w, t: (h, w, t.float()), "target must have dtype"),
    (lambda h, w, t: (h, w, torch.full_like(t, 37)), "target values must lie in \\[0, 37\\)"),
    (lambda h, w, t: (h, w, torch.full_like(t, -5)), "found -5"),
    # one bad target among good ones: the check rides in the live rows' nonzero, which must still see it
    (lambda h, w, t: (h, w, t.index_fill(0, torch.tensor([4]), 40)), "must lie in \\[0, 37\\) .*; found 40"),
    (lambda h, w, t: (h.int(), w, t), "hidden must have dtype"),
    (lambda h, w, t: (h, w[:0], torch.full_like(t, -100)), "weight must have at least one row"),
    # were errors deep in torch naming no argument ('unsupported memory format option Contiguous')
    (lambda h, w, t: (h.to_sparse(), w, t), "hidden must be a dense \\(strided\\) tensor, got layout torch.sparse_coo"),
    (lambda h, w, t: (h, w, t.to_sparse()), "target must be a dense \\(strided\\) tensor"),
    (lambda h, w, t: (h, w.to_sparse_csr(), t), "weight must be a dense \\(strided\\) tensor, got layout "
                                                "torch.sparse_csr"),
    # was silent: a weight on the meta device gave a finite loss
    (lambda h, w, t: (h, w.to("meta"), t), "weight must be on cpu like the hidden states, got .* device meta"),
]


@pytest.mark.parametrize("make_bad,message", BAD_INPUTS)
def test_bad_input_is_named(make_bad, message):
    hidden, weight, target, _ = make_inputs(6, 16, 37, ignored=0.0)
    with pytest.raises((ValueError, TypeError), match=message):
        fastalign.linear_cross_entropy(*make_bad(hidden.detach(), weight.detach(), target))


@pytest.mark.parametrize("kwargs,message", [
    ({"token_weight": torch.ones(5)}, "token_weight must have shape \\[6\\]"),
    ({"token_weight": torch.ones(6, dtype=torch.long)}, "token_weight must have dtype"),
    ({"bias": torch.ones(36)}, "bias must be \\[37\\]"),
    ({"bias": torch.ones(37, dtype=torch.float64)}, "bias must be \\[37\\] of dtype"),
    ({"reduction": "avg"}, "reduction must be one of"),
    ({"ignore_index": None}, "ignore_index must be an integer, got None"),  # was: 'bool' object has no attribute
    ({"ignore_index": -100.0}, "ignore_index must be an integer, got -100.0"),
    ({"ignore_index": 2 ** 70}, "ignore_index must fit in int64"),  # was: OverflowError: int too big to convert
    ({"ignore_index": 2 ** 63}, "ignore_index must fit in int64 .* got 9223372036854775808"),
    ({"ignore_index": -2 ** 63 - 1}, "ignore_index must fit in int64"),   # the lower bound too
    # was silent: the loss treats token_weight as a constant, so the caller's tensor never got its gradient
    ({"token_weight": torch.ones(6, requires_grad=True)}, "token_weight requires grad, but it is a constant"),
    ({"softcap": 0.0}, "softcap must be None or a positive finite number .* got 0.0"),
    ({"softcap": float("inf")}, "softcap must be None or a positive finite number .* got inf"),
    ({"softcap": 10 ** 400}, "softcap must be None or a positive finite number .* got 10{400}$"),   # was OverflowError
    ({"softcap": True}, "softcap must be None or a positive finite number .* got True"),
    ({"backend": "cuda"}, "backend must be one of"),
])
def test_bad_options_are_named(kwargs, message):
    hidden, weight, target, _ = make_inputs(6, 16, 37)
    with pytest.raises((ValueError, TypeError), match=message):
        fastalign.linear_cross_entropy(hidden, weight, target, **kwargs)


@pytest.mark.parametrize("change,message", [
    (lambda a: {**a, "hidden": a["hidden"].int()}, "hidden must have dtype .* got shape \\(2, 3, 16\\)"),
    (lambda a: {**a, "target": a["target"].float()}, "target must have dtype .* got shape \\(2, 3\\)"),
    (lambda a: {**a, "target": a["target"].to("meta")}, "target must be on cpu .* got shape \\(2, 3\\)"),
    (lambda a: {**a, "token_weight": torch.ones(2, 3, dtype=torch.long)},
     "token_weight must have dtype .* got shape \\(2, 3\\)"),
    (lambda a: {**a, "weight": a["weight"][:, :-1]}, "weight must be \\[V, H\\] with H = hidden.shape\\[-1\\] = 16"),
])
def test_errors_show_the_shapes_given(change, message):
    """A model's [B, T] tokens: errors after the shape checks showed the flattened rows ('token_weight must have
    dtype ..., got shape (6,)' for a [2, 3] token_weight)."""
    hidden, weight, target, _ = make_inputs(6, 16, 37)
    args = change({"hidden": hidden.detach().view(2, 3, 16), "weight": weight.detach(), "target": target.view(2, 3)})
    with pytest.raises((ValueError, TypeError), match=message):
        fastalign.linear_cross_entropy(**args)


def test_a_token_weight_that_requires_grad_is_taken_under_no_grad():
    """Refused only where autograd records the loss (its gradient would be lost silently); under torch.no_grad(),
    as in an evaluation, nothing is differentiated and the weight is used as it is."""
    hidden, weight, target, _ = make_inputs(6, 16, 37)
    token_weight = torch.randn(6, requires_grad=True)
    with torch.no_grad():
        got = fastalign.linear_cross_entropy(hidden, weight, target, token_weight=token_weight, reduction="none")
        want = fastalign.linear_cross_entropy(hidden, weight, target, token_weight=token_weight.detach(),
                                              reduction="none")
    assert torch.equal(got, want)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_token_weight_made_under_inference_mode_is_taken(backend):
    """A token_weight made under torch.inference_mode() was refused as if the backward saved it ('autograd cannot
    save it'): it is copied into the rows' weights, never saved, so the loss and gradients are those of a copy."""
    hidden, weight, target, extra = make_inputs(13, 24, 131, bias=True, device=device_for(backend))
    with torch.inference_mode():
        token_weight = torch.randn(13, device=hidden.device)
    got, want = (fastalign.linear_cross_entropy(hidden, weight, target, token_weight=w, reduction="none",
                                                backend=backend, **extra) for w in (token_weight, token_weight.clone()))
    torch.testing.assert_close(got, want)
    inputs, seed = [hidden, weight, extra["bias"]], torch.randn(13, device=hidden.device)
    for got_grad, want_grad in zip(grads_of(got, inputs, seed), grads_of(want, inputs, seed)):
        torch.testing.assert_close(got_grad, want_grad)


def test_triton_backend_refuses_float64():
    hidden, weight, target, _ = make_inputs(6, 16, 37, dtype=torch.float64)
    with pytest.raises(TypeError, match="hidden is float64, which the Triton backend does not support"):
        fastalign.linear_cross_entropy(hidden, weight, target, backend="triton")


@pytest.mark.skipif(HAS_CUDA, reason="checks the CPU-only error")
def test_triton_backend_on_cpu_without_interpreter_is_refused(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    hidden, weight, target, _ = make_inputs(3, 16, 37)
    with pytest.raises(ValueError, match="backend='triton' needs CUDA tensors"):
        fastalign.linear_cross_entropy(hidden, weight, target, backend="triton")


FUNC_CASES = [((1, 16, 37), 0.0), ((13, 24, 131), 0.2), ((5, 16, 37), 1.0)]  # one token, V odd, all tokens ignored


def func_inputs(shape, ignored, backend):
    """Plain tensors (torch.func differentiates functions of them): hidden, weight, bias, target, token_weight."""
    hidden, weight, target, extra = make_inputs(*shape, bias=True, weighted=True, ignored=ignored,
                                                device=device_for(backend))
    return hidden.detach(), weight.detach(), extra["bias"].detach(), target, extra["token_weight"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape,ignored", FUNC_CASES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_torch_func_grad_matches_autograd_and_reference(backend, shape, ignored, reduction):
    """torch.func.grad_and_value of the loss (under a random upstream gradient) wrt hidden, weight and bias: the
    values and gradients of the autograd path exactly, those of the float64 reference within fp32 rounding."""
    hidden, weight, bias, target, token_weight = func_inputs(shape, ignored, backend)
    seed = torch.randn(shape[0] if reduction == "none" else (), device=hidden.device)

    def scalar(loss_fn, h, w, b):
        return (loss_fn(h, w, target, bias=b, token_weight=token_weight, reduction=reduction) * seed).sum()

    op, ref = functools.partial(fastalign.linear_cross_entropy, backend=backend), linear_cross_entropy_reference
    assert_func_grad_is_autograds(functools.partial(scalar, op), functools.partial(scalar, ref), (hidden, weight, bias),
                                  REL_TOL[torch.float32])


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_func_vjp_and_jacrev_match_reference(backend):
    """torch.func.vjp of the per-token losses under a random cotangent, and jacrev's whole Jacobians (a vmap of
    the backward over the cotangents), against the reference's: zero rows where a token is ignored."""
    hidden, weight, bias, target, token_weight = func_inputs((4, 16, 37), 0.3, backend)
    target[1] = -100

    def per_token(loss_fn, h, w, b):
        return loss_fn(h, w, target, bias=b, token_weight=token_weight, reduction="none")

    op = functools.partial(per_token, functools.partial(fastalign.linear_cross_entropy, backend=backend))
    ref = functools.partial(per_token, linear_cross_entropy_reference)
    jacobians = assert_vjp_and_jacrev_close(["hidden", "weight", "bias"], op, ref, (hidden, weight, bias),
                                            REL_TOL[torch.float32])
    assert torch.all(jacobians[1][1] == 0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_per_sample_gradients_under_vmap(backend, reduction):
    """vmap(grad_and_value) over a batch of sequences (hidden, target, token_weight batched; weight and bias
    shared): each sequence's loss and gradients, as a loop over the sequences computes them with the reference;
    one sequence has every token ignored, and the token rows are not contiguous."""
    device = device_for(backend)
    states = torch.randn(3, 6, 16, device=device)[:, 1:]
    weight, bias = torch.randn(37, 16, device=device) / 4, torch.randn(37, device=device)
    target, token_weight = torch.randint(0, 37, (3, 5), device=device), torch.randn(3, 5, device=device)
    target[0, 2], target[1] = -100, -100
    seed = torch.randn(5 if reduction == "none" else (), device=device)

    def sample_loss(loss_fn, w, b, h, y, tw):
        return (loss_fn(h, w, y, bias=b, token_weight=tw, reduction=reduction) * seed).sum()

    op = functools.partial(sample_loss, functools.partial(fastalign.linear_cross_entropy, backend=backend))
    grads, values = assert_per_sample_grads_close(op, functools.partial(sample_loss, linear_cross_entropy_reference),
                                                  weight, bias, (states, target, token_weight), REL_TOL[torch.float32])
    assert torch.all(grads[2][1] == 0) and values[1] == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_vmap_over_stacked_heads(backend):
    """vmap over the weights of several heads (an ensemble) on shared hidden states: each head's losses, and
    the gradients of their sum, as the reference gives them one head at a time."""
    hidden, weight, bias, target, token_weight = func_inputs((13, 24, 131), 0.2, backend)
    heads = torch.stack([weight, 2 * weight, -weight])

    def losses(w):
        return fastalign.linear_cross_entropy(hidden, w, target, bias=bias, token_weight=token_weight,
                                              reduction="none", backend=backend)

    out = torch.func.vmap(losses)(heads)
    d_heads = torch.func.grad(lambda ws: torch.func.vmap(losses)(ws).sum())(heads)
    for i in range(3):
        w = heads[i].clone().requires_grad_()
        ref = linear_cross_entropy_reference(hidden, w, target, bias=bias, token_weight=token_weight,
                                             reduction="none")
        assert_rel_close(f"loss {i}", out[i], ref, REL_TOL[torch.float32])
        assert_rel_close(f"d_weight {i}", d_heads[i], torch.autograd.grad(ref.sum(), [w])[0], REL_TOL[torch.float32])


@pytest.mark.parametrize("backend, dtype", [(b, torch.float32) for b in BACKENDS] + [("triton", torch.float16)])
@pytest.mark.parametrize("weight_trains", [True, False], ids=["head-trains", "head-frozen"])
def test_forward_and_backward_wait_for_the_device_only_where_the_host_needs_a_value(backend, dtype, weight_trains):
    """On a GPU the op waits for the device once in its forward: the live rows' indices (nonzero), whose number
    sizes the matmuls, with the target check folded in. The backward knows their number from the forward (a host
    tensor). In fp16 the Triton backward of a trained weight also reads its matmuls' alpha (max |grad scale|, by
    which G is divided to stay in fp16's range) on the host: cuBLAS takes a host number, and scaling on the device
    would round the gradients differently. bf16 and fp32 keep G unscaled and do not wait."""
    from tests.sync_counter import SyncCounter
    device = device_for(backend)
    hidden = torch.randn(9, 16, device=device, dtype=dtype, requires_grad=True)
    weight = (torch.randn(37, 16, device=device, dtype=dtype) / 4).requires_grad_(weight_trains)
    target = torch.randint(0, 37, (9,), device=device)
    target[2] = -100
    with SyncCounter() as counter:
        counter.mark(hidden, weight, target)
        fastalign.linear_cross_entropy(hidden, weight, target, token_weight=counter.mark(torch.rand(9, device=device)),
                                       backend=backend).backward()
    expected = {"nonzero.default @ fastalign/ops/token_rows.py": 1}
    if backend == "triton" and weight_trains and dtype == torch.float16:
        expected["_local_scalar_dense.default @ kernels/chunked_backward.py"] = 1
    assert counter.by_file() == expected
