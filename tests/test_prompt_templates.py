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


def test_special_texts_are_those_the_tokenizer_reads_as_control_tokens():
    """Every special token's text in a prompt or answer was refused as one the tokenizer reads as that control token,
    also where it reads it as text: with split_special_tokens=True (HF's switch for it), and for a pad token set to an
    ordinary character ('!', same id as the plain character), every row holding it. Those are not refused; the texts
    the tokenizer does read as control tokens still are."""
    import copy
    import random

    from fastalign.prompt_templates import refuse_special_text, special_texts
    from tests.unlearn.tiny import byte_bpe_tokenizer

    tokenizer = byte_bpe_tokenizer()
    bang = tokenizer.convert_tokens_to_ids("!")
    padded, split = copy.deepcopy(tokenizer), copy.deepcopy(tokenizer)
    padded.add_special_tokens({"pad_token": "!"})
    split.split_special_tokens = True
    assert padded.pad_token_id == bang and {"<s>", "</s>"} <= set(special_texts(tokenizer))
    assert special_texts(padded) == special_texts(tokenizer) and special_texts(split) == ()
    rng = random.Random(4)
    words = ["the", "capital", "of", "France", "is", "Paris", "use", "for", "strikethrough"]
    text = " ".join(rng.choice(words) for _ in range(6))
    refuse_special_text(special_texts(padded), "the answer", text + "!")
    assert padded(text + "!")["input_ids"] == tokenizer(text + "!")["input_ids"]
    refuse_special_text(special_texts(split), "the answer", text + " <s>")
    assert tokenizer.bos_token_id not in split(text + " <s>", add_special_tokens=False)["input_ids"]
    for reading in (tokenizer, padded):
        with pytest.raises(ValueError, match="the answer holds '<s>', the text of a special token"):
            refuse_special_text(special_texts(reading), "the answer", text + " <s>")
