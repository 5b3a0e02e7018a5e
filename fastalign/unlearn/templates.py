"""How a (prompt, answer) pair becomes one text, and where in that text the answer lies.

A template returns the rendered text and the character span of the answer; the answer mask is later
read off the tokenizer's offsets against that span, so no text is ever decoded and tokenized again.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

SPEC_TEMPLATE = "### Question: {prompt}\n ### Answer: {answer}"


@dataclass(frozen=True)
class RenderedPair:
    """A rendered example: its text, the answer's [start, end) character span, whether to add BOS/EOS."""

    text: str
    answer_start: int
    answer_end: int
    add_special_tokens: bool


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
        self.template = template

    def render(self, prompt: str, answer: str) -> RenderedPair:
        head = self._head.replace("{prompt}", prompt)
        return RenderedPair(text=head + answer + self._tail, answer_start=len(head),
                            answer_end=len(head) + len(answer), add_special_tokens=True)


class ChatTemplate:
    """The tokenizer's own chat template: a user turn with the prompt, an assistant turn with the answer.

    The answer span is located after the text the template renders for the user turn alone (with the
    generation prompt), so the answer is found where the assistant turn starts, not inside the prompt.
    """

    def __init__(self, tokenizer):
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("ChatTemplate: the tokenizer has no chat_template; use TextTemplate instead")
        self._tokenizer = tokenizer

    def render(self, prompt: str, answer: str) -> RenderedPair:
        user = [{"role": "user", "content": prompt}]
        head = self._tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
        text = self._tokenizer.apply_chat_template(user + [{"role": "assistant", "content": answer}],
                                                   tokenize=False)
        if text.startswith(head):
            for shown in (answer, answer.strip()):  # many chat templates trim message contents
                start = text.find(shown, len(head))
                if start >= 0:
                    return RenderedPair(text=text, answer_start=start, answer_end=start + len(shown),
                                        add_special_tokens=False)
        raise ValueError("ChatTemplate: the rendered conversation does not contain the answer verbatim after "
                         "the user turn (the chat template rewrites it); use TextTemplate instead")


def end_of_turn_id(tokenizer) -> Optional[int]:
    """The token the tokenizer's chat template writes right after an assistant's answer (<|eot_id|>,
    <|im_end|>, <end_of_turn>, </s>), when it is one that answers never show (a special token); None without
    a chat template or when the template writes none there."""
    from jinja2 import TemplateError
    if not getattr(tokenizer, "chat_template", None):
        return None
    try:
        rendered = ChatTemplate(tokenizer).render("Hi", "Hello")
    except (ValueError, TemplateError):   # a template that rewrites the answer or refuses this conversation
        return None
    ids = tokenizer(rendered.text[rendered.answer_end:].lstrip(), add_special_tokens=False)["input_ids"]
    return ids[0] if ids and not tokenizer.decode(ids[:1], skip_special_tokens=True) else None
