"""Loaders for the data formats unlearning is fed with, each returning QAPairs.

- PKU-SafeRLHF jsonl (`prompt`, `response_0/1`, `is_response_0/1_safe`): every unsafe response is a forget pair.
- Anthropic HH jsonl (`chosen`, `rejected` transcripts): the final Human turn is the prompt, the final
  Assistant turn of `rejected` the harmful answer.
- TruthfulQA csv: normal pairs (Question, Best Answer) split into train and test, and a pool of normal
  answers for the mismatch stream drawn only from rows outside both splits (so the normal set never
  reappears as a mismatch answer, and the held-out test questions never leak into training).
- plain jsonl {`prompt`, `answer`}.
"""
from __future__ import annotations

import os
import random
import re
from dataclasses import dataclass
from typing import Literal, get_args

from fastalign.data_files import DataError, read_csv, read_jsonl, text_field
from fastalign.unlearn.records import QAPair, make_pair

Format = Literal["pku", "hh", "jsonl"]   # the data file formats (forget_format)
FORMATS = get_args(Format)

# A turn starts after a blank line, or at the very start of a transcript stored without its leading "\n\n".
_HH_TURN = re.compile(r"(?:\A|\n\n)(Human|Assistant):[ \t]?")


def load_pku_saferlhf(path: str | os.PathLike) -> list[QAPair]:
    """Forget pairs from PKU-SafeRLHF rows: (prompt, response_k) for each response marked unsafe."""
    path = os.fspath(path)
    pairs = []
    for row, obj in read_jsonl(path):
        prompt = text_field(obj, "prompt", path, row)
        for k in (0, 1):
            flag = f"is_response_{k}_safe"
            if flag not in obj:
                raise DataError(f"{path}: row {row}: missing field {flag!r}")
            if not isinstance(obj[flag], bool):
                raise DataError(f"{path}: row {row}: field {flag!r} must be true or false, got {obj[flag]!r}")
            if not obj[flag]:
                pairs.append(make_pair(prompt, text_field(obj, f"response_{k}", path, row), path, row))
    return _non_empty(pairs, path, "no unsafe response")


def hh_line_break_hint(transcript: str) -> str:
    """What to add to the error of a transcript whose turns went unread: its carriage returns, where a file
    written on Windows (or re-encoded) breaks lines with "\\r\\n" and so holds no "\\n\\n" before a turn."""
    if "\r" not in transcript:
        return ""
    return " (turns follow a blank line, '\\n\\n': this transcript breaks lines with '\\r')"


def hh_final_exchange(transcript: str) -> tuple[str, str]:
    """(last Human turn, final Assistant turn) of an HH transcript; ValueError if it does not end so.

    A few transcripts hold two Assistant turns in a row (a Human turn glued inline into the text); the
    prompt is then the last turn that starts as a Human turn.
    """
    pieces = _HH_TURN.split(transcript)
    turns = list(zip(pieces[1::2], pieces[2::2]))
    human = [text for speaker, text in turns[:-1] if speaker == "Human"]
    if not turns or turns[-1][0] != "Assistant" or not human:
        raise ValueError("transcript does not end with an Assistant turn after a Human turn"
                         + hh_line_break_hint(transcript))
    return human[-1].strip(), turns[-1][1].strip()


def hh_first_request(transcript: str) -> str:
    """The request an HH transcript opens with: its text from the first turn, which must be a Human turn, up to the
    first Assistant turn, turns read as hh_final_exchange reads them (with or without the leading blank line, and
    "Human:" with or without its space), so that eval and rain take their prompts from every transcript unlearning
    trains on; ValueError for a transcript that opens otherwise (text, an Assistant turn) or has no Assistant turn."""
    turns = list(_HH_TURN.finditer(transcript))
    answer = next((turn for turn in turns if turn[1] == "Assistant"), None)
    if not turns or turns[0].start() != 0 or turns[0][1] != "Human" or answer is None:
        raise ValueError("must start with a 'Human:' turn followed by an 'Assistant:' turn"
                         + hh_line_break_hint(transcript))
    return transcript[turns[0].end():answer.start()]


def load_hh_rlhf(path: str | os.PathLike) -> list[QAPair]:
    """Forget pairs from Anthropic HH rows: final Human turn -> final Assistant turn of `rejected`."""
    path = os.fspath(path)
    pairs = []
    for row, obj in read_jsonl(path):
        transcript = text_field(obj, "rejected", path, row)
        try:
            prompt, answer = hh_final_exchange(transcript)
        except ValueError as e:
            raise DataError(f"{path}: row {row}: field 'rejected': {e}") from None
        pairs.append(make_pair(prompt, answer, path, row))
    return _non_empty(pairs, path, "no rows")


def load_prompt_answer_jsonl(path: str | os.PathLike) -> list[QAPair]:
    """Pairs from plain jsonl rows {"prompt": ..., "answer": ...}."""
    path = os.fspath(path)
    pairs = [make_pair(text_field(obj, "prompt", path, row), text_field(obj, "answer", path, row), path, row)
             for row, obj in read_jsonl(path)]
    return _non_empty(pairs, path, "no rows")


def detect_jsonl_format(path: str | os.PathLike) -> Format:
    """'pku', 'hh' or 'jsonl', from the fields of the file's first row."""
    for _, obj in read_jsonl(path):
        if "response_0" in obj:
            return "pku"
        if "rejected" in obj:
            return "hh"
        if "answer" in obj:
            return "jsonl"
        raise DataError(f"{os.fspath(path)}: row 1: cannot tell the format from fields {sorted(obj)}; "
                        "expected PKU-SafeRLHF (response_0), HH (rejected) or {prompt, answer}")
    raise DataError(f"{os.fspath(path)}: no rows")


def load_pairs(path: str | os.PathLike, fmt: Literal["auto"] | Format = "auto") -> list[QAPair]:
    """Pairs of a jsonl file in the given format ('auto' looks at the first row)."""
    if fmt == "auto":
        fmt = detect_jsonl_format(path)
    loaders = {"pku": load_pku_saferlhf, "hh": load_hh_rlhf, "jsonl": load_prompt_answer_jsonl}
    if fmt not in loaders:
        raise ValueError(f"format must be 'auto' or one of {FORMATS}, got {fmt!r}")
    return loaders[fmt](path)


@dataclass(frozen=True)
class TruthfulQASplit:
    """Disjoint row sets of TruthfulQA: normal train pairs, normal test pairs, mismatch answer pool."""

    normal_train: list[QAPair]
    normal_test: list[QAPair]
    mismatch_pool: list[str]


def load_truthfulqa(path: str | os.PathLike, *, test_fraction: float = 0.2, pool_fraction: float = 0.3,
                    seed: int = 0) -> TruthfulQASplit:
    """Splits TruthfulQA rows at random (seeded) into normal train / normal test / mismatch pool rows.

    Normal pairs are (Question, Best Answer). The pool holds the distinct answers of the pool rows' Best,
    Correct and Incorrect columns, split on ';', less any text that is the answer of a normal pair. The rows of one
    question go to the same split.
    """
    path = os.fspath(path)
    if not (0 <= test_fraction and 0 < pool_fraction and test_fraction + pool_fraction < 1):
        raise ValueError("need 0 <= test_fraction, 0 < pool_fraction and test_fraction + pool_fraction < 1, "
                         f"got test_fraction={test_fraction}, pool_fraction={pool_fraction}")
    columns = ("Question", "Best Answer", "Correct Answers", "Incorrect Answers")
    rows = list(read_csv(path, columns))
    if len(rows) < 3:
        raise DataError(f"{path}: {len(rows)} rows; need at least 3 to split into train, test and pool")
    # the rows of a question go to one split together (a csv of one's own may repeat a question with another
    # answer: split by row, it was trained on and held out); each question's rows in one shuffled group, so that a
    # file of distinct questions splits as a shuffle of its rows
    groups: dict[str, list[int]] = {}
    for i, (_, record) in enumerate(rows):
        groups.setdefault(record["Question"].strip(), []).append(i)
    order = list(groups.values())
    random.Random(seed).shuffle(order)
    n_pool = max(1, round(pool_fraction * len(rows)))
    n_test = round(test_fraction * len(rows))
    pool_rows, test_rows, train_rows = [], [], []
    for group in order:   # whole questions, until each split has its share of the rows
        (pool_rows if len(pool_rows) < n_pool else test_rows if len(test_rows) < n_test else train_rows).extend(group)
    if not train_rows:
        raise DataError(f"{path}: test_fraction={test_fraction} and pool_fraction={pool_fraction} of {len(rows)} "
                        f"rows leave no normal training row ({n_test} test, {n_pool} pool)")

    def pairs(indices):
        return [make_pair(rows[i][1]["Question"], rows[i][1]["Best Answer"], path, rows[i][0])
                for i in sorted(indices)]

    pool = []
    for i in sorted(pool_rows):
        record = rows[i][1]
        for column in ("Best Answer", "Correct Answers", "Incorrect Answers"):
            pool.extend(a.strip() for a in record[column].split(";"))
    train, test = pairs(train_rows), pairs(test_rows)
    normal_answers = {p.answer.strip() for p in train + test}
    pool = list(dict.fromkeys(a for a in pool if a and a not in normal_answers))
    return TruthfulQASplit(normal_train=train, normal_test=test, mismatch_pool=pool)


def _non_empty(pairs: list[QAPair], path: str, why: str) -> list[QAPair]:
    if not pairs:
        raise DataError(f"{path}: nothing to train on ({why})")
    return pairs
