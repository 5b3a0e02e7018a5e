"""Chunked torch launchers of the linear cross-entropy (same contract as fastalign.kernels.linear_cross_entropy).

Per row t: z_t = h_t W^T + b (soft-capped with a softcap), CE_t = lse(z_t) - z_t[y_t]; the gradient of
sum_t g_t CE_t wrt z_t is g_t (softmax(z_t) - onehot(y_t)). With label smoothing eps the target is
(1 - eps) onehot(y_t) + eps / V: z_t[y_t] becomes (1 - eps) z_t[y_t] + eps mean_v z_t[v], and the gradient
g_t (softmax(z_t) - (1 - eps) onehot(y_t) - eps / V).
"""
import torch

from .chunking import (accumulate_grads, accumulation_dtype, chunk_logits, gradient_buffers, row_chunks, softmax_of,
                       through_softcap, upcast)


def forward(hidden, weight, bias, target, softcap=None, label_smoothing=0.0):
    """(lse, target_logit), both [M] in the accumulation dtype (fp32; float64 for float64 inputs); target_logit is
    the smoothed one with label_smoothing (see the module's docstring)."""
    return _forward_pass(hidden, weight, bias, target, None, False, False, False, softcap, label_smoothing)[:2]


def forward_with_gradients(hidden, weight, bias, target, grad_scale, need_weight_grad, need_bias_grad,
                           need_hidden_grad=True, softcap=None, label_smoothing=0.0):
    """forward() and backward() on each chunk's logits at once: (lse, target_logit, d_hidden, d_weight, d_bias)."""
    return _forward_pass(hidden, weight, bias, target, grad_scale, need_weight_grad, need_bias_grad, need_hidden_grad,
                         softcap, label_smoothing)


def _forward_pass(hidden, weight, bias, target, grad_scale, need_weight_grad, need_bias_grad, need_hidden_grad,
                  softcap, label_smoothing):
    """forward_with_gradients(), which forward() is without gradients."""
    acc = accumulation_dtype(hidden)
    weight_acc, bias_acc = upcast(weight, acc), upcast(bias, acc)
    lse = torch.empty(hidden.shape[0], dtype=acc, device=hidden.device)
    target_logit = torch.empty_like(lse)
    grads = gradient_buffers(hidden, weight_acc, bias_acc, need_weight_grad, need_bias_grad, need_hidden_grad)
    for start, stop in row_chunks(hidden.shape[0], weight.shape[0], acc):
        rows = slice(start, stop)
        logits = chunk_logits(hidden[rows], weight_acc, bias_acc, softcap)
        lse[rows] = torch.logsumexp(logits, dim=1)
        target_logit[rows] = logits.gather(1, target[rows, None]).squeeze(1)
        if label_smoothing:
            target_logit[rows] = (1 - label_smoothing) * target_logit[rows] + label_smoothing * logits.mean(dim=1)
        if any(g is not None for g in grads):
            _accumulate_chunk(logits, rows, hidden, weight_acc, target, lse, grad_scale, softcap, label_smoothing,
                              grads)
    return (lse, target_logit) + grads


def backward(hidden, weight, bias, target, lse, grad_scale, need_weight_grad, need_bias_grad,
             need_hidden_grad=True, softcap=None, label_smoothing=0.0):
    """(d_hidden [M, H], d_weight [V, H], d_bias [V]), each None unless asked for, in the accumulation dtype."""
    acc = accumulation_dtype(hidden)
    weight_acc, bias_acc = upcast(weight, acc), upcast(bias, acc)
    grads = gradient_buffers(hidden, weight_acc, bias_acc, need_weight_grad, need_bias_grad, need_hidden_grad)
    for start, stop in row_chunks(hidden.shape[0], weight.shape[0], acc):
        rows = slice(start, stop)
        logits = chunk_logits(hidden[rows], weight_acc, bias_acc, softcap)
        _accumulate_chunk(logits, rows, hidden, weight_acc, target, lse, grad_scale, softcap, label_smoothing, grads)
    return grads


def _accumulate_chunk(logits, rows, hidden, weight_acc, target, lse, grad_scale, softcap, label_smoothing, grads):
    """Backpropagates the loss of the rows `rows` from their logits (overwritten) into grads = (d_hidden, d_weight,
    d_bias)."""
    grad_logits = softmax_of(logits, lse[rows], softcap)
    grad_logits[torch.arange(grad_logits.shape[0], device=logits.device), target[rows]] -= 1.0 - label_smoothing
    if label_smoothing:
        grad_logits -= label_smoothing / grad_logits.shape[1]
    grad_logits = through_softcap(grad_logits, logits, softcap).mul_(grad_scale[rows, None])
    d_hidden, d_weight, d_bias = grads
    accumulate_grads(grad_logits, hidden[rows], weight_acc, None if d_hidden is None else d_hidden[rows], d_weight,
                     d_bias)
