"""Which implementation backend="auto" picks: the Triton kernels for CUDA tensors, the chunked torch path elsewhere."""
import contextlib
import inspect
import sys

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import fastalign
import fastalign.ops.backend as backend_module
from fastalign.ops.backend import resolve_backend, select_backend
from tests.conftest import TRITON_DEVICE


@pytest.mark.parametrize("op", ["linear_cross_entropy", "linear_kl_div"])
def test_auto_picks_triton_on_cuda_and_torch_elsewhere(op):
    """Even where Triton's interpreter could run the kernels on CPU tensors (as in these tests), "auto" keeps them
    on the torch path: the interpreter is for testing the kernels, far too slow to train with."""
    assert select_backend(op, "auto", torch.device("cpu")).__name__ == f"fastalign.ops.torch_chunked.{op}"
    assert select_backend(op, "auto", torch.device("cuda")).__name__ == f"fastalign.kernels.{op}"


def _float64_inputs(op):
    """(function, args) of `op` on small float64 CPU tensors."""
    x = torch.randn(3, 8, dtype=torch.float64)
    w = torch.randn(5, 8, dtype=torch.float64)
    return {"linear_cross_entropy": (fastalign.linear_cross_entropy, (x, w, torch.tensor([0, 4, 2]))),
            "linear_kl_div": (fastalign.linear_kl_div, (x, w, x + 0.1, w)),
            "rms_norm": (fastalign.rms_norm, (x, torch.ones(8, dtype=torch.float64))),
            "gated_linear": (fastalign.gated_linear, (x, x + 1, w, torch.randn(5, dtype=torch.float64)))}[op]


@pytest.mark.parametrize("op", ["linear_cross_entropy", "linear_kl_div", "rms_norm", "gated_linear"])
def test_auto_keeps_float64_on_the_torch_path_on_cuda_too(op, monkeypatch):
    """The Triton kernels take no float64: "auto" on a CUDA float64 input (a model in float64 for gradient checks)
    raised the Triton launcher's TypeError where the same call on the CPU ran. Shown on CPU tensors with each op's
    backend resolved as for CUDA ones: the op runs, as backend="torch" does."""
    function, args = _float64_inputs(op)
    expected = function(*args, backend="torch")
    module = sys.modules[f"fastalign.ops.{op}"]
    as_on_cuda = module.select_backend
    monkeypatch.setattr(module, "select_backend", lambda name, backend, device, *dtype: as_on_cuda(
        name, backend, torch.device("cuda"), *dtype))
    torch.testing.assert_close(function(*args, backend="auto"), expected, rtol=0, atol=0)
    assert resolve_backend("auto", torch.device("cuda"), dtype=torch.bfloat16) == "triton"


def test_auto_resolves_to_torch_on_cpu_even_where_the_interpreter_runs_triton():
    """The one resolution of the ops' backend and of the TreeRunner's attention_backend."""
    assert backend_module.triton_interpreting()   # as the tests run (conftest)
    assert resolve_backend("auto", torch.device("cpu")) == "torch"
    assert resolve_backend("auto", torch.device("cuda")) == "triton"


@pytest.mark.parametrize("missing, message", [
    ("triton", "backend='triton' needs the triton package"),
    # a checkout on PYTHONPATH, with no install to map kernels/ as fastalign.kernels: it said to install triton
    ("fastalign.kernels.linear_cross_entropy", "backend='triton': cannot import fastalign.kernels.linear_cross_entropy "
                                               r".*install fastalign \(pip install -e . in a checkout\)")])
def test_a_triton_backend_that_cannot_be_imported_names_what_is_missing(missing, message, monkeypatch):
    monkeypatch.delitem(sys.modules, "fastalign.kernels.linear_cross_entropy", raising=False)
    monkeypatch.delitem(backend_module._triton_launchers, "linear_cross_entropy", raising=False)
    monkeypatch.setitem(sys.modules, missing, None)   # imported as None: an ImportError naming it
    with pytest.raises(ImportError, match=message):
        select_backend("linear_cross_entropy", "triton", torch.device("cuda"))


def _layer_op_call(op, backend, device="cpu"):
    """A caller of the layer op `op` on `backend`, and its input."""
    x, up, weight, norm_weight = (torch.randn(shape, device=device) for shape in ((2, 3, 8), (2, 3, 8), (4, 8), (8,)))
    calls = {"rms_norm": lambda x: fastalign.rms_norm(x, norm_weight, 1e-5, backend=backend),
             "gated_linear": lambda x: fastalign.gated_linear(x, up, weight, backend=backend),
             "gated_activation": lambda x: fastalign.gated_activation(x, up, backend=backend)}
    return calls[op], x


@pytest.mark.parametrize("op", ["rms_norm", "gated_linear", "gated_activation"])
def test_a_compiled_caller_of_a_layer_op_on_the_torch_backend_is_one_graph(op):
    """select_backend imported the launcher module at every call: dynamo cannot trace an import, so a compiled model
    broke its graph at every norm and MLP, and fullgraph=True (torch.export's strict mode too) refused the op, naming
    only importlib, where the README says dynamo traces the torch backend."""
    call, x = _layer_op_call(op, "torch")
    torch._dynamo.reset()
    explained = torch._dynamo.explain(call)(x)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
    assert torch.equal(torch.compile(call, backend="eager", fullgraph=True)(x), call(x))


@pytest.mark.parametrize("imported", [True, False], ids=["imported", "first-call"])
@pytest.mark.parametrize("op", ["rms_norm", "gated_linear", "gated_activation"])
def test_a_fullgraph_caller_of_a_layer_op_on_the_triton_backend_is_refused_with_the_reason(op, imported,
                                                                                             monkeypatch):
    """The Triton backend runs outside compiled graphs (README): fullgraph=True is refused saying so, whether its
    kernels were imported before or are by this call. The import in select_backend broke the graph first, naming
    only importlib."""
    call, x = _layer_op_call(op, "triton", TRITON_DEVICE)
    if imported:
        call(x)
    else:
        monkeypatch.setattr(backend_module, "_triton_launchers", {})
    torch._dynamo.reset()
    with pytest.raises(torch._dynamo.exc.Unsupported, match="Triton backend.* runs outside the compiled graph"):
        torch.compile(call, backend="eager", fullgraph=True)(x)


@pytest.mark.parametrize("op", ["rms_norm", "gated_linear", "gated_activation", "linear_cross_entropy",
                                "linear_kl_div"])
def test_meta_tensors_are_refused_naming_the_device(op):
    """Tensors on the meta device (a model built to trace shapes) failed inside with torch's "unsupported scalarType"
    (autocast on the meta device) or in a nonzero without a meta kernel, naming no argument nor the device."""
    x, weight, target = torch.ones(3, 8, device="meta"), torch.ones(5, 8, device="meta"), torch.zeros(
        3, dtype=torch.long, device="meta")
    calls = {"rms_norm": lambda: fastalign.rms_norm(x, torch.ones(8, device="meta")),
             "gated_linear": lambda: fastalign.gated_linear(x, x, weight),
             "gated_activation": lambda: fastalign.gated_activation(x, x),
             "linear_cross_entropy": lambda: fastalign.linear_cross_entropy(x, weight, target),
             "linear_kl_div": lambda: fastalign.linear_kl_div(x, weight, x, weight)}
    with pytest.raises(ValueError, match="fastalign's ops cannot run on tensors on the meta device"):
        calls[op]()


@pytest.mark.parametrize("op", ["linear_cross_entropy", "linear_kl_div"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_fake_tensors_are_refused_by_the_fused_losses_naming_the_op(op, reduction):
    """Under FakeTensorMode (torch.export, FLOP and memory estimators trace a step in it) the fused losses failed deep
    in TokenRows with torch's DynamicOutputShapeException on aten.nonzero, naming neither the op nor the cause: the
    rows they compute depend on values that fake tensors do not hold. Fake tensors used outside the mode too; the
    layer ops, whose shapes do not depend on values, still give theirs."""
    fake = FakeTensorMode()
    with fake:
        x, weight, target = torch.empty(2, 3, 8, requires_grad=True), torch.empty(11, 8), torch.zeros(
            2, 3, dtype=torch.long)
        assert fastalign.rms_norm(x, torch.ones(8), 1e-5, backend="torch").shape == (2, 3, 8)
    calls = {"linear_cross_entropy": lambda: fastalign.linear_cross_entropy(x, weight, target, reduction=reduction,
                                                                             backend="torch"),
             "linear_kl_div": lambda: fastalign.linear_kl_div(x, weight, x.detach(), weight, reduction=reduction,
                                                               backend="torch")}
    for mode in (fake, contextlib.nullcontext()):
        with mode, pytest.raises(ValueError, match=f"{op} cannot run on fake tensors"):
            calls[op]()


@pytest.mark.parametrize("op, shape", [("rms_norm", (2, 3, 8)), ("gated_linear", (2, 3, 4)),
                                       ("gated_activation", (2, 3, 8))])
def test_fake_tensors_are_refused_by_the_layer_ops_on_the_triton_backend_naming_the_op(op, shape):
    """Under FakeTensorMode the Triton backend failed deep inside torch ("Attempted to set the storage of a tensor on
    device meta", "Cannot access data pointer"), naming neither the op nor the cause, where the fused losses refuse
    by name. The torch backend, plain torch, gives the output's shape; fake tensors used outside the mode too."""
    fake = FakeTensorMode()
    with fake:
        on_torch, x = _layer_op_call(op, "torch")
        on_triton, x_for_triton = _layer_op_call(op, "triton", TRITON_DEVICE)
    for mode in (fake, contextlib.nullcontext()):
        with mode:
            assert on_torch(x).shape == shape
            with pytest.raises(ValueError, match=f"{op} on the Triton backend cannot run on fake tensors"):
                on_triton(x_for_triton)


@pytest.mark.parametrize("op", ["rms_norm", "linear_cross_entropy"])
def test_a_triton_launcher_is_imported_on_its_first_call_alone(op, monkeypatch):
    """select_backend imports an op's Triton launcher on its first call and reads it from its cache after (an import
    is a graph break for dynamo). Neither reading nor filling the cache, each call imported the kernels again, which
    no test saw: fullgraph=True is refused for the Triton backend either way, with the same reason."""
    monkeypatch.setattr(backend_module, "_triton_launchers", {})
    first = select_backend(op, "triton", torch.device("cuda"))
    assert first.__name__ == f"fastalign.kernels.{op}"

    def no_import(name, *args, **kwargs):
        raise AssertionError(f"imported {name} again")
    monkeypatch.setattr(backend_module.importlib, "import_module", no_import)
    assert select_backend(op, "triton", torch.device("cuda")) is first


def test_real_tensors_under_an_active_fake_mode_are_refused_naming_the_op():
    """The layer ops on the Triton backend refuse while FakeTensorMode is active, not only fake inputs: under a mode
    that allows real inputs (allow_non_fake_inputs) real tensors get fake outputs, and the op failed deep in torch
    ("Attempted to set the storage of a tensor on device meta")."""
    x, weight = torch.randn(2, 3, 8, device=TRITON_DEVICE), torch.ones(8, device=TRITON_DEVICE)
    with FakeTensorMode(allow_non_fake_inputs=True):
        with pytest.raises(ValueError, match="rms_norm on the Triton backend cannot run on fake tensors"):
            fastalign.rms_norm(x, weight, 1e-5, backend="triton")


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("op", ["rms_norm", "gated_linear", "gated_activation", "linear_cross_entropy",
                                "linear_kl_div"])
def test_an_op_binds_no_signature_per_call(op, backend, monkeypatch):
    """torch's Function.apply binds the arguments of a Function with a setup_context to its forward's signature
    (inspect.signature) at every call, to fill defaults that the ops' calls, which give every argument, leave none
    of: twice per op (its Function, then its backward's), half the Python calls of a layer op (an RMSNorm's forward
    and backward: 507 calls, 256 of them the binding). Results are the same Function's."""
    device = TRITON_DEVICE if backend == "triton" else "cpu"
    x, weight, target = (torch.randn(2, 3, 8, device=device, requires_grad=True), torch.randn(5, 8, device=device),
                         torch.randint(0, 5, (2, 3), device=device))
    calls = {"linear_cross_entropy": lambda x: fastalign.linear_cross_entropy(x, weight, target, backend=backend),
             "linear_kl_div": lambda x: fastalign.linear_kl_div(x, weight, torch.randn_like(x), weight,
                                                                backend=backend)}
    call = calls[op] if op in calls else _layer_op_call(op, backend, device)[0]
    call(x).sum().backward()   # the first call of a Function reads its signature once
    signatures = []
    monkeypatch.setattr(inspect, "signature", lambda *args, **kwargs: signatures.append(args))
    call(x).sum().backward()
    assert signatures == []


def test_a_function_whose_forward_has_defaults_gets_them():
    """apply_function binds no signature where forward has nothing to fill; one with defaults is bound as
    Function.apply binds it."""
    class Scaled(torch.autograd.Function):
        @staticmethod
        def forward(x, scale=3.0):
            return x * scale

        @staticmethod
        def setup_context(ctx, inputs, output):
            ctx.scale = inputs[1]

        @staticmethod
        def backward(ctx, grad):
            return grad * ctx.scale, None

    x = torch.randn(4, requires_grad=True)
    y = backend_module.apply_function(Scaled, x)
    y.sum().backward()
    assert torch.equal(y, x * 3.0) and torch.equal(x.grad, torch.full_like(x, 3.0))
