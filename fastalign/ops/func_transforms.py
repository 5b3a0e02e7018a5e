"""The fused ops' autograd Functions (the losses, rms_norm, gated_linear, gated_activation) under torch.func (grad,
vjp, jacrev, vmap) and second derivatives.

The Functions take the form torch.func requires: a forward without ctx (a loss's returns, beside the loss, the
per-token statistics its backward needs: shapes fixed per token, never [N, V]), and a setup_context that saves
them with the inputs. Their backward runs as a Function of its own, LauncherGradients: under a transform its
launcher then sees plain tensors, and differentiating the gradients (create_graph=True, which torch.func uses
for every backward, then a second backward; or nested transforms) reaches its backward, which refuses by name
instead of returning a wrong answer. vmap runs the op once per sample; torch.autograd's legacy vmap (a batched
backward), which calls no vmap rule, is refused by name.
"""
from typing import Any, Callable

import torch

from .compiler_disable import compiler_disable


def vmap_by_loop(op, function, info, in_dims, args):
    """The (outputs, out_dims) of a vmap staticmethod of `function`: applied to each sample of the batched
    arguments (sliced at their in_dims; a tuple argument's in_dims are a tuple of Nones), tensor outputs (or the
    one output of a Function that returns a tensor) stacked along dim 0. A loop is exact whatever is batched (hidden
    states, targets, weights, upstream gradients); folding the samples into one call's token rows is not, since the
    launchers sum the weight's gradient over the rows."""
    if info.batch_size == 0:
        raise ValueError(f"{op} under torch.func.vmap needs at least one sample, got a batch of 0")
    samples = [function.apply(*(arg.select(dim, i) if isinstance(dim, int) else arg for arg, dim in zip(args, in_dims)))
               for i in range(info.batch_size)]
    if isinstance(samples[0], torch.Tensor):
        return torch.stack(samples), 0
    outputs = tuple(None if parts[0] is None else torch.stack(parts) for parts in zip(*samples))
    return outputs, tuple(None if out is None else 0 for out in outputs)


def refuse_forward_mode(op):
    """The jvp staticmethod of a fused op: there is no forward-mode derivative (no launcher computes one; a loss's
    would need the [N, V] softmax's product with a tangent)."""
    raise RuntimeError(f"{op} has no forward-mode derivative (torch.func.jvp, jacfwd, hessian, forward_ad): "
                       "differentiate it in reverse mode (backward, torch.func.grad, vjp or jacrev)")


class FusedOpFunction(torch.autograd.Function):
    """Base of the fused ops' Functions, whose `op` names them in errors: no forward-mode derivative (jvp refuses
    it), and vmap runs the op once per sample (vmap_by_loop). Classmethods, which torch calls on the class as it
    calls the staticmethods it documents. A compiled caller calls apply_in_graph instead of apply: it applies a twin
    without the jvp, as dynamo refuses to trace a Function that defines one where gradients are recorded (a graph
    break at every call, an error under fullgraph=True); forward mode does not run through a compiled graph anyway.
    It passes a tensor given twice as a view the second time (distinct_tensors), which dynamo refuses too."""

    op: str
    apply_in_graph: Callable[..., Any]

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "jvp" not in vars(cls):   # an op's Function, not its twin
            twin = type(cls.__name__, (cls,), {"jvp": staticmethod(torch.autograd.Function.jvp)})
            # (a function: dynamo reads no class attribute)
            cls.apply_in_graph = staticmethod(lambda *args: twin.apply(*distinct_tensors(args)))

    @classmethod
    def jvp(cls, ctx, *tangents):
        refuse_forward_mode(cls.op)

    @classmethod
    def vmap(cls, info, in_dims, *args):
        return vmap_by_loop(cls.op, cls, info, in_dims, args)


def distinct_tensors(args):
    """args, each tensor that is an earlier one (gated_activation(x, x): act(x) * x) replaced by a view of it:
    dynamo refuses to trace a Function's apply given one tensor twice (duplicate tensor input). The values are the
    same, and the gradients of both uses reach the tensor."""
    return tuple(arg.view_as(arg) if isinstance(arg, torch.Tensor) and any(arg is earlier for earlier in args[:i])
                 else arg for i, arg in enumerate(args))


def refuse_second_derivative(op):
    """The launchers' gradients carry no graph: a derivative of them would come out silently wrong."""
    raise RuntimeError(f"{op} is not twice differentiable: its gradients have no gradient (no backward through "
                       "gradients taken with create_graph=True, no transform of torch.func's grad, vjp or jacrev)")


@compiler_disable()  # dynamo cannot trace the check (compiled autograd traces the backward)
def refuse_legacy_vmap(op, args):
    """torch.autograd.grad(is_grads_batched=True) and torch.autograd.functional's vectorize=True batch a backward by
    torch's legacy vmap, which calls no vmap staticmethod: the launchers would get batched tensors, and crash."""
    if any(isinstance(arg, torch.Tensor) and torch._C._functorch.is_legacy_batchedtensor(arg) for arg in args):
        raise RuntimeError(f"{op}'s backward cannot run batched by torch.autograd's legacy vmap "
                           "(torch.autograd.grad(is_grads_batched=True), torch.autograd.functional's vectorize=True): "
                           "use torch.func.jacrev, or torch.func.vmap over torch.func.vjp's function")


class LauncherGradients(torch.autograd.Function):
    """A fused op's backward, `gradients(*args)` of its saved tensors and upstream gradient (a tuple of gradients
    or None), as a Function with no derivative of its own: the launchers' gradients carry no graph. A `gradients`
    that changes its arguments in place names, as its attribute out_of_place, the function that vmap's loop calls
    instead (each sample gets the same unbatched arguments)."""

    @staticmethod
    def forward(op, gradients, *args):
        refuse_legacy_vmap(op, args)
        return gradients(*args)

    @staticmethod
    def apply_in_graph(op, gradients, *args):
        """The gradients, as a compiled caller's graph computes them (it has no second derivative of its own):
        dynamo broke the graph at refuse_legacy_vmap, and passed this Function's forward, which takes *args, its
        ctx as first argument."""
        return gradients(*args)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.op = inputs[0]

    @staticmethod
    def backward(ctx, *grads):
        refuse_second_derivative(ctx.op)

    @staticmethod
    def jvp(ctx, *tangents):
        refuse_second_derivative(ctx.op)

    @staticmethod
    def vmap(info, in_dims, op, gradients, *args):
        gradients = getattr(gradients, "out_of_place", gradients)
        return vmap_by_loop(op, LauncherGradients, info, in_dims, (op, gradients, *args))
