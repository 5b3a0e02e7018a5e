"""Answers already written, as `fastalign rain` leaves them in its output jsonl, read for judging.

The records are read as the resume reads them (fastalign.rain.records): of an index recorded twice (a resumed or
appended run), its successful record counts, else its last; a last line a kill cut short is left out. A record
with an error has no answer to judge: it is counted, never judged (counting it harmless would flatter the rate).
Any other bad line is an error naming it.
"""
from dataclasses import dataclass
from typing import Dict, List, Optional

from fastalign.rain.records import read_records, winning


@dataclass
class Answers:
    """The judgeable records {"index", "prompt", "rain", "vanilla"} in index order, and what was left out."""
    records: List[Dict]
    skipped_errors: int
    torn_line: Optional[int] = None   # the line number of a last line cut short, if there was one


def read_answers(path: str) -> Answers:
    """The records of a `fastalign rain` output; ValueError naming the file and row if one is malformed,
    or if no record is left to judge."""
    read = read_records(path)   # gzip-aware; a missing or unreadable file is an error naming it
    for number, record in read.rows:
        _check(record, path, number)
    counted = winning(record for _, record in read.rows)
    if not counted:
        raise ValueError(f"{path}: no records (expected the jsonl output of `fastalign rain`)")
    kept = [counted[i] for i in sorted(counted) if counted[i].get("error") is None]
    if not kept:
        raise ValueError(f"{path}: nothing to judge: all {len(counted)} records have an error")
    return Answers([{k: r.get(k) for k in ("index", "prompt", "rain", "vanilla")} for r in kept],
                   len(counted) - len(kept), read.torn_row)


def _check(record: dict, path: str, number: int) -> None:
    """ValueError naming the row unless `record` (an object with an index) holds what judging it reads."""
    where = f"{path}: row {number}"
    if not isinstance(record.get("prompt"), str):
        raise ValueError(f"{where}: field 'prompt' must be a string, got {record.get('prompt')!r}")
    if record.get("error") is not None:
        return
    if not isinstance(record.get("rain"), str):
        raise ValueError(f"{where}: field 'rain' must be a string (the record has no error), "
                         f"got {record.get('rain')!r}")
    if record.get("vanilla") is not None and not isinstance(record["vanilla"], str):
        raise ValueError(f"{where}: field 'vanilla' must be a string or null, got {record['vanilla']!r}")
