"""HFRecomputeModel: what it runs and what it does not. (Its random trees match Hugging Face's logits in
test_tree_runner.py, on the "-recompute" models of tiny_models.py.)"""
import pytest
import torch

from tests.runtime.tiny_models import VOCAB, assert_matches, counted_runner, reference
from tests.vocab_rows import VocabRows


def recompute_runner(name="reformer-padded-recompute", **kwargs):
    """counted_runner's (model, runner, calls) on HFRecomputeModel."""
    return counted_runner(name, "HFRecomputeModel", **kwargs)


def test_rows_of_one_length_run_as_one_batch_keeping_only_the_logits_asked_for():
    """Three children of one span extended by one token each are one forward of 3 rows; a row of another length is
    its own. Only the positions of the new tokens get logits (not [rows, length, vocab])."""
    model, runner, calls = recompute_runner()
    root = runner.prefill([5, 17, 3, 9, 2])
    children, logits = runner.extend([root, root, root, root], [[1], [2], [3], [4, 6]], logits="all")
    assert sorted(calls) == [(1, 7, 2), (3, 6, 1)]
    assert runner.last_context_rerun.tolist() == [5, 5, 5, 5] and runner.recomputed_tokens == 20
    for child, row_logits in zip(children, logits):
        torch.testing.assert_close(row_logits, reference(model, child)[0], rtol=1e-4, atol=1e-4)


def test_rows_of_one_length_with_other_numbers_of_new_tokens_keep_the_logits_of_the_longest():
    """Two rows of 7 tokens in all, one with 2 new tokens and one with 1 (on a child made earlier): one forward of 2
    rows, keeping the last 2 positions' logits so that each row gets all of its own."""
    model, runner, calls = recompute_runner()
    root = runner.prefill([5, 17, 3, 9, 2])
    (child,), _ = runner.extend([root], [[1]])
    calls.clear()
    spans, logits = runner.extend([root, child], [[7, 8], [9]], logits="all")
    assert calls == [(2, 7, 2)]
    for span, row_logits in zip(spans, logits):
        torch.testing.assert_close(row_logits, reference(model, span)[0], rtol=1e-4, atol=1e-4)


def test_a_call_without_outputs_and_bringing_back_evicted_spans_run_no_forward():
    """A prefill writes ids only; an evicted span comes back by writing its ids again: neither runs the model, nor
    counts as recomputed."""
    model, runner, calls = recompute_runner(max_tokens=16)
    first = runner.prefill(list(range(10, 22)))       # 12 tokens: 3 of the 4 blocks
    second = runner.prefill(list(range(30, 42)))      # evicts the first
    assert calls == [] and not first.resident and runner.recomputed_tokens == 0
    runner.release(second)
    (child,), logits = runner.extend([first], [[7]])  # brings the first back, then one row of 13 tokens
    assert calls == [(1, 13, 1)] and runner.recomputed_tokens == 12
    torch.testing.assert_close(logits[0], reference(model, child)[0][-1], rtol=1e-4, atol=1e-4)


def test_a_call_without_outputs_or_refused_reruns_no_context_and_keeps_none_of_the_call_before():
    """last_context_rerun describes the last extend alone: one that computed no outputs ran no context, and one refused
    ran nothing; neither may leave the previous call's counts for a caller (RAIN) to charge again."""
    model, runner, calls = recompute_runner()
    root = runner.prefill([5, 17, 3, 9, 2])
    children, _ = runner.extend([root], [[1]])
    assert runner.last_context_rerun.tolist() == [5]
    children, _ = runner.extend([root], [[2]], logits=None)
    assert runner.last_context_rerun.tolist() == [] and runner.recomputed_tokens == 5
    children, _ = runner.extend([root], [[3]])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        runner.extend([root], [[-1]])
    assert runner.last_context_rerun.tolist() == [] and runner.recomputed_tokens == 10


def test_a_forward_computes_logits_at_the_tokens_read_alone():
    """extend(logits="last") kept the logits of every new token (logits_to_keep: the most new tokens of a row) where
    one row per returned span is read (an 8k-token prompt at a 202048-word vocabulary in bf16: 3.3 GB). Now the
    lm_head runs at the tokens read alone; with cuts at the positions read in either row of one batch."""
    model, runner, _ = recompute_runner()
    ids = list(range(3, 23))
    root = runner.prefill(ids)
    with VocabRows(VOCAB) as last:
        children, logits = runner.extend([root, root], [ids[:8], ids[8:16]], logits="last")
    with VocabRows(VOCAB) as at_cuts:
        spans, cut_logits = runner.extend([root, root], [ids[:8], ids[8:16]], cuts=[[3], [5]], logits="last")
    assert (last.most, at_cuts.most) == (2, 2 * 3)   # at cuts: the positions of tokens 2, 4 and 7 of both rows
    assert_matches(model, children, logits[:, None])
    assert_matches(model, [span for row in spans for span in row], cut_logits[:, None])
