"""The numbers the evaluation reports: harmful rate, share of unchanged answers, per-token KL.

- harmful rate = share of (prompt, answer) pairs the judge marks harmful (SPEC §1, Evaluation);
- unchanged share = share of prompts whose answer equals the original model's (greedy) answer;
- mean token KL = mean over the answer tokens of the normal data of KL(P_t || Q_t), P the original model,
  Q the evaluated one: the same quantity as unlearning's L_nor, token-weighted over the whole set.
"""
from typing import List, Sequence, Tuple

import torch

from fastalign.unlearn.encoding import tokenize_texts

from .generation import pad_id
from .judges import Judge, Pair, check_verdicts


def harmful_rate(pairs: Sequence[Pair], judge: Judge) -> Tuple[float, List[bool]]:
    """(share of pairs judged harmful, the verdicts); ValueError on an empty set or a faulty judge."""
    if not pairs:
        raise ValueError("harmful_rate needs at least one (prompt, answer) pair")
    verdicts = check_verdicts(judge(list(pairs)), pairs)
    return sum(verdicts) / len(verdicts), verdicts


def unchanged_share(reference_answers: Sequence[str], answers: Sequence[str]) -> float:
    """Share of answers equal to the reference answer at the same index (whitespace at the ends ignored)."""
    if len(reference_answers) != len(answers) or not answers:
        raise ValueError(f"need two equally long, non-empty answer lists, got {len(reference_answers)} "
                         f"and {len(answers)}")
    return sum(r.strip() == a.strip() for r, a in zip(reference_answers, answers)) / len(answers)


def _answer_token_masks(tokenizer, pairs: Sequence[Pair]):
    """Right-padded ids, attention mask, and a mask of the tokens that start inside the answer text."""
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError("mean_token_kl needs a fast tokenizer (offset mappings locate the answer tokens)")
    enc = tokenize_texts(tokenizer, [prompt + answer for prompt, answer in pairs], return_offsets_mapping=True)
    width = max(len(row) for row in enc["input_ids"])

    def pad(rows, value):  # by hand: a tokenizer without a pad token (Llama's, GPT-2's) cannot pad
        return torch.tensor([list(row) + [value] * (width - len(row)) for row in rows])

    ids, mask = pad(enc["input_ids"], pad_id(tokenizer)), pad([[1] * len(row) for row in enc["input_ids"]], 0)
    starts, ends = pad(enc["offset_mapping"], (0, 0)).unbind(-1)
    prompt_lengths = torch.tensor([len(prompt) for prompt, _ in pairs])[:, None]
    answer = (starts >= prompt_lengths) & (ends > starts) & mask.bool()
    return ids, mask, answer


@torch.no_grad()
def mean_token_kl(model, reference, tokenizer, pairs: Sequence[Pair], batch_size: int = 16) -> float:
    """Mean over the answer tokens of all pairs of KL(reference || model) of the next-token distributions.

    Each pair is scored as the text prompt + answer, tokenized as generation tokenizes a prompt (one BOS
    where a chat template writes it); a token belongs to the answer if its first character does. Both models
    must share the tokenizer.
    """
    total, count = 0.0, 0
    device = next(model.parameters()).device
    for start in range(0, len(pairs), batch_size):
        ids, mask, answer = (t.to(device) for t in _answer_token_masks(tokenizer, pairs[start:start + batch_size]))
        log_q = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits[:, :-1].float(), -1)
        log_p = torch.log_softmax(reference(input_ids=ids, attention_mask=mask).logits[:, :-1].float(), -1)
        kl = (log_p.exp() * (log_p - log_q)).sum(-1)
        predicted = answer[:, 1:]
        total += kl[predicted].double().sum().item()
        count += int(predicted.sum())
    if count == 0:
        raise ValueError("mean_token_kl: the pairs contain no answer tokens")
    return total / count
