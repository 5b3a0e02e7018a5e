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
        num_tokens, rows = plan.num_tokens, plan.num_rows
        block_table = plan.block_table
        seq_lens, cu_q_lens = plan.seq_lens, plan.cu_q_lens
        extra_src, extra_dst = plan.extra_src, plan.extra_dst
        groups = None if cascade_block_size is None else plan_shared_prefix(block_table, seq_lens, cu_q_lens,
                                                                             cascade_block_size)
        wide = torch.from_numpy(np.concatenate(
            [plan.token_ids.astype(np.int64), plan.positions.astype(np.int64), plan.slot_mapping, extra_src,
             extra_dst]))
        narrow_parts = [block_table.ravel(), seq_lens, cu_q_lens]
        if groups is not None:
            narrow_parts += [t.numpy() for t in groups]
        narrow = torch.from_numpy(np.concatenate(narrow_parts))
        wide, narrow = wide.to(device), narrow.to(device)
        table_size = block_table.size
        shared_prefix = None
        if groups is not None:
            start = table_size + 2 * rows + 1
            num_groups = len(groups[1])
            shared_prefix = (narrow[start:start + num_groups + 1], narrow[start + num_groups + 1:])
        return cls(
            input_ids=wide[:num_tokens],
            positions=wide[num_tokens:2 * num_tokens],
            slot_mapping=wide[2 * num_tokens:3 * num_tokens],
            block_table=narrow[:table_size].view(rows, block_table.shape[1]),
            seq_lens=narrow[table_size:table_size + rows],
            cu_q_lens=narrow[table_size + rows:table_size + 2 * rows + 1],
            host_seq_lens=seq_lens,
            host_cu_q_lens=cu_q_lens,
            extra_src=wide[3 * num_tokens:3 * num_tokens + len(extra_src)],
            extra_dst=wide[3 * num_tokens + len(extra_src):],
            host_extra_src=extra_src,
            shared_prefix=shared_prefix,
        )

    @property
    def num_rows(self):
        return self.seq_lens.shape[0]

    @property
    def num_tokens(self):
        return self.input_ids.shape[0]
