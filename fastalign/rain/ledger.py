"""Counts what goes through the model, and which fed tokens had been computed before.

Every fed token is named by the identity of its whole prefix (a rolling hash of the token ids from the
start of its sequence); a token whose name was seen before is a recomputed prefix token. Engines call
`feed` for every row they run, with the prefix key of the row's parent, and `recompute` for the tokens
that a runtime with a small pool computes again, unseen by the rows, to bring back evicted KV.

The keys a run has met (RunKeys: fed here, required in minimum.py) are kept only while some prompt can meet them
again; kept for every prompt, they held every prefix a run ever fed (~120 bytes a key, some 300 keys per answer
token at the default search constants): gigabytes over thousands of prompts. A prompt's bases are the sequences
all of its own start from, its root (generation prefix + prompt) and the judge's few-shot prefix + its head; every
sequence it feeds or reads is a prefix of one of its bases or extends one. So a sequence past its bases can be met
by another prompt only when a base of one is a prefix of a base of the other (a prompt given twice, or extending
another): a prompt with no such partner is kept apart, and once it is done the keys only it met are dropped, which
changes no count.
"""
import time
from collections import Counter
from contextlib import contextmanager
from typing import Iterable, List, Optional, Sequence, Tuple

from .stats import RainStats

EMPTY_KEY = 0


def prefix_keys(key: int, tokens: Iterable[int]):
    for t in tokens:
        key = hash((key, int(t)))
        yield key


class RunKeys(set):
    """A set of prefix keys. `meet` notes the keys that a prompt kept apart meets first past every base's
    prefixes, and `forget` drops them once that prompt is done. Takes the keys to start with, as a set does: copy
    and pickle rebuild a set subclass by calling it with its items."""

    def __init__(self, keys: Iterable[int] = ()):
        super().__init__(keys)
        self._bases = frozenset()   # keys of every prefix of every prompt's bases
        self._apart = {}            # id(stats) of a prompt kept apart -> the keys only it met

    def keep_apart(self, stats_list: Sequence[object], base_keys: frozenset):
        """From now on, notes the keys outside `base_keys` that the prompts counted in `stats_list` meet first."""
        self._bases = base_keys
        self._apart = {id(stats): [] for stats in stats_list}

    def meet(self, stats, key: int) -> bool:
        """Adds `key`, met by the prompt counted in `stats` (None: the run's shared prefixes); True when new."""
        return self.meet_all(stats, (key,)) == 1

    def meet_all(self, stats, keys: Iterable[int]) -> int:
        """`meet` of each of `keys` in turn, in one loop (it runs for every token fed); returns how many were new."""
        own = self._apart.get(id(stats))
        new = 0
        for key in keys:
            if key in self:
                continue
            self.add(key)
            new += 1
            if own is not None and key not in self._bases:
                own.append(key)
        return new

    def forget(self, stats):
        """Drops the keys that only the prompt counted in `stats` met (it is done)."""
        self.difference_update(self._apart.pop(id(stats), ()))


def kept_apart(contexts: Sequence[object], judge_prefix_ids: Sequence[int]) -> Tuple[List[object], frozenset]:
    """(the stats of the contexts (PromptContext) whose bases no other context's base is a prefix of or extends,
    the keys of every prefix of every base)."""
    judge_keys = list(prefix_keys(EMPTY_KEY, judge_prefix_ids))
    judge_key = judge_keys[-1] if judge_keys else EMPTY_KEY

    def passes(ctx):   # the keys of every prefix of the context's bases
        return set(prefix_keys(EMPTY_KEY, ctx.root_ids)).union(judge_keys, prefix_keys(judge_key, ctx.head_ids))

    through, ends = Counter(), Counter()   # key -> contexts one of whose bases passes through / ends there
    for ctx in contexts:
        through.update(passes(ctx))
        ends.update({ctx.gen_key, ctx.head_key})
    apart = []
    for ctx in contexts:
        own = {ctx.gen_key, ctx.head_key}
        if all(through[end] == 1 for end in own) and not any(ends[k] > (k in own) for k in passes(ctx)):
            apart.append(ctx.stats)
    return apart, frozenset(through)


class TokenLedger:
    def __init__(self):
        self.fed_keys = RunKeys()
        self.run = RainStats()          # run-wide counters (shared prefixes, all calls)

    def feed(self, stats: Optional[RainStats], parent_key: int, tokens: Sequence[int]) -> int:
        """Records one row: `tokens` appended to the sequence named `parent_key`. Returns the new key."""
        keys = list(prefix_keys(parent_key, tokens))
        recomputed = len(keys) - self.fed_keys.meet_all(stats, keys)
        for s in (stats, self.run):
            if s is not None:
                s.rows += 1
                s.tokens += len(tokens)
                s.recomputed_tokens += recomputed
        return keys[-1] if keys else parent_key

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
