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
layer's norms costs no launch of its own. Where a family also normalises the sublayer's output before adding it
(the Gemmas' and OLMo's post-sublayer norms: `y_weight`), that norm runs in the same program first, and where no norm
follows the add (OLMo's layers, which read the stream itself: weight None), the sum is the second output too.

`backward` serves training (fastalign.ops.rms_norm, which saves the input row and not the fp32 copies and normalised
rows that the module's autograd keeps): a program takes a run of rows, recomputes each row's norm from it, writes its
gradient and sums the weight's gradient over its rows, rounding where the module's autograd rounds (the gradient of a
"rounded" normalised row is the 16-bit product of the output's gradient and the weight).

Launcher contract of `forward` and `backward` (fastalign.ops.backend): x [..., D] with its last dimension
contiguous, weight [D].
"""
import torch
import triton
import triton.language as tl

from .device_guard import on_device_of_first_input
from .linear_softmax_tiles import multiprocessor_count


@triton.jit
def _normalised(x, Weight, cols, ok, num_cols, eps, weight_offset, dtype, ROUND_BEFORE_WEIGHT: tl.constexpr):
    """The RMSNorm of the row x (fp32) times (weight + weight_offset), rounded to dtype as the module rounds."""
    normalised = x * tl.math.rsqrt(tl.sum(x * x, 0) / num_cols + eps)
    if ROUND_BEFORE_WEIGHT:
        normalised = normalised.to(dtype).to(tl.float32)
    weight = tl.load(Weight + cols, mask=ok, other=0.0).to(tl.float32) + weight_offset
    return (normalised * weight).to(dtype)


@triton.jit(do_not_specialize=["num_cols", "stride_x", "stride_y", "stride_sum", "stride_out"])
def _rms_norm_kernel(X, Y, Sum, Weight, YWeight, Out, num_cols, eps, y_eps, weight_offset, stride_x, stride_y,
                     stride_sum, stride_out, ADD: tl.constexpr, NORM_Y: tl.constexpr, NORM_OUT: tl.constexpr,
                     ROUND_BEFORE_WEIGHT: tl.constexpr, BLOCK: tl.constexpr):
    """out[row] = normalised x[row] times (weight + weight_offset), rounded as the module rounds; with ADD, of
    sum[row] = x[row] + y[row] (rounded to the dtype, and stored) instead of x[row], where with NORM_Y y[row] is first
    normalised by YWeight; without NORM_OUT, out is the sum itself."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    ok = cols < num_cols
    x = tl.load(X + row * stride_x + cols, mask=ok, other=0.0)
    dtype = Out.dtype.element_ty
    if ADD:
        y = tl.load(Y + row * stride_y + cols, mask=ok, other=0.0)
        if NORM_Y:
            y = _normalised(y.to(tl.float32), YWeight, cols, ok, num_cols, y_eps, weight_offset, dtype,
                            ROUND_BEFORE_WEIGHT)
        x = (x.to(tl.float32) + y.to(tl.float32)).to(x.dtype)
        tl.store(Sum + row * stride_sum + cols, x, mask=ok)
    if NORM_OUT:
        tl.store(Out + row * stride_out + cols, _normalised(x.to(tl.float32), Weight, cols, ok, num_cols, eps,
                                                            weight_offset, dtype, ROUND_BEFORE_WEIGHT), mask=ok)


@on_device_of_first_input
def forward(x, weight, eps, *, weight_offset=0.0, round_before_weight=True):
    """RMSNorm of x [..., D] (last dimension contiguous) with weight [D]; the output has x's shape and dtype."""
    return _launch(x, None, weight, eps, weight_offset, round_before_weight)[1]


@on_device_of_first_input
def rms_norm_after_add(x, y, weight, eps, *, weight_offset=0.0, round_before_weight=True, y_weight=None,
                       y_eps=None):
    """(x + y, its RMSNorm) for x, y [..., D] of one dtype (last dimensions contiguous), as torch's `s = x + y` and
    the module's norm(s) compute them, in one launch. With y_weight (and y_eps), y is first normalised as a module of
    the same rule would: (x + norm_y(y), its norm). With weight None, no norm follows: (x + ..., the same sum)."""
    return _launch(x, y, weight, eps, weight_offset, round_before_weight, y_weight, y_eps)


def _launch(x, y, weight, eps, weight_offset, round_before_weight, y_weight=None, y_eps=None):
    """(x + y or None, the norm) of the rows of x (and y). The kernel reads the weights as contiguous rows: a strided
    one (a slice) is copied first."""
    weight, y_weight = (None if w is None else w.contiguous() for w in (weight, y_weight))
    if x.shape[-1] == 0:   # rows of nothing to normalise (a reshape to [-1, 0] is ambiguous)
        total = None if y is None else x + y
        return total, x.clone() if total is None else total
    rows = x.reshape(-1, x.shape[-1])
    y_rows = rows if y is None else y.reshape(rows.shape)
    total = rows if y is None else torch.empty(rows.shape, dtype=x.dtype, device=x.device)
    out = total if weight is None else torch.empty(rows.shape, dtype=x.dtype, device=x.device)
    if rows.shape[0]:
        block = triton.next_power_of_2(rows.shape[1])
        _rms_norm_kernel[(rows.shape[0],)](
            rows, y_rows, total, rows if weight is None else weight, rows if y_weight is None else y_weight, out,
            rows.shape[1], float(eps or 0.0), float(y_eps or 0.0), float(weight_offset), rows.stride(0),
            y_rows.stride(0), total.stride(0), out.stride(0), ADD=y is not None, NORM_Y=y_weight is not None,
            NORM_OUT=weight is not None, ROUND_BEFORE_WEIGHT=round_before_weight, BLOCK=block,
            num_warps=min(16, max(1, block // 256)), enable_fp_fusion=True)
    total = None if y is None else total.view(x.shape)
    return total, total if weight is None else out.view(x.shape)


@triton.jit(do_not_specialize=["num_rows", "num_cols", "rows_per_program"])
def _rms_norm_backward_kernel(X, Weight, GradOut, GradX, GradWeightPartial, num_rows, num_cols, rows_per_program, eps,
                              weight_offset, ROUND_BEFORE_WEIGHT: tl.constexpr, BLOCK: tl.constexpr):
    """For the rows [program * rows_per_program, ...) of contiguous [num_rows, num_cols] tensors: grad_x of
    out = normalised x times (weight + weight_offset) given grad_out, and in GradWeightPartial[program] (fp32) the sum
    over those rows of the weight's gradient."""
    program = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    ok = cols < num_cols
    weight = tl.load(Weight + cols, mask=ok, other=0.0).to(tl.float32) + weight_offset
    grad_weight = tl.zeros((BLOCK,), dtype=tl.float32)
    first = program * rows_per_program
    for i in range(0, tl.minimum(rows_per_program, num_rows - first)):
        at = (first + i).to(tl.int64) * num_cols + cols
        x = tl.load(X + at, mask=ok, other=0.0)
        dtype = x.dtype
        x = x.to(tl.float32)
        grad_out = tl.load(GradOut + at, mask=ok, other=0.0).to(tl.float32)
        rstd = tl.math.rsqrt(tl.sum(x * x, 0) / num_cols + eps)
        normalised = x * rstd
        if ROUND_BEFORE_WEIGHT:   # out = weight * round(normalised), a product in the dtype
            grad_weight += grad_out * normalised.to(dtype).to(tl.float32)
            grad_normalised = (grad_out * weight).to(dtype).to(tl.float32)
        else:
            grad_weight += grad_out * normalised
            grad_normalised = grad_out * weight
        # d/dx of x * rsqrt(mean(x^2) + eps): rstd (g - normalised * mean(g * normalised))
        grad_x = rstd * (grad_normalised - normalised * (tl.sum(grad_normalised * normalised, 0) / num_cols))
        tl.store(GradX + at, grad_x.to(dtype), mask=ok)
    tl.store(GradWeightPartial + program * num_cols + cols, grad_weight, mask=ok)


def backward_num_warps(block):
    """Warps of a backward program for rows of `block` values: up to 32, so that a 70B model's 8192 values leave
    every array of the program in registers (16 warps spill fp32 rows there)."""
    return min(32, max(1, block // 256))


def _num_programs(device, num_rows):
    """Programs of the backward: two per SM on a GPU (each sums the weight's gradient over its rows), a few on the
    interpreter."""
    slots = 2 * multiprocessor_count(device) if device.type == "cuda" else 4
    return max(1, min(num_rows, slots))


@on_device_of_first_input
def backward(x, weight, grad_out, eps, *, weight_offset=0.0, round_before_weight=True):
    """(grad_x in x's dtype and shape, grad_weight in weight's dtype) of forward(x, weight, eps, ...) given grad_out
    (x's shape)."""
    if x.shape[-1] == 0:
        return torch.zeros_like(x), torch.zeros_like(weight)
    weight = weight.contiguous()
    rows = x.reshape(-1, x.shape[-1]).contiguous()
    grad_rows = grad_out.reshape(rows.shape).to(x.dtype).contiguous()
    grad_x = torch.empty_like(rows)
    num_rows, num_cols = rows.shape
    programs = _num_programs(x.device, num_rows)
    partial = torch.zeros((programs, num_cols), dtype=torch.float32, device=x.device)
    if num_rows:
        block = triton.next_power_of_2(num_cols)
        _rms_norm_backward_kernel[(programs,)](
            rows, weight, grad_rows, grad_x, partial, num_rows, num_cols, triton.cdiv(num_rows, programs),
            float(eps), float(weight_offset), ROUND_BEFORE_WEIGHT=round_before_weight, BLOCK=block,
            num_warps=backward_num_warps(block), enable_fp_fusion=True)
    return grad_x.view(x.shape), partial.sum(0).to(weight.dtype)
