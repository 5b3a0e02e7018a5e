"""`TreeRunner.extend(..., cuts=...)`: spans at chosen positions inside a row, made by the row's own forward.

Each span a row returns (its cut spans, then its child) must give the logits and final hidden states of the
Hugging Face model run on that span's whole sequence, must be usable as a parent like any other span
(evicted and recomputed included), and must cost no block beyond what the row without cuts uses."""
import numpy as np
import pytest
import torch

from fastalign import TreeRunner
from tests.runtime.test_tree_runner_errors import snapshot
from tests.runtime.tiny_models import reference, tiny_model

ROOT = [3, 1, 4, 1, 5]                       # 5 tokens: rows start mid-block (block_size 4)
LISTS = [[9, 2, 6, 5, 3, 5, 8], [9, 7], [2, 7, 1, 8, 2, 8]]
CUTS = [[2, 3, 6], [], [1, 4, 5]]


def check_against_hugging_face(model, span, logits, hidden):
    ref_logits, ref_hidden = reference(model, span)
    assert (logits - ref_logits[-1]).abs().max() <= 1e-4, f"{span}: logits differ from Hugging Face's"
    assert (hidden - ref_hidden[-1]).abs().max() <= 1e-4, f"{span}: hidden states differ from Hugging Face's"


@pytest.mark.parametrize("name", ["llama-gqa-untied", "gpt2-learned-positions", "bloom-alibi-fallback"])
def test_cut_spans_match_hugging_face_and_extend_like_any_span(name):
    model = tiny_model(name)
    runner = TreeRunner(model, max_tokens=256, block_size=4, attention_backend="torch")
    root = runner.prefill(ROOT)
    parents = [root, root, None]
    chains, logits, hidden = runner.extend(parents, LISTS, cuts=CUTS, hidden="last")
    spans = [span for chain in chains for span in chain]
    assert [len(chain) for chain in chains] == [len(c) + 1 for c in CUTS]
    assert logits.shape == (len(spans), runner.vocab_size) and hidden.shape[0] == len(spans)
    for parent, chain, tokens, cuts in zip(parents, chains, LISTS, CUTS):
        base = [] if parent is None else parent.tokens
        for span, above, end in zip(chain, [parent] + chain[:-1], cuts + [len(tokens)]):
            assert span.parent is above and span.tokens == base + tokens[:end] and span.length == len(span.tokens)
    for span, lg, hd in zip(spans, logits, hidden):
        check_against_hugging_face(model, span, lg, hd)

    # a cut span is a parent like any other: its partial last block is copied, its full blocks shared
    cut = chains[0][1]
    (child, again), logits2, hidden2 = runner.extend([cut, cut], [[4, 4], [6]], hidden="last")
    assert runner.tree.block_table(child.id)[:cut.length // 4].tolist() == \
        runner.tree.block_table(cut.id)[:cut.length // 4].tolist()
    for span, lg, hd in zip([child, again], logits2, hidden2):
        check_against_hugging_face(model, span, lg, hd)

    # evicted, it is recomputed when used
    runner.release([child, again, chains[0][2], chains[0][3]])
    for span in (chains[0][1], chains[0][0]):
        runner.tree.evict(span.id)
    assert not cut.resident
    (late,), logits3, hidden3 = runner.extend([cut], [[1]], hidden="last")
    check_against_hugging_face(model, late, logits3[0], hidden3[0])


def test_outputs_with_cuts_agree_with_outputs_without():
    model = tiny_model("qwen2-tied")
    runner = TreeRunner(model, max_tokens=256, block_size=4, attention_backend="torch")
    root = runner.prefill(ROOT)
    _, plain_all = runner.extend([root] * 3, LISTS, logits="all")
    chains, cut_all = runner.extend([root] * 3, LISTS, cuts=CUTS, logits="all")
    for a, b in zip(plain_all, cut_all):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    _, cut_last, cut_all_hidden = runner.extend([root] * 3, LISTS, cuts=CUTS, logits="last", hidden="all")
    expected = torch.stack([row[c - 1] for row, cuts, tokens in zip(plain_all, CUTS, LISTS)
                            for c in cuts + [len(tokens)]])
    torch.testing.assert_close(cut_last, expected, rtol=0, atol=1e-5)
    assert [h.shape[0] for h in cut_all_hidden] == [len(t) for t in LISTS]
    _, no_cuts = runner.extend([root] * 3, LISTS, cuts=[[], [], []])
    torch.testing.assert_close(no_cuts, torch.stack([row[-1] for row in plain_all]), rtol=0, atol=1e-5)


def test_cuts_cost_no_extra_blocks_and_release_cleanly():
    model = tiny_model("llama-gqa-untied")
    used = []
    for cuts in (None, CUTS):
        runner = TreeRunner(model, max_tokens=256, block_size=4, attention_backend="torch")
        root = runner.prefill(ROOT)
        free = runner.num_free_blocks
        result, _ = runner.extend([root, root, None], LISTS, cuts=cuts)
        used.append(free - runner.num_free_blocks)
        spans = result if cuts is None else [span for chain in result for span in chain]
        if cuts is not None:                  # releasing cut spans leaves the row's child valid
            runner.release(result[0][:-1])
            assert_extends_correctly(runner, model, result[0][-1])
        runner.release([s for s in spans if s.alive] + [root])
        assert runner.tree.span_ids() == [] and runner.num_free_blocks == runner.num_blocks
    assert used[0] == used[1]


def assert_extends_correctly(runner, model, parent):
    (child,), logits = runner.extend([parent], [[5, 6]])
    ref = model(torch.tensor([child.tokens])).logits[0, -1]
    assert (logits[0] - ref).abs().max() <= 1e-4
    runner.release(child)


@pytest.mark.parametrize("cuts, message", [
    ([[1]], r"cuts: expected 2 sequences \(one per parent\), got 1"),
    ([[0], []], r"cuts\[0\]: expected increasing offsets in \[1, 2\]"),
    ([[3], []], r"cuts\[0\]: expected increasing offsets in \[1, 2\]"),
    ([[2, 1], []], r"cuts\[0\]: expected increasing offsets"),
    ([[1, 1], []], r"cuts\[0\]: expected increasing offsets"),
    ([[], [1]], r"cuts\[1\]: expected increasing offsets in \[1, 0\]"),
    ([[1.5], []], r"cuts\[0\]: expected a 1-D sequence of int offsets"),
    ([[[1, 2]], []], r"cuts\[0\]: expected a 1-D sequence of int offsets, got shape \[1, 2\]"),  # not flattened
    ([[True, 2], []], r"cuts\[0\]: expected int offsets, got a bool among them"),   # was a cut after token 1
    ([[1], None], r"cuts\[1\]: expected a 1-D sequence of int offsets \(\[\] for none\), got NoneType"),
    ([[1], 2], r"cuts\[1\]: expected a 1-D sequence of int offsets \(\[\] for none\), got int"),
    ("12", "cuts: expected one sequence of offsets per parent"),
])
def test_bad_cuts_are_refused_and_leave_the_pool_as_it_was(cuts, message):
    model = tiny_model("qwen2-untied")
    runner = TreeRunner(model, max_tokens=64, block_size=4, attention_backend="torch")
    root = runner.prefill(ROOT)
    before = snapshot(runner)
    with pytest.raises(ValueError, match=message):
        runner.extend([root, root], [[7, 8, 9], [7]], cuts=cuts)
    assert snapshot(runner) == before
    (chain,), logits = runner.extend([root], [[7, 8, 9]], cuts=[np.array([2])])
    ref = model(torch.tensor([chain[0].tokens])).logits[0, -1]
    assert (logits[0] - ref).abs().max() <= 1e-4
    assert_extends_correctly(runner, model, chain[0])


def test_last_hidden_with_all_logits_and_cuts_is_at_each_returned_span():
    """logits="all" with hidden="last": one hidden state per returned span (the cut spans too), its last token's."""
    model = tiny_model("llama-gqa-untied")
    runner = TreeRunner(model, max_tokens=256, block_size=4, attention_backend="torch")
    root = runner.prefill(ROOT)
    chains, logits, hidden = runner.extend([root] * 3, LISTS, cuts=CUTS, logits="all", hidden="last")
    spans = [span for chain in chains for span in chain]
    assert [row.shape[0] for row in logits] == [len(tokens) for tokens in LISTS]
    assert hidden.shape[0] == len(spans)
    for span, state in zip(spans, hidden):
        torch.testing.assert_close(state, reference(model, span)[1][-1], rtol=1e-4, atol=1e-4)
