"""Triton rotary position embedding of a layer's queries and keys, in place, in one launch.

Hugging Face's rotation `x * cos + rotate_half(x) * sin` (rotate_half: [x1, x2] -> [-x2, x1] over the halves of
head_dim) runs five elementwise kernels for q and five for k, every layer. A program here rotates every query and
key head of one token. Rounding follows torch's: where cos and sin have the dtype of q (a 16-bit model's rotary
embedding), each product and the sum are rounded to it, as three 16-bit torch ops round; otherwise (OLMo 3 rotates
a bf16 model with fp32 cos and sin) the rotation is computed in fp32 and rounded once.

With `store` the program also writes the token's rotated keys and its values to its slot of the paged KV cache,
which would otherwise take one scatter launch for K and one for V, every layer. With `head_norms` it first applies
the RMSNorm that Qwen3's and Gemma 3's q_norm and k_norm modules apply over each head (OLMo's: over all the heads of
a token), rounded as kernels/rms_norm.py rounds it: two launches a layer fewer again.
"""
import triton
import triton.language as tl

from .device_guard import on_device_of_first_input


@triton.jit
def _weighted(normalised, weight, dtype, ROUND_BEFORE_WEIGHT: tl.constexpr):
    """Normalised values times their weights (fp32, the offset added), rounded as the norm module rounds (see
    kernels/rms_norm.py); in fp32."""
    if ROUND_BEFORE_WEIGHT:
        normalised = normalised.to(dtype).to(tl.float32)
    return (normalised * weight).to(dtype).to(tl.float32)


@triton.jit
def _rotate_heads(X, token, stride_t, stride_h, num_heads, cos1, cos2, sin1, sin2, Cache, slot, stride_cs, stride_ch,
                  W, eps, weight_offset, HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr,
                  ROUND_EACH_OP: tl.constexpr, STORE: tl.constexpr, NORM: tl.constexpr,
                  ROUND_BEFORE_WEIGHT: tl.constexpr, OVER_HEADS: tl.constexpr):
    """Rotates the num_heads heads of one token of X [T, heads, 2 * HALF] in place, with NORM after an RMSNorm of
    each head by weight W [2 * HALF] (with OVER_HEADS, of all the token's heads at once by W [heads * 2 * HALF]);
    with STORE, also writes them to row `slot` of Cache [slots, heads, 2 * HALF]."""
    heads = tl.arange(0, BLOCK_H)
    d = tl.arange(0, BLOCK_HALF)
    ok = (heads[:, None] < num_heads) & (d[None, :] < HALF)
    first = X + token * stride_t + heads[:, None] * stride_h + d[None, :]
    x1 = tl.load(first, mask=ok, other=0.0)
    x2 = tl.load(first + HALF, mask=ok, other=0.0)
    dtype = x1.dtype
    x1 = x1.to(tl.float32)
    x2 = x2.to(tl.float32)
    if NORM:
        squares = tl.sum(x1 * x1, 1) + tl.sum(x2 * x2, 1)
        if OVER_HEADS:   # OLMo's q_norm and k_norm: one RMSNorm over the whole projection of the token
            rstd = tl.math.rsqrt(tl.sum(squares, 0) / (num_heads * 2 * HALF) + eps)
            weights = W + heads[:, None] * (2 * HALF) + d[None, :]
            w1 = tl.load(weights, mask=ok, other=0.0)
            w2 = tl.load(weights + HALF, mask=ok, other=0.0)
        else:            # Qwen3's and Gemma 3's: one RMSNorm per head
            rstd = tl.math.rsqrt(squares / (2 * HALF) + eps)[:, None]
            w1 = tl.load(W + d, mask=d < HALF, other=0.0)[None, :]
            w2 = tl.load(W + HALF + d, mask=d < HALF, other=0.0)[None, :]
        x1 = _weighted(x1 * rstd, w1.to(tl.float32) + weight_offset, dtype, ROUND_BEFORE_WEIGHT)
        x2 = _weighted(x2 * rstd, w2.to(tl.float32) + weight_offset, dtype, ROUND_BEFORE_WEIGHT)
    if ROUND_EACH_OP:   # three 16-bit ops: each result rounded to the heads' dtype
        out1 = (x1 * cos1).to(dtype).to(tl.float32) - (x2 * sin1).to(dtype).to(tl.float32)
        out2 = (x2 * cos2).to(dtype).to(tl.float32) + (x1 * sin2).to(dtype).to(tl.float32)
    else:
        out1 = x1 * cos1 - x2 * sin1
        out2 = x2 * cos2 + x1 * sin2
    tl.store(first, out1.to(dtype), mask=ok)
    tl.store(first + HALF, out2.to(dtype), mask=ok)
    if STORE:
        _copy_heads(out1.to(dtype), out2.to(dtype), Cache, slot, stride_cs, stride_ch, heads, d, ok, HALF)


@triton.jit
def _copy_heads(first_half, second_half, Cache, slot, stride_cs, stride_ch, heads, d, ok, HALF: tl.constexpr):
    """Writes a token's heads (their two halves, [heads, HALF] each) to row `slot` of Cache."""
    row = Cache + slot * stride_cs + heads[:, None] * stride_ch + d[None, :]
    tl.store(row, first_half.to(Cache.dtype.element_ty), mask=ok)
    tl.store(row + HALF, second_half.to(Cache.dtype.element_ty), mask=ok)


@triton.jit(do_not_specialize=["stride_qt", "stride_qh", "stride_kt", "stride_kh", "stride_vt", "stride_vh",
                               "stride_ct", "stride_st", "stride_cs", "stride_ch"])
def _rotary_kernel(Q, K, V, Cos, Sin, KCache, VCache, Slots, QWeight, KWeight, num_q_heads, num_k_heads, stride_qt,
                   stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ct, stride_st, stride_cs, stride_ch,
                   q_eps, k_eps, weight_offset, HALF: tl.constexpr, BLOCK_QH: tl.constexpr, BLOCK_KH: tl.constexpr,
                   BLOCK_HALF: tl.constexpr, ROUND_EACH_OP: tl.constexpr, STORE: tl.constexpr, NORM: tl.constexpr,
                   ROUND_BEFORE_WEIGHT: tl.constexpr, OVER_HEADS: tl.constexpr):
    """Token program_id(0)'s query and key heads (with NORM, RMSNorm-ed by QWeight, KWeight first), rotated by its
    cos and sin [2 * HALF]; with STORE, its rotated keys and its values V written to its slot Slots[token] of KCache
    and VCache [slots, kv heads, 2 * HALF]."""
    token = tl.program_id(0).to(tl.int64)
    d = tl.arange(0, BLOCK_HALF)
    ok = d < HALF
    cos1 = tl.load(Cos + token * stride_ct + d, mask=ok, other=0.0).to(tl.float32)[None, :]
    cos2 = tl.load(Cos + token * stride_ct + HALF + d, mask=ok, other=0.0).to(tl.float32)[None, :]
    sin1 = tl.load(Sin + token * stride_st + d, mask=ok, other=0.0).to(tl.float32)[None, :]
    sin2 = tl.load(Sin + token * stride_st + HALF + d, mask=ok, other=0.0).to(tl.float32)[None, :]
    slot = 0
    if STORE:
        slot = tl.load(Slots + token)
    _rotate_heads(Q, token, stride_qt, stride_qh, num_q_heads, cos1, cos2, sin1, sin2, KCache, slot, stride_cs,
                  stride_ch, QWeight, q_eps, weight_offset, HALF, BLOCK_QH, BLOCK_HALF, ROUND_EACH_OP, False, NORM,
                  ROUND_BEFORE_WEIGHT, OVER_HEADS)
    _rotate_heads(K, token, stride_kt, stride_kh, num_k_heads, cos1, cos2, sin1, sin2, KCache, slot, stride_cs,
                  stride_ch, KWeight, k_eps, weight_offset, HALF, BLOCK_KH, BLOCK_HALF, ROUND_EACH_OP, STORE, NORM,
                  ROUND_BEFORE_WEIGHT, OVER_HEADS)
    if STORE:
        heads = tl.arange(0, BLOCK_KH)
        kv_ok = (heads[:, None] < num_k_heads) & ok[None, :]
        first = V + token * stride_vt + heads[:, None] * stride_vh + d[None, :]
        _copy_heads(tl.load(first, mask=kv_ok, other=0.0), tl.load(first + HALF, mask=kv_ok, other=0.0), VCache,
                    slot, stride_cs, stride_ch, heads, d, kv_ok, HALF)


def rotary_warps(block_heads, block_half):
    """Warps for a program's tile of query heads x half a head: 8 elements of it per thread (no register spills up
    to 64 heads of 128 dimensions), 4 to 16 warps."""
    return min(16, max(4, block_heads * block_half // 256))


@on_device_of_first_input
def rotate_qk_triton(q, k, cos, sin, store=None, head_norms=None):
    """Rotates q [T, q_heads, D] and k [T, kv_heads, D] in place by cos, sin [T, D] (last dimensions contiguous;
    D even); returns (q, k). With store = (v, k_cache, v_cache, slot_mapping), also writes the rotated k and v
    [T, kv_heads, D] to the slots of the paged caches [num_blocks, block_size, kv_heads, D] (of one layout, their
    blocks and slots one dimension), as write_kv does. With head_norms = dict(q_weight, k_weight [D], q_eps, k_eps,
    weight_offset, round_before_weight, over_heads), each head of q and k is first RMSNorm-ed as rms_norm.forward
    would; with over_heads, all of a token's q heads (k heads) at once, by weights [heads * D]."""
    num_tokens, num_q_heads, head_dim = q.shape
    v, k_cache, v_cache, slots = store if store is not None else (k, k, k, k)
    if store is not None:
        k_cache, v_cache = (cache.view(-1, *cache.shape[2:]) for cache in (k_cache, v_cache))
    norms = head_norms or dict(q_weight=q, k_weight=k, q_eps=0.0, k_eps=0.0, weight_offset=0.0,
                               round_before_weight=False, over_heads=False)
    if num_tokens:
        half = head_dim // 2
        block_qh, block_half = triton.next_power_of_2(num_q_heads), triton.next_power_of_2(half)
        _rotary_kernel[(num_tokens,)](
            q, k, v, cos, sin, k_cache, v_cache, slots, norms["q_weight"], norms["k_weight"], num_q_heads, k.shape[1],
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), cos.stride(0),
            sin.stride(0), k_cache.stride(0), k_cache.stride(1), float(norms["q_eps"]), float(norms["k_eps"]),
            float(norms["weight_offset"]), HALF=half, BLOCK_QH=block_qh,
            BLOCK_KH=triton.next_power_of_2(k.shape[1]), BLOCK_HALF=block_half, ROUND_EACH_OP=cos.dtype == q.dtype,
            STORE=store is not None, NORM=head_norms is not None,
            ROUND_BEFORE_WEIGHT=bool(norms["round_before_weight"]), OVER_HEADS=bool(norms["over_heads"]),
            num_warps=rotary_warps(block_qh, block_half),
            enable_fp_fusion=False)
    return q, k
