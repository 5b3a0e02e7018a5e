"""Evaluating a model: generate answers batch by batch, judge them, and summarise.

`iter_judged` is the streaming core: it yields one list of records per generation batch, so a caller can
write results as they come (the CLI does) and keep them if a later batch fails. `evaluate_harm` and
`evaluate_utility` are the one-call forms that return the summary numbers. Answers written beforehand (a
`fastalign rain` output: RAIN's answer and the vanilla one per prompt) are judged the same way by
`iter_judged_answers` and `evaluate_answers`, with no model at all.
"""
import os
import warnings
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional, Sequence, Union

from fastalign.ops.checks import check_count
from fastalign.rain.records import rank_files
from fastalign.runtime.hf_cache_argument import refuse_prompt_adapter_over_a_cache

from .answers import read_answers
from .generation import Generation, GenerationConfig, generate, generations, iter_generate
from .judges import Judge, Pair, check_verdicts
from .metrics import check_same_vocabulary, mean_token_kl, mean_token_kl_of_ids, unchanged_share

ANSWER_SIDES = ("rain", "vanilla")   # the answers of a `fastalign rain` record, each judged


class JudgeError(RuntimeError):
    """The judge raised or returned something other than one bool per pair; says which prompts."""


def iter_judged(model, tokenizer, prompts: Sequence[str], judge: Judge,
                config: GenerationConfig = GenerationConfig()) -> Iterator[List[Dict]]:
    """Yields, per generation batch, records {"index", "prompt", "answer", "harmful"} in prompt order."""
    for start, answers in iter_generate(model, tokenizer, prompts, config):
        pairs = list(zip(prompts[start:start + len(answers)], answers))
        verdicts = judge_batch(judge, pairs, f"prompts {start}..{start + len(pairs) - 1}")
        yield [{"index": start + i, "prompt": p, "answer": a, "harmful": h}
               for i, ((p, a), h) in enumerate(zip(pairs, verdicts))]


def judge_batch(judge: Judge, pairs: List[Pair], where: str) -> List[bool]:
    """The judge's checked verdicts on one batch of pairs; a JudgeError naming `where` if it fails."""
    try:
        return check_verdicts(judge(pairs), pairs)
    except Exception as exc:
        raise JudgeError(f"judge failed on {where}: {type(exc).__name__}: {exc}") from exc


def iter_judged_answers(records: Sequence[Dict], judge: Judge, batch_size: int = 16) -> Iterator[List[Dict]]:
    """Yields, per batch of `batch_size` records {"index", "prompt", "rain", "vanilla"} (as `read_answers`
    returns them), the records with "harmful_rain" and "harmful_vanilla" added; each answer is judged with
    its record's prompt as written, both sides of a batch in one judge call. A null vanilla answer is not
    judged: its verdict is null."""
    check_count("batch_size", batch_size, 1)   # (True was taken for 1, a NumPy integer refused)
    for start in range(0, len(records), batch_size):
        batch = records[start:start + batch_size]
        pairs = [(r["prompt"], r[side]) for side in ANSWER_SIDES for r in batch if r[side] is not None]
        verdicts = iter(judge_batch(judge, pairs, f"prompts {batch[0]['index']}..{batch[-1]['index']}"))
        judged = {side: [next(verdicts) if r[side] is not None else None for r in batch] for side in ANSWER_SIDES}
        yield [dict(r, **{f"harmful_{side}": judged[side][i] for side in ANSWER_SIDES})
               for i, r in enumerate(batch)]


def answer_rates(records: Sequence[Dict]) -> Dict[str, Optional[float]]:
    """Harmful rate per side ("rain", "vanilla") over the judged records that have that side's answer;
    None for a side with no answer."""
    rates = {}
    for side in ANSWER_SIDES:
        verdicts = [r[f"harmful_{side}"] for r in records if r[f"harmful_{side}"] is not None]
        rates[side] = sum(verdicts) / len(verdicts) if verdicts else None
    return rates


@dataclass
class AnswersReport:
    """Harmful rates of RAIN's and the vanilla answers (None where no vanilla answer was written), the
    judged records, how many records were skipped because their prompt failed, and what was not judged:
    rank files of an unfinished torchrun run (`unmerged`) and a last line a kill cut short (`torn_line`)."""
    harmful_rate: Dict[str, Optional[float]]
    records: List[Dict]
    skipped_errors: int
    unmerged: List[str] = field(default_factory=list)
    torn_line: Optional[int] = None


def unjudged_warnings(path: str, torn_line: Optional[int], unmerged: Sequence[str]) -> List[str]:
    """What a judged `fastalign rain` output leaves out, in words (one warning each)."""
    out = []
    if torn_line:
        out.append(f"{path}: line {torn_line} left out: not JSON and without its newline, a record a kill cut short")
    if unmerged:
        out.append(f"{', '.join(unmerged)} hold records not merged into {path} (a torchrun run that did not "
                   "finish; resume it to merge them): they are not judged")
    return out


def evaluate_answers(path: Union[str, os.PathLike], judge: Judge, batch_size: int = 16) -> AnswersReport:
    """Judges the answers of a `fastalign rain` output file (see `answers.read_answers`), no model needed;
    warns (and the report says) when records were left unjudged: rank files not merged, a torn last line."""
    path = os.fspath(path)
    answers = read_answers(path)
    unmerged = rank_files(path)
    for message in unjudged_warnings(path, answers.torn_line, unmerged):
        warnings.warn(message, stacklevel=2)
    records = [r for batch in iter_judged_answers(answers.records, judge, batch_size) for r in batch]
    return AnswersReport(answer_rates(records), records, answers.skipped_errors, unmerged, answers.torn_line)


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
                     reference_answers: Optional[Sequence[Union[str, Generation]]] = None) -> UtilityReport:
    """Share of greedy answers unchanged from `reference`'s, and the mean per-token KL on those answers.

    The KL is taken on the reference's own greedy answers (the normal data as the original model writes
    it), on the exact token ids it generated: the prompt as generation read it, the answer through the token
    that ended it (`Generation`). `reference_answers` skips regenerating them when the caller already has
    them: Generations of these prompts (`generations`) are scored the same way; texts are tokenized again
    (`mean_token_kl`: not always the ids generated, no end token), and empty ones left out of the KL.
    """
    if config.do_sample:
        raise ValueError("evaluate_utility compares greedy answers: pass a config with do_sample=False")
    check_same_vocabulary(model, reference)   # before any answer is generated
    refuse_prompt_adapter_over_a_cache(model, "generation")   # before the reference's answers are generated
    if reference_answers is None:
        reference_answers = generations(reference, tokenizer, prompts, config)
    answers = generate(model, tokenizer, prompts, config)
    if all(isinstance(a, Generation) for a in reference_answers):
        sequences = [(g.prompt_ids, g.answer_ids) for g in reference_answers]
        kl = mean_token_kl_of_ids(model, reference, sequences, config.batch_size) if sequences else None
        reference_answers = [g.text for g in reference_answers]
    elif all(isinstance(a, str) for a in reference_answers):
        pairs = [(p, a) for p, a in zip(prompts, reference_answers) if a]
        kl = mean_token_kl(model, reference, tokenizer, pairs, config.batch_size) if pairs else None
    else:
        raise ValueError("reference_answers must be all texts or all Generations, got "
                         f"{sorted({type(a).__name__ for a in reference_answers})}")
    return UtilityReport(unchanged_share(reference_answers, answers), kl, answers)
