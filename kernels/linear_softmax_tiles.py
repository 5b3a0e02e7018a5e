"""Building blocks shared by the fused linear-softmax losses (linear cross-entropy, linear KL).

Both losses need softmax(x @ W^T) over a vocabulary too large to hold as [rows, V]. Their kernels
therefore work on one [BLOCK_M, BLOCK_V] logits tile at a time: this module holds the pieces they share,
so that each loss file only states its own math.

- @triton.jit helpers: a logits tile by a K loop over H (optionally two tiles that share weight loads), or read
  from an fp32 buffer that a library matmul filled,
  the head's bias and logit soft cap (Gemma's final_logit_softcapping) on a tile, the online logsumexp update,
  and the store of a gradient tile into a chunk buffer.
- host helpers: the autotuning of the launch configurations (fixed small blocks under the Triton
  interpreter), how the vocabulary is split among forward programs, and how the per-split
  (max, sum-exp) partials are merged.
The backward's products with the gradient tiles are taken by chunked_backward.py.
"""
import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

# Forward programs split the vocabulary in ranges that are multiples of this, so that every BLOCK_V
# below divides a range and each range starts on a tile boundary.
_SPLIT_ALIGN = 32 if INTERPRET else 256
# Vocabulary splits of a forward with many rows: the programs that run together then share their row blocks
# (forward_grid), and 16 x 64 row blocks at N 8192 make ~8 waves on 132 SMs (little idle tail).
_MIN_SPLITS = 16
# Under the interpreter (CPU tests) a few splits make the merge path run even at tiny V.
_INTERPRET_TARGET_PROGRAMS = 4
_INTERPRET_BLOCKS = {"BLOCK_M": 16, "BLOCK_V": 32, "BLOCK_K": 16}

# Candidate (BLOCK_M, BLOCK_V, BLOCK_K, num_warps, num_stages) on CUDA by operand streams, a starting
# point for tuning on H100/H200: all compile for sm_90 without register spills in bf16/fp16 at an H that is a
# multiple of 16 (Triton 3.6 and 3.9; tests/kernels/test_linear_losses_compile.py), but for 8 bytes in the first
# one's FROM_BUFFER cross-entropy forward at a V that is not a multiple of 16 (Triton 3.9). Two streams
# (the KL) hold two logits tiles, hence smaller tiles.
_TILE_SHAPES = {
    1: [(128, 128, 64, 8, 3), (64, 256, 64, 8, 3), (64, 128, 64, 4, 4), (128, 64, 64, 4, 4)],
    2: [(64, 128, 64, 8, 3), (128, 64, 64, 8, 3), (64, 64, 64, 4, 4)],
}
# Always a candidate, and the only one for fp32 inputs (whose "ieee" dots run on FMA units): with them its sm_90
# builds spill no registers but in the KL forward, which spills 8-24 bytes per thread with a shared weight or with a
# 16-bit head beside an fp32 one (Triton 3.6 and 3.9). With under 50 KB of shared memory in every kernel and dtype it
# launches on any GPU.
_SMALL_TILE = (32, 64, 32, 4, 3)


def autotune_tiles(streams, key):
    """triton.autotune over the tile shapes of a kernel that loads `streams` (x, W) operand pairs per K
    step; one fixed small config under the interpreter.

    A shape that needs more shared memory than the device has (fp32 doubles it) fails to launch and is
    ranked last by the autotuner; the small tile always fits, so some configuration always runs.
    fp32 inputs get the small tile alone (prune_for_dtype): their "ieee" dots run on FMA units, the 16-bit
    tile shapes spill registers with them, and each of those takes seconds to build for every new
    specialisation of the arguments, which a GPU session would spend compiling configurations it never keeps.
    """
    if INTERPRET:
        configs = [triton.Config(_INTERPRET_BLOCKS)]
    else:
        configs = [triton.Config({"BLOCK_M": bm, "BLOCK_V": bv, "BLOCK_K": bk}, num_warps=w, num_stages=st)
                   for bm, bv, bk, w, st in _TILE_SHAPES[streams] + [_SMALL_TILE]]
    return triton.autotune(configs=configs, key=key, prune_configs_by={"early_config_prune": prune_for_dtype})


def prune_for_dtype(configs, named_args, **kwargs):
    """The configurations worth benchmarking for these arguments: all of them for 16-bit operands; for fp32
    operands (x_ptr, or the reference's xr_ptr) only the last one, the small tile."""
    wide = any(getattr(named_args.get(name), "dtype", None) == torch.float32 for name in ("x_ptr", "xr_ptr"))
    return configs[-1:] if wide else configs


def multiprocessor_count(device):
    """The GPU's SM count, which sizes the split plan (a function of its own, so that tests can plan for an H100's
    132 SMs on any machine)."""
    return torch.cuda.get_device_properties(device).multi_processor_count


def vocab_splits(num_rows, vocab, device):
    """(number of splits, columns per split) of a forward over the vocabulary.

    Few rows give few row blocks; splitting the vocabulary among more programs keeps the GPU busy. Many
    rows still get _MIN_SPLITS splits (see forward_grid). Every split is non-empty, so every program sees
    at least one valid column per tile.
    """
    if INTERPRET:
        target_programs, min_splits = _INTERPRET_TARGET_PROGRAMS, 1
    else:
        target_programs = 2 * multiprocessor_count(device)
        min_splits = _MIN_SPLITS
    row_blocks = triton.cdiv(num_rows, 64)
    splits = max(1, min(max(triton.cdiv(target_programs, row_blocks), min_splits), triton.cdiv(vocab, _SPLIT_ALIGN)))
    per_split = triton.cdiv(triton.cdiv(vocab, splits), _SPLIT_ALIGN) * _SPLIT_ALIGN
    return triton.cdiv(vocab, per_split), per_split


def forward_grid(num_rows, num_splits):
    """Launch grid of a forward kernel: one axis of num_splits x row blocks programs, the split varying fastest
    (program p has split p % num_splits and row block p // num_splits).

    Programs start in grid order, so the ones running together are all the splits of a few row blocks:
    the few [BLOCK_M, H] row blocks they read stay in L2 for every vocabulary tile, and the weight tiles
    of the splits are shared by those row blocks. With the row block varying fastest instead, a wave
    would read a different [BLOCK_M, H] block per program (64 MiB at H 4096, BLOCK_M 128 on an H100:
    more than L2), again at every tile.
    """
    return lambda meta: (num_splits * triton.cdiv(num_rows, meta["BLOCK_M"]),)


def chunk_grid(out):
    """Launch grid of a gradient kernel over the [rows, cols] chunk buffer `out`: one program per tile."""
    return lambda meta: (triton.cdiv(out.shape[0], meta["BLOCK_M"]), triton.cdiv(out.shape[1], meta["BLOCK_V"]))


def merge_splits(split_max, split_sumexp):
    """Merge per-split online-softmax partials [M, S] into (lse [M], rescale [M, S]).

    lse = m + log(sum_s sumexp_s * exp(max_s - m)), m the largest of the split maxima (0 where it is infinite, as in
    online_logsumexp); rescale = exp(max_s - m) brings any other per-split sum that was taken relative to max_s onto
    the common reference m.
    """
    row_max = split_max.max(dim=1, keepdim=True).values
    row_max = torch.where(row_max.isinf(), 0.0, row_max)
    rescale = torch.exp(split_max - row_max)
    lse = row_max.squeeze(1) + torch.log((split_sumexp * rescale).sum(dim=1))
    return lse, rescale


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
def buffered_tile(z_ptr, rows, cols, row_mask, col_mask, Z_STRIDE):
    """z[rows, cols] of a row-major fp32 buffer of row stride Z_STRIDE (zeros outside the masks)."""
    return tl.load(z_ptr + rows.to(tl.int64)[:, None] * Z_STRIDE + cols[None, :],
                   mask=row_mask[:, None] & col_mask[None, :], other=0.0)


@triton.jit
def product_tile(x_ptr, w_ptr, z_ptr, rows, cols, row_mask, col_mask, H, Z_STRIDE, FROM_BUFFER: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr):
    """x[rows] @ w[cols]^T in fp32: taken by the K loop of logits_tile, or, with FROM_BUFFER, read from the fp32
    buffer z where a library matmul of whole logits rows left it (chunked_backward.py's forward-pass gradients)."""
    if FROM_BUFFER:
        z = buffered_tile(z_ptr, rows, cols, row_mask, col_mask, Z_STRIDE)
    else:
        z = logits_tile(x_ptr, w_ptr, rows, cols, row_mask, col_mask, H, BLOCK_M, BLOCK_V, BLOCK_K)
    return z


@triton.jit
def logits_tile_pair(x_ptr, w_ptr, xr_ptr, wr_ptr, z_ptr, zr_ptr, rows, cols, row_mask, col_mask, H, H_REF,
                     Z_STRIDE, SHARED_WEIGHT: tl.constexpr, FROM_BUFFER: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr):
    """(x @ w^T, xr @ wr^T) on one tile. With SHARED_WEIGHT (wr is w, so H_REF == H) each w chunk is
    loaded once for both products; otherwise the reference may have its own width H_REF. With FROM_BUFFER both
    are read from fp32 buffers z and zr of row stride Z_STRIDE instead (see product_tile)."""
    if FROM_BUFFER:
        z = buffered_tile(z_ptr, rows, cols, row_mask, col_mask, Z_STRIDE)
        zr = buffered_tile(zr_ptr, rows, cols, row_mask, col_mask, Z_STRIDE)
    elif SHARED_WEIGHT:
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
def soft_cap(z, cap):
    """cap * tanh(z / cap): the logits of a model with final_logit_softcapping = cap (Gemma 2 and 3), and the
    attention scores of one with attn_logit_softcapping (Gemma 2; kernels/paged_attention.py).

    tanh(x) to ~5e-7 relative, so that a cap far above the logits moves them by their fp32 rounding and no more:
    an odd polynomial (minimax on |x| < 0.55) below, 1 - 2 / (exp(2x) + 1) above (which cancels for small |x|,
    where its absolute error ~1e-7 times the cap would be all of it). An exp and six multiply-adds per logit, a select
    between them. -cap at z = -inf and cap at +inf, as torch.tanh gives. The derivative, 1 - (capped / cap)^2,
    comes from the capped logits."""
    x = z / cap
    x2 = x * x
    series = x + x * x2 * (-0.333329469 + x2 * (0.133207247 + x2 * (-0.0526718013 + x2 * 0.0164375622)))
    return cap * tl.where(tl.abs(x) < 0.55, series, 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0))


@triton.jit
def head_logits(z, b_ptr, cols, col_mask, softcap, HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr):
    """The logits of a linear head from its product tile z = x W^T: plus the bias b[cols] with HAS_BIAS, then
    soft-capped with HAS_SOFTCAP (the cap applies to the biased logits, as a model caps lm_head(x))."""
    if HAS_BIAS:
        z = z + tl.load(b_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    if HAS_SOFTCAP:
        z = soft_cap(z, softcap)
    return z


@triton.jit
def online_logsumexp(run_max, run_sumexp, z):
    """One tile of the streaming logsumexp; z is -inf on padded columns (and wherever a bias of -inf masks a word).

    m' = max(m, max_v z_v);  alpha = exp(m - m');  e_v = exp(z_v - m');  s' = s * alpha + sum_v e_v.
    Returns (m', s', alpha, e): alpha rescales any other running sum kept relative to m.
    Where m' is infinite the exponents are taken against 0 instead of exp(+-inf - +-inf) = NaN: while a row has seen
    only -inf (e.g. a split that starts with masked words) alpha and e are 0 and s stays 0; once it has seen +inf
    (an infinite hidden state or weight) s is +inf, so its logsumexp is +inf as torch.logsumexp gives.
    """
    new_max = tl.maximum(run_max, tl.max(z, axis=1))
    shift = tl.where(tl.abs(new_max) == float("inf"), 0.0, new_max)
    alpha = tl.exp(run_max - shift)
    e = tl.exp(z - shift[:, None])
    return new_max, run_sumexp * alpha + tl.sum(e, axis=1), alpha, e


@triton.jit
def store_gradient_tile(g_ptr, g, rows, cols, row_mask, col_mask, G_STRIDE):
    """Writes the fp32 gradient tile g into rows x cols of a row-major chunk buffer (row stride G_STRIDE),
    rounded to the buffer's dtype; padded rows and columns are not written."""
    tl.store(g_ptr + rows.to(tl.int64)[:, None] * G_STRIDE + cols[None, :], g.to(g_ptr.dtype.element_ty),
             mask=row_mask[:, None] & col_mask[None, :])
