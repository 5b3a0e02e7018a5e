"""fastalign.gated_linear and fastalign.gated_activation against their float64 references and against the unfused
torch ops they stand for, on every backend: forward and backward at odd shapes (a width no block divides, one token,
no token, 3-D), each gradient alone, what they keep for the backward, and their errors."""
import pytest
import torch
import torch.nn.functional as F

import fastalign
from fastalign.reference.gated_linear import gated_activation as gated_activation_reference
from fastalign.reference.gated_linear import gated_linear as gated_linear_reference
from tests.compare import (REL_TOL, assert_a_compiled_caller_close, assert_grads_close, assert_only_first_order,
                           assert_rel_close, assert_vjp_and_jacrev_close, grads_of)
from tests.conftest import device_for, triton_cases
from tests.saved_tensors import saved_bytes

BACKENDS = ["torch", "triton"]
ACTIVATIONS = ["silu", "gelu_tanh"]
TORCH_ACTIVATIONS = {"silu": F.silu, "gelu_tanh": lambda x: F.gelu(x, approximate="tanh")}
SHAPES = [((7,), 37, 11), ((1,), 1, 1), ((2, 3), 130, 20), ((0,), 8, 5)]   # (tokens, I, O)
NAMES = ("gate", "up", "weight", "bias")


def make_inputs(tokens, i, o, *, dtype=torch.float32, device="cpu", bias=True, seed=0):
    torch.manual_seed(seed)
    gate, up = (2 * torch.randn(*tokens, i) for _ in range(2))
    weight = torch.randn(o, i) / i ** 0.5
    tensors = [gate, up, weight] + ([torch.randn(o)] if bias else [])
    return [t.to(device, dtype).requires_grad_() for t in tensors] + ([] if bias else [None])


def unfused(gate, up, weight, bias, activation):
    """What a Hugging Face gated MLP computes from its gate and up projections' outputs."""
    return F.linear(TORCH_ACTIVATIONS[activation](gate) * up, weight, bias)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("bias", [True, False])
def test_matches_the_float64_reference(backend, activation, shape, bias):
    inputs = make_inputs(*shape, device=device_for(backend), bias=bias)
    out = fastalign.gated_linear(*inputs, activation=activation, backend=backend)
    ref = gated_linear_reference(*inputs, activation=activation)
    assert out.dtype == torch.float32
    assert_rel_close("out", out, ref, REL_TOL[torch.float32])
    live = [t for t in inputs if t is not None]
    assert_grads_close(NAMES, out, ref, live, REL_TOL[torch.float32])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("backend", triton_cases(["triton"]) + ["torch"])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_16_bit_inputs_match_the_unfused_ops(dtype, backend, activation):
    """In 16-bit dtypes, against torch's unfused ops and their autograd (the numbers a model gives without the op),
    within the dtype's tolerance; the torch path gives them exactly."""
    inputs = make_inputs((9,), 300, 24, dtype=dtype, device=device_for(backend))
    out = fastalign.gated_linear(*inputs, activation=activation, backend=backend)
    expected = unfused(*inputs, activation)
    seed = torch.randn(out.shape, device=out.device)
    got, want = grads_of(out, inputs, seed), grads_of(expected, inputs, seed)
    if backend == "torch":
        assert torch.equal(out, expected) and all(torch.equal(g, w) for g, w in zip(got, want))
    assert out.dtype == dtype
    assert_rel_close("out", out, expected, REL_TOL[dtype])
    for name, g, w in zip(NAMES, got, want):
        assert g.dtype == dtype
        assert_rel_close(name, g, w, REL_TOL[dtype])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("wanted", [(0,), (1,), (2,), (3,), (0, 2)])
def test_each_gradient_alone(backend, activation, wanted):
    """Only the inputs that require grad get one (the weight's alone recomputes the product without the kernel of the
    backward, with the op's activation), and each is right."""
    inputs = make_inputs((5,), 40, 7, device=device_for(backend))
    inputs = [t.detach().requires_grad_(k in wanted) for k, t in enumerate(inputs)]
    out = fastalign.gated_linear(*inputs, activation=activation, backend=backend)
    ref = gated_linear_reference(*inputs, activation=activation)
    seed = torch.randn(out.shape, device=out.device)
    wanted_inputs = [inputs[k] for k in wanted]
    for k, got, want in zip(wanted, grads_of(out, wanted_inputs, seed), grads_of(ref, wanted_inputs, seed)):
        assert_rel_close(NAMES[k], got, want, REL_TOL[torch.float32])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["interleaved", "transposed"])
@pytest.mark.parametrize("frozen_inputs", [False, True])
def test_inputs_strided_in_their_last_dimension(backend, layout, frozen_inputs):
    """gate and up split from one interleaved gate_up projection (gate_up[..., ::2], gate_up[..., 1::2]), or taken as
    transposes: both ops, their outputs and every gradient (the weight's alone recomputes the product), as the
    reference. The Triton kernel once read such rows as contiguous ones."""
    device = device_for(backend)
    torch.manual_seed(0)
    if layout == "interleaved":
        gate_up = 2 * torch.randn(6, 2 * 37, device=device)
        gate, up = gate_up[:, ::2], gate_up[:, 1::2]
    else:
        gate, up = (2 * torch.randn(37, 6, device=device).t() for _ in range(2))
    assert gate.stride(-1) != 1 and up.stride(-1) != 1
    gate, up = gate.requires_grad_(not frozen_inputs), up.requires_grad_(not frozen_inputs)
    weight = (torch.randn(11, 37, device=device) / 37 ** 0.5).requires_grad_()
    out = fastalign.gated_linear(gate, up, weight, backend=backend)
    ref = gated_linear_reference(gate, up, weight)
    assert_rel_close("out", out, ref, REL_TOL[torch.float32])
    live = [weight] if frozen_inputs else [gate, up, weight]
    assert_grads_close(["weight"] if frozen_inputs else ["gate", "up", "weight"], out, ref, live,
                       REL_TOL[torch.float32])
    activated = fastalign.gated_activation(gate, up, backend=backend)
    assert_rel_close("act", activated, gated_activation_reference(gate, up), REL_TOL[torch.float32])


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_intermediate_width_of_zero(backend):
    """gate and up [3, 0]: an empty product and a down projection of zeros (plus the bias) on both backends; the
    Triton one failed reshaping 0 elements into [-1, 0]."""
    gate, up, weight, bias = make_inputs((3,), 0, 5, device=device_for(backend))
    assert fastalign.gated_activation(gate, up, backend=backend).shape == (3, 0)
    out = fastalign.gated_linear(gate, up, weight, bias, backend=backend)
    assert torch.equal(out, bias.detach().expand(3, 5))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("i, o", [(0, 5), (4, 0)])
def test_the_backward_of_a_zero_width_gives_torchs_gradients(backend, i, o):
    """An intermediate or output width of 0: the backward reshaped to [-1, 0] and raised torch's "cannot reshape
    tensor of 0 elements"; torch's ops give zero-sized gradients (or zeros, and the bias's)."""
    inputs = make_inputs((2, 3), i, o, device=device_for(backend))
    out = fastalign.gated_linear(*inputs, backend=backend)
    seed = torch.randn(out.shape, device=out.device)
    for name, got, want in zip(NAMES, grads_of(out, inputs, seed), grads_of(unfused(*inputs, "silu"), inputs, seed)):
        assert got.shape == want.shape and torch.equal(got, want), name


@pytest.mark.parametrize("backend", BACKENDS)
def test_keeps_gate_and_up_but_not_the_product(backend):
    """What autograd holds for the backward: gate, up and the weight, no [tokens x I] tensor besides; the unfused ops
    hold two more (act(gate) and the product). The test can fail: it counts the unfused ops' too."""
    gate, up, weight, bias = make_inputs((6,), 50, 8, device=device_for(backend))
    row_block = gate.numel() * gate.element_size()
    _, fused = saved_bytes(lambda: fastalign.gated_linear(gate, up, weight, bias, backend=backend))
    assert fused == 2 * row_block + weight.numel() * weight.element_size()
    assert saved_bytes(lambda: unfused(gate, up, weight, bias, "silu"))[1] >= fused + 2 * row_block


def test_an_enclosing_autocast_does_not_apply_inside():
    """Neither in the forward nor in the backward, when that runs under the autocast too: its matmul in bf16 gave
    gradients off the reference by ~4e-3."""
    inputs = make_inputs((4,), 16, 3)
    seed = torch.randn(4, 3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = fastalign.gated_linear(*inputs, backend="torch")
        grads = grads_of(out, inputs, seed)
    assert out.dtype == torch.float32
    ref = gated_linear_reference(*inputs)
    assert_rel_close("out", out, ref, REL_TOL[torch.float32])
    for name, got, want in zip(NAMES, grads, grads_of(ref, inputs, seed)):
        assert got.dtype == torch.float32
        assert_rel_close(name, got, want, REL_TOL[torch.float32])


def test_the_triton_backend_refuses_float64():
    inputs = make_inputs((2,), 8, 3, dtype=torch.float64, device=device_for("triton"))
    with pytest.raises(TypeError, match="gate is float64"):
        fastalign.gated_linear(*inputs, backend="triton")


@pytest.mark.parametrize("change, error, message", [
    (lambda g, u, w, b: (g, u[:, :-1], w, b), ValueError, r"up must have the shape of gate \(3, 8\)"),
    (lambda g, u, w, b: (g, u.half(), w, b), TypeError, "up must have the dtype of gate"),
    (lambda g, u, w, b: (g, u, w[:, :-1], b), ValueError, r"weight must be \[O, I\] with I = gate.shape\[-1\] = 8"),
    (lambda g, u, w, b: (g, u, w[0], b), ValueError, "weight must be"),
    (lambda g, u, w, b: (g, u, w, b[:-1]), ValueError, r"bias must be \[5\]"),
    (lambda g, u, w, b: (g, u, w.double(), b), TypeError, "weight must have the dtype of gate"),
    (lambda g, u, w, b: (g[0], u[0], w, b), ValueError, "gate must have at least 2 dimensions"),
    (lambda g, u, w, b: (g.long(), u, w, b), TypeError, "gate must have dtype in"),
    (lambda g, u, w, b: (g, u.to("meta"), w, b), ValueError, r"up must be on gate.s device \(cpu\), got meta"),
    (lambda g, u, w, b: (g, "up", w, b), TypeError, "up must be a torch.Tensor"),
    # None is allowed for the bias alone: a None up or weight was an AttributeError deep in the checks
    (lambda g, u, w, b: (g, None, w, b), TypeError, "up must be a torch.Tensor, got NoneType"),
    (lambda g, u, w, b: (g, u, None, b), TypeError, "weight must be a torch.Tensor, got NoneType"),
    # up [1, I] broadcasts against gate [3, I]: a silent wrong product without the shape check
    (lambda g, u, w, b: (g, u[:1], w, b), ValueError, r"up must have the shape of gate \(3, 8\), got \(1, 8\)"),
    # a meta weight gave uninitialised memory as the output, silently, without the device check on the weight
    (lambda g, u, w, b: (g, u, w.to("meta"), b), ValueError, r"^weight must be on gate.s device \(cpu\), got meta"),
    (lambda g, u, w, b: (g, u, w, b.to("meta")), ValueError, r"^bias must be on gate.s device \(cpu\), got meta"),
    (lambda g, u, w, b: (g, u, w[:, None].expand(5, 8, 8), b), ValueError,
     r"weight must be \[O, I\] with I = gate.shape\[-1\] = 8, got shape \(5, 8, 8\)"),
    (lambda g, u, w, b: (g, u, w, b[None]), ValueError, r"bias must be \[5\] .*, got shape \(1, 5\)"),
])
def test_bad_input_is_named(change, error, message):
    inputs = change(*(t.detach() for t in make_inputs((3,), 8, 5)))
    with pytest.raises(error, match=message):
        fastalign.gated_linear(*inputs, backend="torch")


def test_gated_activation_names_a_missing_up():
    with pytest.raises(TypeError, match="up must be a torch.Tensor, got NoneType"):
        fastalign.gated_activation(torch.randn(3, 8), None)


def test_an_unknown_activation_is_named():
    with pytest.raises(ValueError, match=r"activation must be one of \('silu', 'gelu_tanh'\), got 'relu'"):
        fastalign.gated_linear(*make_inputs((3,), 8, 5), activation="relu")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", ["gated_linear", "gated_activation"])
def test_a_second_derivative_raises_by_name(backend, op):
    """Of both ops (gated_activation's backward on the Triton path is a kernel that autograd cannot differentiate),
    a gradient penalty differentiated by torch.autograd.grad wrt the inputs too: @once_differentiable's error node
    hung off detached copies, which autograd pruned, and silently dropped the penalty's term."""
    gate, up, weight, bias = make_inputs((3,), 8, 5, device=device_for(backend))
    out = (fastalign.gated_linear(gate, up, weight, bias, backend=backend) if op == "gated_linear"
           else fastalign.gated_activation(gate, up, backend=backend))
    loss = out.pow(2).sum()
    grad, = torch.autograd.grad(loss, gate, create_graph=True)
    for differentiate in (lambda: torch.autograd.grad(loss + grad.sum(), up), lambda: grad.sum().backward()):
        with pytest.raises(RuntimeError, match=f"{op} is not twice differentiable"):
            differentiate()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_under_torch_func(backend, activation):
    """torch.func's vjp and jacrev of both ops wrt each input, and vmap(grad) of per-sample losses, match the float64
    references; second derivatives and forward mode raise by name. The Functions had forward(ctx, ...) and no
    setup_context, which torch.func refuses: fused_layers failed under torch.func.grad where the modules run."""
    gate, up, weight, bias = (t.detach() for t in make_inputs((3,), 6, 4, device=device_for(backend)))

    def op(gate, up, weight, bias):
        return fastalign.gated_linear(gate, up, weight, bias, activation=activation, backend=backend)

    def activation_op(gate, up):
        return fastalign.gated_activation(gate, up, activation=activation, backend=backend)

    assert_vjp_and_jacrev_close(NAMES, op, lambda *t: gated_linear_reference(*t, activation=activation),
                                (gate, up, weight, bias), REL_TOL[torch.float32])
    assert_vjp_and_jacrev_close(NAMES[:2], activation_op,
                                lambda *t: gated_activation_reference(*t, activation=activation), (gate, up),
                                REL_TOL[torch.float32])
    gates = torch.randn(2, 3, 6, device=gate.device)
    grads = torch.func.vmap(torch.func.grad(lambda g, w: op(g, up, w, bias).square().sum(), argnums=(0, 1)),
                            in_dims=(0, None))(gates, weight)
    for i in range(2):
        inputs = (gates[i].clone().requires_grad_(), weight.clone().requires_grad_())
        ref = gated_linear_reference(inputs[0], up, inputs[1], bias, activation=activation)
        for name, got, want in zip(["gate", "weight"], grads, torch.autograd.grad(ref.square().sum(), inputs)):
            assert_rel_close(f"{name} {i}", got[i], want, REL_TOL[torch.float32])
    assert_only_first_order("gated_linear", lambda g: op(g, up, weight, bias).square().sum(), gate)
    assert_only_first_order("gated_activation", lambda g: activation_op(g, up).square().sum(), gate)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("shape", SHAPES)
def test_the_activation_alone_matches_its_float64_reference(backend, activation, shape):
    gate, up, _, _ = make_inputs(*shape, device=device_for(backend))
    out = fastalign.gated_activation(gate, up, activation=activation, backend=backend)
    ref = gated_activation_reference(gate, up, activation=activation)
    assert out.dtype == torch.float32 and out.shape == gate.shape
    assert_rel_close("out", out, ref, REL_TOL[torch.float32])
    assert_grads_close(("gate", "up"), out, ref, (gate, up), REL_TOL[torch.float32])


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_activation_alone_keeps_gate_and_up(backend):
    """act(gate) is not kept (the unfused ops keep it), and on the torch path the numbers are the unfused ops'."""
    gate, up, _, _ = make_inputs((6,), 50, 8, dtype=torch.bfloat16, device=device_for(backend))
    out, held = saved_bytes(lambda: fastalign.gated_activation(gate, up, backend=backend))
    assert held == 2 * gate.numel() * gate.element_size()
    expected, unfused_held = saved_bytes(lambda: TORCH_ACTIVATIONS["silu"](gate) * up)
    assert unfused_held == 3 * gate.numel() * gate.element_size()
    if backend == "torch":
        seed = torch.randn_like(out)
        assert torch.equal(out, expected)
        assert all(torch.equal(a, b) for a, b in zip(grads_of(out, (gate, up), seed), grads_of(expected, (gate, up),
                                                                                             seed)))


def test_the_activation_alone_names_bad_input():
    gate, up, _, _ = (t.detach() for t in make_inputs((3,), 8, 5))
    with pytest.raises(ValueError, match=r"up must have the shape of gate \(3, 8\)"):
        fastalign.gated_activation(gate, up[:, :-1])
    with pytest.raises(ValueError, match=r"up must have the shape of gate \(3, 8\), got \(1, 8\)"):
        fastalign.gated_activation(gate, up[:1])   # broadcasts: a silent [3, 8] product without the check
    with pytest.raises(ValueError, match="activation must be one of"):
        fastalign.gated_activation(gate, up, activation="relu")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", ["gated_linear", "gated_activation"])
def test_a_compiled_caller(backend, op):
    """torch.compile of a caller of either op on the Triton backend traced into the kernel launches and failed under
    Triton's interpreter (KeyError torch.uint64), where the fused losses break the graph for that reason: their
    Triton path (forward and backward) runs outside the graph now, the torch backend's stays for dynamo to trace."""
    gate, up, weight, bias = make_inputs((4,), 37, 11, device=device_for(backend))
    if op == "gated_linear":
        assert_a_compiled_caller_close(lambda g, w: fastalign.gated_linear(g, up, w, bias, backend=backend).sum(),
                                       lambda g, w: gated_linear_reference(g, up, w, bias).sum(), [gate, weight],
                                       REL_TOL[torch.float32])
    else:
        assert_a_compiled_caller_close(lambda g, u: fastalign.gated_activation(g, u, backend=backend).sum(),
                                       lambda g, u: gated_activation_reference(g, u).sum(), [gate, up],
                                       REL_TOL[torch.float32])
