"""Triton kernels of the fused linear cross-entropy: CE_t = logsumexp(z_t) - z_t[y_t], z = x W^T + b
(soft-capped, z = c tanh((x W^T + b) / c), for a model with final_logit_softcapping = c). With label smoothing eps
(torch's cross_entropy's label_smoothing) the target is (1 - eps) onehot(y_t) + eps / V: z_t[y_t] is then
(1 - eps) z_t[y_t] + eps mean_v z_t[v] (a sum over the whole vocabulary, which every split of the forward adds to),
and the gradient wrt z_t softmax(z_t) - (1 - eps) onehot(y_t) - eps / V; behind HAS_SMOOTHING, so that eps = 0 builds
the kernels as they were without it, and eps a runtime number, so that each eps does not build them anew.

The [M, V] logits never exist in memory. The forward streams over the vocabulary keeping a running
(max, sum-exp) per row; the backward recomputes the logits chunk by chunk from the saved logsumexp, and
chunked_backward.py takes the products of each gradient chunk with the weight and the hidden states.
forward_with_gradients does both at once for a block of rows at a time, from that block's whole logits rows, which a
library matmul writes into an fp32 buffer that the same kernels read (FROM_BUFFER) instead of computing tiles.

Launcher contract (the autograd Function in fastalign.ops calls these): inputs are validated, contiguous,
on one device, ignore_index rows already removed (M >= 1), every target in [0, V).
"""
import torch
import triton
import triton.language as tl

from .chunked_backward import backward_in_chunks, library_logits, row_block_plan
from .device_guard import on_device_of_first_input
from .linear_softmax_tiles import (autotune_tiles, chunk_grid, forward_grid, head_logits, merge_splits,
                                   online_logsumexp, product_tile, store_gradient_tile, vocab_splits)


@autotune_tiles(streams=1, key=["H", "V", "HAS_BIAS", "HAS_SOFTCAP", "HAS_SMOOTHING", "FROM_BUFFER"])
@triton.jit
def _forward_kernel(x_ptr, w_ptr, b_ptr, z_ptr, target_ptr, split_stats_ptr, target_logit_ptr, softcap, smoothing,
                    uniform, M, H, V, V_PER_SPLIT, NUM_SPLITS, Z_STRIDE,
                    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_SMOOTHING: tl.constexpr,
                    FROM_BUFFER: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr):
    """Program (split, row block): (max, sum-exp) of z over its vocabulary range, and z[t, y_t] if y_t is in it.

    split_stats is [2, M, NUM_SPLITS]: running max, then sum of exp(z - max). FROM_BUFFER: x W^T is read from the
    fp32 [M, V] buffer z of row stride Z_STRIDE instead of computed. HAS_SMOOTHING: the smoothed target's logit
    sum_v ((1 - smoothing) onehot(y_t) + uniform) z[t, v] (uniform = smoothing / V) takes a part from every split,
    which goes to a third row of split_stats ([3, M, NUM_SPLITS]) in place of target_logit, for the host to sum.
    """
    split = tl.program_id(0) % NUM_SPLITS  # the split varies fastest: see forward_grid
    rows = (tl.program_id(0) // NUM_SPLITS) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < M
    v_start = split * V_PER_SPLIT
    v_end = tl.minimum(v_start + V_PER_SPLIT, V)
    load_end = v_end
    if FROM_BUFFER:   # tiles read up to the buffer's padded row end, a multiple of 16, so that their loads are
        load_end = Z_STRIDE   # vectorised at any V; the columns past v_end (the padding unset) are masked below
    target = tl.load(target_ptr + rows, mask=row_mask, other=-1)

    run_max = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    run_sumexp = tl.zeros((BLOCK_M,), dtype=tl.float32)
    target_logit = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for v0 in range(v_start, v_end, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_mask = cols < v_end
        # z = x W^T + b on this tile
        z = product_tile(x_ptr, w_ptr, z_ptr, rows, cols, row_mask, cols < load_end, H, Z_STRIDE, FROM_BUFFER,
                         BLOCK_M, BLOCK_V, BLOCK_K)
        z = head_logits(z, b_ptr, cols, col_mask, softcap, HAS_BIAS, HAS_SOFTCAP)
        if HAS_SMOOTHING:   # one sum for the target's logit and the mean logit's (the padding masked)
            share = tl.where(cols[None, :] == target[:, None], 1.0 - smoothing + uniform, uniform)
            target_logit += tl.sum(tl.where(col_mask[None, :], share * z, 0.0), axis=1)
        else:   # z[t, y_t] where y_t falls in this tile (at most one column matches)
            target_logit += tl.sum(tl.where(cols[None, :] == target[:, None], z, 0.0), axis=1)
        z = tl.where(col_mask[None, :], z, float("-inf"))
        run_max, run_sumexp, _, _ = online_logsumexp(run_max, run_sumexp, z)

    stat = rows * NUM_SPLITS + split
    tl.store(split_stats_ptr + stat, run_max, mask=row_mask)
    tl.store(split_stats_ptr + M * NUM_SPLITS + stat, run_sumexp, mask=row_mask)
    if HAS_SMOOTHING:
        tl.store(split_stats_ptr + 2 * M * NUM_SPLITS + stat, target_logit, mask=row_mask)
    else:   # exactly one split holds each target: only that one writes it
        tl.store(target_logit_ptr + rows, target_logit, mask=row_mask & (target >= v_start) & (target < v_end))


@autotune_tiles(streams=1, key=["H", "HAS_BIAS", "HAS_SOFTCAP", "HAS_SMOOTHING", "FROM_BUFFER"])
@triton.jit
def _gradient_kernel(x_ptr, w_ptr, b_ptr, z_ptr, target_ptr, lse_ptr, scale_ptr, g_ptr, softcap, smoothing,
                     uniform, M, H, V, COL_START, G_STRIDE, Z_STRIDE,
                     HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_SMOOTHING: tl.constexpr,
                     FROM_BUFFER: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr):
    """Program (row block, column tile) of one [M, V] chunk whose first column is COL_START in the whole
    vocabulary: G = (softmax(z) - onehot(y)) * scale[:, None], recomputed from the saved lse (times the soft
    cap's derivative wrt the raw logits with HAS_SOFTCAP), or with FROM_BUFFER from x W^T read from the fp32 buffer
    z of row stride Z_STRIDE. HAS_SMOOTHING: the target is (1 - smoothing) onehot(y) + uniform, uniform the
    smoothing's share of each word (smoothing / the whole vocabulary's size)."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    row_mask = rows < M
    col_mask = cols < V

    z = product_tile(x_ptr, w_ptr, z_ptr, rows, cols, row_mask, col_mask, H, Z_STRIDE, FROM_BUFFER,
                     BLOCK_M, BLOCK_V, BLOCK_K)
    z = head_logits(z, b_ptr, cols, col_mask, softcap, HAS_BIAS, HAS_SOFTCAP)
    lse = tl.load(lse_ptr + rows, mask=row_mask, other=0.0)
    scale = tl.load(scale_ptr + rows, mask=row_mask, other=0.0)
    target = tl.load(target_ptr + rows, mask=row_mask, other=-1)
    target_share = 1.0   # the target word's probability in the target distribution
    if HAS_SMOOTHING:
        target_share = 1.0 - smoothing
    g = tl.exp(z - lse[:, None]) - tl.where(cols[None, :] + COL_START == target[:, None], target_share, 0.0)
    if HAS_SMOOTHING:
        g -= uniform
    if HAS_SOFTCAP:
        g *= 1.0 - (z / softcap) * (z / softcap)
    store_gradient_tile(g_ptr, g * scale[:, None], rows, cols, row_mask, col_mask, G_STRIDE)


@on_device_of_first_input
def forward(hidden, weight, bias, target, softcap=None, label_smoothing=0.0):
    """(lse, target_logit), fp32 [M] each: logsumexp_v z[t, v] and z[t, target_t] for z = hidden @ weight^T + bias,
    soft-capped (softcap * tanh(z / softcap)) unless softcap is None; with label_smoothing eps, target_logit is
    (1 - eps) z[t, target_t] + eps mean_v z[t, v]."""
    return _forward(hidden, weight, bias, target, softcap, label_smoothing)


def _forward(hidden, weight, bias, target, softcap, label_smoothing, logits=None):
    """forward(), from hidden @ weight^T read from the fp32 buffer `logits` [M, V] (by its row stride) where one is
    given."""
    num_rows, hidden_size = hidden.shape
    vocab = weight.shape[0]
    num_splits, per_split = vocab_splits(num_rows, vocab, hidden.device)
    split_stats = torch.empty(3 if label_smoothing else 2, num_rows, num_splits, dtype=torch.float32,
                              device=hidden.device)
    target_logit = torch.empty(num_rows, dtype=torch.float32, device=hidden.device)
    _forward_kernel[forward_grid(num_rows, num_splits)](
        hidden, weight, weight if bias is None else bias, hidden if logits is None else logits, target, split_stats,
        target_logit, softcap or 0.0, label_smoothing, label_smoothing / vocab, num_rows, hidden_size, vocab,
        per_split, num_splits, 0 if logits is None else logits.stride(0), HAS_BIAS=bias is not None,
        HAS_SOFTCAP=softcap is not None, HAS_SMOOTHING=bool(label_smoothing), FROM_BUFFER=logits is not None,
        enable_fp_fusion=True)
    lse, _ = merge_splits(split_stats[0], split_stats[1])
    return lse, split_stats[2].sum(dim=1) if label_smoothing else target_logit


def _write_gradient(x, weight, bias, target, lse, row_scale, out, softcap, label_smoothing, cols, logits=None):
    """Launches _gradient_kernel over the chunk `out` (columns `cols` of the vocabulary; weight and bias whole):
    from tiles it computes, or from the fp32 buffer `logits` of those rows and columns."""
    _gradient_kernel[chunk_grid(out)](x, weight[cols], weight if bias is None else bias[cols],
                                      x if logits is None else logits, target, lse, row_scale, out, softcap or 0.0,
                                      label_smoothing, label_smoothing / weight.shape[0],
                                      out.shape[0], x.shape[1], out.shape[1], cols.start, out.stride(0),
                                      0 if logits is None else logits.stride(0), HAS_BIAS=bias is not None,
                                      HAS_SOFTCAP=softcap is not None, HAS_SMOOTHING=bool(label_smoothing),
                                      FROM_BUFFER=logits is not None, enable_fp_fusion=True)


@on_device_of_first_input
def backward(hidden, weight, bias, target, lse, grad_scale, need_weight_grad, need_bias_grad,
             need_hidden_grad=True, softcap=None, label_smoothing=0.0):
    """Gradients of sum_t grad_scale[t] * (lse_t - z[t, target_t]): (d_hidden, d_weight, d_bias), each or None.

    G = (softmax(z) - onehot(target)) * grad_scale[:, None] (with label_smoothing eps, the smoothed target
    (1 - eps) onehot(target) + eps / V in place of the onehot);  d_hidden = G @ weight, d_weight = G^T @ hidden,
    d_bias = G.sum(0). d_hidden / d_weight come in the inputs' dtype, d_bias in fp32; each is None (and not
    computed) unless asked for.
    """
    def segment_writer(rows, row_scale):
        x, y, row_lse = hidden[rows], target[rows], lse[rows]
        return lambda cols, out: _write_gradient(x, weight, bias, y, row_lse, row_scale, out, softcap,
                                                 label_smoothing, cols)

    return backward_in_chunks(hidden, weight, grad_scale, need_weight_grad, need_bias_grad, segment_writer,
                              need_hidden_grad)


@on_device_of_first_input
def forward_with_gradients(hidden, weight, bias, target, grad_scale, need_weight_grad, need_bias_grad,
                           need_hidden_grad=True, softcap=None, label_smoothing=0.0):
    """forward() and backward() in one pass: (lse, target_logit, d_hidden, d_weight, d_bias), a block of rows at a
    time from its whole fp32 logits rows (chunked_backward.py), one product with the weight fewer than both."""
    num_rows, vocab = hidden.shape[0], weight.shape[0]
    lse = torch.empty(num_rows, dtype=torch.float32, device=hidden.device)
    target_logit = torch.empty_like(lse)

    def segment_writer(rows, row_scale):
        x, y = hidden[rows], target[rows]
        logits = library_logits(x, weight)
        lse[rows], target_logit[rows] = _forward(x, weight, bias, y, softcap, label_smoothing, logits)
        return lambda cols, out: _write_gradient(x, weight, bias, y, lse[rows], row_scale, out, softcap,
                                                 label_smoothing, cols, logits)

    plan = row_block_plan(num_rows, vocab, 4 + hidden.element_size())
    return (lse, target_logit) + backward_in_chunks(hidden, weight, grad_scale, need_weight_grad, need_bias_grad,
                                                    segment_writer, need_hidden_grad, plan)
