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
from torch.optim import optimizer as optimizer_module


def step_in_backward(optimizer: torch.optim.Optimizer) -> list:
    """Hooks every parameter `optimizer` updates so that the next backward passes step it and drop its gradient; every
    parameter must have no gradient when that backward starts (zero_grad(set_to_none=True)). Returns the hooks'
    handles (remove() each to undo).

    Each hook runs the optimizer's step() with its param_groups narrowed, for that call, to the parameter's own group
    holding that parameter alone: step() then reads one parameter, not all of them (a step over all, most without a
    gradient, in each of N hooks was N^2 reads of the groups per backward, host time a GPU waits for). Hooks of a
    backward that runs on several devices' threads take turns (the groups are narrowed in place). The step is run by
    run_step."""
    group_of = {p: group for group in optimizer.param_groups for p in group["params"] if p.requires_grad}
    turns = threading.Lock()

    def step_one(parameter):
        group = group_of[parameter]
        with turns:
            groups, params = optimizer.param_groups, group["params"]
            optimizer.param_groups, group["params"] = [group], [parameter]
            try:
                run_step(optimizer)
            finally:
                optimizer.param_groups, group["params"] = groups, params
        parameter.grad = None
    return [p.register_post_accumulate_grad_hook(step_one) for p in group_of]


def run_step(optimizer: torch.optim.Optimizer):
    """optimizer.step(), where nothing would see a difference as its class's step without the wrapper torch puts
    around every Optimizer's step (a record_function and the step hooks' loops: more host time than a one-parameter
    step, paid per parameter in the backward, 55 Python calls each): no step hook is registered (global or the
    optimizer's), no profiler runs, and step() is not replaced on the optimizer, except by an LR scheduler's wrapper,
    whose record of the call (_opt_called, read by its step()) is then kept. Elsewhere, or where torch lacks what is
    read here, optimizer.step() itself."""
    wrapped = type(optimizer).step
    own = vars(optimizer).get("step")
    scheduled = own is not None and getattr(own, "_wrapped_by_lr_sched", False) and getattr(
        own, "__wrapped__", None) is wrapped
    hooks = [getattr(optimizer_module, f"_global_optimizer_{when}_hooks", None) for when in ("pre", "post")] + [
        getattr(optimizer, f"_optimizer_step_{when}_hooks", None) for when in ("pre", "post")]
    if (not isinstance(optimizer, torch.optim.Optimizer) or not getattr(wrapped, "hooked", False)
            or not hasattr(wrapped, "__wrapped__") or (own is not None and not scheduled)
            or any(table is None or len(table) for table in hooks) or torch.autograd._profiler_enabled()):
        optimizer.step()
        return
    wrapped.__wrapped__(optimizer)
    if scheduled:
        optimizer._opt_called = True
