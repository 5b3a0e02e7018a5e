"""The three streams of an unlearning step, drawn as a pure function of (seed, batch index).

Batch j of a stream takes positions [j*B, (j+1)*B) of an endless sequence of seeded epoch permutations;
the mismatch answers of the forget row at position p come from a generator seeded by (seed, p). Nothing
depends on hidden state, so a resumed run only needs the step counter to draw exactly the batches it would
have drawn. Under several processes, process r of R takes batch index j*R + r: every process sees different
rows, and a step's rows, mismatch answers included, depend only on its global batch (R processes of batch B
draw what one process of batch R*B draws, or one accumulating R micro-batches of B).
"""
from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from fastalign.data_files import DataError
from fastalign.model_vocabulary import check_embedded
from fastalign.ops.checks import check_count, is_integer
from fastalign.unlearn.batching import TokenBatch, collate
from fastalign.unlearn.encoding import EncodedExample, PoolAnswer

_FORGET_STREAM, _NORMAL_STREAM, _MISMATCH_STREAM = 1, 2, 3


@dataclass
class UnlearningBatch:
    """One padded batch whose rows are forget, then mismatch, then normal examples.

    normal_index[i] is the index (into the normal set) of normal row i, for the cached reference;
    examples are the rows before padding (their `source` says where each came from).
    """

    tokens: TokenBatch
    num_forget: int
    num_mismatch: int
    num_normal: int
    normal_index: torch.Tensor
    examples: tuple[EncodedExample, ...]

    def to(self, device) -> "UnlearningBatch":
        return dataclasses.replace(self, tokens=self.tokens.to(device))


class _EpochStream:
    """Indices 0..n-1 in a fresh seeded permutation each epoch, read batch by batch.

    The permutation of the epoch last read is kept: drawing one costs O(n), and consecutive batches read the same
    epoch (drawing it for every row made each step's host work grow with the data set). It is kept with its epoch
    in one attribute, stored at once, so that threads reading batches together never see one without the other.
    """

    def __init__(self, n: int, batch_size: int, seed: int, stream: int):
        self.n, self.batch_size, self.seed, self.stream = n, batch_size, seed, stream
        self._kept = (None, None)   # (epoch, its permutation)

    def batch(self, j: int) -> list[int]:
        out = []
        for position in range(j * self.batch_size, (j + 1) * self.batch_size):
            epoch, offset = divmod(position, self.n)
            out.append(int(self._permutation(epoch)[offset]))
        return out

    def _permutation(self, epoch: int) -> np.ndarray:
        kept = self._kept
        if epoch != kept[0]:
            kept = epoch, np.random.default_rng([self.seed, self.stream, epoch]).permutation(self.n)
            self._kept = kept
        return kept[1]


def mismatch_fit(forget: Sequence[EncodedExample], pool: Sequence[PoolAnswer], max_length: int) -> list[bool]:
    """For each forget example, whether every one of its mismatch rows keeps an answer token within max_length:
    after its prompt comes the template's whitespace that stands apart before some pool answers (their `lead`).
    A DataError names the first forget example that some pool answer cannot follow on token ids
    (EncodedExample.seam_with)."""
    kinds = {(a.seams, a.lead) for a in pool}
    return [all(cut + lead - start < max_length for (cut, start), lead in ((e.seam_with(seams), lead)
                                                                            for seams, lead in kinds))
            for e in forget]


def _longest_pool_answers(pool: Sequence[PoolAnswer]) -> dict[tuple, int]:
    """The most ids of a pool answer of each kind (seams, whether the forget example's tail follows it: end None)."""
    longest = {}
    for a in pool:
        kind = (a.seams, a.end is None)
        longest[kind] = max(longest.get(kind, 0), len(a.ids))
    return longest


def _longest_mismatch_row(example: EncodedExample, longest: dict[tuple, int]) -> int:
    """Tokens of the longest mismatch row of `example` before max_length cuts it (EncodedExample.with_answer), from
    the pool's _longest_pool_answers (read once for every forget example: the pool is as large as a data set)."""
    tail = len(example.input_ids) - example.answer_end
    return max(cut - start + length + (tail if forget_tail else 0)
               for (seams, forget_tail), length in longest.items() for cut, start in [example.seam_with(seams)])


class UnlearningStreams:
    """Draws UnlearningBatches from encoded forget/normal examples and a pool of normal answers (encode_answers;
    plain answer ids are taken as answers without lead tokens, put right after the prompt's own tokens: the
    template's whitespace before the answer is not put in, so give PoolAnswer(ids, lead=k), its k whitespace tokens
    first, to keep it).

    Each batch holds batch_size forget rows, mismatch_per_prompt mismatch rows per forget row (the forget
    example's ids with a pool answer's in place of its answer, EncodedExample.with_answer: the template's
    rendering of that prompt with that answer, truncated to max_length) and normal_batch_size normal
    rows. A prompt's K mismatch answers are K different pool answers (as the reference's random.sample
    draws them), repeats coming only from a pool smaller than K. A stream is left out when it has no data
    (normal=None, mismatch_pool=None or mismatch_per_prompt=0).
    skipped: how many examples of each stream were dropped while loading (recorded with the run).
    """

    def __init__(self, forget: Sequence[EncodedExample], *, normal: Sequence[EncodedExample] | None = None,
                 mismatch_pool: Sequence[PoolAnswer | Sequence[int]] | None = None, batch_size: int = 2,
                 mismatch_per_prompt: int = 5, normal_batch_size: int | None = None, max_length: int = 2048,
                 filler_id: int = 0, seed: int = 0, skipped: dict[str, int] | None = None):
        if not forget:
            raise ValueError("UnlearningStreams: the forget set is empty")
        counts = {"batch_size": (batch_size, 1), "mismatch_per_prompt": (mismatch_per_prompt, 0),
                  "max_length": (max_length, 1), "seed": (seed, 0)}
        if normal_batch_size is not None:
            counts["normal_batch_size"] = (normal_batch_size, 0)   # (0: no normal rows; -1 was taken as 0, silently)
        for name, (value, least) in counts.items():
            check_count(name, value, least, "UnlearningStreams: ")
        # a NumPy integer becomes a plain int, as run.json and a checkpoint's weights-only load need (filler_id is
        # checked against the vocabulary by check_vocabulary)
        batch_size, mismatch_per_prompt, max_length, seed, filler_id = map(
            int, (batch_size, mismatch_per_prompt, max_length, seed, filler_id))
        normal_batch_size = None if normal_batch_size is None else int(normal_batch_size)
        pool = [a if isinstance(a, PoolAnswer) else PoolAnswer(tuple(a)) for a in (mismatch_pool or [])]
        pool = [a for a in pool if a.answer_ids]
        self.forget, self.normal, self.pool = list(forget), list(normal or []), pool
        self.mismatch_per_prompt = mismatch_per_prompt if pool else 0
        fit = mismatch_fit(self.forget, pool, max_length) if self.mismatch_per_prompt else []
        unfit = [e for e, ok in zip(self.forget, fit) if not ok]
        if unfit:
            raise DataError(f"{unfit[0].source}: its prompt takes {unfit[0].prompt_end} tokens and the template's "
                            f"whitespace before some mismatch answers {max(a.lead for a in pool)} more, which leaves "
                            f"no answer token within max_length={max_length}; raise max_length or skip such prompts "
                            "(skip_long_prompts)")
        self.normal_batch_size = (batch_size if normal_batch_size is None else normal_batch_size) if self.normal else 0
        self.max_length, self.filler_id, self.seed = max_length, filler_id, seed
        self.skipped = dict(skipped or {})
        self._forget_stream = _EpochStream(len(self.forget), batch_size, seed, _FORGET_STREAM)
        self._normal_stream = (_EpochStream(len(self.normal), self.normal_batch_size, seed, _NORMAL_STREAM)
                               if self.normal_batch_size else None)

    @property
    def answers_cut(self) -> dict[str, int]:
        """How many forget and normal examples max_length cut inside their answer (recorded with the run)."""
        return {"forget": sum(e.answer_cut for e in self.forget), "normal": sum(e.answer_cut for e in self.normal)}

    def digest(self) -> str:
        """A digest of the token ids the streams draw from (forget, normal, pool, padding), not of where they were
        read: a resumed run compares it with its checkpoint's, so that data edited in place under the same path,
        or a relative path read from another directory, is refused instead of trained on for the rest of the run."""
        h = hashlib.sha256(repr(self.filler_id).encode())
        for name, rows in (("forget", self.forget), ("normal", self.normal)):
            h.update(name.encode())
            for e in rows:
                h.update(repr((e.input_ids, e.answer_start, e.answer_end, e.seams)).encode())
        h.update(b"pool")
        for a in self.pool:
            h.update(repr((a.ids, a.lead, a.end, a.seams)).encode())
        return h.hexdigest()

    def draw_settings(self) -> dict[str, int]:
        """What, beside the data (digest), decides the batches drawn: a resumed run compares them with its
        checkpoint's, so that streams built with another seed, batch size or K are refused, not trained on."""
        return {"batch_size": self._forget_stream.batch_size, "normal_batch_size": self.normal_batch_size,
                "mismatch_per_prompt": self.mismatch_per_prompt, "max_length": self.max_length, "seed": self.seed}

    def check_context(self, positions: int | None) -> None:
        """Raises a DataError naming the longest row a batch can hold (a forget or normal example, or a forget
        prompt around the longest pool answer, cut to max_length) if it has more than `positions` tokens: a
        model with learned positions would fail deep inside its forward at the first such batch."""
        if positions is None:
            return
        rows = [(len(e.input_ids), e.source) for e in self.forget + self.normal]
        if self.mismatch_per_prompt:
            longest = _longest_pool_answers(self.pool)
            rows += [(min(self.max_length, _longest_mismatch_row(e, longest)),
                      f"{e.source} with the longest mismatch pool answer") for e in self.forget]
        length, source = max(rows)
        if length > positions:
            raise DataError(f"{source}: {length} tokens, more than the model's context (max_position_embeddings="
                            f"{positions}); set max_length (--max-length) to at most {positions}")

    def check_vocabulary(self, vocab_size: int | None, head_rows: int | None = None) -> None:
        """Raises a DataError naming the first example (or the padding id) holding a token id the model has no
        input embedding for: a tokenizer that does not match the model (a token added to it without resizing
        the model's embeddings) failed deep inside the forward with an IndexError. With `head_rows`, the rows of
        the lm_head, also the first forget example or pool answer whose answer (the loss's targets) holds an id
        the lm_head has no row for (fewer rows than the input embeddings: Mllama's text model), which failed
        mid-run, at the first batch holding it, with a ValueError naming no example. None: not known, not checked."""
        if vocab_size is not None:
            if not 0 <= self.filler_id < vocab_size:
                raise DataError(f"the padding token id {self.filler_id} is past the model's {vocab_size} input "
                                "embeddings: the tokenizer does not match the model (a token added without resizing "
                                "the embeddings?)")
            pool = [(a.ids, f"mismatch pool answer {i}") for i, a in enumerate(self.pool)]
            for ids, source in [(e.input_ids, e.source) for e in self.forget + self.normal] + pool:
                check_embedded(ids, vocab_size, source, DataError)
        if head_rows is not None:
            targets = [(e.input_ids[max(e.answer_start, 1):e.answer_end], e.source) for e in self.forget]
            for ids, source in targets + [(a.answer_ids, f"mismatch pool answer {i}") for i, a in enumerate(self.pool)]:
                if ids and max(ids) >= head_rows:
                    raise DataError(f"{source}: answer token id {max(ids)} is past the model's {head_rows} lm_head "
                                    "rows: the loss cannot take it as a target (a token the model reads but never "
                                    "predicts?)")

    def batch(self, index: int, *, rank: int = 0, world_size: int = 1) -> UnlearningBatch:
        """The batch of global draw `index` for process `rank` of `world_size`."""
        if not (is_integer(index) and index >= 0 and is_integer(world_size) and world_size >= 1 and is_integer(rank)
                and 0 <= rank < world_size):   # (rank 3 of 2 drew rank 1's rows of the next draw)
            raise ValueError(f"UnlearningStreams.batch needs an index >= 0 and a rank in [0, world_size), got index "
                             f"{index!r}, rank {rank!r}, world_size {world_size!r}")
        j = index * world_size + rank
        forget = [self.forget[i] for i in self._forget_stream.batch(j)]
        mismatch = []
        if self.mismatch_per_prompt:
            repeats = self.mismatch_per_prompt > len(self.pool)
            first = j * self._forget_stream.batch_size
            picks = [np.random.default_rng([self.seed, _MISMATCH_STREAM, first + i]).choice(
                len(self.pool), size=self.mismatch_per_prompt, replace=repeats) for i in range(len(forget))]
            for example, row in zip(forget, picks):
                for p in row:
                    mixed = example.with_answer(self.pool[int(p)], f"{example.source} + pool answer {int(p)}")
                    mismatch.append(mixed.truncated(self.max_length))
        normal_index = self._normal_stream.batch(j) if self._normal_stream else []
        normal = [self.normal[i] for i in normal_index]
        rows = forget + mismatch + normal
        return UnlearningBatch(collate(rows, self.filler_id), len(forget), len(mismatch), len(normal),
                               torch.tensor(normal_index, dtype=torch.long), tuple(rows))
