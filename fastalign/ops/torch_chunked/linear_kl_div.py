"""Chunked torch launchers of the linear forward KL (same contract as fastalign.kernels.linear_kl_div).

Per row t: Q_t = softmax(h_t W^T + b), P_t = softmax(r_t R^T + c) (the frozen reference; both logits soft-capped
with a softcap), KL_t = sum_v p_v (log p_v - log q_v); the gradient of sum_t g_t KL_t wrt the policy logits is
g_t (q_t - p_t). When `ref_weight is weight` (or `ref_bias is bias`) both products read the same fp32 copy.
"""
import torch

from .chunking import (accumulate_grads, accumulation_dtype, chunk_logits, row_chunks, softmax_of, through_softcap,
                       upcast)


def _shared_upcast(t, ref_t, acc):
    """t and ref_t in the accumulation dtype; one tensor that serves both heads is upcast once."""
    t_acc = upcast(t, acc)
    return t_acc, (t_acc if ref_t is t else upcast(ref_t, acc))


def forward(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, softcap=None):
    """(kl, lse, ref_lse), all [M] in the accumulation dtype (fp32; float64 for float64 inputs)."""
    acc = accumulation_dtype(hidden)
    weight_acc, ref_weight_acc = _shared_upcast(weight, ref_weight, acc)
    bias_acc, ref_bias_acc = _shared_upcast(bias, ref_bias, acc)
    kl, lse, ref_lse = (torch.empty(hidden.shape[0], dtype=acc, device=hidden.device) for _ in range(3))
    for start, stop in row_chunks(hidden.shape[0], 2 * weight.shape[0], acc):
        rows = slice(start, stop)
        log_q = chunk_logits(hidden[rows], weight_acc, bias_acc, softcap)
        log_p = chunk_logits(ref_hidden[rows], ref_weight_acc, ref_bias_acc, softcap)
        lse[rows] = torch.logsumexp(log_q, dim=1)
        ref_lse[rows] = torch.logsumexp(log_p, dim=1)
        log_q -= lse[rows, None]
        log_p -= ref_lse[rows, None]
        # words P gives no mass (a bias of -inf) add 0 log 0 = 0, not 0 * inf = NaN; a NaN p stays NaN
        kl[rows] = torch.where(log_p == float("-inf"), 0.0, log_p.exp() * (log_p - log_q)).sum(1)
    return kl, lse, ref_lse


def backward(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, lse, ref_lse, grad_scale, need_weight_grad,
             need_bias_grad, need_hidden_grad=True, softcap=None):
    """(d_hidden [M, H], d_weight [V, H], d_bias [V]), each None unless asked for, in the accumulation dtype."""
    acc = accumulation_dtype(hidden)
    weight_acc, ref_weight_acc = _shared_upcast(weight, ref_weight, acc)
    bias_acc, ref_bias_acc = _shared_upcast(bias, ref_bias, acc)
    d_hidden = torch.empty(hidden.shape, dtype=acc, device=hidden.device) if need_hidden_grad else None
    d_weight = torch.zeros_like(weight_acc) if need_weight_grad else None
    d_bias = torch.zeros_like(bias_acc) if need_bias_grad else None
    for start, stop in row_chunks(hidden.shape[0], 2 * weight.shape[0], acc):
        rows = slice(start, stop)
        logits = chunk_logits(hidden[rows], weight_acc, bias_acc, softcap)
        grad_logits = softmax_of(logits, lse[rows], softcap)
        grad_logits -= softmax_of(chunk_logits(ref_hidden[rows], ref_weight_acc, ref_bias_acc, softcap),
                                  ref_lse[rows], None)
        grad_logits = through_softcap(grad_logits, logits, softcap).mul_(grad_scale[rows, None])
        accumulate_grads(grad_logits, hidden[rows], weight_acc, None if d_hidden is None else d_hidden[rows], d_weight,
                         d_bias)
    return d_hidden, d_weight, d_bias
