"""ending_text finds a string completed by the newest token exactly where the whole answer's text does (tokenizers
of several families, random answers with special tokens and characters split over byte tokens), and decodes a
number of tokens that does not grow with the answer."""
import random

import pytest

from fastalign.token_text import CONTEXT, ending_text, text_after
from tests.chat_families import family_tokenizer
from tests.rain.tiny import tokenizer as byte_bpe_tokenizer

TEXT = ("Mix flour, water and yeast, then bake it. Bob is a baker in the city; Alice lives by the sea.\n"
        "caf\u00e9 na\u00efve \u65e5\u672c\u8a9e \U0001F600 \u00fcber 12345 The answer is: (A) yes. ")
TOKENIZERS = {"byte_bpe": byte_bpe_tokenizer, **{name: lambda name=name: family_tokenizer(name)
                                                 for name in ("llama3", "qwen2", "mistral", "gemma")}}


def random_answer(tok, rng, length):
    """Pieces of real text, random ids (bytes that form no character) and special tokens, mixed."""
    text_ids = tok(TEXT * 3, add_special_tokens=False)["input_ids"]
    special, answer = sorted(tok.all_special_ids), []
    while len(answer) < length:
        kind = rng.random()
        if kind < 0.6:
            start = rng.randrange(len(text_ids))
            answer += text_ids[start:start + rng.randrange(1, 12)]
        elif kind < 0.9:
            answer += [rng.randrange(len(tok)) for _ in range(rng.randrange(1, 4))]
        else:
            answer += [rng.choice(special) for _ in range(rng.randrange(1, 4))]
    return answer[:length]


def first_stop(tok, lead, answer, stops, text_of):
    """The first number of answer tokens whose text (text_of) holds a stop string, or None."""
    for n in range(1, len(answer) + 1):
        if any(s in text_of(tok, lead, answer[:n]) for s in stops):
            return n
    return None


@pytest.mark.parametrize("name", sorted(TOKENIZERS))
def test_a_string_the_newest_token_completes_is_found_as_in_the_whole_text(name):
    """Stops drawn from the whole answer's text (spanning tokens, split characters, specials skipped inside them)
    end each answer at the same token whether the whole text or only its end is read at each token."""
    tok, rng = TOKENIZERS[name](), random.Random()
    checked = 0
    for _ in range(30):
        lead = tok(TEXT, add_special_tokens=False)["input_ids"][-rng.randrange(1, CONTEXT + 1):]
        answer = random_answer(tok, rng, rng.randrange(20, 160))
        whole = text_after(tok, lead, answer)
        stops = []
        for _ in range(rng.randrange(1, 4)):   # mostly from the answer's second half: found past its first windows
            size = rng.randrange(1, 16)
            last = max(len(whole) - size, 0)
            start = rng.randrange(min(len(whole) // 2, last) if rng.random() < 0.8 else 0, last + 1)
            stops.append(whole[start:start + size] or "x")
        longest = max(map(len, stops))
        expected = first_stop(tok, lead, answer, stops, text_after)
        assert first_stop(tok, lead, answer, stops, lambda t, l, a: ending_text(t, l, a, longest)) == expected
        checked += expected is not None and expected > 2 * (longest + 3 * CONTEXT)   # found in a window
    assert checked > 0


def test_the_tokens_decoded_do_not_grow_with_the_answer():
    """The end of a 600-token answer is read from about as many tokens as that of a 60-token one: a window of
    chars + CONTEXT tokens after CONTEXT more, widened (doubled) where its text is short."""
    tok = byte_bpe_tokenizer()
    answer = tok(TEXT * 12, add_special_tokens=False)["input_ids"]
    assert len(answer) >= 600
    chars, decoded = 5, []
    real_decode = type(tok).decode

    def counting_decode(self, ids, *args, **kwargs):
        decoded[-1] += len(ids)
        return real_decode(self, ids, *args, **kwargs)

    ends = []
    type(tok).decode = counting_decode
    try:
        for n in range(60, 601, 20):
            decoded.append(0)
            ends.append(ending_text(tok, [], answer[:n], chars))
    finally:
        type(tok).decode = real_decode
    for n, end in zip(range(60, 601, 20), ends):
        assert text_after(tok, [], answer[:n]).endswith(end) and len(end) >= chars
    # a window of w tokens decodes at most 3 (w + CONTEXT): its context, context + window, the window alone (where
    # the context reads otherwise at its start); its width chars + CONTEXT, doubled twice at most in this text (or
    # the answer itself, where shorter than two windows)
    widths = [(chars + CONTEXT) * 2 ** k for k in range(3)]
    assert max(decoded) <= sum(3 * (w + CONTEXT) for w in widths) < 600
