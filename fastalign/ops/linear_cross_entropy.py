"""fastalign.linear_cross_entropy: token-weighted cross-entropy of `hidden @ weight.T + bias`, fused.

The [tokens x vocab] logits are never held in memory: the backends tile (Triton) or chunk (torch) over
them and recompute them in the backward pass from the saved per-token logsumexp.
"""
import torch

from .backend import graph_break, launcher_context, refuse_double_backward, require_triton_dtype, select_backend
from .checks import (as_rows, check_bias, check_linear, check_per_token, check_reduction, check_softcap,
                     check_tensor, is_integer, token_dims, FLOAT_DTYPES)
from .token_rows import TokenRows

INTEGER_DTYPES = (torch.int64, torch.int32, torch.int16, torch.uint8)


class LinearCrossEntropyFunction(torch.autograd.Function):
    """Autograd over the live rows; gradients flow to hidden, weight and bias (not target or token_weight)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, target, token_weight, ignore_index, reduction, softcap, launcher):
        acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
        rows = TokenRows(target != ignore_index, token_weight, reduction, acc)
        live_hidden, live_target = rows.gather(hidden).contiguous(), rows.gather(target).contiguous()
        weight, bias = weight.contiguous(), None if bias is None else bias.contiguous()
        if rows.num_live:
            with launcher_context(hidden.device):
                lse, target_logit = launcher.forward(live_hidden, weight, bias, live_target, softcap)
        else:
            lse = target_logit = hidden.new_zeros(0, dtype=acc)
        ctx.save_for_backward(live_hidden, weight, bias, live_target, lse)
        ctx.rows, ctx.launcher, ctx.acc, ctx.softcap = rows, launcher, acc, softcap
        return rows.reduce(lse - target_logit)

    @staticmethod
    def backward(ctx, grad_output):
        refuse_double_backward("linear_cross_entropy")
        live_hidden, weight, bias, live_target, lse = ctx.saved_tensors
        rows = ctx.rows
        # only the gradients asked for are computed: e.g. no G @ W products for hidden states of a frozen backbone
        need_hidden, need_weight = ctx.needs_input_grad[:2]
        need_bias = bias is not None and ctx.needs_input_grad[2]
        if rows.num_live == 0:
            d_hidden = (torch.zeros((rows.num_tokens, weight.shape[1]), dtype=weight.dtype, device=weight.device)
                        if need_hidden else None)
            return (d_hidden, torch.zeros_like(weight) if need_weight else None,
                    torch.zeros_like(bias) if need_bias else None) + (None,) * 6
        with launcher_context(weight.device):
            d_live, d_weight, d_bias = ctx.launcher.backward(live_hidden, weight, bias, live_target, lse,
                                                             rows.grad_scale(grad_output, ctx.acc), need_weight,
                                                             need_bias, need_hidden, ctx.softcap)
        return (None if d_live is None else rows.scatter(d_live, live_hidden.dtype),
                None if d_weight is None else d_weight.to(weight.dtype),
                None if d_bias is None else d_bias.to(bias.dtype)) + (None,) * 6


@graph_break("linear_cross_entropy")
def linear_cross_entropy(hidden, weight, target, *, token_weight=None, bias=None, ignore_index=-100,
                         reduction="mean", softcap=None, backend="auto"):
    """Token-weighted cross-entropy of the logits `hidden @ weight.T + bias`, without materialising them.

    hidden [..., H] (e.g. a model's [B, T, H], or rows [N, H]), weight [V, H], target [...] (integer, hidden's
    leading shape; ignore_index marks tokens that carry no loss), token_weight [...] float of any sign (default 1;
    a constant: one that requires grad is refused), bias [V].
    Per token CE_t = logsumexp(z_t) - z_t[y_t]; with softcap c, z = c * tanh((hidden @ weight.T + bias) / c), the
    logits of a model with final_logit_softcapping = c (Gemma 2 and 3).
    reduction: "sum" = sum_t w_t CE_t; "mean" = that sum / number of non-ignored tokens (0 if none);
    "none" = w_t CE_t of shape [...] (0 at ignored tokens). The result is float32 (float64 for float64
    inputs) whatever the input dtype; ignored and zero-weight tokens never reach the matmul. An enclosing
    autocast does not apply inside (cast the inputs to follow it); there is no second derivative. torch.compile
    runs it as it is (one graph break): dynamo cannot trace its data-dependent row gather and kernel launches,
    and tracing into them crashed under the Triton interpreter.
    backend: "auto" (Triton on CUDA, chunked torch elsewhere), "triton" or "torch".
    """
    tokens = token_dims("hidden", hidden)
    hidden, target = as_rows("hidden", hidden, tokens, width="H"), as_rows("target", target, tokens)
    token_weight = as_rows("token_weight", token_weight, tokens)
    check_linear("hidden", hidden, "weight", weight)
    vocab = weight.shape[0]
    check_tensor("target", target, ndim=1, dtypes=INTEGER_DTYPES, like=hidden)
    if not is_integer(ignore_index):
        raise TypeError(f"ignore_index must be an integer, got {ignore_index!r}")
    if not -2 ** 63 <= ignore_index < 2 ** 63:
        raise ValueError(f"ignore_index must fit in int64 (the targets' dtype it is compared in), got {ignore_index}")
    # compared in int64: in uint8, ignore_index=-100 would wrap to 156 and silently ignore that class
    target = target.long()
    check_per_token("token_weight", token_weight, hidden, dtypes=FLOAT_DTYPES)
    check_bias("bias", bias, "weight", weight)
    check_reduction(reduction)
    check_softcap(softcap)
    out_of_range = (target != ignore_index) & ((target < 0) | (target >= vocab))
    if bool(out_of_range.any()):
        bad = int(target[out_of_range][0])
        raise ValueError(f"target values must lie in [0, {vocab}) or equal ignore_index={ignore_index}; found {bad}")
    launcher = select_backend("linear_cross_entropy", backend, hidden.device)
    require_triton_dtype(launcher, "hidden", hidden)
    loss = LinearCrossEntropyFunction.apply(hidden, weight, bias, target, token_weight, ignore_index, reduction,
                                            None if softcap is None else float(softcap), launcher)
    return loss.reshape(tokens) if reduction == "none" else loss
