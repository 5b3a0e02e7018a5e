"""Prompt files (evaluation/prompts.py read_prompts): the formats `fastalign eval` and `fastalign rain` share."""
import gzip
import json
import random

import pytest

from fastalign.evaluation.prompts import hh_messages, read_prompts
from fastalign.unlearn.formats import load_hh_rlhf

PROMPTS = ["How do I bake bread?", "Two lines:\nhere", 'A "quoted", comma']


def test_every_format_gives_the_same_prompts_in_file_order(tmp_path):
    jsonl = "".join(json.dumps({"q": p, "id": i}) + "\n" for i, p in enumerate(PROMPTS))
    (tmp_path / "p.jsonl").write_text(jsonl)
    with gzip.open(tmp_path / "p.jsonl.gz", "wt") as f:
        f.write(jsonl)
    (tmp_path / "p.csv").write_text("id,q\n" + "".join(f'{i},"{p.replace(chr(34), 2 * chr(34))}"\n'
                                                      for i, p in enumerate(PROMPTS)))
    (tmp_path / "p.txt").write_text("\n".join(p.replace("\n", "\\n") for p in PROMPTS[:1]) + "\n\n  \r\n"
                                    + "\r\n".join(p.replace("\n", "\\n") for p in PROMPTS[1:]) + "\r\n")
    for name in ("p.jsonl", "p.jsonl.gz", "p.csv", "p.txt"):  # also as Windows tools save them, after a BOM
        zipped = name.endswith(".gz")
        data = (tmp_path / name).read_bytes()
        text = b"\xef\xbb\xbf" + (gzip.decompress(data) if zipped else data)
        (tmp_path / f"bom-{name}").write_bytes(gzip.compress(text) if zipped else text)
        for path in (tmp_path / name, tmp_path / f"bom-{name}"):
            assert read_prompts(str(path), "q") == PROMPTS, path.name



def test_a_text_file_with_lone_carriage_return_line_ends_is_one_prompt_a_line(tmp_path):
    """Lines ended by a lone "\\r" (classic Mac exporters) were read as ONE prompt holding them all, silently, while
    the same file as jsonl gave one prompt a line. Every line end splits: "\\r\\n", "\\r" and "\\n"."""
    prompts = [f"prompt {i}: {random.random()}" for i in range(4)]
    (tmp_path / "p.txt").write_bytes(f"{prompts[0]}\r{prompts[1]}\r\n{prompts[2]}\n{prompts[3]}\r".encode())
    assert read_prompts(str(tmp_path / "p.txt")) == prompts

@pytest.mark.parametrize("name, content", [("p.csv.gz", "q\nhi\n"), ("p.json.gz", '[\n {"q": "hi"}\n]\n')])
def test_a_gzipped_csv_or_json_document_is_not_read_as_lines_of_text(tmp_path, name, content):
    """Read as text (gunzipped), their header or lines of JSON syntax became prompts."""
    with gzip.open(tmp_path / name, "wt") as f:
        f.write(content)
    with pytest.raises(ValueError, match="a JSON document, a gzipped csv or an upper-case suffix is not read"):
        read_prompts(str(tmp_path / name), "q")


@pytest.mark.parametrize("name, content, message", [
    ("p.jsonl", '{"q": "hi"}\n{"q": ""}\n', "row 2: field 'q' must not be blank, got ''"),
    ("p.jsonl", '{"q": "hi"}\n{"q": " \\n "}\n', "row 2: field 'q' must not be blank"),  # blank: none either
    ("p.jsonl", '{"q": "hi"}\n{"r": "x"}\n', r"row 2: missing field 'q' \(fields: \['r'\]\)"),
    ("p.jsonl", '{"q": "hi"}\n{"q": 3}\n', "row 2: field 'q' must be a string, got int"),
    ("p.jsonl", '{"q": "hi"}\n{"q": "hi"\n', "row 2: not valid JSON"),   # the same row, whichever check refuses it
    ("p.csv", 'q\nhi\n" "\n', "row 3: field 'q' must not be blank"),
    # a lone surrogate (JSON's escape of half a pair) was a TypeError from the tokenizer once the model had loaded
    ("p.jsonl", '{"q": "hi \\ud83d there"}\n', "row 1: field 'q' holds '\\\\ud83d', half of a UTF-16 surrogate pair"),
    ("p.csv", "r\nhi\n", r"missing column\(s\) \['q'\]; header is \['r'\]"),
    ("p.txt", "\n  \n", "no prompts"),
    # data files read as text gave their lines of syntax ('[', '{"q": ...},') or csv header as prompts
    ("p.json", '[\n {"q": "hi"}\n]\n', "a JSON document, a gzipped csv or an upper-case suffix is not read"),
    ("p.JSONL", '{"q": "hi"}\n', "a JSON document, a gzipped csv or an upper-case suffix is not read"),
])
def test_bad_files_name_the_file_and_row(tmp_path, name, content, message):
    (tmp_path / name).write_text(content)
    with pytest.raises(ValueError, match=message):
        read_prompts(str(tmp_path / name), "q")
    with pytest.raises(FileNotFoundError, match="prompts file not found"):
        read_prompts(str(tmp_path / "missing.jsonl"), "q")
    with pytest.raises(ValueError, match="is a directory, not a prompts file"):   # it was 'not found'
        read_prompts(str(tmp_path), "q")


@pytest.mark.parametrize("chosen", [None, 3, [{"role": "user", "content": "hi"}], "\ud83d"])
def test_an_hh_dialogue_that_is_no_text_is_refused_naming_the_row(tmp_path, chosen):
    """A 'chosen' of null, a number or a list of messages (as some exports of HH write it) was an AttributeError
    traceback; one with half a surrogate pair, a TypeError in the tokenizer."""
    (tmp_path / "hh.jsonl").write_text(json.dumps({"chosen": "\n\nHuman: Hi\n\nAssistant: x"}) + "\n"
                                       + json.dumps({"chosen": chosen}) + "\n")
    with pytest.raises(ValueError, match="hh.jsonl: row 2: field 'chosen' (must be a string|holds)"):
        hh_messages(str(tmp_path / "hh.jsonl"))


def test_an_hh_file_without_dialogues_is_refused(tmp_path):
    (tmp_path / "hh.jsonl").write_text("\n")
    with pytest.raises(ValueError, match="hh.jsonl: no dialogues"):
        hh_messages(str(tmp_path / "hh.jsonl"))


def test_an_hh_dialogue_with_carriage_return_line_breaks_is_refused_naming_them(tmp_path):
    """A dialogue broken by "\\r\\n" opens with no '\\n\\nHuman: ': the error now says why."""
    (tmp_path / "hh.jsonl").write_text(json.dumps({"chosen": "\r\n\r\nHuman: Hi\r\n\r\nAssistant: x"}) + "\n")
    with pytest.raises(ValueError, match="must start with a 'Human:' turn.*breaks lines with '\\\\r'"):
        hh_messages(str(tmp_path / "hh.jsonl"))


@pytest.mark.parametrize("chosen", ["\n\nAssistant: x\n\nHuman: Hi\n\nAssistant: y", "Hi\n\nAssistant: x"])
def test_an_hh_dialogue_that_does_not_open_with_a_human_turn_is_refused(tmp_path, chosen):
    """The message was cut at the length of '\\n\\nHuman: ': a dialogue opening otherwise lost its first characters
    (or was read from the Assistant's turn), silently."""
    (tmp_path / "hh.jsonl").write_text(json.dumps({"chosen": chosen}) + "\n")
    with pytest.raises(ValueError, match="hh.jsonl: row 1: 'chosen' must start with a 'Human:' turn"):
        hh_messages(str(tmp_path / "hh.jsonl"))


@pytest.mark.parametrize("opening", ["Human: ", "\n\nHuman:", "\n\nHuman: "])
def test_an_hh_dialogue_is_read_as_the_unlearning_loader_reads_it(tmp_path, opening):
    """Stored without its leading blank line, or 'Human:' without its space, a dialogue was refused ("must start
    with a 'Human:' turn") that `fastalign unlearn --forget` trains on (ed7b676): its request is now read, whole, so
    that the harmful rate is measured on the split unlearned."""
    request = f"Hi {random.randrange(10**6)}"
    chosen = f"{opening}{request}\n\nAssistant: x"
    (tmp_path / "hh.jsonl").write_text(json.dumps({"chosen": chosen, "rejected": chosen}) + "\n")
    assert hh_messages(str(tmp_path / "hh.jsonl")) == [pair.prompt for pair in load_hh_rlhf(tmp_path / "hh.jsonl")] \
        == [request]


@pytest.mark.parametrize("name", ["prompts.txt", "prompts.jsonl"])
def test_a_pathlib_path_is_read_as_its_string(tmp_path, name):
    """read_prompts(Path(...)) raised AttributeError ('PosixPath' object has no attribute 'endswith'), although
    read_answers and the unlearning loaders take paths."""
    path = tmp_path / name
    path.write_text("How?\n" if name.endswith(".txt") else json.dumps({"prompt": "How?"}) + "\n")
    assert read_prompts(path) == read_prompts(str(path)) == ["How?"]
