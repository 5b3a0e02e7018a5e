"""Every constant of the RAIN search in one place, with the reference implementation's values as defaults.

See ../shared/SPEC.md §2 (numbers from Li et al. 2023 and their HH code). Names say what each constant
controls; `validate()` rejects values that would make the search meaningless instead of letting it hang.
"""
import math
from dataclasses import dataclass
from typing import Tuple

from fastalign.ops.checks import check_seed, is_finite_real, is_integer, is_real, real_as_float


@dataclass(frozen=True)
class RainConfig:
    """Search constants. Defaults reproduce the reference HH setting (SPEC §2).

    Selection: a child's score is q_norm + exploration * p * sqrt(n_parent) / (1 + n), with q_norm =
        (q - q_min) / (q_max - q_min + q_norm_eps) over the range of values the tree has seen, which starts as
        initial_q_range.
    Expansion: candidates token sets per expansion (the greedy one and candidates - 1 sample attempts; the top
        candidates tokens for 1-token sets), multi-token sets drawn from the sample_top_k likeliest tokens;
        token_set_lengths[d] tokens per set at depth d from the prompt (the last length repeats); at the root the
        priors are (1 - root_prior_mix) * p + root_prior_mix * uniform.
    Back-up: a sibling whose embedding's cosine similarity sim to the backed-up node's is at least
        similarity_threshold also takes the value, as similarity_weight * sim of a visit.
    Widening: a node with fewer than max_children children widens (the greedy set and widen_group - 1 sample
        attempts: with multi-token sets the greedy one is already a child, so one new set at most, as in the
        reference; SPEC's "two more sampled token sets") while the norm of its children's embedding variance is
        below widen_variance_per_token times the token-set length and their best q below widen_max_q;
        widen_lone_child also widens a node with one child, as a literal reading of the SPEC does (the reference
        never does: torch's unbiased variance of one embedding is NaN).
    Outer loop: commit the best child once the root has root_visits visits (its fresh count fn, inherited visits
        included: the visit count n also holds fractional visits shared by similar siblings) and
        min_new_visits new ones, or early, once the best child has more than early_stop_fresh_visits fresh visits
        and q above early_stop_q. The answer stops at max_length tokens (prompt and answer) or after
        max_new_tokens (0: no limit besides max_length).
    Simulation: a rollout before self-evaluation ends at any of rollout_stop_chars; a turn_marker (a new user
        turn) in the answer ends the answer.
    seed: of the samplers. parallel_leaves: inner iterations run at once (1: off, as the reference), each leaf
        adding virtual_loss visits of value -1 to its path until its own result is backed up; their model calls
        are merged.
    """
    exploration: float = 2.0
    q_norm_eps: float = 1e-5
    initial_q_range: Tuple[float, float] = (-1.0, 1.0)
    candidates: int = 10
    sample_top_k: int = 15
    token_set_lengths: Tuple[int, ...] = (1, 2, 4, 10)
    root_prior_mix: float = 0.25
    similarity_threshold: float = 0.95
    similarity_weight: float = 0.2
    max_children: int = 20
    widen_variance_per_token: float = 0.03
    widen_max_q: float = 0.0
    widen_group: int = 2
    widen_lone_child: bool = False
    root_visits: int = 50
    min_new_visits: int = 15
    early_stop_fresh_visits: int = 6
    early_stop_q: float = 0.8
    max_length: int = 2048
    max_new_tokens: int = 0
    rollout_stop_chars: str = ",.?:;\n"
    turn_marker: str = "Human:"
    seed: int = 0
    parallel_leaves: int = 1
    virtual_loss: float = 1.0

    def token_set_length(self, depth: int) -> int:
        """Length of the token sets that expand a node at `depth` (0 = the prompt's root)."""
        return self.token_set_lengths[min(depth, len(self.token_set_lengths) - 1)]

    def validate(self) -> "RainConfig":
        for name in ("initial_q_range", "token_set_lengths"):
            if not isinstance(getattr(self, name), (tuple, list)):
                raise ValueError(f"RainConfig: {name} must be a tuple, got {getattr(self, name)!r}")
        q_range = tuple(self.initial_q_range)
        counts = {name: getattr(self, name) for name in ("candidates", "sample_top_k", "max_children", "widen_group",
                                                         "root_visits", "min_new_visits", "early_stop_fresh_visits",
                                                         "max_length", "max_new_tokens", "parallel_leaves", "seed")}
        counts.update({f"token_set_lengths[{i}]": n for i, n in enumerate(self.token_set_lengths)})
        for name, value in counts.items():     # a float length never equals a count: sets ran past max_length
            if not is_integer(value):          # (and root_visits=inf never did: the search never committed)
                raise ValueError(f"RainConfig: {name} must be an integer, got {value!r}")
        reals = {name: getattr(self, name) for name in ("exploration", "q_norm_eps", "root_prior_mix",
                                                        "similarity_threshold", "similarity_weight",
                                                        "widen_variance_per_token", "widen_max_q", "early_stop_q",
                                                        "virtual_loss")}
        reals.update({f"initial_q_range[{i}]": x for i, x in enumerate(q_range)})
        # infinite values of these made selection ignore the values (every score infinite, or every q_norm 0),
        # a sibling's share of visits infinite, or crashed on a pending leaf; the other reals may be infinite
        # to switch a rule off (similarity_threshold=inf: no sharing; early_stop_q=inf: no early stop)
        finite = ("exploration", "q_norm_eps", "similarity_weight", "virtual_loss", "initial_q_range[0]",
                  "initial_q_range[1]")
        for name, value in reals.items():      # else the checks below raised a TypeError naming no setting
            if not is_real(value):
                raise ValueError(f"RainConfig: {name} must be a number, got {value!r}")
            if name in finite and not is_finite_real(value):
                raise ValueError(f"RainConfig: {name} must be finite, got {value!r}")
            if real_as_float(value) is None:   # an int too big for a float, on which math.isnan raised OverflowError
                raise ValueError(f"RainConfig: {name} must be a number a float can hold (of size below 1.8e308, "
                                 f"or .inf or -.inf), got {value!r}")
        low, high = q_range if len(q_range) == 2 else (math.nan, math.nan)
        if not isinstance(self.widen_lone_child, bool):     # a YAML 'no' in quotes is a true string
            raise ValueError(f"RainConfig: widen_lone_child must be true or false, got {self.widen_lone_child!r}")
        for name in ("rollout_stop_chars", "turn_marker"):   # else every prompt failed once the model ran
            if not isinstance(getattr(self, name), str):
                raise ValueError(f"RainConfig: {name} must be a text, got {getattr(self, name)!r}")
        checks = [
            (self.exploration >= 0, "exploration must be >= 0"),
            (low <= high, f"initial_q_range must be (low, high) with low <= high, got {self.initial_q_range!r}"),
            (self.q_norm_eps >= 0 and high - low + self.q_norm_eps > 0,
             "q_norm_eps must be >= 0, and > 0 when initial_q_range is a single value (q_norm divides by "
             "q_max - q_min + q_norm_eps)"),
            (self.candidates >= 1, "candidates must be >= 1"),
            (self.sample_top_k >= 1, "sample_top_k must be >= 1"),
            (len(self.token_set_lengths) >= 1 and all(n >= 1 for n in self.token_set_lengths),
             "token_set_lengths must be a non-empty tuple of lengths >= 1"),
            (0.0 <= self.root_prior_mix <= 1.0, "root_prior_mix must be in [0, 1]"),
            (self.similarity_weight >= 0, "similarity_weight must be >= 0 (a share of a visit)"),
            # NaN would pass silently: every sibling sharing, widening or early stopping never happening
            (not math.isnan(self.similarity_threshold), "similarity_threshold must be a number, got NaN"),
            # a negative threshold lets siblings of negative cosine share -0.2 * |sim| visits: n falls to 0 and below
            (self.similarity_threshold >= 0, "similarity_threshold must be >= 0 (a cosine similarity below 0 would "
                                             "share negative visits)"),
            (not math.isnan(self.widen_variance_per_token), "widen_variance_per_token must be a number, got NaN"),
            (not math.isnan(self.widen_max_q), "widen_max_q must be a number, got NaN"),
            (not math.isnan(self.early_stop_q), "early_stop_q must be a number, got NaN"),
            (self.max_children >= self.candidates, "max_children must be >= candidates"),
            (self.widen_group >= 1, "widen_group must be >= 1"),
            (self.root_visits >= 1 and self.min_new_visits >= 1, "root_visits and min_new_visits must be >= 1"),
            (self.max_length >= 2, "max_length must be >= 2"),
            (self.max_new_tokens >= 0, "max_new_tokens must be >= 0 (0 = no limit)"),
            (self.parallel_leaves >= 1, "parallel_leaves must be >= 1 (1 = one inner iteration at a time)"),
            (self.virtual_loss > 0, "virtual_loss must be > 0"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"RainConfig: {message}")
        check_seed("seed", self.seed, "RainConfig: ")
        return self
