"""Token ids of texts as a model reads them: with the tokenizer's special tokens, but one BOS where the text writes its
own (a chat template's rendering), and for a text the model continues, without the end marker a tokenizer appends to
every text (an EOS, a BERT-style [SEP]). Unlearning's encodings, evaluation's and RAIN's prompts and judge prompts all
tokenize with it.
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


def appended_ids(tokenizer) -> list[int]:
    """The ids the tokenizer puts after every text it encodes with special tokens: its EOS where it appends one
    (Llama's add_eos_token=True, T5's '$A </s>'), BERT's [SEP] ('[CLS] $A [SEP]', which no eos_token names), none
    for most; read off one encoding with and one without special tokens, as what follows the text's own ids."""
    text = _ordinary_text(tokenizer)
    with_special, plain = (list(tokenizer(text, add_special_tokens=special)["input_ids"]) for special in (True, False))
    for start in range(len(with_special) - len(plain) + 1):
        if with_special[start:start + len(plain)] == plain:
            return with_special[start + len(plain):]
    return []


def _ordinary_text(tokenizer) -> str:
    """A text that the tokenizer encodes to some ids of its own: the text of its first vocabulary entry that is no
    special token and encodes so. A fixed text may have none: "a" encodes to nothing in a BPE of Cyrillic text alone
    without an unknown token, and then what follows its ids was never read (an appended EOS stayed in prompts)."""
    specials = set(tokenizer.all_special_ids)
    for token_id in range(len(tokenizer)):
        text = "" if token_id in specials else tokenizer.decode([token_id])
        if text and tokenizer(text, add_special_tokens=False)["input_ids"]:
            return text
    raise ValueError("tokenizer: none of its vocabulary entries but its special tokens encodes to ids of its own, so "
                     "what it appends to every text cannot be read off an encoding")


def tokenize_prompts(tokenizer, texts: Sequence[str], *, add_special_tokens: bool = True) -> list[list[int]]:
    """Token ids of texts that a model continues (generation prompts, the judge prompt before its conversation), as
    tokenize_texts reads them (one BOS, a [CLS]) but without what a tokenizer appends to every text (`appended_ids`:
    an EOS, a [SEP]): a prompt ending with it asks the model to go on after the end of the sequence. An EOS the text
    writes stays."""
    ids = [list(row) for row in tokenize_texts(tokenizer, texts, add_special_tokens=add_special_tokens)["input_ids"]]
    end = appended_ids(tokenizer) if add_special_tokens else []
    return [row[:-len(end)] if end and row[-len(end):] == end else row for row in ids]
