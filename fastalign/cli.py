"""The `fastalign` command. Each subcommand lives in its own module exposing `register(subparsers)`,
which adds its parser and sets `func` (called with the parsed arguments, returns the exit code)."""
from __future__ import annotations

import argparse
import importlib
import sys

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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastalign", description="Fast alignment of language models without "
                                     "RLHF: unlearning and RAIN.")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
