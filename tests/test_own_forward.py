"""forward_is_its_own: a module's forward is its class's own unless something set another on the instance; the
class's forward bound to the module itself (what accelerate's remove_hook_from_module sets back) is its own."""
import functools

import pytest
import torch

from fastalign.own_forward import forward_is_its_own

accelerate = pytest.importorskip("accelerate")


def test_the_classs_forward_bound_to_the_module_is_its_own():
    """accelerate's remove_hook_from_module sets `forward` back on each module it unhooks, as the bound method it kept:
    read as a replaced forward, fuse_causal_lm_loss refused such a model, TreeRunner left it to a slower fallback and
    fused_layers passed over its modules."""
    module = torch.nn.Linear(2, 2)
    assert forward_is_its_own(module)
    accelerate.cpu_offload(module, execution_device=torch.device("cpu"))
    assert not forward_is_its_own(module)   # accelerate's hook
    accelerate.hooks.remove_hook_from_module(module)
    assert "forward" in vars(module) and forward_is_its_own(module)


@pytest.mark.parametrize("forward", [
    lambda module: torch.nn.Linear(2, 2).forward,             # another module's
    lambda module: functools.partial(type(module).forward, module),
    lambda module: torch.autocast("cpu")(module.forward),     # accelerate's prepare in mixed precision
    lambda module: torch.nn.Module.forward.__get__(module),   # a function other than its class's forward
])
def test_any_other_forward_set_on_the_instance_is_not_its_own(forward):
    module = torch.nn.Linear(2, 2)
    module.forward = forward(module)
    assert not forward_is_its_own(module)
