"""Data-format loaders: what each format yields, and errors that name the file and row."""
import gzip
import json
import os
import random

import pytest

from fastalign.data_files import DataError, read_csv
from fastalign.unlearn.formats import (detect_jsonl_format, hh_final_exchange, hh_first_request, load_hh_rlhf,
                                       load_pairs, load_pku_saferlhf, load_prompt_answer_jsonl, load_truthfulqa)
from tests.conftest import SHARED_DATA
from tests.unlearn.tiny import write_jsonl

TRUTHFULQA = os.path.join(SHARED_DATA, "TruthfulQA.csv")
HH = os.path.join(SHARED_DATA, "hh-harmless-base-test.jsonl.gz")
needs_truthfulqa = pytest.mark.skipif(not os.path.exists(TRUTHFULQA), reason=f"{TRUTHFULQA} not present")
needs_hh = pytest.mark.skipif(not os.path.exists(HH), reason=f"{HH} not present")


def pku_row(prompt, r0, safe0, r1, safe1):
    return {"prompt": prompt, "response_0": r0, "response_1": r1, "is_response_0_safe": safe0,
            "is_response_1_safe": safe1}


def test_pku_keeps_only_unsafe_responses(tmp_path):
    path = write_jsonl(tmp_path / "pku.jsonl", [pku_row("p1", "bad", False, "good", True),
                                                pku_row("p2", "bad a", False, "bad b", False),
                                                pku_row("p3", "ok", True, "fine", True)])
    pairs = load_pku_saferlhf(path)
    assert [(p.prompt, p.answer) for p in pairs] == [("p1", "bad"), ("p2", "bad a"), ("p2", "bad b")]
    assert pairs[2].source == f"{path}:row 2"
    assert detect_jsonl_format(path) == "pku"


def test_pku_flag_must_be_boolean(tmp_path):
    path = write_jsonl(tmp_path / "pku.jsonl", [pku_row("p", "a", "no", "b", True)])
    with pytest.raises(DataError, match=r"pku.jsonl: row 1: field 'is_response_0_safe' must be true or false"):
        load_pku_saferlhf(path)


def test_pku_row_without_a_safety_flag_names_the_field(tmp_path):
    row = pku_row("p", "bad", False, "good", True)
    del row["is_response_1_safe"]
    with pytest.raises(DataError, match=r"pku.jsonl: row 1: missing field 'is_response_1_safe'"):
        load_pku_saferlhf(write_jsonl(tmp_path / "pku.jsonl", [row]))


def test_hh_takes_final_human_turn_and_rejected_answer(tmp_path):
    rejected = "\n\nHuman: first\n\nAssistant: ok\n\nHuman: how to do harm?\n\nAssistant: Like this."
    path = write_jsonl(tmp_path / "hh.jsonl.gz", [{"chosen": "\n\nHuman: x\n\nAssistant: no", "rejected": rejected}],
                       compress=True)
    [pair] = load_hh_rlhf(path)
    assert (pair.prompt, pair.answer) == ("how to do harm?", "Like this.")
    assert detect_jsonl_format(path) == "hh"


@pytest.mark.parametrize("rejected", ["\n\nHuman: only a question", "no turns at all",
                                      "\n\nHuman: q\n\nAssistant:   "])
def test_hh_row_without_answer_is_an_error(tmp_path, rejected):
    path = write_jsonl(tmp_path / "hh.jsonl", [{"rejected": "\n\nHuman: q\n\nAssistant: a"}, {"rejected": rejected}])
    with pytest.raises(DataError, match=r"hh.jsonl: row 2: "):
        load_hh_rlhf(path)


def test_hh_turns_are_stripped_of_surrounding_whitespace():
    assert hh_final_exchange("\n\nHuman:  how?  \n\nAssistant: Like this. \n") == ("how?", "Like this.")


def test_hh_transcript_stored_without_its_leading_blank_line():
    """Copies of HH that strip each transcript lose the "\n\n" before the first Human turn."""
    assert hh_final_exchange("Human: how?\n\nAssistant: Like this.") == ("how?", "Like this.")
    assert hh_final_exchange("Human: a\n\nAssistant: b\n\nHuman: how?\n\nAssistant: Like this.") == \
        ("how?", "Like this.")
    with pytest.raises(ValueError, match="does not end with an Assistant turn"):
        hh_final_exchange("Human: how?")


def test_hh_transcript_that_ends_with_a_human_turn_is_refused():
    """Its last turn is the user's: taken as the final answer, a Human turn would be trained on as the harmful reply."""
    with pytest.raises(ValueError, match="does not end with an Assistant turn after a Human turn"):
        hh_final_exchange("\n\nHuman: how?\n\nAssistant: Like this.\n\nHuman: and then?")


@pytest.mark.parametrize("opening", ["\n\nHuman: ", "Human: ", "\n\nHuman:", "\n\nHuman:\t"])
def test_hh_first_request_reads_the_turns_hh_final_exchange_reads(opening):
    """eval and rain took their HH prompts only from transcripts opening with "\n\nHuman: ", and refused those that
    unlearning trains on without the leading blank line or the space. The request runs to the first Assistant turn
    (a second Human turn before it stays in it, as it did)."""
    request = f"how {random.randrange(10**6)}?"
    transcript = f"{opening}{request}\n\nAssistant: Like this."
    assert hh_first_request(transcript) == hh_final_exchange(transcript)[0] == request
    assert hh_first_request(f"{opening}{request}\n\nHuman: now\n\nAssistant: x\n\nHuman: y\n\nAssistant: z") == \
        f"{request}\n\nHuman: now"


@pytest.mark.parametrize("transcript", ["\n\nAssistant: x\n\nHuman: Hi\n\nAssistant: y", "Hi\n\nAssistant: x",
                                        "Hi\n\nHuman: Hi\n\nAssistant: x", "\n\nHuman: Hi",
                                        "\r\n\r\nHuman: Hi\r\n\r\nAssistant: x"])
def test_hh_first_request_of_a_transcript_that_does_not_open_with_a_request_is_refused(transcript):
    """An opening Assistant turn, text before the first turn, or no answer: no request to read (a carriage return is
    named, as hh_final_exchange names it)."""
    hint = " \\(turns follow a blank line.*'\\\\r'\\)$" if "\r" in transcript else "$"
    with pytest.raises(ValueError, match="^must start with a 'Human:' turn followed by an 'Assistant:' turn" + hint):
        hh_first_request(transcript)


def test_hh_is_detected_by_its_rejected_field_alone(tmp_path):
    path = write_jsonl(tmp_path / "hh.jsonl", [{"rejected": "\n\nHuman: q\n\nAssistant: a"}])
    assert detect_jsonl_format(path) == "hh"


@needs_hh
def test_hh_shared_test_split_loads():
    pairs = load_hh_rlhf(HH)
    assert len(pairs) == 2312
    assert all(p.prompt and p.answer and "\n\nHuman:" not in p.answer + p.prompt for p in pairs)
    assert hh_final_exchange(json.loads(gzip.open(HH, "rt").readline())["rejected"])[1] == pairs[0].answer


def test_plain_jsonl_and_errors_name_file_and_row(tmp_path):
    good = write_jsonl(tmp_path / "qa.jsonl", [{"prompt": "p", "answer": "a"}, "", {"prompt": "q", "answer": "b"}])
    assert [p.source for p in load_pairs(good)] == [f"{good}:row 1", f"{good}:row 3"]
    cases = {
        "broken.jsonl": ([{"prompt": "p", "answer": "a"}, "{not json"], r"broken.jsonl: row 2: not valid JSON"),
        "noanswer.jsonl": ([{"prompt": "p", "answer": "  "}], r"noanswer.jsonl: row 1: row has no answer"),
        "missing.jsonl": ([{"prompt": "p", "reply": "a"}], r"missing.jsonl: row 1: missing field 'answer'"),
        "list.jsonl": (["[1, 2]"], r"list.jsonl: row 1: expected a JSON object"),
        "number.jsonl": ([{"prompt": "p", "answer": 3}], r"number.jsonl: row 1: field 'answer' must be a string"),
        "empty.jsonl": ([], r"empty.jsonl: nothing to train on"),
        "blankprompt.jsonl": ([{"prompt": " \n", "answer": "a"}], r"blankprompt.jsonl: row 1: empty prompt"),
    }
    for name, (rows, message) in cases.items():
        with pytest.raises(DataError, match=message):
            load_prompt_answer_jsonl(write_jsonl(tmp_path / name, rows))
    with pytest.raises(DataError, match=r"data file not found: .*absent.jsonl"):
        load_pairs(tmp_path / "absent.jsonl")
    with pytest.raises(DataError, match=r"cannot tell the format"):
        load_pairs(write_jsonl(tmp_path / "odd.jsonl", [{"text": "x"}]))


TRUTHFULQA_HEADER = "Type,Category,Question,Best Answer,Correct Answers,Incorrect Answers,Source\n"


def test_unreadable_files_are_data_errors(tmp_path):
    """A .gz that is not gzipped and a file that is not UTF-8 are DataErrors naming the file."""
    (tmp_path / "plain.jsonl.gz").write_text('{"prompt": "p", "answer": "a"}\n')
    with pytest.raises(DataError, match=r"plain.jsonl.gz: cannot be read as \(gzipped\) UTF-8 text"):
        load_pairs(tmp_path / "plain.jsonl.gz")
    (tmp_path / "plain.csv.gz").write_text(TRUTHFULQA_HEADER + "T,C,q,a,b,c,S\n" * 3)
    with pytest.raises(DataError, match=r"plain.csv.gz: cannot be read as \(gzipped\) UTF-8 text"):
        load_truthfulqa(tmp_path / "plain.csv.gz")
    (tmp_path / "latin1.jsonl").write_bytes('{"prompt": "café", "answer": "a"}\n'.encode("latin-1"))
    with pytest.raises(DataError, match=r"latin1.jsonl: cannot be read as \(gzipped\) UTF-8 text"):
        load_pairs(tmp_path / "latin1.jsonl")


def write_truthfulqa(path, rows):
    path.write_text(TRUTHFULQA_HEADER + "".join(f"T,C,{q},{b},{c},{i},S\n" for q, b, c, i in rows), encoding="utf-8")
    return path


def test_truthfulqa_splits_are_disjoint_and_pool_excludes_normal_answers(tmp_path):
    rows = [(f"q{k}?", f"best {k}", f"best {k}; right {k}", f"wrong {k}; best 0") for k in range(10)]
    split = load_truthfulqa(write_truthfulqa(tmp_path / "tqa.csv", rows), test_fraction=0.2, pool_fraction=0.3)
    train_q = {p.prompt for p in split.normal_train}
    test_q = {p.prompt for p in split.normal_test}
    assert (len(train_q), len(test_q)) == (5, 2) and not train_q & test_q
    pool_rows = {f"q{k}?" for k in range(10)} - train_q - test_q
    normal_answers = {p.answer for p in split.normal_train + split.normal_test}
    expected = {a for q in pool_rows for a in (f"best {q[1]}", f"right {q[1]}", f"wrong {q[1]}")} - normal_answers
    assert set(split.mismatch_pool) == expected and len(split.mismatch_pool) == len(expected)
    again = load_truthfulqa(tmp_path / "tqa.csv", test_fraction=0.2, pool_fraction=0.3)
    assert again == split  # seeded
    assert load_truthfulqa(tmp_path / "tqa.csv", test_fraction=0.2, pool_fraction=0.3, seed=1) != split


def test_truthfulqa_bad_files(tmp_path):
    (tmp_path / "cols.csv").write_text("Question,Best Answer\nq,a\n")
    with pytest.raises(DataError, match=r"cols.csv: missing column\(s\) \['Correct Answers', 'Incorrect Answers'\]"):
        load_truthfulqa(tmp_path / "cols.csv")
    rows = [("q1", "a", "b", "c"), ("q2", " ", "b", "c"), ("q3", "a", "b", "c")]
    path = write_truthfulqa(tmp_path / "blank.csv", rows)
    with pytest.raises(DataError, match=r"blank.csv: row 3: row has no answer"):   # line 3: after the header
        load_truthfulqa(path, pool_fraction=0.1, test_fraction=0.0)
    with pytest.raises(ValueError, match="test_fraction"):
        load_truthfulqa(path, test_fraction=0.5, pool_fraction=0.5)


def test_truthfulqa_row_with_wrong_number_of_fields_names_the_row(tmp_path):
    good = "T,C,q,a,b,c,S\n"
    for name, bad in [("short.csv", "T,C,q,a\n"), ("long.csv", "T,C,q,a,b,c,S,extra\n")]:
        (tmp_path / name).write_text(TRUTHFULQA_HEADER + good + bad + good)
        with pytest.raises(DataError, match=rf"{name}: row 3: wrong number of fields"):
            load_truthfulqa(tmp_path / name)


@pytest.mark.parametrize("test_fraction, pool_fraction", [(0.4, 0.55), (0.0, 0.9)])
def test_truthfulqa_fractions_that_leave_no_training_row_are_refused(tmp_path, test_fraction, pool_fraction):
    """With 4 rows, rounding gives every row to the test split and the pool: no normal pair would be trained on."""
    rows = [(f"q{k}?", f"best {k}", f"right {k}", f"wrong {k}") for k in range(4)]
    with pytest.raises(DataError, match=r"tqa.csv: test_fraction=.* of 4 rows leave no normal training row"):
        load_truthfulqa(write_truthfulqa(tmp_path / "tqa.csv", rows), test_fraction=test_fraction,
                        pool_fraction=pool_fraction)


@pytest.mark.parametrize("test_fraction, pool_fraction", [(0.5, 0.5), (0.2, 0.0), (-0.1, 0.3)])
def test_truthfulqa_fractions_out_of_range_are_refused_whatever_the_rounding(tmp_path, test_fraction, pool_fraction):
    """Fractions summing to 1 leave no training row by definition, though 5 rows round 2.5 + 2.5 down to 4 (one row
    left); a pool fraction of 0 asks for no pool (rounded up to one row): both are refused, not trained on."""
    rows = [(f"q{k}?", f"best {k}", f"right {k}", f"wrong {k}") for k in range(5)]
    with pytest.raises(ValueError, match=r"need 0 <= test_fraction, 0 < pool_fraction and test_fraction \+ "
                                         rf"pool_fraction < 1, got test_fraction={test_fraction}, "
                                         rf"pool_fraction={pool_fraction}"):
        load_truthfulqa(write_truthfulqa(tmp_path / "tqa.csv", rows), test_fraction=test_fraction,
                        pool_fraction=pool_fraction)


def test_truthfulqa_tiny_pool_fraction_still_gives_one_pool_row(tmp_path):
    rows = [(f"q{k}?", f"best {k}", f"right {k}", f"wrong {k}") for k in range(3)]
    split = load_truthfulqa(write_truthfulqa(tmp_path / "tqa.csv", rows), test_fraction=0.0, pool_fraction=0.1)
    assert len(split.normal_train) == 2 and len(split.mismatch_pool) == 3


def test_truthfulqa_pool_never_holds_a_test_answer(tmp_path):
    """Every row lists all Best Answers as incorrect ones: the pool keeps none of the train or test answers."""
    everyone = "; ".join(f"best {k}" for k in range(10))
    rows = [(f"q{k}?", f"best {k}", f"right {k}", everyone) for k in range(10)]
    split = load_truthfulqa(write_truthfulqa(tmp_path / "tqa.csv", rows), test_fraction=0.2, pool_fraction=0.3)
    assert split.normal_test
    assert not {p.answer for p in split.normal_train + split.normal_test} & set(split.mismatch_pool)


def test_truthfulqa_pool_has_no_blank_answers(tmp_path):
    rows = [(f"q{k}?", f"best {k}", f"right {k};; ", f"wrong {k};") for k in range(10)]
    split = load_truthfulqa(write_truthfulqa(tmp_path / "tqa.csv", rows), test_fraction=0.2, pool_fraction=0.3)
    assert split.mismatch_pool and all(split.mismatch_pool)


@needs_truthfulqa
def test_truthfulqa_shared_file():
    split = load_truthfulqa(TRUTHFULQA)
    n = len(split.normal_train) + len(split.normal_test)
    assert n == 817 - round(0.3 * 817)
    assert len(split.mismatch_pool) > 1000
    assert not {p.answer for p in split.normal_train + split.normal_test} & set(split.mismatch_pool)
    assert all(";" not in a and a == a.strip() for a in split.mismatch_pool)


def test_utf8_files_with_a_byte_order_mark_load(tmp_path):
    """Windows tools (Excel, Notepad) write UTF-8 with a BOM: json.loads refused row 1 and the CSV's first column
    name carried it ('\\ufeffQuestion' is not 'Question')."""
    (tmp_path / "bom.jsonl").write_text('{"prompt": "p", "answer": "a"}\n', encoding="utf-8-sig")
    assert [(p.prompt, p.answer) for p in load_pairs(tmp_path / "bom.jsonl")] == [("p", "a")]
    with gzip.open(tmp_path / "bom.jsonl.gz", "wt", encoding="utf-8-sig") as f:
        f.write('{"rejected": "\\n\\nHuman: q\\n\\nAssistant: a"}\n')
    assert [(p.prompt, p.answer) for p in load_pairs(tmp_path / "bom.jsonl.gz")] == [("q", "a")]
    rows = "".join(f"q{k}?,best {k},right {k},wrong {k}\n" for k in range(4))
    (tmp_path / "bom.csv").write_text("Question,Best Answer,Correct Answers,Incorrect Answers\n" + rows,
                                      encoding="utf-8-sig")
    split = load_truthfulqa(tmp_path / "bom.csv", test_fraction=0.0, pool_fraction=0.25)
    assert len(split.normal_train) == 3 and {p.prompt for p in split.normal_train} < {"q0?", "q1?", "q2?", "q3?"}


def test_csv_rows_are_numbered_by_the_line_they_start_on(tmp_path):
    """Rows of a CSV are named by the file's 1-based line (the header is line 1, as in a spreadsheet), like the
    rows of a jsonl file; a quoted field that holds a newline moves the rows after it down a line."""
    path = tmp_path / "tqa.csv"
    path.write_text(TRUTHFULQA_HEADER + 'T,C,q1,"two\nlines",b,c,S\n\nT,C,q2,a,b,c,S\r\nT,C,q3,a,b,c,S\n')
    columns = ("Question", "Best Answer")
    assert [(row, record["Question"]) for row, record in read_csv(path, columns)] == [(2, "q1"), (5, "q2"), (6, "q3")]
    path.write_text(TRUTHFULQA_HEADER + 'T,C,q1,"two\nlines",b,c,S\nT,C,q2,a,b,c,S\nT,C,q3,a\n')
    with pytest.raises(DataError, match=r"tqa.csv: row 5: wrong number of fields"):
        load_truthfulqa(path)


def test_a_directory_given_as_a_data_file_is_named_as_one(tmp_path):
    """A directory (a dataset saved by `datasets`, say) was reported as 'not found' although it exists."""
    with pytest.raises(DataError, match=rf"{tmp_path}: is a directory, not a data file"):
        load_pairs(tmp_path)


def test_a_pipe_given_as_a_data_file_is_named_as_one(tmp_path):
    """A pipe (`--forget <(zcat pku.jsonl.gz)`) was reported as 'not found' although it exists; read once, it could
    not be read again after the format's detection."""
    os.mkfifo(tmp_path / "pipe")
    with pytest.raises(DataError, match=r"pipe: is not a regular file \(a pipe or a device\); write the data to"):
        load_pairs(tmp_path / "pipe")


def test_a_field_given_twice_in_a_row_is_an_error(tmp_path):
    """JSON keeps the last of two equal keys: one of the row's answers was dropped without a word."""
    path = tmp_path / "dup.jsonl"
    path.write_text('{"prompt": "p", "answer": "a"}\n{"prompt": "p", "answer": "kept", "answer": "lost"}\n')
    with pytest.raises(DataError, match=r"dup.jsonl: row 2: field 'answer' given twice"):
        load_pairs(path)


def test_a_lone_surrogate_in_a_field_names_the_row(tmp_path):
    """JSON's \\ud83d escape alone (half of an emoji cut by a truncation) is no text a tokenizer takes: it failed
    at tokenization with "TextEncodeInput must be Union[...]", naming no file, row or field."""
    path = tmp_path / "half.jsonl"
    path.write_text('{"prompt": "p", "answer": "a"}\n{"prompt": "p", "answer": "cut \\ud83d"}\n')
    with pytest.raises(DataError, match=r"half.jsonl: row 2: field 'answer' holds '\\ud83d', half of a UTF-16"):
        load_pairs(path)


def test_hh_turns_start_only_after_a_blank_line():
    """A turn starts after a blank line ("\\n\\n") and a colon: "Human:" after a single newline, "Human beings" after
    a blank line, or a blank answer followed by the next turn stay in the text they are part of."""
    assert hh_final_exchange("\n\nHuman: q\n\nAssistant: Say\nHuman: hi") == ("q", "Say\nHuman: hi")
    assert hh_final_exchange("\n\nHuman: q\n\nAssistant: One.\n\nHuman beings differ.") == \
        ("q", "One.\n\nHuman beings differ.")
    assert hh_final_exchange("\n\nHuman: q\n\nAssistant:   Like this.") == ("q", "Like this.")
    with pytest.raises(ValueError, match="does not end with an Assistant turn after a Human turn"):
        hh_final_exchange("\n\nHuman: q\n\nAssistant:\n\nHuman: and then?")


@pytest.mark.parametrize("transcript", ["\n\nAssistant: a", "Assistant: a\n\nAssistant: b"])
def test_hh_answer_without_a_human_turn_before_it_is_refused(transcript):
    """An Assistant turn with no Human turn before it has no prompt: a ValueError (a DataError naming the row)."""
    with pytest.raises(ValueError, match="does not end with an Assistant turn after a Human turn"):
        hh_final_exchange(transcript)


@pytest.mark.parametrize("flag", [0, 1, None])
def test_pku_flag_that_is_a_number_is_refused(tmp_path, flag):
    """JSON's 0 and 1 are not true and false: a flag written as a number is named, not read as a boolean."""
    path = write_jsonl(tmp_path / "pku.jsonl", [pku_row("p", "a", False, "b", flag)])
    with pytest.raises(DataError, match=r"pku.jsonl: row 1: field 'is_response_1_safe' must be true or false, got "
                                        rf"{flag!r}"):
        load_pku_saferlhf(path)


def test_files_with_nothing_to_forget_are_refused(tmp_path):
    """A PKU file whose responses are all safe, or an empty HH file, has no forget pair: a DataError naming it."""
    safe = write_jsonl(tmp_path / "safe.jsonl", [pku_row("p", "ok", True, "fine", True)])
    with pytest.raises(DataError, match=r"safe.jsonl: nothing to train on \(no unsafe response\)"):
        load_pku_saferlhf(safe)
    with pytest.raises(DataError, match=r"hh.jsonl.gz: nothing to train on \(no rows\)"):
        load_hh_rlhf(write_jsonl(tmp_path / "hh.jsonl.gz", ["", "  "], compress=True))


def test_format_detection_needs_the_formats_own_field(tmp_path):
    """A prompt alone tells no format (PKU is told by response_0, plain jsonl by answer); an empty file has none;
    a format that is not one of FORMATS is a ValueError naming it."""
    odd = write_jsonl(tmp_path / "odd.jsonl", [{"prompt": "p", "reply": "a"}])
    with pytest.raises(DataError, match=r"odd.jsonl: row 1: cannot tell the format from fields \['prompt', 'reply'\]"):
        detect_jsonl_format(odd)
    with pytest.raises(DataError, match=r"empty.jsonl: no rows$"):
        detect_jsonl_format(write_jsonl(tmp_path / "empty.jsonl", []))
    for fmt in ("csv", None, "AUTO"):
        with pytest.raises(ValueError, match=r"format must be 'auto' or one of \('pku', 'hh', 'jsonl'\), got"):
            load_pairs(odd, fmt)


@pytest.mark.parametrize("n", [0, 1, 2])
def test_truthfulqa_with_fewer_than_three_rows_is_refused(tmp_path, n):
    rows = [(f"q{k}?", f"best {k}", f"right {k}", f"wrong {k}") for k in range(n)]
    with pytest.raises(DataError, match=rf"tqa.csv: {n} rows; need at least 3 to split into train, test and pool"):
        load_truthfulqa(write_truthfulqa(tmp_path / "tqa.csv", rows), test_fraction=0.0, pool_fraction=0.3)


def test_truthfulqa_pool_excludes_normal_answers_written_with_surrounding_spaces(tmp_path):
    """A Best Answer with spaces around it (' best 1 ') is the normal answer 'best 1' that a pool row lists: it is
    left out of the pool like any other normal answer."""
    everyone = "; ".join(f"best {k}" for k in range(10))
    rows = [(f"q{k}?", f" best {k} ", f"right {k}", everyone) for k in range(10)]
    split = load_truthfulqa(write_truthfulqa(tmp_path / "tqa.csv", rows), test_fraction=0.2, pool_fraction=0.3)
    assert {p.answer for p in split.normal_train} <= {f" best {k} " for k in range(10)}
    assert not {p.answer.strip() for p in split.normal_train + split.normal_test} & set(split.mismatch_pool)


def test_truthfulqa_pairs_and_pool_keep_the_files_order(tmp_path):
    """Each split lists its rows in file order, and the pool its answers in the order the pool rows give them
    (Best, Correct, Incorrect; an answer given twice kept at its first place): the same seed gives the same lists."""
    rows = [(f"q{k}?", f"best {k}", f"right {k}; best {k}", f"wrong {k}; shared") for k in range(12)]
    split = load_truthfulqa(write_truthfulqa(tmp_path / "tqa.csv", rows), test_fraction=0.25, pool_fraction=0.25)
    row = {f"q{k}?": k + 2 for k in range(12)}    # the file's line of each question
    for pairs in (split.normal_train, split.normal_test):
        lines = [row[p.prompt] for p in pairs]
        assert lines == sorted(lines)
        assert [p.source for p in pairs] == [f"{tmp_path / 'tqa.csv'}:row {n}" for n in lines]
    normal = {p.prompt for p in split.normal_train + split.normal_test}
    pool_rows = sorted(k for k in range(12) if f"q{k}?" not in normal)
    assert len(pool_rows) == 3
    expected = [a for k in pool_rows for a in (f"best {k}", f"right {k}", f"wrong {k}", "shared")]
    assert split.mismatch_pool == list(dict.fromkeys(expected))


def test_truthfulqa_pairs_name_the_line_their_row_starts_on(tmp_path):
    """A quoted answer spanning two lines moves the rows after it down a line: each pair names its row's own line."""
    path = tmp_path / "tqa.csv"
    path.write_text(TRUTHFULQA_HEADER + 'T,C,q0?,"two\nlines",r,w,S\n' +
                    "".join(f"T,C,q{k}?,best {k},right {k},wrong {k},S\n" for k in range(1, 6)))
    split = load_truthfulqa(path, test_fraction=0.2, pool_fraction=0.2)
    line = {"q0?": 2, **{f"q{k}?": k + 3 for k in range(1, 6)}}
    pairs = split.normal_train + split.normal_test
    assert len(pairs) == 5
    assert all(p.source == f"{path}:row {line[p.prompt]}" for p in pairs)


@pytest.mark.parametrize("damage", ["cut short", "flipped byte"])
def test_a_damaged_gzipped_jsonl_file_is_a_data_error(tmp_path, damage):
    """A .gz cut short (a download or copy interrupted) raised a bare EOFError, one whose deflate stream has a
    flipped byte (a bad copy) zlib.error."""
    path = write_jsonl(tmp_path / "qa.jsonl.gz", [{"prompt": f"p{k}", "answer": "a" * 50} for k in range(50)],
                       compress=True)
    data = bytearray(path.read_bytes())
    if damage == "cut short":
        del data[-10:]
    else:
        deflate_start = data.index(0, 10) + 1 if data[3] & 8 else 10   # past the header's file name, if any
        data[deflate_start] ^= 0xFF   # an invalid block type
    path.write_bytes(bytes(data))
    with pytest.raises(DataError, match=r"qa.jsonl.gz: cannot be read as \(gzipped\) UTF-8 text"):
        load_pairs(path)


def test_pairs_keep_their_texts_as_written(tmp_path):
    """Whitespace around a prompt or an answer is kept (the template renders it): only a blank one is refused."""
    path = write_jsonl(tmp_path / "qa.jsonl", [{"prompt": "  p \n", "answer": " a\n"}])
    assert [(p.prompt, p.answer) for p in load_pairs(path)] == [("  p \n", " a\n")]


def test_a_question_on_two_rows_goes_to_one_split_with_both(tmp_path):
    """A csv of one's own that repeats a question (another answer, two versions concatenated) was split by row: the
    question could be trained on and held out at once."""
    rows = [(f"q{i}?", f"a{i}", f"c{i}", f"i{i}") for i in range(20)]
    path = write_truthfulqa(tmp_path / "tqa.csv", rows + [(q, f"{a} again", c, i) for q, a, c, i in rows])
    split = load_truthfulqa(path)
    train, test = ([p.prompt for p in pairs] for pairs in (split.normal_train, split.normal_test))
    assert train and test and not set(train) & set(test)
    assert sorted(train) == sorted(2 * sorted(set(train)))   # both rows of each question, together


def test_a_file_of_distinct_questions_splits_as_a_shuffle_of_its_rows(tmp_path):
    """Splitting by question leaves the split of TruthfulQA itself (distinct questions) as it was: a seeded shuffle of
    its rows, the pool's share first, then the test's."""
    import random
    path = write_truthfulqa(tmp_path / "tqa.csv", [(f"q{k}?", f"best {k}", f"right {k}", f"wrong {k}")
                                                     for k in range(10)])
    order = list(range(10))
    random.Random(4).shuffle(order)
    split = load_truthfulqa(path, test_fraction=0.2, pool_fraction=0.3, seed=4)
    assert [p.prompt for p in split.normal_test] == [f"q{k}?" for k in sorted(order[3:5])]
    assert [p.prompt for p in split.normal_train] == [f"q{k}?" for k in sorted(order[5:])]


def test_an_upper_case_gz_suffix_is_gunzipped(tmp_path):
    """Windows tools write 'TQA.CSV.GZ': taken for a csv by its suffix whatever the case, it was then read as plain
    text and refused as unreadable (a 'forget.jsonl.GZ' too)."""
    rows = [(f"q{k}?", f"best {k}", f"right {k}", f"wrong {k}") for k in range(6)]
    plain = write_truthfulqa(tmp_path / "tqa.csv", rows)
    (tmp_path / "TQA.CSV.GZ").write_bytes(gzip.compress(plain.read_bytes()))
    gunzipped, expected = load_truthfulqa(tmp_path / "TQA.CSV.GZ"), load_truthfulqa(plain)
    assert ([(p.prompt, p.answer) for p in gunzipped.normal_train]
            == [(p.prompt, p.answer) for p in expected.normal_train])
    assert gunzipped.mismatch_pool == expected.mismatch_pool
    (tmp_path / "forget.jsonl.GZ").write_bytes(gzip.compress(json.dumps({"prompt": "p", "answer": "a"}).encode()))
    assert [(p.prompt, p.answer) for p in load_pairs(tmp_path / "forget.jsonl.GZ")] == [("p", "a")]


def test_an_hh_transcript_with_carriage_return_line_breaks_is_refused_naming_them():
    """A file written with "\\r\\n" line breaks holds no turn that starts after "\\n\\n": the error named no turn
    problem the user could see in the text, now it names the carriage returns."""
    with pytest.raises(ValueError, match="this transcript breaks lines with '\\\\r'"):
        hh_final_exchange("\r\n\r\nHuman: how?\r\n\r\nAssistant: Like this.")
