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


def first_stop(tok, lead, answer, stops, text_of, ends=None):
    """The first of `ends` (numbers of answer tokens; each one by default) whose text (text_of(tok, lead, ids, the
    tokens added since the end before)) holds a stop string, or None."""
    ends = range(1, len(answer) + 1) if ends is None else ends
    for before, n in zip([0] + list(ends), ends):
        if any(s in text_of(tok, lead, answer[:n], n - before) for s in stops):
            return n
    return None


def whole_text(tok, lead, ids, last):
    """The text of the whole answer, as first_stop's text_of (whatever the tokens added last)."""
    return text_after(tok, lead, ids)


def random_steps(rng, start, stop, first=1):
    """Ends of steps of 1 to 10 tokens (RAIN's token sets) from `start` to `stop`, the first of `first` or more."""
    ends = []
    while start < stop:
        start = min(start + rng.randrange(first, 11), stop)
        ends.append(start)
        first = 1
    return ends


def trap(tok, rng):
    """(answer, step ends, stop, the end of the step it opens): a random answer, then a run of special tokens and a
    step that opens with the tokenizer's longest token, and a stop across the run, from a character found nowhere
    else to that token's first: ending_text must find it in a window that holds the step's first token and what
    comes before, while the text of that token alone (in a window one token short) holds the stop and its margin."""
    longest = max(range(len(tok)), key=lambda i: len(tok.decode([i], skip_special_tokens=True)))
    size = len(tok.decode([longest], skip_special_tokens=True)) - CONTEXT
    assert size >= 2, "the tokenizer has no token long enough for the trap"
    before = random_answer(tok, rng, rng.randrange(60, 120)) + tok(" #", add_special_tokens=False)["input_ids"]
    special = [rng.choice(sorted(tok.all_special_ids)) for _ in range(rng.randrange(2 * CONTEXT, 3 * CONTEXT))]
    answer = before + special + [longest] + random_answer(tok, rng, rng.randrange(10, 40))
    at = len(before) + len(special)
    after = random_steps(rng, at, len(answer), first=2)
    shown = len(text_after(tok, [], answer[:at]))
    return answer, random_steps(rng, 0, at) + after, text_after(tok, [], answer)[shown - size + 1:shown + 1], after[0]


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
        expected = first_stop(tok, lead, answer, stops, whole_text)
        assert first_stop(tok, lead, answer, stops, lambda t, l, a, _: ending_text(t, l, a, longest)) == expected
        checked += expected is not None and expected > 2 * (longest + 3 * CONTEXT)   # found in a window
    assert checked > 0


@pytest.mark.parametrize("name", sorted(TOKENIZERS))
def test_a_string_any_token_of_a_step_completes_is_found_as_in_the_whole_text(name):
    """Answers added to in steps of 1 to 10 tokens (RAIN's token sets) end at the same step whether the whole text
    or only its end (ending_text with `last` the step's tokens) is read after each: random stops, and a trap that a
    window one token short of the step's first misses."""
    tok, rng = TOKENIZERS[name](), random.Random()
    trapped = 0
    for _ in range(12):
        answer, ends, stop, opened = trap(tok, rng)
        whole = text_after(tok, [], answer)
        size = rng.randrange(1, 16)
        start = rng.randrange(len(whole) // 2, len(whole) - size + 1)
        for stops in ([stop], [stop, whole[start:start + size]]):
            longest = max(map(len, stops))
            expected = first_stop(tok, [], answer, stops, whole_text, ends)
            found = first_stop(tok, [], answer, stops, lambda t, l, a, last: ending_text(t, l, a, longest, last), ends)
            assert found == expected
            trapped += stops == [stop] and expected == opened
    assert trapped >= 6
    with pytest.raises(ValueError, match="last"):
        ending_text(tok, [], answer, 5, 0)


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


def test_text_after_no_lead_decodes_once(monkeypatch):
    """With nothing before them (RAIN's stop checks of every answer shorter than a window), the ids' text costs one
    decode, not a decode of [] as well: 2 decodes per check before."""
    tok, rng = byte_bpe_tokenizer(), random.Random(7)
    answer = random_answer(tok, rng, 40)
    calls, real_decode = [], type(tok).decode

    def counting_decode(self, ids, *args, **kwargs):
        calls.append(ids)
        return real_decode(self, ids, *args, **kwargs)

    monkeypatch.setattr(type(tok), "decode", counting_decode)
    text = text_after(tok, [], answer)
    assert len(calls) == 1 and text == real_decode(tok, answer, skip_special_tokens=True)
    calls.clear()
    assert ending_text(tok, [], answer[:10], 5) == text_after(tok, [], answer[:10]) and len(calls) == 2
