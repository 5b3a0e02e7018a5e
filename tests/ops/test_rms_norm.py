"""fastalign.rms_norm against its float64 reference and against Hugging Face's modules, on every backend: forward and
backward for each family's weight rule at odd shapes (a width no block divides, one token, no token, 3-D), the
weight's gradient alone, what it keeps for the backward, and its errors."""
import pytest
import torch
from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
from transformers.models.llama.modeling_llama import LlamaRMSNorm
from transformers.models.olmo2.modeling_olmo2 import Olmo2RMSNorm

import fastalign
from fastalign.ops.rms_norm import WEIGHT_RULES
from fastalign.reference.rms_norm import rms_norm as rms_norm_reference
from tests.compare import (REL_TOL, assert_a_compiled_caller_close, assert_grads_close, assert_only_first_order,
                           assert_rel_close, assert_vjp_and_jacrev_close, grads_of)
from tests.conftest import device_for, triton_cases
from tests.saved_tensors import saved_bytes

BACKENDS = ["torch", "triton"]
MODULES = {"rounded": LlamaRMSNorm, "one plus": GemmaRMSNorm, "fp32": Olmo2RMSNorm}
SHAPES = [(7, 37), (1, 5), (2, 3, 130), (0, 8)]


def make_inputs(shape, *, dtype=torch.float32, device="cpu", seed=0):
    torch.manual_seed(seed)
    x = 3 * torch.randn(shape)
    weight = 0.5 + 0.5 * torch.randn(shape[-1])
    return [t.to(device, dtype).requires_grad_() for t in (x, weight)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rule", list(WEIGHT_RULES))
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_the_float64_reference(backend, rule, shape):
    x, weight = make_inputs(shape, device=device_for(backend))
    out = fastalign.rms_norm(x, weight, 1e-5, rule=rule, backend=backend)
    ref = rms_norm_reference(x, weight, 1e-5, rule=rule)
    assert out.dtype == torch.float32 and out.shape == x.shape
    assert_rel_close("out", out, ref, REL_TOL[torch.float32])
    assert_grads_close(("x", "weight"), out, ref, (x, weight), REL_TOL[torch.float32])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("backend", triton_cases(["triton"]) + ["torch"])
@pytest.mark.parametrize("rule", list(WEIGHT_RULES))
def test_16_bit_inputs_match_the_modules(dtype, backend, rule):
    """In 16-bit dtypes, against the module of the rule's family and its autograd (the numbers a model gives without
    the op), within the dtype's tolerance; the torch path's forward is the module's to the bit, and the input's
    gradient on both paths all but to the bit, the roundings of each rule included (the Llama rule rounds the
    gradient times the weight to the dtype: left out, 30% of the entries differ; the weight's gradient, a sum over
    the rows, is rounded once by the op and at each partial sum by autograd)."""
    x, weight = make_inputs((9, 300), dtype=dtype, device=device_for(backend))
    module = MODULES[rule](300, eps=1e-5).to(x.device, dtype)
    with torch.no_grad():
        module.weight.copy_(weight - (1 if rule == "one plus" else 0))
    out = fastalign.rms_norm(x, module.weight, 1e-5, rule=rule, backend=backend)
    expected = module(x)
    if backend == "torch":
        assert torch.equal(out, expected)
    assert out.dtype == dtype
    assert_rel_close("out", out, expected, REL_TOL[dtype])
    seed = torch.randn(out.shape, device=out.device)
    for name, got, want in zip(("x", "weight"), grads_of(out, (x, module.weight), seed),
                               grads_of(expected, (x, module.weight), seed)):
        assert got.dtype == want.dtype
        assert_rel_close(name, got, want, REL_TOL[dtype])
        if name == "x":
            assert (got != want).float().mean() <= 0.02, "more than a reduction order's 1-ulp differences"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("wanted", [(0,), (1,)])
def test_each_gradient_alone(backend, wanted):
    inputs = make_inputs((5, 40), device=device_for(backend))
    inputs = [t.detach().requires_grad_(k in wanted) for k, t in enumerate(inputs)]
    out = fastalign.rms_norm(*inputs, backend=backend)
    ref = rms_norm_reference(*inputs)
    seed = torch.randn(out.shape, device=out.device)
    live = [inputs[k] for k in wanted]
    for got, want in zip(grads_of(out, live, seed), grads_of(ref, live, seed)):
        assert_rel_close("grad", got, want, REL_TOL[torch.float32])


@pytest.mark.parametrize("backend", BACKENDS)
def test_keeps_its_input_only(backend):
    """What autograd holds for the backward: x and the weight (2 bytes a value), where the module holds an fp32 copy
    of x and the rounded normalised rows (6). The test can fail: it counts the module's too."""
    x, weight = make_inputs((6, 50), dtype=torch.bfloat16, device=device_for(backend))
    module = LlamaRMSNorm(50).to(x.device, torch.bfloat16)
    _, fused = saved_bytes(lambda: fastalign.rms_norm(x, weight, backend=backend))
    assert fused == (x.numel() + weight.numel()) * 2
    assert saved_bytes(lambda: module(x))[1] >= fused + x.numel() * (4 + 2 - 2)


def test_the_triton_backend_refuses_float64():
    x, weight = make_inputs((2, 8), dtype=torch.float64, device=device_for("triton"))
    with pytest.raises(TypeError, match="x is float64"):
        fastalign.rms_norm(x, weight, backend="triton")


@pytest.mark.parametrize("change, error, message", [
    (lambda x, w: (x, w[:-1]), ValueError, r"weight must be \[D\] with D = x.shape\[-1\] = 8, got shape \(7,\)"),
    (lambda x, w: (x, w[None]), ValueError, "weight must have 1 dimension"),
    (lambda x, w: (x, w.double()), TypeError, r"weight must have x's dtype \(torch.float32\) under rule 'rounded'"),
    (lambda x, w: (x, w.to("meta")), ValueError, r"weight must be on x's device \(cpu\), got meta"),
    (lambda x, w: (x[0], w), ValueError, "x must have at least 2 dimensions"),
    (lambda x, w: (x.long(), w), TypeError, "x must have dtype in"),
    (lambda x, w: ("x", w), TypeError, "x must be a torch.Tensor"),
])
def test_bad_input_is_named(change, error, message):
    x, weight = change(*(t.detach() for t in make_inputs((3, 8))))
    with pytest.raises(error, match=message):
        fastalign.rms_norm(x, weight, backend="torch")


def test_bad_rule_and_eps_are_named():
    x, weight = make_inputs((3, 8))
    with pytest.raises(ValueError, match=r"rule must be one of \('rounded', 'one plus', 'fp32'\), got 'gemma'"):
        fastalign.rms_norm(x, weight, rule="gemma")
    for eps in (-1, float("nan"), float("inf"), 10 ** 400, True, "1e-6"):   # an infinite eps gave rows of zeros
        with pytest.raises(ValueError, match=f"eps must be a finite number >= 0, got {eps!r}"):
            fastalign.rms_norm(x, weight, eps)
    # other rules take a weight of another dtype, as OLMo 2's and Gemma's modules do
    assert fastalign.rms_norm(x, weight.double(), rule="fp32").dtype == torch.float32
    assert_rel_close("eps 0", fastalign.rms_norm(x, weight, 0), rms_norm_reference(x, weight, 0),   # 0 is fine
                     REL_TOL[torch.float32])


@pytest.mark.parametrize("rule", list(WEIGHT_RULES))
def test_a_weight_of_no_floating_dtype_is_refused_under_every_rule(rule):
    """An int or bool weight is refused by name; the rules that take a weight of another dtype computed with it."""
    x, weight = (t.detach() for t in make_inputs((3, 8)))
    for bad in (weight.long(), weight > 0):
        with pytest.raises(TypeError, match="^weight must have dtype in"):
            fastalign.rms_norm(x, bad, rule=rule, backend="torch")


def test_the_default_eps_is_the_llama_modules():
    """eps defaults to 1e-6, LlamaRMSNorm's; rows of small values (mean square ~1e-6) show another default."""
    x, weight = (t.detach() for t in make_inputs((4, 16)))
    x = 1e-3 * x
    expected = LlamaRMSNorm(16).eval()
    with torch.no_grad():
        expected.weight.copy_(weight)
    assert expected.variance_epsilon == 1e-6
    assert torch.equal(fastalign.rms_norm(x, weight, backend="torch"), expected(x).detach())


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_second_derivative_raises_by_name(backend):
    """A gradient penalty differentiated by torch.autograd.grad wrt the inputs raises too: @once_differentiable's
    error node hung off detached copies, which autograd pruned, and silently dropped the penalty's term."""
    x, weight = make_inputs((3, 8), device=device_for(backend))
    loss = fastalign.rms_norm(x, weight, backend=backend).pow(2).sum()
    grad_x, = torch.autograd.grad(loss, x, create_graph=True)
    for differentiate in (lambda: torch.autograd.grad(loss + grad_x.sum(), weight), lambda: grad_x.sum().backward()):
        with pytest.raises(RuntimeError, match="rms_norm is not twice differentiable"):
            differentiate()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rule", list(WEIGHT_RULES))
def test_under_torch_func(backend, rule):
    """torch.func's vjp and jacrev wrt x and weight, and vmap(grad) of per-sample losses, match the float64
    reference; second derivatives and forward mode raise by name. The Function had forward(ctx, ...) and no
    setup_context, which torch.func refuses: fused_layers failed under torch.func.grad where the modules run."""
    x, weight = (t.detach() for t in make_inputs((3, 8), device=device_for(backend)))

    def op(x, weight):
        return fastalign.rms_norm(x, weight, rule=rule, backend=backend)

    assert_vjp_and_jacrev_close(["x", "weight"], op, lambda *t: rms_norm_reference(*t, rule=rule), (x, weight),
                                REL_TOL[torch.float32])
    batch = torch.randn(2, 3, 8, device=x.device)
    grads = torch.func.vmap(torch.func.grad(lambda x, w: op(x, w).square().sum(), argnums=(0, 1)),
                            in_dims=(0, None))(batch, weight)
    for i in range(2):
        inputs = (batch[i].clone().requires_grad_(), weight.clone().requires_grad_())
        expected = torch.autograd.grad(rms_norm_reference(*inputs, rule=rule).square().sum(), inputs)
        for name, got, want in zip(["x", "weight"], grads, expected):
            assert_rel_close(f"{name} {i}", got[i], want, REL_TOL[torch.float32])
    assert_only_first_order("rms_norm", lambda x: op(x, weight).square().sum(), x)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("backend", triton_cases(["triton"]) + ["torch"])
@pytest.mark.parametrize("rule", list(WEIGHT_RULES))
def test_the_weight_gradient_of_one_row_rounds_the_normalised_row_as_the_module(dtype, backend, rule):
    """Under the "rounded" rule the module's weight gradient is grad_out times the normalised row rounded to the
    dtype (under the others, times the fp32 row); of one row (no sum over rows to round otherwise) the op's equals it
    but for a reduction order's few 1-ulp differences (the torch path's to the bit). Times the row rounded the other
    way, a quarter of the entries differ."""
    x, weight = make_inputs((1, 300), dtype=dtype, device=device_for(backend))
    module = MODULES[rule](300, eps=1e-5).to(x.device, dtype)
    with torch.no_grad():
        module.weight.copy_(weight)
    seed = torch.randn(1, 300, device=x.device)
    got, = grads_of(fastalign.rms_norm(x, module.weight, 1e-5, rule=rule, backend=backend), (module.weight,), seed)
    want, = grads_of(module(x), (module.weight,), seed)
    assert got.dtype == want.dtype == dtype
    if backend == "torch":
        assert torch.equal(got, want)
    assert (got != want).float().mean() <= 0.02


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_input_strided_in_its_last_dimension(backend):
    """x a transpose (its last dimension strided): the Triton kernel reads a row's entries as contiguous ones, so the
    op hands it a contiguous copy; forward and gradients as the reference on both backends."""
    torch.manual_seed(0)
    x = (3 * torch.randn(40, 6, device=device_for(backend))).t().requires_grad_()
    weight = (0.5 + 0.5 * torch.randn(40, device=x.device)).requires_grad_()
    assert x.stride(-1) != 1
    out = fastalign.rms_norm(x, weight, 1e-5, rule="one plus", backend=backend)
    ref = rms_norm_reference(x, weight, 1e-5, rule="one plus")
    assert_rel_close("out", out, ref, REL_TOL[torch.float32])
    assert_grads_close(("x", "weight"), out, ref, (x, weight), REL_TOL[torch.float32])


def test_float64_inputs_are_computed_in_float64_on_the_torch_path():
    """The torch path takes float64 (the Triton one refuses it): computed in fp32, out and gradients would be off
    the float64 reference by ~1e-7."""
    x, weight = make_inputs((5, 33), dtype=torch.float64)
    out = fastalign.rms_norm(x, weight, 1e-5, rule="fp32", backend="torch")
    ref = rms_norm_reference(x, weight, 1e-5, rule="fp32")
    assert out.dtype == torch.float64
    assert_rel_close("out", out, ref, REL_TOL[torch.float64])
    assert_grads_close(("x", "weight"), out, ref, (x, weight), REL_TOL[torch.float64])


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_gradient_of_a_sum_of_the_outputs(backend):
    """out.sum()'s backward hands the op an expanded gradient (one value, stride 0): the Triton kernel reads rows of
    the gradient as contiguous ones, so the op hands it a contiguous copy; gradients as the reference's."""
    x, weight = make_inputs((5, 37), device=device_for(backend))
    out = fastalign.rms_norm(x, weight, 1e-5, rule="one plus", backend=backend)
    ref = rms_norm_reference(x, weight, 1e-5, rule="one plus")
    got = torch.autograd.grad(out.sum(), (x, weight))
    for name, actual, want in zip(("x", "weight"), got, torch.autograd.grad(ref.sum(), (x, weight))):
        assert_rel_close(name, actual, want, REL_TOL[torch.float32])


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_compiled_caller(backend):
    """torch.compile of a caller of rms_norm on the Triton backend traced into the kernel launches and failed under
    Triton's interpreter (KeyError torch.uint64), where the fused losses break the graph for that reason: its Triton
    path (forward and backward) runs outside the graph now, the torch backend's stays for dynamo to trace."""
    x, weight = make_inputs((4, 37), device=device_for(backend))
    assert_a_compiled_caller_close(lambda x, w: fastalign.rms_norm(x, w, 1e-5, backend=backend).square().sum(),
                                   lambda x, w: rms_norm_reference(x, w, 1e-5).square().sum(), [x, weight],
                                   REL_TOL[torch.float32])


def test_a_compiled_caller_traces_the_torch_backend(monkeypatch):
    """Only the Triton path runs outside a compiled caller's graphs: dynamo traces the torch backend's launcher."""
    from fastalign.ops.torch_chunked import rms_norm as launcher
    compiling = []

    def recording_forward(*args, **kwargs):
        compiling.append(torch.compiler.is_compiling())
        return forward(*args, **kwargs)
    forward = launcher.forward
    monkeypatch.setattr(launcher, "forward", recording_forward)
    torch._dynamo.reset()
    x, weight = make_inputs((4, 37))
    torch.compile(lambda x, w: fastalign.rms_norm(x, w, backend="torch").sum(), backend="eager")(x, weight)
    assert compiling and all(compiling)


def test_a_module_eps_compiles_in_one_graph_with_dynamic_shapes():
    """rms_norm(x, self.weight, self.variance_epsilon) as the README calls it, compiled with dynamic=True and
    fullgraph=True (a compiled HF Llama within fused_layers): dynamo made the float eps a SymFloat, and the check of
    eps (math.isfinite) failed the trace (a graph break, refused by fullgraph=True). It is not checked in dynamo's
    trace."""
    class Norm(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.randn(8))
            self.variance_epsilon = 1e-5

        def forward(self, x):
            return fastalign.rms_norm(x, self.weight, self.variance_epsilon, backend="torch")

    torch._dynamo.reset()
    norm = Norm()
    compiled = torch.compile(norm, backend="eager", dynamic=True, fullgraph=True)
    for rows in (3, 5):
        x = torch.randn(rows, 8)
        assert torch.equal(compiled(x), norm(x))
