"""Token ids and answer spans of rendered pairs, read from a fast tokenizer's character offsets.

A token belongs to the answer when its character span overlaps the answer's: a token that straddles the
template/answer boundary (a BPE merge of the template's trailing space with the answer's first word, a
multi-byte character split over several byte tokens) counts as answer, special tokens never do (see answer_tokens).
The answer tokens are then one contiguous range [answer_start, answer_end) of the ids: a prompt or answer that holds
a special token's text, which would put that control token inside the range or at its edges, is refused.

A mismatch example (a forget prompt with a pool answer) is put together on token ids, at a seam in the template's
whitespace before the answer where no token of either side crosses: that whitespace is one token with the
answer's first word or apart from it depending on the word (a digit stands apart in Llama-3's tokenizer), or,
where nothing but whitespace stands between prompt and answer, one token with the prompt's last character
(Llama-3's '?\n'). The earliest seam both sides share is taken, each side bringing its own part of the
whitespace, and the pool answer brings the template's tail as tokenized after it (a token may also join an
answer's end to the tail: '.\n'), so the ids are those of the template's rendering of that prompt with that
answer.

With answer_eos, every answer also ends with an end token as an answer token (so the objective holds the
model's chance of stopping after an answer): the tokenizer's end-of-sequence id, or with a chat template
that ends a turn with its own token (Llama-3's <|eot_id|>) that one, which chat models emit and generation
stops at. It is placed on the token ids, never pasted into the text, so it does not depend on how a
tokenizer parses special-token text.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Sequence

from fastalign.data_files import DataError
from fastalign.ops.checks import refuse_one_string
from fastalign.prompt_templates import (ChatTemplate, RenderedPair, end_of_turn_id, refuse_special_text,
                                       special_texts)
from fastalign.prompt_tokens import tokenize_texts
from fastalign.unlearn.records import QAPair


@dataclass(frozen=True)
class EncodedExample:
    """Token ids of one example; ids[answer_start:answer_end] are its answer tokens.

    seams: where another answer may take over from this example's prompt, earliest first: (d, k) where no token
    crosses the character d characters before the answer, inside the template's whitespace before it, and
    ids[:k] are the tokens before that character. The template's whitespace (the space after "### Answer:") is
    tokenized with the answer's first token or apart from it depending on that token (Llama-3's tokenizer keeps a
    digit apart from the space before it), or with the prompt's last character, so the seams differ from
    example to example. None where they were not read (examples built by hand): answer_start is the seam.
    answer_cut: max_length cut the answer short (`truncated`), so the example trains on part of it.
    """

    input_ids: tuple[int, ...]
    answer_start: int
    answer_end: int
    source: str
    seams: tuple[tuple[int, int], ...] | None = None
    answer_cut: bool = False

    @property
    def prompt_end(self) -> int:
        """Where the earliest seam cuts the ids (answer_start where the seams were not read)."""
        return self.seams[0][1] if self.seams else self.answer_start

    @property
    def num_answer_targets(self) -> int:
        """How many answer tokens are predicted by an earlier position (the first token never is)."""
        return max(0, self.answer_end - max(self.answer_start, 1))

    def seam_with(self, seams: tuple[tuple[int, int], ...] | None) -> tuple[int, int]:
        """(cut, start): this example's ids[:cut] followed by a pool answer's ids[start:] are the ids of this prompt
        with that answer, whose seams are `seams`, at the earliest seam both read (this example's prompt_end and
        the start of the answer's ids where either was built by hand). A DataError if they share none: no ids of
        that pair can be put together."""
        if self.seams is None or seams is None:
            return self.prompt_end, 0
        theirs = dict(seams)
        for d, cut in self.seams:
            if d in theirs:
                return cut, theirs[d]
        raise DataError(f"{self.source}: the tokenizer joins the text before the answer to the template's whitespace "
                        "before it in a way some mismatch pool answers cannot follow on token ids; set "
                        "mismatch_weight=0 (--mismatch-weight 0), or, with the text template (--template, not a chat "
                        "template), put text between {prompt} and {answer}")

    def with_answer(self, answer: "PoolAnswer", source: str) -> "EncodedExample":
        """This example's prompt around another answer (a mismatch example): the ids the template's rendering of
        this prompt with that answer tokenizes to, put together from the two encodings at a seam (seam_with) and
        ending with the answer's own tail (this example's tail where the answer was built by hand)."""
        cut, start = self.seam_with(answer.seams)
        end = len(answer.ids) if answer.end is None else answer.end
        tail = self.input_ids[self.answer_end:] if answer.end is None else ()
        return EncodedExample(self.input_ids[:cut] + answer.ids[start:] + tail, cut + answer.lead - start,
                              cut + end - start, source)

    def ending_with(self, end_id: int) -> "EncodedExample":
        """This example with end_id as its last answer token. Where the template already puts end_id after the
        answer (a chat template's end of turn, a tokenizer that appends EOS), the span is extended through its
        first one, with whatever the template renders between them; otherwise end_id is inserted right after
        the answer, before the template's tail."""
        tail = self.input_ids[self.answer_end:]
        if end_id in tail:
            return dataclasses.replace(self, answer_end=self.answer_end + tail.index(end_id) + 1)
        return dataclasses.replace(self, input_ids=self.input_ids[:self.answer_end] + (end_id,) + tail,
                                   answer_end=self.answer_end + 1)

    def fits(self, max_length: int) -> bool:
        """Whether an answer token is left to predict within the first max_length tokens."""
        return min(self.answer_end, max_length) > max(self.answer_start, 1)

    def truncated(self, max_length: int) -> "EncodedExample":
        """The first max_length tokens; a DataError if no answer token is left to predict."""
        cut = self
        if len(self.input_ids) > max_length:
            cut = dataclasses.replace(self, input_ids=self.input_ids[:max_length],
                                      answer_end=min(self.answer_end, max_length),
                                      answer_cut=self.answer_cut or self.answer_end > max_length)
        if not cut.fits(max_length):
            raise DataError(f"{self.source}: the prompt takes {self.answer_start} tokens, which leaves no answer "
                            f"token to predict within max_length={max_length}; shorten the prompt, raise max_length "
                            "(--max-length), or leave such rows out with skip_long_prompts=True (--skip-long-prompts)")
        return cut


def require_fast_tokenizer(tokenizer) -> None:
    """Raises unless the tokenizer can return character offsets (a Hugging Face 'fast' tokenizer)."""
    if not getattr(tokenizer, "is_fast", False):
        raise TypeError(f"need a fast tokenizer (offsets of each token), got {type(tokenizer).__name__}; "
                        "load it with AutoTokenizer.from_pretrained(..., use_fast=True)")


def eos_token_id(tokenizer) -> int:
    """The tokenizer's end-of-sequence id; a ValueError if it has none (answer_eos needs one)."""
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        raise ValueError(f"answer_eos needs a tokenizer with an end-of-sequence token, but "
                         f"{type(tokenizer).__name__}.eos_token_id is None; set tokenizer.eos_token or turn "
                         "answer_eos off")
    return int(eos)


def answer_end_id(tokenizer, template) -> int:
    """The token answer_eos ends every answer with: a chat template's end of turn where it writes one
    (<|eot_id|>, <|im_end|>: the model's own end of an answer, already in the template's tail), else the
    tokenizer's end of sequence (a ValueError if it has none)."""
    turn_end = end_of_turn_id(tokenizer, template) if isinstance(template, ChatTemplate) else None
    return eos_token_id(tokenizer) if turn_end is None else turn_end


# Texts per batched tokenizer call in encode_rendered: the tokenizer's encodings and the per-token lists it returns
# (ids, offset pairs) take several times the memory of the ids kept; a call over a whole data set held them all.
ENCODE_CHUNK = 4096


def encode_rendered(tokenizer, rendered: Sequence[RenderedPair], sources: Sequence[str], *,
                    end_id: int | None = None) -> list[EncodedExample]:
    """Tokenizes rendered pairs in batched calls of ENCODE_CHUNK texts, with the tokenizer's special tokens, and
    reads their answer spans; with end_id (answer_eos), each answer ends with it (see EncodedExample.ending_with).
    A rendering that starts with the BOS token itself (a chat template's) keeps that one BOS (see tokenize_texts),
    as the prompts of `fastalign eval` do."""
    require_fast_tokenizer(tokenizer)
    out = []
    for start in range(0, len(rendered), ENCODE_CHUNK):
        chunk = rendered[start:start + ENCODE_CHUNK]
        enc = tokenize_texts(tokenizer, [r.text for r in chunk], return_offsets_mapping=True,
                             return_attention_mask=False)
        answers = answer_tokens(tokenizer, enc, [(r.answer_start, r.answer_end) for r in chunk])
        for r, source, ids, offsets, inside in zip(chunk, sources[start:], enc["input_ids"], enc["offset_mapping"],
                                                   answers):
            if not inside:
                raise DataError(f"{source}: the answer produced no token")
            example = EncodedExample(tuple(ids), inside[0], inside[-1] + 1, source,
                                     _seams(r, offsets[:inside[0] + 1]))
            out.append(example if end_id is None else example.ending_with(end_id))
    return out


def answer_tokens(tokenizer, encoding: dict, spans: Sequence[tuple[int, int]]) -> list[list[int]]:
    """For each text of `encoding` (a tokenization with offset_mapping), the positions of the tokens of its answer,
    the characters [start, end) of its span in `spans`: those whose characters overlap the answer's, but no special
    token (added with special=True; an answer's end token is put on the ids, EncodedExample.ending_with). A chat
    marker added with rstrip=True (Phi-3's <|assistant|>) takes the whitespace after it, an answer's leading space
    included, and one with lstrip=True the whitespace before it, yet the answer never writes it. The unknown token
    stands for the text's own characters: it stays answer."""
    special = {i for i, token in tokenizer.added_tokens_decoder.items() if token.special} - {tokenizer.unk_token_id}
    return [[k for k, (token, (a, b)) in enumerate(zip(ids, offsets))
             if b > a and b > start and a < end and token not in special]
            for ids, offsets, (start, end) in zip(encoding["input_ids"], encoding["offset_mapping"], spans)]


def _seams(rendered: RenderedPair, offsets: Sequence[tuple[int, int]]) -> tuple[tuple[int, int], ...]:
    """EncodedExample.seams, from the offsets of the tokens up to the answer's first one: each character from the
    start of the template's whitespace to the answer's that no token crosses."""
    spans = [(a, b) for a, b in offsets if b > a]
    return tuple((rendered.answer_start - c, 1 + max((k for k in range(len(offsets) - 1) if offsets[k][1] <= c),
                                                     default=-1))
                 for c in range(rendered.space_start, rendered.answer_start + 1)
                 if all(b <= c or a >= c for a, b in spans))


def _render(tokenizer, template, pairs: Sequence[tuple[str, str]], sources: Sequence[str]) -> list[RenderedPair]:
    """Each (prompt, answer) as the template renders it; a DataError naming the source of one it refuses, or whose
    prompt or answer holds a special token's text (refuse_special_text), with any template: the answer span then
    holds no special token, which answer_tokens leaves out."""
    specials = special_texts(tokenizer)
    rendered = []
    for (prompt, answer), source in zip(pairs, sources):
        try:
            refuse_special_text(specials, "the prompt", prompt)
            refuse_special_text(specials, "the answer", answer)
            rendered.append(template.render(prompt, answer))
        except ValueError as e:
            raise DataError(f"{source}: {e}") from None
    return rendered


def encode_pairs(tokenizer, template, pairs: Sequence[QAPair], max_length: int, *,
                 skip_too_long: bool = False, answer_eos: bool = False) -> list[EncodedExample]:
    """Encodes QAPairs with a template, truncating to max_length. A pair whose prompt or answer holds a special
    token's text is a DataError naming its row (_render). A pair whose prompt leaves no answer token
    within max_length is a DataError naming its row, or, with skip_too_long, left out (the caller can count
    the pairs it lost). answer_eos: end each answer with `answer_end_id` (an answer cut by max_length loses
    it, as it did not end there)."""
    if max_length < 2:
        raise ValueError(f"max_length must be at least 2, got {max_length}")
    sources = [p.source for p in pairs]
    rendered = _render(tokenizer, template, [(p.prompt, p.answer) for p in pairs], sources)
    encoded = encode_rendered(tokenizer, rendered, sources,
                              end_id=answer_end_id(tokenizer, template) if answer_eos else None)
    return [e.truncated(max_length) for e in encoded if e.fits(max_length) or not skip_too_long]


@dataclass(frozen=True)
class PoolAnswer:
    """A mismatch pool answer as the template tokenizes it after a prompt, from its earliest seam
    (EncodedExample.seams) on: `lead` tokens of the template's whitespace that stand apart from it, the answer's
    tokens up to `end`, then the template's tail as tokenized after it. Built by hand (plain ids): no seams,
    end None (ids end with the answer; the forget example's tail follows it)."""

    ids: tuple[int, ...]
    lead: int = 0
    end: int | None = None
    seams: tuple[tuple[int, int], ...] | None = None

    @property
    def answer_ids(self) -> tuple[int, ...]:
        return self.ids[self.lead:self.end]


# Pool answers are rendered after this stand-in prompt, not an empty one: what a tokenizer puts at the start of a
# text (Llama-2's '▁') then lands before it, as in a forget example, not in the seam before the answer.
_POOL_PROMPT = "x"


def encode_answers(tokenizer, template, answers: Sequence[str], *, answer_eos: bool = False) -> list[PoolAnswer]:
    """Answers as the template tokenizes them after a prompt (for mismatch examples); with answer_eos they end
    with `answer_end_id`, as the answers of encode_pairs(..., answer_eos=True) do."""
    refuse_one_string("answers", answers)   # each character would be a pool answer
    sources = [f"mismatch pool answer {i}" for i in range(len(answers))]
    rendered = _render(tokenizer, template, [(_POOL_PROMPT, a) for a in answers], sources)
    encoded = encode_rendered(tokenizer, rendered, sources,
                              end_id=answer_end_id(tokenizer, template) if answer_eos else None)
    return [PoolAnswer(e.input_ids[e.prompt_end:], e.answer_start - e.prompt_end, e.answer_end - e.prompt_end,
                       tuple((d, k - e.prompt_end) for d, k in e.seams)) for e in encoded]
