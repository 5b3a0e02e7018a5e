"""The tree's minimum: the distinct token prefixes that the search itself needs the model to compute.

The search, not the engine, names every token sequence whose outputs it reads: the prompt's root, each
node whose next-token distribution it reads (the state of every expanded or rolled-out leaf), every
candidate prefix that a draw reads, every rollout prefix that a draw reads (all but the last token), and
every judge input it scores (the few-shot prefix, the conversation, both option blocks). Computing a
sequence needs all of its prefixes, so the minimum is the number of distinct prefixes of those sequences
over the whole run: a prefix shared by two uses (the few-shot prefix, a rollout that later becomes a child,
the text the two option blocks share, the beginning two prompts share) counts once. Keys are the ledger's
prefix keys, so `keys` can be compared with what an engine fed.
"""
from typing import Iterable, Optional

from .ledger import RunKeys, prefix_keys
from .stats import RainStats


def chain_key(key: int, tokens: Iterable[int]) -> int:
    """The ledger key of the sequence named `key` extended by `tokens` (nothing is registered)."""
    for key in prefix_keys(key, tokens):
        pass
    return key


class RequiredPrefixes:
    """The run's set of required prefix keys; each registration counts its new keys into one part of a
    RainStats.minimum (the first prompt to need a shared prefix is charged for it)."""

    def __init__(self):
        self.keys = RunKeys()

    def add(self, stats: Optional[RainStats], part: str, key: int, tokens: Iterable[int]) -> int:
        """Registers every prefix of (sequence `key`) + `tokens` beyond `key` itself; returns the new key."""
        keys = list(prefix_keys(key, tokens))
        new = self.keys.meet_all(stats, keys)
        if stats is not None:
            stats.minimum[part] += new
        return keys[-1] if keys else key

    def new_positions(self, key: int, tokens: Iterable[int]):
        """For each token, whether the prefix ending there is not registered yet (nothing is registered)."""
        return [k not in self.keys for k in prefix_keys(key, tokens)]

    def add_key(self, stats: Optional[RainStats], part: str, key: int):
        """Registers one sequence whose shorter prefixes are registered already."""
        if self.keys.meet(stats, key) and stats is not None:
            stats.minimum[part] += 1
