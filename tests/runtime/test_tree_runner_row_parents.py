"""`TreeRunner.extend` with rows that extend the child of an earlier row of the same call (parent = that
row's index): one forward computes both, and every child must give the logits and final hidden states of
the Hugging Face model run on its whole sequence, also where a row's partial last block is copied for a
second row while the same forward fills it."""
import numpy as np
import pytest
import torch

from fastalign import TreeRunner
from tests.conftest import device_for
from tests.runtime.test_tree_runner_cuts import assert_extends_correctly, check_against_hugging_face
from tests.runtime.test_tree_runner_errors import snapshot
from tests.runtime.tiny_models import fill_with_nan, tiny_model

ROOT = [3, 1, 4, 1, 5]            # 5 tokens; row 0 ends at 7, mid-block (block_size 4)
PARENTS = ["root", 0, 0, 1, None, 4, 2]
LISTS = [[9, 2], [6, 5, 3], [7], [8, 8], [2, 7, 1, 8, 2], [4], [1, 1, 1, 1, 1]]


@pytest.mark.parametrize("name", ["llama-gqa-untied", "gpt2-learned-positions", "bloom-alibi-fallback"])
@pytest.mark.parametrize("with_cuts", [False, True])
def test_rows_on_earlier_rows_match_hugging_face(name, with_cuts):
    model = tiny_model(name)
    runner = TreeRunner(model, max_tokens=256, block_size=4, attention_backend="torch")
    fill_with_nan(runner.pool)
    root = runner.prefill(ROOT)
    parents = [root if p == "root" else p for p in PARENTS]
    cuts = [[1], [1, 2], [], [], [3], [], [2]] if with_cuts else None
    calls = []
    forward = runner.model_runner.forward
    runner.model_runner.forward = lambda *a: calls.append(1) or forward(*a)
    children, logits, hidden = runner.extend(parents, LISTS, cuts=cuts, hidden="last")
    assert len(calls) == 1                                   # one forward for all rows
    spans = [s for chain in children for s in chain] if with_cuts else children
    ends = [chain[-1] for chain in children] if with_cuts else children
    for i, p in enumerate(PARENTS):                          # a row's parent is the earlier row's child
        first = children[i][0] if with_cuts else children[i]
        assert first.parent is (root if p == "root" else None if p is None else ends[p])
    assert ends[3].tokens == ROOT + LISTS[0] + LISTS[1] + LISTS[3]
    for span, lg, hd in zip(spans, logits, hidden):
        check_against_hugging_face(model, span, lg, hd)
    for span in ends:
        assert_extends_correctly(runner, model, span)
    runner.release(spans + [root])
    assert runner.tree.span_ids() == [] and runner.num_free_blocks == runner.num_blocks


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("nesting", [1, 2])
def test_copies_of_copies_in_one_forward_match_hugging_face(nesting, backend):
    """The root's partial block holds a kept child's token, so row 0 copies it; rows on row 0 append to that copy in
    place and copy it again (and, nested, that copy too). All copies of a forward happen at once before it, so each
    must read the original block and get this forward's tokens as extras, never an earlier copy's stale slots. On the
    Triton backend the rotary kernel stores the K/V, and the extras are written from its rotated keys."""
    model = tiny_model("llama-gqa-untied", device=device_for(backend))
    runner = TreeRunner(model, max_tokens=256, block_size=8 if nesting == 2 else 4, attention_backend=backend)
    fill_with_nan(runner.pool)
    root = runner.prefill([1, 2])
    kept, _ = runner.extend([root], [[3]], logits=None)  # a child (held: a dropped handle releases it), in place
    parents = [root, 0, 0] + ([1, 1] if nesting == 2 else [])
    children, logits, hidden = runner.extend(parents, [[5 + r] for r in range(len(parents))], hidden="last")
    for span, lg, hd in zip(children, logits, hidden):
        check_against_hugging_face(model, span, lg, hd)
    assert kept[0].alive


def test_bad_row_parents_are_refused_and_leave_the_pool_as_it_was():
    model = tiny_model("qwen2-untied")
    runner = TreeRunner(model, max_tokens=64, block_size=4, attention_backend="torch")
    root = runner.prefill(ROOT)
    before = snapshot(runner)
    for parents, message in (([0, root], r"parents\[0\]: a row index must name an earlier row"),
                             ([root, 1], r"parents\[1\]: a row index must name an earlier row .*got 1"),
                             ([root, -1], r"parents\[1\]: a row index must name an earlier row"),
                             ([root, True], r"parents\[1\]: expected a Span")):
        with pytest.raises(ValueError, match=message):
            runner.extend(parents, [[7, 8], [9]])
        assert snapshot(runner) == before
    assert_extends_correctly(runner, model, root)


def test_failed_forward_with_row_parents_leaves_the_pool_as_it_was(monkeypatch):
    model = tiny_model("qwen2-untied")
    runner = TreeRunner(model, max_tokens=64, block_size=4, attention_backend="torch")
    root = runner.prefill(ROOT)
    before = snapshot(runner)

    def broken(*args):
        raise RuntimeError("device lost")

    monkeypatch.setattr(runner.model_runner, "forward", broken)
    with pytest.raises(RuntimeError, match="device lost"):
        runner.extend([root, 0, 0, 2], [[7, 8], [9], [1, 2], [3]], cuts=[[1], [], [1], []])
    assert snapshot(runner) == before
    monkeypatch.undo()
    assert_extends_correctly(runner, model, root)
    (_, chained), logits = runner.extend([root, 0], [[7, 8], [9]])
    ref = model(torch.tensor([chained.tokens])).logits[0, -1]
    assert (logits[1] - ref).abs().max() <= 1e-4


@pytest.mark.parametrize("name", ["gpt2-learned-positions", "bloom-alibi-fallback", "reformer-padded-recompute"])
def test_a_row_on_a_row_whose_first_token_is_copied_outside_the_llama_family(name):
    """PagedHF, the Hugging Face fallback and the recomputing one (which reads the copied block's token ids, -1 in a
    fresh pool): rows on earlier rows where a later row copies the partial block that the earlier rows fill in the
    same forward (the first token of a row is then written twice)."""
    model = tiny_model(name)
    runner = TreeRunner(model, max_tokens=256, block_size=4, attention_backend="torch")
    fill_with_nan(runner.pool)
    root = runner.prefill([3, 1, 4, 1, 5])
    # rows 1 and 2 append in place to the root's partial block; row 3 copies it while this forward fills
    # it, so the first token of row 1 (a row boundary) is written twice
    children, logits, hidden = runner.extend([root, 0, 1, 1], [[9], [2], [6], [5]], hidden="last")
    for span, lg, hd in zip(children, logits, hidden):
        check_against_hugging_face(model, span, lg, hd)


def test_row_parents_may_be_numpy_integers():
    runner = TreeRunner(tiny_model("qwen2-untied"), max_tokens=64, block_size=4, attention_backend="torch")
    root = runner.prefill(ROOT)
    (a, b), _ = runner.extend([root, np.int64(0)], [[7, 8], [9]])
    assert b.parent is a and b.tokens == ROOT + [7, 8, 9] and len(b) == len(ROOT) + 3
    (chain_a, chain_b), _ = runner.extend([root, np.int32(0)], [[7, 8], [9, 6]], cuts=[[1], [1]])
    assert chain_b[0].parent is chain_a[-1] and chain_b[-1].tokens == ROOT + [7, 8, 9, 6]
