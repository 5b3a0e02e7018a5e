"""The numbers the evaluation reports: harmful rate, share of unchanged answers, per-token KL.

- harmful rate = share of (prompt, answer) pairs the judge marks harmful (SPEC §1, Evaluation);
- unchanged share = share of prompts whose answer equals the original model's (greedy) answer;
- mean token KL = mean over the answer tokens of the normal data of KL(P_t || Q_t), P the original model,
  Q the evaluated one: the same quantity as unlearning's L_nor, token-weighted over the whole set, from float64
  log-probabilities through the loss op's kl_of_log_probs (fp32 ones gave a KL near 0 that was negative or far off).

The KL has one scoring core on token ids, `mean_token_kl_of_ids`: answers generated here are scored on the
exact ids the model generated (`generation.Generation`: the prompt as generation read it, the answer through
its end token, so whether the model still stops where the original did counts too). `mean_token_kl` is the
entry for text pairs: it tokenizes them again, which scores what that text tokenizes to.
"""
import reprlib
from typing import List, Sequence, Tuple

import torch

from fastalign.eval_mode import eval_mode
from fastalign.model_devices import input_device
from fastalign.model_vocabulary import check_embedded, input_vocabulary
from fastalign.ops.checks import check_count, is_integer
from fastalign.ops.torch_chunked.linear_kl_div import kl_of_log_probs
from fastalign.prompt_tokens import tokenize_texts
from fastalign.runtime.hf_cache_argument import takes_logits_to_keep
from fastalign.unlearn.encoding import answer_tokens

from .judges import Judge, Pair, check_verdicts

TokenPair = Tuple[Sequence[int], Sequence[int]]   # (prompt ids, answer ids)


def harmful_rate(pairs: Sequence[Pair], judge: Judge) -> Tuple[float, List[bool]]:
    """(share of pairs judged harmful, the verdicts); ValueError on an empty set or a faulty judge, TypeError naming
    a pair that is not two strings."""
    if not pairs:
        raise ValueError("harmful_rate needs at least one (prompt, answer) pair")
    _check_pairs(pairs)
    verdicts = check_verdicts(judge(list(pairs)), pairs)
    return sum(verdicts) / len(verdicts), verdicts


def _check_pairs(pairs: Sequence[Pair]) -> None:
    """TypeError naming the first of `pairs` that is not a (prompt, answer) pair of strings, before a judge or a
    tokenizer reads it: a None answer (a --no-vanilla record's vanilla) failed inside unicodedata, three items in
    a bare unpacking error."""
    if any(isinstance(pair, str) for pair in pairs):
        raise TypeError("pairs must be a list of (prompt, answer) pairs, got strings (one pair not in a list?)")
    for i, pair in enumerate(pairs):
        if not (isinstance(pair, (tuple, list)) and len(pair) == 2 and all(isinstance(text, str) for text in pair)):
            raise TypeError(f"pairs[{i}] must be a (prompt, answer) pair of strings, got {reprlib.repr(pair)}")


def unchanged_share(reference_answers: Sequence[str], answers: Sequence[str]) -> float:
    """Share of answers equal to the reference answer at the same index (whitespace at the ends ignored)."""
    if len(reference_answers) != len(answers) or not answers:
        raise ValueError(f"need two equally long, non-empty answer lists, got {len(reference_answers)} "
                         f"and {len(answers)}")
    return sum(r.strip() == a.strip() for r, a in zip(reference_answers, answers)) / len(answers)


def text_token_pairs(tokenizer, pairs: Sequence[Pair]) -> List[TokenPair]:
    """(prompt ids, answer ids) of text pairs: prompt + answer tokenized as generation tokenizes a prompt (one
    BOS where the text writes it), the answer ids being the tokens whose characters overlap the answer's, special
    tokens aside (unlearning's answer spans, `answer_tokens`: a token merged across the boundary counts as answer, a
    chat marker that takes the answer's leading space does not). A pair whose answer gives no token has no answer
    ids. ValueError unless the tokenizer is a fast one (offsets); TypeError naming a pair that is not two strings."""
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError("mean_token_kl needs a fast tokenizer (offset mappings locate the answer tokens)")
    _check_pairs(pairs)
    if not pairs:
        return []
    enc = tokenize_texts(tokenizer, [prompt + answer for prompt, answer in pairs], return_offsets_mapping=True)
    out = []
    answers = answer_tokens(tokenizer, enc, [(len(prompt), len(prompt + answer)) for prompt, answer in pairs])
    for ids, inside in zip(enc["input_ids"], answers):
        first = max(inside[0], 1) if inside else len(ids)   # the first token has nothing to predict it
        last = inside[-1] + 1 if inside else len(ids)
        out.append((tuple(ids[:first]), tuple(ids[first:last])))
    return out


def check_same_vocabulary(model, reference) -> int | None:
    """The vocabulary size that `model` and `reference` share (None where a model has no input embeddings to tell);
    ValueError where they differ: the KL compares their next-token distributions token by token (a torch size
    mismatch otherwise, after every answer had been generated)."""
    vocab, ref_vocab = input_vocabulary(model), input_vocabulary(reference)
    if None not in (vocab, ref_vocab) and vocab != ref_vocab:
        raise ValueError(f"model and reference must share the vocabulary (the KL compares them token by token), "
                         f"got {vocab} and {ref_vocab} tokens")
    return vocab


@torch.no_grad()
def mean_token_kl_of_ids(model, reference, sequences: Sequence[TokenPair], batch_size: int = 16) -> float:
    """Mean over the answer tokens of all sequences of KL(reference || model) of the next-token distributions,
    each sequence a (prompt ids, answer ids) pair (lists, 1-D tensors or arrays of integer ids; a ValueError names a
    sequence that is not a pair, or whose ids are not such, a tokenizer's [1, T] return_tensors batch included)
    scored exactly as given: every answer token, an end token included, predicted from the prompt and the answer
    before it. Both models must share the vocabulary.
    Both run in eval mode (dropout off; each module's mode is given back after), whatever mode they are in:
    a policy just trained is left in train mode, and its dropout would add to the KL. The two may live on different
    devices (the reference on a GPU of its own): each reads the ids on its own, the KL is summed on the model's."""
    check_count("batch_size", batch_size, 1)
    vocab = check_same_vocabulary(model, reference)
    for i, sequence in enumerate(sequences):
        if not (hasattr(sequence, "__len__") and len(sequence) == 2):
            raise ValueError(f"sequence {i} must be a (prompt ids, answer ids) pair, got {reprlib.repr(sequence)}")
    sequences = [(_token_ids(p, f"sequence {i}'s prompt ids"), _token_ids(a, f"sequence {i}'s answer ids"))
                 for i, (p, a) in enumerate(sequences)]
    for i, (prompt_ids, answer_ids) in enumerate(sequences):
        if len(answer_ids) and not len(prompt_ids):
            raise ValueError(f"sequence {i} has answer ids but no prompt ids: its first answer token would have "
                             "nothing to predict it from")
        check_embedded(prompt_ids + answer_ids, vocab, f"sequence {i}")
    sequences = [(p, a) for p, a in sequences if len(a)]   # a sequence without answer ids adds nothing
    total, count = 0.0, 0
    device = input_device(model, "mean_token_kl")
    ref_device = input_device(reference, "mean_token_kl", "reference")
    for start in range(0, len(sequences), batch_size):
        rows = [p + a for p, a in sequences[start:start + batch_size]]
        width = max(map(len, rows))
        # right-padded by hand with any id (masked, and after every real token)
        ids = torch.tensor([row + [0] * (width - len(row)) for row in rows], device=device)
        mask = torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in rows], device=device)
        predicted = torch.zeros_like(mask, dtype=torch.bool)   # position t predicts token t + 1
        for r, (prompt_ids, answer_ids) in enumerate(sequences[start:start + batch_size]):
            predicted[r, len(prompt_ids) - 1:len(prompt_ids) + len(answer_ids) - 1] = True
        first = min(len(prompt_ids) for prompt_ids, _ in sequences[start:start + batch_size]) - 1
        logits_q = _answer_logits(model, device, ids, mask, predicted, first)
        logits_p = _answer_logits(reference, ref_device, ids, mask, predicted, first).to(logits_q.device)
        # log-softmax in float64: in fp32 the rounding of the two logsumexps (~1e-7 |lse|) outweighed a KL near 0 (a
        # model the KL term kept close); in row chunks, so that its temporaries are not [answer tokens, vocab] each
        terms = [kl_of_log_probs(torch.log_softmax(q.double(), -1), torch.log_softmax(p.double(), -1))
                 for p, q in zip(logits_p.split(_KL_ROWS), logits_q.split(_KL_ROWS))]
        total += torch.cat(terms).sum().item()
        count += int(predicted.sum())
    if count == 0:
        raise ValueError("mean_token_kl: the sequences contain no answer tokens")
    return total / count


def _token_ids(ids, what: str) -> List[int]:
    """`ids` (a list, 1-D tensor or array of integer token ids) as a list of ints; else a ValueError naming `what`:
    a [1, T] tensor failed deep in torch with a size mismatch, float ids in the model's embedding."""
    shape = getattr(ids, "shape", None)
    if shape is not None and len(shape) != 1:
        raise ValueError(f"{what} must be 1-D integer token ids, got {type(ids).__name__} of shape {list(shape)} "
                         "(a tokenizer's return_tensors batch? take its row [0])")
    ids = ids.tolist() if hasattr(ids, "tolist") else list(ids)
    for token in ids:
        if not is_integer(token):
            raise ValueError(f"{what} must be 1-D integer token ids, got {token!r} among them")
    return [int(token) for token in ids]


_KL_ROWS = 64   # the answer tokens whose KL terms are computed at once


def _answer_logits(lm, device, ids, mask, predicted, first):
    """lm's next-token logits [answer tokens, vocab] (in its dtype) at the positions `predicted` of the
    right-padded `ids` [rows, width], run in eval mode with its inputs on `device` (its input_device); its logits
    computed from position `first` on (the batch's earliest predicting one; logits_to_keep, where its forward takes
    it), not at every prompt one."""
    kept = dict(logits_to_keep=ids.shape[1] - first) if takes_logits_to_keep(lm) else {}
    with eval_mode(lm):
        logits = lm(input_ids=ids.to(device), attention_mask=mask.to(device), **kept).logits
    at = predicted[:, ids.shape[1] - logits.shape[1]:].to(logits.device)
    return logits[at]


def mean_token_kl(model, reference, tokenizer, pairs: Sequence[Pair], batch_size: int = 16) -> float:
    """`mean_token_kl_of_ids` of text pairs, for callers that only have text: see `text_token_pairs` for
    which ids are scored. Those need not be the ids a model generated for that text (a BPE merge across the
    prompt/answer boundary, SentencePiece's leading space), and no end token is scored: score generated
    answers by their `Generation` ids instead."""
    return mean_token_kl_of_ids(model, reference, text_token_pairs(tokenizer, pairs), batch_size)
