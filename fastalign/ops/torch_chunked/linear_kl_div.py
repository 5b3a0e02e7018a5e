"""Chunked torch launchers of the linear forward KL (same contract as fastalign.kernels.linear_kl_div).

Per row t: Q_t = softmax(h_t W^T), P_t = softmax(r_t R^T) (the frozen reference; both logits soft-capped with a
softcap),
KL_t = sum_v p_v (log p_v - log q_v); the gradient of sum_t g_t KL_t wrt the policy logits is g_t (q_t - p_t).
When `ref_weight is weight` both products read the same fp32 copy of the weight.
"""
import torch

from .chunking import (accumulate_grads, accumulation_dtype, chunk_logits, row_chunks, softmax_of, through_softcap,
                       upcast)


def _weights(weight, ref_weight, acc):
    """Both weights in the accumulation dtype; a shared lm_head is upcast once."""
    weight_acc = upcast(weight, acc)
    return weight_acc, (weight_acc if ref_weight is weight else upcast(ref_weight, acc))


def forward(hidden, weight, ref_hidden, ref_weight, softcap=None):
    """(kl, lse, ref_lse), all [M] in the accumulation dtype (fp32; float64 for float64 inputs)."""
    acc = accumulation_dtype(hidden)
    weight_acc, ref_weight_acc = _weights(weight, ref_weight, acc)
    kl, lse, ref_lse = (torch.empty(hidden.shape[0], dtype=acc, device=hidden.device) for _ in range(3))
    for start, stop in row_chunks(hidden.shape[0], 2 * weight.shape[0], acc):
        rows = slice(start, stop)
        log_q = chunk_logits(hidden[rows], weight_acc, None, softcap)
        log_p = chunk_logits(ref_hidden[rows], ref_weight_acc, None, softcap)
        lse[rows] = torch.logsumexp(log_q, dim=1)
        ref_lse[rows] = torch.logsumexp(log_p, dim=1)
        log_q -= lse[rows, None]
        log_p -= ref_lse[rows, None]
        kl[rows] = (log_p.exp() * (log_p - log_q)).sum(1)
    return kl, lse, ref_lse


def backward(hidden, weight, ref_hidden, ref_weight, lse, ref_lse, grad_scale, need_weight_grad,
             need_hidden_grad=True, softcap=None):
    """(d_hidden [M, H], d_weight [V, H]), each None unless asked for, in the accumulation dtype."""
    acc = accumulation_dtype(hidden)
    weight_acc, ref_weight_acc = _weights(weight, ref_weight, acc)
    d_hidden = torch.empty(hidden.shape, dtype=acc, device=hidden.device) if need_hidden_grad else None
    d_weight = torch.zeros_like(weight_acc) if need_weight_grad else None
    for start, stop in row_chunks(hidden.shape[0], 2 * weight.shape[0], acc):
        rows = slice(start, stop)
        logits = chunk_logits(hidden[rows], weight_acc, None, softcap)
        grad_logits = softmax_of(logits, lse[rows], softcap)
        grad_logits -= softmax_of(chunk_logits(ref_hidden[rows], ref_weight_acc, None, softcap), ref_lse[rows], None)
        grad_logits = through_softcap(grad_logits, logits, softcap).mul_(grad_scale[rows, None])
        accumulate_grads(grad_logits, hidden[rows], weight_acc, None if d_hidden is None else d_hidden[rows], d_weight,
                         None)
    return d_hidden, d_weight
