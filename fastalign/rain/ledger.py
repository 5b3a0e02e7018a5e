"""Counts what goes through the model, and which fed tokens had been computed before.

Every fed token is named by the identity of its whole prefix (a rolling hash of the token ids from the
start of its sequence); a token whose name was seen before is a recomputed prefix token. Engines call
`feed` for every row they run, with the prefix key of the row's parent, and `recompute` for the tokens
that a runtime with a small pool computes again, unseen by the rows, to bring back evicted KV.
"""
import time
from contextlib import contextmanager
from typing import Iterable, Optional, Sequence

from .stats import RainStats

EMPTY_KEY = 0


def prefix_keys(key: int, tokens: Iterable[int]):
    for t in tokens:
        key = hash((key, int(t)))
        yield key


class TokenLedger:
    def __init__(self):
        self.fed_keys = set()
        self.run = RainStats()          # run-wide counters (shared prefixes, all calls)

    def feed(self, stats: Optional[RainStats], parent_key: int, tokens: Sequence[int]) -> int:
        """Records one row: `tokens` appended to the sequence named `parent_key`. Returns the new key."""
        key = parent_key
        recomputed = 0
        for key in prefix_keys(parent_key, tokens):
            if key in self.fed_keys:
                recomputed += 1
            else:
                self.fed_keys.add(key)
        for s in (stats, self.run):
            if s is not None:
                s.rows += 1
                s.tokens += len(tokens)
                s.recomputed_tokens += recomputed
        return key

    def recompute(self, stats: Optional[RainStats], tokens: int):
        """Records `tokens` that the runtime ran again inside a call because their KV had been evicted."""
        for s in (stats, self.run):
            if s is not None:
                s.tokens += tokens
                s.recomputed_tokens += tokens

    def call(self, stats_of_rows: Iterable[Optional[RainStats]]):
        """Records one model call and the prompts that took part in it."""
        self.run.model_calls += 1
        for s in {id(s): s for s in stats_of_rows if s is not None}.values():
            s.model_calls += 1

    @contextmanager
    def phase(self, stats_list: Sequence[RainStats], phase: str, share: Optional[Sequence[float]] = None):
        """Adds the elapsed time of the block to `phase` of each stats (split by `share` if given) and of
        the run."""
        start = time.perf_counter()
        try:
            yield
        finally:
            elapsed = time.perf_counter() - start
            self.run.seconds[phase] += elapsed
            shares = share if share is not None else [1.0 / max(len(stats_list), 1)] * len(stats_list)
            for s, w in zip(stats_list, shares):
                s.seconds[phase] += elapsed * w
