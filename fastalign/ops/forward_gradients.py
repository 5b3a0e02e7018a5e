"""grads_in_forward=True of the fused losses: their gradients taken in the forward pass, scaled in the backward.

A "sum" or "mean" loss is a scalar whose gradient is linear in the upstream gradient g: the gradients for g = 1 can be
taken while the forward has the logits at hand, and the backward multiplies them by g. The launchers'
forward_with_gradients do this from whole logits rows (the Triton one from a library matmul's fp32 buffer), one
product with the weight fewer than a forward and a backward that recomputes the logits: for cross-entropy 6 N H V
multiply-adds counted twice instead of 8, for the KL 8 instead of 12. The price: a buffer of whole logits rows
(the Triton one's ~157 to ~188 MiB at a 128k vocabulary in bf16, against the few MiB of the default), the gradients
held from the forward to the backward, the work done even if no backward follows, and one backward per forward (the
gradients are scaled in place, so that no second [V, H] copy is made; a second backward raises).
"""
import sys

import torch
from torch._C._functorch import TransformType, maybe_get_level
from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters

from .backend import apply_function
from .func_transforms import LauncherGradients


def check_grads_in_forward(op, grads_in_forward):
    """TypeError unless grads_in_forward is True or False (the modules that pass it on to an op check it when
    given)."""
    if not isinstance(grads_in_forward, bool):
        raise TypeError(f"{op}: grads_in_forward must be True or False, got {grads_in_forward!r}")


_FROM_AUTOCAST = (" (float16 here from the enclosing float16 autocast, in which CausalLMLoss and CausalLMKLDiv take "
                  "the head's matmul as the model's lm_head would: use torch.autocast(dtype=torch.bfloat16) instead)")


def _float16_autocast(device):
    """Whether an enclosing autocast on `device`'s type computes matmuls in float16 (the fused ops run outside
    autocast; the modules that call them cast their inputs to its dtype)."""
    kind = device.type
    return (torch.amp.is_autocast_available(kind) and torch.is_autocast_enabled(kind)
            and torch.get_autocast_dtype(kind) == torch.float16)


def forward_gradient_needs(op, grads_in_forward, reduction, hidden, weight, bias):
    """(need_hidden, need_weight, need_bias) to take in the forward pass, or None for a forward alone: when
    grads_in_forward is off, grad mode is off or no input is differentiated. A ValueError for reduction 'none' in grad
    mode (under torch.no_grad() no gradient is taken, and per-token losses are computed as without grads_in_forward)
    and for float16 inputs."""
    check_grads_in_forward(op, grads_in_forward)
    if not grads_in_forward:
        return None
    if reduction == "none" and torch.is_grad_enabled():
        raise ValueError(f"{op}: grads_in_forward=True needs reduction 'sum' or 'mean' (a scalar loss, whose gradient "
                         "the backward only scales), got 'none'")
    if torch.float16 in (hidden.dtype, weight.dtype):
        raise ValueError(f"{op}: grads_in_forward=True needs hidden and weight in float32, bfloat16 or float64, got "
                         f"{hidden.dtype} and {weight.dtype}: the gradients it rounds before the upstream gradient "
                         "scales them overflow float16 (a sum over many tokens) or underflow it (a mean, then a loss "
                         "scaler's factor); use grads_in_forward=False, whose backward scales before it rounds"
                         + (_FROM_AUTOCAST if _float16_autocast(hidden.device) else ""))
    needs = (hidden.requires_grad, weight.requires_grad, bias is not None and bias.requires_grad)
    return needs if torch.is_grad_enabled() and any(needs) else None


def refuse_inference_tensors(op, forward_needs, named_inputs):
    """Where the backward will save the inputs (grad mode on, one of hidden, weight or bias differentiated, gradients
    not taken in the forward), a ValueError naming any of named_inputs, those it saves, made under
    torch.inference_mode(): autograd cannot save one, and failed deep in the op with a message that named none (a
    reference's hidden states are often made so). Per-token constants (token_weight, mask) are copied, never saved."""
    differentiable = [t for name, t in named_inputs if name in ("hidden", "weight", "bias") and t is not None]
    if forward_needs is not None or not torch.is_grad_enabled() or not any(t.requires_grad for t in differentiable):
        return
    for name, t in named_inputs:
        if t is not None and t.is_inference():
            raise ValueError(f"{op}: {name} was made under torch.inference_mode(), and autograd cannot save it for "
                             f"the backward: make it under torch.no_grad() instead, or pass {name}.clone()")


def refuse_second_backward(ctx, op):
    """Raises if the forward's gradients were taken already (see the module's docstring)."""
    if getattr(ctx, "forward_gradients_taken", False):
        raise RuntimeError(f"{op}(grads_in_forward=True) takes its gradients once, in the forward pass: its backward "
                           "can run once per forward (no retain_graph=True second backward, no second call of a "
                           "torch.func.vjp function); use grads_in_forward=False for that")


def compiled_autograd_key(ctx):
    """The fused losses' Function._compiled_autograd_key (compiled autograd's cache key of a node, taken at every
    backward before its graph runs, in the grad mode the backward was asked for: on only under create_graph=True). It
    records that grad mode on ctx for graph_of_gradients_asked, and keys on it: the backward differs with it."""
    ctx.create_graph = torch.is_grad_enabled()
    return ctx._autograd_function_id, int(ctx.create_graph)


def graph_of_gradients_asked(ctx):
    """Whether this backward records a graph of its gradients: grad mode (on under create_graph=True and torch.func's
    transforms). Under compiled autograd, the grad mode of its key (compiled_autograd_key): in its graph, a
    dynamo-traced Function's backward (rms_norm's, gated_linear's, a user's) ends by restoring the grad mode its
    forward was traced in, on, which the later nodes' backwards then ran in (torch 2.13)."""
    compiled_autograd = sys.modules.get("torch._dynamo.compiled_autograd")   # imported where it runs
    if getattr(compiled_autograd, "in_compiled_autograd_region", False):
        return getattr(ctx, "create_graph", torch.is_grad_enabled())   # (a torch that took no key: its grad mode)
    return torch.is_grad_enabled()


def refuse_graph_of_gradients(ctx, op, saved):
    """The gradients taken in the forward (`saved`) have no graph to the inputs, so where their own derivative may be
    taken it would come out silently zero: refused under create_graph=True (a gradient penalty) and where an outer
    grad transform differentiates this backward's result (nested torch.func.grad, grad of a vjp). torch.func runs
    every backward with grad mode on: its backward is told by the saved gradients' transform level (that of the grad
    it serves, or a level that has ended for vjp's and jacrev's function), and refused only under another grad level
    (or a forward-mode one) outside it."""
    if not graph_of_gradients_asked(ctx):
        return
    level = max(maybe_get_level(t) for t in saved if t is not None)   # -1 plain autograd, -2 a level that ended
    outer = [interpreter.level() for interpreter in retrieve_all_functorch_interpreters()
             if interpreter.key() in (TransformType.Grad, TransformType.Jvp)]
    if level == -1 or any(level == -2 or outer_level < level for outer_level in outer):
        raise RuntimeError(f"{op}(grads_in_forward=True) takes its gradients in the forward pass, without a graph: "
                           "they cannot be differentiated again, so its backward refuses create_graph=True and a "
                           "grad transform inside another (the fused losses are not twice differentiable; "
                           "grads_in_forward=False takes first-order gradients with create_graph=True)")


def scaled(grad_output, d_hidden, d_weight, d_bias):
    """The forward's gradients times the upstream gradient, in place: no second [V, H] copy of d_weight."""
    return tuple(None if g is None else g.mul_(grad_output) for g in (d_hidden, d_weight, d_bias))


def scaled_copies(grad_output, d_hidden, d_weight, d_bias):
    """scaled out of place: a batched backward (torch.func.vmap over a vjp, jacrev) scales the same gradients by
    each sample's upstream gradient (its result holds a copy a sample anyway)."""
    return tuple(None if g is None else g * grad_output for g in (d_hidden, d_weight, d_bias))


scaled.out_of_place = scaled_copies


def save_for_backward(ctx, forward_needs, inputs, output):
    """Marks the outputs after the loss non-differentiable and saves what the backward takes: the gradients taken in
    the forward (output's last three) when forward_needs asked for them (the inputs' memory may then go), else
    `inputs` and the statistics between the loss and them."""
    ctx.mark_non_differentiable(*[t for t in output[1:] if t is not None])
    ctx.forward_gradients = forward_needs is not None
    ctx.save_for_backward(*(output[-3:] if ctx.forward_gradients else (*inputs, *output[1:-3])))


def backward_gradients(ctx, op, gradients, grad_output):
    """(d_hidden, d_weight, d_bias) of a fused loss's backward: the forward's, scaled, or the launcher's backward run
    by gradients(*saved, grad_output, reduction, *options, launcher, *needs) (see func_transforms), options the
    loss's settings that its launchers take (ctx.options: the softcap, and the cross-entropy's label smoothing)."""
    if ctx.forward_gradients:
        refuse_second_backward(ctx, op)   # before saved_tensors, which refuses the gradients scaled in place
        saved = ctx.saved_tensors
        refuse_graph_of_gradients(ctx, op, saved)
        ctx.forward_gradients_taken = True
        return apply_function(LauncherGradients, op, scaled, grad_output, *saved)
    return apply_function(LauncherGradients, op, gradients, *ctx.saved_tensors, grad_output, ctx.reduction,
                          *ctx.options, ctx.launcher, *ctx.needs_input_grad[:3])
