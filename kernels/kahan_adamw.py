"""Triton AdamW step with Kahan-compensated bf16 weights: one launch and one pass over a parameter's tensors.

A bf16 weight has 8 significant bits. An AdamW update of lr 2e-6 to a weight of 0.02 is about a sixtieth of the
weight's last place, so rounding the updated weight to bf16 gives back the weight itself: after 300 such steps
torch's AdamW on bf16 weights had lost 98.8% of the movement of AdamW in float64 (bench_optimizer.py). Here each bf16
weight has a compensation (bf16 too) that holds what the rounding lost and is added to the next update, so that
weight + compensation follows the sum of the updates (see fastalign.optim.kahan_adamw). A program reads a block of
the weight, its gradient, both moments and the compensation once and writes all but the gradient once: 18 bytes an
element in bf16, the least the step can move.

The arithmetic is that of fastalign.ops.torch_chunked.kahan_adamw, operation for operation in fp32, each rounded as
torch rounds it (no contraction to FMA, IEEE division and square root), so the two give the same bits from the same
host-side scalars (fastalign.optim.kahan_adamw.step_scalars).

Launcher contract of `step` (fastalign.ops.backend): param, grad, exp_avg, exp_avg_sq and compensation (or None)
of one shape and device, contiguous, updated in place.
"""
import triton
import triton.language as tl

from .device_guard import on_device_of_first_input

_BLOCK = 1024


@triton.jit
def _kahan_adamw_kernel(Param, Grad, ExpAvg, ExpAvgSq, Compensation, numel, beta1, one_minus_beta1, beta2,
                        one_minus_beta2, eps, decay, step_size, bias_correction2_sqrt, COMPENSATE: tl.constexpr,
                        BLOCK: tl.constexpr):
    """One AdamW step of a block of contiguous elements (see the torch implementation for the formulas)."""
    at = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = at < numel
    g = tl.load(Grad + at, mask=ok, other=0.0).to(tl.float32)
    w = tl.load(Param + at, mask=ok, other=0.0).to(tl.float32)
    m = tl.load(ExpAvg + at, mask=ok, other=0.0).to(tl.float32) * beta1 + g * one_minus_beta1
    v = tl.load(ExpAvgSq + at, mask=ok, other=0.0).to(tl.float32) * beta2 + (g * one_minus_beta2) * g
    denom = tl.div_rn(tl.sqrt_rn(v), bias_correction2_sqrt) + eps
    update = -(w * decay) - tl.div_rn(m, denom) * step_size
    if COMPENSATE:
        y = update + tl.load(Compensation + at, mask=ok, other=0.0).to(tl.float32)
        new = (w + y).to(Param.dtype.element_ty)
        tl.store(Compensation + at, (y - (new.to(tl.float32) - w)).to(Compensation.dtype.element_ty), mask=ok)
    else:
        new = (w + update).to(Param.dtype.element_ty)
    tl.store(Param + at, new, mask=ok)
    tl.store(ExpAvg + at, m.to(ExpAvg.dtype.element_ty), mask=ok)
    tl.store(ExpAvgSq + at, v.to(ExpAvgSq.dtype.element_ty), mask=ok)


@on_device_of_first_input
def step(param, grad, exp_avg, exp_avg_sq, compensation, **scalars):
    """Updates contiguous param, exp_avg, exp_avg_sq and compensation (None: no compensation) in place from grad, all
    of one shape; `scalars` are fastalign.optim.kahan_adamw.step_scalars'."""
    numel = param.numel()
    if numel:
        _kahan_adamw_kernel[(triton.cdiv(numel, _BLOCK),)](
            param, grad, exp_avg, exp_avg_sq, param if compensation is None else compensation, numel, **scalars,
            COMPENSATE=compensation is not None, BLOCK=_BLOCK, num_warps=4, enable_fp_fusion=False)
