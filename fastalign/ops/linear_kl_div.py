"""fastalign.linear_kl_div: token-weighted forward KL(P || Q) between two linear heads, fused.

P = softmax(ref_hidden @ ref_weight.T + ref_bias) is the frozen reference (no gradient), Q = softmax(hidden @
weight.T + bias) the policy. Neither [tokens x vocab] distribution is held in memory; when ref_weight is weight
(one frozen lm_head shared by both models) each weight tile is read once for both products. With
grads_in_forward=True the gradients are taken in the forward pass, from blocks of whole logits rows of both heads
(forward_gradients.py).
"""
import torch

from .backend import (Backend, apply_function, graph_break, autocast_off, refuse_fake_tensors, require_triton_dtype,
                      select_backend, TOKENS_CHOSEN_BY_VALUES)
from .checks import (as_rows, check_bias, check_constant, check_linear, check_per_token, check_reduction,
                     check_softcap, check_tensor, check_token_shape, token_dims, FLOAT_DTYPES, Reduction)
from .forward_gradients import (backward_gradients, compiled_autograd_key, forward_gradient_needs,
                                refuse_inference_tensors, save_for_backward)
from .func_transforms import FusedOpFunction
from .token_rows import TokenRows


class LinearKLDivFunction(FusedOpFunction):
    """Autograd over the live rows; gradients flow to hidden, weight and bias only.

    forward returns the KL, then both heads' per-token logsumexps and TokenRows' state that the backward takes (in
    torch.func's form: see func_transforms), then the gradients taken in the forward (each None unless
    forward_needs, (need_hidden, need_weight, need_bias) or None, asks for them)."""

    op = "linear_kl_div"

    @staticmethod
    def forward(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, token_weight, mask, reduction, softcap,
                launcher, forward_needs):
        acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
        counted = torch.ones(hidden.shape[0], dtype=torch.bool, device=hidden.device) if mask is None else mask
        rows = TokenRows.counting(counted, token_weight, reduction, acc)
        grads = None
        if rows.num_live:
            operands = _live_operands(rows, hidden, weight, bias, ref_hidden, ref_weight, ref_bias)
            with autocast_off(hidden.device):
                if forward_needs is None:
                    kl, lse, ref_lse = launcher.forward(*operands, softcap)
                else:
                    kl, lse, ref_lse, *grads = launcher.forward_with_gradients(
                        *operands, rows.grad_scale(torch.ones((), dtype=acc, device=hidden.device)),
                        forward_needs[1], forward_needs[2], forward_needs[0], softcap)
        else:
            kl = lse = ref_lse = hidden.new_zeros(0, dtype=acc)
        if forward_needs is not None:
            grads = rows.gradients(grads, forward_needs, hidden, weight, bias)
        return ((rows.reduce(kl), rows.scatter(lse, acc), rows.scatter(ref_lse, acc)) + rows.state()
                + (grads or (None,) * 3))

    @staticmethod
    def setup_context(ctx, inputs, output):
        (hidden, weight, bias, ref_hidden, ref_weight, ref_bias, _, _, reduction, softcap, launcher,
         forward_needs) = inputs
        save_for_backward(ctx, forward_needs, (hidden, weight, bias, ref_hidden, ref_weight, ref_bias), output)
        ctx.reduction, ctx.options, ctx.launcher = reduction, (softcap,), launcher

    @staticmethod
    def backward(ctx, grad_output, *_):
        return backward_gradients(ctx, LinearKLDivFunction.op, _gradients, grad_output) + (None,) * 9

    _compiled_autograd_key = staticmethod(compiled_autograd_key)


def _live_operands(rows, hidden, weight, bias, ref_hidden, ref_weight, ref_bias):
    """The launchers' (hidden, weight, bias, ref_hidden, ref_weight, ref_bias): the live rows, contiguous, the
    reference detached; a reference head that is the policy's tensor (one frozen lm_head for both) is passed as
    the policy's very tensor, so that the launchers read it once for both products."""
    shared_weight, shared_bias = ref_weight is weight, bias is not None and ref_bias is bias
    weight, bias = weight.contiguous(), None if bias is None else bias.contiguous()
    ref_weight = weight if shared_weight else ref_weight.detach().contiguous()
    if ref_bias is not None:
        ref_bias = bias if shared_bias else ref_bias.detach().contiguous()
    return (rows.gather(hidden).contiguous(), weight, bias, rows.gather(ref_hidden.detach()).contiguous(), ref_weight,
            ref_bias)


@graph_break("linear_kl_div")  # a compiled caller that differentiates runs it in its frame
def _gradients(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, lse, ref_lse, row_weight, num_counted, live_rows,
               num_live, grad_output, reduction, softcap, launcher, need_hidden, need_weight, need_bias):
    """(d_hidden, d_weight, d_bias) of LinearKLDivFunction, each None unless asked for: only those are computed
    (none when only the never differentiated reference asked)."""
    need_bias = bias is not None and need_bias
    if not (need_hidden or need_weight or need_bias):
        return None, None, None
    rows = TokenRows(row_weight, num_counted, live_rows, num_live, reduction)
    live = None
    if rows.num_live:
        with autocast_off(weight.device):
            live = launcher.backward(*_live_operands(rows, hidden, weight, bias, ref_hidden, ref_weight, ref_bias),
                                     rows.gather(lse).contiguous(), rows.gather(ref_lse).contiguous(),
                                     rows.grad_scale(grad_output), need_weight, need_bias, need_hidden, softcap)
    return rows.gradients(live, (need_hidden, need_weight, need_bias), hidden, weight, bias)


@graph_break("linear_kl_div")
def linear_kl_div(hidden: torch.Tensor, weight: torch.Tensor, ref_hidden: torch.Tensor, ref_weight: torch.Tensor, *,
                  bias: torch.Tensor | None = None, ref_bias: torch.Tensor | None = None,
                  token_weight: torch.Tensor | None = None, mask: torch.Tensor | None = None,
                  reduction: Reduction = "mean", softcap: float | None = None, backend: Backend = "auto",
                  grads_in_forward: bool = False) -> torch.Tensor:
    """Token-weighted forward KL(P_t || Q_t) per token, without materialising either distribution.

    hidden [..., H] (e.g. a model's [B, T, H], or rows [N, H]), weight [V, H] and bias [V] give the policy
    Q = softmax(hidden @ weight.T + bias); ref_hidden [..., H_ref] (hidden's leading shape), ref_weight [V, H_ref]
    and ref_bias [V] the frozen reference P = softmax(ref_hidden @ ref_weight.T + ref_bias) (never differentiated:
    one that requires grad is refused; ref_weight may be `weight` itself and ref_bias `bias` itself, one lm_head
    shared by both models, which gets the policy's gradient). Each head may have its own dtype (a teacher stored in
    another than the student's), and computes in it; each bias is optional (None: no bias) and has its head's dtype.
    token_weight [...] float (default 1; a constant: one that requires grad is refused); mask [...] bool, True where a
    token counts. softcap c: both heads' biased logits are soft-capped, c * tanh(z / c), as a model with
    final_logit_softcapping = c (Gemma 2 and 3) computes them. reduction: "sum" = sum_t w_t KL_t over counted tokens;
    "mean" = that sum / number of counted tokens (0 if none); "none" = w_t KL_t of shape [...] (0 at masked-out
    tokens). Result float32 (float64 for float64 inputs).
    Gradients flow to hidden, weight and bias. An enclosing autocast does not apply inside (cast the inputs to
    follow it). torch.func's grad, vjp, jacrev and vmap (once per sample) work; a second derivative, forward
    mode or torch.autograd's legacy vmap (is_grads_batched=True) raises. torch.compile runs it and its backward as
    they are (graph breaks): dynamo cannot trace their data-dependent row gather and kernel launches, and tracing
    into them crashed under the Triton interpreter.
    backend: "auto" (Triton on CUDA, chunked torch elsewhere), "triton" or "torch".
    grads_in_forward: True takes the gradients in the forward pass (reduction "sum" or "mean", not float16, when a
    gradient is to be taken), from blocks of whole logits rows of both heads (the Triton backend's: their fp32 logits
    and the gradient in the inputs' dtype, 10 bytes a logit in bf16, at V 128256 128 rows, ~157 MiB; more rows past
    32 blocks), two products with the weight fewer; the backward scales them, and can run once. See
    fastalign/ops/forward_gradients.py.
    """
    tokens = token_dims("hidden", hidden)
    check_token_shape("ref_hidden", ref_hidden, tokens, width="H_ref")
    check_token_shape("token_weight", token_weight, tokens)
    check_token_shape("mask", mask, tokens)
    check_linear("hidden", hidden, "weight", weight)
    # ref_hidden against hidden first: check_linear checks ref_weight against ref_hidden, and would name ref_weight
    check_tensor("ref_hidden", ref_hidden, ndim=None, dtypes=FLOAT_DTYPES, like=hidden)
    check_linear("ref_hidden", ref_hidden, "ref_weight", ref_weight)
    if ref_weight.shape[0] != weight.shape[0]:
        raise ValueError(f"ref_weight must have the vocabulary size of weight ({weight.shape[0]} rows), got shape "
                         f"{tuple(ref_weight.shape)}")
    check_bias("bias", bias, "weight", weight)
    check_bias("ref_bias", ref_bias, "ref_weight", ref_weight)
    check_per_token("token_weight", token_weight, hidden, dtypes=FLOAT_DTYPES)
    check_per_token("mask", mask, hidden, dtypes=(torch.bool,))
    # the reference is never differentiated: only the policy's own head, passed as the reference's too, trains
    check_constant("ref_hidden", ref_hidden)
    check_constant("ref_weight", None if ref_weight is weight else ref_weight)
    check_constant("ref_bias", None if ref_bias is bias else ref_bias)
    check_reduction(reduction)
    check_softcap(softcap)
    forward_needs = forward_gradient_needs("linear_kl_div", grads_in_forward, reduction, hidden, weight, bias)
    refuse_inference_tensors("linear_kl_div", forward_needs, [
        ("hidden", hidden), ("weight", weight), ("bias", bias), ("ref_hidden", ref_hidden), ("ref_weight", ref_weight),
        ("ref_bias", ref_bias)])
    hidden, ref_hidden = as_rows(hidden, tokens), as_rows(ref_hidden, tokens)
    token_weight, mask = as_rows(token_weight, tokens), as_rows(mask, tokens)
    refuse_fake_tensors("linear_kl_div", [hidden], TOKENS_CHOSEN_BY_VALUES)
    launcher = select_backend("linear_kl_div", backend, hidden.device,
                              torch.promote_types(hidden.dtype, ref_hidden.dtype))
    require_triton_dtype(launcher, "hidden", hidden)
    require_triton_dtype(launcher, "ref_hidden", ref_hidden)
    kl = apply_function(LinearKLDivFunction, hidden, weight, bias, ref_hidden, ref_weight, ref_bias, token_weight,
                        mask, reduction, None if softcap is None else float(softcap), launcher, forward_needs)[0]
    return kl.reshape(tokens) if reduction == "none" else kl
