"""The backward pass shared by the fused linear-softmax losses, in bounded memory and without atomics.

Both losses have a gradient wrt the logits z = x W^T of the form G[t, v] = grad_scale[t] * D[t, v]
(D = softmax(z_t) - onehot(y_t) for cross-entropy, q_t - p_t for the KL), which a loss-specific Triton
kernel recomputes tile by tile from the logsumexps saved in the forward pass. The gradients are then

    d_x = G @ W        (a contraction over the vocabulary)
    d_W = G^T @ x      (a contraction over the rows)

A single fused kernel that pushes each tile's products into [M, H] and [V, H] accumulators needs fp32
buffers of both sizes (for Llama-3-8B's head, [V, H] in fp32 alone is as large as the bf16 logits of 8k
tokens) and moves 4 bytes of atomic traffic per multiply-add pair of every tile. Here instead:

- the rows are taken in segments of `rows` rows; each segment owns an fp32 accumulator of d_x [rows, H]
  that sees the whole vocabulary before it is rounded once into d_hidden (exact fp32 sum over V);
- within a segment, the vocabulary is taken in chunks of `cols` columns; the kernel writes G of one
  (segment, chunk) into a [rows, cols] buffer in the input dtype, and two library matmuls take the
  products: d_x_segment += G @ W[chunk] (rounded to the input dtype once per chunk, then summed in fp32),
  d_W[chunk] += G^T @ x[segment] (accumulated into d_weight in the weight dtype, one rounding per segment).
  In a 16-bit dtype the error of those roundings grows with their number (bf16 d_weight, measured on CPU:
  3.6e-3 relative with 8 segments, 1.5e-2 with 128), so a backward takes at most 32 segments: past 32
  segments of the default size, segments grow with N (their scratch stays under ~0.6% of the bytes of the
  bf16 logits for H up to 4096 and V from 128256, ~1.1% at H 8192).

Extra memory is the accumulator, one matmul output and one G chunk, whatever V, and whatever N up to 32
default segments: about 16 MiB at H = 4096 in bf16 (under 1% of the 2 GiB of bf16 logits of 8192 tokens
over 128256 words). The matmuls run at library speed on tensor cores (fp32 inputs: at torch's float32 matmul
precision, full fp32 by default), and the results are deterministic (no atomics).

The same loop also serves the gradients taken in the forward pass (grads_in_forward=True of the ops, for a scalar
loss whose backward only scales them): there a block of rows takes its logits over the whole vocabulary at once
from a library matmul, in fp32 (library_logits), the loss's kernels read them from that buffer instead of
recomputing them, and the block is the one chunk of its segment (row_block_plan). That does the work of one
product fewer (6 N H V multiply-adds counted twice, against 8 N H V for a forward and a backward that recomputes),
for a buffer of whole rows: about 6 bytes per logit of a block (fp32 logits, a 16-bit G), one fp32 logit more per
word for the KL's reference head.

fp16 has too little range for G itself (grad_scale is often ~1e-4 / tokens): in fp16 the kernels write
G / max|grad_scale| (entries in [-1, 1]) and the scale is multiplied back in fp32, as the alpha of the
matmuls and on the fp32 accumulator. That alpha is a host number, which waits for the device in the middle of the
backward pass; bf16 has fp32's range, so bf16 and fp32 take G as it is and do not wait.
"""
import torch

from .linear_softmax_tiles import INTERPRET

# fp32 d_x accumulator of one row segment, and entries of G per chunk (enough tiles to fill an H100/H200:
# 2M entries are 128 tiles of 128 x 128)
_SEGMENT_ACCUMULATOR_BYTES = 8 * 2 ** 20
_GRADIENT_CHUNK_ENTRIES = 2 ** 21
# d_weight's running sum is rounded into its dtype once per segment: the most segments a backward takes
_MAX_SEGMENTS = 32
_ALIGN = 128
# Under the interpreter (CPU tests) tiny segments and chunks, so that every boundary is crossed at test shapes.
_INTERPRET_ROWS, _INTERPRET_COLS = 16, 64
# The buffers of one block of whole logits rows (row_block_plan), and the rows of a block are a multiple of this
_ROW_BLOCK_BYTES = 192 * 2 ** 20
_ROW_BLOCK_ALIGN = 64


def chunk_plan(num_rows, vocab, hidden_size):
    """(rows per segment, columns per chunk) for a backward over [num_rows, vocab] logits of width hidden_size."""
    if INTERPRET:
        return min(num_rows, _INTERPRET_ROWS), min(vocab, _INTERPRET_COLS)
    rows = max(_ALIGN, _SEGMENT_ACCUMULATOR_BYTES // (4 * hidden_size) // _ALIGN * _ALIGN)
    fewest = -(-num_rows // _MAX_SEGMENTS)             # rows per segment for at most _MAX_SEGMENTS segments
    rows = min(max(rows, -(-fewest // _ALIGN) * _ALIGN), num_rows)
    cols = max(_ALIGN, _GRADIENT_CHUNK_ENTRIES // rows // _ALIGN * _ALIGN)
    return rows, min(cols, vocab)


def row_block_plan(num_rows, vocab, bytes_per_logit):
    """(rows per block, vocab) for gradients taken from blocks of whole logits rows whose buffers hold
    bytes_per_logit bytes per logit: as many rows as _ROW_BLOCK_BYTES holds, and more where that would round
    d_weight more than _MAX_SEGMENTS times (the buffers then grow with N, as a backward's segments do)."""
    if INTERPRET:
        return min(num_rows, _INTERPRET_ROWS), vocab
    rows = max(_ROW_BLOCK_ALIGN, _ROW_BLOCK_BYTES // (bytes_per_logit * vocab) // _ROW_BLOCK_ALIGN * _ROW_BLOCK_ALIGN)
    fewest = -(-num_rows // _MAX_SEGMENTS)
    rows = max(rows, -(-fewest // _ROW_BLOCK_ALIGN) * _ROW_BLOCK_ALIGN)
    return min(rows, num_rows), vocab


def library_logits(hidden, weight):
    """hidden @ weight^T in fp32 [rows, V] by a library matmul: 16-bit operands multiply on the tensor cores with
    fp32 accumulation and an fp32 output (torch.mm's out_dtype, CUDA only); the interpreter's CPU tensors are upcast
    first (the same products, for tests). A view of rows padded to a multiple of 16 floats, a row stride that Triton
    specialises: the kernels that read the buffer at V 32001 or 50257 otherwise spilled kilobytes of registers."""
    vocab = weight.shape[0]
    logits = torch.empty(hidden.shape[0], -(-vocab // 16) * 16, dtype=torch.float32, device=hidden.device)[:, :vocab]
    if hidden.dtype == torch.float32:
        return torch.mm(hidden, weight.t(), out=logits)
    if hidden.is_cuda:
        return torch.mm(hidden, weight.t(), out_dtype=torch.float32, out=logits)
    return torch.mm(hidden.float(), weight.float().t(), out=logits)


def backward_in_chunks(hidden, weight, grad_scale, need_weight_grad, need_bias_grad, segment_writer,
                       need_hidden_grad=True, plan=None):
    """(d_hidden [M, H] in hidden's dtype or None, d_weight [V, H] in weight's dtype or None, d_bias [V] fp32 or
    None); a gradient nobody asked for is neither computed nor allocated (the G @ W products are a third of the
    backward's work, wasted when only the weight is trained on hidden states from a frozen backbone).

    segment_writer(rows, row_scale) is called once per row segment (rows a slice, row_scale [len(rows)] fp32)
    and returns write(cols, out), which must fill out [len(rows), len(cols)] (a strided view) with
    D[rows, cols] * row_scale[:, None] for the slice cols. The chunk loop runs once per chunk on the host
    while the GPU runs its three products, so what can be done once per segment is done there.
    plan: (rows per segment, columns per chunk), chunk_plan's unless given (row_block_plan's for whole rows).
    """
    num_rows, hidden_size = hidden.shape
    vocab = weight.shape[0]
    seg_rows, chunk_cols = plan or chunk_plan(num_rows, vocab, hidden_size)
    if hidden.dtype == torch.float16:
        # G / scale_max: entries of size <= 1 whatever grad_scale, so that fp16 neither underflows nor overflows
        scale_max = grad_scale.abs().max()
        row_scale = (grad_scale / scale_max.clamp(min=torch.finfo(torch.float32).tiny)).float()
        # the alpha of d_weight's matmuls is a host number, which waits for the device: read only where d_weight is
        # asked for (not for a frozen lm_head); d_bias and d_hidden take the scale as a tensor, the same product in fp32
        weight_alpha = scale_max.item() if need_weight_grad else None
    else:
        scale_max, row_scale, weight_alpha = 1.0, grad_scale.float(), 1.0

    d_hidden = torch.empty_like(hidden) if need_hidden_grad else None
    d_weight = torch.zeros_like(weight) if need_weight_grad else None
    d_bias = torch.zeros(vocab, dtype=torch.float32, device=hidden.device) if need_bias_grad else None
    gradient = torch.empty(seg_rows, chunk_cols, dtype=hidden.dtype, device=hidden.device)
    if need_hidden_grad:
        partial = torch.empty(seg_rows, hidden_size, dtype=hidden.dtype, device=hidden.device)
        accumulator = torch.empty(seg_rows, hidden_size, dtype=torch.float32, device=hidden.device)
    for r0 in range(0, num_rows, seg_rows):
        rows = slice(r0, min(r0 + seg_rows, num_rows))
        n = rows.stop - r0
        segment_hidden = hidden[rows]
        if need_hidden_grad:
            acc, segment_partial = accumulator[:n].zero_(), partial[:n]
        write_gradient = segment_writer(rows, row_scale[rows])
        for c0 in range(0, vocab, chunk_cols):
            cols = slice(c0, min(c0 + chunk_cols, vocab))
            g = gradient[:n, :cols.stop - c0]
            write_gradient(cols, g)
            if need_hidden_grad:
                acc += torch.mm(g, weight[cols], out=segment_partial)
            if d_weight is not None:
                d_weight[cols].addmm_(g.t(), segment_hidden, alpha=weight_alpha)
            if d_bias is not None:
                d_bias[cols] += g.sum(dim=0, dtype=torch.float32) * scale_max
        if need_hidden_grad:
            d_hidden[rows] = acc.mul_(scale_max)
        del write_gradient   # and whatever it holds (a block's logits), before the next segment makes its own
    return d_hidden, d_weight, d_bias
