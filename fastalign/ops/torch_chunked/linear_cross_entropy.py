"""Chunked torch launchers of the linear cross-entropy (same contract as fastalign.kernels.linear_cross_entropy).

Per row t: z_t = h_t W^T + b (soft-capped with a softcap), CE_t = lse(z_t) - z_t[y_t]; the gradient of
sum_t g_t CE_t wrt z_t is g_t (softmax(z_t) - onehot(y_t)).
"""
import torch

from .chunking import (accumulate_grads, accumulation_dtype, chunk_logits, row_chunks, softmax_of, through_softcap,
                       upcast)


def forward(hidden, weight, bias, target, softcap=None):
    """(lse, target_logit), both [M] in the accumulation dtype (fp32; float64 for float64 inputs)."""
    acc = accumulation_dtype(hidden)
    weight_acc, bias_acc = upcast(weight, acc), upcast(bias, acc)
    lse = torch.empty(hidden.shape[0], dtype=acc, device=hidden.device)
    target_logit = torch.empty_like(lse)
    for start, stop in row_chunks(hidden.shape[0], weight.shape[0], acc):
        logits = chunk_logits(hidden[start:stop], weight_acc, bias_acc, softcap)
        lse[start:stop] = torch.logsumexp(logits, dim=1)
        target_logit[start:stop] = logits.gather(1, target[start:stop, None]).squeeze(1)
    return lse, target_logit


def backward(hidden, weight, bias, target, lse, grad_scale, need_weight_grad, need_bias_grad,
             need_hidden_grad=True, softcap=None):
    """(d_hidden [M, H], d_weight [V, H], d_bias [V]), each None unless asked for, in the accumulation dtype."""
    acc = accumulation_dtype(hidden)
    weight_acc, bias_acc = upcast(weight, acc), upcast(bias, acc)
    d_hidden = torch.empty(hidden.shape, dtype=acc, device=hidden.device) if need_hidden_grad else None
    d_weight = torch.zeros_like(weight_acc) if need_weight_grad else None
    d_bias = torch.zeros_like(bias_acc) if need_bias_grad else None
    for start, stop in row_chunks(hidden.shape[0], weight.shape[0], acc):
        rows = slice(start, stop)
        logits = chunk_logits(hidden[rows], weight_acc, bias_acc, softcap)
        grad_logits = softmax_of(logits, lse[rows], softcap)
        grad_logits[torch.arange(stop - start, device=hidden.device), target[rows]] -= 1.0
        grad_logits = through_softcap(grad_logits, logits, softcap).mul_(grad_scale[rows, None])
        accumulate_grads(grad_logits, hidden[rows], weight_acc, None if d_hidden is None else d_hidden[rows], d_weight,
                         d_bias)
    return d_hidden, d_weight, d_bias
