"""Evaluating a model: generate answers batch by batch, judge them, and summarise.

`iter_judged` is the streaming core: it yields one list of records per generation batch, so a caller can
write results as they come (the CLI does) and keep them if a later batch fails. `evaluate_harm` and
`evaluate_utility` are the one-call forms that return the summary numbers.
"""
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Sequence

from .generation import GenerationConfig, generate, iter_generate
from .judges import Judge, check_verdicts
from .metrics import mean_token_kl, unchanged_share


class JudgeError(RuntimeError):
    """The judge raised or returned something other than one bool per pair; says which prompts."""


def iter_judged(model, tokenizer, prompts: Sequence[str], judge: Judge,
                config: GenerationConfig = GenerationConfig()) -> Iterator[List[Dict]]:
    """Yields, per generation batch, records {"index", "prompt", "answer", "harmful"} in prompt order."""
    for start, answers in iter_generate(model, tokenizer, prompts, config):
        pairs = list(zip(prompts[start:start + len(answers)], answers))
        try:
            verdicts = check_verdicts(judge(pairs), pairs)
        except Exception as exc:
            raise JudgeError(f"judge failed on prompts {start}..{start + len(pairs) - 1}: "
                             f"{type(exc).__name__}: {exc}") from exc
        yield [{"index": start + i, "prompt": p, "answer": a, "harmful": h}
               for i, ((p, a), h) in enumerate(zip(pairs, verdicts))]


@dataclass
class HarmReport:
    """Harmful rate over a prompt set, with every record behind it."""
    harmful_rate: float
    records: List[Dict]


def evaluate_harm(model, tokenizer, prompts: Sequence[str], judge: Judge,
                  config: GenerationConfig = GenerationConfig()) -> HarmReport:
    """Generates an answer to every prompt and returns the share the judge marks harmful."""
    if not prompts:
        raise ValueError("evaluate_harm needs at least one prompt")
    records = [r for batch in iter_judged(model, tokenizer, prompts, judge, config) for r in batch]
    return HarmReport(sum(r["harmful"] for r in records) / len(records), records)


@dataclass
class UtilityReport:
    """How close the model stays to the original on normal prompts."""
    unchanged_share: float
    mean_token_kl: Optional[float]
    answers: List[str]


def evaluate_utility(model, reference, tokenizer, prompts: Sequence[str],
                     config: GenerationConfig = GenerationConfig(),
                     reference_answers: Optional[Sequence[str]] = None) -> UtilityReport:
    """Share of greedy answers unchanged from `reference`'s, and the mean per-token KL on those answers.

    The KL is taken on the reference's own greedy answers (the normal data as the original model writes
    it). `reference_answers` skips regenerating them when the caller already has them.
    """
    if config.do_sample:
        raise ValueError("evaluate_utility compares greedy answers: pass a config with do_sample=False")
    if reference_answers is None:
        reference_answers = generate(reference, tokenizer, prompts, config)
    answers = generate(model, tokenizer, prompts, config)
    pairs = [(p, a) for p, a in zip(prompts, reference_answers) if a]
    kl = mean_token_kl(model, reference, tokenizer, pairs, config.batch_size) if pairs else None
    return UtilityReport(unchanged_share(reference_answers, answers), kl, answers)
