"""One AdamW step with Kahan-compensated bf16 weights, in torch: fastalign.KahanAdamW's step on CPU tensors (and with
`backend="torch"` anywhere), and the arithmetic that the Triton kernel (fastalign.kernels.kahan_adamw) repeats to the
bit. Every operation is one fp32 torch operation, rounded once (no fused multiply-add), IEEE's, in the order the kernel
runs them, from the host-side scalars of fastalign.optim.kahan_adamw.step_scalars.
"""
import torch

from ..compiler_disable import compiler_disable

CHUNK = 1 << 22   # elements stepped at a time on an accelerator: each fp32 temporary takes 16 MiB, whatever the size
# on the CPU: temporaries of 256 KiB, which the allocator reuses and the caches hold across the step's ~30 passes
# (16 MiB ones were mapped afresh, page by page: 26500 page faults a step of 2M weights, 4x its CPU time)
CPU_CHUNK = 1 << 16


@compiler_disable(reason="KahanAdamW's step runs outside the compiled graph (one graph break a parameter): inductor "
                         "reads a bf16 weight it has just rounded back unrounded, which drops the compensation")
def step(param, grad, exp_avg, exp_avg_sq, compensation, **scalars):
    """Updates contiguous param, exp_avg, exp_avg_sq and compensation (None: no compensation) in place from grad, all
    of one shape, CHUNK elements at a time (CPU_CHUNK on the CPU); `scalars` are
    fastalign.optim.kahan_adamw.step_scalars'. Kept out of torch.compile's graphs: inductor (without
    emulate_precision_casts) fuses the weight's write with the compensation's read of it and takes the unrounded fp32
    sum for the rounded weight, so the compensation lost what rounding dropped (an explicit cast to bf16 in the graph
    is elided the same way)."""
    tensors = [t.view(-1) for t in (param, grad, exp_avg, exp_avg_sq)]
    flat_compensation = None if compensation is None else compensation.view(-1)
    size = CPU_CHUNK if param.device.type == "cpu" else CHUNK
    for start in range(0, param.numel(), size):
        chunk = [t[start:start + size] for t in tensors]
        _step_chunk(*chunk, None if compensation is None else flat_compensation[start:start + size], **scalars)


def _step_chunk(param, grad, exp_avg, exp_avg_sq, compensation, *, beta1, one_minus_beta1, beta2, one_minus_beta2, eps,
                decay, step_size, bias_correction2_sqrt):
    """The step of one chunk. The moments and the update are computed in fp32 (decay = lr * weight_decay,
    step_size = lr / (1 - beta1^t), bias_correction2_sqrt = sqrt(1 - beta2^t) at step t):

        m = beta1 m + (1 - beta1) g,  v = beta2 v + (1 - beta2) g^2
        update = -decay w - step_size m / (sqrt(v) / bias_correction2_sqrt + eps)

    Without compensation the weight becomes w + update, rounded to its dtype. With it, y = update + c, the weight
    becomes w' = round(w + y) and c = round(y - (w' - w)): what rounding the weight lost, added to the next update."""
    g, w = grad.float(), param.to(torch.float32, copy=True)   # a copy: param changes below
    m = exp_avg.float() * beta1 + g * one_minus_beta1
    # ((1 - beta2) g) g, as torch's AdamW (addcmul) takes it: finite up to |g| ~ 5.8e20, where g g overflows at 1.8e19
    v = exp_avg_sq.float() * beta2 + (g * one_minus_beta2) * g
    # the square root correctly rounded (torch's CPU one is not always; a double's, rounded to fp32, is) and the
    # division by a tensor (torch divides a CUDA tensor by a host scalar as a product with its reciprocal), filled on
    # the device (a copy from the host would wait for the device's queued work)
    divisor = v.new_full((), bias_correction2_sqrt)
    denom = v.double().sqrt().float() / divisor + eps
    update = -(w * decay) - (m / denom) * step_size
    if compensation is None:
        param.copy_(w + update)
    else:
        y = update + compensation.float()
        param.copy_(w + y)
        compensation.copy_(y - (param.float() - w))
    exp_avg.copy_(m)
    exp_avg_sq.copy_(v)
