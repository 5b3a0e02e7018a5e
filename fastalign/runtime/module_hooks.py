"""Whether a model's module can be stood in for by a fused kernel that computes its class's forward."""


def runs_more_than_its_forward(module):
    """Whether calling `module` runs more than its class's forward: accelerate's hook (offloading) or a user's hooks,
    or a forward set on the instance. A kernel standing in for such a module would skip them."""
    return bool(hasattr(module, "_hf_hook") or module._forward_hooks or module._forward_pre_hooks
                or "forward" in vars(module))
