"""answer_eos: every answer of the three streams ends with the tokenizer's EOS id as an answer token."""
import copy

import pytest

from fastalign.cli import build_parser
from fastalign.prompt_templates import ChatTemplate, TextTemplate, end_of_turn_id
from fastalign.unlearn.cli import config_from_args
from fastalign.unlearn.config import UnlearnConfig
from fastalign.unlearn.encoding import encode_answers, encode_pairs
from fastalign.unlearn.records import QAPair
from fastalign.unlearn.run import load_streams
from tests.evaluation.chat_model import EOT, chat_tokenizer
from tests.unlearn.tiny import (FORGET_ROWS, NORMAL_ROWS, byte_bpe_tokenizer, word_level_tokenizer, write_jsonl,
                                write_truthfulqa)

ITEMS = [("What is the capital?", "Paris"), ("How?", " 日本語のテキスト"),
         ("What is harmful?", "café 🙂 naïve")]


def pairs(items):
    return [QAPair(p, a, f"test:row {i}") for i, (p, a) in enumerate(items, start=1)]


@pytest.fixture
def data_files(tmp_path):
    write_truthfulqa(tmp_path / "tqa.csv")
    return {"forget": [str(write_jsonl(tmp_path / "forget.jsonl", FORGET_ROWS))],
            "normal": str(write_jsonl(tmp_path / "normal.jsonl", NORMAL_ROWS)),
            "mismatch_pool": str(tmp_path / "tqa.csv")}


def test_every_row_of_every_stream_ends_its_answer_with_eos(data_files):
    """Forget, mismatch and normal rows of a drawn batch: the EOS id is the last answer token, its position is
    a loss target, and the rest of each answer is what it was without answer_eos."""
    tokenizer = byte_bpe_tokenizer()
    eos = tokenizer.eos_token_id
    settings = dict(model="m", output_dir="o", batch_size=2, mismatch_per_prompt=3, max_length=64, **data_files)
    plain = load_streams(UnlearnConfig(**settings), tokenizer)
    streams = load_streams(UnlearnConfig(answer_eos=True, **settings), tokenizer)
    assert all(a.ids[-1] == eos and eos not in a.ids[:-1] for a in streams.pool)
    assert [(a.ids[:-1], a.lead) for a in streams.pool] == [(a.ids, a.lead) for a in plain.pool]
    for index in range(3):
        batch, before = streams.batch(index), plain.batch(index)
        assert (batch.num_forget, batch.num_mismatch, batch.num_normal) == (2, 6, 2)
        for row, (example, old) in enumerate(zip(batch.examples, before.examples)):
            assert example.input_ids[example.answer_end - 1] == eos, example.source
            assert example.input_ids[:example.answer_end - 1] == old.input_ids[:old.answer_end]
            assert example.input_ids[example.answer_end:] == old.input_ids[old.answer_end:]
            assert example.answer_start == old.answer_start
            mask = batch.tokens.target_mask[row]
            assert mask[example.answer_end - 2] and int(mask.sum()) == old.num_answer_targets + 1
            assert batch.tokens.input_ids[row, example.answer_end - 1] == eos


def test_off_by_default_leaves_encodings_unchanged():
    tokenizer, template = byte_bpe_tokenizer(), TextTemplate()
    assert UnlearnConfig().answer_eos is False
    default = encode_pairs(tokenizer, template, pairs(ITEMS), 64)
    assert default == encode_pairs(tokenizer, template, pairs(ITEMS), 64, answer_eos=False)
    assert all(tokenizer.eos_token_id not in e.input_ids for e in default)
    answers = [a for _, a in ITEMS]
    assert encode_answers(tokenizer, template, answers) == encode_answers(tokenizer, template, answers,
                                                                           answer_eos=False)


def test_eos_goes_before_a_text_templates_tail():
    tokenizer, template = byte_bpe_tokenizer(), TextTemplate("Q: {prompt} A:{answer}<end>")
    plain = encode_pairs(tokenizer, template, pairs(ITEMS), 64)
    for old, new in zip(plain, encode_pairs(tokenizer, template, pairs(ITEMS), 64, answer_eos=True)):
        end = old.answer_end
        assert new.input_ids == old.input_ids[:end] + (tokenizer.eos_token_id,) + old.input_ids[end:]
        assert (new.answer_start, new.answer_end) == (old.answer_start, old.answer_end + 1)


def test_chat_template_end_of_turn_eos_is_trained_not_doubled():
    """The tiny chat template closes each turn with </s>, the EOS token: answer_eos makes that one the last
    answer token and adds no second EOS; mismatch answers end the same way."""
    tokenizer = byte_bpe_tokenizer()
    template, eos = ChatTemplate(tokenizer), tokenizer.eos_token_id
    plain = encode_pairs(tokenizer, template, pairs(ITEMS), 64)
    for old, new in zip(plain, encode_pairs(tokenizer, template, pairs(ITEMS), 64, answer_eos=True)):
        assert new.input_ids == old.input_ids and old.input_ids[old.answer_end] == eos
        assert (new.answer_start, new.answer_end) == (old.answer_start, old.answer_end + 1)
    pool = encode_answers(tokenizer, template, ["Paris is the capital"], answer_eos=True)
    mixed = new.with_answer(pool[0], "mixed")
    assert mixed.input_ids[mixed.answer_end - 1] == eos and mixed.input_ids.count(eos) == new.input_ids.count(eos)


def test_chat_template_with_its_own_end_of_turn_token_trains_that_token():
    """Llama-3's template ends a turn with <|eot_id|>, not with its EOS <|end_of_text|>: answer_eos makes the
    <|eot_id|> the template writes the last answer token (what a chat model emits, and what eval and RAIN stop
    at), and puts no <|end_of_text|> inside the turn; mismatch answers end the same way, not doubled."""
    tokenizer = chat_tokenizer()
    template, eot = ChatTemplate(tokenizer), tokenizer.convert_tokens_to_ids(EOT)
    items = [("Who is Bob?", "Hi the city"), ("Where does Alice live?", "Hello the sea")]
    plain = encode_pairs(tokenizer, template, pairs(items), 64)
    for old, new in zip(plain, encode_pairs(tokenizer, template, pairs(items), 64, answer_eos=True)):
        assert new.input_ids == old.input_ids and old.input_ids[old.answer_end:] == (eot,)
        assert (new.answer_start, new.answer_end) == (old.answer_start, old.answer_end + 1)
    pool = encode_answers(tokenizer, template, ["Hello the sea"], answer_eos=True)
    assert pool[0].answer_ids == tuple(tokenizer("Hello the sea", add_special_tokens=False)["input_ids"]) + (eot,)
    mixed = new.with_answer(pool[0], "mixed")
    assert mixed.input_ids[mixed.answer_end - 1:] == (eot,) and tokenizer.eos_token_id not in mixed.input_ids


def test_a_text_template_ends_answers_with_eos_whatever_the_tokenizers_chat_template():
    """A text template writes no chat turn: answer_eos ends its answers with the tokenizer's EOS, not with the end of
    turn of the tokenizer's chat template (<|eot_id|>), which only a chat-template rendering puts after an answer."""
    tokenizer = chat_tokenizer()
    eos, eot = tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids(EOT)
    assert eos != eot
    items = [("Who is Bob?", "Hi the city")]
    old, = encode_pairs(tokenizer, TextTemplate(), pairs(items), 64)
    new, = encode_pairs(tokenizer, TextTemplate(), pairs(items), 64, answer_eos=True)
    assert new.input_ids == old.input_ids[:old.answer_end] + (eos,) + old.input_ids[old.answer_end:]
    assert new.answer_end == old.answer_end + 1 and eot not in new.input_ids
    pool, = encode_answers(tokenizer, TextTemplate(), ["Hello the sea"], answer_eos=True)
    assert pool.answer_ids[-1] == eos and eot not in pool.ids


def test_end_of_turn_is_the_special_token_after_the_template_s_whitespace_only():
    """Llama-2's template writes ' </s>' after an answer: the end of turn is the special token after that space (the
    space token is no end of turn); a template that ends a turn with plain text ('### End') has none to train."""
    turns = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}"
    prompt = "{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}"
    spaced, plain = copy.deepcopy(byte_bpe_tokenizer()), copy.deepcopy(byte_bpe_tokenizer())
    spaced.chat_template, plain.chat_template = turns + " </s>" + prompt, turns + "\n### End\n" + prompt
    assert end_of_turn_id(spaced) == spaced.eos_token_id
    assert end_of_turn_id(plain) is None


def test_an_end_of_turn_after_the_templates_whitespace_is_trained_through_that_whitespace():
    """Llama-2's template writes ' </s>' after an answer: answer_eos extends the span through the space to the </s>
    the template writes, and puts no second </s> right after the answer."""
    tokenizer = copy.deepcopy(byte_bpe_tokenizer())
    tokenizer.chat_template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }} </s>{% endfor %}"
                               "{% if add_generation_prompt %}assistant: {% endif %}")
    template, eos = ChatTemplate(tokenizer), tokenizer.eos_token_id
    plain = encode_pairs(tokenizer, template, pairs(ITEMS), 64)
    for old, new in zip(plain, encode_pairs(tokenizer, template, pairs(ITEMS), 64, answer_eos=True)):
        assert old.input_ids[old.answer_end] != eos and eos in old.input_ids[old.answer_end:]
        assert new.input_ids == old.input_ids and new.input_ids[new.answer_end - 1] == eos
        assert new.input_ids.count(eos) == old.input_ids.count(eos) == 2


def test_answer_cut_by_max_length_gets_no_eos():
    tokenizer = byte_bpe_tokenizer()
    cut, = encode_pairs(tokenizer, TextTemplate(), pairs([("short", "an answer that is long enough to be cut")]),
                        max_length=20, answer_eos=True)
    assert len(cut.input_ids) == 20 and tokenizer.eos_token_id not in cut.input_ids


def test_tokenizer_without_eos_is_an_error():
    tokenizer = word_level_tokenizer()
    assert tokenizer.eos_token_id is None
    assert encode_pairs(tokenizer, TextTemplate(), pairs([("What is harmful?", "harmful help")]), 64)
    with pytest.raises(ValueError, match="answer_eos needs a tokenizer with an end-of-sequence token"):
        encode_pairs(tokenizer, TextTemplate(), pairs([("What is harmful?", "harmful help")]), 64, answer_eos=True)
    with pytest.raises(ValueError, match="answer_eos needs a tokenizer with an end-of-sequence token"):
        encode_answers(tokenizer, TextTemplate(), ["harmful help"], answer_eos=True)


def test_command_line_and_config_values(capsys):
    parse = build_parser().parse_args
    assert config_from_args(parse(["unlearn", "--answer-eos"])).answer_eos is True
    assert config_from_args(parse(["unlearn", "--no-answer-eos"])).answer_eos is False
    assert config_from_args(parse(["unlearn"])).answer_eos is False
    with pytest.raises(ValueError, match="answer_eos must be true or false"):
        UnlearnConfig(answer_eos="yes")
    with pytest.raises(SystemExit):
        parse(["unlearn", "--help"])
    assert "end-of-sequence" in capsys.readouterr().out
