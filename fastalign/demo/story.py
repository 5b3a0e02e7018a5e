"""The demo's story in one function: the shipped tiny model answers harmful questions; unlearning makes it
stop, also on harmful questions it never unlearned, while its normal answers stay; RAIN makes the unchanged
model refuse at inference time, judging its own answers; every phase timed.

Phases: load (model, tokenizer, world) -> evaluate before (greedy answers, exact world judge) -> unlearn
(fastalign's trainer, SPEC §1 objective, on the world's forget / normal / mismatch data) -> evaluate after
-> rain (SPEC §2 search on the original model, its self-evaluation in the world's `JUDGE_PROMPT` format).
Harmful rates are measured on the forgotten prompts and on the unseen ones; normal prompts are the world's
`normal_eval` split, which unlearning never sees (its normal stream is `normal_retain`).
"""
import tempfile
import time
import warnings
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional

from ..evaluation.generation import Generation, GenerationConfig, generations
from ..evaluation.metrics import mean_token_kl_of_ids, unchanged_share
from ..model_context import model_positions
from ..model_vocabulary import pad_id
from ..ops.checks import is_integer
from ..rain import RainConfig, rain_generate
from ..unlearn.config import UnlearnConfig
from ..unlearn.encoding import encode_answers, encode_pairs
from ..unlearn.extras import require_extras
from ..unlearn.records import QAPair
from ..unlearn.reference import ReferenceMode
from ..unlearn.streams import UnlearningStreams
from fastalign.prompt_templates import TextTemplate
from ..unlearn.trainer import UnlearningTrainer
from .model import ASSETS, load_model, load_world
from .world import JUDGE_PROMPT, QA, World, prompt_text


@dataclass
class DemoSettings:
    """The unlearning run of the demo, tuned for the tiny model: a learning rate far above SPEC's 2e-6 (which
    is for 7B models), 60 steps, and the normal term weighted 2 (SPEC: 1) over batches of 32 normal rows,
    which holds >= 92% of the held-out normal answers over unlearning seeds 0-3 (README gives each seed's share)."""
    steps: int = 60
    lr: float = 1e-3
    batch_size: int = 8
    mismatch_per_prompt: int = 2
    normal_batch_size: int = 32
    forget_weight: float = 0.5
    mismatch_weight: float = 1.0
    normal_weight: float = 2.0
    reference: ReferenceMode = "copy"
    seed: int = 0


@dataclass
class Scores:
    """What one evaluation measured, and the answers behind it."""
    harmful_rate_forgotten: float
    harmful_rate_unseen: float
    normal_accuracy: float
    answers: Dict[str, List[str]] = field(repr=False, default_factory=dict)


# The answer of a world question is at most ~40 tokens; 48 leaves room for any garbling.
GENERATION = GenerationConfig(max_new_tokens=48, batch_size=64)


def greedy_generations(model, tokenizer, prompts: List[str]) -> List[Generation]:
    return generations(model, tokenizer, prompts, GENERATION)


def greedy_answers(model, tokenizer, prompts: List[str]) -> List[str]:
    return [g.text for g in greedy_generations(model, tokenizer, prompts)]


def rain_answers(model, tokenizer, prompts: List[str], seed: int) -> List[str]:
    """RAIN's answers; the world's answers end at end-of-sequence or at a new `###` turn."""
    config = RainConfig(max_new_tokens=GENERATION.max_new_tokens, turn_marker="###", seed=seed)
    run = rain_generate(model, tokenizer, prompts, config, judge_prompt=JUDGE_PROMPT, embedding="hidden")
    failed = [r for r in run.results if r.error]
    if failed:
        raise RuntimeError(f"RAIN failed on prompt {failed[0].index}: {failed[0].error}")
    return [r.answer for r in run.results]


def evaluate(world: World, answer: Callable[[List[str]], List[str]]) -> Scores:
    """Answers (by `answer`, a function of a prompt list) to the forgotten, unseen and normal-eval
    questions, scored by the exact judge."""
    def ask(qas: List[QA]) -> List[str]:
        return answer([prompt_text(qa.question) for qa in qas])

    answers = {"forgotten": ask(world.harmful_forget), "unseen": ask(world.harmful_unseen),
               "normal": ask(world.normal_eval)}
    rate = lambda texts: sum(map(world.is_harmful, texts)) / len(texts)  # noqa: E731
    correct = sum(world.is_correct(qa.question, a) for qa, a in zip(world.normal_eval, answers["normal"]))
    return Scores(rate(answers["forgotten"]), rate(answers["unseen"]), correct / len(world.normal_eval), answers)


def unlearning_streams(tokenizer, world: World, settings: DemoSettings, max_length: int) -> UnlearningStreams:
    """Forget = the forgotten harmful pairs, normal = `normal_retain`, mismatch pool = all normal answers.

    Every answer ends with the end-of-sequence token (answer_eos), as in the model's training: otherwise
    nothing in the objective holds the probability of stopping after an answer, and unlearning lets normal
    answers run on past their end.
    """
    template = TextTemplate()

    def encode(qas: List[QA], name: str):
        pairs = [QAPair(qa.question, qa.answer, f"world.{name}[{i}]") for i, qa in enumerate(qas)]
        return encode_pairs(tokenizer, template, pairs, max_length, answer_eos=True)

    return UnlearningStreams(
        encode(world.harmful_forget, "harmful_forget"), normal=encode(world.normal_retain, "normal_retain"),
        mismatch_pool=encode_answers(tokenizer, template, world.normal_answers, answer_eos=True),
        batch_size=settings.batch_size, mismatch_per_prompt=settings.mismatch_per_prompt,
        normal_batch_size=settings.normal_batch_size, max_length=max_length,
        filler_id=pad_id(tokenizer), seed=settings.seed)


def unlearn_config(settings: DemoSettings, progress: bool, output_dir: str) -> UnlearnConfig:
    """The unlearning run of `settings`; ValueError naming the setting when one is out of range (e.g. steps 0)."""
    if not is_integer(settings.steps) or settings.steps < 1:   # UnlearnConfig names it max_steps, no demo option
        raise ValueError(f"steps must be an integer >= 1, got {settings.steps!r}")
    return UnlearnConfig(model="demo", output_dir=output_dir, lr=settings.lr, max_steps=settings.steps,
                         batch_size=settings.batch_size, mismatch_per_prompt=settings.mismatch_per_prompt,
                         normal_batch_size=settings.normal_batch_size, forget_weight=settings.forget_weight,
                         mismatch_weight=settings.mismatch_weight, normal_weight=settings.normal_weight,
                         reference=settings.reference, seed=settings.seed, progress=progress,
                         log_every=settings.steps, max_forget_nll=None)


def check_settings(settings: DemoSettings) -> None:
    """ValueError naming an unlearning setting out of range, MissingExtraError where what unlearning trains with is
    not installed: before the phases that precede unlearning (a traceback once the model had answered every prompt).
    Quiet: the run's own configuration says once what has no effect (mismatch_per_prompt 0 was said twice)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        require_extras(unlearn_config(settings, progress=False, output_dir="."))


def unlearn(model, tokenizer, world: World, settings: DemoSettings, progress: bool, output_dir: str):
    """Runs fastalign's unlearning trainer on the world's data; returns its RunSummary (model trained in place)."""
    config = unlearn_config(settings, progress, output_dir)
    streams = unlearning_streams(tokenizer, world, settings, model_positions(model))
    return UnlearningTrainer(model, streams, config, tokenizer=tokenizer).train()


@dataclass
class DemoResult:
    """Every number `fastalign demo` shows (and prints with --json)."""
    model_parameters: int
    world_seed: int
    prompts: Dict[str, int]
    before: Dict[str, float]
    after: Dict[str, float]
    rain: Optional[Dict[str, float]]
    normal_unchanged: float
    normal_mean_token_kl: float
    unlearning: Dict[str, object]
    seconds: Dict[str, float]
    settings: Dict[str, object]

    def to_dict(self) -> dict:
        return asdict(self)


def _numbers(scores: Scores) -> Dict[str, float]:
    return {"harmful_rate_forgotten": scores.harmful_rate_forgotten,
            "harmful_rate_unseen": scores.harmful_rate_unseen, "normal_accuracy": scores.normal_accuracy}


def run_demo(settings: DemoSettings = DemoSettings(), progress: bool = True,
             on_phase: Optional[Callable[[str, float], None]] = None, model_dir: Path = ASSETS,
             rain: bool = True) -> DemoResult:
    """The whole story on the model in `model_dir` (default: the shipped one), RAIN included unless
    `rain=False`; `on_phase(name, seconds)` is called as each phase ends. Settings are checked first
    (check_settings)."""
    check_settings(settings)
    seconds: Dict[str, float] = {}

    @contextmanager
    def phase(name: str):
        start = time.perf_counter()
        yield
        seconds[name] = round(time.perf_counter() - start, 2)
        if on_phase:
            on_phase(name, seconds[name])

    with phase("load"):
        model, tokenizer = load_model(model_dir)
        original, _ = load_model(model_dir)
        world = load_world(model_dir)
    original_generations: Dict[tuple, List[Generation]] = {}

    def original_answers(prompts: List[str]) -> List[str]:   # kept: the KL is taken on their token ids
        original_generations[tuple(prompts)] = greedy_generations(model, tokenizer, prompts)
        return [g.text for g in original_generations[tuple(prompts)]]

    with phase("evaluate_before"):
        before = evaluate(world, original_answers)
    with phase("unlearn"), tempfile.TemporaryDirectory(prefix="fastalign-demo-") as tmp:
        summary = unlearn(model, tokenizer, world, settings, progress, tmp)
    model.to(original.device).eval()  # the trainer may have moved it to an accelerator
    with phase("evaluate_after"):
        after = evaluate(world, lambda prompts: greedy_answers(model, tokenizer, prompts))
        # on the token ids of the original's greedy answers, their end token included
        normal = original_generations[tuple(prompt_text(qa.question) for qa in world.normal_eval)]
        kl = mean_token_kl_of_ids(model, original, [(g.prompt_ids, g.answer_ids) for g in normal])
    rain_scores = None
    if rain:
        with phase("rain"):
            rain_scores = _numbers(evaluate(world, lambda prompts: rain_answers(original, tokenizer, prompts,
                                                                                  settings.seed)))
    return DemoResult(
        model_parameters=sum(p.numel() for p in model.parameters()), world_seed=world.seed,
        prompts={"forgotten": len(world.harmful_forget), "unseen": len(world.harmful_unseen),
                 "normal": len(world.normal_eval)},
        before=_numbers(before), after=_numbers(after), rain=rain_scores,
        normal_unchanged=unchanged_share(before.answers["normal"], after.answers["normal"]),
        normal_mean_token_kl=kl,
        unlearning={"steps": summary.steps, "stop_reason": summary.stop_reason,
                    "last_forget_nll": summary.last.forget_nll if summary.last else None},
        seconds=seconds, settings=asdict(settings))
