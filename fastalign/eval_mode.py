"""Running a module with dropout off and giving every submodule its own mode back afterwards."""
import contextlib

import torch


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module):
    """Runs the block with every module of `model` in eval mode (dropout off), then gives each module back
    the mode it had (a reference forward on a policy that trains must be deterministic). A model already in eval
    mode throughout, as in a search, is left as it is: one walk over its modules, no switching back and forth."""
    if not _any_training(model):
        yield model
        return
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, training in modes:
            module.training = training


def _any_training(model):
    """Whether any module of `model` is in training mode, found by a plain walk of the module tree that stops at
    the first. The runtime asks before every forward: `model.modules()` (prefixed names, a set of the modules seen)
    costs ~1 us a module, 4x this walk: ~0.2 ms a forward on a 16-layer Llama (215 modules), ~1.3 ms with LoRA on
    its 7 projections (1,337). A module reachable twice is visited twice, as `model.eval()` visits it."""
    stack = [model]
    while stack:
        module = stack.pop()
        if module is None:  # a submodule registered as None
            continue
        if module.training:
            return True
        stack.extend(module._modules.values())
    return False
