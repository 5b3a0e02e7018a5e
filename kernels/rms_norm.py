"""Triton RMSNorm over the last dimension, in one launch, with the rounding of Hugging Face's RMSNorm modules.

A Hugging Face RMSNorm runs some eight elementwise kernels (upcast, square, mean, add, rsqrt, multiply, downcast,
weight); a model forward that is bound by launches (a 1B model's decode step or tree extension) runs two or more
per layer. Here a program normalises one row in fp32 and applies the weight as the module does:
- Llama's (and Mistral's, Qwen's, Mixtral's): the normalised row is rounded to the input's dtype, then multiplied by
  the weight, which has that dtype (`weight * x.to(dtype)`: a 16-bit product, rounded once more);
- Gemma's: multiplied in fp32 by 1 + weight, rounded once (`weight_offset` 1.0);
- OLMo 2's: multiplied in fp32 by the weight, rounded once.
The sum of squares is reduced in another order than torch's, so 16-bit outputs may differ from the module's by one
unit in the last place, as two GPUs' reductions do.

With a residual (`rms_norm_after_add`), the kernel first adds it to the row, rounds the sum to the row's dtype as
torch's `h + y` does, stores it (the layer's new residual stream) and normalises that: the add before each of a
layer's norms costs no launch of its own.
"""
import torch
import triton
import triton.language as tl

from .device_guard import on_device_of_first_input


@triton.jit(do_not_specialize=["num_cols", "stride_x", "stride_y", "stride_sum", "stride_out"])
def _rms_norm_kernel(X, Y, Sum, Weight, Out, num_cols, eps, weight_offset, stride_x, stride_y, stride_sum, stride_out,
                     ADD: tl.constexpr, ROUND_BEFORE_WEIGHT: tl.constexpr, BLOCK: tl.constexpr):
    """out[row] = normalised x[row] times (weight + weight_offset), rounded as the module rounds; with ADD, of
    sum[row] = x[row] + y[row] (rounded to the dtype, and stored) instead of x[row]."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    ok = cols < num_cols
    x = tl.load(X + row * stride_x + cols, mask=ok, other=0.0)
    if ADD:
        x = (x.to(tl.float32) + tl.load(Y + row * stride_y + cols, mask=ok, other=0.0).to(tl.float32)).to(x.dtype)
        tl.store(Sum + row * stride_sum + cols, x, mask=ok)
    x = x.to(tl.float32)
    normalised = x * tl.math.rsqrt(tl.sum(x * x, 0) / num_cols + eps)
    if ROUND_BEFORE_WEIGHT:
        normalised = normalised.to(Out.dtype.element_ty).to(tl.float32)
    weight = tl.load(Weight + cols, mask=ok, other=0.0).to(tl.float32) + weight_offset
    tl.store(Out + row * stride_out + cols, (normalised * weight).to(Out.dtype.element_ty), mask=ok)


@on_device_of_first_input
def rms_norm_triton(x, weight, eps, *, weight_offset=0.0, round_before_weight=True):
    """RMSNorm of x [..., D] (last dimension contiguous) with weight [D]; the output has x's shape and dtype."""
    return _launch(x, None, weight, eps, weight_offset, round_before_weight)[1]


@on_device_of_first_input
def rms_norm_after_add(x, y, weight, eps, *, weight_offset=0.0, round_before_weight=True):
    """(x + y, its RMSNorm) for x, y [..., D] of one dtype (last dimensions contiguous), as torch's `s = x + y` and
    the module's norm(s) compute them, in one launch."""
    return _launch(x, y, weight, eps, weight_offset, round_before_weight)


def _launch(x, y, weight, eps, weight_offset, round_before_weight):
    """(x + y or None, the norm) of the rows of x (and y)."""
    rows = x.reshape(-1, x.shape[-1])
    out = torch.empty(rows.shape, dtype=x.dtype, device=x.device)
    y_rows = rows if y is None else y.reshape(rows.shape)
    total = rows if y is None else torch.empty_like(out)
    if rows.shape[0]:
        block = triton.next_power_of_2(rows.shape[1])
        _rms_norm_kernel[(rows.shape[0],)](
            rows, y_rows, total, weight, out, rows.shape[1], float(eps), float(weight_offset), rows.stride(0),
            y_rows.stride(0), total.stride(0), out.stride(0), ADD=y is not None,
            ROUND_BEFORE_WEIGHT=round_before_weight, BLOCK=block, num_warps=min(16, max(1, block // 256)),
            enable_fp_fusion=True)
    return None if y is None else total.view(x.shape), out.view(x.shape)
