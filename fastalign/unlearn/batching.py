"""Padding encoded examples into a batch no longer than its longest row, with answer-target masks.

`target_mask[b, t]` is True when position t's target, token t+1, is an answer token: the mask is aligned
with the shifted targets (`input_ids[:, 1:]`) and with the hidden state that predicts them. Padding is
right-side and carries attention 0 and target mask False, so the filler id never matters and need not
be the tokenizer's pad token (a tokenizer without one works the same): the caller picks one the model embeds
(model_vocabulary.pad_id, as generation does).

A batch moved to the device keeps the host batch it came from (`host`): the host knows its lengths and answer
positions, which read off the device tensors would make it wait for the device's queued work each time.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch

from fastalign.unlearn.encoding import EncodedExample


@dataclass
class TokenBatch:
    """input_ids, attention_mask [B, T] int64 and target_mask [B, T-1] bool (True: target is an answer token);
    host: the same batch on the CPU where `to` moved this one from it (None: none kept)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    target_mask: torch.Tensor
    host: Optional["TokenBatch"] = field(default=None, repr=False, compare=False)

    def __post_init__(self):
        """Shapes and dtypes checked by name (a target_mask as wide as input_ids, the labels' convention, was read
        shifted by a token); the right padding is checked where the host reads the lengths (RowPacker.plan)."""
        if self.input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [B, T], got shape {tuple(self.input_ids.shape)}")
        rows, width = self.input_ids.shape
        if self.attention_mask.shape != (rows, width):
            raise ValueError(f"attention_mask must have input_ids' shape {(rows, width)}, got "
                             f"{tuple(self.attention_mask.shape)}")
        if self.target_mask.dtype != torch.bool or self.target_mask.shape != (rows, max(width - 1, 0)):
            raise ValueError(f"target_mask must be bool [B, T-1] = {(rows, max(width - 1, 0))} (True where the "
                             f"shifted target input_ids[:, 1:] is an answer token), got {self.target_mask.dtype} "
                             f"{tuple(self.target_mask.shape)}")

    def to(self, device) -> "TokenBatch":
        """The batch on `device`, keeping its host copy. A copy from the CPU is non-blocking: it need not wait for
        the device's queued work, and is safe from pageable memory (staged before the call returns)."""
        non_blocking = self.input_ids.device.type == "cpu"
        return TokenBatch(*(t.to(device, non_blocking=non_blocking)
                            for t in (self.input_ids, self.attention_mask, self.target_mask)),
                          host=self.host or (self if non_blocking else None))

    def rows(self, start: int, stop: int) -> "TokenBatch":
        """The sub-batch of rows [start, stop)."""
        return TokenBatch(self.input_ids[start:stop], self.attention_mask[start:stop], self.target_mask[start:stop],
                          host=None if self.host is None else self.host.rows(start, stop))

    @property
    def on_host(self) -> "TokenBatch":
        """The batch that lengths and answer positions are read from: its host copy, else itself (read on the
        device, where the host then waits for it)."""
        return self.host or self

    @property
    def num_tokens(self) -> int:
        """Tokens that are not padding."""
        return int(self.on_host.attention_mask.sum())

    @property
    def width(self) -> int:
        """The longest row's length (the columns past it hold padding only)."""
        return int(self.on_host.attention_mask.sum(1).max())

    def answer_positions(self, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(rows, columns) of the answer targets among the first width - 1 columns, row-major, on the host."""
        return self.on_host.target_mask[:, :width - 1].nonzero(as_tuple=True)


def collate(examples: Sequence[EncodedExample], filler_id: int) -> TokenBatch:
    """Right-pads examples to the longest of them."""
    if not examples:
        raise ValueError("collate: no examples")
    width = max(len(e.input_ids) for e in examples)
    input_ids = torch.full((len(examples), width), filler_id, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    target_mask = torch.zeros((len(examples), max(width - 1, 0)), dtype=torch.bool)
    for row, e in enumerate(examples):
        input_ids[row, :len(e.input_ids)] = torch.tensor(e.input_ids, dtype=torch.long)
        attention_mask[row, :len(e.input_ids)] = 1
        target_mask[row, max(e.answer_start, 1) - 1:e.answer_end - 1] = True
    return TokenBatch(input_ids, attention_mask, target_mask)
