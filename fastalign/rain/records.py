"""The records of a `fastalign rain` output: the one reader of the format, for the resume, the rank merge and
`fastalign eval --answers`.

Each line is a record {"index", "prompt", "rain", "vanilla", "error", "stats", "run"}, appended as its prompt
finishes. The file is append-only, so an index may have several records: a prompt whose record holds an error is
searched again by a resumed run. Of an index, its last successful record counts, else its last: an error recorded
after a success (an appended run) does not undo it, and reading several files together a successful record wins
whatever their order (rain never writes a second one of an index).
A last line without its newline is a write a kill cut short only if it is the start of a record and not JSON; it is
then no record, and cut off before the next record is appended. A whole record that lost its newline counts, and
gets it back; any other line is an error naming the file and row (a file other than a rain output).
"""
import glob
import json
import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Set, Tuple

from fastalign.data_files import read_jsonl
from fastalign.ops.checks import is_integer

_START = '{"index": '   # how every record begins (json.dumps of a dict whose first key is "index")


@dataclass
class RecordFile:
    """The records of one file as (row, record) in file order, and the row of a last line a kill cut short."""
    rows: List[Tuple[int, dict]]
    torn_row: Optional[int] = None


def is_torn(line: str) -> bool:
    """Whether `line`, a file's last line without its newline, is a record a kill cut short: the start of one, and
    not JSON (a whole record's text is JSON)."""
    if not (line.startswith(_START) or _START.startswith(line)):
        return False
    try:
        json.loads(line)
    except ValueError:
        return True
    return False


def read_records(path: str) -> RecordFile:
    """The records of `path` (gzip-aware); ValueError naming the file and row for a line that is no record."""
    torn: List[int] = []

    def cut_short(row: int, line: str) -> bool:
        if not is_torn(line):
            return False
        torn.append(row)
        return True

    rows = []
    for number, record in read_jsonl(path, skip_torn_last_line=cut_short):
        index = record.get("index")
        if not is_integer(index) or index < 0:
            raise ValueError(f"{path}: row {number}: expected a record of `fastalign rain` (an object with an "
                             f"integer 'index'), got {json.dumps(record)[:60]}")
        rows.append((number, record))
    return RecordFile(rows, torn[0] if torn else None)


def winning(records) -> Dict[int, dict]:
    """The record that counts for each index of `records` (in order): its last successful one, else its last."""
    out: Dict[int, dict] = {}
    for record in records:
        held = out.get(record["index"])
        if held is None or held.get("error") is not None or record.get("error") is None:
            out[record["index"]] = record
    return out


def succeeded(records: Dict[int, dict]) -> Set[int]:
    """The indices of `records` (winning's) whose record holds no error: the prompts done, which a resume skips."""
    return {index for index, record in records.items() if record.get("error") is None}


def latest_records(paths: Sequence[str]) -> Dict[int, dict]:
    """The record that counts for each index in the files `paths` (those that exist), in their order."""
    return winning(record for p in paths if os.path.exists(p) for _, record in read_records(p).rows)


def rank_files(path: str) -> List[str]:
    """The files <path>.rank<N>; other files starting so (out.jsonl.ranked) are the user's, never merged nor removed."""
    return sorted(p for p in glob.glob(glob.escape(path) + ".rank*") if p[len(path) + len(".rank"):].isdigit())


def done_indices(path: str, prompts: List[str], run_id: dict) -> Set[int]:
    """The prompt indices recorded without an error in `path` or in any of its rank files, which the resume
    skips (a prompt that failed is searched again); ValueError when those records are of other prompts or were
    made with another model or settings (`run_id`, the run's "run" field): the resume would keep them as this run's
    answers."""
    try:
        records = latest_records([path] + rank_files(path))
    except ValueError as exc:    # a file of other data, a corrupted line: JSONDecodeError or KeyError tracebacks
        raise ValueError(f"{exc}; choose another --output") from None
    for index, record in sorted(records.items()):
        if index >= len(prompts) or record.get("prompt") != prompts[index]:
            raise ValueError(f"{path!r} holds a record of another prompt at index {index} "
                             f"({str(record.get('prompt'))[:60]!r}): it was written for other prompts; choose "
                             "another --output")
        run = record.get("run", run_id)   # records written before 2026-12-01 carry none
        if run != run_id:
            model = {k: run_id[k] for k in ("model", "model_files")}
            what = "model" if not isinstance(run, dict) or {k: run.get(k) for k in model} != model else "settings"
            made = "another model" if what == "model" else "other settings"
            which = ("the same --model (the same path, holding the same files)" if what == "model" else
                     "the same search and judge settings (--config, --max-new-tokens, --root-visits, --seed, "
                     "--parallel-leaves, --virtual-loss, the judge options), --template, --system, "
                     "--chat-template-kwargs, --generation-prefix-file, --dtype, --sampler, --embedding and --engine")
            raise ValueError(f"{path!r} holds records made with {made} ({run}, now "
                             f"{run_id}); rerun with {which} to resume, or choose another --output")
    return succeeded(records)


def open_for_append(path: str):
    """Opens `path` to append records, so that the next one starts on a line of its own: a torn last line is cut
    off, a whole last record without its newline gets it; creates missing parent directories."""
    if os.path.exists(path):
        with open(path, "rb+") as f:
            text = f.read()
            start = text.rfind(b"\n") + 1
            if start < len(text):
                if is_torn(text[start:].decode("utf-8", errors="replace")):
                    f.truncate(start)
                else:
                    f.write(b"\n")
    else:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    return open(path, "a", encoding="utf-8")

