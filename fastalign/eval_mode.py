"""Running a module with dropout off and giving every submodule its own mode back afterwards."""
import contextlib

import torch


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module):
    """Runs the block with every module of `model` in eval mode (dropout off), then gives each module back
    the mode it had (a reference forward on a policy that trains must be deterministic). A model already in eval
    mode throughout, as in a search, is left as it is: one pass over its modules, no switching back and forth."""
    modes = [(module, module.training) for module in model.modules()]
    if not any(training for _, training in modes):
        yield model
        return
    model.eval()
    try:
        yield model
    finally:
        for module, training in modes:
            module.training = training
