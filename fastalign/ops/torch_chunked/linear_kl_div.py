"""Chunked torch launchers of the linear forward KL (same contract as fastalign.kernels.linear_kl_div).

Per row t: Q_t = softmax(h_t W^T + b), P_t = softmax(r_t R^T + c) (the frozen reference; both logits soft-capped
with a softcap), KL_t = sum_v p_v (log p_v - log q_v); the gradient of sum_t g_t KL_t wrt the policy logits is
g_t (q_t - p_t). When `ref_weight is weight` (or `ref_bias is bias`) both products read the same fp32 copy.
"""
import torch

from .chunking import (accumulate_grads, accumulation_dtype, chunk_logits, gradient_buffers, row_chunks,
                       through_softcap, upcast)


def _shared_upcast(t, ref_t, acc):
    """t and ref_t in the accumulation dtype; one tensor that serves both heads is upcast once."""
    t_acc = upcast(t, acc)
    return t_acc, (t_acc if ref_t is t else upcast(ref_t, acc))


def forward(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, softcap=None):
    """(kl, lse, ref_lse), all [M] in the accumulation dtype (fp32; float64 for float64 inputs)."""
    return _forward_pass(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, None, False, False, False,
                         softcap)[:3]


def forward_with_gradients(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, grad_scale, need_weight_grad,
                           need_bias_grad, need_hidden_grad=True, softcap=None):
    """forward() and backward() on each chunk's logits at once: (kl, lse, ref_lse, d_hidden, d_weight, d_bias)."""
    return _forward_pass(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, grad_scale, need_weight_grad,
                         need_bias_grad, need_hidden_grad, softcap)


def _forward_pass(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, grad_scale, need_weight_grad, need_bias_grad,
                  need_hidden_grad, softcap):
    """forward_with_gradients(), which forward() is without gradients."""
    acc = accumulation_dtype(hidden)
    weight_acc, ref_weight_acc = _shared_upcast(weight, ref_weight, acc)
    bias_acc, ref_bias_acc = _shared_upcast(bias, ref_bias, acc)
    kl, lse, ref_lse = (torch.empty(hidden.shape[0], dtype=acc, device=hidden.device) for _ in range(3))
    grads = gradient_buffers(hidden, weight_acc, bias_acc, need_weight_grad, need_bias_grad, need_hidden_grad)
    for start, stop in row_chunks(hidden.shape[0], 2 * weight.shape[0], acc):
        rows = slice(start, stop)
        log_q = chunk_logits(hidden[rows], weight_acc, bias_acc, softcap)
        log_p = chunk_logits(ref_hidden[rows], ref_weight_acc, ref_bias_acc, softcap)
        lse[rows] = torch.logsumexp(log_q, dim=1)
        ref_lse[rows] = torch.logsumexp(log_p, dim=1)
        log_q -= lse[rows, None]
        log_p -= ref_lse[rows, None]
        kl[rows] = kl_of_log_probs(log_q, log_p)
        if any(g is not None for g in grads):
            _accumulate_chunk(log_q, log_p, rows, hidden, weight_acc, lse, grad_scale, softcap, grads)
    return (kl, lse, ref_lse) + grads


def kl_of_log_probs(log_q, log_p):
    """KL(P || Q) [c] from both heads' log-probabilities [c, V]: E_p[d] + log1p(E_p[expm1(-d)]), d = log_p - log_q
    (also evaluation.metrics' token KL, from float64 ones).
    The second term is 0 in exact arithmetic (E_p[exp(-d)] = sum q = 1); computed, it takes out what the rounding of
    the two logsumexps puts into every d alike (~1e-7 |lse|), which sum p d alone keeps: percents off, and negative,
    where P ~ Q, whatever the gap between the logsumexps (a reference whose logits are shifted). p expm1(-d) is taken
    as q - p where |d| >= 0.5: exact enough there, and finite where p is 0 (d = -inf) or q is. Words P gives no mass
    (a bias of -inf, a p that underflows) add 0 to E_p[d], not 0 * inf = NaN; Q masking a word P gives mass: +inf."""
    p, q = log_p.exp(), log_q.exp()
    d = log_p - log_q
    mean_diff = (p * d).masked_fill_(p == 0.0, 0.0).sum(1)
    mean_expm1 = torch.where(d.abs() < 0.5, d.neg_().expm1_().mul_(p), q.sub_(p)).sum(1)   # (d's last use)
    return mean_diff + torch.log1p(mean_expm1)


def backward(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, lse, ref_lse, grad_scale, need_weight_grad,
             need_bias_grad, need_hidden_grad=True, softcap=None):
    """(d_hidden [M, H], d_weight [V, H], d_bias [V]), each None unless asked for, in the accumulation dtype."""
    acc = accumulation_dtype(hidden)
    weight_acc, ref_weight_acc = _shared_upcast(weight, ref_weight, acc)
    bias_acc, ref_bias_acc = _shared_upcast(bias, ref_bias, acc)
    grads = gradient_buffers(hidden, weight_acc, bias_acc, need_weight_grad, need_bias_grad, need_hidden_grad)
    for start, stop in row_chunks(hidden.shape[0], 2 * weight.shape[0], acc):
        rows = slice(start, stop)
        log_q = chunk_logits(hidden[rows], weight_acc, bias_acc, softcap).sub_(lse[rows, None])
        log_p = chunk_logits(ref_hidden[rows], ref_weight_acc, ref_bias_acc, softcap).sub_(ref_lse[rows, None])
        _accumulate_chunk(log_q, log_p, rows, hidden, weight_acc, lse, grad_scale, softcap, grads)
    return grads


def _accumulate_chunk(log_q, log_p, rows, hidden, weight_acc, lse, grad_scale, softcap, grads):
    """Backpropagates the KL of the rows `rows` from both heads' log-probabilities (overwritten) into grads =
    (d_hidden, d_weight, d_bias)."""
    capped_logits = None if softcap is None else log_q + lse[rows, None]
    grad_logits = log_q.exp_().sub_(log_p.exp_())
    grad_logits = through_softcap(grad_logits, capped_logits, softcap).mul_(grad_scale[rows, None])
    d_hidden, d_weight, d_bias = grads
    accumulate_grads(grad_logits, hidden[rows], weight_acc, None if d_hidden is None else d_hidden[rows], d_weight,
                     d_bias)
