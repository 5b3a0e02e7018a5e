"""Whether a model's module can be stood in for by a fused kernel that computes its class's forward."""
from torch.nn.modules import module as torch_module


def runs_more_than_its_forward(module):
    """Whether calling `module` runs more than its class's forward: accelerate's hook (offloading), a user's hooks
    (forward or backward: K-FAC and gradient capture put backward hooks on a projection), hooks set for every module
    (torch.nn.modules.module.register_module_forward_hook: profilers, activation loggers), or a forward set on the
    instance. A kernel standing in for such a module would skip them."""
    return bool(hasattr(module, "_hf_hook") or module._forward_hooks or module._forward_pre_hooks
                or module._backward_hooks or module._backward_pre_hooks or "forward" in vars(module)
                or torch_module._global_forward_hooks or torch_module._global_forward_pre_hooks
                or torch_module._global_backward_hooks or torch_module._global_backward_pre_hooks)
