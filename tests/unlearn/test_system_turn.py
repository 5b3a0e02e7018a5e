"""A system turn in ChatTemplate (`fastalign unlearn --chat-template --system TEXT`): every training example
reads the prompt that `fastalign eval --template chat --system TEXT` generates from, and the answer span, the
trained end of turn and the mismatch rows stay where they were."""
import pytest

from fastalign.data_files import DataError
from fastalign.evaluation.prompts import chat_prompt
from fastalign.prompt_templates import ChatTemplate, chat_option_problem
from fastalign.prompt_tokens import tokenize_texts
from fastalign.unlearn.config import UnlearnConfig
from fastalign.unlearn.encoding import encode_answers, encode_pairs
from fastalign.unlearn.records import QAPair
from fastalign.unlearn.run import load_streams
from tests.chat_families import family_tokenizer
from tests.evaluation.chat_model import CHAT_TEMPLATE as LLAMA3_TEMPLATE
from tests.evaluation.chat_model import EOT, SYSTEM, chat_tokenizer
from tests.unlearn.test_encoding import check_span
from tests.unlearn.tiny import FORGET_ROWS, NORMAL_ROWS, byte_bpe_tokenizer, write_jsonl, write_truthfulqa

ITEMS = [("Who is Bob?", "Hi the city"), ("Where does Alice live?", "Hello the sea")]
TOKENIZERS = {"llama3": chat_tokenizer, "byte_bpe": byte_bpe_tokenizer}   # BOS written by the template / added


def pairs(items):
    return [QAPair(p, a, f"test:row {i}") for i, (p, a) in enumerate(items, start=1)]


@pytest.mark.parametrize("system", [None, SYSTEM])
@pytest.mark.parametrize("name", TOKENIZERS)
def test_examples_start_with_the_prompt_eval_generates_from(name, system):
    """The text before the answer is eval's chat prompt, and the ids start with its one BOS: the Llama-3-like
    template writes its BOS, the tiny byte-BPE one writes none and the tokenizer adds it, in eval as here."""
    tokenizer = TOKENIZERS[name]()
    template = ChatTemplate(tokenizer, system=system)
    for (prompt, answer), example in zip(ITEMS, encode_pairs(tokenizer, template, pairs(ITEMS), 128)):
        rendered, shown = template.render(prompt, answer), chat_prompt(tokenizer, prompt, system)
        assert rendered.text[:rendered.answer_start] == shown
        assert rendered.text[rendered.answer_start:rendered.answer_end] == answer
        eval_ids = tokenize_texts(tokenizer, [shown])["input_ids"][0]
        assert example.input_ids[0] == eval_ids[0] == tokenizer.bos_token_id
        assert example.input_ids.count(tokenizer.bos_token_id) == 1
        check_span(tokenizer, rendered, example)


def test_a_system_text_that_holds_the_answer_does_not_move_the_span():
    tokenizer = byte_bpe_tokenizer()
    items = [("What is the capital?", "Paris"), ("Paris?", "Paris is the capital of France.")]
    template = ChatTemplate(tokenizer, system="Paris is the capital of France. Answer Paris.")
    for (prompt, answer), example in zip(items, encode_pairs(tokenizer, template, pairs(items), 128)):
        rendered = template.render(prompt, answer)
        assert rendered.text.index("<|assistant|>") < rendered.answer_start
        assert rendered.text[rendered.answer_start:rendered.answer_end] == answer
        assert rendered.text[rendered.answer_end:] == "</s>"
        check_span(tokenizer, rendered, example)


def test_answer_eos_and_mismatch_rows_after_a_system_turn():
    """The system turn ends with <|eot_id|> too: answer_eos trains the assistant turn's, after the answer, and
    mismatch answers (ids alone, the same with or without a system turn) keep the system turn of their prompt."""
    tokenizer = chat_tokenizer()
    template, eot = ChatTemplate(tokenizer, system=SYSTEM), tokenizer.convert_tokens_to_ids(EOT)
    plain = encode_pairs(tokenizer, template, pairs(ITEMS), 64)
    for old, new in zip(plain, encode_pairs(tokenizer, template, pairs(ITEMS), 64, answer_eos=True)):
        assert new.input_ids == old.input_ids and new.input_ids.count(eot) == 3
        assert old.input_ids[old.answer_end:] == (eot,) and eot not in old.input_ids[old.answer_start:old.answer_end]
        assert (new.answer_start, new.answer_end) == (old.answer_start, old.answer_end + 1)
    pool = encode_answers(tokenizer, template, ["Hello the sea"], answer_eos=True)
    assert pool == encode_answers(tokenizer, ChatTemplate(tokenizer), ["Hello the sea"], answer_eos=True)
    mixed = new.with_answer(pool[0], "mixed")
    assert mixed.input_ids[:mixed.answer_start] == new.input_ids[:new.answer_start]
    assert mixed.input_ids[mixed.answer_end - 1:] == (eot,)


def test_every_stream_reads_the_system_turn(tmp_path):
    """load_streams with system: the forget, mismatch and normal rows of a batch all start with the system turn,
    the normal rows the KL (and the cached reference) reads included."""
    tokenizer = byte_bpe_tokenizer()
    write_truthfulqa(tmp_path / "tqa.csv")
    config = UnlearnConfig(model="m", output_dir="o", chat_template=True, system=SYSTEM, batch_size=2,
                           mismatch_per_prompt=2, max_length=128, mismatch_pool=str(tmp_path / "tqa.csv"),
                           forget=[str(write_jsonl(tmp_path / "forget.jsonl", FORGET_ROWS))],
                           normal=str(write_jsonl(tmp_path / "normal.jsonl", NORMAL_ROWS)))
    system_turn = tuple(tokenize_texts(tokenizer, [f"<|system|>{SYSTEM}</s>"])["input_ids"][0])
    batch = load_streams(config, tokenizer).batch(0)
    assert (batch.num_forget, batch.num_mismatch, batch.num_normal) == (2, 4, 2)
    for example in batch.examples:
        assert example.input_ids[:len(system_turn)] == system_turn, example.source
        assert example.answer_start > len(system_turn)


def test_an_empty_system_text_is_a_system_turn_of_its_own():
    """system="" is an empty system turn, not none: Qwen2's template writes its default system prompt only where the
    conversation has no system turn, so an empty one is how a user leaves that default out (eval reads it alike)."""
    tokenizer = family_tokenizer("qwen2")
    assert "You are a helpful assistant." in ChatTemplate(tokenizer).prompt("Hi")
    empty = ChatTemplate(tokenizer, system="")
    assert empty.prompt("Hi").startswith("<|im_start|>system\n<|im_end|>\n<|im_start|>user\nHi")
    assert empty.prompt("Hi") == chat_prompt(tokenizer, "Hi", "")
    rendered = empty.render("Hi", "Hello")
    assert "You are a helpful assistant." not in rendered.text[:rendered.answer_start]


def test_answer_eos_reads_the_end_of_turn_under_the_callers_system_turn():
    """A template that refuses a conversation without a system turn: the end of turn answer_eos trains is read under
    the caller's template (with its system turn), so it is the template's <|eot_id|>, not an <|end_of_text|> put
    inside the turn (as it would be if read under the tokenizer's template alone, which refuses the probe)."""
    needs_system = ("{% if messages[0]['role'] != 'system' %}{{ raise_exception('a system turn is required') }}"
                    "{% endif %}" + LLAMA3_TEMPLATE)
    tokenizer = chat_tokenizer(chat_template=needs_system)
    template, eot = ChatTemplate(tokenizer, system=SYSTEM), tokenizer.convert_tokens_to_ids(EOT)
    plain = encode_pairs(tokenizer, template, pairs(ITEMS), 64)
    for old, new in zip(plain, encode_pairs(tokenizer, template, pairs(ITEMS), 64, answer_eos=True)):
        assert new.input_ids == old.input_ids and old.input_ids[old.answer_end:] == (eot,)
        assert (new.answer_start, new.answer_end) == (old.answer_start, old.answer_end + 1)
    pool, = encode_answers(tokenizer, template, ["Hello the sea"], answer_eos=True)
    assert pool.answer_ids[-1] == eot and tokenizer.eos_token_id not in pool.ids


def test_a_template_that_refuses_or_drops_a_system_turn_names_system():
    refuses = ("{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
               "{% endif %}" + LLAMA3_TEMPLATE)
    with pytest.raises(ValueError, match=r"system \(--system\) needs a chat template with a system role: "
                                         r".*System role not supported"):
        ChatTemplate(chat_tokenizer(chat_template=refuses), system=SYSTEM)
    ChatTemplate(chat_tokenizer(chat_template=refuses)).render("Who is Bob?", "Hi")   # fine without one
    drops = LLAMA3_TEMPLATE.replace("{% for m in messages %}", "{% for m in messages if m['role'] != 'system' %}")
    with pytest.raises(ValueError, match=r"system \(--system\) is not in the conversation .* drops the system"):
        ChatTemplate(chat_tokenizer(chat_template=drops), system=SYSTEM)
    with pytest.raises(ValueError, match="system must be a string or None, got 3"):
        ChatTemplate(chat_tokenizer(), system=3)


def test_a_row_the_template_refuses_is_an_error_naming_the_row():
    refuses = ("{% for m in messages %}{% if m['content'] == 'forbidden' %}{{ raise_exception('no such prompt') }}"
               "{% endif %}{% endfor %}" + LLAMA3_TEMPLATE)
    tokenizer = chat_tokenizer(chat_template=refuses)
    with pytest.raises(DataError, match="test:row 2: the tokenizer's chat template refused the conversation: no such"):
        encode_pairs(tokenizer, ChatTemplate(tokenizer), pairs([("Who is Bob?", "Hi"), ("forbidden", "Hi")]), 64)


def test_chat_options_without_the_chat_template_are_named_in_the_callers_words():
    """One rule for every layer (the config, `fastalign eval`/`rain`, rain_generate): a system turn and template
    variables need the chat template, a generation prefix cannot go before it; each names its own options."""
    assert chat_option_problem(False) is None and chat_option_problem(True, "Be brief.", {}) is None
    assert chat_option_problem(False, system="") == "system is a turn of the chat template: it needs chat_template=True"
    assert chat_option_problem(False, template_kwargs={}, names=("--system", "--chat-template-kwargs", None),
                               needs="--template chat, not raw") == \
        "--chat-template-kwargs are variables of the chat template: they need --template chat, not raw"
    assert chat_option_problem(True, generation_prefix="Q: 1+1? A: 2") == \
        "generation_prefix goes before the prompt's text, but the chat template starts the sequence: give " \
        "instructions as the system turn (system) instead"
    assert chat_option_problem(False, generation_prefix="Q: 1+1? A: 2") is None
