"""Readers of data files (jsonl, CSV and plain text, gzipped or not) that name the file and row of any problem.

Rows are numbered by the 1-based line they start on, in a jsonl or a CSV file alike, so that a problem found then
or later can be reported against the line a user can open. Unlearning's data formats, evaluation's prompt files,
RAIN's records and the config files read with them.
"""
from __future__ import annotations

import csv
import gzip
import io
import itertools
import json
import os
import re
import zlib
from typing import Callable, Iterator, Optional


class DataError(ValueError):
    """A data file is missing, malformed, or holds a row that cannot be used; the message names it."""


def check_data_file(path: str | os.PathLike) -> None:
    """DataError unless `path` is a regular file: a missing file, a directory, a pipe or a device."""
    path = os.fspath(path)
    if os.path.isdir(path):
        raise DataError(f"{path}: is a directory, not a data file")
    if not os.path.exists(path):
        raise DataError(f"data file not found: {path}")
    if not os.path.isfile(path):   # a pipe (`--forget <(zcat ...)`) or a device: the loaders read a file twice
        raise DataError(f"{path}: is not a regular file (a pipe or a device); write the data to a file first")


def open_text(path: str | os.PathLike) -> io.TextIOBase:
    """Opens a UTF-8 text file, transparently gunzipping `*.gz` and dropping a leading byte-order mark (which
    Windows tools write); a missing file, a directory, a pipe or a device is a DataError (check_data_file)."""
    path = os.fspath(path)
    check_data_file(path)
    if path.lower().endswith(".gz"):   # (.GZ as Windows tools write it too)
        return gzip.open(path, "rt", encoding="utf-8-sig", newline="")
    return open(path, encoding="utf-8-sig", newline="")


# What reading a text file that is not (gzipped) UTF-8 raises, once a line is read.
_UNREADABLE = (UnicodeDecodeError, EOFError, gzip.BadGzipFile, zlib.error)   # zlib's: a damaged deflate stream


def _unreadable(path: str, error: Exception) -> DataError:
    """The DataError of a file that is not (gzipped) UTF-8; of a byte that is not UTF-8, the row it is on (the
    decoder's position counts from the start of a chunk it read, which the user cannot find)."""
    if isinstance(error, UnicodeDecodeError):
        opener = gzip.open if path.lower().endswith(".gz") else open
        with opener(path, "rb") as f:
            raw = f.read()
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError as e:
            row = raw.count(b"\n", 0, e.start) + 1
            return DataError(f"{path}: cannot be read as (gzipped) UTF-8 text: row {row}: byte {raw[e.start]:#04x} "
                             f"is not UTF-8 ({e.reason})")
    return DataError(f"{path}: cannot be read as (gzipped) UTF-8 text: {error}")


def read_text(path: str | os.PathLike) -> str:
    """The whole text of a (gzipped) UTF-8 file; a DataError naming it when it is missing or unreadable."""
    path = os.fspath(path)
    with open_text(path) as f:
        try:
            return f.read()
        except _UNREADABLE as e:
            raise _unreadable(path, e) from None


class KeyTwice(ValueError):
    """A JSON object holds a key twice (json.loads would keep the last value silently); args[0] is the key."""

    def __str__(self):
        return f"key {self.args[0]!r} given twice"


def object_of_unique_keys(pairs: list) -> dict:
    """json.loads' object_pairs_hook: the object, or KeyTwice naming a key it holds twice."""
    obj = {}
    for key, value in pairs:
        if key in obj:
            raise KeyTwice(key)
        obj[key] = value
    return obj


def read_jsonl(path: str | os.PathLike, *, skip_torn_last_line: bool | Callable[[int, str], bool] = False
               ) -> Iterator[tuple[int, dict]]:
    """Yields (row number, object) for each non-blank line; bad JSON, a key given twice or a non-object is a
    DataError. skip_torn_last_line: a last line without its newline (a write that a kill cut short) is no row; given
    a function of (row, line), only such a line it returns True for (a format that tells a cut write apart)."""
    path = os.fspath(path)
    torn = skip_torn_last_line if callable(skip_torn_last_line) else lambda row, line: skip_torn_last_line
    with open_text(path) as f:
        try:
            for row, line in enumerate(f, start=1):
                if not line.strip() or (not line.endswith("\n") and torn(row, line)):
                    continue
                try:
                    obj = json.loads(line, object_pairs_hook=object_of_unique_keys)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}: row {row}: not valid JSON ({e.msg})") from None
                except KeyTwice as e:
                    raise DataError(f"{path}: row {row}: field {e.args[0]!r} given twice") from None
                if not isinstance(obj, dict):
                    raise DataError(f"{path}: row {row}: expected a JSON object, got {type(obj).__name__}")
                yield row, obj
        except _UNREADABLE as e:
            raise _unreadable(path, e) from None


# The longest CSV field read: the csv module's default, 128 KiB, is short of a long-context prompt (a module-wide
# setting, so raised only while a file is read, never between the rows read_csv yields)
_CSV_FIELD_LIMIT = 2**31 - 1

# What ends a line of a file read with newline="" (the csv module's lines): "\r\n", a lone "\r" or "\n".
LINE_BREAK = re.compile(r"\r\n|\r|\n")


def read_csv(path: str | os.PathLike, required_columns: tuple[str, ...]) -> Iterator[tuple[int, dict]]:
    """Yields (row number, row dict) of a CSV file with a header: the row number is the 1-based line the row
    starts on (the header is line 1, as in a spreadsheet; a quoted field may span several lines, and a quote never
    closed is an error naming its row). The whole file is read under the raised field limit before the first row is
    yielded, so that no other reader (another read_csv among them) sees the limit changed while this one is paused."""
    limit = csv.field_size_limit(_CSV_FIELD_LIMIT)
    try:
        rows = _csv_rows(os.fspath(path), required_columns)
    finally:
        csv.field_size_limit(limit)
    yield from rows


# A line read after a file's last: a field takes it in only where a quote opened in it is never closed (the csv module
# then reads the field to the end of the file), else it is a row of its own, which ends the reading.
_END_OF_FILE = "\ue000fastalign: end of the file\ue000"


def _csv_rows(path: str, required_columns: tuple[str, ...]) -> list[tuple[int, dict]]:
    """read_csv's rows, read with the csv module's current field limit."""
    rows = []
    with open_text(path) as f:
        try:
            reader = csv.reader(itertools.chain(f, [_END_OF_FILE]))
            first = _next_csv_row(path, reader)
            header = None if first is None else first[1]
            missing = [c for c in required_columns if c not in (header or [])]
            if missing:
                raise DataError(f"{path}: missing column(s) {missing}; header is {header}")
            twice = [c for c in required_columns if header.count(c) > 1]
            if twice:   # the dict would keep the last such column's cells, silently
                raise DataError(f"{path}: column(s) {twice} named twice in the header: rename or remove the one "
                                "not meant")
            while (read := _next_csv_row(path, reader)) is not None:
                row, fields = read
                if not fields:   # a blank line
                    continue
                # (None: the value of a short row's missing cells, the key of a long row's extra ones)
                record = dict(itertools.zip_longest(header, fields))
                if None in record or any(record[c] is None for c in required_columns):
                    raise DataError(f"{path}: row {row}: wrong number of fields")
                rows.append((row, record))
        except _UNREADABLE as e:
            raise _unreadable(path, e) from None
        except csv.Error as e:
            raise DataError(f"{path}: malformed CSV: {e}") from None
    return rows


def _next_csv_row(path: str, reader) -> tuple[int, list[str]] | None:
    """(the 1-based line it starts on, its fields) of the next row of a csv.reader of a file's lines and
    _END_OF_FILE (no field: a blank line); None at the end of the file; DataError where a quote is never closed."""
    row = reader.line_num + 1   # the lines the reader has read, up to the previous row's last
    fields = next(reader)
    if fields and fields[-1].endswith(_END_OF_FILE):
        if fields == [_END_OF_FILE] and reader.line_num == row:
            return None
        raise DataError(f"{path}: a quote opened on row {row} is never closed: its field runs to the end of the file")
    return row, fields


def text_field(obj: dict, key: str, path: str, row: int) -> str:
    """obj[key] as a string, or a DataError naming file, row and key."""
    if key not in obj:
        raise DataError(f"{path}: row {row}: missing field {key!r} (fields: {sorted(obj)})")
    value = obj[key]
    if not isinstance(value, str):
        raise DataError(f"{path}: row {row}: field {key!r} must be a string, got {type(value).__name__}")
    problem = not_text(value)
    if problem:
        raise DataError(f"{path}: row {row}: field {key!r} {problem}")
    return value


def not_text(value: str) -> Optional[str]:
    """What makes the string `value` no text, or None: half of a UTF-16 surrogate pair (JSON's \\ud83d escape
    without its other half), which no tokenizer takes."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        return f"holds {value[e.start:e.end]!r}, half of a UTF-16 surrogate pair, which is no text"
    return None
