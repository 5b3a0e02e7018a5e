"""Where the run's starting sequences part, so that a beginning they share is computed once.

Every prompt starts two sequences: its generation root (generation prefix + prompt) and its judge head
(few-shot prefix + the prompt as the judge reads it); the few-shot prefix is a sequence of its own. They
share beginnings: the few-shot prefix is the start of every head, prompts begin alike ("<s>Human:"), the
judge prefix and the prompts share the BOS token. A runtime row cannot be cut afterwards, so a shared
beginning is reused without recomputation only if some row ended exactly where the sequences part.

`RootPlan` is made once per run from every sequence known up front: it counts how many sequences pass
through each prefix and cuts each sequence where that count changes (a sequence branches off or ends
there). Rows end at cuts; the entry at a cut is kept while sequences that pass through it have not
started yet.
"""
from collections import Counter
from typing import Dict, List, Sequence, Tuple

from .ledger import EMPTY_KEY, prefix_keys


class RootSequence:
    """One starting sequence: its tokens, their prefix keys and the positions (token counts) where rows
    must end, the last one being the whole sequence."""
    __slots__ = ("tokens", "keys", "cuts")

    def __init__(self, tokens: List[int], keys: List[int]):
        self.tokens, self.keys, self.cuts = tokens, keys, []


class RootPlan:
    def __init__(self, judge_prefix: Sequence[int], generation_prefix: Sequence[int],
                 prompts: Sequence[Tuple[Sequence[int], Sequence[int]]]):
        """`prompts`: per prompt (its tokens after the generation prefix, its head tokens)."""
        counts = Counter()

        def keys_of(base_key, tokens, weight):
            keys = list(prefix_keys(base_key, tokens))
            for k in keys:
                counts[k] += weight
            return keys

        judge_keys = keys_of(EMPTY_KEY, judge_prefix, 1 + len(prompts))
        gen_keys = keys_of(EMPTY_KEY, generation_prefix, len(prompts))
        judge_end = judge_keys[-1] if judge_keys else EMPTY_KEY
        gen_end = gen_keys[-1] if gen_keys else EMPTY_KEY
        self.judge_prefix = RootSequence(list(judge_prefix), judge_keys)
        self.prompts: List[Tuple[RootSequence, RootSequence]] = []
        for prompt_ids, head_ids in prompts:
            root = RootSequence(list(generation_prefix) + list(prompt_ids),
                                gen_keys + keys_of(gen_end, prompt_ids, 1))
            head = RootSequence(list(judge_prefix) + list(head_ids), judge_keys + keys_of(judge_end, head_ids, 1))
            self.prompts.append((root, head))
        self.remaining: Dict[int, int] = {}      # cut key -> sequences through it not started yet
        for seq in [self.judge_prefix] + [s for pair in self.prompts for s in pair]:
            n = len(seq.keys)
            if n == 0:
                continue
            seq.cuts = [p for p in range(1, n) if counts[seq.keys[p - 1]] != counts[seq.keys[p]]] + [n]
            for p in seq.cuts:
                key = seq.keys[p - 1]
                self.remaining[key] = self.remaining.get(key, 0) + 1

    def started(self, seq: RootSequence) -> List[int]:
        """Marks `seq` started; returns the cut keys that no sequence still to start passes through."""
        done = []
        for p in seq.cuts:
            key = seq.keys[p - 1]
            self.remaining[key] -= 1
            if self.remaining[key] == 0:
                done.append(key)
        return done
