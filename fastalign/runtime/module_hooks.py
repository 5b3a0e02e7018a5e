"""Whether a model's module can be stood in for by a fused kernel that computes its class's forward, or passed over by
a runner that calls its submodules instead of it."""
from torch.nn.modules import module as torch_module

from fastalign.own_forward import forward_is_its_own


def runs_more_than_its_forward(module):
    """Whether calling `module` runs more than its class's forward: accelerate's hook (offloading), a user's hooks
    (forward or backward: K-FAC and gradient capture put backward hooks on a projection), hooks set for every module
    (torch.nn.modules.module.register_module_forward_hook: profilers, activation loggers), or a forward set on the
    instance (not the class's forward bound to the module: own_forward). A kernel standing in for such a module would
    skip them."""
    return bool(hasattr(module, "_hf_hook") or module._forward_hooks or module._forward_pre_hooks
                or module._backward_hooks or module._backward_pre_hooks or not forward_is_its_own(module)
                or torch_module._global_forward_hooks or torch_module._global_forward_pre_hooks
                or torch_module._global_backward_hooks or torch_module._global_backward_pre_hooks)


# transformers' hooks that record the layers' and attentions' outputs for output_hidden_states / output_attentions
_OUTPUT_CAPTURING = "transformers.utils.output_capturing"


def runs_a_users_hooks(module):
    """Whether calling `module` runs forward hooks or pre-hooks that a user set (on it, or for every module: a steering
    vector added to a layer's output, a probe editing the residual stream) or a forward set on the instance (not its
    class's own bound to it): what a runner that calls the module's submodules instead of it would skip. Not
    accelerate's hook, which on a model of one device (model_devices) only brings the inputs and the module's own
    weights there (a layer, an attention or a decoder holds none), nor transformers' output-capturing hooks
    (installed on the layers and attentions by a forward with output_hidden_states or output_attentions), which only
    record the outputs of such a forward."""
    hooks = [*module._forward_hooks.values(), *module._forward_pre_hooks.values(),
             *torch_module._global_forward_hooks.values(), *torch_module._global_forward_pre_hooks.values()]
    return (any(getattr(hook, "__module__", None) != _OUTPUT_CAPTURING for hook in hooks)
            or not (forward_is_its_own(module) or hasattr(module, "_hf_hook")))
