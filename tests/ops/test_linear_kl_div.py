"""fastalign.linear_kl_div against its float64 reference, on every backend."""
import functools

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import fastalign
from fastalign.ops.torch_chunked import chunking
from fastalign.reference.linear_losses import linear_kl_div_reference
from tests.compare import (COMPILED_CALLER_DIFFERENTIATIONS, REL_TOL, assert_func_grad_is_autograds, assert_grads_close,
                           assert_grads_of_a_compiled_caller_close, assert_only_first_order,
                           assert_per_sample_grads_close, assert_rel_close, assert_vjp_and_jacrev_close, grads_of)
from tests.conftest import TRITON_DEVICE, device_for, triton_cases

BACKENDS = ["torch", "triton"]
SHAPES = [(1, 16, 37), (13, 24, 131), (40, 40, 1000)]  # (N, H, V): V a multiple of no block size


def make_inputs(n, h, v, *, dtype=torch.float32, device="cpu", shared=False, weighted=False, masked=0.2,
                ref_h=None, closeness=None, bias=False):
    """Policy and reference heads; `shared` makes ref_weight the policy's weight tensor itself (and ref_bias its
    bias, with `bias`); `closeness` makes the reference a small perturbation of the policy (KL near 0);
    `bias` gives both heads a bias [V] (in `extra`: the policy's requires grad)."""
    hidden = torch.randn(n, h, dtype=dtype, device=device, requires_grad=True)
    weight = (torch.randn(v, h, dtype=dtype, device=device) / h ** 0.5).requires_grad_()
    if closeness is not None:
        ref_hidden = hidden.detach() + closeness * torch.randn_like(hidden)
        ref_weight = weight if shared else weight.detach() + closeness * torch.randn_like(weight)
    else:
        ref_h = ref_h or h
        ref_hidden = torch.randn(n, ref_h, dtype=dtype, device=device)
        ref_weight = weight if shared else torch.randn(v, ref_h, dtype=dtype, device=device) / ref_h ** 0.5
    extra = {"mask": torch.rand(n, device=device) >= masked}
    if weighted:
        extra["token_weight"] = torch.randn(n, device=device)
    if bias:
        extra["bias"] = torch.randn(v, dtype=dtype, device=device, requires_grad=True)
        if closeness is not None:
            extra["ref_bias"] = extra["bias"] if shared else extra["bias"].detach() + closeness * torch.randn_like(
                extra["bias"])
        else:
            extra["ref_bias"] = extra["bias"] if shared else torch.randn(v, dtype=dtype, device=device)
    return hidden, weight, ref_hidden, ref_weight, extra


def differentiable(hidden, weight, extra):
    """The inputs a KL's gradient flows to: hidden, weight and the policy's bias where there is one."""
    return [hidden, weight] + ([extra["bias"]] if extra.get("bias") is not None else [])


def check_against_reference(hidden, weight, ref_hidden, ref_weight, extra, reduction, backend, rel):
    out = fastalign.linear_kl_div(hidden, weight, ref_hidden, ref_weight, reduction=reduction, backend=backend,
                                  **extra)
    ref = linear_kl_div_reference(hidden, weight, ref_hidden, ref_weight, reduction=reduction, **extra)
    assert_rel_close("kl", out, ref, rel)
    assert_grads_close(["d_hidden", "d_weight", "d_bias"], out, ref, differentiable(hidden, weight, extra), rel)



@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(0, 16, 37), (5, 0, 37), (5, 16, 1)])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_empty_shapes_and_a_one_word_vocabulary_match_reference(backend, shape, reduction):
    """No tokens, hidden states of width 0 (every logit the bias), one word (every loss 0): as the reference."""
    inputs = make_inputs(*shape, weighted=True, bias=True, device=device_for(backend))
    check_against_reference(*inputs, reduction, backend, REL_TOL[torch.float32])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("shared,weighted,bias", [(False, False, False), (True, True, True), (False, True, True)])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_matches_reference_fp32(backend, shape, shared, weighted, bias, reduction):
    inputs = make_inputs(*shape, shared=shared, weighted=weighted, bias=bias, device=device_for(backend))
    check_against_reference(*inputs, reduction, backend, REL_TOL[torch.float32])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_soft_capped_logits_match_reference(backend, shape, shared, bias):
    """softcap c caps both heads' logits, c tanh(z / c) (Gemma's final_logit_softcapping), after their bias as
    a model caps lm_head(h); logits up to ~4c here, so the cap bends most of them, and the gradient goes through
    its derivative on the policy's side."""
    hidden, weight, ref_hidden, ref_weight, extra = make_inputs(*shape, shared=shared, weighted=True, bias=bias,
                                                                device=device_for(backend))
    with torch.no_grad():
        weight.mul_(8.0)
        if not shared:
            ref_weight.mul_(8.0)
    check_against_reference(hidden, weight, ref_hidden, ref_weight, {**extra, "softcap": 2.5}, "none", backend,
                            REL_TOL[torch.float32])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("which", ["bias", "ref_bias"])
def test_a_bias_on_one_head_only(backend, which):
    """A bias on the policy's head alone, or on the reference's alone: the other head's logits take none."""
    hidden, weight, ref_hidden, ref_weight, extra = make_inputs(13, 24, 131, weighted=True, bias=True,
                                                                device=device_for(backend))
    extra[{"bias": "ref_bias", "ref_bias": "bias"}[which]] = None
    check_against_reference(hidden, weight, ref_hidden, ref_weight, extra, "sum", backend, REL_TOL[torch.float32])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shared", [False, True])
def test_words_masked_by_a_bias_of_minus_inf(backend, shared):
    """A bias of -inf masks words out (in the reference's head alone, or in the one head of both): P gives them no
    mass, so they add 0 log 0 = 0 to the KL (not 0 * inf = NaN), as the float64 reference counts them too."""
    hidden, weight, ref_hidden, ref_weight, extra = make_inputs(13, 24, 131, shared=shared, weighted=True, bias=True,
                                                                device=device_for(backend))
    with torch.no_grad():
        extra["ref_bias"][:40] = float("-inf")
    check_against_reference(hidden, weight, ref_hidden, ref_weight, extra, "none", backend, REL_TOL[torch.float32])
    out = fastalign.linear_kl_div(hidden, weight, ref_hidden, ref_weight, reduction="none", backend=backend, **extra)
    assert torch.isfinite(out).all() and out[extra["mask"]].abs().min() > 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_nan_reference_gives_a_nan_loss(backend):
    """NaN in the reference's logits (a diverged or overflowed reference model) makes P NaN: its tokens' KL is NaN
    on every backend and in the float64 reference, as the Triton kernels gave; the torch path and the reference
    counted NaN p as a word without mass (0), a silent KL of 0 for those tokens."""
    hidden, weight, ref_hidden, ref_weight, _ = make_inputs(5, 16, 37, device=device_for(backend))
    ref_hidden = ref_hidden.clone()
    ref_hidden[2, 0] = float("nan")
    out = fastalign.linear_kl_div(hidden, weight, ref_hidden, ref_weight, reduction="none", backend=backend)
    ref = linear_kl_div_reference(hidden, weight, ref_hidden, ref_weight, reduction="none")
    for kl in (out, ref):
        assert kl[2].isnan() and torch.isfinite(kl[[0, 1, 3, 4]]).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_shared_bias_with_own_weights(backend):
    """ref_bias the policy's bias tensor itself (which requires grad) while the weights differ: the bias gets the
    gradient of Q's logits only, P's use of the same tensor is a constant."""
    hidden, weight, ref_hidden, ref_weight, extra = make_inputs(13, 24, 131, weighted=True, bias=True,
                                                                device=device_for(backend))
    extra["ref_bias"] = extra["bias"]
    check_against_reference(hidden, weight, ref_hidden, ref_weight, extra, "none", backend, REL_TOL[torch.float32])


@pytest.mark.parametrize("shape", triton_cases(SHAPES[1:2]))  # one shape: each autotunes the capped kernels anew
def test_soft_capped_bf16_on_the_triton_backend(shape):
    hidden, weight, ref_hidden, ref_weight, extra = make_inputs(*shape, dtype=torch.bfloat16, weighted=True,
                                                                device=TRITON_DEVICE)
    with torch.no_grad():
        weight.mul_(8.0)
        ref_weight.mul_(8.0)
    check_against_reference(hidden, weight, ref_hidden, ref_weight, {**extra, "softcap": 2.5}, "mean", "triton",
                            REL_TOL[torch.bfloat16])


@pytest.mark.parametrize("backend", BACKENDS)
def test_reference_of_another_width(backend):
    inputs = make_inputs(7, 16, 131, ref_h=40, weighted=True, bias=True, device=device_for(backend))
    check_against_reference(*inputs, "sum", backend, REL_TOL[torch.float32])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype, ref_dtype", [(torch.float32, torch.bfloat16), (torch.bfloat16, torch.float32)])
def test_heads_of_different_dtypes(backend, dtype, ref_dtype):
    """Each head computes in its own dtype (a teacher stored in another than the student's, as CausalLMKLDiv passes
    it: neither rounded to the student's dtype nor copied to it)."""
    hidden, weight, ref_hidden, ref_weight, extra = make_inputs(7, 16, 131, dtype=dtype, ref_h=40, weighted=True,
                                                                bias=True, device=device_for(backend))
    ref_hidden, ref_weight, extra["ref_bias"] = (t.to(ref_dtype) for t in (ref_hidden, ref_weight, extra["ref_bias"]))
    check_against_reference(hidden, weight, ref_hidden, ref_weight, extra, "sum", backend, REL_TOL[dtype])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shared,bias", [(False, False), (True, False), (False, True), (True, True)])
def test_policy_close_to_reference(backend, shared, bias):
    """KL near 0 (~1e-4 here) is where cancellation shows: fp32 log-probabilities of size ~5 carry ~1e-6 of
    absolute error, so the KL is held to that absolute bound. Its gradient q - p is ~1e-2 of q and p, each
    carrying ~1e-6 relative error from its fp32 logsumexp: ~1e-4 relative error in q - p, held to 1e-3."""
    hidden, weight, ref_hidden, ref_weight, extra = make_inputs(13, 24, 131, shared=shared, closeness=1e-2,
                                                                bias=bias, masked=0.0, device=device_for(backend))
    out = fastalign.linear_kl_div(hidden, weight, ref_hidden, ref_weight, reduction="none", backend=backend, **extra)
    ref = linear_kl_div_reference(hidden, weight, ref_hidden, ref_weight, reduction="none", **extra)
    assert ref.max() > 1e-5 and (out - ref).abs().max() <= 2e-6
    assert_grads_close(["d_hidden", "d_weight", "d_bias"], out, ref, differentiable(hidden, weight, extra), 1e-3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_kl_of_a_barely_moved_policy_is_accurate_and_not_negative(backend):
    """Logits of ~100 and a policy barely moved from its reference (unlearning's at its start, a distillation near
    convergence): the torch path summed p (log p - log q) from two fp32 log-softmaxes, each ~1e-7 |lse| off, so
    per-token KLs came out negative (-6e-6) and their sum 3e-3 off; it now takes the expm1 / log1p form of the
    Triton kernel, whose error scales with the logits' difference."""
    torch.manual_seed(0)
    hidden = torch.randn(32, 16)
    ref_hidden = hidden + 1e-3 * torch.randn(32, 16)
    weight = torch.randn(256, 16) * 30
    device = device_for(backend)
    kl = fastalign.linear_kl_div(hidden.to(device), weight.to(device), ref_hidden.to(device), weight.to(device),
                                 reduction="none", backend=backend).cpu()
    ref = linear_kl_div_reference(hidden, weight, ref_hidden, weight, reduction="none")
    assert kl.min() >= -1e-6, f"negative KL {kl.min().item():.3g}"
    assert abs(kl.double().sum() - ref.sum()) <= 5e-4 * ref.sum()


@pytest.mark.parametrize("shift", [0.0, 1.5, 30.0])
def test_kl_of_a_barely_moved_policy_is_accurate_whatever_the_references_logits_are_shifted_by(shift):
    """A constant added to the reference's logits (its bias) changes neither distribution, only its logsumexp: the
    torch path took the log1p form only where the two logsumexps were at most 1 apart, and past that summed
    p (log p - log q) with their rounding (~1e-7 |lse|) in every term, 7500x off and negative at a shift of 30. The
    form on the two log-softmaxes takes that rounding out at any shift. (The Triton kernel's gap limit is its
    docstring's.)"""
    torch.manual_seed(0)
    hidden = torch.randn(16, 16)
    ref_hidden = hidden + 1e-3 * torch.randn(16, 16)
    weight = torch.randn(512, 16) * 10
    ref_bias = torch.full((512,), shift)
    kl = fastalign.linear_kl_div(hidden, weight, ref_hidden, weight, ref_bias=ref_bias, reduction="none",
                                 backend="torch")
    ref = linear_kl_div_reference(hidden, weight, ref_hidden, weight, ref_bias=ref_bias, reduction="none")
    assert (kl.double() - ref).abs().max() <= 2e-7 + 1e-4 * ref.abs().max()


@pytest.mark.filterwarnings("ignore:invalid value encountered in multiply:RuntimeWarning")  # the sum not taken
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("ref_top", [40, 200])
def test_a_word_the_policy_masks_where_the_reference_mass_underflows(backend, ref_top):
    """A word the policy's bias masks (-inf), to which the reference gives a mass e^-120 that underflows in fp32:
    it adds 0 to the KL, as a word P gives no mass does, where the torch path took 0 * inf = NaN, and the Triton
    kernel NaN from a running sum of +inf times the rescale 0 when the reference's top word (ref_top) came in a
    later tile (40 under the interpreter) or split (200). With a mass that fp32 keeps (e^-50), the KL is +inf, as
    the float64 reference gives."""
    device = device_for(backend)
    hidden, weight = torch.zeros(2, 4, device=device), torch.zeros(256, 4, device=device)
    bias = torch.zeros(256, device=device)
    bias[3] = float("-inf")
    for gap in (120.0, 50.0):
        ref_bias = torch.zeros(256, device=device)
        ref_bias[ref_top] = gap
        kl = fastalign.linear_kl_div(hidden, weight, hidden, weight, bias=bias, ref_bias=ref_bias, reduction="none",
                                     backend=backend).cpu()
        if gap == 50.0:
            assert (kl == float("inf")).all(), kl
            continue
        ref_bias[3] = float("-inf")   # P's mass on the word, 0 in fp32
        ref = linear_kl_div_reference(hidden.cpu(), weight.cpu(), hidden.cpu(), weight.cpu(), bias=bias.cpu(),
                                      ref_bias=ref_bias.cpu(), reduction="none")
        assert_rel_close("kl", kl, ref, REL_TOL[torch.float32])


@pytest.mark.parametrize("backend", BACKENDS)
def test_identical_distributions_give_zero(backend):
    hidden, weight, _, _, extra = make_inputs(6, 16, 37, bias=True, device=device_for(backend))
    out = fastalign.linear_kl_div(hidden, weight, hidden.detach(), weight, bias=extra["bias"],
                                  ref_bias=extra["bias"], reduction="none", backend=backend)
    assert out.abs().max() < 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_tokens_masked_gives_zero_loss_and_gradients(backend, reduction):
    hidden, weight, ref_hidden, ref_weight, extra = make_inputs(5, 16, 37, weighted=True, masked=1.0, bias=True,
                                                                device=device_for(backend))
    out = fastalign.linear_kl_div(hidden, weight, ref_hidden, ref_weight, reduction=reduction, backend=backend,
                                  **extra)
    assert torch.all(out == 0)
    grads = grads_of(out, differentiable(hidden, weight, extra), torch.ones_like(out))
    assert len(grads) == 3 and all(torch.all(grad == 0) for grad in grads)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_inputs(backend):
    device = device_for(backend)
    hidden = torch.randn(24, 11, device=device, requires_grad=True).t()
    weight = torch.randn(131, 48, device=device, requires_grad=True)[:, ::2]
    ref_hidden = torch.randn(11, 48, device=device)[:, 1::2]
    ref_weight = torch.randn(48, 131, device=device).t()[:, :24]
    check_against_reference(hidden, weight, ref_hidden, ref_weight, {}, "mean", backend, REL_TOL[torch.float32])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shared", [False, True])
def test_fp32_inputs_under_bf16_autocast_keep_fp32(backend, shared):
    """autocast does not reach inside the op: fp32 inputs are computed in fp32 on every backend, and the
    backward runs inside the autocast region too (the torch path rounded logits to bf16 and then crashed).
    Per token ("none"): the signed weights' sum cancels to a tenth of its terms, where fp32 rounding alone
    came to 1.1e-5 of it on one CPU."""
    hidden, weight, ref_hidden, ref_weight, extra = make_inputs(13, 24, 131, shared=shared, weighted=True,
                                                                device=device_for(backend))
    with torch.autocast(hidden.device.type, dtype=torch.bfloat16):
        check_against_reference(hidden, weight, ref_hidden, ref_weight, extra, "none", backend,
                                REL_TOL[torch.float32])


@pytest.mark.parametrize("backend", BACKENDS)
def test_second_derivatives_are_refused_by_name(backend):
    """create_graph=True gives the exact first-order gradients (torch.func runs every backward so), and
    differentiating them raises by name, as do transforms of torch.func's grad, jacrev and vjp; forward mode (jvp,
    jacfwd, hessian) is refused by name too."""
    hidden, weight, ref_hidden, ref_weight, extra = make_inputs(6, 16, 37, shared=True, device=device_for(backend))
    for inputs in ([hidden, weight], [hidden]):
        out = fastalign.linear_kl_div(hidden, weight, ref_hidden, ref_weight, backend=backend, **extra)
        grads = torch.autograd.grad(out, inputs, create_graph=True)
        ref = linear_kl_div_reference(hidden, weight, ref_hidden, ref_weight, **extra)
        for got, want in zip(grads, torch.autograd.grad(ref, inputs)):
            assert_rel_close("gradient", got, want, REL_TOL[torch.float32])
        with pytest.raises(RuntimeError, match="linear_kl_div is not twice differentiable"):
            torch.autograd.grad(sum(g.sum() for g in grads), inputs)
    hidden, weight = hidden.detach(), weight.detach()

    def kl(h):
        return fastalign.linear_kl_div(h, weight, ref_hidden, weight, backend=backend, **extra)

    assert_only_first_order("linear_kl_div", kl, hidden)


@pytest.mark.parametrize("backend", BACKENDS)
def test_inside_a_compiled_caller(backend):
    """torch.compile of a caller runs the op as it is (a graph break), with exact gradients; dynamo tracing into
    the kernel launches crashed under the Triton interpreter."""
    hidden, weight, ref_hidden, ref_weight, extra = make_inputs(13, 24, 131, shared=True, weighted=True,
                                                                device=device_for(backend))

    def caller(loss, h, w):
        return loss(torch.tanh(h), w, ref_hidden, w, reduction="none", **extra)

    out = torch.compile(caller, backend="eager")(functools.partial(fastalign.linear_kl_div, backend=backend),
                                                 hidden, weight)
    ref = caller(linear_kl_div_reference, hidden, weight)
    assert_rel_close("kl", out, ref, REL_TOL[torch.float32])
    assert_grads_close(["d_hidden", "d_weight"], out, ref, [hidden, weight], REL_TOL[torch.float32])



@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("differentiate", COMPILED_CALLER_DIFFERENTIATIONS)
def test_gradients_taken_inside_a_compiled_caller(backend, differentiate):
    """torch.compile of a caller that differentiates the KL itself: the backward runs inside the compiled frame,
    where dynamo traced into the kernel launches (the Triton interpreter crashed) unless they are a graph break."""
    hidden, weight, ref_hidden, ref_weight, extra = make_inputs(13, 24, 131, shared=False, weighted=True,
                                                                device=device_for(backend))
    assert_grads_of_a_compiled_caller_close(
        differentiate, functools.partial(fastalign.linear_kl_div, backend=backend), linear_kl_div_reference,
        hidden.detach(), weight.detach(), (ref_hidden, ref_weight), extra, REL_TOL[torch.float32])


def test_fullgraph_compile_is_refused_with_the_reason():
    """fullgraph=True cannot hold the op's graph break: dynamo's error says why (it said 'reason: None')."""
    hidden, weight, ref_hidden, ref_weight, _ = make_inputs(6, 16, 37)
    caller = torch.compile(lambda h, w: fastalign.linear_kl_div(h, w, ref_hidden, ref_weight, backend="torch"),
                           backend="eager", fullgraph=True)
    with pytest.raises(torch._dynamo.exc.Unsupported, match="linear_kl_div runs outside the compiled graph"):
        caller(hidden, weight)


def test_torch_backend_across_chunk_boundaries(monkeypatch):
    monkeypatch.setattr(chunking, "CHUNK_BYTES", 3 * 4 * 2 * 131)  # 3 rows of both heads' logits per chunk
    inputs = make_inputs(14, 24, 131, weighted=True, bias=True)
    check_against_reference(*inputs, "sum", "torch", REL_TOL[torch.float32])


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradients_nobody_needs_are_not_computed(backend):
    """Hidden states of a frozen backbone get no G @ W product in backward (a third of its matmul work) and the
    weight's gradient stays exact."""
    hidden, weight, ref_hidden, ref_weight, extra = make_inputs(13, 24, 131, weighted=True, bias=True,
                                                                device=device_for(backend))
    flops = {}
    for frozen in (False, True):
        hidden.requires_grad_(not frozen)
        out = fastalign.linear_kl_div(hidden, weight, ref_hidden, ref_weight, reduction="none", backend=backend,
                                      **extra)
        seed = torch.randn(out.shape, device=out.device)
        with FlopCounterMode(display=False) as counter:
            (d_weight,) = grads_of(out, [weight], seed)
        flops[frozen] = counter.get_total_flops()
    ref = linear_kl_div_reference(hidden, weight, ref_hidden, ref_weight, reduction="none", **extra)
    assert_rel_close("d_weight", d_weight, grads_of(ref, [weight], seed)[0], REL_TOL[torch.float32])
    num_live = int((extra["mask"] & (extra["token_weight"] != 0)).sum())
    assert flops[False] - flops[True] == 2 * num_live * 131 * 24


def test_a_shared_head_is_upcast_once(monkeypatch):
    """One bf16 head (weight and bias) that serves policy and reference reaches the torch launchers as the policy's
    very tensor, which each pass upcasts to fp32 once, not once per head: a detached copy for the reference made a
    second [V, H] fp32 copy."""
    from fastalign.ops.torch_chunked import linear_kl_div as launchers
    upcast, shapes = launchers.upcast, []
    monkeypatch.setattr(launchers, "upcast", lambda t, acc: shapes.append(t is not None and tuple(t.shape))
                        or upcast(t, acc))
    hidden, weight, ref_hidden, ref_weight, extra = make_inputs(13, 24, 131, dtype=torch.bfloat16, shared=True,
                                                                bias=True)
    fastalign.linear_kl_div(hidden, weight, ref_hidden, ref_weight, backend="torch", **extra).backward()
    assert shapes.count((131, 24)) == shapes.count((131,)) == 2  # the forward's and the backward's


@pytest.mark.parametrize("backend", BACKENDS)
def test_bias_alone_trains(backend):
    """Only the lm_head bias requires grad (hidden states and weight frozen): its gradient is exact and no other
    is returned."""
    hidden, weight, ref_hidden, ref_weight, extra = make_inputs(13, 24, 131, weighted=True, bias=True,
                                                                device=device_for(backend))
    hidden, weight = hidden.detach(), weight.detach()
    out = fastalign.linear_kl_div(hidden, weight, ref_hidden, ref_weight, reduction="none", backend=backend, **extra)
    ref = linear_kl_div_reference(hidden, weight, ref_hidden, ref_weight, reduction="none", **extra)
    seed = torch.randn(out.shape, device=out.device)
    (d_bias,) = grads_of(out, [extra["bias"]], seed)
    assert_rel_close("d_bias", d_bias, grads_of(ref, [extra["bias"]], seed)[0], REL_TOL[torch.float32])


def test_gradcheck_float64():
    hidden, weight, ref_hidden, ref_weight, extra = make_inputs(4, 5, 7, dtype=torch.float64, weighted=True,
                                                                bias=True)
    ref_bias, mask, token_weight = extra["ref_bias"], extra["mask"], extra["token_weight"]

    def loss(h, w, b):
        return fastalign.linear_kl_div(h, w, ref_hidden, ref_weight, bias=b, ref_bias=ref_bias, mask=mask,
                                       token_weight=token_weight, reduction="none", backend="torch")

    assert torch.autograd.gradcheck(loss, (hidden, weight, extra["bias"]))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_torch_backend_accumulates_half_precision_in_fp32(dtype):
    """Exactly representable half-precision inputs: the fp32 KL is within fp32 rounding of the float64 reference."""
    hidden, weight, ref_hidden, ref_weight, extra = make_inputs(13, 24, 131, dtype=dtype, weighted=True, bias=True)
    out = fastalign.linear_kl_div(hidden, weight, ref_hidden, ref_weight, reduction="none", backend="torch", **extra)
    ref = linear_kl_div_reference(hidden, weight, ref_hidden, ref_weight, reduction="none", **extra)
    assert out.dtype == torch.float32
    assert_rel_close("kl", out, ref, 1e-5)


def test_bf16_backward_takes_the_fp32_logsumexps():
    """Logits ~40, where bf16's spacing is 0.25: the backward's softmaxes take the forward's logsumexps of both heads
    in fp32; kept in bf16, they put the probabilities off by up to ~13%, and the gradients by several %."""
    hidden, weight, ref_hidden, ref_weight, extra = make_inputs(13, 24, 131, dtype=torch.bfloat16, weighted=True,
                                                                bias=True)
    hidden, ref_hidden = (hidden.detach() * 16).requires_grad_(), ref_hidden * 16
    out = fastalign.linear_kl_div(hidden, weight, ref_hidden, ref_weight, reduction="none", backend="torch", **extra)
    ref = linear_kl_div_reference(hidden, weight, ref_hidden, ref_weight, reduction="none", **extra)
    assert_grads_close(["d_hidden", "d_weight", "d_bias"], out, ref, differentiable(hidden, weight, extra), 2 ** -7)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_token_weight_and_mask_made_under_inference_mode_are_taken(backend):
    """A token_weight or mask made under torch.inference_mode() was refused as if the backward saved it ('autograd
    cannot save it'): both are copied into the rows' weights, never saved, so the KL and gradients are those of
    copies."""
    hidden, weight, ref_hidden, ref_weight, extra = make_inputs(13, 24, 131, bias=True, device=device_for(backend))
    with torch.inference_mode():
        token_weight, mask = torch.randn(13, device=hidden.device), extra.pop("mask").clone()
    got, want = (fastalign.linear_kl_div(hidden, weight, ref_hidden, ref_weight, token_weight=w, mask=m,
                                         reduction="none", backend=backend, **extra)
                 for w, m in ((token_weight, mask), (token_weight.clone(), mask.clone())))
    torch.testing.assert_close(got, want)
    inputs, seed = differentiable(hidden, weight, extra), torch.randn(13, device=hidden.device)
    for got_grad, want_grad in zip(grads_of(got, inputs, seed), grads_of(want, inputs, seed)):
        torch.testing.assert_close(got_grad, want_grad)


def test_triton_backend_refuses_float64():
    """Both heads in float64, or a float64 reference under a float32 policy (the reference was taken as it came)."""
    hidden, weight, ref_hidden, ref_weight, _ = make_inputs(6, 16, 37, dtype=torch.float64)
    with pytest.raises(TypeError, match="hidden is float64, which the Triton backend does not support"):
        fastalign.linear_kl_div(hidden, weight, ref_hidden, ref_weight, backend="triton")
    with pytest.raises(TypeError, match="ref_hidden is float64, which the Triton backend does not support"):
        fastalign.linear_kl_div(hidden.float(), weight.float(), ref_hidden, ref_weight, backend="triton")


@pytest.mark.parametrize("shape", triton_cases(SHAPES, gpu_only=[(300, 64, 5000)]))
@pytest.mark.parametrize("shared", [False, True])
def test_matches_reference_bf16_on_the_triton_backend(shape, shared):
    inputs = make_inputs(*shape, dtype=torch.bfloat16, device=TRITON_DEVICE, shared=shared, weighted=True,
                         bias=True)
    check_against_reference(*inputs, "mean", "triton", REL_TOL[torch.bfloat16])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_a_models_batch_of_sequences_is_taken_as_it_is(backend, reduction):
    """hidden and ref_hidden [B, T, H] (sliced: not contiguous), token_weight and mask [B, T]: the KL of their rows
    ([B, T] for "none"), and gradients in the inputs' own shapes."""
    device = device_for(backend)
    states = torch.randn(3, 6, 16, device=device, requires_grad=True)
    weight = (torch.randn(37, 16, device=device) / 4).requires_grad_()
    ref_states, ref_weight = torch.randn(3, 6, 24, device=device), torch.randn(37, 24, device=device) / 5
    hidden, ref_hidden = states[:, :-1], ref_states[:, :-1]
    extra = {"token_weight": torch.randn(3, 5, device=device), "mask": torch.rand(3, 5, device=device) > 0.3}
    out = fastalign.linear_kl_div(hidden, weight, ref_hidden, ref_weight, reduction=reduction, backend=backend,
                                  **extra)
    ref = linear_kl_div_reference(hidden, weight, ref_hidden, ref_weight, reduction=reduction, **extra)
    rows = linear_kl_div_reference(hidden.reshape(15, 16), weight, ref_hidden.reshape(15, 24), ref_weight,
                                   reduction=reduction, **{k: v.reshape(15) for k, v in extra.items()})
    assert out.shape == ref.shape == ((3, 5) if reduction == "none" else ())
    assert torch.equal(ref.reshape(rows.shape), rows)   # the reference takes the same shapes, as its rows
    assert_rel_close("kl", out, ref, REL_TOL[torch.float32])
    assert_grads_close(["d_states", "d_weight"], out, ref, [states, weight], REL_TOL[torch.float32])


@pytest.mark.parametrize("change,message", [
    (lambda a: {**a, "ref_hidden": a["ref_hidden"][:-1]}, "ref_hidden must have shape \\[6, H_ref\\]"),
    (lambda a: {**a, "hidden": a["hidden"].view(2, 3, 16)}, "ref_hidden must have shape \\[2, 3, H_ref\\]"),
    (lambda a: {**a, "hidden": a["hidden"][0]}, "hidden must have at least 2 dimensions"),
    # was: "ref_weight must be on meta like the hidden states", naming the wrong argument and the wrong device
    (lambda a: {**a, "ref_hidden": a["ref_hidden"].to("meta")}, "ref_hidden must be on cpu like the hidden states"),
    (lambda a: {**a, "ref_hidden": a["ref_hidden"].to("meta"), "ref_weight": a["ref_weight"].to("meta")},
     "ref_hidden must be on cpu like the hidden states, got .* device meta"),
    # was silent: a reference weight on the meta device gave a finite KL
    (lambda a: {**a, "ref_weight": a["ref_weight"].to("meta")}, "ref_weight must be on cpu like the hidden states"),
    (lambda a: {**a, "ref_weight": a["ref_weight"][:-1]}, "ref_weight must have the vocabulary size"),
    (lambda a: {**a, "ref_weight": a["ref_weight"][:, :-1]}, "ref_weight must be \\[V, H\\]"),
    (lambda a: {**a, "weight": a["weight"].double()}, "weight must have the dtype of hidden"),
    (lambda a: {**a, "mask": torch.ones(6)}, "mask must have dtype"),
    (lambda a: {**a, "mask": torch.ones(5, dtype=torch.bool)}, "mask must have shape \\[6\\]"),
    (lambda a: {**a, "token_weight": torch.ones(7)}, "token_weight must have shape \\[6\\]"),
    (lambda a: {**a, "token_weight": torch.ones(6, requires_grad=True)}, "token_weight requires grad"),  # was silent
    (lambda a: {**a, "mask": torch.ones(6, dtype=torch.bool).to_sparse()}, "mask must be a dense \\(strided\\)"),
    (lambda a: {**a, "reduction": "batchmean"}, "reduction must be one of"),
    (lambda a: {**a, "softcap": -30.0}, "softcap must be None or a positive finite number .* got -30.0"),
    (lambda a: {**a, "weight": a["weight"][:0], "ref_weight": a["ref_weight"][:0]},
     "weight must have at least one row"),
    (lambda a: {**a, "bias": torch.ones(36)}, "bias must be \\[37\\] of dtype torch.float32 .* got shape \\(36,\\)"),
    (lambda a: {**a, "bias": torch.ones(37, 1)}, "bias must have 1 dimension"),
    (lambda a: {**a, "bias": torch.ones(37).double()}, "bias must be \\[37\\] .* dtype torch.float64"),
    (lambda a: {**a, "bias": torch.ones(37, device="meta")}, "bias must be on cpu .* device meta"),
    (lambda a: {**a, "bias": [0.0] * 37}, "bias must be a torch.Tensor"),
    (lambda a: {**a, "ref_bias": torch.ones(38)}, "ref_bias must be \\[37\\] .*one entry per row of ref_weight"),
    (lambda a: {**a, "ref_bias": torch.ones(37).half()}, "ref_bias must be \\[37\\] of dtype torch.float32"),
    (lambda a: {**a, "ref_bias": torch.ones(37, device="meta")}, "ref_bias must be on cpu"),
    # was silent: the reference is never differentiated, so a reference tensor that requires grad got no gradient
    (lambda a: {**a, "ref_hidden": a["ref_hidden"].requires_grad_()},
     "ref_hidden requires grad, but it is a constant of the loss and gets no gradient: pass ref_hidden.detach\\(\\)"),
    (lambda a: {**a, "ref_weight": a["ref_weight"].requires_grad_()}, "ref_weight requires grad, .* ref_weight.detach"),
    (lambda a: {**a, "ref_bias": torch.ones(37, requires_grad=True)}, "ref_bias requires grad, .* ref_bias.detach"),
])
def test_bad_input_is_named(change, message):
    hidden, weight, ref_hidden, ref_weight, _ = make_inputs(6, 16, 37)
    args = change({"hidden": hidden, "weight": weight, "ref_hidden": ref_hidden, "ref_weight": ref_weight})
    with pytest.raises((ValueError, TypeError), match=message):
        fastalign.linear_kl_div(**args)


@pytest.mark.parametrize("change,message", [
    (lambda a: {**a, "ref_hidden": a["ref_hidden"].int()}, "ref_hidden must have dtype .* got shape \\(2, 3, 24\\)"),
    (lambda a: {**a, "mask": torch.ones(2, 3)}, "mask must have dtype .* got shape \\(2, 3\\)"),
    (lambda a: {**a, "token_weight": torch.ones(2, 3, device="meta")}, "token_weight must be on cpu .* \\(2, 3\\)"),
])
def test_errors_show_the_shapes_given(change, message):
    """A model's [B, T] tokens: errors after the shape checks showed the flattened rows ('mask must have dtype ...,
    got shape (6,)' for a [2, 3] mask)."""
    hidden, weight, ref_hidden, ref_weight, _ = make_inputs(6, 16, 37, ref_h=24)
    args = change({"hidden": hidden.detach().view(2, 3, 16), "weight": weight.detach(),
                   "ref_hidden": ref_hidden.view(2, 3, 24), "ref_weight": ref_weight})
    with pytest.raises((ValueError, TypeError), match=message):
        fastalign.linear_kl_div(**args)


FUNC_CASES = [((1, 16, 37), 0.0), ((13, 24, 131), 0.2), ((5, 16, 37), 1.0)]  # one token, V odd, every token masked


def func_inputs(shape, masked, shared, backend):
    """Plain tensors (torch.func differentiates functions of them): hidden, weight, bias, ref_hidden, and the
    constants (ref_weight, ref_bias, mask, token_weight) as keywords; with `shared`, ref_weight and ref_bias are
    left out: the differentiated function passes its own weight and bias as the reference's."""
    hidden, weight, ref_hidden, ref_weight, extra = make_inputs(*shape, shared=shared, weighted=True, bias=True,
                                                                masked=masked, device=device_for(backend))
    constants = {"mask": extra["mask"], "token_weight": extra["token_weight"]}
    if not shared:
        constants.update(ref_weight=ref_weight, ref_bias=extra["ref_bias"])
    return hidden.detach(), weight.detach(), extra["bias"].detach(), ref_hidden, constants


def kl_of(loss_fn, h, w, b, r, ref_weight=None, ref_bias=None, **kwargs):
    """The KL of policy (h, w, b) against reference r, whose head is (w, b) itself unless given."""
    return loss_fn(h, w, r, w if ref_weight is None else ref_weight, bias=b,
                   ref_bias=b if ref_weight is None else ref_bias, **kwargs)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape,masked", FUNC_CASES)
@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_torch_func_grad_matches_autograd_and_reference(backend, shape, masked, shared, reduction):
    """torch.func.grad_and_value of the KL (under a random upstream gradient) wrt hidden, weight and bias: the
    values and gradients of the autograd path exactly, those of the float64 reference within fp32 rounding."""
    hidden, weight, bias, ref_hidden, constants = func_inputs(shape, masked, shared, backend)
    seed = torch.randn(shape[0] if reduction == "none" else (), device=hidden.device)

    def scalar(loss_fn, h, w, b):
        return (kl_of(loss_fn, h, w, b, ref_hidden, reduction=reduction, **constants) * seed).sum()

    op = functools.partial(fastalign.linear_kl_div, backend=backend)
    assert_func_grad_is_autograds(functools.partial(scalar, op), functools.partial(scalar, linear_kl_div_reference),
                                  (hidden, weight, bias), REL_TOL[torch.float32], "kl")


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_func_grad_wrt_the_reference_is_refused_naming_it(backend):
    """torch.func.grad wrt ref_hidden gave a zero gradient, silently (the reference is never differentiated):
    refused naming it, as under autograd."""
    hidden, weight, bias, ref_hidden, constants = func_inputs((4, 16, 37), 0.3, False, backend)
    op = functools.partial(fastalign.linear_kl_div, backend=backend)
    with pytest.raises(ValueError, match="^ref_hidden requires grad, but it is a constant of the loss"):
        torch.func.grad(functools.partial(kl_of, op, hidden, weight, bias, **constants))(ref_hidden)


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_func_vjp_and_jacrev_match_reference(backend):
    """torch.func.vjp of the per-token KLs under a random cotangent, and jacrev's whole Jacobians (a vmap of the
    backward over the cotangents), against the reference's: zero rows where a token is masked out."""
    hidden, weight, bias, ref_hidden, constants = func_inputs((4, 16, 37), 0.3, True, backend)
    constants["mask"][1] = False

    def per_token(loss_fn, h, w, b):
        return kl_of(loss_fn, h, w, b, ref_hidden, reduction="none", **constants)

    op = functools.partial(per_token, functools.partial(fastalign.linear_kl_div, backend=backend))
    ref = functools.partial(per_token, linear_kl_div_reference)
    jacobians = assert_vjp_and_jacrev_close(["hidden", "weight", "bias"], op, ref, (hidden, weight, bias),
                                            REL_TOL[torch.float32])
    assert torch.all(jacobians[1][1] == 0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_per_sample_gradients_under_vmap(backend, reduction):
    """vmap(grad_and_value) over a batch of sequences (hidden, ref_hidden, mask, token_weight batched; one head
    shared by policy and reference): each sequence's KL and gradients, as a loop over the sequences computes them
    with the reference; one sequence has every token masked out, and the token rows are not contiguous."""
    device = device_for(backend)
    states, ref_states = torch.randn(3, 6, 16, device=device)[:, 1:], torch.randn(3, 6, 16, device=device)[:, 1:]
    weight, bias = torch.randn(37, 16, device=device) / 4, torch.randn(37, device=device)
    mask, token_weight = torch.rand(3, 5, device=device) > 0.2, torch.randn(3, 5, device=device)
    mask[1] = False
    seed = torch.randn(5 if reduction == "none" else (), device=device)

    def sample_kl(loss_fn, w, b, h, r, m, tw):
        return (kl_of(loss_fn, h, w, b, r, mask=m, token_weight=tw, reduction=reduction) * seed).sum()

    op = functools.partial(sample_kl, functools.partial(fastalign.linear_kl_div, backend=backend))
    grads, values = assert_per_sample_grads_close(op, functools.partial(sample_kl, linear_kl_div_reference), weight,
                                                  bias, (states, ref_states, mask, token_weight),
                                                  REL_TOL[torch.float32])
    assert torch.all(grads[2][1] == 0) and values[1] == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_vmap_over_stacked_heads(backend):
    """vmap over the weights of several heads (an ensemble), each its own reference head, on shared hidden states:
    each head's KLs, and the gradients of their sum, as the reference gives them one head at a time."""
    hidden, weight, bias, ref_hidden, constants = func_inputs((13, 24, 131), 0.2, True, backend)
    heads = torch.stack([weight, 2 * weight, -weight])

    def kls(w):
        return kl_of(functools.partial(fastalign.linear_kl_div, backend=backend), hidden, w, bias, ref_hidden,
                     reduction="none", **constants)

    out = torch.func.vmap(kls)(heads)
    d_heads = torch.func.grad(lambda ws: torch.func.vmap(kls)(ws).sum())(heads)
    for i in range(3):
        w = heads[i].clone().requires_grad_()
        ref = kl_of(linear_kl_div_reference, hidden, w, bias, ref_hidden, reduction="none", **constants)
        assert_rel_close(f"kl {i}", out[i], ref, REL_TOL[torch.float32])
        assert_rel_close(f"d_weight {i}", d_heads[i], torch.autograd.grad(ref.sum(), [w])[0], REL_TOL[torch.float32])


@pytest.mark.parametrize("backend, dtype", [(b, torch.float32) for b in BACKENDS] + [("triton", torch.float16)])
@pytest.mark.parametrize("weight_trains", [True, False], ids=["head-trains", "head-frozen"])
def test_forward_and_backward_wait_for_the_device_only_where_the_host_needs_a_value(backend, dtype, weight_trains):
    """On a GPU the op waits for the device once in its forward: the live rows' indices (nonzero), whose number
    sizes the matmuls; the backward knows their number from the forward (a host tensor). In fp16 the Triton backward
    of a trained weight also reads its matmuls' alpha on the host (cuBLAS takes a host number); bf16 and fp32 do not
    wait."""
    from tests.sync_counter import SyncCounter
    device = device_for(backend)
    hidden = torch.randn(9, 16, device=device, dtype=dtype, requires_grad=True)
    weight = (torch.randn(37, 16, device=device, dtype=dtype) / 4).requires_grad_(weight_trains)
    ref_hidden = torch.randn(9, 16, device=device, dtype=dtype)
    ref_weight = torch.randn(37, 16, device=device, dtype=dtype) / 4
    mask = torch.ones(9, dtype=torch.bool, device=device)
    mask[4] = False
    with SyncCounter() as counter:
        counter.mark(hidden, weight, ref_hidden, ref_weight, mask)
        fastalign.linear_kl_div(hidden, weight, ref_hidden, ref_weight, mask=mask, backend=backend).backward()
    expected = {"nonzero.default @ fastalign/ops/token_rows.py": 1}
    if backend == "triton" and weight_trains and dtype == torch.float16:
        expected["_local_scalar_dense.default @ kernels/chunked_backward.py"] = 1
    assert counter.by_file() == expected


@pytest.mark.parametrize("seed", [0, 1])
def test_kl_of_a_policy_moved_by_1e_5_keeps_its_digits(seed):
    """A KL of ~1e-9 per token: the torch path's p expm1(-d) for |d| < 0.5 keeps it to ~1e-2, where exp(-d) - 1 (or
    q - p) rounds each term to ~1e-7 p, the sum 100% off or more. The barely-moved tests' KLs (~1e-4) are too large
    to tell these apart."""
    torch.manual_seed(seed)
    hidden = torch.randn(16, 16)
    ref_hidden = hidden + 1e-5 * torch.randn(16, 16)
    weight = torch.randn(1000, 16) * 3
    kl = fastalign.linear_kl_div(hidden, weight, ref_hidden, weight, reduction="none", backend="torch")
    ref = linear_kl_div_reference(hidden, weight, ref_hidden, weight, reduction="none")
    assert abs(kl.double().sum() - ref.sum()) <= 5e-2 * ref.sum()
