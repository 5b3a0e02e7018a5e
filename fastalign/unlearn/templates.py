"""How a (prompt, answer) pair becomes one text, and where in that text the answer lies.

A template returns the rendered text, the character span of the answer and where the template's own whitespace
before the answer starts; the answer mask is later read off the tokenizer's offsets against that span, so no
text is ever decoded and tokenized again.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

SPEC_TEMPLATE = "### Question: {prompt}\n ### Answer: {answer}"


@dataclass(frozen=True)
class RenderedPair:
    """A rendered example: its text and the answer's [start, end) character span. text[space_start:answer_start]
    is the template's whitespace before the answer (never the prompt's own trailing whitespace), where a
    mismatch example joins a prompt to another answer (encoding.EncodedExample.with_answer)."""

    text: str
    answer_start: int
    answer_end: int
    space_start: int


class TextTemplate:
    """A plain format string with one `{prompt}` and one `{answer}` (default: SPEC §1's template).

    The placeholders are substituted literally, so braces inside prompts and answers are harmless.
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
    training and evaluation prompts match).

    The answer span is located after the text the template renders for the turns before the answer alone
    (with the generation prompt), so the answer is found where the assistant turn starts, not inside the
    prompt or the system text. The text is tokenized as `fastalign eval` tokenizes a chat prompt: with the
    tokenizer's special tokens, one BOS where the template writes its own (encoding.tokenize_texts), so that a
    template without a BOS trains on the BOS that evaluation prompts start with. A template that refuses a
    system turn, or drops its text, is a ValueError here. So is a prompt or answer that holds a special token's
    text ("<|im_end|>" in a user prompt): the template writes the turn markers, and the tokenizer would read that
    text as the control token itself, a turn marker inside the turn or an end of turn inside the answer span.
    """

    def __init__(self, tokenizer, system: Optional[str] = None):
        if not getattr(tokenizer, "chat_template", None):
            name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
            raise ValueError(f"the tokenizer {name!r} has no chat template (tokenizer.chat_template is not set)")
        if system is not None and not isinstance(system, str):
            raise ValueError(f"ChatTemplate: system must be a string or None, got {system!r}")
        self._tokenizer = tokenizer
        self.system = system
        added = getattr(tokenizer, "added_tokens_decoder", None) or {}
        self._special_texts = sorted({t.content for t in added.values() if getattr(t, "special", False) and t.content})
        if system is not None:
            self._check_system()

    def _check_system(self) -> None:
        """Renders one prompt after the system turn: the template must accept it and show its text, which must
        hold no special token's text (read as that control token, as in a prompt)."""
        self._refuse_special_text("system (--system)", self.system)
        try:
            head = self.prompt("Hi")
        except ValueError as e:
            raise ValueError(f"system (--system) needs a chat template with a system role: {e}") from None
        if self.system.strip() not in head:
            raise ValueError("system (--system) is not in the conversation the chat template renders (the "
                             "template drops the system turn); leave it out or use a template that shows it")

    def _refuse_special_text(self, name: str, text: str) -> None:
        held = [token for token in self._special_texts if token in text]
        if held:
            raise ValueError(f"{name} holds {held[0]!r}, the text of a special token of the tokenizer: in the chat "
                             "template it would be read as that control token (a turn marker, an end of turn), not "
                             "as text; remove it")

    def _turns(self, prompt: str) -> list:
        system = [{"role": "system", "content": self.system}] if self.system is not None else []
        return system + [{"role": "user", "content": prompt}]

    def prompt(self, text: str) -> str:
        """`text` as the user turn (after the system turn), up to where the assistant's answer starts: what
        a chat model is asked (`fastalign eval --template chat`), and what precedes each answer in training."""
        return self._render(self._turns(text), add_generation_prompt=True)

    def _render(self, messages: list, add_generation_prompt: bool = False) -> str:
        """The conversation as text; a template that refuses it (jinja2's raise_exception) is a ValueError."""
        from jinja2 import TemplateError   # transformers renders chat templates with jinja2
        try:
            return self._tokenizer.apply_chat_template(messages, tokenize=False,
                                                       add_generation_prompt=add_generation_prompt)
        except TemplateError as e:
            raise ValueError(f"the tokenizer's chat template refused the conversation: {e}") from None

    def render(self, prompt: str, answer: str) -> RenderedPair:
        for name, text in (("the prompt", prompt), ("the answer", answer)):
            self._refuse_special_text(name, text)
        head = self.prompt(prompt)
        text = self._render(self._turns(prompt) + [{"role": "assistant", "content": answer}])
        if text.startswith(head):
            for shown in (answer, answer.strip()):  # many chat templates trim message contents
                start = text.find(shown, len(head))
                if start >= 0:   # the turns before the answer end with the template's markers, not the prompt
                    return RenderedPair(text=text, answer_start=start, answer_end=start + len(shown),
                                        space_start=len(text[:start].rstrip()))
        raise ValueError("chat_template (--chat-template): the rendered conversation does not contain the answer "
                         "verbatim after the turns before it (the chat template rewrites it); use the text template "
                         "(TextTemplate, --template) instead")


def end_of_turn_id(tokenizer) -> Optional[int]:
    """The token the tokenizer's chat template writes right after an assistant's answer (<|eot_id|>,
    <|im_end|>, <end_of_turn>, </s>), when it is one that answers never show (a special token); None without
    a chat template or when the template writes none there."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    try:
        rendered = ChatTemplate(tokenizer).render("Hi", "Hello")
    except ValueError:   # a template that rewrites the answer or refuses this conversation
        return None
    ids = tokenizer(rendered.text[rendered.answer_end:].lstrip(), add_special_tokens=False)["input_ids"]
    return ids[0] if ids and not tokenizer.decode(ids[:1], skip_special_tokens=True) else None
