"""The optimizer's step taken inside the backward pass, one parameter at a time, as soon as its gradient is whole.

A step otherwise holds every parameter's gradient at once, from the backward to optimizer.step(): a model's worth of
memory at the step's peak (2.5 GiB for a 1B model in bf16, 16 GiB for an 8B one), beside the activations. Here each
parameter is updated by a hook that runs once its gradient has been accumulated, and its gradient is then dropped, so
at most the gradients the autograd engine is still summing exist at once. The update is the optimizer's own: its
step() runs while this parameter alone has a gradient (the others have none yet, or were stepped and dropped), so
AdamW's per-parameter arithmetic, state and learning rate are those of a step after the backward.

Valid only where one backward makes each gradient whole and nothing reads the gradients of several parameters
together: one process (DDP and FSDP reduce gradients across processes after this hook would have run), no gradient
accumulation, no clipping by the global norm. The trainer checks these before it uses this.
"""
from __future__ import annotations

import threading

import torch


def step_in_backward(optimizer: torch.optim.Optimizer) -> list:
    """Hooks every parameter `optimizer` updates so that the next backward passes step it and drop its gradient; every
    parameter must have no gradient when that backward starts (zero_grad(set_to_none=True)). Returns the hooks'
    handles (remove() each to undo).

    Each hook runs the optimizer's step() with its param_groups narrowed, for that call, to the parameter's own group
    holding that parameter alone: step() then reads one parameter, not all of them (a step over all, most without a
    gradient, in each of N hooks was N^2 reads of the groups per backward, host time a GPU waits for). Hooks of a backward that runs on several devices' threads
    take turns (the groups are narrowed in place)."""
    group_of = {p: group for group in optimizer.param_groups for p in group["params"] if p.requires_grad}
    turns = threading.Lock()

    def step_one(parameter):
        group = group_of[parameter]
        with turns:
            groups, params = optimizer.param_groups, group["params"]
            optimizer.param_groups, group["params"] = [group], [parameter]
            try:
                optimizer.step()
            finally:
                optimizer.param_groups, group["params"] = groups, params
        parameter.grad = None
    return [p.register_post_accumulate_grad_hook(step_one) for p in group_of]
