"""Triton rotary position embedding of a layer's queries and keys, in place, in one launch.

Hugging Face's rotation `x * cos + rotate_half(x) * sin` (rotate_half: [x1, x2] -> [-x2, x1] over the halves of
head_dim) runs five elementwise kernels for q and five for k, every layer. A program here rotates every query and
key head of one token. Rounding follows torch's: where cos and sin have the dtype of q (a 16-bit model's rotary
embedding), each product and the sum are rounded to it, as three 16-bit torch ops round; otherwise (OLMo 3 rotates
a bf16 model with fp32 cos and sin) the rotation is computed in fp32 and rounded once.
"""
import triton
import triton.language as tl

from .device_guard import on_device_of_first_input


@triton.jit
def _rotate_heads(X, token, stride_t, stride_h, num_heads, cos1, cos2, sin1, sin2,
                  HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr, ROUND_EACH_OP: tl.constexpr):
    """Rotates the num_heads heads of one token of X [T, heads, 2 * HALF] in place."""
    heads = tl.arange(0, BLOCK_H)
    d = tl.arange(0, BLOCK_HALF)
    ok = (heads[:, None] < num_heads) & (d[None, :] < HALF)
    first = X + token * stride_t + heads[:, None] * stride_h + d[None, :]
    x1 = tl.load(first, mask=ok, other=0.0)
    x2 = tl.load(first + HALF, mask=ok, other=0.0)
    dtype = x1.dtype
    x1 = x1.to(tl.float32)
    x2 = x2.to(tl.float32)
    if ROUND_EACH_OP:   # three 16-bit ops: each result rounded to the heads' dtype
        out1 = (x1 * cos1).to(dtype).to(tl.float32) - (x2 * sin1).to(dtype).to(tl.float32)
        out2 = (x2 * cos2).to(dtype).to(tl.float32) + (x1 * sin2).to(dtype).to(tl.float32)
    else:
        out1 = x1 * cos1 - x2 * sin1
        out2 = x2 * cos2 + x1 * sin2
    tl.store(first, out1.to(dtype), mask=ok)
    tl.store(first + HALF, out2.to(dtype), mask=ok)


@triton.jit(do_not_specialize=["stride_qt", "stride_qh", "stride_kt", "stride_kh", "stride_ct", "stride_st"])
def _rotary_kernel(Q, K, Cos, Sin, num_q_heads, num_k_heads, stride_qt, stride_qh, stride_kt, stride_kh,
                   stride_ct, stride_st, HALF: tl.constexpr, BLOCK_QH: tl.constexpr, BLOCK_KH: tl.constexpr,
                   BLOCK_HALF: tl.constexpr, ROUND_EACH_OP: tl.constexpr):
    """Token program_id(0)'s query and key heads, rotated by its cos and sin [2 * HALF]."""
    token = tl.program_id(0).to(tl.int64)
    d = tl.arange(0, BLOCK_HALF)
    ok = d < HALF
    cos1 = tl.load(Cos + token * stride_ct + d, mask=ok, other=0.0).to(tl.float32)[None, :]
    cos2 = tl.load(Cos + token * stride_ct + HALF + d, mask=ok, other=0.0).to(tl.float32)[None, :]
    sin1 = tl.load(Sin + token * stride_st + d, mask=ok, other=0.0).to(tl.float32)[None, :]
    sin2 = tl.load(Sin + token * stride_st + HALF + d, mask=ok, other=0.0).to(tl.float32)[None, :]
    _rotate_heads(Q, token, stride_qt, stride_qh, num_q_heads, cos1, cos2, sin1, sin2, HALF, BLOCK_QH, BLOCK_HALF,
                  ROUND_EACH_OP)
    _rotate_heads(K, token, stride_kt, stride_kh, num_k_heads, cos1, cos2, sin1, sin2, HALF, BLOCK_KH, BLOCK_HALF,
                  ROUND_EACH_OP)


def rotary_warps(block_heads, block_half):
    """Warps for a program's tile of query heads x half a head: 8 elements of it per thread (no register spills up
    to 64 heads of 128 dimensions), 4 to 16 warps."""
    return min(16, max(4, block_heads * block_half // 256))


@on_device_of_first_input
def rotate_qk_triton(q, k, cos, sin):
    """Rotates q [T, q_heads, D] and k [T, kv_heads, D] in place by cos, sin [T, D] (last dimensions contiguous;
    D even); returns (q, k)."""
    num_tokens, num_q_heads, head_dim = q.shape
    if num_tokens:
        half = head_dim // 2
        block_qh, block_half = triton.next_power_of_2(num_q_heads), triton.next_power_of_2(half)
        _rotary_kernel[(num_tokens,)](
            q, k, cos, sin, num_q_heads, k.shape[1], q.stride(0), q.stride(1), k.stride(0), k.stride(1),
            cos.stride(0), sin.stride(0), HALF=half, BLOCK_QH=block_qh, BLOCK_KH=triton.next_power_of_2(k.shape[1]),
            BLOCK_HALF=block_half, ROUND_EACH_OP=cos.dtype == q.dtype, num_warps=rotary_warps(block_qh, block_half),
            enable_fp_fusion=False)
    return q, k
