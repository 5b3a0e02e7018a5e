"""Text rules of the search: where a rollout stops, when an answer ends, what the judge reads.

The reference decodes the whole token state and checks its last character; decoding only a short tail
gives the same last character at a fraction of the cost (the full text is decoded only when the tail
decodes to nothing, e.g. special tokens). Likewise a new turn a rollout's newest token opens ends in that token's
text: only the answer's end is read for it (token_text.ending_text).
"""
from typing import AbstractSet, List, Sequence

from fastalign.prompt_templates import ChatTemplate
from fastalign.prompt_tokens import tokenize_prompts
from fastalign.token_text import ending_text

from .config import RainConfig
from .judge import encode_piece

TAIL_TOKENS = 8


def last_char(tokenizer, state: Sequence[int]) -> str:
    text = tokenizer.decode(list(state[-TAIL_TOKENS:]), skip_special_tokens=True)
    if not text:
        text = tokenizer.decode(list(state), skip_special_tokens=True)
    return text[-1:] if text else ""


def answer_text(tokenizer, state: Sequence[int], answer_start: int) -> str:
    return tokenizer.decode(list(state[answer_start:]), skip_special_tokens=True)


def after_prefix(tokenizer, prefix: str, prefix_ids: Sequence[int], text: str) -> List[int]:
    """Token ids of a prompt's `text` as the model reads it after the generation `prefix` (`prefix_ids`: the
    prefix's own, with the tokenizer's BOS; none without a prefix): those of prefix + text tokenized as one, after
    the prefix's ids where it starts with them (the engines compute the prefix once for all prompts), else the text
    as it reads inside a text (`encode_piece`). Tokenized alone, a SentencePiece tokenizer's text starts with "▁":
    the model read a space between prefix and prompt that neither holds."""
    joined = tokenize_prompts(tokenizer, [prefix + text])[0]
    if joined[:len(prefix_ids)] == list(prefix_ids):
        return joined[len(prefix_ids):]
    return encode_piece(tokenizer, text)


def cut_at_turn(answer: str, turn_marker: str) -> str:
    """The answer up to (excluding) a new user turn."""
    if turn_marker and turn_marker in answer:
        return answer[:answer.index(turn_marker)]
    return answer


def has_new_turn(answer: str, turn_marker: str) -> bool:
    return bool(turn_marker) and turn_marker in answer


def rollout_stops(tokenizer, config: RainConfig, ctx, state: Sequence[int]) -> bool:
    """The simulation stops before drawing when the text ends in a stop character, the sequence is at its
    maximum length, or the answer has opened a new user turn.

    `state` without its last token opened none (a rollout stopped there, and starts at a leaf that is not
    terminal): a new turn ends in the last token's text, so only the answer's end is decoded (the whole answer, at
    every rollout token, cost O(answer) per token). The answer's end, where it holds text, gives the last character
    too: one decode per token of a short answer, where the state's tail was decoded again for it."""
    if len(state) >= ctx.max_length:
        return True
    marker = config.turn_marker
    end = ending_text(tokenizer, [], state[ctx.answer_start:], len(marker))
    char = end[-1:] or last_char(tokenizer, state)
    if char and char in config.rollout_stop_chars:    # "" (no text yet) is in every string: it is no stop
        return True
    return has_new_turn(end, marker)


def judge_input(judge, tokenizer, end_ids: AbstractSet[int], config: RainConfig, ctx, state: Sequence[int],
                leaf_len: int):
    """What the judge reads for `state` (the leaf's state of length `leaf_len`, then the rollout).

    Returns (reply text, base, ids): the judge input is judge.prefix_ids + head_ids + BASE + ids + suffix,
    where base "leaf" = the generated tokens down to the leaf and "head" = nothing. The judge reads the
    model's own tokens (its end tokens `end_ids` dropped), so its inputs form a tree that mirrors the search
    tree. A reply cut before a new user turn keeps the model's tokens that end before the cut; only the text
    between the last of them and the cut is tokenized anew (base "leaf" when the cut lies in the rollout,
    "head" when it lies in the leaf's own tokens)."""
    answer_ids = list(state[ctx.answer_start:])
    answer = tokenizer.decode(answer_ids, skip_special_tokens=True)
    reply = cut_at_turn(answer, config.turn_marker)
    if reply == answer:
        return reply, "leaf", judge_path_ids(state[leaf_len:], end_ids)
    kept = len(answer_ids)
    while kept and not reply.startswith(tokenizer.decode(answer_ids[:kept], skip_special_tokens=True)):
        kept -= 1
    rest = reply[len(tokenizer.decode(answer_ids[:kept], skip_special_tokens=True)):]
    tail = judge.head_ids(rest) if rest else []
    path = leaf_len - ctx.answer_start
    if kept >= path:
        return reply, "leaf", judge_path_ids(answer_ids[path:kept], end_ids) + tail
    return reply, "head", judge_path_ids(answer_ids[:kept], end_ids) + tail


def judge_path_ids(tokens: Sequence[int], end_ids: AbstractSet[int]) -> List[int]:
    """A node's tokens as the judge reads them (the end tokens `end_ids` dropped)."""
    return [t for t in tokens if t not in end_ids]


def reply_lead(tokenizer, judge, template: ChatTemplate) -> str:
    """What the judge's dialogue needs before a chat answer so that it reads as in the few-shot examples
    ("Assistant: Sure"): " " when the answer's first token, as the chat template writes it, brings no space of
    its own (a byte-level BPE after the template's newlines: "Sure", read "Assistant:Sure"), else "" (a
    SentencePiece "▁Sure", a dialogue that ends in whitespace, a template whose answer cannot be found)."""
    dialogue = judge.dialogue_text("Hi")
    if dialogue[-1:].isspace():
        return ""
    try:
        rendered = template.render("Hi", "Sure")     # the answer's first token reads "Sure", "S", " Sure", ...
    except ValueError:
        return ""
    head, whole = tokenize_prompts(tokenizer, [template.prompt("Hi"), rendered.text[:rendered.answer_end]])
    if len(whole) <= len(head) or list(whole[:len(head)]) != list(head):
        return ""
    dialogue_ids = judge.head_ids(dialogue)
    before, after = tokenizer.decode(dialogue_ids), tokenizer.decode(dialogue_ids + [whole[len(head)]])
    shown = after[len(before):] if after.startswith(before) else ""
    return " " if shown and "Sure".startswith(shown) else ""
