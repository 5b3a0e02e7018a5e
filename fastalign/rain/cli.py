"""`fastalign rain`: RAIN answers for a prompt file or the HH harmless-base split, with plain greedy
decoding alongside for comparison.

Each prompt's record {"index", "prompt", "rain", "vanilla", "error", "stats", "run"} ("run": the model and a
digest of the settings that decide the answers; "stats": the prompt's costs, its "seconds" its share of each model
call's time by phase, with no "host" time: prompts searched together overlap, and the summary printed at the end
holds the run's "host", the wall time no phase took) is appended to --output and
flushed as soon as that prompt finishes, so a killed run resumes where it stopped (prompts recorded without
an error are skipped). A prompt that fails gets its error in its record; the others go on, and a resumed run
searches it again and appends its new record: the file is append-only, and an index's last successful record wins
(else its last).
Another fastalign process started on the same --output while this one runs stops with a usage error.
Bad arguments (a missing file, a bad setting, a judge prompt the tokenizer cannot serve) are usage errors
(exit code 2) found before the model loads; a run in which a prompt failed exits with code 1.
Several GPUs: launch with torchrun (e.g. `torchrun --nproc_per_node 8 -m fastalign.cli rain ...`): each
rank joins the process group, searches every WORLD_SIZE-th prompt on cuda:LOCAL_RANK and writes
<output>.rank<RANK>; at the end rank 0 merges them into <output> and prints the combined summary.
"""
import argparse
import contextlib
import dataclasses
import hashlib
import json
import os
import sys
from typing import Callable, List, Optional, Set

import torch

from fastalign.cli import (INTERRUPTED_HINTS, MODEL_DTYPES, HelpFormatter, UsageError, check_device, check_field_used,
                           check_model_dir, check_output_file, check_output_is_no_input, memory_size_argument,
                           template_kwargs_argument)
from fastalign.config_files import dataclass_from_dict, read_config_file, settings_mapping
from fastalign.data_files import DataError, read_text
from fastalign.evaluation.generation import eos_ids
from fastalign.evaluation.prompts import hh_messages, hh_prompts, read_prompts
from fastalign.model_context import config_positions
from fastalign.model_files import model_files_digest
from fastalign.output_lock import output_lock
from fastalign.pretrained import load_config, load_pretrained, load_tokenizer
from fastalign.prompt_templates import ChatTemplate, chat_option_problem
from fastalign.writable import DiskFullError, naming_a_full_disk

from .config import RainConfig
from .judge import JudgePrompt
from .vanilla import greedy_answer


def register(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("rain", help="RAIN: the model searches, judges and rewinds its own answers",
                                   description=__doc__, formatter_class=HelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompts", help="a .jsonl(.gz) file (field --field), a .csv file (column --field) or a "
                                          "text file (one prompt per line, \\n for a newline)")
    source.add_argument("--hh", help="path of HH-RLHF harmless-base jsonl(.gz): its first Human turns are the prompts")
    parser.add_argument("--field", help="the prompt's field (jsonl) or column (csv) in --prompts (default: prompt)")
    parser.add_argument("--limit", type=int, default=0, help="only the first N prompts (0 = all)")
    parser.add_argument("--model", required=True, help="Hugging Face causal LM directory")
    parser.add_argument("--output", required=True, help="jsonl file the records are appended to (plain text, not .gz)")
    parser.add_argument("--engine", choices=("tree", "slow"), default="tree",
                        help="tree: the fast engine on the tree KV runtime; slow: the batch-1 reference engine")
    parser.add_argument("--embedding", choices=("minilm", "hidden"), default="minilm",
                        help="sibling-similarity embeddings: all-MiniLM-L6-v2 (the [rain] extra) or the model's own "
                             "hidden states")
    parser.add_argument("--sampler", choices=("torch", "keyed"), default="torch",
                        help="torch: seeded torch sampling, a generator per prompt (see --seed); keyed: draws that "
                             "depend only on (prefix, candidate), as the equivalence tests use")
    parser.add_argument("--config", help="a .yaml/.json file of search constants (RainConfig's fields, e.g. "
                                         "exploration, token_set_lengths, turn_marker) and, under 'judge', the judge "
                                         "prompt's (JudgePrompt's: template, labels, harmless, harmful, option_line, "
                                         "answer_prefix, dialogue, ...); options on the command line override it")
    parser.add_argument("--max-new-tokens", type=int,
                        help=f"answer length limit (0 = none besides max_length, {RainConfig.max_length} tokens in "
                             f"all, the reference's) (default: {CLI_MAX_NEW_TOKENS})")
    parser.add_argument("--root-visits", type=int, help="visits of the root, inherited ones included, before a "
                                                        f"commit (default: {RainConfig.root_visits})")
    parser.add_argument("--concurrency", type=int, default=8,
                        help="prompts searched at once, their model calls batched together")
    parser.add_argument("--parallel-leaves", type=int, help="inner iterations run at once under virtual loss (1 = "
                                                            "off, the reference's search) (default: 1)")
    parser.add_argument("--virtual-loss", type=float,
                        help=f"virtual visits (value -1) per pending leaf (default: {RainConfig.virtual_loss})")
    parser.add_argument("--kv-tokens", type=int, default=1 << 17, help="KV pool size of the tree engine, in tokens")
    parser.add_argument("--state-memory", type=memory_size_argument, metavar="SIZE",
                        help="room of the tree engine for the recurrent states that a hybrid or state-space model "
                             "(Qwen3.5, Qwen3-Next, Mamba 2, ...) keeps per span, e.g. 16G; where they fill it, "
                             "tokens run again, with the same answers (default: as many bytes as the KV pool)")
    parser.add_argument("--cuda-graphs", action="store_true",
                        help="the tree engine's calls of up to 512 tokens replayed from CUDA graphs (a Llama-family "
                             "model on a CUDA device; see TreeRunner's cuda_graphs)")
    parser.add_argument("--generation-prefix-file", help="text put before every prompt (e.g. few-shot chat turns)")
    parser.add_argument("--judge-template-file", help="judge prompt with {conversation} and {options}")
    parser.add_argument("--labels", help="the two answer option labels, comma-separated (default: A,B)")
    parser.add_argument("--template", choices=("raw", "chat"), default="raw",
                        help="raw: the model and the judge read each prompt as it is (--hh: '\\n\\nHuman: ..."
                             "\\n\\nAssistant:'); chat: each prompt (--hh: the first Human turn's text) is a user "
                             "message that the model reads in its chat template, after a --system turn, and the "
                             "judge reads as --judge-dialogue")
    parser.add_argument("--system", help="with --template chat: a system turn before every user message")
    parser.add_argument("--chat-template-kwargs", type=template_kwargs_argument, metavar="JSON",
                        help="with --template chat: variables of the chat template as a JSON object, for the "
                             "model's prompts and a judge prompt rendered in the chat template (--judge-chat-template) "
                             "alike, e.g. '{\"enable_thinking\": false}' for a Qwen3 model (as `fastalign unlearn "
                             "--chat-template --chat-template-kwargs` trains)")
    typed_dialogue = JudgePrompt.dialogue.replace("\n", "\\n")     # as a command line writes it
    parser.add_argument("--judge-dialogue",
                        help="with --template chat: how the judge's conversation shows a user message ({prompt}; "
                             f"\\n for a newline); the reply follows it (default: {typed_dialogue})")
    parser.add_argument("--judge-chat-template", "--chat-template", dest="chat_template",
                        action=_JudgeChatTemplateAction,
                        help="render the judge prompt itself with the chat template (default: off, or --config's "
                             "judge.use_chat_template). --chat-template is an old name of this option: unlike "
                             "`fastalign unlearn --chat-template`, it does not put the model's prompts in the chat "
                             "template (that is --template chat)")
    parser.add_argument("--no-vanilla", action="store_true", help="skip the greedy decoding baseline")
    parser.add_argument("--device", default=None, help="default: cuda:LOCAL_RANK where CUDA is present, else cpu")
    parser.add_argument("--dtype", choices=MODEL_DTYPES, default="auto",
                        help="the dtype the model computes in (auto: its checkpoint's, as `fastalign eval` takes it)")
    parser.add_argument("--seed", type=int, help="seed of the search's sampling: each prompt draws from a generator "
                        "seeded from it and the prompt's row in the file, so its answer does not depend on the other "
                        "prompts, --concurrency, a resume or the number of processes (default: 0)")
    parser.set_defaults(func=run)
    return parser


class _JudgeChatTemplateAction(argparse.BooleanOptionalAction):
    """--judge-chat-template; warns when given by its old name --chat-template, which reads like `fastalign unlearn
    --chat-template` (the model's prompts in the chat template) but renders only the judge prompt."""

    def __call__(self, parser, namespace, values, option_string=None):
        if option_string in ("--chat-template", "--no-chat-template"):
            new_name = option_string.replace("chat-template", "judge-chat-template")
            print(f"fastalign rain: warning: {option_string} is the old name of {new_name}: it renders the judge "
                  "prompt in the chat template, not the model's prompts; for those (as `fastalign unlearn "
                  "--chat-template` trains) use --template chat", file=sys.stderr)
        super().__call__(parser, namespace, values, option_string)


CLI_MAX_NEW_TOKENS = 256   # the command's cap on answers; RainConfig's own default is none (0)


def settings(args):
    """(RainConfig, JudgePrompt): their defaults (answers capped at CLI_MAX_NEW_TOKENS), then the --config
    file, then the options given on the command line; UsageError for an unknown or bad setting."""
    try:
        values = read_config_file(args.config) if args.config else {}
    except (OSError, ValueError) as exc:
        raise UsageError(f"--config: {exc}") from None
    try:
        judge_values = settings_mapping(values.pop("judge", {}), f"--config: {args.config}: judge")
    except ValueError as exc:
        raise UsageError(f"{exc} (the JudgePrompt settings)") from None
    flags = {"max_new_tokens": args.max_new_tokens, "root_visits": args.root_visits, "seed": args.seed,
             "parallel_leaves": args.parallel_leaves, "virtual_loss": args.virtual_loss}
    judge_flags = {"labels": args.labels.split(",") if args.labels is not None else None,
                   "dialogue": args.judge_dialogue.replace("\\n", "\n") if args.judge_dialogue is not None else None,
                   "use_chat_template": args.chat_template,
                   "template": option_text(args.judge_template_file, "--judge-template-file")
                   if args.judge_template_file else None}
    search = {"max_new_tokens": CLI_MAX_NEW_TOKENS, **values, **{k: v for k, v in flags.items() if v is not None}}
    judge = {**judge_values, **{k: v for k, v in judge_flags.items() if v is not None}}
    origin = args.config or "command line"
    try:
        return (dataclass_from_dict(RainConfig, _tuples(search), origin).validate(),
                dataclass_from_dict(JudgePrompt, _tuples(judge), f"{origin}: judge"))
    except ValueError as exc:   # (validate() checks every setting's type before its value)
        raise UsageError(str(exc)) from None


def _tuples(values: dict) -> dict:
    """A YAML/JSON list is a tuple setting (token_set_lengths, labels): the dataclasses are frozen and hashed."""
    return {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}


def option_text(path: Optional[str], argument: str) -> str:
    """The text of the file `argument` names ("" when not given; Windows line ends read as "\\n"); UsageError
    when it is missing or unreadable."""
    if path is None:
        return ""
    try:
        return read_text(path).replace("\r\n", "\n")
    except DataError as exc:
        raise UsageError(f"{argument}: {exc}") from None


def run(args) -> int:
    """Handler of `fastalign rain`: 0 on success, 2 on a usage error (another process writing --output too), 1 where
    prompts failed or the disk filled up."""
    try:
        with output_lock(args.output, "--output", ranks_share=True):   # before the resume reads --output
            return _run(args)
    except UsageError as exc:
        print(f"fastalign rain: error: {exc}", file=sys.stderr)
        return 2
    except DiskFullError as exc:
        print(f"fastalign rain: error: {exc}; {INTERRUPTED_HINTS['rain']}", file=sys.stderr)
        return 1


def _run(args) -> int:
    from fastalign._C import PoolExhaustedError

    from . import rain_generate
    from .distributed import gather, join_from_env, leave, merge_rank_files
    from .records import open_for_append

    source, source_arg = (args.hh, "--hh") if args.hh else (args.prompts, "--prompts")
    chat = _check_arguments(args, source, source_arg)
    prompts = _read_prompts(args, chat, source_arg)
    config, judge = settings(args)    # bad settings are usage errors found before the model loads
    tokenizer = _checked_tokenizer(args, judge, chat)
    embedder = _embedder(args.embedding)
    prefix = option_text(args.generation_prefix_file, "--generation-prefix-file")
    check_output_file(args.output)
    check_output_is_no_input(args.output, {source_arg: source})
    run_id = run_identity(args, config, judge, prefix)
    done = _done_indices(args.output, prompts, run_id)
    if args.limit:
        prompts = prompts[:args.limit]
    placement = join_from_env()
    try:
        model = _load_model(args, placement.local_rank)
        runner = _tree_runner(model, args) if args.engine == "tree" else None
        end_ids = eos_ids(model, tokenizer)   # once: each vanilla answer stops at them
        mine = placement.share(range(len(prompts)))   # skipped ones counted per share: other ranks write meanwhile
        todo = [i for i in mine if i not in done]
        failed: List[str] = []
        records = placement.output(args.output)   # --output, or this process's rank file
        with naming_a_full_disk(records), _progress(len(todo), placement.rank) as progress, \
                open_for_append(records) as out:
            vanilla = None if args.no_vanilla else (
                lambda prompt: greedy_answer(model, tokenizer, prompt, config.max_new_tokens, config.turn_marker,
                                             config.max_length, prefix, end_ids))
            write = _record_writer(out, prompts, run_id, vanilla, failed, progress)
            try:
                run_ = rain_generate(model, tokenizer, [prompts[i] for i in todo], config, engine=args.engine,
                                     judge_prompt=judge, embedding=embedder, sampler=args.sampler,
                                     generation_prefix=prefix, chat_template=chat, system=args.system,
                                     chat_template_kwargs=args.chat_template_kwargs,
                                     concurrency=args.concurrency, runner=runner, on_result=write,
                                     indices=todo)
            except PoolExhaustedError as exc:   # a prompt's own shortage stays in its record: this is the shared one
                raise UsageError(f"--kv-tokens {args.kv_tokens} is too small for the judge's few-shot prefix, which "
                                 f"every prompt shares: {exc}") from None
        summaries = gather(placement, (len(todo), len(mine) - len(todo), len(failed), run_.stats))
        with naming_a_full_disk(args.output):
            merge_rank_files(placement, args.output)
        if summaries is not None:
            print(json.dumps(_summary(summaries, placement.world_size), indent=1))
    finally:
        leave(placement)
    if failed:   # a script that runs `fastalign eval --answers` next must not take a failed run for a finished one
        hint = " (a KV pool too small for them: raise --kv-tokens)" if any("KV pool" in e for e in failed) else ""
        print(f"fastalign rain: {len(failed)} of {len(todo)} prompts failed{hint}; their records hold the error, and "
              f"rerunning the command retries them. First error: {failed[0]}", file=sys.stderr)
        return 1
    return 0


def _check_arguments(args, source: str, source_arg: str) -> bool:
    """Checks the options that need no file read (the prompts' file must exist): UsageError for a bad one. Returns
    whether the prompts are chat messages (--template chat)."""
    check_model_dir(args.model, "--model")
    if not os.path.isfile(source):
        raise UsageError(f"{source_arg}: no file at {source!r}")
    check_field_used(args.field, "--field", args.prompts, source_arg)
    chat = args.template == "chat"
    problem = chat_option_problem(chat, args.system, args.chat_template_kwargs, args.generation_prefix_file,
                                  names=("--system", "--chat-template-kwargs", "--generation-prefix-file"),
                                  needs=f"--template chat, not {args.template}")
    if problem:
        raise UsageError(problem)
    if args.judge_dialogue is not None and not chat:
        raise UsageError(f"--judge-dialogue shows a user message of --template chat: it needs --template chat, "
                         f"not {args.template} (the judge reads a raw prompt as it is)")
    if args.limit < 0:
        raise UsageError(f"--limit must be >= 0 (0 = all prompts), got {args.limit}")
    if args.concurrency < 1:
        raise UsageError(f"--concurrency must be >= 1, got {args.concurrency}")
    if args.kv_tokens < 1:
        raise UsageError(f"--kv-tokens must be >= 1, got {args.kv_tokens}")
    if args.state_memory is not None and args.engine != "tree":
        raise UsageError(f"--state-memory is the tree engine's room for recurrent states: it needs --engine tree, not "
                         f"{args.engine}")
    if args.cuda_graphs and args.engine != "tree":   # (the slow engine ran without them, silently)
        raise UsageError(f"--cuda-graphs replays the tree engine's calls: it needs --engine tree, not {args.engine}")
    if args.device is not None:
        check_device(args.device)
    device = _device(args, local_rank=0)
    if args.cuda_graphs and torch.device(device).type != "cuda":   # (TreeRunner refused it once the model had loaded)
        raise UsageError(f"--cuda-graphs: CUDA graphs run on a CUDA device; this run's is {device}"
                         f"{'' if args.device else ' (this machine has no CUDA device)'}: leave out --cuda-graphs")
    if args.output.endswith(".gz"):    # plain text under that name: `fastalign eval --answers` would gunzip it
        raise UsageError(f"--output: records are appended as plain text, so not to a .gz file: {args.output!r}")
    return chat


def _read_prompts(args, chat: bool, source_arg: str) -> List:
    """The prompts of --hh (chat messages with --template chat) or --prompts; UsageError for a malformed file."""
    try:
        if args.hh:
            return hh_messages(args.hh) if chat else hh_prompts(args.hh)
        return read_prompts(args.prompts, args.field or "prompt")
    except ValueError as exc:  # DataError included: malformed JSON, unreadable file
        raise UsageError(f"{source_arg}: {exc}") from None


def _embedder(name: str):
    """The sibling-similarity embedder --embedding names; UsageError where it cannot be made (else every prompt
    failed after its first iteration)."""
    from .embeddings import make_embedder

    try:
        return make_embedder(name)
    except (ValueError, ImportError) as exc:
        raise UsageError(str(exc)) from None


def _done_indices(path: str, prompts: List[str], run_id: dict) -> Set[int]:
    """records.done_indices, its ValueError (the records are of other prompts, model or settings) a UsageError."""
    from .records import done_indices

    try:
        return done_indices(path, prompts, run_id)
    except ValueError as exc:
        raise UsageError(f"--output: {exc}") from None


def _device(args, local_rank: int) -> str:
    """The device the model runs on: --device, by default cuda:LOCAL_RANK where CUDA is present, else cpu."""
    return args.device or (f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")


def _load_model(args, local_rank: int):
    """--model in --dtype, evaluating on _device."""
    from transformers import AutoModelForCausalLM

    device = _device(args, local_rank)
    try:
        dtype = args.dtype if args.dtype == "auto" else getattr(torch, args.dtype)
        model = load_pretrained(AutoModelForCausalLM, args.model, dtype=dtype)
    except (OSError, ValueError) as exc:   # e.g. no weights: a traceback, and exit code 1 (a failed prompt's)
        raise UsageError(f"--model: cannot load a causal LM from {args.model!r}: {exc}") from None
    return model.to(device).eval()


def _record_writer(out, prompts: List, run_id: dict, vanilla: Optional[Callable[[str], str]], failed: List[str],
                   progress: Callable):
    """rain_generate's on_result: appends a finished prompt's record to `out` and flushes it (a killed run resumes
    after it), with the greedy answer `vanilla(model_prompt)` (None: --no-vanilla) of a prompt searched without an
    error; a failing vanilla answer is the record's error (a CUDA out-of-memory must not stop every prompt's search).
    Each record's error is appended to `failed`."""
    def write(result):
        answer, error = None, result.error
        if vanilla is not None and error is None:
            try:
                answer = vanilla(result.model_prompt)
            except Exception as exc:
                error = f"vanilla answer: {type(exc).__name__}: {exc}"
        if error is not None:
            failed.append(error)
        out.write(json.dumps({"index": result.index, "prompt": prompts[result.index], "rain": result.answer,
                              "vanilla": answer, "error": error,
                              "stats": result.stats.as_dict(), "run": run_id}) + "\n")
        out.flush()
        progress(result)
    return write


def _summary(summaries, world_size: int) -> dict:
    """The run's summary printed at its end, from each rank's (searched, skipped as done, failed, RainStats): their
    sums, model calls summed and the wall time of the slowest rank."""
    from . import RainStats

    stats = RainStats()
    for *_, s in summaries:
        stats.add(s)
    stats.model_calls = sum(s.model_calls for *_, s in summaries)
    stats.wall_seconds = max(s.wall_seconds for *_, s in summaries)
    return {"prompts": sum(n for n, _, _, _ in summaries), "skipped_done": sum(k for _, k, _, _ in summaries),
            "errors": sum(e for _, _, e, _ in summaries), "processes": world_size, "stats": stats.as_dict()}


def _tree_runner(model, args):
    """The tree engine's TreeRunner, its KV pool of --kv-tokens, its states' room of --state-memory and --cuda-graphs
    (a UsageError for --state-memory where the model keeps no state or for less than one state, for --cuda-graphs
    where the model cannot run them, for --kv-tokens where the pool has more blocks than it holds or cannot be
    allocated)."""
    from fastalign.runtime import TreeRunner
    try:
        return TreeRunner(model, max_tokens=args.kv_tokens, max_state_bytes=args.state_memory,
                          cuda_graphs=args.cuda_graphs)
    except ValueError as exc:
        for argument, option in (("max_state_bytes: ", "--state-memory"), ("cuda_graphs: ", "--cuda-graphs"),
                                 ("max_tokens: ", "--kv-tokens")):
            if str(exc).startswith(argument):
                why = str(exc).removeprefix(argument).replace("pass cuda_graphs=False", "leave out --cuda-graphs")
                raise UsageError(f"{option}: {why}") from None
        raise
    except RuntimeError as exc:   # torch.OutOfMemoryError, or the CPU allocator's "can't allocate memory"
        if not isinstance(exc, torch.OutOfMemoryError) and "allocate" not in str(exc):
            raise
        raise UsageError(f"--kv-tokens {args.kv_tokens}: the KV pool does not fit on {args.device or 'the device'}: "
                         f"{str(exc).splitlines()[0]}") from None


def run_identity(args, config: RainConfig, judge: JudgePrompt, prefix: str) -> dict:
    """What decides a record's answers: the model (its path and a digest of its files), and a digest of the settings
    (search and judge constants, how prompts are rendered, dtype, sampler, embeddings, the engine: the two draw
    alike only from the keyed sampler). Written with every record, so that a resumed run never keeps records that
    other settings made as its own."""
    if config.parallel_leaves == 1:   # no leaf is ever pending then: virtual_loss decides nothing
        config = dataclasses.replace(config, virtual_loss=RainConfig.virtual_loss)
    settings = {"config": dataclasses.asdict(config), "judge": dataclasses.asdict(judge), "template": args.template,
                "system": args.system, "generation_prefix": prefix, "dtype": args.dtype, "sampler": args.sampler,
                "embedding": args.embedding}
    if args.chat_template_kwargs is not None:   # only then: the records of runs without it keep their identity
        settings["chat_template_kwargs"] = args.chat_template_kwargs
    if args.engine != "tree":   # likewise: the default engine's records keep the identity they were written with
        settings["engine"] = args.engine
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return {"model": os.path.abspath(args.model), "model_files": model_files_digest(args.model), "settings": digest}


def _checked_tokenizer(args, judge: JudgePrompt, chat: bool):
    """The model's tokenizer, once it serves the judge prompt and the chat template (with --template chat), and the
    judge prompt fits the model's context with room to answer (else every prompt failed): UsageError before anything
    loads."""
    from .generate import JUDGE_MARGIN
    from .judge import JudgeTokens

    try:
        tokenizer = load_tokenizer(args.model)
        context = config_positions(load_config(args.model))
    except (OSError, ValueError) as exc:
        raise UsageError(f"--model: cannot load a causal LM from {args.model!r}: {exc}") from None
    try:
        tokens = JudgeTokens(tokenizer, judge, args.chat_template_kwargs)
    except ValueError as exc:
        raise UsageError(f"judge prompt (--judge-template-file, --labels, --judge-dialogue, --judge-chat-template, "
                         f"--config): {exc}") from None
    if chat:
        try:
            ChatTemplate(tokenizer, args.system, args.chat_template_kwargs).check_prompting()
        except ValueError as exc:
            raise UsageError(f"--template chat{' with --system' if args.system is not None else ''}: {exc}") from None
    fixed = len(tokens.prefix_ids) + max(map(len, tokens.suffix_ids)) + JUDGE_MARGIN
    if context and fixed + 2 > context:
        raise UsageError(f"judge prompt: its {fixed - JUDGE_MARGIN} tokens (with {JUDGE_MARGIN} of slack) leave no "
                         f"room for a conversation in the model's context of {context} tokens; give a shorter one "
                         "(--judge-template-file)")
    return tokenizer


@contextlib.contextmanager
def _progress(total: int, rank: int):
    """A context giving the function that counts a finished prompt on stderr: a tqdm bar, closed on leaving it (an
    interrupt's message then starts on a line of its own), or a line per prompt without tqdm."""
    name = f"rain[{rank}]" if rank else "rain"
    try:
        from tqdm import tqdm
    except ImportError:
        tqdm = None
    if tqdm is not None:
        with tqdm(total=total, desc=name, unit="prompt", position=rank) as bar:
            yield lambda result: bar.update(1)
        return
    count = [0]

    def tick(result):
        count[0] += 1
        print(f"{name}: {count[0]}/{total} prompts", file=sys.stderr)
    yield tick
