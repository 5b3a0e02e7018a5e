"""Template variables in ChatTemplate (`--chat-template-kwargs`), and the check that training reads the prompt that
evaluation and RAIN generate from: Qwen3's template writes an empty reasoning block before the last assistant
turn's answer, which its generation prompt holds only when enable_thinking is false."""
import re

import pytest

from fastalign import prompt_templates
from fastalign.data_files import DataError
from fastalign.evaluation.generation import eos_ids
from fastalign.evaluation.prompts import chat_prompt
from fastalign.prompt_templates import ChatTemplate, end_of_turn_id
from fastalign.prompt_tokens import tokenize_texts
from fastalign.unlearn.encoding import encode_answers, encode_pairs
from tests.chat_families import family_tokenizer
from tests.evaluation.chat_model import CHAT_TEMPLATE, EOT, SYSTEM, chat_tokenizer
from tests.unlearn.test_encoding import check_span
from tests.unlearn.test_system_turn import ITEMS, pairs

NO_THINKING = {"enable_thinking": False}
EMPTY_THINK = "<think>\n\n</think>\n\n"
# Llama 3's template with its assistant header never written: it ignores add_generation_prompt
IGNORES_GENERATION_PROMPT = CHAT_TEMPLATE.replace("{% if add_generation_prompt %}", "{% if false %}")


def test_a_template_that_trains_after_text_the_generation_prompt_lacks_is_refused():
    """With its default variables the Qwen3-style template asks the model with '<|im_start|>assistant\\n' (as
    `fastalign eval` and RAIN do) but renders every answer after an empty reasoning block: training would condition
    on text the model is never shown. Each row and pool answer is refused, naming the text and the fix; the end of
    turn that evaluation stops at is still found."""
    tokenizer = family_tokenizer("qwen3")
    assert chat_prompt(tokenizer, ITEMS[0][0]).endswith("<|im_start|>assistant\n")
    unseen = re.escape(repr(EMPTY_THINK))
    with pytest.raises(DataError, match=rf"test:row 1: chat_template \(--chat-template\): the chat template writes "
                                        rf"{unseen} between the generation prompt and the answer.*"
                                        r"--chat-template-kwargs '\{\"enable_thinking\": false\}'"):
        encode_pairs(tokenizer, ChatTemplate(tokenizer), pairs(ITEMS), 128)
    with pytest.raises(DataError, match=rf"mismatch pool answer 0: .* writes {unseen}"):
        encode_answers(tokenizer, ChatTemplate(tokenizer, system=SYSTEM), ["Hi"])
    assert end_of_turn_id(tokenizer) == tokenizer.convert_tokens_to_ids("<|im_end|>")


def test_a_system_turn_under_a_template_that_ignores_the_generation_prompt_is_not_blamed():
    """The system turn is checked on the turns before the answer, which such a template renders with the system's
    text: the template is accepted with a system turn and refused for prompting by its actual fault, where the check
    through the prompt blamed the system role ("needs a chat template with a system role")."""
    template = ChatTemplate(chat_tokenizer(IGNORES_GENERATION_PROMPT), SYSTEM)
    with pytest.raises(ValueError, match="between the generation prompt and the answer: the template ignores "
                                         "add_generation_prompt"):
        template.check_prompting()


def test_training_on_a_template_that_ignores_the_generation_prompt_names_the_training_option():
    """A training pair under such a template is refused with training's message, naming --chat-template and why
    training cannot condition on text that evaluation never shows, not prompting's, which names no option of
    `fastalign unlearn`."""
    template = ChatTemplate(chat_tokenizer(IGNORES_GENERATION_PROMPT))
    with pytest.raises(ValueError, match=r"^chat_template \(--chat-template\): the chat template writes .* between the "
                                         "generation prompt and the answer: evaluation and RAIN prompt"):
        template.render("Who is Bob?", "Hello")


def test_the_end_of_turn_of_a_template_that_ignores_the_generation_prompt_is_still_found():
    """end_of_turn_id reads the end of turn after an answer rendered from the turns before it, not through the
    prompt, which such a template cannot give: generation under it still stops at its end of turn (fastalign eval's
    stop ids read it for any tokenizer with a chat template, raw prompts too)."""
    tokenizer = chat_tokenizer(IGNORES_GENERATION_PROMPT)
    assert end_of_turn_id(tokenizer) == tokenizer.convert_tokens_to_ids(EOT)


@pytest.mark.parametrize("system", [None, SYSTEM])
def test_enable_thinking_false_trains_on_the_prompt_eval_generates_from(system):
    """With enable_thinking false the generation prompt ends with the reasoning block: each training text starts
    with exactly eval's chat prompt (text and tokens), the answer span covers the answer alone, and answer_eos
    trains the end of turn after it."""
    tokenizer = family_tokenizer("qwen3")
    template = ChatTemplate(tokenizer, system=system, template_kwargs=NO_THINKING)
    plain = encode_pairs(tokenizer, template, pairs(ITEMS), 128)
    with_eos = encode_pairs(tokenizer, template, pairs(ITEMS), 128, answer_eos=True)
    for (prompt, answer), example, ended in zip(ITEMS, plain, with_eos):
        rendered, shown = template.render(prompt, answer), chat_prompt(tokenizer, prompt, system, NO_THINKING)
        assert shown.endswith("<|im_start|>assistant\n" + EMPTY_THINK) and (system is None) == (SYSTEM not in shown)
        assert rendered.text[:rendered.answer_start] == shown
        assert rendered.text[rendered.answer_start:rendered.answer_end] == answer
        assert example.input_ids[:example.answer_start] == tuple(tokenize_texts(tokenizer, [shown])["input_ids"][0])
        check_span(tokenizer, rendered, example)
        assert tokenizer.decode(example.input_ids[example.answer_start:example.answer_end]) == answer
        assert tokenizer.decode(ended.input_ids[ended.answer_start:ended.answer_end]) == answer + "<|im_end|>"


def test_a_template_that_reads_enable_thinking_warns_unless_it_is_set(recwarn):
    """Qwen3's template asks in thinking mode unless told otherwise: `fastalign eval` and RAIN generated (and judged)
    its reasoning with no word of it. A warning names the variable and the flag; setting it either way, or a template
    without it, says nothing. Nor does finding the end of a turn: for answer_eos under the caller's template (which
    warned of an unset variable that was set), or for the end tokens of eval and RAIN, whatever template they render
    prompts with."""
    tokenizer = family_tokenizer("qwen3")
    with pytest.warns(UserWarning, match="ChatTemplate: the chat template reads enable_thinking, which is not set: .*"
                                         "--chat-template-kwargs '\\{\"enable_thinking\": false\\}'"):
        ChatTemplate(tokenizer)
    recwarn.clear()
    for thinking in (False, True):
        ChatTemplate(tokenizer, template_kwargs={"enable_thinking": thinking})
    ChatTemplate(family_tokenizer("llama3"))
    encode_pairs(tokenizer, ChatTemplate(tokenizer, template_kwargs=NO_THINKING), pairs(ITEMS), 128, answer_eos=True)
    assert eos_ids(None, tokenizer) == {tokenizer.eos_token_id, end_of_turn_id(tokenizer)}
    assert not [w for w in recwarn if "enable_thinking" in str(w.message)]


@pytest.mark.parametrize("kwargs, message", [
    (["enable_thinking"], " must be a mapping of template variable names to values, got ['enable_thinking']"),
    ({1: True}, ": template variable names must be texts, got 1"),
    *[({name: True}, f": {name!r} is an argument of apply_chat_template or the conversation itself")
      for name in ("tokenize", "add_generation_prompt", "conversation", "messages", "conversations", "return_dict",
                   "continue_final_message")],
])
def test_bad_template_kwargs_are_named(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(f"template_kwargs (--chat-template-kwargs){message}")):
        ChatTemplate(family_tokenizer("qwen3"), template_kwargs=kwargs)


def test_template_kwargs_are_a_copy_of_the_callers_mapping():
    """The variables are read when the template is built: a caller's later change to its mapping (or its reuse for
    another template) must not change how this template renders its prompts."""
    kwargs = {"enable_thinking": False}
    template = ChatTemplate(family_tokenizer("qwen3"), template_kwargs=kwargs)
    kwargs["enable_thinking"] = True
    assert template.template_kwargs == {"enable_thinking": False}


def test_a_template_variable_named_kwargs_is_a_variable_like_any_other():
    """apply_chat_template's **kwargs are where template variables go: the name of that catch-all is no argument of
    its own to refuse."""
    template = ChatTemplate(family_tokenizer("llama3"), template_kwargs={"kwargs": 1})
    assert template.template_kwargs == {"kwargs": 1}


def test_a_chat_template_of_named_templates_is_read_through_each():
    """A tokenizer's chat_template may be a mapping of named templates: a variable one of them reads is read."""
    assert prompt_templates._reads({"default": "{{ messages }}", "tool_use": "{% if enable_thinking %}{% endif %}"},
                            "enable_thinking")
    assert not prompt_templates._reads({"default": "{{ messages }}"}, "enable_thinking")
