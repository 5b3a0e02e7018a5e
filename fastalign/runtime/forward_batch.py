"""A forward plan of the span tree moved to the model's device, in the layout of the paged attention ops."""
from dataclasses import dataclass
from typing import Optional, Tuple

import numpy as np
import torch

from fastalign.ops.paged_attention import plan_shared_prefix


@dataclass
class ForwardBatch:
    """R rows of new tokens, packed: row r owns tokens cu_q_lens[r]:cu_q_lens[r + 1]."""

    input_ids: torch.Tensor     # [T] int64
    positions: torch.Tensor     # [T] int64
    slot_mapping: torch.Tensor  # [T] int64, where each new token's K/V goes in the pool
    block_table: torch.Tensor   # [R, max_blocks] int32
    seq_lens: torch.Tensor      # [R] int32, context length of each row with its new tokens
    cu_q_lens: torch.Tensor     # [R + 1] int32
    host_seq_lens: np.ndarray   # the same two on the host, for loops and output selection
    host_cu_q_lens: np.ndarray
    extra_src: torch.Tensor     # [E] int64: token extra_src[i]'s K/V also goes to slot extra_dst[i] (a block
    extra_dst: torch.Tensor     # [E] int64  copied for a row that extends a row of the same forward)
    host_extra_src: np.ndarray
    copy_src: torch.Tensor      # [C] int64: pool blocks copied to copy_dst before the forward (copy-on-write of
    copy_dst: torch.Tensor      # [C] int64  a partly filled block)
    outputs: torch.Tensor       # [S] int64: the tokens whose outputs the caller reads (`from_plan`'s `outputs`)
    # (cu_group_rows, prefix_lens) int32: rows that share prefix blocks, for the cascade attention; or None
    shared_prefix: Optional[Tuple[torch.Tensor, torch.Tensor]] = None
    # [R] int64: the span each row makes (or brings back) in the span tree (None: a batch of no tree, a probe's)
    host_row_spans: Optional[np.ndarray] = None

    @classmethod
    def from_plan(cls, plan, device, *, outputs=(), cascade_block_size=None):
        """The plan's arrays on `device` after ONE host-to-device copy, non-blocking: it need not wait for the work
        queued on the device (the previous forward), and is safe from pageable memory (staged before it returns).

        outputs: token indices whose outputs the caller will select. cascade_block_size: the pool's block size
        to also plan which rows share whole prefix blocks (`plan_shared_prefix`, for
        `paged_attention(shared_prefix=...)`); None plans nothing.
        """
        block_table, seq_lens, cu_q_lens = plan.block_table, plan.seq_lens, plan.cu_q_lens
        host_extra_src = plan.extra_src
        groups = () if cascade_block_size is None else plan_shared_prefix(block_table, seq_lens, cu_q_lens,
                                                                           cascade_block_size) or ()
        (input_ids, positions, slot_mapping, extra_src, extra_dst, copy_src, copy_dst, outputs, table, seq_lens_d,
         cu_q_lens_d, *shared_prefix) = _to_device(
            [plan.token_ids.astype(np.int64), plan.positions.astype(np.int64), plan.slot_mapping, host_extra_src,
             plan.extra_dst, plan.copy_src.astype(np.int64), plan.copy_dst.astype(np.int64),
             np.asarray(outputs, dtype=np.int64), block_table.ravel(), seq_lens, cu_q_lens]
            + [t.numpy() for t in groups], device)
        return cls(
            input_ids=input_ids,
            positions=positions,
            slot_mapping=slot_mapping,
            block_table=table.view(block_table.shape),
            seq_lens=seq_lens_d,
            cu_q_lens=cu_q_lens_d,
            host_seq_lens=seq_lens,
            host_cu_q_lens=cu_q_lens,
            extra_src=extra_src,
            extra_dst=extra_dst,
            host_extra_src=host_extra_src,
            copy_src=copy_src,
            copy_dst=copy_dst,
            outputs=outputs,
            host_row_spans=plan.row_spans,
            shared_prefix=tuple(shared_prefix) or None,
        )

    @property
    def num_tokens(self):
        return self.input_ids.shape[0]


_ALIGN = 16  # bytes: Triton specialises a kernel on whether each pointer argument is 16-byte aligned


def _to_device(arrays, device):
    """The host arrays on `device` after one copy of their bytes, each then a view of its own dtype. Every array
    starts 16-byte aligned, as a tensor of its own would: the Triton kernels taking them compile once, not once
    per combination of alignments."""
    arrays = [np.ascontiguousarray(a) for a in arrays]
    starts, size = [], 0
    for a in arrays:
        starts.append(size)
        size += -(-a.nbytes // _ALIGN) * _ALIGN
    packed = np.zeros(size, dtype=np.uint8)
    for a, start in zip(arrays, starts):
        packed[start:start + a.nbytes] = a.reshape(-1).view(np.uint8)
    flat = torch.from_numpy(packed).to(device, non_blocking=True)
    return [flat[start:start + a.nbytes].view(_TORCH_DTYPES[a.dtype]) for a, start in zip(arrays, starts)]


_TORCH_DTYPES = {np.dtype(np.int32): torch.int32, np.dtype(np.int64): torch.int64}
