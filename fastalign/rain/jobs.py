"""The work a search asks of an engine, and what comes back.

A search never touches the model: it yields lists of jobs and receives their results, so that one search
runs unchanged on the batch-1 reference engine and on the batched tree engine, and many searches can share
model calls.
"""
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Set, Tuple

import torch

from .embeddings import PathInfo
from .stats import RainStats


@dataclass
class PromptContext:
    """One prompt being searched: its ids, the judge's view of it and its counters."""
    index: int
    prompt_text: str                 # the dialogue as the judge reads it (no generation prefix)
    root_ids: List[int]              # generation prefix + prompt: the root's token state
    head_ids: List[int]              # the judge's tokens of `prompt_text`
    root_key: int                    # sampling key of the root state
    max_length: int                  # the answer stops at this many tokens (prompt included)
    gen_key: int = 0                 # ledger key of the root state (generation prefix + prompt)
    head_key: int = 0                # ledger key of the judge's few-shot prefix + head
    stats: RainStats = field(default_factory=RainStats)
    judge_cache: Dict[str, float] = field(default_factory=dict)
    judging: Set[str] = field(default_factory=set)      # replies being judged right now (an engine's)
    handle: object = None            # engine state (the prompt's cached prefixes)
    sampler: object = None           # what the prompt's draws come from: its own (sampling.prompt_sampler)

    @property
    def answer_start(self) -> int:
        return len(self.root_ids)

    def end_search(self) -> None:
        """Drops what only its search reads (the judge's values of its replies, its sampler): a finished prompt's
        context stays with the run to its end, whose memory then grew with every prompt searched."""
        self.judge_cache, self.judging, self.sampler = {}, set(), None


@dataclass
class Draft:
    """One drawn token set: its tokens, the sum of log top-k probabilities of its tokens, and the sum of
    the hidden states its logits came from (when the embedder needs them)."""
    tokens: Tuple[int, ...]
    logp: float
    hidden_sum: Optional[torch.Tensor] = None


@dataclass
class ExpandJob:
    """Draw candidate token sets below `node`. Length 1: report the top config.max_children next tokens. Longer: the
    greedy set (or reuse `greedy`) and `attempts` samples on streams first_stream, first_stream + 1, ..."""
    ctx: PromptContext
    node: object
    state: List[int]
    length: int
    attempts: int = 0
    first_stream: int = 1
    greedy: Optional[Draft] = None


@dataclass
class ExpandResult:
    greedy: Optional[Draft] = None
    samples: List[Draft] = field(default_factory=list)      # every attempt, duplicates included
    ranked_ids: List[int] = field(default_factory=list)     # length 1: top tokens, ascending id
    ranked_logits: List[float] = field(default_factory=list)
    hidden: Optional[torch.Tensor] = None                   # the node's last hidden state


@dataclass
class EvaluateJob:
    """Roll `node` out to the end of its sentence, then self-evaluate the conversation (cache first)."""
    ctx: PromptContext
    node: object
    state: List[int]
    terminal: bool


@dataclass
class Evaluation:
    value: float
    rollout: List[int]
    rollout_hidden_sum: Optional[torch.Tensor] = None
    judged: Optional[Tuple[str, List[int]]] = None      # (base, ids) of the judge input scored, None if cached


@dataclass
class EmbedJob:
    paths: List[PathInfo]
