"""Distributions and draws shared by every engine, so that all engines turn the same logits into the same
token sets.

- `top_k_distribution`: the k most likely tokens (ascending token id, a canonical order) with their
  probabilities renormalised over those k (the reference's top-k warper followed by a softmax);
  `top_k_and_ranked` gives it and the ranked tokens of one call's logits from one topk.
- Samplers draw one column per row of a probability matrix, all rows in one call (`draw`), or several
  draws per row (`draw_many`, for pools of rollout tokens drawn ahead; the built-in samplers' `draw_many_on_device`
  leaves them on the device, for the tree engine to read with a call's other outputs). `TorchSampler` uses a seeded
  generator (production): its draws are independent, each used once. A search draws from its prompt's own
  sampler (`for_prompt(index)`: a copy of the TorchSampler seeded from its seed and the prompt's index), so that a
  prompt's draws do not depend on the prompts searched before or beside it (a plug-in sampler without
  `for_prompt` serves every prompt itself). `KeyedSampler` derives each draw from
  a 64-bit key that depends only on the token prefix and the candidate's stream index, by inverse-CDF
  sampling, so that batching, ordering or reuse between engines cannot change a draw (`repeatable`: a
  draw at the same key always gives the same token): the basis of the deterministic equivalence tests. A
  plug-in sampler (any object with draw, draw_many and repeatable) has its draws checked (`CheckedSampler`).
- Keys: `extend_key(key, tokens)` hashes a token sequence incrementally (splitmix64 mixing);
  `draw_key(prefix_key, stream)` names one draw.
"""
import copy
import operator
from typing import Iterable, List, Sequence, Tuple

import torch

from fastalign.transfers import index_on

_MASK = (1 << 64) - 1
ROLLOUT_STREAM = 1 << 40        # stream of the simulation draws; expansion samples use 1, 2, ...


def _mix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK
    return x ^ (x >> 31)


def extend_key(key: int, tokens: Iterable[int]) -> int:
    """Key of a token sequence extended by `tokens` (start from `seed_key(seed)`)."""
    for t in tokens:
        key = _mix64(key ^ (int(t) * 0xD6E8FEB86659FD93 & _MASK))
    return key


def seed_key(seed: int) -> int:
    return _mix64(int(seed) & _MASK)


def draw_key(prefix_key: int, stream: int) -> int:
    return _mix64(prefix_key ^ _mix64(int(stream) + 0x632BE59BD9B4E019))


def top_k_distribution(logits: torch.Tensor, k: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """logits [R, V] -> (token ids [R, k'] ascending, probabilities [R, k'] float32), k' = min(k, V)."""
    ids, values = _by_id(*logits.float().topk(min(k, logits.shape[-1]), dim=-1))
    return ids, torch.softmax(values, dim=-1)


def ranked_tokens(logits: torch.Tensor, rank: int) -> Tuple[List[List[int]], List[List[float]]]:
    """logits [R, V] -> per row the `rank` most likely token ids (ascending id) and their logits."""
    ids, values = ranked_token_tensors(logits, rank)
    return ids.tolist(), values.tolist()


def ranked_token_tensors(logits: torch.Tensor, rank: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """ranked_tokens as tensors [R, rank'] on the logits' device (ids int64, logits float32), rank' = min(rank, V)."""
    return _by_id(*logits.float().topk(min(rank, logits.shape[-1]), dim=-1))


def top_k_and_ranked(logits: torch.Tensor, k: int, rank: int):
    """(top_k_distribution(logits, k), ranked_token_tensors(logits, rank)) from one topk over the vocabulary, of
    the larger count (a topk's columns come by value: its first k are the topk of k), not one each."""
    values, ids = logits.float().topk(min(max(k, rank), logits.shape[-1]), dim=-1)
    top_ids, top_values = _by_id(values[..., :k], ids[..., :k])
    return (top_ids, torch.softmax(top_values, dim=-1)), _by_id(values[..., :rank], ids[..., :rank])


def _by_id(values: torch.Tensor, ids: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """A topk's (values, ids), in the canonical order: (ids ascending, their values)."""
    ids, order = ids.sort(dim=-1)
    return ids, values.gather(-1, order)


class TorchSampler:
    """Draws with torch.multinomial from a seeded generator (on the probabilities' device)."""
    repeatable = False

    def __init__(self, seed: int = 0):
        self.seed = seed
        self._generators = {}

    def _generator(self, device):
        device = torch.device(device)
        if device not in self._generators:
            self._generators[device] = torch.Generator(device=device).manual_seed(self.seed)
        return self._generators[device]

    def draw(self, probs: torch.Tensor, keys: Sequence[int]) -> List[int]:
        if probs.shape[0] == 0:
            return []
        return torch.multinomial(probs.float(), 1, generator=self._generator(probs.device)).squeeze(1).tolist()

    def draw_many(self, probs: torch.Tensor, keys: Sequence[int], count: int) -> List[List[int]]:
        """`count` independent draws per row (with replacement), in one call."""
        if probs.shape[0] == 0:
            return []
        return self.draw_many_on_device(probs, keys, count).tolist()

    def draw_many_on_device(self, probs: torch.Tensor, keys: Sequence[int], count: int) -> torch.Tensor:
        """draw_many's draws as a tensor [R, count] on the probabilities' device (R >= 1), not yet read by the host:
        the tree engine reads them with the rest of a call's outputs, in one copy."""
        return torch.multinomial(probs.float(), count, replacement=True, generator=self._generator(probs.device))

    def for_prompt(self, index: int) -> "TorchSampler":
        """The sampler of the prompt at `index`: a generator of its own, seeded from (seed, index) alone: a shallow
        copy of itself (copy.copy), so that a subclass keeps its own draws and attributes."""
        own = copy.copy(self)
        own.seed, own._generators = draw_key(seed_key(self.seed), index), {}
        return own


class KeyedSampler:
    """Inverse-CDF draws whose uniform number is a function of the draw's key alone (float64, on the
    probabilities' device; each row independent of the others)."""
    repeatable = True

    def __init__(self, seed: int = 0):
        self.seed = seed

    def draw(self, probs: torch.Tensor, keys: Sequence[int]) -> List[int]:
        if probs.shape[0] == 0:
            return []
        return self.draw_many_on_device(probs, keys, 1).squeeze(1).tolist()

    def draw_many(self, probs: torch.Tensor, keys: Sequence[int], count: int) -> List[List[int]]:
        """One draw per row: drawing again at the same key would give the same token (`repeatable`)."""
        return [[t] for t in self.draw(probs, keys)]

    def draw_many_on_device(self, probs: torch.Tensor, keys: Sequence[int], count: int) -> torch.Tensor:
        """draw_many's draws as a tensor [R, 1] on the probabilities' device (R >= 1), not yet read by the host."""
        salt = seed_key(self.seed)   # each uniform's 53 bits go as an int64 by index_on's non-blocking copy: the
        # host need not wait for the device's queue; over 2**53 on the device, the same float64 as on the host
        u = index_on([_mix64(k ^ salt) >> 11 for k in keys], probs.device).double() / float(1 << 53)
        cdf = probs.detach().double().cumsum(dim=-1)
        u = u.unsqueeze(1) * cdf[:, -1:]
        return torch.searchsorted(cdf, u, right=True).clamp_(max=probs.shape[-1] - 1)

    def for_prompt(self, index: int) -> "KeyedSampler":
        """Itself: its draws depend on their keys alone, which name the prompt's tokens."""
        return self


def on_device_draws(sampler):
    """`sampler.draw_many_on_device` where the sampler's draw_many is a built-in sampler's (a subclass that
    overrides draw_many keeps its own draws); None otherwise: the caller then takes draw_many's lists."""
    if getattr(type(sampler), "draw_many", None) in (TorchSampler.draw_many, KeyedSampler.draw_many):
        return sampler.draw_many_on_device
    return None


def prompt_sampler(sampler, index: int):
    """The sampler a prompt's search draws from: `sampler.for_prompt(index)`, or `sampler` itself where it has no
    such method (a caller's own sampler object, shared by every prompt as before)."""
    for_prompt = getattr(sampler, "for_prompt", None)
    return sampler if for_prompt is None else for_prompt(index)


def check_sampler(sampler):
    """`sampler` when it is a built-in one (its draw and draw_many are TorchSampler's or KeyedSampler's), else
    CheckedSampler(sampler) when it has a sampler's members (draw, draw_many, repeatable: see this module's
    docstring); else a ValueError naming what it lacks, before any prompt is searched."""
    name = type(sampler).__name__
    for method in ("draw", "draw_many"):
        if not callable(getattr(sampler, method, None)):
            raise ValueError(f"sampler: {name} has no method {method}; expected 'torch', 'keyed' or an object with "
                             "draw(probs, keys), draw_many(probs, keys, count) and repeatable (True or False)")
    if not isinstance(getattr(sampler, "repeatable", None), bool):
        raise ValueError(f"sampler: {name}.repeatable must be True or False (whether a draw at the same key always "
                         f"gives the same token), got {getattr(sampler, 'repeatable', None)!r}")
    draws = (getattr(type(sampler), "draw", None), getattr(type(sampler), "draw_many", None))
    if draws in ((TorchSampler.draw, TorchSampler.draw_many), (KeyedSampler.draw, KeyedSampler.draw_many)):
        return sampler
    return CheckedSampler(sampler)


class CheckedSampler:
    """A plug-in sampler whose draws are checked before a search uses them: from `draw`, one column per row of the
    probabilities; from `draw_many`, per row a pool of 1 to `count` token ids; each an integer index into the row.
    Each error names the sampler and what was expected. Unchecked, an empty pool made the tree engine compute its
    position again for fresh draws, forever, and a column past the row failed deep in the search."""

    def __init__(self, sampler):
        self.sampler, self.name, self.repeatable = sampler, type(sampler).__name__, sampler.repeatable

    def for_prompt(self, index: int):
        """The sampler's own for_prompt(index), checked; itself where the sampler serves every prompt."""
        for_prompt = getattr(self.sampler, "for_prompt", None)
        return self if for_prompt is None else check_sampler(for_prompt(index))

    def draw(self, probs: torch.Tensor, keys: Sequence[int]) -> List[int]:
        columns = self._indices(self.sampler.draw(probs, keys), probs.shape[-1], f"{self.name}.draw's columns")
        if len(columns) != probs.shape[0]:
            raise ValueError(f"sampler: {self.name}.draw returned {len(columns)} columns for {probs.shape[0]} rows: "
                             "expected one per row")
        return columns

    def draw_many(self, probs: torch.Tensor, keys: Sequence[int], count: int) -> List[List[int]]:
        pools = self.sampler.draw_many(probs, keys, count)
        try:
            pools = list(pools)
        except TypeError:
            raise ValueError(f"sampler: {self.name}.draw_many returned {type(pools).__name__}: expected one list of "
                             "token ids per row") from None
        if len(pools) != probs.shape[0]:
            raise ValueError(f"sampler: {self.name}.draw_many returned {len(pools)} pools for {probs.shape[0]} rows: "
                             "expected one per row")
        checked = []
        for row, pool in enumerate(pools):
            pool = self._indices(pool, probs.shape[-1], f"{self.name}.draw_many's pool of row {row}")
            if not 1 <= len(pool) <= count:
                raise ValueError(f"sampler: {self.name}.draw_many returned {len(pool)} draws for row {row}: expected "
                                 f"1 to {count}")
            checked.append(pool)
        return checked

    @staticmethod
    def _indices(values, size: int, what: str) -> List[int]:
        """`values` as a list of ints in [0, size); else a ValueError naming `what`."""
        try:
            indices = [operator.index(v) for v in values]
        except TypeError:
            raise ValueError(f"sampler: {what}: expected integers, got {values!r}") from None
        for index in indices:
            if not 0 <= index < size:
                raise ValueError(f"sampler: {what}: {index} is not in [0, {size})")
        return indices


def make_sampler(kind: str, seed: int):
    """'torch' (default, production) or 'keyed' (batch-invariant, for equivalence checks)."""
    if kind == "torch":
        return TorchSampler(seed)
    if kind == "keyed":
        return KeyedSampler(seed)
    raise ValueError(f"sampler must be 'torch' or 'keyed', got {kind!r}")
