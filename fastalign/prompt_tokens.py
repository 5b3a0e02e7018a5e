"""Token ids of texts as a model reads them: with the tokenizer's special tokens, but one BOS where the text writes its
own (a chat template's rendering), and for a text the model continues, without the EOS a tokenizer appends to every
text. Unlearning's encodings, evaluation's and RAIN's prompts and judge prompts all tokenize with it.
"""
from __future__ import annotations

from typing import Sequence


def tokenize_texts(tokenizer, texts: Sequence[str], *, add_special_tokens: bool = True, **kwargs) -> dict:
    """`tokenizer(texts, add_special_tokens=..., **kwargs)` as a dict of per-text token lists, where a text
    that starts with the BOS token itself (a chat template's rendering, a model's own prompt format) keeps that
    one BOS, not the tokenizer's added one as well: a second BOS is a sequence the model never saw."""
    enc = tokenizer(list(texts), add_special_tokens=add_special_tokens, **kwargs)
    bos = getattr(tokenizer, "bos_token_id", None)
    if not add_special_tokens or bos is None:
        return dict(enc)
    drop = [int(list(ids[:2]) == [bos, bos]) for ids in enc["input_ids"]]
    return {key: [row[d:] for row, d in zip(rows, drop)] for key, rows in enc.items()}


def appends_eos(tokenizer) -> bool:
    """Whether the tokenizer ends every text it encodes with special tokens with its EOS (Llama's
    add_eos_token=True, a '$A </s>' post-processor), read off one encoding with and one without them."""
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        return False
    with_special, plain = (tokenizer("a", add_special_tokens=special)["input_ids"] for special in (True, False))
    return list(with_special[-1:]) == [eos] and list(plain[-1:]) != [eos]


def tokenize_prompts(tokenizer, texts: Sequence[str], *, add_special_tokens: bool = True) -> list[list[int]]:
    """Token ids of texts that a model continues (generation prompts, the judge prompt before its conversation), as
    tokenize_texts reads them (one BOS) but without the EOS a tokenizer appends to every text (`appends_eos`): a
    prompt ending with it asks the model to go on after the end of the sequence. An EOS the text writes stays."""
    ids = [list(row) for row in tokenize_texts(tokenizer, texts, add_special_tokens=add_special_tokens)["input_ids"]]
    if not add_special_tokens or not appends_eos(tokenizer):
        return ids
    return [row[:-1] if row[-1:] == [tokenizer.eos_token_id] else row for row in ids]
