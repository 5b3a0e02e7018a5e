"""Prompt/answer records of unlearning's data.

Every record remembers where it came from (file and row: the 1-based line it starts on, in a jsonl or a CSV
file alike, as data_files numbers them), so that a problem found later, e.g. a prompt longer than the model's
context, can still be reported against the line a user can open.
"""
from __future__ import annotations

from dataclasses import dataclass

from fastalign.data_files import DataError


@dataclass(frozen=True)
class QAPair:
    """One prompt x with one answer y, and where it was read from (`file:row N`)."""

    prompt: str
    answer: str
    source: str


def make_pair(prompt: str, answer: str, path: str, row: int) -> QAPair:
    """A QAPair, refusing an empty prompt or an answer with no visible text (nothing to train on)."""
    if not prompt.strip():
        raise DataError(f"{path}: row {row}: empty prompt")
    if not answer.strip():
        raise DataError(f"{path}: row {row}: row has no answer")
    return QAPair(prompt=prompt, answer=answer, source=f"{path}:row {row}")
