"""fastalign.linear_cross_entropy: token-weighted cross-entropy of `hidden @ weight.T + bias`, fused.

The [tokens x vocab] logits are never held in memory: the backends tile (Triton) or chunk (torch) over
them and recompute them in the backward pass from the saved per-token logsumexp; with grads_in_forward=True the
gradients are taken in the forward pass instead, from blocks of whole logits rows (forward_gradients.py).
"""
import torch

from .backend import (Backend, apply_function, graph_break, autocast_off, refuse_fake_tensors, require_triton_dtype,
                      select_backend, TOKENS_CHOSEN_BY_VALUES)
from .checks import (as_rows, check_bias, check_label_smoothing, check_linear, check_per_token, check_reduction,
                     check_softcap, check_tensor, check_token_shape, is_integer, out_of_range_targets, refuse_targets,
                     token_dims, FLOAT_DTYPES, Reduction)
from .forward_gradients import (backward_gradients, compiled_autograd_key, forward_gradient_needs,
                                refuse_inference_tensors, save_for_backward)
from .func_transforms import FusedOpFunction
from .token_rows import TokenRows

INTEGER_DTYPES = (torch.int64, torch.int32, torch.int16, torch.uint8)


class LinearCrossEntropyFunction(FusedOpFunction):
    """Autograd over the live rows; gradients flow to hidden, weight and bias (not target or token_weight).

    forward returns the loss, then the per-token logsumexp and TokenRows' state that the backward takes (in
    torch.func's form: see func_transforms), then the gradients taken in the forward (each None unless
    forward_needs, (need_hidden, need_weight, need_bias) or None, asks for them)."""

    op = "linear_cross_entropy"

    @staticmethod
    def forward(hidden, weight, bias, target, token_weight, ignore_index, reduction, softcap, label_smoothing, launcher,
                forward_needs):
        acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
        out_of_range = out_of_range_targets(target, ignore_index, weight.shape[0])
        rows = TokenRows.counting(target != ignore_index, token_weight, reduction, acc, refused=out_of_range)
        if rows is None:
            refuse_targets(target, out_of_range, ignore_index, weight.shape[0])
        grads = None
        if rows.num_live:
            operands = (rows.gather(hidden).contiguous(), weight.contiguous(),
                        None if bias is None else bias.contiguous(), rows.gather(target).contiguous())
            with autocast_off(hidden.device):
                if forward_needs is None:
                    lse, target_logit = launcher.forward(*operands, softcap, label_smoothing)
                else:
                    lse, target_logit, *grads = launcher.forward_with_gradients(
                        *operands, rows.grad_scale(torch.ones((), dtype=acc, device=hidden.device)),
                        forward_needs[1], forward_needs[2], forward_needs[0], softcap, label_smoothing)
        else:
            lse = target_logit = hidden.new_zeros(0, dtype=acc)
        if forward_needs is not None:
            grads = rows.gradients(grads, forward_needs, hidden, weight, bias)
        return (rows.reduce(lse - target_logit), rows.scatter(lse, acc)) + rows.state() + (grads or (None,) * 3)

    @staticmethod
    def setup_context(ctx, inputs, output):
        hidden, weight, bias, target, _, _, reduction, softcap, label_smoothing, launcher, forward_needs = inputs
        save_for_backward(ctx, forward_needs, (hidden, weight, bias, target), output)
        ctx.reduction, ctx.options, ctx.launcher = reduction, (softcap, label_smoothing), launcher

    @staticmethod
    def backward(ctx, grad_output, *_):
        return backward_gradients(ctx, LinearCrossEntropyFunction.op, _gradients, grad_output) + (None,) * 8

    _compiled_autograd_key = staticmethod(compiled_autograd_key)


@graph_break("linear_cross_entropy")  # a compiled caller that differentiates runs it in its frame
def _gradients(hidden, weight, bias, target, lse, row_weight, num_counted, live_rows, num_live, grad_output, reduction,
               softcap, label_smoothing, launcher, need_hidden, need_weight, need_bias):
    """(d_hidden, d_weight, d_bias) of LinearCrossEntropyFunction, each None unless asked for: only those are
    computed, e.g. no G @ W products for hidden states of a frozen backbone."""
    rows = TokenRows(row_weight, num_counted, live_rows, num_live, reduction)
    need_bias = bias is not None and need_bias
    live = None
    if rows.num_live:
        with autocast_off(weight.device):
            live = launcher.backward(rows.gather(hidden).contiguous(), weight.contiguous(),
                                     None if bias is None else bias.contiguous(), rows.gather(target).contiguous(),
                                     rows.gather(lse).contiguous(), rows.grad_scale(grad_output), need_weight,
                                     need_bias, need_hidden, softcap, label_smoothing)
    return rows.gradients(live, (need_hidden, need_weight, need_bias), hidden, weight, bias)


@graph_break("linear_cross_entropy")
def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, *,
                         token_weight: torch.Tensor | None = None, bias: torch.Tensor | None = None,
                         ignore_index: int = -100, reduction: Reduction = "mean", softcap: float | None = None,
                         label_smoothing: float = 0.0, backend: Backend = "auto",
                         grads_in_forward: bool = False) -> torch.Tensor:
    """Token-weighted cross-entropy of the logits `hidden @ weight.T + bias`, without materialising them.

    hidden [..., H] (e.g. a model's [B, T, H], or rows [N, H]), weight [V, H], target [...] (integer, hidden's
    leading shape; ignore_index marks tokens that carry no loss), token_weight [...] float of any sign (default 1;
    a constant: one that requires grad is refused), bias [V].
    Per token CE_t = logsumexp(z_t) - z_t[y_t]; with softcap c, z = c * tanh((hidden @ weight.T + bias) / c), the
    logits of a model with final_logit_softcapping = c (Gemma 2 and 3).
    label_smoothing eps in [0, 1], as torch's cross_entropy takes it: the target is (1 - eps) onehot(y_t) + eps / V,
    CE_t = logsumexp(z_t) - (1 - eps) z_t[y_t] - eps mean_v z_t[v] (with token_weight 1 and no softcap,
    F.cross_entropy(z, y, label_smoothing=eps) of the same reduction).
    reduction: "sum" = sum_t w_t CE_t; "mean" = that sum / number of non-ignored tokens (0 if none);
    "none" = w_t CE_t of shape [...] (0 at ignored tokens). The result is float32 (float64 for float64
    inputs) whatever the input dtype; ignored and zero-weight tokens never reach the matmul. An enclosing
    autocast does not apply inside (cast the inputs to follow it). torch.func's grad, vjp, jacrev and vmap (once
    per sample) work; a second derivative, forward mode or torch.autograd's legacy vmap (is_grads_batched=True)
    raises. torch.compile runs it and its backward as they are (graph breaks): dynamo cannot trace their
    data-dependent row gather and kernel launches, and tracing into them crashed under the Triton interpreter.
    backend: "auto" (Triton on CUDA, chunked torch elsewhere), "triton" or "torch".
    grads_in_forward: True takes the gradients in the forward pass (reduction "sum" or "mean", not float16, when a
    gradient is to be taken), from blocks of whole logits rows (the Triton backend's: fp32 logits and the gradient in
    the inputs' dtype, 6 bytes a logit in bf16, at V 128256 256 rows, ~188 MiB; more rows past 32 blocks), one product
    with the weight fewer; the backward scales them, and can run once. See fastalign/ops/forward_gradients.py.
    """
    tokens = token_dims("hidden", hidden)
    check_token_shape("target", target, tokens)
    check_token_shape("token_weight", token_weight, tokens)
    check_linear("hidden", hidden, "weight", weight)
    check_tensor("target", target, ndim=None, dtypes=INTEGER_DTYPES, like=hidden)
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
    check_label_smoothing(label_smoothing)
    forward_needs = forward_gradient_needs("linear_cross_entropy", grads_in_forward, reduction, hidden, weight, bias)
    refuse_inference_tensors("linear_cross_entropy", forward_needs, [("hidden", hidden), ("weight", weight),
                                                                     ("bias", bias), ("target", target)])
    hidden, target, token_weight = as_rows(hidden, tokens), as_rows(target, tokens), as_rows(token_weight, tokens)
    refuse_fake_tensors("linear_cross_entropy", [hidden], TOKENS_CHOSEN_BY_VALUES)
    launcher = select_backend("linear_cross_entropy", backend, hidden.device, hidden.dtype)
    require_triton_dtype(launcher, "hidden", hidden)
    loss = apply_function(LinearCrossEntropyFunction, hidden, weight, bias, target, token_weight, ignore_index,
                          reduction, None if softcap is None else float(softcap), float(label_smoothing), launcher,
                          forward_needs)[0]
    return loss.reshape(tokens) if reduction == "none" else loss
