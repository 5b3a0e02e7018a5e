"""Data-file readers (fastalign/data_files.py): jsonl, CSV and text files, gzipped or not, and errors that name the
file and row."""
import csv
import gzip
import json
import random

import pytest

from fastalign.data_files import DataError, read_csv, read_jsonl, read_text


def test_read_text_returns_the_file_as_written(tmp_path):
    """read_text keeps every character but a leading BOM (a "\\r\\n" too, which its callers handle), gzipped or not;
    a file that is not (gzipped) UTF-8, a truncated .gz included, is a DataError naming it."""
    text = "  first\r\nsecond\n\n"
    (tmp_path / "a.txt").write_bytes(("\ufeff" + text).encode("utf-8"))
    with gzip.open(tmp_path / "a.txt.gz", "wb") as f:
        f.write(text.encode("utf-8"))
    assert read_text(tmp_path / "a.txt") == read_text(tmp_path / "a.txt.gz") == text
    (tmp_path / "latin1.txt").write_bytes("café".encode("latin-1"))
    (tmp_path / "cut.txt.gz").write_bytes(gzip.compress(text.encode() * 100)[:-10])
    for name in ("latin1.txt", "cut.txt.gz"):
        with pytest.raises(DataError, match=rf"{name}: cannot be read as \(gzipped\) UTF-8 text"):
            read_text(tmp_path / name)


def test_read_jsonl_skips_only_a_torn_last_line_when_asked(tmp_path):
    """skip_torn_last_line drops a last line without its newline (lines ending in "\\n" or "\\r\\n" are whole);
    blank lines ("\\r\\n" alone included) are no rows either way."""
    path = tmp_path / "log.jsonl"
    path.write_bytes(b'{"step": 1}\r\n\r\n{"step": 2}\n{"step": 3}')
    assert list(read_jsonl(path, skip_torn_last_line=True)) == [(1, {"step": 1}), (3, {"step": 2})]
    assert list(read_jsonl(path)) == [(1, {"step": 1}), (3, {"step": 2}), (4, {"step": 3})]


def test_read_jsonl_skips_a_last_line_without_its_newline_only_where_the_format_says_it_is_torn(tmp_path):
    """Given a function of (row, line), only a last line without its newline that it calls torn is skipped: a
    format whose whole records can lose their newline (a rain output) keeps them, and refuses other data."""
    path = tmp_path / "out.jsonl"
    path.write_bytes(b'{"step": 1}\n\n{"step": 2}')
    seen = []
    assert list(read_jsonl(path, skip_torn_last_line=lambda row, line: seen.append((row, line)))) == \
        [(1, {"step": 1}), (3, {"step": 2})]
    assert seen == [(3, '{"step": 2}')]
    assert list(read_jsonl(path, skip_torn_last_line=lambda row, line: True)) == [(1, {"step": 1})]
    path.write_bytes(b'{"step": 1}\nnot json')
    with pytest.raises(DataError, match="row 2: not valid JSON"):
        list(read_jsonl(path, skip_torn_last_line=lambda row, line: False))


@pytest.mark.parametrize("name", ["forget.jsonl", "forget.jsonl.gz"])
def test_a_byte_that_is_not_utf8_is_named_by_its_row(tmp_path, name):
    """One latin-1 byte on line 5001 was "can't decode byte 0xe9 in position 5103": no row, and an offset in the
    decoder's chunk, not the file. The row is named."""
    row = random.randrange(2000, 6000)
    lines = [json.dumps({"prompt": f"p{i}", "answer": "a" * 50}).encode() + b"\n" for i in range(row + 10)]
    lines[row - 1] = b'{"prompt": "caf\xe9", "answer": "a"}\n'
    path = tmp_path / name
    path.write_bytes(gzip.compress(b"".join(lines)) if name.endswith(".gz") else b"".join(lines))
    with pytest.raises(DataError, match=rf"{name}: cannot be read as \(gzipped\) UTF-8 text: row {row}: byte 0xe9 is "
                                        "not UTF-8"):
        list(read_jsonl(path))


def test_csv_edge_cases(tmp_path):
    """An empty file names the missing columns; a row short of a column nobody reads is kept; a quoted "\\r\\n" is
    read as written (newline="")."""
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(DataError, match=r"empty.csv: missing column\(s\) \['Question'\]; header is None"):
        list(read_csv(tmp_path / "empty.csv", ("Question",)))
    (tmp_path / "short.csv").write_text("Question,Best Answer,Source\nq,a\n")
    assert list(read_csv(tmp_path / "short.csv", ("Question", "Best Answer"))) == \
        [(2, {"Question": "q", "Best Answer": "a", "Source": None})]
    content = b'Question,Best Answer\r\nq1,"two\r\nlines"\r\nq2,a\r\n'
    (tmp_path / "crlf.csv").write_bytes(content)
    (tmp_path / "crlf.csv.gz").write_bytes(gzip.compress(content))
    for name in ("crlf.csv", "crlf.csv.gz"):
        assert [(row, r["Best Answer"]) for row, r in read_csv(tmp_path / name, ("Question",))] == \
            [(2, "two\r\nlines"), (4, "a")]


@pytest.fixture
def field_limit():
    """A csv field limit of the test's own, set before it and restored after: one read mid-suite may be a limit an
    earlier read_csv leaked, which a check that read_csv restores it would then compare with itself."""
    limit = random.randrange(100_000, 150_000)
    old = csv.field_size_limit(limit)
    yield limit
    csv.field_size_limit(old)


def test_a_csv_field_past_the_csv_modules_default_limit_is_read(tmp_path, field_limit):
    """A 144k-character prompt in a csv was "malformed CSV: field larger than field limit (131072)", naming no row,
    while the same prompt in a jsonl read fine. It is read, and the csv module's limit is left as it was."""
    long = "".join(random.choice("ab ") for _ in range(200_000))
    (tmp_path / "long.csv").write_text(f"Question,Best Answer\nq,{long}\n")
    assert list(read_csv(tmp_path / "long.csv", ("Question", "Best Answer"))) == [(2, {"Question": "q",
                                                                                   "Best Answer": long})]
    assert csv.field_size_limit() == field_limit


def test_a_paused_csv_reader_leaves_the_field_limit_alone(tmp_path, field_limit):
    """Between the rows it yields, read_csv leaves the csv module's limit as it was: two readers read in turn each
    read their long fields, and other code never runs under the raised limit."""
    def write(name, long_row):
        rows = ["".join(random.choice("ab ") for _ in range(200_000)) if i == long_row else f"q{i}" for i in range(3)]
        with open(tmp_path / name, "w", newline="") as f:
            csv.writer(f).writerows([["Question", "Best Answer"]] + [[q, "a"] for q in rows])
        return rows

    a_rows, b_rows = write("a.csv", 0), write("b.csv", 2)
    a, b = read_csv(tmp_path / "a.csv", ("Question",)), read_csv(tmp_path / "b.csv", ("Question",))
    read_a, read_b = [next(a)], [next(b)]
    assert csv.field_size_limit() == field_limit
    read_a += list(a)   # a finishes while b is paused
    read_b += list(b)
    assert [r["Question"] for _, r in read_a] == a_rows and [r["Question"] for _, r in read_b] == b_rows
    assert csv.field_size_limit() == field_limit


def test_a_csv_header_naming_a_read_column_twice_is_refused(tmp_path):
    """A header naming "Best Answer" twice (a reviewer's column appended) trained on the last one's cells without a
    word; a column nobody reads may repeat."""
    (tmp_path / "twice.csv").write_text("Question,Best Answer,Notes,Best Answer,Notes\nq,right,n,REVIEW: wrong,m\n")
    with pytest.raises(DataError, match=r"twice.csv: column\(s\) \['Best Answer'\] named twice in the header"):
        list(read_csv(tmp_path / "twice.csv", ("Question", "Best Answer")))
    assert [r["Question"] for _, r in read_csv(tmp_path / "twice.csv", ("Question",))] == ["q"]


def test_csv_rows_are_numbered_past_fields_that_hold_any_line_break(tmp_path):
    """A quoted field's lone "\r" (an old Mac line end) ends a line of the file as "\n" and "\r\n" do: the rows
    after it are numbered from the line they start on (a lone "\r" was not counted: q1 was said to start on line 3)."""
    (tmp_path / "breaks.csv").write_bytes(b'Question,Best Answer\nq1,"a\rb"\nq2,"c\r\nd\ne\rf"\nq3,g\n')
    assert [(row, r["Question"]) for row, r in read_csv(tmp_path / "breaks.csv", ("Question",))] == \
        [(2, "q1"), (4, "q2"), (8, "q3")]


@pytest.mark.parametrize("end", ["\n", ""], ids=["newline-at-end", "no-newline-at-end"])
def test_a_csv_quote_never_closed_is_named_with_the_row_it_opens_on(tmp_path, end):
    """A quote opened on line 4 and never closed was "row 3: wrong number of fields": a correct row, named because the
    field, run to the end of the file, also held the file's last line break, and no word of the quote."""
    (tmp_path / "open.csv").write_text(f'Question,Best Answer\nq1,a1\nq2,a2\n"q3 never closed,a3\nq4,a4\nq5,a5{end}')
    with pytest.raises(DataError, match=r"open.csv: a quote opened on row 4 is never closed: its field runs to the end "
                                        r"of the file$"):
        list(read_csv(tmp_path / "open.csv", ("Question", "Best Answer")))
    # in a row's last column, the field took in the rest of the file: its rows were lost without a word
    (tmp_path / "last.csv").write_text(f'Question,Best Answer\nq1,a1\nq2,"a2 never closed\nq3,a3\nq4,a4{end}')
    with pytest.raises(DataError, match=r"last.csv: a quote opened on row 3 is never closed"):
        list(read_csv(tmp_path / "last.csv", ("Question", "Best Answer")))
    (tmp_path / "header.csv").write_text(f'Question,"Best Answer\nq1,a1{end}')
    with pytest.raises(DataError, match=r"header.csv: a quote opened on row 1 is never closed"):
        list(read_csv(tmp_path / "header.csv", ("Question",)))
    (tmp_path / "closed.csv").write_text(f'Question,Best Answer\nq1,"a\n"\n\nq2,"a2"{end}')   # (a field's last "\n")
    assert list(read_csv(tmp_path / "closed.csv", ("Question",))) == \
        [(2, {"Question": "q1", "Best Answer": "a\n"}), (5, {"Question": "q2", "Best Answer": "a2"})]


def test_a_csv_row_of_too_many_fields_is_named_by_the_line_it_starts_on(tmp_path):
    """The line breaks of a row's extra fields were not counted: a row starting on line 3 was said to be row 4."""
    (tmp_path / "extra.csv").write_text('Question,Best Answer\nq1,a1\nq2,a2,"extra\nfield"\nq3,a3\n')
    with pytest.raises(DataError, match=r"extra.csv: row 3: wrong number of fields$"):
        list(read_csv(tmp_path / "extra.csv", ("Question", "Best Answer")))
