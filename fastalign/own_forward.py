"""Whether a module's forward is its class's own, or was replaced on the instance (by a wrapper, a hook, a stand-in)."""
import torch


def forward_is_its_own(module: torch.nn.Module) -> bool:
    """Whether calling `module` reaches its class's forward directly: no forward set on the instance, or one that is
    the class's forward bound to the module itself, as accelerate's remove_hook_from_module leaves each module it
    unhooks (it sets back the bound method it kept). Not a wrapper (accelerate's hook or autocast, a user's lambda)."""
    forward = vars(module).get("forward")
    return forward is None or (getattr(forward, "__func__", None) is type(module).forward
                               and getattr(forward, "__self__", None) is module)
