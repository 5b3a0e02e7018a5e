"""Triton kernels of the fused linear forward KL: KL_t(P || Q), Q = softmax(x W^T + b), P = softmax(x_ref W_ref^T
+ b_ref) (each bias optional; both logits soft-capped, c tanh(z / c), for a model with final_logit_softcapping = c).

P is the frozen reference (no gradient). Neither [M, V] logits matrix exists in memory: the forward
streams over the vocabulary once, the backward recomputes both logits chunk by chunk from the saved
logsumexps, and chunked_backward.py takes the products of each gradient chunk.
When W_ref is W (a frozen lm_head shared by both models) each weight chunk is loaded once for both products.
forward_with_gradients does the forward and the backward at once for a block of rows at a time, from the block's
whole logits rows of both heads, which library matmuls write into fp32 buffers that the same kernels read
(FROM_BUFFER) instead of computing tiles (one matmul over both heads' rows when they share W).

Accuracy of the one-pass KL. With d_v = zp_v - zq_v,
    KL = E_p[d] - (lse_p - lse_q) = E_p[d] + log E_p[exp(-d)].
The first form subtracts two logsumexps of size ~|z| + log V, so in fp32 it carries an absolute error
of ~1e-6 whatever the KL: useless when P ~ Q (KL ~ Var_p(d) / 2). The second form accumulates
E_p[expm1(-d)] term by term (expm1 is exact to rounding for small d) and finishes with log1p, so its
error scales with |d|. It is used whenever |lse_p - lse_q| <= 1 and its sum stayed finite (an exp
can overflow only when Q dwarfs P on some columns); the first form otherwise, where log1p would lose
digits if E_p[exp(-d)] is near 0. Words P gives no mass (a bias of -inf) add 0 to E_p[d]; Q's mass on them
enters E_p[exp(-d)] as exp(zq - m_p), or, while the running max m_p is still -inf, makes that sum non-finite and
so selects the first form, which counts it through lse_q; words that both heads mask add nothing.
Left unhandled: logits that differ by a near-constant shift c, to which the KL is blind, cost either form
~1e-7 |c| (or ~1e-7 |lse|) absolute.

Launcher contract (the autograd Function in fastalign.ops calls these): inputs are validated, contiguous,
on one device, masked rows already removed (M >= 1).
"""
import torch
import triton
import triton.language as tl

from .chunked_backward import backward_in_chunks, library_logits, row_block_plan
from .device_guard import on_device_of_first_input
from .linear_softmax_tiles import (autotune_tiles, chunk_grid, forward_grid, head_logits, logits_tile_pair,
                                   merge_splits, online_logsumexp, store_gradient_tile, vocab_splits)

# split_stats rows of the forward kernel
_Q_MAX, _Q_SUMEXP, _P_MAX, _P_SUMEXP, _P_DIFF, _P_EXPM1 = range(6)
# below this |d|, expm1(-d) comes from its Taylor series; above it, exp(-d) - 1 is already accurate
_EXPM1_SERIES_LIMIT = 0.5
# |lse_p - lse_q| up to which the log1p form is used (keeps E_p[exp(-d)] in [e^-1, e])
_LOG1P_FORM_LIMIT = 1.0


@triton.jit
def _expm1_series(x):
    """exp(x) - 1 for |x| <= 0.5, by Horner on x (1 + x/2 (1 + x/3 (... (1 + x/8)))); error < 1e-8 relative."""
    r = 1.0 + x / 8.0
    r = 1.0 + x / 7.0 * r
    r = 1.0 + x / 6.0 * r
    r = 1.0 + x / 5.0 * r
    r = 1.0 + x / 4.0 * r
    r = 1.0 + x / 3.0 * r
    r = 1.0 + x / 2.0 * r
    return x * r


@autotune_tiles(streams=2, key=["H", "H_REF", "V", "SHARED_WEIGHT", "HAS_BIAS", "HAS_REF_BIAS", "HAS_SOFTCAP",
                                 "FROM_BUFFER"])
@triton.jit
def _forward_kernel(x_ptr, w_ptr, b_ptr, xr_ptr, wr_ptr, br_ptr, z_ptr, zr_ptr, split_stats_ptr, softcap,
                    M, H, H_REF, V, V_PER_SPLIT, NUM_SPLITS, Z_STRIDE,
                    SHARED_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_REF_BIAS: tl.constexpr,
                    HAS_SOFTCAP: tl.constexpr, FROM_BUFFER: tl.constexpr, EXPM1_SERIES_LIMIT: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr):
    """Program (split, row block): streaming statistics of zq = x W^T + b and zp = x_ref W_ref^T + b_ref on its range.

    split_stats is [6, M, NUM_SPLITS]: max and sum exp(zq - max) of Q; max m_p and sum exp(zp - m_p) of P;
    sum exp(zp - m_p) * d and sum exp(zp - m_p) * expm1(-d), with d = zp - zq. FROM_BUFFER: x W^T and x_ref W_ref^T
    are read from the fp32 [M, V] buffers z and zr of row stride Z_STRIDE instead of computed.
    """
    split = tl.program_id(0) % NUM_SPLITS  # the split varies fastest: see forward_grid
    rows = (tl.program_id(0) // NUM_SPLITS) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < M
    v_start = split * V_PER_SPLIT
    v_end = tl.minimum(v_start + V_PER_SPLIT, V)
    load_end = v_end
    if FROM_BUFFER:   # tiles read up to the buffers' padded row end, a multiple of 16, so that their loads are
        load_end = Z_STRIDE   # vectorised at any V; the columns past v_end (the padding unset) are masked below

    q_max = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    q_sumexp = tl.zeros((BLOCK_M,), dtype=tl.float32)
    p_max = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    p_sumexp = tl.zeros((BLOCK_M,), dtype=tl.float32)
    p_diff = tl.zeros((BLOCK_M,), dtype=tl.float32)
    p_expm1 = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for v0 in range(v_start, v_end, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_mask = cols < v_end
        zq, zp = logits_tile_pair(x_ptr, w_ptr, xr_ptr, wr_ptr, z_ptr, zr_ptr, rows, cols, row_mask, cols < load_end,
                                  H, H_REF, Z_STRIDE, SHARED_WEIGHT, FROM_BUFFER, BLOCK_M, BLOCK_V, BLOCK_K)
        zq = head_logits(zq, b_ptr, cols, col_mask, softcap, HAS_BIAS, HAS_SOFTCAP)
        zp = head_logits(zp, br_ptr, cols, col_mask, softcap, HAS_REF_BIAS, HAS_SOFTCAP)
        d = tl.where(col_mask[None, :], zp - zq, 0.0)
        zq = tl.where(col_mask[None, :], zq, float("-inf"))
        zp = tl.where(col_mask[None, :], zp, float("-inf"))
        q_max, q_sumexp, _, _ = online_logsumexp(q_max, q_sumexp, zq)
        # e_v = exp(zp_v - m_p); alpha moves the sums kept relative to the old m_p onto the new one
        p_max, p_sumexp, alpha, e = online_logsumexp(p_max, p_sumexp, zp)
        # e_v * expm1(-d_v) = exp(zq_v - m_p) - e_v: series for small |d|, plain difference otherwise; -e_v where
        # Q gives no mass (exp(-inf - m_p) would be NaN while m_p is -inf, e.g. a word both biases mask)
        e_expm1 = tl.where(tl.abs(d) < EXPM1_SERIES_LIMIT, e * _expm1_series(-d),
                           tl.where(zq > float("-inf"), tl.exp(zq - p_max[:, None]) - e, -e))
        # a word P gives no mass (e = 0, e.g. a bias of -inf, where d may be infinite) adds 0 log 0 = 0, not NaN;
        # so does one whose mass underflows once m_p rises (alpha = 0: its e d of +inf, Q masking it, times 0)
        p_diff = tl.where(alpha > 0.0, p_diff * alpha, 0.0) + tl.sum(tl.where(e > 0.0, e * d, 0.0), axis=1)
        p_expm1 = p_expm1 * alpha + tl.sum(e_expm1, axis=1)

    stat = rows * NUM_SPLITS + split
    stat_stride = M * NUM_SPLITS
    tl.store(split_stats_ptr + stat, q_max, mask=row_mask)
    tl.store(split_stats_ptr + stat_stride + stat, q_sumexp, mask=row_mask)
    tl.store(split_stats_ptr + 2 * stat_stride + stat, p_max, mask=row_mask)
    tl.store(split_stats_ptr + 3 * stat_stride + stat, p_sumexp, mask=row_mask)
    tl.store(split_stats_ptr + 4 * stat_stride + stat, p_diff, mask=row_mask)
    tl.store(split_stats_ptr + 5 * stat_stride + stat, p_expm1, mask=row_mask)


@autotune_tiles(streams=2, key=["H", "H_REF", "SHARED_WEIGHT", "HAS_BIAS", "HAS_REF_BIAS", "HAS_SOFTCAP",
                                 "FROM_BUFFER"])
@triton.jit
def _gradient_kernel(x_ptr, w_ptr, b_ptr, xr_ptr, wr_ptr, br_ptr, z_ptr, zr_ptr, lse_ptr, ref_lse_ptr, scale_ptr,
                     g_ptr, softcap, M, H, H_REF, V, G_STRIDE, Z_STRIDE,
                     SHARED_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_REF_BIAS: tl.constexpr,
                     HAS_SOFTCAP: tl.constexpr, FROM_BUFFER: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr):
    """Program (row block, column tile) of one [M, V] chunk: recompute zq and zp (or, FROM_BUFFER, read them from
    the fp32 buffers z and zr of row stride Z_STRIDE), G = dKL/dzq * scale[:, None] = (q - p) * scale[:, None]
    with the saved logsumexps (times the soft cap's derivative wrt the raw logits of the policy with
    HAS_SOFTCAP)."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    row_mask = rows < M
    col_mask = cols < V

    zq, zp = logits_tile_pair(x_ptr, w_ptr, xr_ptr, wr_ptr, z_ptr, zr_ptr, rows, cols, row_mask, col_mask, H, H_REF,
                              Z_STRIDE, SHARED_WEIGHT, FROM_BUFFER, BLOCK_M, BLOCK_V, BLOCK_K)
    zq = head_logits(zq, b_ptr, cols, col_mask, softcap, HAS_BIAS, HAS_SOFTCAP)
    zp = head_logits(zp, br_ptr, cols, col_mask, softcap, HAS_REF_BIAS, HAS_SOFTCAP)
    lse = tl.load(lse_ptr + rows, mask=row_mask, other=0.0)
    ref_lse = tl.load(ref_lse_ptr + rows, mask=row_mask, other=0.0)
    scale = tl.load(scale_ptr + rows, mask=row_mask, other=0.0)
    g = tl.exp(zq - lse[:, None]) - tl.exp(zp - ref_lse[:, None])
    if HAS_SOFTCAP:
        g *= 1.0 - (zq / softcap) * (zq / softcap)
    store_gradient_tile(g_ptr, g * scale[:, None], rows, cols, row_mask, col_mask, G_STRIDE)


def _same_tensor(a, b):
    """True when b views exactly the memory of a (b is a, or e.g. a.detach()): one weight serves both models."""
    return (a is b) or (a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride()
                        and a.dtype == b.dtype)


@on_device_of_first_input
def forward(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, softcap=None):
    """hidden [M, H], weight [V, H], ref_hidden [M, H_ref], ref_weight [V, H_ref] (H_ref == H when shared), bias and
    ref_bias [V] or None.

    (kl, lse, ref_lse), fp32 [M] each: KL(P_t || Q_t) and the logsumexps of hidden @ weight^T + bias and of
    ref_hidden @ ref_weight^T + ref_bias, both soft-capped (softcap * tanh(z / softcap)) unless softcap is None."""
    return _forward(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, softcap)


def _forward(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, softcap, logits=None):
    """forward(), from both heads' products read from the fp32 buffers logits = (z, z_ref), each [M, V] and of one
    row stride, where given."""
    num_rows, hidden_size = hidden.shape
    vocab = weight.shape[0]
    num_splits, per_split = vocab_splits(num_rows, vocab, hidden.device)
    stats = torch.empty(6, num_rows, num_splits, dtype=torch.float32, device=hidden.device)
    z, z_ref = logits or (hidden, hidden)
    _forward_kernel[forward_grid(num_rows, num_splits)](
        hidden, weight, weight if bias is None else bias, ref_hidden, ref_weight,
        ref_weight if ref_bias is None else ref_bias, z, z_ref, stats, softcap or 0.0,
        num_rows, hidden_size, ref_hidden.shape[1], vocab, per_split, num_splits, z.stride(0) if logits else 0,
        SHARED_WEIGHT=_same_tensor(weight, ref_weight), HAS_BIAS=bias is not None, HAS_REF_BIAS=ref_bias is not None,
        HAS_SOFTCAP=softcap is not None, FROM_BUFFER=logits is not None,
        EXPM1_SERIES_LIMIT=_EXPM1_SERIES_LIMIT,
        enable_fp_fusion=True)
    lse, _ = merge_splits(stats[_Q_MAX], stats[_Q_SUMEXP])
    ref_lse, p_rescale = merge_splits(stats[_P_MAX], stats[_P_SUMEXP])
    p_sumexp = (stats[_P_SUMEXP] * p_rescale).sum(dim=1)
    mean_diff = torch.where(p_rescale > 0, stats[_P_DIFF] * p_rescale, 0.0).sum(dim=1) / p_sumexp  # E_p[d]
    mean_expm1 = (stats[_P_EXPM1] * p_rescale).sum(dim=1) / p_sumexp  # E_p[exp(-d)] - 1
    lse_gap = ref_lse - lse
    kl_log1p = mean_diff + torch.log1p(mean_expm1)
    kl_direct = mean_diff - lse_gap
    use_log1p = (lse_gap.abs() <= _LOG1P_FORM_LIMIT) & torch.isfinite(kl_log1p)
    return torch.where(use_log1p, kl_log1p, kl_direct), lse, ref_lse


def _write_gradient(x, weight, bias, x_ref, ref_weight, ref_bias, lse, ref_lse, row_scale, out, softcap, cols,
                    logits=None):
    """Launches _gradient_kernel over the chunk `out` (columns `cols` of the vocabulary; weights and biases whole):
    from tiles it computes, or from both heads' fp32 buffers `logits` = (z, z_ref) of those rows and columns."""
    z, z_ref = logits or (x, x)
    _gradient_kernel[chunk_grid(out)](x, weight[cols], weight if bias is None else bias[cols], x_ref,
                                      ref_weight[cols], ref_weight if ref_bias is None else ref_bias[cols], z, z_ref,
                                      lse, ref_lse, row_scale, out, softcap or 0.0, out.shape[0], x.shape[1],
                                      x_ref.shape[1], out.shape[1], out.stride(0), z.stride(0) if logits else 0,
                                      SHARED_WEIGHT=_same_tensor(weight, ref_weight), HAS_BIAS=bias is not None,
                                      HAS_REF_BIAS=ref_bias is not None, HAS_SOFTCAP=softcap is not None,
                                      FROM_BUFFER=logits is not None, enable_fp_fusion=True)


@on_device_of_first_input
def backward(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, lse, ref_lse, grad_scale, need_weight_grad,
             need_bias_grad, need_hidden_grad=True, softcap=None):
    """Gradients of sum_t grad_scale[t] * KL_t wrt hidden, weight and bias (P constant): (d_hidden, d_weight, d_bias),
    each or None.

    G = (q - p) * grad_scale[:, None];  d_hidden = G @ weight, d_weight = G^T @ hidden, in the inputs' dtype;
    d_bias = G.sum(0) in fp32; each is None (and not computed) unless asked for.
    """
    def segment_writer(rows, row_scale):
        x, x_ref, row_lse, row_ref_lse = hidden[rows], ref_hidden[rows], lse[rows], ref_lse[rows]
        return lambda cols, out: _write_gradient(x, weight, bias, x_ref, ref_weight, ref_bias, row_lse, row_ref_lse,
                                                 row_scale, out, softcap, cols)

    return backward_in_chunks(hidden, weight, grad_scale, need_weight_grad, need_bias_grad, segment_writer,
                              need_hidden_grad)


@on_device_of_first_input
def forward_with_gradients(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, grad_scale, need_weight_grad,
                           need_bias_grad, need_hidden_grad=True, softcap=None):
    """forward() and backward() in one pass: (kl, lse, ref_lse, d_hidden, d_weight, d_bias), a block of rows at a time
    from both heads' whole fp32 logits rows (chunked_backward.py): two products with the weight fewer than both."""
    num_rows, vocab = hidden.shape[0], weight.shape[0]
    kl, lse, ref_lse = (torch.empty(num_rows, dtype=torch.float32, device=hidden.device) for _ in range(3))
    shared = _same_tensor(weight, ref_weight)

    def segment_writer(rows, row_scale):
        x, x_ref = hidden[rows], ref_hidden[rows]
        if shared:   # one matmul, and one read of W, for both heads' rows
            both = library_logits(torch.cat([x, x_ref]), weight)
            logits = (both[:x.shape[0]], both[x.shape[0]:])
        else:
            logits = (library_logits(x, weight), library_logits(x_ref, ref_weight))
        kl[rows], lse[rows], ref_lse[rows] = _forward(x, weight, bias, x_ref, ref_weight, ref_bias, softcap, logits)
        return lambda cols, out: _write_gradient(x, weight, bias, x_ref, ref_weight, ref_bias, lse[rows],
                                                 ref_lse[rows], row_scale, out, softcap, cols, logits)

    plan = row_block_plan(num_rows, vocab, 8 + hidden.element_size())
    return (kl, lse, ref_lse) + backward_in_chunks(hidden, weight, grad_scale, need_weight_grad, need_bias_grad,
                                                   segment_writer, need_hidden_grad, plan)
