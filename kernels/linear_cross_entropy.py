"""Triton kernels of the fused linear cross-entropy: CE_t = logsumexp(z_t) - z_t[y_t], z = x W^T + b.

The [M, V] logits never exist in memory. The forward streams over the vocabulary keeping a running
(max, sum-exp) per row; the backward recomputes each logits tile from the saved logsumexp and pushes
its gradient tile straight into d_hidden / d_weight / d_bias with fp32 atomic adds.

Launcher contract (the autograd Function in fastalign.ops calls these): inputs are validated, contiguous,
on one device, ignore_index rows already removed (M >= 1), every target in [0, V).
"""
import torch
import triton
import triton.language as tl

from .linear_softmax_tiles import (accumulate_tile_grads, autotune_tiles, grouped_tile,
                                   logits_tile, merge_splits, online_logsumexp, vocab_splits)


@autotune_tiles("forward", streams=1, key=["H", "V", "HAS_BIAS"])
@triton.jit
def _forward_kernel(x_ptr, w_ptr, b_ptr, target_ptr, split_stats_ptr, target_logit_ptr,
                    M, H, V, V_PER_SPLIT, NUM_SPLITS,
                    HAS_BIAS: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr):
    """Program (row block, split): (max, sum-exp) of z over its vocabulary range, and z[t, y_t] if y_t is in it.

    split_stats is [2, M, NUM_SPLITS]: running max, then sum of exp(z - max).
    """
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < M
    split = tl.program_id(1)
    v_start = split * V_PER_SPLIT
    v_end = tl.minimum(v_start + V_PER_SPLIT, V)
    target = tl.load(target_ptr + rows, mask=row_mask, other=-1)

    run_max = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    run_sumexp = tl.zeros((BLOCK_M,), dtype=tl.float32)
    target_logit = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for v0 in range(v_start, v_end, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_mask = cols < v_end
        # z = x W^T + b on this tile
        z = logits_tile(x_ptr, w_ptr, rows, cols, row_mask, col_mask, H, BLOCK_M, BLOCK_V, BLOCK_K)
        if HAS_BIAS:
            z += tl.load(b_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
        # z[t, y_t] where y_t falls in this tile (at most one column matches)
        target_logit += tl.sum(tl.where(cols[None, :] == target[:, None], z, 0.0), axis=1)
        z = tl.where(col_mask[None, :], z, float("-inf"))
        run_max, run_sumexp, _, _ = online_logsumexp(run_max, run_sumexp, z)

    stat = rows * NUM_SPLITS + split
    tl.store(split_stats_ptr + stat, run_max, mask=row_mask)
    tl.store(split_stats_ptr + M * NUM_SPLITS + stat, run_sumexp, mask=row_mask)
    # exactly one split holds each target: only that one writes it
    tl.store(target_logit_ptr + rows, target_logit, mask=row_mask & (target >= v_start) & (target < v_end))


@autotune_tiles("backward", streams=1, key=["H", "V", "HAS_BIAS", "NEED_DW"],
                reset_to_zero=["dx_ptr", "dw_ptr", "db_ptr"])
@triton.jit
def _backward_kernel(x_ptr, w_ptr, b_ptr, target_ptr, lse_ptr, scale_ptr, dx_ptr, dw_ptr, db_ptr,
                     M, H, V,
                     HAS_BIAS: tl.constexpr, NEED_DW: tl.constexpr, NEED_DB: tl.constexpr,
                     RESCALE_G: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
                     GROUP_M: tl.constexpr):
    """Program (row block, vocabulary tile): recompute z, form G = dLoss/dz, scatter its products."""
    row_block, col_tile = grouped_tile(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(V, BLOCK_V), GROUP_M)
    rows = row_block * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = col_tile * BLOCK_V + tl.arange(0, BLOCK_V)
    row_mask = rows < M
    col_mask = cols < V

    z = logits_tile(x_ptr, w_ptr, rows, cols, row_mask, col_mask, H, BLOCK_M, BLOCK_V, BLOCK_K)
    if HAS_BIAS:
        z += tl.load(b_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    lse = tl.load(lse_ptr + rows, mask=row_mask, other=0.0)
    scale = tl.load(scale_ptr + rows, mask=row_mask, other=0.0)
    target = tl.load(target_ptr + rows, mask=row_mask, other=-1)
    # G = (softmax(z) - onehot(y)) * grad_scale[:, None], zero outside the M x V range
    g = tl.exp(z - lse[:, None]) - tl.where(cols[None, :] == target[:, None], 1.0, 0.0)
    g = tl.where(row_mask[:, None] & col_mask[None, :], g * scale[:, None], 0.0)
    if NEED_DB:
        # d_bias[v] += sum_t G[t, v]
        tl.atomic_add(db_ptr + cols, tl.sum(g, axis=0), mask=col_mask, sem="relaxed")
    # d_hidden += G @ W[tile];  d_weight[tile] += G^T @ X
    accumulate_tile_grads(g, x_ptr, w_ptr, dx_ptr, dw_ptr, rows, cols, row_mask, col_mask, H,
                          NEED_DW, RESCALE_G, BLOCK_K)


def forward(hidden, weight, bias, target):
    """(lse, target_logit), fp32 [M] each: logsumexp_v z[t, v] and z[t, target_t] for z = hidden @ weight^T + bias."""
    num_rows, hidden_size = hidden.shape
    vocab = weight.shape[0]
    num_splits, per_split = vocab_splits(num_rows, vocab, hidden.device)
    split_stats = torch.empty(2, num_rows, num_splits, dtype=torch.float32, device=hidden.device)
    target_logit = torch.empty(num_rows, dtype=torch.float32, device=hidden.device)
    grid = lambda meta: (triton.cdiv(num_rows, meta["BLOCK_M"]), num_splits)  # noqa: E731
    _forward_kernel[grid](hidden, weight, weight if bias is None else bias, target, split_stats, target_logit,
                          num_rows, hidden_size, vocab, per_split, num_splits, HAS_BIAS=bias is not None)
    lse, _ = merge_splits(split_stats[0], split_stats[1])
    return lse, target_logit


def backward(hidden, weight, bias, target, lse, grad_scale, need_weight_grad, need_bias_grad):
    """Gradients of sum_t grad_scale[t] * (lse_t - z[t, target_t]): (d_hidden, d_weight | None, d_bias | None).

    G = (softmax(z) - onehot(target)) * grad_scale[:, None];  d_hidden = G @ weight, d_weight = G^T @ hidden,
    d_bias = G.sum(0); all fp32. d_weight / d_bias are None (and not computed) unless asked for.
    """
    num_rows, hidden_size = hidden.shape
    vocab = weight.shape[0]
    fp32 = dict(dtype=torch.float32, device=hidden.device)
    d_hidden = torch.zeros(num_rows, hidden_size, **fp32)
    d_weight = torch.zeros(vocab, hidden_size, **fp32) if need_weight_grad else None
    d_bias = torch.zeros(vocab, **fp32) if need_bias_grad else None
    grid = lambda meta: (triton.cdiv(num_rows, meta["BLOCK_M"]) * triton.cdiv(vocab, meta["BLOCK_V"]),)  # noqa: E731
    _backward_kernel[grid](hidden, weight, weight if bias is None else bias, target, lse, grad_scale,
                           d_hidden, d_hidden if d_weight is None else d_weight,
                           d_hidden if d_bias is None else d_bias,
                           num_rows, hidden_size, vocab,
                           HAS_BIAS=bias is not None, NEED_DW=need_weight_grad, NEED_DB=need_bias_grad,
                           RESCALE_G=hidden.dtype == torch.float16)
    return d_hidden, d_weight, d_bias
