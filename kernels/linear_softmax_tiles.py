"""Building blocks shared by the fused linear-softmax losses (linear cross-entropy, linear KL).

Both losses need softmax(x @ W^T) over a vocabulary too large to hold as [rows, V]. Their kernels
therefore work on one [BLOCK_M, BLOCK_V] logits tile at a time: this module holds the pieces they share,
so that each loss file only states its own math.

- @triton.jit helpers: a logits tile by a K loop over H (optionally two tiles that share weight loads),
  the online logsumexp update, the grouped tile order of the backward grid, and the atomic accumulation
  of d_x = G @ W and d_W = G^T @ x from a gradient tile G.
- host helpers: the autotuning of the launch configurations (fixed small blocks under the Triton
  interpreter), how the vocabulary is split among forward programs, and how the per-split
  (max, sum-exp) partials are merged.
"""
import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

# Forward programs split the vocabulary in ranges that are multiples of this, so that every BLOCK_V
# below divides a range and each range starts on a tile boundary.
_SPLIT_ALIGN = 32 if INTERPRET else 256
# Under the interpreter (CPU tests) a few splits make the merge path run even at tiny V.
_INTERPRET_TARGET_PROGRAMS = 4
_INTERPRET_BLOCKS = {"BLOCK_M": 16, "BLOCK_V": 32, "BLOCK_K": 16}

# Candidate (BLOCK_M, BLOCK_V, BLOCK_K, num_warps, num_stages) on CUDA by (kind, operand streams), a
# starting point for tuning on H100/H200: all compile for sm_90 without register spills in bf16/fp16.
# Two streams (the KL) hold two logits tiles, hence smaller tiles.
_TILE_SHAPES = {
    ("forward", 1): [(128, 128, 64, 8, 3), (64, 256, 64, 8, 3), (64, 128, 64, 4, 4), (128, 64, 64, 4, 4)],
    ("forward", 2): [(64, 128, 64, 8, 3), (128, 64, 64, 8, 3), (64, 64, 64, 4, 4)],
    ("backward", 1): [(128, 128, 64, 8, 3), (64, 128, 64, 4, 3), (128, 64, 64, 4, 3), (64, 64, 64, 4, 4)],
    ("backward", 2): [(64, 128, 64, 8, 3), (128, 64, 64, 8, 3), (64, 64, 64, 4, 4)],
}
# Always a candidate: it does not spill registers with fp32 inputs (whose "ieee" dots run on FMA units),
# and with under 50 KB of shared memory in every kernel and dtype it launches on any GPU.
_SMALL_TILE = (32, 64, 32, 4, 3)
# Row blocks per band of the backward tile order (see grouped_tile).
_GROUP_M = 8


def autotune_tiles(kind, streams, key, reset_to_zero=None):
    """triton.autotune over the tile shapes of a "forward" or "backward" kernel that loads `streams`
    (x, W) operand pairs per K step; one fixed small config under the interpreter.

    A shape that needs more shared memory than the device has (fp32 doubles it) fails to launch and is
    ranked last by the autotuner; the small tile always fits, so some configuration always runs.
    """
    extra = {"GROUP_M": 2 if INTERPRET else _GROUP_M} if kind == "backward" else {}
    if INTERPRET:
        configs = [triton.Config({**_INTERPRET_BLOCKS, **extra})]
    else:
        configs = [triton.Config({"BLOCK_M": bm, "BLOCK_V": bv, "BLOCK_K": bk, **extra}, num_warps=w, num_stages=st)
                   for bm, bv, bk, w, st in _TILE_SHAPES[(kind, streams)] + [_SMALL_TILE]]
    return triton.autotune(configs=configs, key=key, reset_to_zero=reset_to_zero)


def vocab_splits(num_rows, vocab, device):
    """(number of splits, columns per split) for a forward grid of (row blocks, vocab splits).

    Few rows give few row blocks; splitting the vocabulary among more programs keeps the GPU busy.
    Every split is non-empty, so every program sees at least one valid column per tile.
    """
    if INTERPRET:
        target_programs = _INTERPRET_TARGET_PROGRAMS
    else:
        target_programs = 2 * torch.cuda.get_device_properties(device).multi_processor_count
    row_blocks = triton.cdiv(num_rows, 64)
    splits = max(1, min(triton.cdiv(target_programs, row_blocks), triton.cdiv(vocab, _SPLIT_ALIGN)))
    per_split = triton.cdiv(triton.cdiv(vocab, splits), _SPLIT_ALIGN) * _SPLIT_ALIGN
    return triton.cdiv(vocab, per_split), per_split


def merge_splits(split_max, split_sumexp):
    """Merge per-split online-softmax partials [M, S] into (lse [M], rescale [M, S]).

    lse = m + log(sum_s sumexp_s * exp(max_s - m)), m the largest of the split maxima; rescale = exp(max_s - m)
    brings any other per-split sum that was taken relative to max_s onto the common reference m.
    """
    row_max = split_max.max(dim=1, keepdim=True).values
    rescale = torch.exp(split_max - row_max)
    lse = row_max.squeeze(1) + torch.log((split_sumexp * rescale).sum(dim=1))
    return lse, rescale


@triton.jit
def grouped_tile(pid, num_row_blocks, num_col_tiles, GROUP_M: tl.constexpr):
    """(row block, column tile) of program `pid`, walking bands of GROUP_M row blocks column by column.

    Programs running together then share GROUP_M row blocks of x and a few weight tiles in L2, and
    their atomic adds spread over both d_x and d_W instead of piling onto one of them.
    """
    programs_per_band = GROUP_M * num_col_tiles
    band = pid // programs_per_band
    first_row_block = band * GROUP_M
    band_rows = tl.minimum(num_row_blocks - first_row_block, GROUP_M)
    row_block = first_row_block + (pid % programs_per_band) % band_rows
    col_tile = (pid % programs_per_band) // band_rows
    return row_block, col_tile


@triton.jit
def _load_k_chunk(ptr, lines, line_mask, k, H, BLOCK_K: tl.constexpr):
    """Columns [k, k + BLOCK_K) of rows `lines` of a row-major [*, H] matrix (zeros outside)."""
    offs_k = k + tl.arange(0, BLOCK_K)
    return tl.load(ptr + lines.to(tl.int64)[:, None] * H + offs_k[None, :],
                   mask=line_mask[:, None] & (offs_k < H)[None, :], other=0.0)


@triton.jit
def logits_tile(x_ptr, w_ptr, rows, cols, row_mask, col_mask, H,
                BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr):
    """z[rows, cols] = x[rows, :] @ w[cols, :]^T, fp32 accumulation over H in BLOCK_K chunks."""
    z = tl.zeros((BLOCK_M, BLOCK_V), dtype=tl.float32)
    for k in range(0, H, BLOCK_K):
        x = _load_k_chunk(x_ptr, rows, row_mask, k, H, BLOCK_K)
        w = _load_k_chunk(w_ptr, cols, col_mask, k, H, BLOCK_K)
        z = tl.dot(x, tl.trans(w), z, input_precision="ieee")
    return z


@triton.jit
def logits_tile_pair(x_ptr, w_ptr, xr_ptr, wr_ptr, rows, cols, row_mask, col_mask, H, H_REF,
                     SHARED_WEIGHT: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr):
    """(x @ w^T, xr @ wr^T) on one tile. With SHARED_WEIGHT (wr is w, so H_REF == H) each w chunk is
    loaded once for both products; otherwise the reference may have its own width H_REF."""
    if SHARED_WEIGHT:
        z = tl.zeros((BLOCK_M, BLOCK_V), dtype=tl.float32)
        zr = tl.zeros((BLOCK_M, BLOCK_V), dtype=tl.float32)
        for k in range(0, H, BLOCK_K):
            w = _load_k_chunk(w_ptr, cols, col_mask, k, H, BLOCK_K)
            x = _load_k_chunk(x_ptr, rows, row_mask, k, H, BLOCK_K)
            xr = _load_k_chunk(xr_ptr, rows, row_mask, k, H, BLOCK_K)
            z = tl.dot(x, tl.trans(w), z, input_precision="ieee")
            zr = tl.dot(xr, tl.trans(w), zr, input_precision="ieee")
    else:
        z = logits_tile(x_ptr, w_ptr, rows, cols, row_mask, col_mask, H, BLOCK_M, BLOCK_V, BLOCK_K)
        zr = logits_tile(xr_ptr, wr_ptr, rows, cols, row_mask, col_mask, H_REF, BLOCK_M, BLOCK_V, BLOCK_K)
    return z, zr


@triton.jit
def online_logsumexp(run_max, run_sumexp, z):
    """One tile of the streaming logsumexp; z is -inf on padded columns, each row has a finite entry.

    m' = max(m, max_v z_v);  alpha = exp(m - m');  e_v = exp(z_v - m');  s' = s * alpha + sum_v e_v.
    Returns (m', s', alpha, e): alpha rescales any other running sum kept relative to m.
    """
    new_max = tl.maximum(run_max, tl.max(z, axis=1))
    alpha = tl.exp(run_max - new_max)
    e = tl.exp(z - new_max[:, None])
    return new_max, run_sumexp * alpha + tl.sum(e, axis=1), alpha, e


@triton.jit
def accumulate_tile_grads(g, x_ptr, w_ptr, dx_ptr, dw_ptr, rows, cols, row_mask, col_mask, H,
                          NEED_DW: tl.constexpr, RESCALE_G: tl.constexpr, BLOCK_K: tl.constexpr):
    """d_x[rows, :] += g @ w[cols, :] and (NEED_DW) d_W[cols, :] += g^T @ x[rows, :], fp32 atomics.

    g is the fp32 gradient tile dLoss/dz (zero on padded rows and columns). It enters the tensor-core
    dots in the input dtype; for fp16 (RESCALE_G) it is first divided by its largest magnitude, which
    is multiplied back onto the fp32 products, so that small entries do not flush to zero in fp16.
    """
    if RESCALE_G:
        g_scale = tl.max(tl.max(tl.abs(g), axis=1), axis=0)
        g_scale = tl.where(g_scale > 0, g_scale, 1.0)
        g = g / g_scale
    g_in = g.to(x_ptr.dtype.element_ty)
    rows64 = rows.to(tl.int64)
    cols64 = cols.to(tl.int64)
    for k in range(0, H, BLOCK_K):
        offs_k = k + tl.arange(0, BLOCK_K)
        k_mask = offs_k < H
        w = _load_k_chunk(w_ptr, cols, col_mask, k, H, BLOCK_K)
        dx = tl.dot(g_in, w, input_precision="ieee")
        if RESCALE_G:
            dx = dx * g_scale
        tl.atomic_add(dx_ptr + rows64[:, None] * H + offs_k[None, :], dx,
                      mask=row_mask[:, None] & k_mask[None, :], sem="relaxed")
        if NEED_DW:
            x = _load_k_chunk(x_ptr, rows, row_mask, k, H, BLOCK_K)
            dw = tl.dot(tl.trans(g_in), x, input_precision="ieee")
            if RESCALE_G:
                dw = dw * g_scale
            tl.atomic_add(dw_ptr + cols64[:, None] * H + offs_k[None, :], dw,
                          mask=col_mask[:, None] & k_mask[None, :], sem="relaxed")
