"""`fastalign demo`: unlearning and RAIN on the shipped tiny model, before/after, on any CPU in minutes.

Prints a table (progress of each phase on stderr while it runs); `--json` prints the same numbers as JSON.
"""
import argparse
import json
import sys
from dataclasses import fields
from pathlib import Path

import torch

from ..unlearn.extras import MissingExtraError
from .model import ASSETS, WORLD_FILE
from .story import DemoResult, DemoSettings, check_settings, run_demo


def register(subparsers) -> argparse.ArgumentParser:
    """Adds the `demo` subcommand (its handler is `run`, set as the `func` default)."""
    parser = subparsers.add_parser("demo", help="unlearning and RAIN on a tiny model, before and after (CPU, minutes)",
                                   description=__doc__)
    add_arguments(parser)
    parser.set_defaults(func=run)
    return parser


# What each DemoSettings field controls, for --help (its default is appended there).
SETTING_HELP = {
    "steps": "unlearning optimizer steps",
    "lr": "unlearning learning rate (the tiny model needs far more than SPEC's 2e-6)",
    "batch_size": "harmful prompts per unlearning step",
    "mismatch_per_prompt": "K, random normal answers per harmful prompt",
    "normal_batch_size": "normal examples per unlearning step",
    "forget_weight": "w_fgt, weight of gradient ascent on harmful answers",
    "mismatch_weight": "w_rdn, weight of the random-answer term",
    "normal_weight": "w_nor, weight of the KL to the original model on normal answers",
    "reference": "unlearning's KL reference: a frozen copy, or cached hidden states (lm_head frozen)",
    "seed": "seed of unlearning's data order and mismatch answers, and of RAIN's search",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = DemoSettings()
    parser.add_argument("--json", action="store_true", help="print the numbers as JSON instead of a table")
    parser.add_argument("--quiet", action="store_true", help="no progress on stderr")
    parser.add_argument("--no-rain", action="store_true", help="skip the RAIN phase")
    parser.add_argument("--model-dir", type=Path, default=ASSETS,
                        help="a model written by `python -m fastalign.demo.train` (default: the shipped one)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default: %(default)s)")
    for f in fields(DemoSettings):
        default = getattr(defaults, f.name)
        help_text = f"{SETTING_HELP[f.name]} (default: {default})"
        if f.name == "reference":
            parser.add_argument("--reference", choices=("copy", "cached"), default=default, help=help_text)
        else:
            parser.add_argument("--" + f.name.replace("_", "-"), type=type(default), default=default,
                                help=help_text)


def _percent(x: float) -> str:
    return f"{100 * x:5.1f}%"


def format_table(result: DemoResult) -> str:
    """The before / after unlearning / RAIN table and the time of each phase."""
    n = result.prompts
    columns = [result.before, result.after] + ([result.rain] if result.rain else [])
    rows = [("harmful rate, forgotten prompts", "forgotten", "harmful_rate_forgotten"),
            ("harmful rate, unseen prompts", "unseen", "harmful_rate_unseen"),
            ("normal answers correct", "normal", "normal_accuracy")]
    lines = [f"fastalign demo: tiny Llama ({result.model_parameters / 1e6:.2f}M parameters), synthetic QA world "
             f"(seed {result.world_seed}), {result.unlearning['steps']} unlearning steps",
             "", f"{'':34s}{'prompts':>8s}{'before':>9s}{'after':>9s}" + (f"{'RAIN':>9s}" if result.rain else "")]
    lines += [f"{name:34s}{n[count]:8d}" + "".join(f"{_percent(c[key]):>9s}" for c in columns)
              for name, count, key in rows]
    lines += [f"{'normal answers unchanged':34s}{n['normal']:8d}{'':>9s}{_percent(result.normal_unchanged):>9s}",
              f"{'normal mean token KL to original':34s}{n['normal']:8d}{'':>9s}{result.normal_mean_token_kl:9.4f}",
              "(after = the unlearned model, greedy" + ("; RAIN = the original model searching and judging "
                                                        "itself)" if result.rain else ")"),
              "", "wall time: " + ", ".join(f"{k} {v:.1f} s" for k, v in result.seconds.items())
              + f" (total {sum(result.seconds.values()):.1f} s)"]
    return "\n".join(lines)


def run(args) -> int:
    """Handler of `fastalign demo`: 0, or 2 when --model-dir holds no trained demo model (its config.json and
    the world.json of the world it was trained on) or a setting is out of range."""
    if not all((Path(args.model_dir) / name).is_file() for name in ("config.json", WORLD_FILE)):
        print(f"fastalign demo: error: --model-dir: no trained demo model in {str(args.model_dir)!r} "
              "(`python -m fastalign.demo.train --out DIR` writes one)", file=sys.stderr)
        return 2
    if args.threads < 1:
        print(f"fastalign demo: error: --threads must be >= 1, got {args.threads}", file=sys.stderr)
        return 2
    settings = DemoSettings(**{f.name: getattr(args, f.name) for f in fields(DemoSettings)})
    try:
        check_settings(settings)
    except ValueError as exc:
        print(f"fastalign demo: error: unlearning setting: {exc}", file=sys.stderr)
        return 2
    except MissingExtraError as exc:
        print(f"fastalign demo: error: {exc}", file=sys.stderr)
        return 2

    def on_phase(name: str, seconds: float) -> None:
        if not args.quiet:
            print(f"demo: {name} done in {seconds:.1f} s", file=sys.stderr, flush=True)

    from transformers.utils import logging as hf_logging   # here, not at import: `fastalign --help` builds this parser

    # the caller's settings are given back after: `fastalign.cli.main(["demo", ...])` may run in a longer process
    threads, bars = torch.get_num_threads(), hf_logging.is_progress_bar_enabled()
    torch.set_num_threads(args.threads)
    hf_logging.disable_progress_bar()  # loading/saving bars of a 4 MB model are noise next to the phases
    try:
        result = run_demo(settings, progress=not args.quiet, on_phase=on_phase, model_dir=args.model_dir,
                          rain=not args.no_rain)
    finally:
        torch.set_num_threads(threads)
        if bars:
            hf_logging.enable_progress_bar()
    print(json.dumps(result.to_dict(), indent=1) if args.json else format_table(result))
    return 0

