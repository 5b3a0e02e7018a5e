"""compiler_disable: a function stays out of torch.compile's graphs as under torch.compiler.disable, though
torch._dynamo is imported only by its first call (tests/test_package.py: importing the fused ops loads no
torch._dynamo); also on a torch without the private torch._disable_dynamo, where torch.compiler.disable decorates."""
import pytest
import torch

from fastalign.ops.compiler_disable import compiler_disable

TRACED = []   # torch.compiler.is_compiling() inside the function: True had dynamo traced it


def traced_sum(x):
    TRACED.append(torch.compiler.is_compiling())
    return (x * x.sum().item()).sum()   # .item(): a graph break, were dynamo tracing it


@pytest.fixture(params=["deferred", "without_private_helper"])
def outside_graphs(request, monkeypatch):
    """traced_sum decorated by compiler_disable, with torch._disable_dynamo or on a torch that has none."""
    if request.param == "without_private_helper":
        monkeypatch.delattr(torch, "_disable_dynamo")
    return compiler_disable(reason="the test's function runs on its own")(traced_sum)


@pytest.mark.parametrize("differentiate", [False, True], ids=["call", "func_grad"])
def test_the_function_runs_outside_a_compiled_callers_graph(differentiate, outside_graphs):
    """Also under torch.func.grad in the compiled caller: a wrapper of fastalign's own that chose at each call what
    to run was traced there after the graph break, and dynamo failed on the functorch-wrapped tanh output."""
    def caller(h):
        def loss(h):
            return outside_graphs(torch.tanh(h))
        return torch.func.grad(loss)(h) if differentiate else loss(h)

    h = torch.randn(5, 3)
    TRACED.clear()
    got = torch.compile(caller, backend="eager")(h)
    assert TRACED == [False]
    torch.testing.assert_close(got, caller(h))


def test_a_fullgraph_caller_is_refused_with_the_reason(outside_graphs):
    caller = torch.compile(lambda h: outside_graphs(h) + 1, backend="eager", fullgraph=True)
    with pytest.raises(torch._dynamo.exc.Unsupported, match="the test's function runs on its own"):
        caller(torch.randn(4))
