"""Answers already written, as `fastalign rain` leaves them in its output jsonl, read for judging.

Each line is a record {"index", "prompt", "rain", "vanilla", "error", "stats", "run"}, appended as its prompt
finishes ("vanilla" is null under --no-vanilla). A record with an error has no answer to judge: it is
counted, never judged (counting it harmless would flatter the rate). An index recorded twice (a resumed or
appended run) keeps its last record. A last line without its newline that is not JSON is a write a kill cut
short: it is left out, as `fastalign rain` does when it resumes. Any other bad line is an error naming it.
"""
import json
from dataclasses import dataclass
from typing import Dict, List, Optional

from fastalign.ops.checks import is_integer
from fastalign.unlearn.records import read_text


@dataclass
class Answers:
    """The judgeable records {"index", "prompt", "rain", "vanilla"} in index order, and what was left out."""
    records: List[Dict]
    skipped_errors: int
    torn_line: Optional[int] = None   # the line number of a last line cut short, if there was one


def read_answers(path: str) -> Answers:
    """The records of a `fastalign rain` output; ValueError naming the file and line if one is malformed,
    or if no record is left to judge."""
    lines = read_text(path).split("\n")   # gzip-aware; a missing or unreadable file is an error naming it
    last = {}
    torn = None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            if number == len(lines):        # no newline after it: a write cut short
                torn = number
                continue
            raise ValueError(f"{path}: line {number}: not valid JSON ({exc.msg})") from None
        _check(record, path, number)
        last[record["index"]] = record
    if not last:
        raise ValueError(f"{path}: no records (expected the jsonl output of `fastalign rain`)")
    kept = [last[i] for i in sorted(last) if last[i].get("error") is None]
    if not kept:
        raise ValueError(f"{path}: nothing to judge: all {len(last)} records have an error")
    return Answers([{k: r.get(k) for k in ("index", "prompt", "rain", "vanilla")} for r in kept],
                   len(last) - len(kept), torn)


def _check(record, path: str, number: int) -> None:
    where = f"{path}: line {number}"
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
    index = record.get("index")
    if not is_integer(index) or index < 0:
        raise ValueError(f"{where}: field 'index' must be an integer >= 0, got {index!r}")
    if not isinstance(record.get("prompt"), str):
        raise ValueError(f"{where}: field 'prompt' must be a string, got {record.get('prompt')!r}")
    if record.get("error") is not None:
        return
    if not isinstance(record.get("rain"), str):
        raise ValueError(f"{where}: field 'rain' must be a string (the record has no error), "
                         f"got {record.get('rain')!r}")
    if record.get("vanilla") is not None and not isinstance(record["vanilla"], str):
        raise ValueError(f"{where}: field 'vanilla' must be a string or null, got {record['vanilla']!r}")
