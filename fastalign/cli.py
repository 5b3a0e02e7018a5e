"""The `fastalign` command. Each subcommand lives in its own module exposing `register(subparsers)`,
which adds its parser, sets `func` (called with the parsed arguments, returns the exit code) and returns the parser."""
from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import signal
import sys
import threading

from fastalign.writable import cannot_append_to, cannot_create_in, not_a_regular_file


class UsageError(ValueError):
    """Bad command-line input; the message names the argument."""


def check_output_file(path: str) -> None:
    """Creates the directory of the --output file `path`; UsageError naming --output when `path` is a directory or
    another file than a regular one (a pipe, a device), its directory cannot be created, or the file (where it
    exists, else its directory) is not writable: a read-only file system or directory (found before any model
    loads, rather than as a traceback once it has)."""
    what = not_a_regular_file(path)   # a pipe: opening it to try blocks until a reader comes, forever
    if what:
        raise UsageError(f"--output: {path!r} {what}: give the path of the jsonl file to write")
    directory = os.path.dirname(path) or "."
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"--output: {path!r}: cannot create its directory: {exc}") from None
    if os.path.exists(path):
        problem = cannot_append_to(path)
        if problem:
            raise UsageError(f"--output: {path!r} is not writable: {problem}")
    else:
        problem = cannot_create_in(directory)
        if problem:
            raise UsageError(f"--output: cannot create {path!r} in its directory {directory!r}: {problem}")


def check_output_is_no_input(output: str, inputs: dict) -> None:
    """UsageError when --output is one of the files `inputs` names (argument -> path or None): the records
    written to it would destroy it."""
    for argument, path in inputs.items():
        if path and os.path.exists(output) and os.path.exists(path) and os.path.samefile(output, path):
            raise UsageError(f"--output {output!r} is the {argument} file: writing the records into it would "
                             "destroy it")


def check_model_dir(path, argument: str) -> None:
    """UsageError naming `argument` unless `path` is a directory: the commands load local checkpoints, and
    transformers would take another name for one on the Hub and retry the network for a minute on a machine
    without it."""
    if not os.path.isdir(path):
        raise UsageError(f"{argument}: no model directory at {str(path)!r}")


def check_field_used(field, argument: str, path, path_argument: str) -> None:
    """UsageError naming `argument` when it is given (`field` not None) but the prompts of `path` (the file of
    `path_argument`; None for an HH file) sit in no field: a text file, read line by line, or an HH file.
    The option would do nothing, and the prompts be read otherwise than its user meant."""
    from fastalign.evaluation.prompts import FIELD_SUFFIXES, has_fields

    if field is not None and not (path is not None and has_fields(path)):
        what = (f"{path_argument} {path!r} is read line by line" if path is not None else
                f"the prompts of {path_argument} are the first Human turns of its dialogues")
        suffixes = f"{', '.join(FIELD_SUFFIXES[:-1])} or {FIELD_SUFFIXES[-1]}"
        raise UsageError(f"{argument} {field!r} names the prompts' field in a {suffixes} file, "
                         f"and {what}: drop {argument}")


def check_device(text: str) -> None:
    """UsageError naming --device unless `text` is a device this machine can put a tensor on (found before any
    model loads, rather than as a traceback once it has: a misspelt device, CUDA where there is none)."""
    import torch

    try:
        torch.empty(0, device=text)
    except (RuntimeError, AssertionError) as exc:   # AssertionError: "Torch not compiled with CUDA enabled"
        raise UsageError(f"--device: cannot use {text!r} on this machine: {exc}") from None
    if torch.device(text).type == "meta":   # tensors without data: the model's weights would be lost
        raise UsageError(f"--device: {text!r} holds no data (shapes only): give cpu or cuda[:N]")


def template_kwargs_argument(text: str) -> dict:
    """The value of --chat-template-kwargs: a JSON object of chat template variables (argparse's error for anything
    else names the option)."""
    example = '{"enable_thinking": false}'
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"expected a JSON object such as '{example}', got {text!r}, which is not "
                                         f"JSON ({exc})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object such as '{example}', got {text!r}")
    return value


_SIZE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def memory_size_argument(text: str) -> int:
    """The value of an option that sizes memory: a positive number of bytes, or of KiB, MiB, GiB or TiB with the
    suffix K, M, G or T (optionally followed by "iB" or "B", e.g. 512M, 1.5GiB)."""
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]*)?)\s*([KMGT]?)(?:i?B)?\s*", text, flags=re.IGNORECASE)
    size = int(float(match[1]) * _SIZE_UNITS[match[2].upper()]) if match else 0
    if size < 1:
        raise argparse.ArgumentTypeError(f"expected a positive number of bytes, or of KiB, MiB, GiB or TiB with the "
                                         f"suffix K, M, G or T (e.g. 512M, 16G), got {text!r}")
    return size


# --dtype of the commands that load a model: auto is the checkpoint's own dtype (Hugging Face's dtype="auto")
MODEL_DTYPES = ("auto", "float32", "bfloat16", "float16")


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the description's line breaks and ends each option's help with its default, unless the help
    already names it or the default says nothing (None, an off switch, no values)."""

    def _get_help_string(self, action):
        text = action.help or ""
        silent = (action.default is None or action.default is False or action.default is argparse.SUPPRESS
                  or action.default == [])
        if not action.option_strings or silent or "default" in text.lower():
            return text
        return f"{text} (default: %(default)s)"


COMMAND_MODULES = (
    "fastalign.unlearn.cli",
    "fastalign.rain.cli",
    "fastalign.evaluation.cli",
    "fastalign.demo.cli",
)


def version_line() -> str:
    """fastalign's version and those of the libraries whose versions change its results or speed (for bug reports
    and benchmark notes); read from the installed distributions, without importing them."""
    from importlib.metadata import PackageNotFoundError, version

    from fastalign import __version__

    def installed(name):
        try:
            return version(name)
        except PackageNotFoundError:
            return "not installed"

    return f"fastalign {__version__} ({', '.join(f'{n} {installed(n)}' for n in ('torch', 'triton', 'transformers'))})"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastalign", description="Fast alignment of language models without "
                                     "RLHF: unlearning and RAIN.")
    parser.add_argument("--version", action="version", version=version_line(),
                        help="print fastalign's version and those of the libraries it runs on, then exit")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    parser.commands = {}   # name -> the command's own parser
    for name in COMMAND_MODULES:
        command = importlib.import_module(name).register(subparsers)
        parser.commands[command.prog.split()[-1]] = command
    return parser


# What an interrupted command kept, and how to go on from it.
INTERRUPTED_HINTS = {
    "unlearn": "the checkpoints written so far (--save-every) are kept: rerun the command with --resume to continue "
               "from the latest",
    "rain": "the records written so far are kept: rerun the same command to continue",
    "eval": "the records judged so far are in --output (a rerun starts over)",
}


def _interrupted_hint(command, args) -> str | None:
    """INTERRUPTED_HINTS of `command`; for eval interrupted before it wrote --output (loading the model), that none
    was written: the hint sent the user to a file that did not exist."""
    if command == "eval" and not os.path.isfile(args.output):
        return "no record was written to --output"
    return INTERRUPTED_HINTS.get(command)


def _interrupt_on_sigterm(signum, frame):
    """SIGTERM (a cluster's preemption, `kill`) stops the command as Ctrl-C does: through its clean-up, so that
    no checkpoint, model or record is left half written. A second SIGTERM kills the process at once."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    raise KeyboardInterrupt("SIGTERM")


def main(argv: list[str] | None = None) -> int:
    """Runs the command; an interrupt (Ctrl-C, SIGTERM) ends it with a message on stderr and the exit status
    128 + the signal's number, as a process the signal killed has."""
    in_main_thread = threading.current_thread() is threading.main_thread()   # signal.signal works only there
    previous = signal.signal(signal.SIGTERM, _interrupt_on_sigterm) if in_main_thread else None
    command = args = None   # until parsed: an interrupt while the parser imports the commands' modules names none
    try:
        parser = build_parser()
        args, unknown = parser.parse_known_args(argv)
        if unknown:   # argparse's own error shows the usage of `fastalign`, not of the command that has the options
            parser.commands[args.command].error(f"unrecognized arguments: {' '.join(unknown)}")
        command = args.command
        return args.func(args)
    except KeyboardInterrupt as exc:
        by, signum = ("SIGTERM", signal.SIGTERM) if exc.args == ("SIGTERM",) else ("Ctrl-C", signal.SIGINT)
        hint = _interrupted_hint(command, args)
        print(f"fastalign{' ' + command if command else ''}: interrupted by {by}{'; ' + hint if hint else ''}",
              file=sys.stderr)
        return 128 + signum
    finally:
        if previous is not None:   # None also for a handler not set from Python, which cannot be put back
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
