"""The records of a `fastalign rain` output (rain/records.py): which record of an index counts, a last line a kill cut
short told apart from a whole record that lost its newline and from a file of other data."""
import json
import random
import re

import pytest

from fastalign.evaluation.answers import read_answers
from fastalign.rain.records import done_indices, latest_records, open_for_append, read_records


def record(index, error=None):
    return {"index": index, "prompt": f"prompt {index}", "rain": None if error else f"answer {random.random()}",
            "vanilla": None, "error": error, "stats": {}}


def lines(*records):
    return "".join(json.dumps(r) + "\n" for r in records)


@pytest.mark.parametrize("index", [True, -1, "0", 1.0, None])
def test_a_record_whose_index_is_no_prompt_index_is_refused_naming_the_file_and_row(tmp_path, index):
    """A record index of true, -1, "0" or 1.0 names no prompt of the file (True was taken for prompt 1, -1 for the last
    prompt): the file is of other data."""
    path = tmp_path / "out.jsonl"
    path.write_text(json.dumps({"index": 0, "error": None}) + "\n" + json.dumps({"index": index, "error": None}) + "\n")
    with pytest.raises(ValueError, match=f"{re.escape(str(path))}: row 2: expected a record of `fastalign rain`"):
        latest_records([str(path)])


def test_the_resume_and_eval_count_the_same_record_of_an_index(tmp_path):
    """A successful record of index 0, then a failed one (an appended run): the resume took index 0 as done with its
    answer, while `fastalign eval --answers` kept the last record and skipped index 0 as an error. Both now read the
    file alike: the last successful record of an index counts, else its last."""
    first, failed, retried = record(0), record(0, error="CUDA out of memory"), record(1, error="interrupted")
    path = tmp_path / "out.jsonl"
    path.write_text(lines(first, failed, retried, record(1)))
    counted = latest_records([str(path)])
    assert counted[0] == first and counted[1]["error"] is None
    answers = read_answers(str(path))
    assert [r["rain"] for r in answers.records] == [first["rain"], counted[1]["rain"]]
    assert answers.skipped_errors == 0


def test_a_whole_last_record_without_its_newline_counts_and_gets_its_newline(tmp_path):
    """A file rewritten with "\\n".join(lines) lost its last newline: its last record, complete, was taken for a
    write cut short, dropped and its prompt searched again. It counts, and the next record goes on a line of its
    own; a record cut short is still dropped and cut off."""
    whole, last = record(0), record(1)
    path = tmp_path / "out.jsonl"
    path.write_text(lines(whole) + json.dumps(last))
    assert read_records(str(path)).torn_row is None and latest_records([str(path)])[1] == last
    with open_for_append(str(path)) as out:
        out.write(json.dumps(record(2)) + "\n")
    assert [r["index"] for _, r in read_records(str(path)).rows] == [0, 1, 2]
    cut = json.dumps(record(3))[:random.randrange(1, 30)]
    path.write_text(lines(whole) + cut)
    assert read_records(str(path)).torn_row == 2 and list(latest_records([str(path)])) == [0]
    with open_for_append(str(path)) as out:
        out.write(json.dumps(last) + "\n")
    assert path.read_text() == lines(whole, last)


@pytest.mark.parametrize("cut", ['{', '{"ind', '{"index": ', '{"index": 2, "pro'])
def test_a_record_cut_within_its_first_bytes_is_dropped_and_cut_off(tmp_path, cut):
    """A kill within a record's first bytes leaves a last line `{` or `{"ind` (a start of '{"index": ', not JSON): a
    record cut short like a longer cut, which the resume, the rank merge and `fastalign eval --answers` skip and the
    next append cuts off; the next record is not glued to it (`{{"index": ...`, every later read an error)."""
    run = {"model": "/m", "model_files": "abc", "settings": "123"}
    first, ranked, after = ({**record(i), "run": run} for i in range(3))
    path = tmp_path / "out.jsonl"
    path.write_text(lines(first) + cut)
    (tmp_path / "out.jsonl.rank1").write_text(lines(ranked) + cut)
    read = read_records(str(path))
    assert read.torn_row == 2 and [r for _, r in read.rows] == [first]
    assert done_indices(str(path), [f"prompt {i}" for i in range(3)], run) == {0, 1}
    assert [r["rain"] for r in read_answers(str(path)).records] == [first["rain"]]
    with open_for_append(str(path)) as out:
        out.write(json.dumps(after) + "\n")
    assert path.read_text() == lines(first, after)


@pytest.mark.parametrize("text", ['{"accuracy": 0.93, "notes": "results of last week, keep"}', "keep this line",
                                  '["index", 0]'])
def test_a_last_line_of_other_data_without_its_newline_is_refused_not_cut_off(tmp_path, text):
    """A file of one line without a newline (what json.dump or echo -n write) was taken for a rain output whose
    only record a kill cut short, and emptied by the next append. It is now a file of other data, refused."""
    path = tmp_path / "results.json"
    path.write_text(text)
    with pytest.raises(ValueError, match=f"{re.escape(str(path))}: row 1: "):
        latest_records([str(path)])
    assert path.read_text() == text


def test_the_resume_skips_the_prompts_done_and_refuses_records_of_other_prompts_or_runs(tmp_path):
    """done_indices: the indices recorded without an error (in the file or its rank files) for these prompts and
    this run; records of other prompts or of another run are a ValueError naming the file, which the CLI makes a
    usage error of --output."""
    run = {"model": "/m", "model_files": "abc", "settings": "123"}
    prompts = [f"prompt {i}" for i in range(4)]
    path = tmp_path / "out.jsonl"
    path.write_text(lines(*({**r, "run": run} for r in (record(0), record(1, error="interrupted")))))
    (tmp_path / "out.jsonl.rank1").write_text(lines({**record(3), "run": run}))
    assert done_indices(str(path), prompts, run) == {0, 3}
    with pytest.raises(ValueError, match=f"{re.escape(repr(str(path)))} holds a record of another prompt at index 3"):
        done_indices(str(path), prompts[:3], run)
    with pytest.raises(ValueError, match="holds records made with other settings"):
        done_indices(str(path), prompts, {**run, "settings": "456"})
    with pytest.raises(ValueError, match="holds records made with another model"):
        done_indices(str(path), prompts, {**run, "model_files": "def"})
