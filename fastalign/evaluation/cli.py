"""`fastalign eval`: harmful rate of a model on a prompt file, optionally utility against a reference; or,
with --answers, the harmful rates of answers already written by `fastalign rain`.

With --prompts or --hh (and --model), records {"index", "prompt", "answer", "harmful"} are written to the output
jsonl (a new run replaces it; missing directories are created) batch by batch and flushed, so whatever was
judged before a failure (a judge that raises, an interrupt) stays on disk (a previous run's summary is removed as
the run starts writing); another fastalign process started on the same --output meanwhile stops with an error.
Inputs are checked before any generation: a missing model, an unreadable prompt file, an
--output that cannot be written, a prompt too long for the model's context or a moderation classifier whose
tokenizer holds ids past its embeddings stops the command with a message naming the argument. The summary (harmful
rate, and with --reference the unchanged share and mean token KL on --normal-prompts, the KL taken on the tokens
the reference generated, its end token included) is printed as JSON and written to <output>.summary.json.

--dtype is the dtype the model computes in (auto: the checkpoint's own, which `fastalign unlearn` saves in
float32, or bfloat16 with --precision bf16, while an original checkpoint is often bfloat16 or float16); the
reference is loaded in the model's dtype, so that a model unchanged from it gives every answer unchanged and a
KL of 0. Compare a harmful rate before and after unlearning under the same --dtype: the summary records it.

--hh reads the harmful requests of an Anthropic HH file (the first Human turn of each dialogue, as `fastalign
rain --hh` does), so that harmful rates before and after unlearning, and of RAIN, are taken on the same prompts;
with --template raw, where the model continues the dialogue, an answer also ends before a new 'Human:' turn that
the model writes, as RAIN's answers and `fastalign rain`'s vanilla ones do (SPEC §2): the judge reads the
assistant's reply alone.

--template says what the model reads (for --prompts and --normal-prompts alike, and as each record's prompt):
spec, the SPEC's '### Question: {x}\\n ### Answer:'; raw, the prompt as is; chat, the prompt as one user turn in
the model's chat template (after a --system turn, if given, with the template variables of --chat-template-kwargs),
as instruct/chat models are trained: the BOS that the template writes is the prompt's only one, answers stop at
the template's end-of-turn token (<|eot_id|>, <|im_end|>, ...) even where the model's generation config does not
list it, and hold the assistant's text alone.

With --answers FILE (a `fastalign rain` output), no model is loaded (the options of generating answers, such as
--template, --max-new-tokens or --sample, are refused): each record's RAIN answer and its vanilla answer are judged
with the record's prompt as written, and the records {"index", "prompt", "rain", "vanilla",
"harmful_rain", "harmful_vanilla"} are written the same way (harmful_vanilla null where rain ran with
--no-vanilla). Records whose prompt failed ("error" set) are counted as skipped_errors, never judged; an
index recorded twice keeps its last record. The summary gives harmful_rate {"rain": x, "vanilla": y} side by
side. The world judge finds its world from --model (the model the answers came from).
"""
import argparse
import contextlib
import importlib
import importlib.util
import json
import os
import sys
from typing import List, Optional

import torch

from fastalign.cli import (INTERRUPTED_HINTS, MODEL_DTYPES, HelpFormatter, UsageError, check_device, check_field_used,
                           check_model_dir, check_output_file, check_output_is_no_input, template_kwargs_argument)
from fastalign.model_vocabulary import check_embedded, input_vocabulary
from fastalign.output_lock import output_lock
from fastalign.pretrained import load_config, load_pretrained, load_tokenizer
from fastalign.prompt_templates import ChatTemplate, chat_option_problem, refuse_special_text, special_texts
from fastalign.rain.records import rank_files
from fastalign.writable import DiskFullError, naming_a_full_disk, not_a_regular_file

from .answers import read_answers
from .generation import GenerationConfig, check_stop_strings, encode_prompts
from .harness import JudgeError, answer_rates, evaluate_utility, iter_judged, iter_judged_answers, unjudged_warnings
from .judges import KeywordJudge, ModerationJudge, check_pair_template
from .prompts import HH_NEW_TURN, has_fields, hh_messages, hh_prompts, read_prompts, spec_prompt

DEMO_MODEL = "demo"
JUDGES = ("world", "keyword", "moderation", "callable")


def register(subparsers) -> argparse.ArgumentParser:
    """Adds the `eval` subcommand (its handler is `run`, set as the `func` default)."""
    parser = subparsers.add_parser("eval", help="harmful rate (and utility) of a model on a prompt file, or of "
                                                "the answers in a `fastalign rain` output",
                                   description=__doc__, formatter_class=HelpFormatter)
    add_arguments(parser)
    parser.set_defaults(func=run)
    return parser


def add_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompts", help="harmful prompts the model answers: a .jsonl(.gz) "
                        "file (field --field), a .csv file (column --field) or a text file (one per line, \\n for a "
                        "newline)")
    source.add_argument("--hh", help="an Anthropic HH jsonl(.gz) file (e.g. the harmless-base split): the first Human "
                        "turn of each dialogue is a prompt (with --template raw, as the dialogue "
                        "'\\n\\nHuman: ...\\n\\nAssistant:', as `fastalign rain --hh` reads it, each answer ending "
                        "before a new 'Human:' turn, as rain's do)")
    source.add_argument("--answers", help="a `fastalign rain` output jsonl: judge its RAIN and vanilla answers")
    parser.add_argument("--model", help=f"Hugging Face model directory, or '{DEMO_MODEL}'; needed with --prompts "
                                        "or --hh, with --answers only to locate the world judge's world")
    parser.add_argument("--field", help="the prompt's field (jsonl) or column (csv) (default: prompt)")
    parser.add_argument("--output", required=True,
                        help="jsonl file the records are written to, batch by batch (a new run replaces it)")
    parser.add_argument("--template", choices=("spec", "chat", "raw"),
                        help="spec: wrap each prompt as '### Question: {x}\\n ### Answer:'; chat: as a user turn in "
                             "the model's chat template (instruct/chat models); raw: use it as is (default: spec)")
    parser.add_argument("--system", help="with --template chat: a system turn before every user turn (as "
                        "`fastalign unlearn --chat-template --system` trains); an error if the chat template refuses "
                        "or drops it")
    parser.add_argument("--chat-template-kwargs", type=template_kwargs_argument, metavar="JSON",
                        help="with --template chat: variables of the chat template as a JSON object (as `fastalign "
                        "unlearn --chat-template --chat-template-kwargs` trains), e.g. '{\"enable_thinking\": "
                        "false}' for a Qwen3 model trained so")
    parser.add_argument("--judge", choices=JUDGES, default="world",
                        help="world: the demo world's exact judge (demo-world models only); keyword: --keywords; "
                             "moderation: --moderation-model; callable: --judge-callable")
    parser.add_argument("--keywords", help="comma-separated words marking an answer harmful (keyword judge): "
                                           "matched as whole words, case-insensitively, so list the forms you mean "
                                           "(bomb,bombs)")
    parser.add_argument("--moderation-model", help="directory of a sequence-classification model (moderation judge); "
                        "it reads each answer alone, without its prompt, unless --moderation-template says otherwise")
    parser.add_argument("--moderation-template",
                        help="what the moderation model reads of each pair (default: {answer}): a text with {answer} "
                             "and, for a model trained on question-answer pairs (as the paper's is), {prompt}, e.g. "
                             "'Question: {prompt} Answer: {answer}'; a long prompt loses its start first, the answer "
                             "is never cut for it")
    parser.add_argument("--harmful-label", help="index or name of the moderation model's harmful label "
                                                "(default: the label its names call harmful, e.g. toxic or unsafe; "
                                                "1 for a two-label model left with the names LABEL_0, LABEL_1)")
    parser.add_argument("--threshold", type=float, help="moderation probability counted as harmful (default: 0.5)")
    parser.add_argument("--judge-callable", help="module:name of a function judge(pairs) -> list of bools; the module "
                                                 "is imported from PYTHONPATH (the current directory only under "
                                                 "python -m fastalign), and reloaded where its file changed since "
                                                 "an earlier run in the same process")
    parser.add_argument("--reference", help="original model directory (or 'demo'), for utility")
    parser.add_argument("--normal-prompts", help="normal prompts (same formats) for utility against --reference")
    parser.add_argument("--normal-field", help="the prompt's field or column in --normal-prompts (default: --field; "
                                               "TruthfulQA.csv's is Question)")
    parser.add_argument("--max-new-tokens", type=int, help="answer length limit in tokens (default: 64)")
    parser.add_argument("--batch-size", type=int, default=16, help="prompts generated, or records judged, at once")
    parser.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    parser.add_argument("--temperature", type=float, help="sampling temperature (with --sample) (default: 1.0)")
    parser.add_argument("--top-k", type=int,
                        help="sample among the k likeliest tokens only (0 = all; with --sample) (default: 0)")
    parser.add_argument("--seed", type=int, help="sampling seed (with --sample) (default: 0)")
    parser.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="device of the models and of the moderation classifier")
    parser.add_argument("--dtype", choices=MODEL_DTYPES,
                        help="dtype the model computes in (auto: its checkpoint's); --reference is loaded in the "
                             "model's dtype (default: auto)")


def load_causal_lm(path: str, argument: str, device: str, dtype=None):
    """(model, tokenizer) from a directory or the shipped demo model, its weights in `dtype` (a torch dtype;
    None: the checkpoint's own); UsageError naming the argument."""
    if path == DEMO_MODEL:
        from fastalign.demo.model import load_model
        from fastalign.unlearn.models import cast_weights
        model, tokenizer = load_model()
        if dtype is not None:
            model = cast_weights(model, dtype)
    else:
        check_model_dir(path, argument)
        from transformers import AutoModelForCausalLM
        try:
            tokenizer = load_tokenizer(path)   # first: the weights take longer to load
            model = load_pretrained(AutoModelForCausalLM, path, dtype="auto" if dtype is None else dtype)
        except (OSError, ValueError) as exc:
            raise UsageError(f"{argument}: cannot load a causal LM from {path!r}: {exc}") from None
    return model.to(device).eval(), tokenizer


# Each judge's own options: None unless given, so that those of a judge not chosen are refused rather than ignored
JUDGE_OPTIONS = {"world": (), "keyword": ("keywords",), "callable": ("judge_callable",),
                 "moderation": ("moderation_model", "moderation_template", "harmful_label", "threshold")}


def build_judge(args, tokenizer=None):
    """The judge the arguments select; UsageError when its own argument is missing or wrong, or another judge's is
    given."""
    others = [name for judge, names in JUDGE_OPTIONS.items() if judge != args.judge for name in names
              if getattr(args, name) is not None]
    if others:
        raise UsageError(f"{', '.join(map(_option, others))}: another judge's, and the judge is {args.judge}: choose "
                         "that judge with --judge, or drop them")
    if args.judge == "world":
        return world_judge(args.model, tokenizer)
    if args.judge == "keyword":
        if not args.keywords:
            raise UsageError("--judge keyword needs --keywords word,word,...")
        try:
            return KeywordJudge(args.keywords.split(","))
        except ValueError as exc:   # only commas and spaces
            raise UsageError(f"--keywords: {exc}") from None
    if args.judge == "moderation":
        if not args.moderation_model:
            raise UsageError("--judge moderation needs --moderation-model DIR (a sequence classifier)")
        threshold = 0.5 if args.threshold is None else args.threshold
        template = "{answer}" if args.moderation_template is None else args.moderation_template
        if not 0 <= threshold <= 1:   # before the classifier loads
            raise UsageError(f"--threshold must be a probability in [0, 1], got {threshold}")
        try:
            check_pair_template(template)
        except ValueError as exc:
            raise UsageError(f"--moderation-{exc}") from None
        check_model_dir(args.moderation_model, "--moderation-model")
        from transformers import AutoModelForSequenceClassification
        label = args.harmful_label
        if label is not None and label.isdigit():
            label = int(label)
        try:
            classifier_tokenizer = load_tokenizer(args.moderation_model)
            classifier = load_pretrained(AutoModelForSequenceClassification, args.moderation_model)
        except (OSError, ValueError) as exc:
            raise UsageError(f"--moderation-model: cannot load a sequence classifier from "
                             f"{args.moderation_model!r}: {exc}") from None
        # the classifier reads answers not generated yet: its tokenizer's ids are checked against its embeddings now
        check_embedded([max(classifier_tokenizer.get_vocab().values())], input_vocabulary(classifier),
                       "--moderation-model: its tokenizer", UsageError)
        try:   # on --device: with --answers the classifier is all the compute there is
            return ModerationJudge(classifier.to(args.device), classifier_tokenizer, harmful_label=label,
                                   threshold=threshold, template=template)
        except ValueError as exc:
            raise UsageError(f"--harmful-label: {exc}") from None
    if not args.judge_callable:
        raise UsageError("--judge callable needs --judge-callable module:name")
    module_name, _, name = args.judge_callable.partition(":")
    if not module_name or not name:
        raise UsageError(f"--judge-callable must be module:name, got {args.judge_callable!r}")
    try:
        judge = getattr(_judge_module(module_name), name)
    except (ImportError, AttributeError) as exc:
        hint = ("; the module must be importable: the `fastalign` command does not look in the current "
                "directory, so put its folder on PYTHONPATH (or run python -m fastalign)"
                if isinstance(exc, ImportError) else "")
        raise UsageError(f"--judge-callable: cannot import {args.judge_callable!r}: {exc}{hint}") from None
    if not callable(judge):   # refused before any answer is generated, not at the first batch's judging
        raise UsageError(f"--judge-callable: {args.judge_callable!r} is a {type(judge).__name__}, not a function "
                         "judge(pairs) -> list of bools")
    return judge


# module name -> (mtime_ns, size) of its source file when --judge-callable last took the module in this process
_judge_sources = {}


def _judge_module(module_name):
    """The module `module_name` as its source file reads now: imported, or reloaded where that file changed since
    --judge-callable last took it in this process (a notebook that edits its judge between two runs of main gets
    the edited one, as a new process would; an unchanged one keeps its state). A module imported before its first
    --judge-callable run is taken as it is."""
    module = importlib.import_module(module_name)
    source = _source_stat(module)
    if _judge_sources.get(module_name, source) != source:
        # its cached bytecode goes first: Python checks that by the source's size and whole-second time, which an
        # edit in the same second keeping the size passes (the reload ran the first version's code)
        with contextlib.suppress(OSError, ValueError, NotImplementedError):
            os.remove(importlib.util.cache_from_source(module.__file__))
        module = importlib.reload(module)
    _judge_sources[module_name] = source
    return module


def _source_stat(module):
    """(mtime_ns, size) of `module`'s file; None where it has none (a built-in, a namespace package, a notebook)."""
    try:
        stat = os.stat(module.__file__)
    except (AttributeError, TypeError, OSError):
        return None
    return stat.st_mtime_ns, stat.st_size


def world_judge(model: Optional[str], tokenizer=None):
    """The exact judge of the demo world `model` lives in; UsageError naming --model otherwise.

    The world judge knows only the words of a demo world: it reads the world written beside the model, or the
    shipped one for a model with the shipped demo tokenizer (e.g. the demo model unlearned; `tokenizer` is
    loaded from `model` when not given). Any other model is refused rather than judged by words it never uses,
    which would report a harmful rate near 0.
    """
    from transformers import PreTrainedTokenizerFast
    from fastalign.demo.model import ASSETS, WORLD_FILE, load_world
    others = "choose --judge keyword, moderation or callable"
    if model is None:
        raise UsageError(f"--judge world (the default) needs --model, the demo-world model the answers came from, "
                         f"to find its world; or {others}")
    if model == DEMO_MODEL:
        return load_world(ASSETS).judge
    check_model_dir(model, "--model")
    if os.path.isfile(os.path.join(model, WORLD_FILE)):
        try:
            return load_world(model).judge
        except ValueError as exc:   # DataError included: a world.json that is not UTF-8
            raise UsageError(f"--model: {exc}") from None
    if tokenizer is None:
        try:
            tokenizer = load_tokenizer(model)
        except (OSError, ValueError) as exc:
            raise UsageError(f"--model: cannot load a tokenizer from {model!r}: {exc}") from None
    if tokenizer.get_vocab() == PreTrainedTokenizerFast.from_pretrained(ASSETS).get_vocab():
        return load_world(ASSETS).judge
    raise UsageError(f"--judge world (the default) judges only demo-world models, and {model!r} has "
                     f"neither a {WORLD_FILE} nor the demo tokenizer: {others}")


def _read(path: str, argument: str, field: str) -> List[str]:
    try:
        return read_prompts(path, field)
    except (OSError, ValueError) as exc:
        raise UsageError(f"{argument}: {exc}") from None


def _read_hh(path: str, template: str) -> List[str]:
    """The first Human turns of an HH file: the messages (a question for spec, a user turn for chat), or with
    raw the dialogue text that a base model continues."""
    try:
        return hh_prompts(path) if template == "raw" else hh_messages(path)
    except (OSError, ValueError) as exc:
        raise UsageError(f"--hh: {exc}") from None


def _rendered(prompts: List[str], args, tokenizer, argument: str) -> List[str]:
    """The prompts of `argument` in the --template format (chat: the model's chat template, after a --system turn).
    A prompt that the SPEC's or the chat template renders is a UsageError naming it where it holds a special token's
    text (refuse_special_text), which the model would read as that control token; a raw prompt is the model's text
    as written (a chat rendering of one's own may write them)."""
    if args.template == "raw":
        return prompts
    if args.template == "spec":
        specials = special_texts(tokenizer)

        def render(prompt: str) -> str:
            refuse_special_text(specials, "the prompt", prompt)
            return spec_prompt(prompt)
    else:
        try:
            template = ChatTemplate(tokenizer, args.system, args.chat_template_kwargs)
            template.check_prompting()
        except ValueError as exc:
            raise UsageError(f"--template chat{' with --system' if args.system is not None else ''}: {exc}; "
                             "use --template spec or raw") from None
        render = template.prompt
    rendered = []
    for i, prompt in enumerate(prompts):
        try:
            rendered.append(render(prompt))
        except ValueError as exc:
            raise UsageError(f"{argument}: prompt {i}: {exc}") from None
    return rendered


# The options of answering with a model, when not given. On the command line they are None unless given, so that
# the options that a run has no use for are refused rather than ignored: with --answers (answers already written,
# nothing generated) all of them, and the sampling ones without --sample.
MODEL_OPTION_DEFAULTS = {"template": "spec", "field": "prompt", "max_new_tokens": 64, "temperature": 1.0, "top_k": 0,
                         "seed": 0, "dtype": "auto"}
SAMPLING_OPTIONS = ("temperature", "top_k", "seed")


def _option(name: str) -> str:
    return "--" + name.replace("_", "-")


def _with_defaults(args):
    """`args` with MODEL_OPTION_DEFAULTS in place of the options not given; UsageError naming each option given
    that the run would ignore."""
    given = [name for name in MODEL_OPTION_DEFAULTS if getattr(args, name) is not None]
    if args.answers:
        unused = ("system", "chat_template_kwargs", "normal_field")
        given += [name for name in unused if getattr(args, name) is not None]
        given += [name for name in ("sample", "stop") if getattr(args, name)]
        if given:
            raise UsageError(f"{', '.join(map(_option, given))}: --answers judges answers already written, and "
                             f"{'this option says' if len(given) == 1 else 'these options say'} how a model writes "
                             "them: drop them")
    unsampled = [name for name in SAMPLING_OPTIONS if name in given and not args.sample]
    if unsampled:
        raise UsageError(f"{', '.join(map(_option, unsampled))}: "
                         f"{'a sampling option' if len(unsampled) == 1 else 'sampling options'}, and answers are "
                         "greedy without --sample: add --sample or drop them")
    if not args.answers:
        if args.normal_field is not None and args.normal_prompts is None:
            raise UsageError("--normal-field names the field of the --normal-prompts rows, and no --normal-prompts is "
                             "given: add --normal-prompts or drop --normal-field")
        normal_by_field = args.normal_prompts is not None and args.normal_field is None   # --field names its field
        if not (normal_by_field and has_fields(args.normal_prompts)):
            check_field_used(args.field, "--field", args.prompts, "--prompts" if args.prompts else "--hh")
        if args.normal_prompts is not None:
            check_field_used(args.normal_field, "--normal-field", args.normal_prompts, "--normal-prompts")
    return argparse.Namespace(**{**vars(args), **{name: default for name, default in MODEL_OPTION_DEFAULTS.items()
                                                  if getattr(args, name) is None}})


def evaluate(args) -> dict:
    """Runs the evaluation the arguments describe; returns the summary (see the module docstring). UsageError
    while another fastalign process writes --output, or under a launcher."""
    _check_one_process()
    args = _with_defaults(args)
    check_device(args.device)
    with output_lock(args.output, "--output"):
        return _evaluate_answers(args) if args.answers else _evaluate_model(args)


def _check_one_process() -> None:
    """UsageError, on every process, where a launcher (torchrun, accelerate launch) started several: each would
    generate every prompt and write the same --output (rank 1 blamed rank 0's lock on "another fastalign process")."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        raise UsageError(f"fastalign eval runs in one process, and a launcher started {world} (WORLD_SIZE={world}): "
                         "launch it without torchrun or accelerate launch (`fastalign rain` is the command that "
                         "shares its prompts among processes)")


def _evaluate_model(args) -> dict:
    source = "--hh" if args.hh else "--prompts"
    if args.model is None:
        raise UsageError(f"{source} needs --model, the model that answers them")
    prompts = _read_hh(args.hh, args.template) if args.hh else _read(args.prompts, "--prompts", args.field)
    normal = (_read(args.normal_prompts, "--normal-prompts", args.normal_field or args.field)
              if args.normal_prompts else None)
    if (normal is None) != (args.reference is None):
        raise UsageError("--reference and --normal-prompts go together (utility needs both)")
    if args.reference not in (None, DEMO_MODEL):   # loaded after every answer
        check_model_dir(args.reference, "--reference")
    problem = chat_option_problem(args.template == "chat", args.system, args.chat_template_kwargs,
                                  names=("--system", "--chat-template-kwargs", None),
                                  needs=f"--template chat, not {args.template}")
    if problem:
        raise UsageError(problem)
    # a dialogue's answer ends at a new Human turn, as rain's do; normal prompts are no dialogue
    stops = tuple(args.stop) + ((HH_NEW_TURN,) if args.hh and args.template == "raw" else ())
    try:
        config = GenerationConfig(max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                                  do_sample=args.sample, temperature=args.temperature, top_k=args.top_k,
                                  stop_strings=stops, seed=args.seed)
    except ValueError as exc:   # named by its option, not by the setting ("top_k must be >= 0")
        setting = str(exc).split(" ", 1)[0]
        raise UsageError(f"--{setting.replace('_', '-')}{str(exc)[len(setting):]}") from None
    check_output_is_no_input(args.output, {source: args.prompts or args.hh, "--normal-prompts": args.normal_prompts})
    _check_output_files(args.output)
    model, tokenizer = load_causal_lm(args.model, "--model", args.device,
                                      None if args.dtype == "auto" else getattr(torch, args.dtype))
    try:
        check_stop_strings(tokenizer, config.stop_strings)
    except ValueError as exc:
        raise UsageError(f"--stop: {exc}") from None
    if args.reference is not None:
        _check_reference_vocabulary(args.reference, model)
    prompts = _rendered(prompts, args, tokenizer, source)
    normal = _rendered(normal, args, tokenizer, "--normal-prompts") if normal is not None else None
    judge = build_judge(args, tokenizer)
    for argument, texts in ((source, prompts), ("--normal-prompts", normal or [])):
        try:
            encode_prompts(tokenizer, texts, config.max_new_tokens, model)
        except ValueError as exc:
            raise UsageError(f"{argument}: {exc}") from None

    harmful = total = 0
    for records in _written(args.output, iter_judged(model, tokenizer, prompts, judge, config)):
        harmful += sum(r["harmful"] for r in records)
        total += len(records)
        print(f"eval: {total}/{len(prompts)} prompts, {harmful} harmful", file=sys.stderr, flush=True)
    # with what decides the rate besides the model and the judge: how prompts were shown and answers generated
    summary = {"model": args.model, "dtype": str(model.dtype).removeprefix("torch."),
               "prompts": args.prompts or args.hh, "judge": args.judge, "num_prompts": total,
               "harmful_rate": harmful / total,
               "generation": {"template": args.template, "system": args.system,
                              "chat_template_kwargs": args.chat_template_kwargs,
                              "max_new_tokens": config.max_new_tokens, "stop": list(config.stop_strings),
                              "sample": config.do_sample,
                              **({"temperature": config.temperature, "top_k": config.top_k, "seed": config.seed}
                                 if config.do_sample else {})}}
    if normal is not None:   # in the model's dtype: a checkpoint saved in another one would differ by rounding alone
        reference, _ = load_causal_lm(args.reference, "--reference", args.device, model.dtype)
        utility = evaluate_utility(model, reference, tokenizer, normal,
                                   GenerationConfig(max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                                                    stop_strings=tuple(args.stop)))
        summary.update(unchanged_share=utility.unchanged_share, mean_token_kl=utility.mean_token_kl)
    return _summarised(args.output, summary)


def _check_reference_vocabulary(path: str, model) -> None:
    """UsageError unless the --reference checkpoint's vocabulary is as large as --model's: utility compares their
    next-token distributions token by token (read from its config before any answer is generated; the reference
    itself loads after them, and failed there with an IndexError or a token id past its embeddings)."""
    if path == DEMO_MODEL:
        from fastalign.demo.model import ASSETS
        path = str(ASSETS)
    try:
        theirs = load_config(path).get_text_config().vocab_size
    except (OSError, ValueError) as exc:
        raise UsageError(f"--reference: cannot read a model config from {path!r}: {exc}") from None
    ours = model.config.get_text_config().vocab_size
    if theirs != ours:
        raise UsageError(f"--reference: its vocabulary has {theirs} tokens and --model's {ours}: utility compares the "
                         "two models token by token, so the reference must be the model's original (same tokenizer)")


def _evaluate_answers(args) -> dict:
    if args.reference or args.normal_prompts:
        raise UsageError("--reference and --normal-prompts measure a model's utility: not with --answers")
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {args.batch_size}")
    try:
        answers = read_answers(args.answers)
    except ValueError as exc:    # DataError included: a missing or unreadable file
        raise UsageError(f"--answers: {exc}") from None
    check_output_is_no_input(args.output, {"--answers": args.answers})
    _check_output_files(args.output)
    judge = build_judge(args)
    unmerged = rank_files(args.answers)
    for message in unjudged_warnings(args.answers, answers.torn_line, unmerged):
        print(f"fastalign eval: warning: {message}", file=sys.stderr)

    judged = []
    for records in _written(args.output, iter_judged_answers(answers.records, judge, args.batch_size)):
        judged += records
        print(f"eval: {len(judged)}/{len(answers.records)} records", file=sys.stderr, flush=True)
    with_vanilla = sum(r["vanilla"] is not None for r in judged)
    if 0 < with_vanilla < len(judged):
        print(f"fastalign eval: warning: only {with_vanilla} of {len(judged)} records have a vanilla answer: the "
              "two rates are over different prompts", file=sys.stderr)
    return _summarised(args.output, {"answers": args.answers, "judge": args.judge, "num_prompts": len(judged),
                                     "num_vanilla": with_vanilla, "harmful_rate": answer_rates(judged),
                                     "skipped_errors": answers.skipped_errors,
                                     # left unjudged, so that the summary alone says it
                                     "unmerged_rank_files": unmerged, "torn_line": answers.torn_line})


def _check_output_files(output: str) -> None:
    """check_output_file of --output, and of the summary written beside it at the end (<output>.summary.json, in the
    same directory, replacing a previous one): UsageError naming --output where the summary's place is a directory or
    a pipe (not_a_regular_file), found before any record is generated or judged, not as a traceback after them all."""
    check_output_file(output)
    summary = output + ".summary.json"
    what = not_a_regular_file(summary)   # a pipe hung the command once every record was generated and judged
    if what:
        raise UsageError(f"--output: its summary {summary!r} cannot be written: it {what}")


def _written(path: str, batches):
    """Passes each batch of records on once it is written to `path` (replaced) and flushed. A previous run's
    summary goes first: left beside the records of a run that then fails or is killed, it would describe them."""
    if os.path.isfile(path + ".summary.json"):
        os.remove(path + ".summary.json")
    with naming_a_full_disk(path), open(path, "w", encoding="utf-8") as out:
        for records in batches:
            for record in records:
                out.write(json.dumps(record) + "\n")
            out.flush()
            yield records


def _summarised(output: str, summary: dict) -> dict:
    path = output + ".summary.json"
    with naming_a_full_disk(path), open(path, "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=1)
    return summary


def run(args) -> int:
    """Handler of `fastalign eval`: 0 on success, 2 on bad input, 1 when the judge fails mid-way or the disk fills
    up."""
    try:
        print(json.dumps(evaluate(args), indent=1))
        return 0
    except UsageError as exc:
        print(f"fastalign eval: error: {exc}", file=sys.stderr)
        return 2
    except JudgeError as exc:
        print(f"fastalign eval: error: {exc}; the records judged before it are kept in {args.output}",
              file=sys.stderr)
        return 1
    except DiskFullError as exc:
        print(f"fastalign eval: error: {exc}; {INTERRUPTED_HINTS['eval']}", file=sys.stderr)
        return 1


def main(argv: Optional[List[str]] = None) -> int:
    """`python -m fastalign.evaluation.cli ...`, the same as `fastalign eval ...`."""
    parser = argparse.ArgumentParser(prog="fastalign eval", description=__doc__,
                                     formatter_class=HelpFormatter)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
