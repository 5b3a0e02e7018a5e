"""SPEC §1's three loss terms computed the slow, obvious way: one sequence at a time, full logits, float64.

The reference against which UnlearningObjective is tested. `logits_fn(ids [1, L]) -> logits [1, L, V]`
is the model under test; `reference_logits_fn` gives the frozen reference model's logits. Both take CPU ids: the
reference runs on the CPU, where float64 is exact and cheap enough.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from fastalign.unlearn.encoding import EncodedExample

LogitsFn = Callable[[torch.Tensor], torch.Tensor]


def _answer_log_probs(logits_fn: LogitsFn, example: EncodedExample) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-softmax rows [n, V] float64 at the positions predicting answer tokens, those answer tokens [n])."""
    ids = torch.tensor([example.input_ids])
    positions = torch.arange(max(example.answer_start, 1), example.answer_end)
    log_probs = torch.log_softmax(logits_fn(ids)[0].double(), dim=-1)
    return log_probs[positions - 1], ids[0, positions]


def _mean_answer_nll(logits_fn: LogitsFn, examples: Sequence[EncodedExample]) -> torch.Tensor:
    """mean_i (1/|A_i|) sum_{t in A_i} CE_t, a sequence without answer tokens counting 0."""
    per_sequence = []
    for e in examples:
        log_probs, answer = _answer_log_probs(logits_fn, e)
        nll = -log_probs.gather(1, answer[:, None]).squeeze(1)
        per_sequence.append(nll.mean() if nll.numel() else nll.sum())
    return torch.stack(per_sequence).mean() if per_sequence else torch.zeros((), dtype=torch.float64)


def spec_unlearning_terms(logits_fn: LogitsFn, reference_logits_fn: LogitsFn | None,
                          forget: Sequence[EncodedExample], mismatch: Sequence[EncodedExample],
                          normal: Sequence[EncodedExample]) -> dict[str, torch.Tensor]:
    """{"forget": L_fgt, "mismatch": L_rdn, "normal": L_nor} in float64, differentiable through logits_fn."""
    kl_sum, kl_count = torch.zeros((), dtype=torch.float64), 0
    for e in normal:
        log_q, _ = _answer_log_probs(logits_fn, e)
        with torch.no_grad():
            log_p, _ = _answer_log_probs(reference_logits_fn, e)
        kl_sum = kl_sum + (log_p.exp() * (log_p - log_q)).sum()
        kl_count += log_q.shape[0]
    return {"forget": -_mean_answer_nll(logits_fn, forget),
            "mismatch": _mean_answer_nll(logits_fn, mismatch),
            "normal": kl_sum / max(kl_count, 1)}
