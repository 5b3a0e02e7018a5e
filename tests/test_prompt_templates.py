"""Where a chat template's rendering puts an answer: the span ChatTemplate locates."""
import pytest

from fastalign.prompt_templates import ChatTemplate


class Llama2Chat:
    """Llama-2-chat's template, in Python: `' ' + content.strip()` after '[/INST]' (`trims`), or the content as
    given after that space."""
    chat_template = "stub"

    def __init__(self, trims: bool):
        self.trims = trims

    def apply_chat_template(self, messages, tokenize, add_generation_prompt=False):
        text = "<s>"
        for m in messages:
            content = m["content"].strip() if self.trims else m["content"]
            text += f"[INST] {content} [/INST]" if m["role"] == "user" else f" {content} </s>"
        return text


@pytest.mark.parametrize("answer", [" Sure, here is how.", "\n\tSure, here is how. ", "  Sure, here is how."])
def test_a_template_that_trims_the_answer_shows_the_stripped_answer_after_its_own_whitespace(answer):
    """Where the template trims the answer, the conversation is the stripped answer's: its leading whitespace is
    gone, and the space before it is the template's. The span was found on that space (' Sure' matched '] Sure'),
    so an answer that starts with a space met the template's whitespace at another seam than every other answer."""
    template = ChatTemplate(Llama2Chat(trims=True))
    rendered = template.render("Why?", answer)
    assert rendered == template.render("Why?", answer.strip())
    assert rendered.text[rendered.answer_start:rendered.answer_end] == answer.strip()
    assert rendered.text[rendered.space_start:rendered.answer_start] == " "


def test_a_template_that_keeps_the_answer_as_given_keeps_its_leading_whitespace():
    """Without trimming, the answer's own leading space is its text, after the template's."""
    rendered = ChatTemplate(Llama2Chat(trims=False)).render("Why?", " Sure.")
    assert rendered.text[rendered.answer_start:rendered.answer_end] == " Sure."
    assert rendered.text[rendered.space_start:rendered.answer_start] == " "
    assert rendered.text[:rendered.space_start].endswith("[/INST]")
