"""fastalign.linear_kl_div against its float64 reference, on every backend."""
import functools

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import fastalign
from fastalign.ops.torch_chunked import chunking
from fastalign.reference.linear_losses import linear_kl_div_reference
from tests.compare import REL_TOL, assert_rel_close, grads_of
from tests.conftest import TRITON_DEVICE, device_for, triton_cases

BACKENDS = ["torch", "triton"]
SHAPES = [(1, 16, 37), (13, 24, 131), (40, 40, 1000)]  # (N, H, V): V a multiple of no block size


def make_inputs(n, h, v, *, dtype=torch.float32, device="cpu", shared=False, weighted=False, masked=0.2,
                ref_h=None, closeness=None):
    """Policy and reference heads; `shared` makes ref_weight the policy's weight tensor itself;
    `closeness` makes the reference a small perturbation of the policy (KL near 0)."""
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
    return hidden, weight, ref_hidden, ref_weight, extra


def check_against_reference(hidden, weight, ref_hidden, ref_weight, extra, reduction, backend, rel):
    out = fastalign.linear_kl_div(hidden, weight, ref_hidden, ref_weight, reduction=reduction, backend=backend,
                                  **extra)
    ref = linear_kl_div_reference(hidden, weight, ref_hidden, ref_weight, reduction=reduction, **extra)
    assert_rel_close("kl", out, ref, rel)
    seed = torch.randn(out.shape, device=out.device)
    for name, got, want in zip(["d_hidden", "d_weight"], grads_of(out, [hidden, weight], seed),
                               grads_of(ref, [hidden, weight], seed)):
        assert_rel_close(name, got, want, rel)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("shared,weighted", [(False, False), (True, True)])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_matches_reference_fp32(backend, shape, shared, weighted, reduction):
    inputs = make_inputs(*shape, shared=shared, weighted=weighted, device=device_for(backend))
    check_against_reference(*inputs, reduction, backend, REL_TOL[torch.float32])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("shared", [False, True])
def test_soft_capped_logits_match_reference(backend, shape, shared):
    """softcap c caps both heads' logits, c tanh(z / c) (Gemma's final_logit_softcapping); logits up to ~4c here,
    so the cap bends most of them, and the gradient goes through its derivative on the policy's side."""
    hidden, weight, ref_hidden, ref_weight, extra = make_inputs(*shape, shared=shared, weighted=True,
                                                                device=device_for(backend))
    with torch.no_grad():
        weight.mul_(8.0)
        if not shared:
            ref_weight.mul_(8.0)
    check_against_reference(hidden, weight, ref_hidden, ref_weight, {**extra, "softcap": 2.5}, "none", backend,
                            REL_TOL[torch.float32])


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
    inputs = make_inputs(7, 16, 131, ref_h=40, weighted=True, device=device_for(backend))
    check_against_reference(*inputs, "sum", backend, REL_TOL[torch.float32])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shared", [False, True])
def test_policy_close_to_reference(backend, shared):
    """KL near 0 (~1e-4 here) is where cancellation shows: fp32 log-probabilities of size ~5 carry ~1e-6 of
    absolute error, so the KL is held to that absolute bound. Its gradient q - p is ~1e-2 of q and p, each
    carrying ~1e-6 relative error from its fp32 logsumexp: ~1e-4 relative error in q - p, held to 1e-3."""
    hidden, weight, ref_hidden, ref_weight, _ = make_inputs(13, 24, 131, shared=shared, closeness=1e-2,
                                                            device=device_for(backend))
    out = fastalign.linear_kl_div(hidden, weight, ref_hidden, ref_weight, reduction="none", backend=backend)
    ref = linear_kl_div_reference(hidden, weight, ref_hidden, ref_weight, reduction="none")
    assert ref.max() > 1e-5 and (out - ref).abs().max() <= 2e-6
    seed = torch.randn(out.shape, device=out.device)
    for name, got, want in zip(["d_hidden", "d_weight"], grads_of(out, [hidden, weight], seed),
                               grads_of(ref, [hidden, weight], seed)):
        assert_rel_close(name, got, want, 1e-3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_identical_distributions_give_zero(backend):
    hidden, weight, _, _, _ = make_inputs(6, 16, 37, device=device_for(backend))
    out = fastalign.linear_kl_div(hidden, weight, hidden.detach(), weight, reduction="none", backend=backend)
    assert out.abs().max() < 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_tokens_masked_gives_zero_loss_and_gradients(backend, reduction):
    hidden, weight, ref_hidden, ref_weight, extra = make_inputs(5, 16, 37, weighted=True, masked=1.0,
                                                                device=device_for(backend))
    out = fastalign.linear_kl_div(hidden, weight, ref_hidden, ref_weight, reduction=reduction, backend=backend,
                                  **extra)
    assert torch.all(out == 0)
    for grad in grads_of(out, [hidden, weight], torch.ones_like(out)):
        assert torch.all(grad == 0)


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
    backward runs inside the autocast region too (the torch path rounded logits to bf16 and then crashed)."""
    hidden, weight, ref_hidden, ref_weight, extra = make_inputs(13, 24, 131, shared=shared, weighted=True,
                                                                device=device_for(backend))
    with torch.autocast(hidden.device.type, dtype=torch.bfloat16):
        check_against_reference(hidden, weight, ref_hidden, ref_weight, extra, "sum", backend,
                                REL_TOL[torch.float32])


@pytest.mark.parametrize("backend", BACKENDS)
def test_double_backward_is_refused_by_name(backend):
    hidden, weight, ref_hidden, ref_weight, extra = make_inputs(6, 16, 37, shared=True, device=device_for(backend))
    for inputs in ([hidden, weight], [hidden]):
        out = fastalign.linear_kl_div(hidden, weight, ref_hidden, ref_weight, backend=backend, **extra)
        with pytest.raises(RuntimeError, match="linear_kl_div is not twice differentiable"):
            torch.autograd.grad(out, inputs, create_graph=True)


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
    seed = torch.randn(out.shape, device=out.device)
    for name, got, want in zip(["d_hidden", "d_weight"], grads_of(out, [hidden, weight], seed),
                               grads_of(ref, [hidden, weight], seed)):
        assert_rel_close(name, got, want, REL_TOL[torch.float32])


def test_torch_backend_across_chunk_boundaries(monkeypatch):
    monkeypatch.setattr(chunking, "CHUNK_BYTES", 3 * 4 * 2 * 131)  # 3 rows of both heads' logits per chunk
    inputs = make_inputs(14, 24, 131, weighted=True)
    check_against_reference(*inputs, "sum", "torch", REL_TOL[torch.float32])


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradients_nobody_needs_are_not_computed(backend):
    """Hidden states of a frozen backbone get no G @ W product in backward (a third of its matmul work) and the
    weight's gradient stays exact; a reference that requires grad alone costs no backward work and gets none."""
    hidden, weight, ref_hidden, ref_weight, extra = make_inputs(13, 24, 131, weighted=True,
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

    ref_hidden.requires_grad_()
    out = fastalign.linear_kl_div(hidden, weight.detach(), ref_hidden, ref_weight, backend=backend, **extra)
    with FlopCounterMode(display=False) as counter:
        assert grads_of(out, [ref_hidden], torch.ones_like(out)) == (None,)
    assert counter.get_total_flops() == 0


def test_gradcheck_float64():
    hidden, weight, ref_hidden, ref_weight, extra = make_inputs(4, 5, 7, dtype=torch.float64, weighted=True)

    def loss(h, w):
        return fastalign.linear_kl_div(h, w, ref_hidden, ref_weight, reduction="none", backend="torch", **extra)

    assert torch.autograd.gradcheck(loss, (hidden, weight))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_torch_backend_accumulates_half_precision_in_fp32(dtype):
    """Exactly representable half-precision inputs: the fp32 KL is within fp32 rounding of the float64 reference."""
    hidden, weight, ref_hidden, ref_weight, extra = make_inputs(13, 24, 131, dtype=dtype, weighted=True)
    out = fastalign.linear_kl_div(hidden, weight, ref_hidden, ref_weight, reduction="none", backend="torch", **extra)
    ref = linear_kl_div_reference(hidden, weight, ref_hidden, ref_weight, reduction="none", **extra)
    assert out.dtype == torch.float32
    assert_rel_close("kl", out, ref, 1e-5)


def test_triton_backend_refuses_float64():
    hidden, weight, ref_hidden, ref_weight, _ = make_inputs(6, 16, 37, dtype=torch.float64)
    with pytest.raises(TypeError, match="hidden is float64, which the Triton backend does not support"):
        fastalign.linear_kl_div(hidden, weight, ref_hidden, ref_weight, backend="triton")


@pytest.mark.parametrize("shape", triton_cases(SHAPES, gpu_only=[(300, 64, 5000)]))
@pytest.mark.parametrize("shared", [False, True])
def test_matches_reference_bf16_on_the_triton_backend(shape, shared):
    inputs = make_inputs(*shape, dtype=torch.bfloat16, device=TRITON_DEVICE, shared=shared, weighted=True)
    check_against_reference(*inputs, "mean", "triton", REL_TOL[torch.bfloat16])


@pytest.mark.parametrize("change,message", [
    (lambda a: {**a, "ref_hidden": a["ref_hidden"][:-1]}, "ref_hidden must have 6 rows"),
    (lambda a: {**a, "ref_weight": a["ref_weight"][:-1]}, "ref_weight must have the vocabulary size"),
    (lambda a: {**a, "ref_weight": a["ref_weight"][:, :-1]}, "ref_weight must be \\[V, H\\]"),
    (lambda a: {**a, "weight": a["weight"].double()}, "weight must have the dtype of hidden"),
    (lambda a: {**a, "mask": torch.ones(6)}, "mask must have dtype"),
    (lambda a: {**a, "mask": torch.ones(5, dtype=torch.bool)}, "mask must have shape \\[6\\]"),
    (lambda a: {**a, "token_weight": torch.ones(7)}, "token_weight must have shape \\[6\\]"),
    (lambda a: {**a, "reduction": "batchmean"}, "reduction must be one of"),
    (lambda a: {**a, "softcap": -30.0}, "softcap must be None or a positive finite number .* got -30.0"),
    (lambda a: {**a, "weight": a["weight"][:0], "ref_weight": a["ref_weight"][:0]}, "weight must have at least one row"),
])
def test_bad_input_is_named(change, message):
    hidden, weight, ref_hidden, ref_weight, _ = make_inputs(6, 16, 37)
    args = change({"hidden": hidden, "weight": weight, "ref_hidden": ref_hidden, "ref_weight": ref_weight})
    with pytest.raises((ValueError, TypeError), match=message):
        fastalign.linear_kl_div(**args)
