"""Row chunking and the shared pieces of the chunked torch path.

At most one chunk of rows x V logits (fp32; float64 for float64 inputs), plus a small constant number
of same-size temporaries, is alive at any time; CHUNK_BYTES sets that budget per temporary.
"""
import torch

CHUNK_BYTES = 32 * 1024 * 1024


def row_chunks(num_rows, vocab_size, dtype):
    """(start, stop) slices of rows such that one [rows, V] buffer of `dtype` stays within CHUNK_BYTES."""
    step = max(1, CHUNK_BYTES // (dtype.itemsize * vocab_size))
    for start in range(0, num_rows, step):
        yield start, min(start + step, num_rows)


def accumulation_dtype(t):
    """fp32 for fp32 and half-precision inputs; float64 inputs (gradcheck) keep float64."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def upcast(t, dtype):
    """`t` in the accumulation dtype, or None; half-precision weights are upcast once per call."""
    return None if t is None else t.to(dtype)


def chunk_logits(hidden, weight_acc, bias_acc, softcap=None):
    """hidden [c, H] @ weight_acc.T (+ bias_acc), computed and returned in the accumulation dtype [c, V];
    soft-capped, softcap * tanh(z / softcap), unless softcap is None."""
    logits = hidden.to(weight_acc.dtype) @ weight_acc.t()
    if bias_acc is not None:
        logits += bias_acc
    if softcap is not None:
        logits = logits.div_(softcap).tanh_().mul_(softcap)
    return logits


def softmax_of(logits, lse, softcap):
    """exp(logits - lse) [c, V]: in place of the logits, unless the soft cap's derivative still needs them."""
    return (logits.clone() if softcap is not None else logits).sub_(lse[:, None]).exp_()


def through_softcap(grad_logits, capped_logits, softcap):
    """The gradient wrt the raw logits from the one wrt the soft-capped ones (in place): times 1 - tanh^2."""
    if softcap is not None:
        grad_logits *= 1.0 - (capped_logits / softcap).square_()
    return grad_logits


def gradient_buffers(hidden, weight_acc, bias_acc, need_weight_grad, need_bias_grad, need_hidden_grad):
    """(d_hidden [M, H], d_weight [V, H], d_bias [V]) in the accumulation dtype, zeros where summed over chunks; each
    None unless asked for."""
    return (torch.empty(hidden.shape, dtype=weight_acc.dtype, device=hidden.device) if need_hidden_grad else None,
            torch.zeros_like(weight_acc) if need_weight_grad else None,
            torch.zeros_like(bias_acc) if need_bias_grad else None)


def accumulate_grads(grad_logits, hidden, weight_acc, d_hidden, d_weight, d_bias):
    """Backpropagates grad_logits [c, V] of one chunk through `hidden @ weight.T + bias`.

    Writes d_hidden [c, H]; adds into the whole-vocabulary d_weight [V, H] and d_bias [V]; each when not None.
    """
    if d_hidden is not None:
        torch.mm(grad_logits, weight_acc, out=d_hidden)
    if d_weight is not None:
        d_weight.addmm_(grad_logits.t(), hidden.to(weight_acc.dtype))
    if d_bias is not None:
        d_bias += grad_logits.sum(0)
