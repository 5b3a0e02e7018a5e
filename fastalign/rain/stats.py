"""What a RAIN run cost, per prompt and in total: tokens through the model against the tree's minimum.

`minimum` counts what the algorithm itself needs computed, each distinct prefix once over the run
(minimum.py): the prompt; the tree (the states of expanded and rolled-out nodes, and every candidate
prefix that a draw reads); the rollouts (all but the last sampled token, which is only decoded); the judge
(every scored judge input: conversation and both option blocks); and the shared few-shot / generation
prefixes. A prefix needed twice (a rollout that later becomes a child, the text both option blocks share,
a beginning two prompts share) counts once, under the part that needed it first.
`recomputed_tokens` counts fed tokens whose exact prefix had been fed before, and the prefix tokens the
runtime computed again because a small KV pool had evicted them (both are in `tokens` too).

`required_calls` is the search's own bound on the model calls one prompt needs one after another, with
unlimited batching and rows of any shape: in each engine run, a drawn token needs the distribution before
it, so every position on a draw's path that was not computed before costs one call after the previous
one (the leaf's own state, then each rollout position; each step of an expansion that reaches a new
candidate prefix), and a self-evaluation needs one more call once its reply is complete; leaves evaluated
together run in parallel; a prompt's runs follow one another. A prompt's `model_calls` (the calls it took
part in) over its `required_calls` says how far an engine is from that bound.

`seconds` is time by phase ("expand", "simulate", "evaluate", "embed"): a prompt's, its share of each model call's
time (split over the call's rows). A run's adds "host", the wall time no phase took (the search's own work, and
waits); a prompt has no such time of its own: prompts searched together overlap, so its wall time less its phases
counts the others' calls too.
"""
import math
from dataclasses import dataclass, field, asdict
from typing import Dict

PHASES = ("expand", "simulate", "evaluate", "embed")
MINIMUM_PARTS = ("prompt", "tree", "rollout", "judge", "shared_prefix")


@dataclass
class RainStats:
    committed_tokens: int = 0
    iterations: int = 0
    model_calls: int = 0
    required_calls: int = 0
    rows: int = 0
    tokens: int = 0
    recomputed_tokens: int = 0
    minimum: Dict[str, int] = field(default_factory=lambda: dict.fromkeys(MINIMUM_PARTS, 0))
    seconds: Dict[str, float] = field(default_factory=lambda: dict.fromkeys(PHASES, 0.0))
    wall_seconds: float = 0.0

    @property
    def minimum_tokens(self) -> int:
        return sum(self.minimum.values())

    @property
    def rows_per_call(self) -> float:
        return self.rows / self.model_calls if self.model_calls else 0.0

    @property
    def tokens_per_committed_token(self) -> float:
        return self.tokens / self.committed_tokens if self.committed_tokens else float("nan")

    @property
    def tokens_over_minimum(self) -> float:
        return self.tokens / self.minimum_tokens if self.minimum_tokens else float("nan")

    def add(self, other: "RainStats") -> "RainStats":
        """Adds the counters of `other` (calls and wall time excepted: those are not additive across
        prompts that shared calls); a run's "host" seconds too (other ranks' runs)."""
        for name in ("committed_tokens", "iterations", "rows", "tokens", "recomputed_tokens", "required_calls"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        for part, value in other.minimum.items():
            self.minimum[part] += value
        for phase, value in other.seconds.items():
            self.seconds[phase] = self.seconds.get(phase, 0.0) + value
        return self

    def as_dict(self) -> dict:
        """The counters and derived ratios for a JSON record; an undefined ratio (nothing committed or
        required) is None, since json.dumps would write NaN, which strict JSON readers (jq, JSON.parse) refuse."""
        out = asdict(self)
        ratios = dict(tokens_per_committed_token=self.tokens_per_committed_token,
                      tokens_over_minimum=self.tokens_over_minimum)
        out.update(minimum_tokens=self.minimum_tokens, rows_per_call=self.rows_per_call,
                   **{k: None if math.isnan(v) else v for k, v in ratios.items()})
        return out
