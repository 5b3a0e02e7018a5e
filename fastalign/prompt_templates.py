"""How a (prompt, answer) pair becomes one text, and where in that text the answer lies.

A template returns the rendered text, the character span of the answer and where the template's own whitespace
before the answer starts; the answer mask is later read off the tokenizer's offsets against that span, so no
text is ever decoded and tokenized again.
"""
from __future__ import annotations

import inspect
import warnings
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

SPEC_TEMPLATE = "### Question: {prompt}\n ### Answer: {answer}"


def special_texts(tokenizer) -> Tuple[str, ...]:
    """The texts of the tokenizer's special tokens (its added tokens marked special) that it reads, wherever a text
    holds one, as that control token (an end of text, a turn marker), not as text. None where it reads them all as
    text (split_special_tokens, HF's switch for it), nor one whose text it reads as text to that token's id alone (a
    pad token set to an ordinary character, '!'): the ids are those of the text either way."""
    if getattr(tokenizer, "split_special_tokens", False):
        return ()
    added = getattr(tokenizer, "added_tokens_decoder", None) or {}
    specials = {token_id: t.content for token_id, t in added.items() if getattr(t, "special", False) and t.content}
    if not specials:
        return ()
    as_text = tokenizer(list(specials.values()), add_special_tokens=False, split_special_tokens=True)["input_ids"]
    return tuple(sorted({text for (token_id, text), ids in zip(specials.items(), as_text) if list(ids) != [token_id]}))


def refuse_special_text(specials: Sequence[str], name: str, text: str) -> None:
    """ValueError naming `name` where `text`, a prompt or answer that a template renders, holds one of `specials`
    (special_texts): the model would read an end of text or a turn marker where the data has text (in an answer's
    span, a target that the loss trains; at its edges, a token the answer mask leaves out)."""
    held = [token for token in specials if token in text]
    if held:
        raise ValueError(f"{name} holds {held[0]!r}, the text of a special token of the tokenizer, which would read "
                         "it as that control token (an end of text, a turn marker), not as text; remove it")


@dataclass(frozen=True)
class RenderedPair:
    """A rendered example: its text and the answer's [start, end) character span. text[space_start:answer_start]
    is the template's whitespace before the answer (never the prompt's own trailing whitespace), where a
    mismatch example joins a prompt to another answer (unlearn.encoding.EncodedExample.with_answer)."""

    text: str
    answer_start: int
    answer_end: int
    space_start: int


class TextTemplate:
    """A plain format string with one `{prompt}` and one `{answer}` (default: SPEC §1's template).

    The placeholders are substituted literally, so braces inside prompts and answers are harmless. The template's
    own text may write special tokens; a prompt or answer that holds one's text is refused where the rendering meets
    the tokenizer (unlearn.encoding, `fastalign eval --template spec`), as with ChatTemplate.
    """

    def __init__(self, template: str = SPEC_TEMPLATE):
        if template.count("{answer}") != 1 or template.count("{prompt}") != 1:
            raise ValueError(f"template must contain '{{prompt}}' and '{{answer}}' exactly once each, got {template!r}")
        head, self._tail = template.split("{answer}")
        if "{prompt}" not in head:
            raise ValueError(f"template must put '{{prompt}}' before '{{answer}}', got {template!r}")
        self._head = head
        between = head.split("{prompt}")[1]
        self._space = len(between) - len(between.rstrip())
        self.template = template

    def render(self, prompt: str, answer: str) -> RenderedPair:
        head = self._head.replace("{prompt}", prompt)
        return RenderedPair(text=head + answer + self._tail, answer_start=len(head),
                            answer_end=len(head) + len(answer), space_start=len(head) - self._space)


class ChatTemplate:
    """The tokenizer's own chat template: a user turn with the prompt, an assistant turn with the answer, after
    a system turn `system` when given (the one `fastalign eval --template chat --system` prompts with, so that
    training and evaluation prompts match). `template_kwargs` are template variables (Qwen3's enable_thinking)
    passed to every rendering, the prompt's and the whole conversation's alike.

    The answer span is located after the text the template renders for the turns before the answer alone
    (with the generation prompt), so the answer is found where the assistant turn starts, not inside the
    prompt or the system text; a template that writes more than whitespace there (Qwen3's empty reasoning block
    before the last answer, which its generation prompt lacks unless enable_thinking is false) is a ValueError,
    as training would condition on text that evaluation never shows. The text is tokenized as `fastalign eval`
    tokenizes a chat prompt: with the tokenizer's special tokens, one BOS where the template writes its own
    (prompt_tokens.tokenize_texts), so that a template without a BOS trains on the BOS that evaluation prompts start
    with. A template that refuses a system turn, or drops its text, is a ValueError here. So is a system text, or a
    prompt asked (`prompt`), that holds a special token's text ("<|im_end|>" in a user prompt): the template writes
    the turn markers, and the tokenizer would read that text as the control token itself, a turn marker inside the
    turn (refuse_special_text; unlearn.encoding refuses such a training row, as it does with TextTemplate).
    """

    def __init__(self, tokenizer, system: Optional[str] = None, template_kwargs: Optional[dict] = None):
        if not getattr(tokenizer, "chat_template", None):
            name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
            raise ValueError(f"the tokenizer {name!r} has no chat template (tokenizer.chat_template is not set)")
        if system is not None and not isinstance(system, str):
            raise ValueError(f"ChatTemplate: system must be a string or None, got {system!r}")
        self._tokenizer = tokenizer
        self.system = system
        self.template_kwargs = _checked_kwargs(tokenizer, template_kwargs)
        if "enable_thinking" not in self.template_kwargs and _reads(tokenizer.chat_template, "enable_thinking"):
            warnings.warn("ChatTemplate: the chat template reads enable_thinking, which is not set: the model is asked "
                          "in its default mode (Qwen3's: thinking, each answer opening with its reasoning, which a "
                          "judge then reads too); set it with --chat-template-kwargs '{\"enable_thinking\": false}' "
                          "(template_kwargs=) to ask without", stacklevel=2)
        self._special_texts = special_texts(tokenizer)
        self._prompting_checked = False   # check_prompting's verdict, found once
        if system is not None:
            self._check_system()

    def _check_system(self) -> None:
        """Renders one prompt after the system turn: the template must accept it and show its text, which must
        hold no special token's text (read as that control token, as in a prompt)."""
        refuse_special_text(self._special_texts, "system (--system)", self.system)
        try:
            head = self._head("Hi")
        except ValueError as e:
            raise ValueError(f"system (--system) needs a chat template with a system role: {e}") from None
        if self.system.strip() not in head:
            raise ValueError("system (--system) is not in the conversation the chat template renders (the "
                             "template drops the system turn); leave it out or use a template that shows it")

    def _turns(self, prompt: str) -> list:
        system = [{"role": "system", "content": self.system}] if self.system is not None else []
        return system + [{"role": "user", "content": prompt}]

    def prompt(self, text: str) -> str:
        """`text` as the user turn (after the system turn), up to where the assistant's answer starts: what
        a chat model is asked (`fastalign eval --template chat`), and what precedes each answer in training.
        ValueError where the template cannot ask a model (check_prompting), or where `text` holds a special token's
        text (refuse_special_text)."""
        self.check_prompting()
        refuse_special_text(self._special_texts, "the prompt", text)
        return self._head(text)

    def check_prompting(self) -> None:
        """ValueError for a template that ignores add_generation_prompt and writes more than whitespace before the
        answer (an assistant header): the model would write that text itself, at the start of its answer. A property
        of the template, found on a probe message once per ChatTemplate (its tokenizer and variables are fixed), not
        rendered again for each prompt: a run checks it before it starts, not in each prompt's record."""
        if self._prompting_checked:
            return
        head = self._head("Hi")
        if head == self._render(self._turns("Hi")):   # the template ignores add_generation_prompt
            try:
                rendered = self._locate(head, "Hi", "Hi")
            except ValueError:   # no answer after the prompt: Mistral's puts the system turn in the last user turn
                pass
            else:
                self._refuse_text_before_answer(head, rendered, "", (
                    "the template ignores add_generation_prompt, so a prompt ends at the user's turn and the model "
                    "would write that text itself, at the start of its answer; use a chat template that writes a "
                    "generation prompt"))
        self._prompting_checked = True

    def _head(self, text: str) -> str:
        """The rendering of the turns before the answer, with the generation prompt where the template writes one."""
        return self._render(self._turns(text), add_generation_prompt=True)

    def _render(self, messages: list, add_generation_prompt: bool = False) -> str:
        """The conversation as text; a template that refuses it (jinja2's raise_exception) is a ValueError."""
        from jinja2 import TemplateError   # transformers renders chat templates with jinja2
        try:
            return self._tokenizer.apply_chat_template(messages, tokenize=False,
                                                       add_generation_prompt=add_generation_prompt,
                                                       **self.template_kwargs)
        except TemplateError as e:
            raise ValueError(f"the tokenizer's chat template refused the conversation: {e}") from None

    def render(self, prompt: str, answer: str) -> RenderedPair:
        head = self._head(prompt)
        rendered = self._locate(head, prompt, answer)
        self._refuse_text_before_answer(head, rendered, "chat_template (--chat-template): ", (
            "evaluation and RAIN prompt with the generation prompt (`fastalign eval`/`fastalign rain --template "
            "chat`), which does not end with it, so training would condition the answer on text they never show; pass "
            "template variables that make the generation prompt end with it (template_kwargs; for Qwen3: "
            "--chat-template-kwargs '{\"enable_thinking\": false}')"))
        return rendered

    @staticmethod
    def _refuse_text_before_answer(head: str, rendered: RenderedPair, where: str, why: str) -> None:
        """ValueError (after `where`, saying `why` it matters) where the conversation `rendered` holds more than
        whitespace between `head`, the turns before the answer, and the answer."""
        unseen = rendered.text[len(head):rendered.answer_start]
        if unseen.strip():
            raise ValueError(f"{where}the chat template writes {unseen!r} between the generation prompt and the "
                             f"answer: {why}")

    def _locate(self, head: str, prompt: str, answer: str) -> RenderedPair:
        """The conversation with `answer` as the assistant turn, and the answer's span: the first occurrence of the
        answer (or of its stripped text) after `head`, the rendering of the turns before it. Where the template
        trims the answer (the conversation reads as with the stripped answer), the stripped text: whitespace before
        it is the template's own (Llama-2-chat's `' ' + content.strip()`), not the answer's leading space, so a
        seam before the answer is read in the template's whitespace as for any other answer."""
        text = self._render(self._turns(prompt) + [{"role": "assistant", "content": answer}])
        stripped = answer.strip()
        trims = stripped != answer and text == self._render(self._turns(prompt) + [{"role": "assistant",
                                                                                     "content": stripped}])
        if text.startswith(head):
            for shown in (stripped,) if trims else (answer, stripped):  # many chat templates trim message contents
                start = text.find(shown, len(head))
                if start >= 0:   # the turns before the answer end with the template's markers, not the prompt
                    return RenderedPair(text=text, answer_start=start, answer_end=start + len(shown),
                                        space_start=len(text[:start].rstrip()))
        raise ValueError("chat_template (--chat-template): the rendered conversation does not contain the answer "
                         "verbatim after the turns before it (the chat template rewrites it); use the text template "
                         "(TextTemplate, --template) instead")


def chat_option_problem(chat: bool, system: Optional[str] = None, template_kwargs: Optional[dict] = None,
                        generation_prefix: Optional[str] = None, *,
                        names: Tuple[str, str, Optional[str]] = ("system", "chat_template_kwargs", "generation_prefix"),
                        needs: str = "chat_template=True") -> Optional[str]:
    """What is wrong with these options beside the chat template being on (`chat`) or off, or None: a system turn
    and template variables are the chat template's, and a generation prefix would go before the prompt's text, where
    the chat template starts the sequence. Each layer raises it as its own error, in its own `names` (of system,
    template_kwargs and generation_prefix) and its own way to turn the template on (`needs`)."""
    system_name, kwargs_name, prefix_name = names
    if system is not None and not chat:
        return f"{system_name} is a turn of the chat template: it needs {needs}"
    if template_kwargs is not None and not chat:
        return f"{kwargs_name} are variables of the chat template: they need {needs}"
    if generation_prefix and chat:
        return (f"{prefix_name} goes before the prompt's text, but the chat template starts the sequence: give "
                f"instructions as the system turn ({system_name}) instead")
    return None


def end_of_turn_id(tokenizer, template: Optional[ChatTemplate] = None) -> Optional[int]:
    """The token the tokenizer's chat template writes right after an assistant's answer (<|eot_id|>,
    <|im_end|>, <end_of_turn>, </s>), when it is one that answers never show (a special token); None without
    a chat template or when the template writes none there. `template`: the ChatTemplate the answers are rendered
    with (its system turn and variables); without one, the tokenizer's template with Qwen3's enable_thinking off
    where it reads that (the turn ends alike in either mode; unset, ChatTemplate would warn a caller who may not
    render chat prompts at all)."""
    if template is None:
        if not getattr(tokenizer, "chat_template", None):
            return None
        quiet = {"enable_thinking": False} if _reads(tokenizer.chat_template, "enable_thinking") else None
        template = ChatTemplate(tokenizer, template_kwargs=quiet)
    try:   # not render: a template refused for training (text before the answer) ends the turn as the others do
        rendered = template._locate(template._head("Hi"), "Hi", "Hello")
    except ValueError:   # a template that rewrites the answer or refuses this conversation
        return None
    ids = tokenizer(rendered.text[rendered.answer_end:].lstrip(), add_special_tokens=False)["input_ids"]
    return ids[0] if ids and not tokenizer.decode(ids[:1], skip_special_tokens=True) else None


def _reads(chat_template, variable: str) -> bool:
    """Whether the chat template's text (or any of its named templates) mentions `variable`."""
    texts = chat_template.values() if isinstance(chat_template, dict) else [chat_template]
    return any(isinstance(text, str) and variable in text for text in texts)


def _checked_kwargs(tokenizer, kwargs: Optional[dict]) -> dict:
    """`kwargs` as template variables for apply_chat_template (a copy; {} for None); ValueError naming them unless a
    mapping of text names none of which apply_chat_template takes itself or sets for the template (the
    conversation, add_generation_prompt, tokenize, ...: ChatTemplate sets those)."""
    if kwargs is None:
        return {}
    name = "template_kwargs (--chat-template-kwargs)"
    if not isinstance(kwargs, dict):
        raise ValueError(f"{name} must be a mapping of template variable names to values, got {kwargs!r}")
    taken = {"messages", "conversations"} | {p.name for p in inspect.signature(tokenizer.apply_chat_template)
                                             .parameters.values() if p.kind is not p.VAR_KEYWORD}
    for key in kwargs:
        if not isinstance(key, str):
            raise ValueError(f"{name}: template variable names must be texts, got {key!r}")
        if key in taken:
            raise ValueError(f"{name}: {key!r} is an argument of apply_chat_template or the conversation itself, "
                             "which ChatTemplate sets: not a template variable to pass")
    return dict(kwargs)
