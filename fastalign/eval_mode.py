"""Running a module with dropout off and giving every submodule its own mode back afterwards."""
import contextlib

import torch


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module):
    """Runs the block with every module of `model` in eval mode (dropout off), then gives each module back
    the mode it had (a reference forward on a policy that trains must be deterministic)."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, training in modes:
            module.training = training
