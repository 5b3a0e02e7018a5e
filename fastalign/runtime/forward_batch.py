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
    # (cu_group_rows, prefix_lens) int32: rows that share prefix blocks, for the cascade attention; or None
    shared_prefix: Optional[Tuple[torch.Tensor, torch.Tensor]] = None

    @classmethod
    def from_plan(cls, plan, device, *, cascade_block_size=None):
        """Two host-to-device copies in all: one of the int64 arrays, one of the int32 ones.

        cascade_block_size: the pool's block size to also plan which rows share whole prefix blocks
        (`plan_shared_prefix`, for `paged_attention(shared_prefix=...)`); None plans nothing.
        """
        block_table, seq_lens, cu_q_lens, extra_src = plan.block_table, plan.seq_lens, plan.cu_q_lens, plan.extra_src
        groups = () if cascade_block_size is None else plan_shared_prefix(block_table, seq_lens, cu_q_lens,
                                                                           cascade_block_size) or ()
        wide = [plan.token_ids.astype(np.int64), plan.positions.astype(np.int64), plan.slot_mapping, extra_src,
                plan.extra_dst]
        narrow = [block_table.ravel(), seq_lens, cu_q_lens] + [t.numpy() for t in groups]
        input_ids, positions, slot_mapping, extra_src_d, extra_dst_d = _to_device(wide, device)
        table, seq_lens_d, cu_q_lens_d, *shared_prefix = _to_device(narrow, device)
        return cls(
            input_ids=input_ids,
            positions=positions,
            slot_mapping=slot_mapping,
            block_table=table.view(block_table.shape),
            seq_lens=seq_lens_d,
            cu_q_lens=cu_q_lens_d,
            host_seq_lens=seq_lens,
            host_cu_q_lens=cu_q_lens,
            extra_src=extra_src_d,
            extra_dst=extra_dst_d,
            host_extra_src=extra_src,
            shared_prefix=tuple(shared_prefix) or None,
        )

    @property
    def num_tokens(self):
        return self.input_ids.shape[0]


def _to_device(arrays, device):
    """The host arrays (all of one dtype) on `device` after one copy: views of one tensor, in order."""
    flat = torch.from_numpy(np.concatenate(arrays)).to(device)
    return flat.split([a.size for a in arrays])
