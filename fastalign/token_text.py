"""The text that generated tokens add, and its end: what the stop rules of generation (a stop string, RAIN's new
turn) look for after each new token, without decoding the whole answer again at every token (that cost O(answer)
per token, O(answer^2) per answer).

A string that the newest token completes ends in that token's text, so it lies in the answer's last characters:
`ending_text` decodes a window of the last tokens, widened until the tokens before the newest one (or the newest
few: a RAIN token set adds up to 10 at once) hold the string's length and a margin (tokens that decode to no text,
special tokens and the first bytes of a character, widen it), each window read after the tokens before it as the
whole answer reads it.
"""
from typing import Sequence

# tokens decoded before a window (so that its first word reads as in context), and characters of margin past
# a string's length (what the newest token changes of the text before it, what a window's first token may misread)
CONTEXT = 8


def text_after(tokenizer, lead: Sequence[int], ids: Sequence[int]) -> str:
    """The text that `ids` add after `lead`. Decoding them alone would drop the space before the first word with a
    SentencePiece tokenizer (Llama 2's, Mistral's), and lead + ids would then read other than what the model
    wrote."""
    if not lead:   # nothing before ids (every answer shorter than a window): no decode of [] to read "" from
        return tokenizer.decode(list(ids), skip_special_tokens=True)
    before = tokenizer.decode(list(lead), skip_special_tokens=True)
    full = tokenizer.decode(list(lead) + list(ids), skip_special_tokens=True)
    return full[len(before):] if full.startswith(before) else tokenizer.decode(list(ids), skip_special_tokens=True)


def ending_text(tokenizer, lead: Sequence[int], ids: Sequence[int], chars: int, last: int = 1) -> str:
    """The end of text_after(tokenizer, lead, ids) holding every string of up to `chars` characters that ends in
    the text of one of the `last` tokens of `ids` (the tokens a step added: RAIN's token sets add up to 10), all of
    it where decoding `ids` costs no more than a window (a short answer)."""
    if last < 1:
        raise ValueError(f"ending_text: `last` (the newest tokens a string may end in) must be >= 1, got {last}")
    width = chars + CONTEXT + last - 1
    while 2 * (width + 2 * CONTEXT) < len(ids):   # a window's tokens: its context and itself, decoded twice
        cut = len(ids) - width
        context, window = ids[max(cut - CONTEXT, 0):cut], ids[cut:]
        if len(text_after(tokenizer, context, window[:-last])) >= chars + CONTEXT:
            return text_after(tokenizer, context, window)
        width *= 2
    return text_after(tokenizer, lead, ids)
