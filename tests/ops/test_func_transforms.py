"""The fused losses' vmap rule at its edge: an empty batch, where a loop over the samples has nothing to stack; and
torch.autograd's own batched backward (legacy vmap), which no vmap rule reaches; the layer ops' Functions (which refuse
forward mode) in a compiled caller's graph.

torch.func itself (grad, vjp, jacrev, vmap, second derivatives) is tested with each op, in test_linear_*.py."""
import pytest
import torch

import fastalign
from tests.conftest import device_for


@pytest.mark.parametrize("op", ["linear_cross_entropy", "linear_kl_div"])
def test_vmap_over_an_empty_batch_is_refused_by_name(op):
    weight, target = torch.randn(37, 16), torch.randint(0, 37, (0, 5))
    states = torch.randn(0, 5, 16)
    if op == "linear_cross_entropy":
        run = torch.func.vmap(lambda h, y: fastalign.linear_cross_entropy(h, weight, y, backend="torch"))
    else:
        run = torch.func.vmap(lambda h, r: fastalign.linear_kl_div(h, weight, r, weight, backend="torch"))
    with pytest.raises(ValueError, match=f"{op} under torch.func.vmap needs at least one sample, got a batch of 0"):
        run(states, target if op == "linear_cross_entropy" else states)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("op", ["linear_cross_entropy", "linear_kl_div"])
@pytest.mark.parametrize("batched_backward", [
    lambda f, h: torch.autograd.grad(f(h), h, torch.eye(5, device=h.device), is_grads_batched=True),
    lambda f, h: torch.autograd.functional.jacobian(f, h, vectorize=True)], ids=["is_grads_batched", "jacobian"])
def test_a_backward_batched_by_torch_autograd_is_refused_by_name(backend, op, batched_backward):
    """torch.autograd.grad(is_grads_batched=True) and torch.autograd.functional's vectorize=True batch the backward
    by torch's legacy vmap, which no vmap rule reaches: the launchers crashed deep inside (an in-place op on
    batched tensors; the Triton kernels' .item())."""
    device = device_for(backend)
    weight, target, states = torch.randn(37, 16, device=device), torch.randint(0, 37, (5,), device=device), \
        torch.randn(2, 5, 16, device=device)
    if op == "linear_cross_entropy":
        def per_token(h):
            return fastalign.linear_cross_entropy(h, weight, target, reduction="none", backend=backend)
    else:
        def per_token(h):
            return fastalign.linear_kl_div(h, weight, states[1], weight / 2, reduction="none", backend=backend)
    with pytest.raises(RuntimeError, match=f"{op}'s backward cannot run batched by torch.autograd's legacy vmap"):
        batched_backward(per_token, states[0].clone().requires_grad_())


def _layer_op_call(op):
    """A scalar of the layer op `op` on the torch backend, and its inputs, which record gradients."""
    torch.manual_seed(0)
    inputs = {"rms_norm": [torch.randn(2, 3, 8), torch.randn(8)],
              "gated_linear": [torch.randn(2, 3, 8), torch.randn(2, 3, 8), torch.randn(4, 8)],
              "gated_activation": [torch.randn(2, 3, 8), torch.randn(2, 3, 8)]}[op]
    calls = {"rms_norm": lambda x, w: fastalign.rms_norm(x, w, 1e-5, backend="torch").square().sum(),
             "gated_linear": lambda g, u, w: fastalign.gated_linear(g, u, w, backend="torch").square().sum(),
             "gated_activation": lambda g, u: fastalign.gated_activation(g, u, backend="torch").square().sum()}
    return calls[op], [t.requires_grad_() for t in inputs]


@pytest.mark.parametrize("op", ["rms_norm", "gated_linear", "gated_activation"])
def test_a_compiled_caller_that_records_gradients_holds_a_layer_op_in_one_graph(op):
    """Where gradients are recorded dynamo refuses a Function that defines a jvp (the ops' refusal of forward mode),
    and it passed LauncherGradients' forward its ctx as first argument: training a compiled model broke its graph
    at every norm and MLP, and fullgraph=True refused the ops. One graph now, with the op's value and gradients."""
    call, inputs = _layer_op_call(op)
    torch._dynamo.reset()
    explained = torch._dynamo.explain(call)(*inputs)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
    value = torch.compile(call, backend="eager", fullgraph=True)(*inputs)
    want = call(*inputs)
    assert torch.equal(value, want)
    for got, expected in zip(torch.autograd.grad(value, inputs), torch.autograd.grad(want, inputs)):
        torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("op", ["gated_linear", "gated_activation"])
def test_a_compiled_caller_passing_one_tensor_as_gate_and_up_holds_the_op_in_one_graph(op):
    """act(x) * x, the same tensor as gate and up, x recording gradients: dynamo refused the Function's apply given
    one tensor twice (duplicate tensor input), a graph break, an error under fullgraph=True. One graph now, with the
    eager value and the gradient of both uses."""
    weight = torch.randn(4, 8)
    calls = {"gated_linear": lambda x: fastalign.gated_linear(x, x, weight, backend="torch").square().sum(),
             "gated_activation": lambda x: fastalign.gated_activation(x, x, backend="torch").square().sum()}
    x = torch.randn(3, 8, requires_grad=True)
    torch._dynamo.reset()
    value = torch.compile(calls[op], backend="eager", fullgraph=True)(x)
    want = calls[op](x)
    assert torch.equal(value, want)
    torch.testing.assert_close(torch.autograd.grad(value, x), torch.autograd.grad(want, x))


def test_a_module_of_a_layer_op_exports_in_strict_mode():
    """torch.export's strict mode (dynamo) refused a module whose parameter records gradients for the same reason;
    the exported program gives the module's output."""
    class Norm(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.randn(8))

        def forward(self, x):
            return fastalign.rms_norm(x, self.weight, 1e-5, backend="torch")

    module, x = Norm(), torch.randn(2, 3, 8)
    exported = torch.export.export(module, (x,), strict=True)
    assert torch.equal(exported.module()(x), module(x))
