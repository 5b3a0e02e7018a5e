"""Padding encoded examples into a batch no longer than its longest row, with answer-target masks.

`target_mask[b, t]` is True when position t's target, token t+1, is an answer token: the mask is aligned
with the shifted targets (`input_ids[:, 1:]`) and with the hidden state that predicts them. Padding is
right-side and carries attention 0 and target mask False, so the filler id never matters and need not
be the tokenizer's pad token (a tokenizer without one works the same).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from fastalign.unlearn.encoding import EncodedExample


@dataclass
class TokenBatch:
    """input_ids, attention_mask [B, T] int64 and target_mask [B, T-1] bool (True: target is an answer token)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    target_mask: torch.Tensor

    def to(self, device) -> "TokenBatch":
        return TokenBatch(self.input_ids.to(device), self.attention_mask.to(device), self.target_mask.to(device))

    def rows(self, start: int, stop: int) -> "TokenBatch":
        """The sub-batch of rows [start, stop)."""
        return TokenBatch(self.input_ids[start:stop], self.attention_mask[start:stop], self.target_mask[start:stop])

    @property
    def num_tokens(self) -> int:
        """Tokens that are not padding."""
        return int(self.attention_mask.sum())


def filler_token_id(tokenizer) -> int:
    """The id written into padding: the pad token, else EOS, else 0 (masked out either way)."""
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    return 0


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
