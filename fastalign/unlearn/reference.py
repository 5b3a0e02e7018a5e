"""Where the KL term's reference distribution P comes from: three interchangeable sources.

Each is called with the normal rows of a batch, their indices into the normal set and the policy's
lm_head weight, and returns (reference hidden states at the answer targets [N, H], reference lm_head
weight); the KL op then forms P = softmax(hidden_ref @ weight_ref.T) without materialising it.

- FrozenCopyReference: a frozen copy of the model as it was (memory: a second model).
- AdapterDisabledReference: the same PEFT model with its adapter switched off (no second copy).
- CachedReference: the reference hidden states of the whole normal set, computed once up front; no
  reference model is kept, which is valid only while the lm_head the cache is paired with never changes.
"""
from __future__ import annotations

import copy
from typing import Sequence

import torch

from fastalign.unlearn.batching import TokenBatch, collate
from fastalign.unlearn.encoding import EncodedExample
from fastalign.unlearn.models import at_answer_targets, base_causal_lm, causal_lm_parts, final_hidden_states

REFERENCE_MODES = ("copy", "adapter", "cached")


class FrozenCopyReference:
    """A frozen deep copy of the model taken at construction, optionally cast to another dtype."""

    def __init__(self, model, dtype: torch.dtype | None = None):
        self.model = copy.deepcopy(base_causal_lm(model)).requires_grad_(False).eval()
        if dtype is not None:
            self.model.to(dtype)
        self.decoder, self.lm_head = causal_lm_parts(self.model)

    @torch.no_grad()
    def __call__(self, tokens: TokenBatch, normal_index: torch.Tensor, weight: torch.Tensor):
        return at_answer_targets(final_hidden_states(self.decoder, tokens), tokens.target_mask), self.lm_head.weight


class AdapterDisabledReference:
    """The policy itself with its PEFT adapter disabled: the base model the adapter was trained on top of."""

    def __init__(self, model):
        if not (hasattr(model, "disable_adapter") and hasattr(model, "get_base_model")):
            raise TypeError(f"reference='adapter' needs a PEFT model with an adapter (e.g. LoRA), got "
                            f"{type(model).__name__}; train with LoRA or choose reference='copy' or 'cached'")
        self.model = model

    @torch.no_grad()
    def __call__(self, tokens: TokenBatch, normal_index: torch.Tensor, weight: torch.Tensor):
        with self.model.disable_adapter():
            decoder, lm_head = causal_lm_parts(self.model)
            return at_answer_targets(final_hidden_states(decoder, tokens), tokens.target_mask), lm_head.weight


class CachedReference:
    """Reference hidden states of every normal example, computed once, paired with a frozen lm_head.

    At every call the lm_head weight is checked: it must not require a gradient and must not have been
    modified in place since the cache was built (an optimizer step would do that); otherwise the KL term
    would silently compare against a different distribution, so the call raises.
    """

    def __init__(self, model, normal: Sequence[EncodedExample], *, batch_size: int = 8, filler_id: int = 0,
                 device: torch.device | str | None = None):
        decoder, lm_head = causal_lm_parts(model)
        self._weight = lm_head.weight
        self._check_frozen()
        self._version = self._weight._version
        device = self._weight.device if device is None else torch.device(device)
        training = decoder.training
        decoder.eval()
        self.cache: list[torch.Tensor] = []
        with torch.no_grad():
            for start in range(0, len(normal), batch_size):
                chunk = normal[start:start + batch_size]
                tokens = collate(chunk, filler_id).to(self._weight.device)
                hidden = final_hidden_states(decoder, tokens)
                counts = tokens.target_mask.sum(1).tolist()
                self.cache.extend(h.to(device) for h in at_answer_targets(hidden, tokens.target_mask).split(counts))
        decoder.train(training)

    @property
    def num_bytes(self) -> int:
        return sum(h.numel() * h.element_size() for h in self.cache)

    def _check_frozen(self):
        if self._weight.requires_grad:
            raise ValueError("reference='cached' needs a frozen lm_head (its weight requires grad): the cached "
                             "reference hidden states are only valid with the lm_head they were computed with; "
                             "freeze it (and tied input embeddings) or choose reference='copy'")

    def __call__(self, tokens: TokenBatch, normal_index: torch.Tensor, weight: torch.Tensor):
        self._check_frozen()
        if self._weight._version != self._version:
            raise RuntimeError("reference='cached': the lm_head weight was modified after the reference was cached")
        if not normal_index.numel():
            return weight.new_zeros((0, weight.shape[1])), weight
        return torch.cat([self.cache[i] for i in normal_index.tolist()]).to(weight.device), self._weight
