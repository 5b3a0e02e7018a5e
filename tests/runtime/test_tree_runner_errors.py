"""Bad input to a TreeRunner: a clear error naming the problem, and a pool left as it was (checked by
comparing the tree's state before and after, then by a correct extension afterwards)."""
import copy
import gc
import pickle
import re
import warnings
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import transformers
from transformers import (BertConfig, BertLMHeadModel, BertModel, DynamicCache, Gemma4ForCausalLM, Gemma4TextConfig,
                          LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, MixtralConfig,
                          MixtralForCausalLM, MptConfig, MptForCausalLM, Phi3Config, Phi3ForCausalLM, Qwen2Config,
                          Qwen2ForCausalLM, Qwen2MoeConfig, Qwen2MoeForCausalLM, Qwen3Config, Qwen3ForCausalLM,
                          Qwen3MoeConfig, Qwen3MoeForCausalLM, RecurrentGemmaConfig, RecurrentGemmaForCausalLM)

import fastalign
from fastalign import PoolExhaustedError, Span, TreeRunner
from fastalign.runtime import hf_cache
from fastalign.runtime.hf_cache import HFCacheModel, _kv_problem
from fastalign.runtime.kv_pool import KVPool
from fastalign.unlearn.models import enable_activation_checkpointing
from tests.runtime.tiny_models import CONFIGS, MAX_POSITIONS, VOCAB, tiny_model


@pytest.fixture(scope="module")
def model():
    return tiny_model("qwen2-untied")


@pytest.fixture
def runner(model):
    return TreeRunner(model, max_tokens=64, block_size=4, attention_backend="torch")


def snapshot(runner):
    tree = runner.tree
    return (tree.span_ids(), tree.refcounts().tolist(), sorted(tree.free_blocks().tolist()),
            [tree.block_table(i).tolist() for i in tree.span_ids()])


def assert_still_correct(runner, model, parent):
    (child,), logits = runner.extend([parent], [[5, 6]])
    ref = model(torch.tensor([child.tokens])).logits[0, -1]
    assert (logits[0] - ref).abs().max() <= 1e-4
    runner.release(child)


def test_bad_spans_are_refused(runner, model):
    root = runner.prefill([1, 2, 3, 4, 5])
    other = TreeRunner(model, max_tokens=16, block_size=4, attention_backend="torch").prefill([1])
    gone = runner.prefill([7, 8])
    runner.release(gone)
    before = snapshot(runner)
    cases = [
        ([gone], "parents\\[0\\]: span .* was released"),
        ([root, other], "parents\\[1\\]: .* belongs to another TreeRunner"),
        ([root, 3], "parents\\[1\\]: a row index must name an earlier row of this call"),
        # a row naming itself failed deep in the call (IndexError); -1 and True were taken, silently, as a new root
        # and as row 1
        ([root, 1], "parents\\[1\\]: a row index must name an earlier row of this call \\(0 <= j < 1\\), got 1"),
        ([root, -1], "parents\\[1\\]: a row index must name an earlier row of this call \\(0 <= j < 1\\), got -1"),
        ([root, None, True], "parents\\[2\\]: expected a Span .* got bool"),
        ([root, "3"], "parents\\[1\\]: expected a Span of this runner, None .* or the int index of an earlier "
                      "row of this call, got str"),
        ([root, torch.tensor(0)], "parents\\[1\\]: expected a Span .* got Tensor"),
    ]
    for parents, message in cases:
        with pytest.raises(ValueError, match=message):
            runner.extend(parents, [[1]] * len(parents))
    for op in (runner.pin, runner.unpin, runner.release):
        with pytest.raises(ValueError, match="was released"):
            op(gone)
    with pytest.raises(ValueError, match="was released"):
        gone.tokens
    with pytest.raises(ValueError, match="listed twice"):
        runner.release([root, root])
    with pytest.raises(ValueError, match="not pinned"):
        runner.unpin(root)
    assert snapshot(runner) == before
    assert_still_correct(runner, model, root)


def test_bad_tokens_are_refused(runner, model):
    root = runner.prefill([1, 2, 3])
    before = snapshot(runner)
    cases = [  # (number of parents, token lists, message)
        (2, [[1], [VOCAB]], f"token_lists\\[1\\]: token id {VOCAB} is outside the vocabulary \\[0, {VOCAB}\\)"),
        (1, [[-1]], "token_lists\\[0\\]: token id -1 is outside the vocabulary"),
        # the first bad id is named, as given (not the row's last bad one)
        (2, [[1], [2, VOCAB + 5, -3]], f"token_lists\\[1\\]: token id {VOCAB + 5} is outside the vocabulary"),
        (1, [[]], "token_lists\\[0\\]: expected a non-empty 1-D sequence of int token ids"),
        (1, [[1.5]], "token_lists\\[0\\]: expected a non-empty 1-D sequence of int token ids, got shape \\[1\\] of "
                     "float64"),
        (1, [[[1, 2]]], "token_lists\\[0\\]: expected a non-empty 1-D sequence"),
        # bools are no token ids (they ran silently as ids 0 and 1)
        (1, [[True, False]], "token_lists\\[0\\]: expected a non-empty 1-D sequence of int token ids, got shape "
                             "\\[2\\] of bool"),
        (1, [torch.tensor([True])], "token_lists\\[0\\]: expected a non-empty 1-D sequence .* of bool"),
        (1, [[True, 3]], "token_lists\\[0\\]: expected int token ids, got a bool among them"),   # was token 1
        (1, [[1], [2]], "token_lists: expected 1 lists \\(one per parent\\), got 2"),
        (2, "ab", "token_lists: expected one sequence of token ids per parent"),
    ]
    for parents, lists, message in cases:
        with pytest.raises(ValueError, match=message):
            runner.extend([root] * parents, lists)
    with pytest.raises(ValueError, match="parents: expected at least one parent"):
        runner.extend([], [])
    with pytest.raises(ValueError, match="logits: expected one of"):
        runner.extend([root], [[1]], logits="first")
    with pytest.raises(ValueError, match="hidden: expected one of"):
        runner.extend([root], [[1]], hidden="first")
    with pytest.raises(ValueError, match="past the model's context of 128"):
        runner.extend([root, root], [[1], [1] * (MAX_POSITIONS - 2)])
    assert snapshot(runner) == before
    (child,), _ = runner.extend([root], [torch.tensor([4, 5])])  # tensors and numpy arrays are fine
    (grandchild,), _ = runner.extend([child], [np.array([6], dtype=np.int64)])
    assert grandchild.tokens == [1, 2, 3, 4, 5, 6] and grandchild.parent is child and child.parent is root
    assert_still_correct(runner, model, grandchild)


def test_an_empty_row_of_int_dtype_is_refused(runner, model):
    """An empty list, tensor or array of ints is refused as empty (an empty list was refused by the float64 dtype numpy
    reads it as)."""
    root = runner.prefill([1, 2, 3])
    before = snapshot(runner)
    for empty in ([], torch.tensor([], dtype=torch.long), np.array([], dtype=np.int64)):
        with pytest.raises(ValueError, match="token_lists\\[1\\]: expected a non-empty 1-D sequence of int token ids, "
                                             "got an empty one"):
            runner.extend([root, root], [[4], empty])
    assert snapshot(runner) == before
    assert_still_correct(runner, model, root)


def test_pinned_spans_that_fill_the_pool_give_a_clear_error(runner, model):
    root = runner.prefill(list(range(60)))  # 15 of the 16 blocks
    runner.pin(root)
    before = snapshot(runner)
    with pytest.raises(PoolExhaustedError, match="KV pool exhausted: all 16 blocks of 4 tokens.*15 by pinned"):
        runner.prefill(list(range(8)))  # 2 blocks: would fit but for the pin
    with pytest.raises(PoolExhaustedError, match="needs at least 17 blocks"):  # 65 tokens: would not fit at all
        runner.extend([root], [[1, 2, 3, 4, 5]])
    assert snapshot(runner) == before
    assert_still_correct(runner, model, root)
    runner.unpin(root)
    other = runner.prefill(list(range(8)))  # evicts the root, now unpinned
    assert not root.resident and other.resident
    assert_still_correct(runner, model, root)  # recomputes the root (evicting `other`)
    assert root.resident and not other.resident


def test_a_call_larger_than_the_pool_is_refused_before_it_evicts_anything(runner, model):
    """100 new tokens need 25 blocks of a 16-block pool: the span tree evicted every other span first and then
    blamed "spans that cannot be evicted (0 by pinned spans ...)" with all 16 blocks free."""
    keep = runner.prefill(list(range(30)))
    before = snapshot(runner)
    with pytest.raises(PoolExhaustedError, match="needs at least 25 blocks of 4 tokens .* the pool has 16"):
        runner.prefill(list(range(100)))
    with pytest.raises(PoolExhaustedError, match="needs at least 19 blocks"):  # keep's 8, then 40 and 74 tokens
        runner.extend([keep, 0], [list(range(10)), list(range(34))])
    assert snapshot(runner) == before and keep.resident
    (_, child), _ = runner.extend([keep, 0], [list(range(10)), list(range(20))])  # 8 + 2 + 5 blocks: fits
    assert_still_correct(runner, model, child)


def test_a_call_that_cannot_fit_counts_every_parent_and_every_copied_block(runner, model):
    """The bound counted only the longest parent and no copy of a partly filled last block: twelve 1-token children
    of one span (RAIN's expansions) or two parents extended together passed it, the span tree then evicted every
    other span and blamed "spans that cannot be evicted" without saying how large a pool the call needs, and a
    pool of the size an earlier error named could still be too small."""
    keep = runner.prefill(list(range(40, 48)))
    a = runner.prefill(list(range(22)))              # 6 blocks, the last holding 2 of its 4 slots
    before = snapshot(runner)
    with pytest.raises(PoolExhaustedError, match="needs at least 17 blocks of 4 tokens .* the pool has 16"):
        runner.extend([a] * 12, [[i] for i in range(12)])   # one child writes into a's last block, 11 copy it
    assert snapshot(runner) == before and keep.resident
    runner.release([keep, a])
    a, b = runner.prefill(list(range(30))), runner.prefill(list(range(50, 80)))   # 8 blocks each
    before = snapshot(runner)
    with pytest.raises(PoolExhaustedError, match="needs at least 18 blocks"):   # both parents, then 1 block each
        runner.extend([a, b], [[1] * 4, [2] * 4])
    assert snapshot(runner) == before
    exact = TreeRunner(model, max_tokens=17 * 4, block_size=4, attention_backend="torch")
    a = exact.prefill(list(range(22)))
    kids, _ = exact.extend([a] * 12, [[i] for i in range(12)])   # the bound is the need: 17 blocks fit
    assert exact.num_free_blocks == 0
    assert_still_correct(exact, model, kids[-1])
    full = TreeRunner(model, max_tokens=4 * 4, block_size=4, attention_backend="torch")
    a = full.prefill([3, 1, 4, 1])                   # a whole block: its children copy nothing
    kids, logits = full.extend([a] * 3, [[5, 9, 2, 6]] * 3)   # 1 + 3 blocks: the whole pool
    assert full.num_free_blocks == 0
    torch.testing.assert_close(logits[0], model(torch.tensor([kids[0].tokens])).logits[0, -1], rtol=1e-4, atol=1e-4)


def test_a_call_on_an_evicted_parent_counts_the_blocks_it_brings_back_before_it_evicts_anything(runner):
    """An evicted parent holds no block yet must be brought back: a bound counting resident blocks alone let the call
    through, and the span tree evicted the other spans to restore the parent before it failed."""
    a = runner.prefill(list(range(38)))                # 10 of the 16 blocks, the last partly filled
    b = runner.prefill(list(range(40, 80)))            # evicts a
    assert not a.resident and b.resident
    before = snapshot(runner)
    with pytest.raises(PoolExhaustedError, match="needs at least 17 blocks of 4 tokens .* the pool has 16"):
        runner.extend([a], [list(range(30))])          # a's 10 blocks (its partial one too), then 7 more
    assert snapshot(runner) == before and b.resident and not a.resident


def test_a_call_on_parents_that_share_blocks_counts_each_block_once(runner, model):
    """Two children of one span share its 8 blocks: 10 blocks resident in all, 12 with the call's 2 new ones, which
    fit the 16-block pool; counting the shared blocks once per parent (18, then 20) refused the call, as did adding
    an evicted parent's blocks to the resident ones where it is brought back on them."""
    root = runner.prefill(list(range(32)))
    (a, b), _ = runner.extend([root, root], [[1] * 4, [2] * 4])
    kids, logits = runner.extend([a, b], [[3] * 4, [4] * 4])
    assert runner.num_free_blocks == 16 - 12
    for kid, row in zip(kids, logits):
        torch.testing.assert_close(row, model(torch.tensor([kid.tokens])).logits[0, -1], rtol=1e-4, atol=1e-4)
    runner.release(kids)
    runner.tree.evict(b.id)       # b comes back in 1 block on the resident root: 12 blocks again, not a's 9 + b's 9
    assert not b.resident
    kids, logits = runner.extend([a, b], [[5] * 4, [6] * 4])
    assert runner.num_free_blocks == 16 - 12 and b.resident
    for kid, row in zip(kids, logits):
        torch.testing.assert_close(row, model(torch.tensor([kid.tokens])).logits[0, -1], rtol=1e-4, atol=1e-4)


def test_the_bound_tells_an_earlier_rows_child_from_the_span_whose_id_is_that_rows_index(model):
    """Row 0's child and span 0 each have one child writing on into its partly filled last block (no copy): taken for
    one parent with two such children, the bound counted a copy that no row makes and refused a call that fills
    the pool exactly."""
    runner = TreeRunner(model, max_tokens=16, block_size=4, attention_backend="torch")
    root = runner.prefill([1, 2, 3, 4, 5, 6])            # 2 blocks, the last partly filled
    assert root.id == 0
    (a, b), logits = runner.extend([root, 0], [[7], [8] * 9])   # 16 tokens in 4 blocks: the whole pool
    assert runner.num_free_blocks == 0 and b.parent is a
    torch.testing.assert_close(logits[1], model(torch.tensor([b.tokens])).logits[0, -1], rtol=1e-4, atol=1e-4)


def test_a_call_that_cannot_fit_counts_the_copies_of_an_earlier_rows_partly_filled_block(runner):
    """Sixteen rows on row 0's child, which ends mid-block: one writes on into its last block, fifteen copy it, so 17
    blocks; counting the copies for span parents alone, the bound let the call evict `keep` before it failed."""
    keep = runner.prefill(list(range(8)))
    before = snapshot(runner)
    with pytest.raises(PoolExhaustedError, match="needs at least 17 blocks of 4 tokens .* the pool has 16"):
        runner.extend([None] + [0] * 16, [[1] * 6] + [[i] for i in range(16)])
    assert snapshot(runner) == before and keep.resident


def test_pool_exhausted_error_says_what_it_means():
    """fastalign exports it: help() showed RuntimeError's "Unspecified run-time error." (the binding set no docstring;
    rebuild fastalign._C after this change)."""
    assert issubclass(PoolExhaustedError, RuntimeError)
    assert "KV pool cannot hold" in (PoolExhaustedError.__doc__ or "")


def test_failed_forward_leaves_the_pool_as_it_was(runner, model, monkeypatch):
    root = runner.prefill([1, 2, 3, 4, 5, 6])
    before = snapshot(runner)

    def broken(*args):
        raise RuntimeError("device lost")

    monkeypatch.setattr(runner.model_runner, "forward", broken)
    with pytest.raises(RuntimeError, match="device lost"):
        runner.extend([root, root], [[7], [8, 9]])
    assert snapshot(runner) == before
    monkeypatch.undo()
    assert_still_correct(runner, model, root)


@pytest.mark.parametrize("cuts", [None, [[1], [], [2]]])
def test_a_failure_while_the_new_spans_get_their_handles_gives_them_back(runner, model, monkeypatch, cuts):
    """The forward has run and the new spans hold blocks, but the call is not over: an interrupt (Ctrl-C) or an error
    (a device out of memory taking the logits of the spans' last tokens) while the handles were made left the spans
    that had no handle yet live in the tree, holding their blocks for the runner's life. Every point is tried, and a
    retry gives what an undisturbed call gives."""
    root = runner.prefill([1, 2, 3, 4, 5, 6])
    parents, lists = [root, root, 0], [[7, 8], [9], [10, 11, 12]]
    children, _, expected = runner.extend(parents, lists, cuts=cuts, logits="all", hidden="last")
    runner.release([span for row in children for span in (row if cuts else [row])])
    del children
    before = snapshot(runner)
    real_init, real_format = Span.__init__, TreeRunner._format
    handles = 3 + (2 if cuts else 0)
    for fail_at in range(1, handles + 3):   # each handle, then the logits and the hidden states
        made = [0]

        def failing(real, *args):
            made[0] += 1
            if made[0] == fail_at:
                raise KeyboardInterrupt if fail_at % 2 else torch.OutOfMemoryError("CUDA out of memory")
            return real(*args)

        monkeypatch.setattr(Span, "__init__", lambda *args: failing(real_init, *args))
        monkeypatch.setattr(TreeRunner, "_format", staticmethod(lambda *args: failing(real_format, *args)))
        with pytest.raises((KeyboardInterrupt, torch.OutOfMemoryError)):
            runner.extend(parents, lists, cuts=cuts, logits="all", hidden="last")
        monkeypatch.undo()
        gc.collect()
        assert snapshot(runner) == before and all(runner.tree.locks(i) == 0 for i in runner.tree.span_ids())
    children, logits, hidden = runner.extend(parents, lists, cuts=cuts, logits="all", hidden="last")
    assert torch.equal(hidden, expected)


def test_an_interrupt_between_the_forward_and_its_finish_undoes_the_plan(runner, model):
    """The forward of a plan returned, and an interrupt came before the plan was finished: its spans stayed
    locked and live with no handle (a leak no release could reach, as their ids were never returned)."""
    root = runner.prefill([1, 2, 3, 4, 5, 6])
    before = snapshot(runner)
    tree = runner.store.tree

    class Interrupted:
        """The span tree, but its first finish is interrupted (Ctrl-C) before it runs."""
        interrupted = False

        def __getattr__(self, name):
            return getattr(tree, name)

        def finish(self, plan):
            if not self.interrupted:
                self.interrupted = True
                raise KeyboardInterrupt
            tree.finish(plan)

    runner.store.tree = Interrupted()
    with pytest.raises(KeyboardInterrupt):
        runner.extend([root, root], [[7], [8, 9]])
    runner.store.tree = tree
    gc.collect()
    assert snapshot(runner) == before and all(tree.locks(i) == 0 for i in tree.span_ids())
    assert_still_correct(runner, model, root)


def test_a_release_refused_leaves_the_span_to_its_handle(runner, model, monkeypatch):
    """A release refused (here: made from inside a running call's forward) had already detached the handle's
    finalizer: once the handle was dropped, the span stayed in the tree for good."""
    root = runner.prefill([1, 2, 3, 4, 5])
    real_forward = runner.model_runner.forward

    def releasing(*args):
        runner.release(root)
        return real_forward(*args)

    monkeypatch.setattr(runner.model_runner, "forward", releasing)
    with pytest.raises(RuntimeError, match="another call is running on this TreeRunner"):
        runner.extend([root], [[6]])
    monkeypatch.undo()
    assert root.alive
    root = None
    gc.collect()
    assert runner.tree.span_ids() == [] and runner.num_free_blocks == runner.num_blocks


def test_a_release_the_tree_fails_leaves_the_span_to_its_handle(runner):
    """The tree's release of a span fails (an interrupt as it starts): the handle keeps its finalizer, so the span
    goes once the handle is dropped. Detaching the finalizer first left the span in the tree for good."""
    root = runner.prefill([1, 2, 3, 4, 5])
    tree = runner.store.tree

    class Interrupted:
        """The span tree, but its release is interrupted (Ctrl-C) before it runs."""
        def __getattr__(self, name):
            return getattr(tree, name)

        def release(self, span_id):
            raise KeyboardInterrupt

    runner.store.tree = Interrupted()
    with pytest.raises(KeyboardInterrupt):
        runner.release(root)
    runner.store.tree = tree
    assert root.alive
    root = None
    gc.collect()
    assert runner.tree.span_ids() == [] and runner.num_free_blocks == runner.num_blocks


def test_dropping_every_reference_releases_a_span(runner):
    root = runner.prefill([1, 2, 3])
    (child,), _ = runner.extend([root], [[4]])
    child_id = child.id
    del child
    gc.collect()
    assert runner.tree.span_ids() == [root.id]
    runner.release(root)
    assert runner.tree.span_ids() == [] and runner.num_free_blocks == runner.num_blocks
    assert child_id not in runner.tree.span_ids()


@pytest.mark.parametrize("name, part", [("qwen3-head-dim-untied", "layers.1.self_attn.k_norm"),
                                        ("mixtral-moe", "layers.0.mlp"), ("qwen2-untied", "layers.1.input_layernorm"),
                                        ("olmo2-post-norms", "layers.0.post_feedforward_layernorm"),
                                        ("gemma3-sliding-softcap", "layers.1.pre_feedforward_layernorm")])
def test_a_family_model_missing_a_module_of_the_layout_is_not_run_on_the_paged_path(name, part):
    """A model of a paged family whose layers lack a module the paged forward calls (Qwen3's k_norm, an MLP, a
    norm: an edited or partly built model) would fail deep in a forward, or skip the module: the paged runners
    refuse it, naming the module."""
    model = tiny_model(name)
    parent, child = part.rsplit(".", 1)
    delattr(model.model.get_submodule(parent), child)
    index, path = part.split(".", 2)[1:]
    with pytest.raises(ValueError, match=rf"its modules do not follow the Llama layout \(missing "
                                         rf"layers\[{index}\]\.{re.escape(path)}\); .*\) and fallback=False"):
        TreeRunner(model, max_tokens=64, fallback=False)


def test_unsupported_models_and_pool_sizes_are_refused(model):
    bloom = tiny_model("bloom-alibi-fallback")
    with pytest.raises(ValueError, match="unsupported architecture for the paged runners \\(model_type 'bloom' is not "
                                         ".*; BloomForCausalLM cannot run on the paged pool: .*\\) and fallback=False"):
        TreeRunner(bloom, max_tokens=64, fallback=False)
    bert = BertModel(BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                intermediate_size=64)).eval()
    with pytest.raises(ValueError, match="BertModel cannot run on the Hugging Face cache fallback: it is not a causal"):
        TreeRunner(bert, max_tokens=64)
    with pytest.raises(ValueError, match="exactly one of max_tokens or max_bytes"):
        TreeRunner(model)
    with pytest.raises(ValueError, match="exactly one of max_tokens or max_bytes"):
        TreeRunner(model, max_tokens=64, max_bytes=1 << 20)
    with pytest.raises(ValueError, match="max_bytes: expected an int of at least one block"):
        TreeRunner(model, max_bytes=10)
    with pytest.raises(ValueError, match="block_size: expected a positive int"):
        TreeRunner(model, max_tokens=64, block_size=0)
    # on every runner (whether or not it runs attention kernels), and with cascade attention off
    for m in (model, tiny_model("gpt2-learned-positions"), bloom):
        with pytest.raises(ValueError, match="attention_backend must be one of \\('auto', 'triton', 'torch'\\)"):
            TreeRunner(m, max_tokens=64, attention_backend="flash", cascade_attention=False)
    runner = TreeRunner(model, max_bytes=1 << 16, block_size=4)
    per_block = 2 * 2 * 4 * 2 * 12 * 4  # K and V, 2 layers, 4 tokens, 2 kv heads, head_dim 12, fp32
    assert runner.num_blocks == (1 << 16) // per_block and runner.pool.nbytes <= 1 << 16


@pytest.mark.parametrize("name", ["llama-gqa-untied", "gpt2-learned-positions", "bloom-alibi-fallback"])
def test_the_triton_attention_on_the_cpu_without_the_interpreter_is_refused_as_the_ops_refuse_it(name, monkeypatch):
    """attention_backend="triton" for a CPU model without TRITON_INTERPRET raised a RuntimeError on the paged
    runners where linear_cross_entropy(backend="triton") raises a ValueError for the same mistake; and a model that
    PagedHF refused before it read the backend (Bloom) ran on the Hugging Face cache, the request for Triton dropped.
    Resolved once, before any runner is tried: the ops' error on every runner, which no fallback takes for unfit."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    hidden, weight = torch.randn(3, 8), torch.randn(5, 8)
    with pytest.raises(Exception) as ops_error:
        fastalign.linear_cross_entropy(hidden, weight, torch.randint(0, 5, (3,)), backend="triton")
    expected = str(ops_error.value).replace("backend=", "attention_backend=", 1)
    with pytest.raises(ops_error.type) as runner_error:
        TreeRunner(tiny_model(name), max_tokens=64, attention_backend="triton")
    assert str(runner_error.value) == expected
    assert isinstance(runner_error.value, ValueError)


def test_span_handles_know_their_tree(runner):
    root = runner.prefill([1, 2, 3])
    assert isinstance(root, Span) and root.parent is None and len(root) == 3 and root.new_tokens == [1, 2, 3]
    kids, logits = runner.extend([root, root, None], [[4], [5, 6], [7]])
    assert [k.parent for k in kids] == [root, root, None]
    assert [k.tokens for k in kids] == [[1, 2, 3, 4], [1, 2, 3, 5, 6], [7]]
    assert logits.shape == (3, VOCAB)
    runner.pin(kids[1])
    runner.pin(kids[1])
    assert kids[1].pins == 2
    runner.release(root)  # its children keep the prefix
    assert not root.alive and kids[0].tokens == [1, 2, 3, 4]
    runner.release(kids)
    assert runner.tree.span_ids() == [] and runner.num_free_blocks == runner.num_blocks


def test_context_limit_is_inclusive_and_no_sliding_window_shortens_it():
    runner = TreeRunner(tiny_model("qwen2-untied"), max_tokens=256, block_size=4, attention_backend="torch")
    root = runner.prefill([1] * (MAX_POSITIONS - 1))
    runner.extend([root], [[2]], logits=None)                 # exactly the context: fine
    with pytest.raises(ValueError, match="past the model's context of 128"):
        runner.extend([root], [[2, 3]])
    mistral = TreeRunner(tiny_model("mistral-mqa-head-dim"), max_tokens=256, block_size=4, attention_backend="torch")
    assert mistral.max_context == MAX_POSITIONS                # past its sliding window of 22: each layer slides


@pytest.mark.parametrize("cls, config_cls, extra", [
    (MistralForCausalLM, MistralConfig, {"layer_types": ["full_attention"] * 2}),
    (Qwen2ForCausalLM, Qwen2Config, {"use_sliding_window": True, "layer_types": ["full_attention"] * 2}),
    (Qwen2MoeForCausalLM, Qwen2MoeConfig, {"use_sliding_window": True, "num_experts": 4, "num_experts_per_tok": 2,
                                           "moe_intermediate_size": 16, "shared_expert_intermediate_size": 16,
                                           "layer_types": ["sliding_attention", "full_attention"]}),
    (MixtralForCausalLM, MixtralConfig, {"num_local_experts": 4, "num_experts_per_tok": 2}),
    (Qwen3MoeForCausalLM, Qwen3MoeConfig, {"use_sliding_window": True, "num_experts": 4, "num_experts_per_tok": 2,
                                           "moe_intermediate_size": 16}),
    (Qwen3ForCausalLM, Qwen3Config, {"use_sliding_window": True, "head_dim": 8,
                                     "layer_types": ["sliding_attention", "full_attention"]}),
    (LlamaForCausalLM, LlamaConfig, {})])
def test_each_layer_attends_to_the_window_hugging_face_applies(cls, config_cls, extra):
    """Hugging Face's Mistral slides config.sliding_window over every layer and ignores config.layer_types (it only
    warns about them), as Mixtral and Qwen3-MoE do; Qwen2, Qwen2-MoE and Qwen3 slide only their "sliding_attention"
    layers, so with full layers only they attend to the whole sequence past the unused window (Qwen2-MoE's full
    layer, which has no sliding_window attribute, slid by the config's); Llama slides no layer, whatever its config
    names. Rows past the window of 8 match the model run on the full sequence (weights drawn at the scale that gives
    logits of O(1), where a window off by a key shows)."""
    shape = dict(vocab_size=VOCAB, max_position_embeddings=MAX_POSITIONS, hidden_size=32, intermediate_size=64,
                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, attn_implementation="eager")
    torch.manual_seed(0)
    model = cls(config_cls(**shape, **extra, sliding_window=8)).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, p.shape[-1] ** -0.5)
    runner = TreeRunner(model, max_tokens=128, block_size=4, attention_backend="torch")
    assert runner.max_context == MAX_POSITIONS
    seq = list(range(1, 31))
    (child,), logits = runner.extend([runner.prefill(seq[:5])], [seq[5:]], logits="all")
    with torch.no_grad():
        assert (logits[0] - model(torch.tensor([seq])).logits[0, 5:]).abs().max() <= 1e-5


@pytest.mark.parametrize("window", [-5, True, 2.5])
def test_a_sliding_window_that_is_no_positive_int_is_refused(window):
    """transformers accepts a negative sliding_window in a Mistral config (or a bool, a float); the kernels would take
    it for a window."""
    torch.manual_seed(0)
    config = MistralConfig(vocab_size=VOCAB, max_position_embeddings=MAX_POSITIONS, hidden_size=32,
                           intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    object.__setattr__(config, "sliding_window", window)   # past transformers >= 5.2x's type check of config fields
    model = MistralForCausalLM(config).eval()
    with pytest.raises(ValueError, match=f"model: layer 0's sliding window must be a positive int, got {window}"):
        TreeRunner(model, max_tokens=64, attention_backend="torch")


@pytest.mark.parametrize("softcap", [0.0, -1.5, float("inf")])
def test_an_attention_soft_cap_that_is_no_positive_finite_number_is_refused(softcap):
    """Gemma 2's attn_logit_softcapping c caps scores at c * tanh(s / c): 0 gives NaN logits, a negative c silently
    caps as -c would. The paged forward checks it (once per forward, on the first layer) instead of running it."""
    model = tiny_model("gemma2-sliding-softcaps")
    for layer in model.model.layers:
        layer.self_attn.attn_logit_softcapping = softcap
    runner = TreeRunner(model, max_tokens=64, block_size=4, attention_backend="torch")
    message = ("softcap: expected None or a positive finite number that float32 holds (at most 8.51e+37), the c of "
               f"c * tanh(s / c) (Gemma 2's attn_logit_softcapping), got {softcap}")
    with pytest.raises(ValueError, match=re.escape(message)):
        runner.prefill([1, 2, 3])


def test_a_sliding_window_of_one_token_attends_to_itself():
    torch.manual_seed(0)
    model = MistralForCausalLM(MistralConfig(vocab_size=VOCAB, max_position_embeddings=MAX_POSITIONS, hidden_size=32,
                                             intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                             num_key_value_heads=2, sliding_window=1)).eval()
    runner = TreeRunner(model, max_tokens=64, block_size=4, attention_backend="torch")
    seq = [5, 9, 14, 3, 7, 11]
    (child,), logits = runner.extend([runner.prefill(seq[:4])], [seq[4:]], logits="all")
    with torch.no_grad():
        assert (logits[0] - model(torch.tensor([seq])).logits[0, 4:]).abs().max() <= 1e-5


def test_longrope_context_ends_at_its_original_length():
    """Past original_max_position_embeddings LongRoPE rotates every position with its long factors, which
    cached KV cannot follow (it silently gave logits off by ~3): both paths refuse such lengths instead."""
    rope = {"rope_type": "longrope", "rope_theta": 10000.0, "original_max_position_embeddings": 32,
            "short_factor": [1.0] * 4, "long_factor": [4.0] * 4}
    shape = dict(vocab_size=VOCAB, max_position_embeddings=MAX_POSITIONS, hidden_size=32, intermediate_size=64,
                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, attn_implementation="eager",
                 pad_token_id=0, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    phi3 = Phi3Config(**shape, original_max_position_embeddings=32, rope_parameters=rope)
    for model in (LlamaForCausalLM(LlamaConfig(**shape, rope_parameters=rope)).eval(), Phi3ForCausalLM(phi3).eval()):
        runner = TreeRunner(model, max_tokens=128, block_size=4, attention_backend="torch")
        assert runner.max_context == 32
        root = runner.prefill(list(range(20)))
        with pytest.raises(ValueError, match="past the model's context of 32"):
            runner.extend([root], [list(range(13))])
        kids, logits = runner.extend([root, None], [list(range(12)), [5, 6]])  # 32 tokens next to 2: short factors
        for kid, row in zip(kids, logits):
            assert (row - model(torch.tensor([kid.tokens])).logits[0, -1]).abs().max() <= 1e-4


_SHAPE = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, attn_implementation="eager")
_HYBRID = dict(_SHAPE, layer_types=["linear_attention", "full_attention"])
_MLA = dict(_SHAPE, num_hidden_layers=1, num_key_value_heads=4, kv_lora_rank=16, q_lora_rank=None, qk_rope_head_dim=8,
            qk_nope_head_dim=8, v_head_dim=12, moe_intermediate_size=16, first_k_dense_replace=1, n_routed_experts=4,
            num_experts_per_tok=2, n_group=1, topk_group=1)
_RECURRENT = ("its cache holds recurrent state \\(Mamba/linear-attention layers: {kinds} at layers? {layers}\\), not "
              "per-token K and V")
_STATEFUL = ("its cache holds recurrent or compressed state \\(transformers marks {name}ForCausalLM stateful\\), "
             "not per-token K and V")
_MARKS_STATEFUL = hasattr(transformers.PreTrainedModel, "_is_stateful")   # transformers 5.17 to 5.24


# the reasons given without the mark: RWKV's forward takes its own state; DeepSeek-V4 registers its own cache layers
_NO_CACHE = "its forward takes no cache \\(no cache, past_key_values or cache_params argument\\)"
_OWN_CACHE_LAYER = ("its cache layer of kind heavily_compressed_attention is the model's own \\(DeepseekV4HCACache\\), "
                    "not transformers' per-token K and V")


def _stateful(name, otherwise):
    """The reason given for a model that transformers up to 5.24 marks stateful; `otherwise` under a later one."""
    return _STATEFUL.format(name=name) if _MARKS_STATEFUL else otherwise


_MAMBA = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, state_size=4)
# name: (config keyword arguments, why the fallback cannot hold its cache), for tiny configs of every kind of model
# whose cache is not per-token K and V of one shape (the classes: name + Config, name less "Text" + ForCausalLM)
UNFIT = {
    "Qwen3Next": (dict(_HYBRID, head_dim=8, linear_num_value_heads=2, linear_num_key_heads=2, linear_key_head_dim=8,
                       linear_value_head_dim=8, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                       shared_expert_intermediate_size=16), _RECURRENT.format(kinds="linear_attention", layers="0")),
    "Qwen3_5Text": (dict(_HYBRID, head_dim=8, linear_num_value_heads=2, linear_num_key_heads=2, linear_key_head_dim=8,
                         linear_value_head_dim=8), _RECURRENT.format(kinds="linear_attention", layers="0")),
    "Jamba": (dict(_SHAPE, num_experts=2, num_experts_per_tok=1, attn_layer_period=2, attn_layer_offset=1,
                   expert_layer_period=2, expert_layer_offset=1, mamba_d_state=4, mamba_dt_rank=4),
              _RECURRENT.format(kinds="linear_attention", layers="0")),
    "Bamba": (dict(_SHAPE, mamba_n_heads=4, mamba_d_head=16, mamba_d_state=4, mamba_n_groups=1, attn_layer_indices=[1]),
              _RECURRENT.format(kinds="linear_attention", layers="0")),
    "NemotronH": (dict(_SHAPE, hybrid_override_pattern="M*", mamba_num_heads=4, mamba_head_dim=16, ssm_state_size=4,
                       n_groups=1), _RECURRENT.format(kinds="linear_attention", layers="0")),
    "GraniteMoeHybrid": (dict(_SHAPE, num_local_experts=2, num_experts_per_tok=1, mamba_n_heads=4, mamba_d_head=16,
                              mamba_d_state=4, mamba_n_groups=1, layer_types=["mamba", "attention"]),
                         _RECURRENT.format(kinds="linear_attention", layers="0")),
    "FalconH1": (dict(_SHAPE, mamba_n_heads=4, mamba_d_head=16, mamba_d_ssm=64, mamba_d_state=4, mamba_n_groups=1),
                 _RECURRENT.format(kinds="hybrid", layers="0, 1")),
    "Zamba2": (dict(_SHAPE, mamba_d_state=4, mamba_headdim=16, mamba_ngroups=1, num_mem_blocks=1, use_mem_rope=False,
                    layers_block_type=["mamba", "hybrid"]), _RECURRENT.format(kinds="hybrid, linear_attention",
                                                                             layers="0, 1")),
    "Lfm2": (dict(_SHAPE, layer_types=["conv", "full_attention"], block_auto_adjust_ff_dim=False),
             _RECURRENT.format(kinds="conv", layers="0")),
    "MiniMax": (dict(_HYBRID, head_dim=8, num_local_experts=2, num_experts_per_tok=1),
                _RECURRENT.format(kinds="linear_attention", layers="0")),
    "KimiLinear": (dict(_SHAPE, pad_token_id=0, bos_token_id=0, eos_token_id=0, head_dim=8, num_experts=2,
                        num_experts_per_token=1, moe_intermediate_size=16, kv_lora_rank=16, qk_rope_head_dim=8,
                        qk_nope_head_dim=8, v_head_dim=8, linear_attn_config={
                            "kda_layers": [1], "full_attn_layers": [2], "num_heads": 4, "head_dim": 8,
                            "short_conv_kernel_size": 4}), _RECURRENT.format(kinds="linear_attention", layers="0")),
    "OlmoHybrid": (dict(_HYBRID, pad_token_id=0, bos_token_id=0, eos_token_id=0),
                   _RECURRENT.format(kinds="linear_attention", layers="0")),
    "Mamba": (_MAMBA, _RECURRENT.format(kinds="linear_attention", layers="0, 1")),
    "Mamba2": (dict(_MAMBA, num_heads=4, head_dim=16, n_groups=1),
               _RECURRENT.format(kinds="linear_attention", layers="0, 1")),
    "FalconMamba": (_MAMBA, _RECURRENT.format(kinds="linear_attention", layers="0, 1")),
    "Rwkv": (dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, attention_hidden_size=32,
                  intermediate_size=64), _stateful("Rwkv", _NO_CACHE)),
    "xLSTM": (dict(vocab_size=VOCAB, hidden_size=32, embedding_dim=32, num_hidden_layers=2, num_blocks=2, num_heads=4),
              _stateful("xLSTM", "its one-token forward with a DynamicCache failed \\(AttributeError.*rnn_state.*\\)")),
    "RecurrentGemma": (dict(_SHAPE, lru_width=32, attention_window_size=16, block_types=["attention", "recurrent"]),
                       "its cache holds recurrent (state \\(Mamba/linear-attention layers: linear_attention at layer 1|"
                       "or compressed state \\(transformers marks RecurrentGemmaForCausalLM stateful)\\), not "
                       "per-token K and V"),
    "DeepseekV4": (dict(_SHAPE, num_key_value_heads=1, head_dim=16, q_lora_rank=16, moe_intermediate_size=16,
                        n_routed_experts=2, num_experts_per_tok=1, hc_mult=2, o_groups=2, o_lora_rank=16,
                        index_n_heads=2, index_head_dim=8, index_topk=4, sliding_window=8),
                   _stateful("DeepseekV4", _OWN_CACHE_LAYER)),
}


@pytest.mark.parametrize("name", ["DeepseekV2", "DeepseekV3"])
def test_multi_head_latent_attention_runs_on_the_paged_pool(name):
    """DeepSeek's latent attention (K 16 wide, V 12 here; 192 and 128 in DeepSeek-V3) was refused by the fallback,
    whose cache layers hold one shape; PagedHF stores V zero-padded to K's width and drops the padding from the
    output (V2 without a q LoRA, V3 with one)."""
    config_kwargs = dict(_MLA, q_lora_rank=None if name == "DeepseekV2" else 24)
    torch.manual_seed(0)
    model = getattr(transformers, f"{name}ForCausalLM")(getattr(transformers, f"{name}Config")(**config_kwargs)).eval()
    runner = TreeRunner(model, max_tokens=64, block_size=4, attention_backend="torch", fallback=False)
    assert runner.model_runner.pool_shapes == [(4, 16)] and runner.model_runner.layers[0].v_dim == 12
    root = runner.prefill([5, 17, 3, 9, 2])
    (child,), logits = runner.extend([root], [[42, 8, 7]], logits="all")
    with torch.no_grad():
        expected = model(torch.tensor([child.tokens])).logits[0, -3:]
    torch.testing.assert_close(logits[0], expected, rtol=1e-4, atol=1e-4)


# tiny configs of these fail in their own forward (transformers 5.24), with or without a cache
_OWN_FORWARD_FAILS = {"KimiLinear", "Zamba2"}
# these continue from a cache rebuilt from their K/V and recurrent states (Mamba's, FalconMamba's and Jamba's mixers
# one token at a time; Bamba's differ from its whole forward in float32, also one token at a time; MiniMax's cache is
# its own class, the rest keep state outside transformers' linear-attention cache layers)
_STATES_KEPT = {"Qwen3Next", "Qwen3_5Text", "NemotronH", "GraniteMoeHybrid", "FalconH1", "Lfm2", "OlmoHybrid",
                "Mamba2", "Mamba", "FalconMamba", "Jamba"}


@pytest.mark.parametrize("name", sorted(UNFIT))
def test_a_model_the_cache_fallback_refuses_runs_with_its_states_kept_or_recomputed_and_the_warning_says_why(name):
    """Refusals said how the cache fallback's probe failed, not why: "a one-token forward with a DynamicCache failed:
    IndexError('list index out of range')" for Mamba and every hybrid of it. Each reason now names the model's trait;
    and such a model (refused outright before) runs with each span's recurrent state kept (HFStateCacheModel: its
    new tokens alone, one at a time where its mixers continue a state by one token only, as Mamba's), or where its
    cache cannot continue or is no transformers one, on HFRecomputeModel, each row's whole sequence at every call,
    its contexts counted as recomputed; with the outputs of the model's own forward either way."""
    config_kwargs, reason = UNFIT[name]
    config_cls = getattr(transformers, f"{name}Config", None)
    model_cls = getattr(transformers, f"{name.removesuffix('Text')}ForCausalLM", None)
    if config_cls is None or model_cls is None:
        pytest.skip(f"this transformers has no {name}")
    torch.manual_seed(0)
    model = model_cls(config_cls(**config_kwargs)).eval()
    if name in _OWN_FORWARD_FAILS:
        with pytest.raises(ValueError, match=f"^model: {model_cls.__name__} cannot run on the Hugging Face cache "
                                             f"fallback: {reason}; .*; {model_cls.__name__} cannot run by recomputing "
                                             "whole sequences either: its forward without a cache failed"):
            TreeRunner(model, max_tokens=64)
        return
    kept = name in _STATES_KEPT
    ending = ("it runs on Hugging Face's own cache with each span's recurrent state kept" if kept else
              "(; nor with its recurrent states kept: .*)?; it runs by computing each row's whole sequence again at "
              "every call")
    with pytest.warns(UserWarning, match=f"TreeRunner: {model_cls.__name__} cannot run on the paged pool: "
                                         f"(.*; nor on Hugging Face's cache: )?{reason}{'; ' if kept else ''}{ending}"):
        runner = TreeRunner(model, max_tokens=64, block_size=4)
    assert type(runner.model_runner).__name__ == ("HFStateCacheModel" if kept else "HFRecomputeModel")
    assert not runner.paged
    (span,), logits = runner.extend([runner.prefill([5, 17, 3])], [[42, 8]], logits="all")
    rerun = 0 if kept else 3
    assert runner.last_context_rerun.tolist() == [rerun] and runner.recomputed_tokens == rerun
    with torch.no_grad():
        expected = model(torch.tensor([span.tokens]), use_cache=False).logits[0, -2:].float()
    torch.testing.assert_close(logits[0], expected, rtol=1e-4, atol=1e-4)


def test_fallback_without_transformers_cache_layer_names_still_says_why(monkeypatch):
    """The recurrent layers are read from transformers' own cache-layer names; under a transformers without them a
    refusal still names what it can (Mamba: a class transformers marks stateful), not an ImportError."""
    import transformers.cache_utils
    monkeypatch.delattr(transformers.cache_utils, "LinearAttentionCacheLayerMixin")
    config_kwargs, _ = UNFIT["Mamba"]
    torch.manual_seed(0)
    model = transformers.MambaForCausalLM(transformers.MambaConfig(**config_kwargs)).eval()
    reason = _stateful("Mamba", "its one-token forward with a DynamicCache failed")
    with pytest.warns(UserWarning, match=f"MambaForCausalLM cannot run on the paged pool: .*{reason}"):
        TreeRunner(model, max_tokens=64)


@pytest.mark.parametrize("name, reason", [("Rwkv", _NO_CACHE), ("DeepseekV4", _OWN_CACHE_LAYER)])
def test_models_transformers_no_longer_marks_stateful_are_still_named(monkeypatch, name, reason):
    """transformers 5.25 dropped the `_is_stateful` mark that named why RWKV and DeepSeek-V4 cannot run on the cache
    fallback (its tests then failed on the probe's bare finding, an IndexError for RWKV): without the mark, RWKV's
    forward taking no cache and DeepSeek-V4's own compressed cache layers are named."""
    config_kwargs, _ = UNFIT[name]
    model = getattr(transformers, f"{name}ForCausalLM")(getattr(transformers, f"{name}Config")(**config_kwargs)).eval()
    monkeypatch.setattr(type(model), "_is_stateful", False, raising=False)
    with pytest.warns(UserWarning, match=f"{name}ForCausalLM cannot run on the paged pool: (.*; nor on Hugging Face's "
                                         f"cache: )?{reason}; it runs by computing"):
        TreeRunner(model, max_tokens=64)


@pytest.mark.parametrize("logits, keys, values, reason", [
    (None, [1, 2, 1, 8], [1, 2, 1, 8], "it returns no logits"),
    ([1, 1, VOCAB], None, None, "its cache's layer 0 holds no K and V"),
    ([1, 1, VOCAB], [1, 2, 8], [1, 2, 8], "does not hold per-token K and V .* \\(layer 0 holds K \\[1, 2, 8\\] after"),
    ([1, 1, VOCAB], [1, 2, 4, 8], [1, 2, 4, 8], "layer 0 holds K \\[1, 2, 4, 8\\] after one token"),
    ([1, 1, VOCAB], [1, 2, 1, 8], [1, 4, 1, 8], "its K and V differ in shape \\(layer 0 holds K \\[1, 2, 1, 8\\] and V "
                                                "\\[1, 4, 1, 8\\]\\)"),
    ([1, 1, VOCAB], [1, 2, 1, 12], [1, 2, 1, 8], "its K and V differ in head_dim \\(K 12, V 8: multi-head latent "
                                                 "attention\\)"),
    ([1, 1, VOCAB], [1, 2, 1, 8], [1, 2, 1, 8], None)])
def test_fallback_names_what_its_one_token_probe_found_amiss(logits, keys, values, reason):
    """Each way a one-token forward's output and cache can fall short gets its own reason (they shared one: "it
    returns no logits, or its cache does not hold per-token K and V of one shape")."""
    out = SimpleNamespace(logits=None if logits is None else torch.zeros(logits))
    problem = _kv_problem(out, *(None if shape is None else torch.zeros(shape) for shape in (keys, values)))
    assert problem is None if reason is None else re.search(reason, problem)


def test_fallback_refuses_a_model_whose_cache_layers_differ_in_shape():
    """Gemma 4 gives its full-attention layers a larger head_dim (global_head_dim) than its sliding ones: the pool,
    shaped after the first layer, failed at the first prefill deep inside write_kv. The fallback refuses it when made;
    a TreeRunner runs it on PagedHF (a pool layer of each layer's own shape)."""
    config = Gemma4TextConfig(vocab_size=VOCAB, vocab_size_per_layer_input=VOCAB, hidden_size_per_layer_input=8,
                              hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                              num_key_value_heads=2, head_dim=8, global_head_dim=16, sliding_window=8,
                              layer_types=["sliding_attention", "full_attention"],
                              max_position_embeddings=MAX_POSITIONS, attn_implementation="eager")
    model = Gemma4ForCausalLM(config).eval()
    with pytest.raises(ValueError, match=r"Gemma4ForCausalLM cannot run .*: its cache layers differ in shape \(layer 1 "
                                         r"holds K \[1, 2, 1, 16\] and V \[1, 2, 1, 16\], layer 0 K and V "
                                         r"\[1, 2, 1, 8\]\)"):
        HFCacheModel(model, torch.device("cpu"))
    assert TreeRunner(model, max_tokens=64, block_size=4, attention_backend="torch").paged


@pytest.mark.parametrize("wider", ["keys", "values"])
def test_fallback_refuses_a_later_cache_layer_whose_keys_or_values_differ_in_shape(monkeypatch, wider):
    """Layer 1 caches K (or V) of twice the head_dim and the other shaped as layer 0's (a model with per-layer head
    dims; the model itself reads back what it wrote): refused when made, by the shapes it names."""
    class WiderLayer1(DynamicCache):
        def update(self, key_states, value_states, layer_idx, *args, **kwargs):
            states = {"keys": key_states, "values": value_states}
            if layer_idx == 1:
                states[wider] = torch.cat([states[wider], states[wider]], dim=-1)
            keys, values = super().update(states["keys"], states["values"], layer_idx, *args, **kwargs)
            return keys[..., :key_states.shape[-1]], values[..., :value_states.shape[-1]]

    monkeypatch.setattr(hf_cache, "DynamicCache", WiderLayer1)
    k, v = (16, 8) if wider == "keys" else (8, 16)
    with pytest.raises(ValueError, match=rf"BloomForCausalLM cannot run .*: its cache layers differ in shape \(layer 1 "
                                         rf"holds K \[1, 4, 1, {k}\] and V \[1, 4, 1, {v}\], layer 0 K and V "
                                         r"\[1, 4, 1, 8\]\)"):
        HFCacheModel(tiny_model("bloom-alibi-fallback"), torch.device("cpu"))


def test_fallback_refuses_a_model_that_keeps_state_outside_its_cache():
    """RecurrentGemma keeps its recurrent and convolution states in its modules, which rows run one by one on
    the pool's caches would share: the cache fallback refuses it when the runner is made (its logits were silently
    wrong), and it runs on HFRecomputeModel, with its own forward's logits."""
    torch.manual_seed(0)
    recurrent = RecurrentGemmaForCausalLM(RecurrentGemmaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, lru_width=32, attention_window_size=16, block_types=["attention", "recurrent"])).eval()
    # (transformers 5.17 already fails its one-token forward with a DynamicCache, another refusal)
    with pytest.raises(ValueError, match="RecurrentGemmaForCausalLM cannot run on the Hugging Face cache fallback"):
        HFCacheModel(recurrent, torch.device("cpu"))
    with pytest.warns(UserWarning, match="RecurrentGemmaForCausalLM cannot run on the paged pool: .*; it runs by "
                                         "computing each row's whole sequence"):
        runner = TreeRunner(recurrent, max_tokens=64, block_size=4)
    root = runner.prefill([3, 1, 4, 1, 5])
    children, logits = runner.extend([root, root], [[9], [2, 6]])
    with torch.no_grad():
        for child, row in zip(children, logits):
            expected = recurrent(torch.tensor([child.tokens]), use_cache=False).logits[0, -1]
            torch.testing.assert_close(row, expected, rtol=1e-4, atol=1e-4)


def test_a_model_that_fails_the_cache_fallbacks_probes_is_refused_by_it_and_recomputed():
    """XLM asserts that its attention mask covers its new tokens alone, ProphetNet that a cache takes one new token:
    their bare AssertionError escaped the cache fallback's probes (forwards after a cache rebuilt from K/V) and the
    TreeRunner, which goes on to the next fallback only on a refusal (ValueError). Now a refusal that names it; the
    runner recomputes such a model, with its own forward's logits."""
    class MaskOfNewTokensOnly(transformers.BloomForCausalLM):
        def forward(self, input_ids=None, attention_mask=None, **kwargs):
            if attention_mask is not None and attention_mask.shape[1] != input_ids.shape[1]:
                raise AssertionError("mask of new tokens only")
            return super().forward(input_ids=input_ids, attention_mask=attention_mask, **kwargs)

    bloom = tiny_model("bloom-alibi-fallback")
    model = MaskOfNewTokensOnly(bloom.config).eval()
    model.load_state_dict(bloom.state_dict())
    with pytest.raises(ValueError, match=r"MaskOfNewTokensOnly cannot run on the Hugging Face cache fallback: its "
                                         r"forward after a cache rebuilt from its K/V failed \(AssertionError\('mask "
                                         r"of new tokens only'\)\)"):
        HFCacheModel(model, torch.device("cpu"))
    with pytest.warns(UserWarning, match="MaskOfNewTokensOnly cannot run on the paged pool: .*; nor on Hugging Face's "
                                         "cache: its forward after a cache rebuilt .*; it runs by computing each row's "
                                         "whole sequence"):
        runner = TreeRunner(model, max_tokens=64, block_size=4)
    (child,), logits = runner.extend([runner.prefill([3, 1, 4])], [[1, 5]])
    with torch.no_grad():
        torch.testing.assert_close(logits[0], bloom(torch.tensor([child.tokens])).logits[0, -1], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("is_decoder", [False, True])
def test_fallback_refuses_a_model_that_is_not_causal(is_decoder):
    """BertLMHeadModel without is_decoder=True attends both ways (transformers only logs a warning): its logits
    depended on where the tree split a sequence into spans (0.3 apart for one sequence prefilled whole or as
    4 + 3 tokens) and matched neither. Refused; the same model as a decoder runs and matches."""
    torch.manual_seed(0)
    bert = BertLMHeadModel(BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                      intermediate_size=64, is_decoder=is_decoder)).eval()
    if not is_decoder:
        with pytest.raises(ValueError, match="BertLMHeadModel cannot run on the Hugging Face cache fallback: it is not "
                                             "causal"):
            TreeRunner(bert, max_tokens=64)
        return
    runner = TreeRunner(bert, max_tokens=64, block_size=4)
    seq = [5, 9, 14, 3, 7, 11, 20]
    (child,), logits = runner.extend([runner.prefill(seq[:4])], [seq[4:]])
    assert (logits[0] - bert(torch.tensor([seq])).logits[0, -1]).abs().max() <= 1e-4


@pytest.mark.parametrize("name", ["qwen2-untied", "gpt2-learned-positions", "bloom-alibi-fallback"])
def test_a_runner_made_under_inference_mode_works_outside_it(name):
    """A pool allocated under torch.inference_mode() was an inference tensor, which every later call outside
    inference mode failed to write ("Inplace update to inference tensor outside InferenceMode")."""
    model = tiny_model(name)
    with torch.inference_mode():
        runner = TreeRunner(model, max_tokens=64, block_size=4, attention_backend="torch")
        root = runner.prefill([1, 2, 3])
    assert_still_correct(runner, model, root)


@pytest.mark.parametrize("name", ["llama-gqa-untied", "gpt2-learned-positions", "bloom-alibi-fallback"])
@pytest.mark.parametrize("train_from", ["construction", "after"])
def test_a_model_in_training_mode_runs_without_dropout(name, train_from):
    """Dropout (GPT-2's and OPT's 0.1, a Llama's attention_dropout) would make the cached K/V and every logit
    random: both paths run the model as in eval mode, whenever it was put in training mode (the fallback refused a
    training model when made, but ran one trained after with dropout), and leave every module's mode as it was."""
    model = tiny_model(name)
    model.config.attention_dropout = 0.5
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.5
    if train_from == "construction":
        model.train()
    runner = TreeRunner(model, max_tokens=64, block_size=4, attention_backend="torch")
    model.train()
    root = runner.prefill([1, 2, 3])
    (child,), logits = runner.extend([root], [[5, 6]])
    assert all(module.training for module in model.modules())
    with torch.no_grad():
        expected = model.eval()(torch.tensor([child.tokens])).logits[0, -1]
    torch.testing.assert_close(logits[0], expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["gpt2-learned-positions", "bloom-alibi-fallback"])
def test_a_model_training_with_activation_checkpointing_runs_outside_the_llama_family(name):
    """A model in training mode with activation checkpointing on (as the unlearning trainer leaves a policy) runs
    its forward without a cache: the probes of PagedHF and of the fallback must run it as in eval mode too, or they
    refuse the model (the fallback's "a one-token forward with a DynamicCache failed")."""
    model = tiny_model(name)
    enable_activation_checkpointing(model)  # by the name of each transformers version
    model.train()
    runner = TreeRunner(model, max_tokens=64, block_size=4, attention_backend="torch")
    (child,), logits = runner.extend([runner.prefill([1, 2, 3])], [[5, 6]])
    with torch.no_grad():
        expected = model.eval()(torch.tensor([child.tokens])).logits[0, -1]
    torch.testing.assert_close(logits[0], expected, rtol=1e-4, atol=1e-4)


def test_max_tokens_rounds_up_to_whole_blocks():
    model = tiny_model("qwen2-untied")
    assert TreeRunner(model, max_tokens=65, block_size=4).num_blocks == 17
    assert TreeRunner(model, max_tokens=3, block_size=4).num_blocks == 1


def test_pool_sizes_are_checked_at_their_bounds(model):
    """max_tokens must be a positive int, max_bytes an int of at least one block: exactly one block is fine."""
    per_block = 2 * 2 * 4 * 2 * 12 * 4  # K and V, 2 layers, 4 tokens, 2 kv heads, head_dim 12, fp32
    assert TreeRunner(model, max_bytes=per_block, block_size=4).num_blocks == 1
    for max_tokens in (0, 64.0):
        with pytest.raises(ValueError, match="max_tokens: expected a positive int"):
            TreeRunner(model, max_tokens=max_tokens, block_size=4)
    with pytest.raises(ValueError, match="max_bytes: expected an int of at least one block"):
        TreeRunner(model, max_bytes=float(1 << 16), block_size=4)
    for bad in ({"max_tokens": True}, {"max_tokens": 64, "block_size": True}):  # bools are not counts
        with pytest.raises(ValueError, match="expected a positive int"):
            TreeRunner(model, **bad)


def test_a_pool_of_2_to_the_31_blocks_is_refused_before_it_is_allocated(model, monkeypatch):
    """max_tokens=2**31 in blocks of one token allocated the pool, then failed in the span tree's constructor with
    pybind's "incompatible constructor arguments"."""
    def allocated(*args, **kwargs):
        raise AssertionError("the pool was allocated")

    monkeypatch.setattr(KVPool, "__init__", allocated)
    with pytest.raises(ValueError, match=re.escape("max_tokens: 2147483648 tokens make 2147483648 blocks of "
                                                   "block_size=1 tokens, more than the 2147483647")):
        TreeRunner(model, max_tokens=2 ** 31, block_size=1)


def test_a_max_bytes_shared_with_recurrent_states_is_refused_by_the_value_given():
    """A model keeping recurrent states gives half of max_bytes to them: the error quoted that half as if it had been
    passed (3072 for a max_bytes of 6144, asking for the 4096 bytes of a block)."""
    model = tiny_model("qwen3.5-linear-attention-states")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        block = TreeRunner(model, max_tokens=16).pool.nbytes
        with pytest.raises(ValueError, match=rf"at least one block \({block} bytes .*, 2 times that: half of "
                                             rf"max_bytes goes to the recurrent states\), got {block * 3 // 2}$"):
            TreeRunner(model, max_bytes=block * 3 // 2)
        assert TreeRunner(model, max_bytes=2 * block).num_blocks == 1


def test_pool_sizes_take_numpy_integers(model):
    """Sizes computed with NumPy (np.int64) are counts like any int."""
    runner = TreeRunner(model, max_tokens=np.int64(65), block_size=np.int32(4))
    assert runner.num_blocks == 17 and runner.block_size == 4 and type(runner.block_size) is int
    by_bytes = TreeRunner(model, max_bytes=1 << 16, block_size=4).num_blocks
    assert TreeRunner(model, max_bytes=np.uint64(1 << 16), block_size=4).num_blocks == by_bytes > 1


def test_a_model_outside_the_llama_family_refuses_tokens_past_max_position_embeddings():
    runner = TreeRunner(tiny_model("gpt2-learned-positions"), max_tokens=256, block_size=4)
    assert runner.max_context == MAX_POSITIONS
    with pytest.raises(ValueError, match="past the model's context of 128"):
        runner.prefill([1] * (MAX_POSITIONS + 1))


def test_a_composite_model_refuses_tokens_past_its_text_decoders_context():
    """Gemma 3's image-text model keeps max_position_embeddings on its text config alone: read there, not taken as
    no limit (which accepted any length)."""
    model = tiny_model("gemma3-image-text")
    assert getattr(model.config, "max_position_embeddings", None) is None
    runner = TreeRunner(model, max_tokens=256, block_size=4, attention_backend="torch")
    assert runner.max_context == MAX_POSITIONS
    with pytest.raises(ValueError, match="past the model's context of 128"):
        runner.prefill([1] * (MAX_POSITIONS + 1))


def test_fallback_refuses_tokens_past_mpt_max_seq_len():
    """MPT names its context max_seq_len: past it Hugging Face fails with a tensor size mismatch."""
    mpt = MptForCausalLM(MptConfig(vocab_size=VOCAB, d_model=32, n_heads=4, n_layers=2, max_seq_len=16)).eval()
    runner = TreeRunner(mpt, max_tokens=64, block_size=4)
    assert runner.max_context == 16
    with pytest.raises(ValueError, match="past the model's context of 16"):
        runner.prefill([1] * 17)


def test_released_span_kept_as_a_prefix_refuses_every_query_but_alive(runner):
    """Its node still exists (a live child needs it), yet the handle answers only `alive` and its repr."""
    root = runner.prefill([1, 2, 3])
    (child,), _ = runner.extend([root], [[4]])
    runner.release(root)
    assert runner.tree.exists(root.id) and not root.alive
    assert repr(root) == f"Span(id={root.id}, released)" and repr(child) == f"Span(id={child.id}, length=4)"
    for name in ("resident", "pins", "new_tokens", "tokens"):
        with pytest.raises(ValueError, match=f"span: span {root.id} was released"):
            getattr(root, name)


def test_pinning_an_evicted_span_recomputes_it(runner, model):
    root = runner.prefill(list(range(40)))   # 10 of the 16 blocks
    runner.prefill(list(range(40, 80)))      # evicts the root
    assert not root.resident
    runner.pin(root)
    assert root.resident and root.pins == 1
    assert_still_correct(runner, model, root)


def test_spans_of_another_runner_are_refused_by_pin_unpin_and_release(runner, model):
    root = runner.prefill([1, 2, 3])
    runner.pin(root)
    other = TreeRunner(model, max_tokens=16, block_size=4, attention_backend="torch").prefill([1])
    assert other.id == root.id  # the same id in both trees: only the runner check tells them apart
    before = snapshot(runner)
    for op in (runner.pin, runner.unpin, runner.release):
        with pytest.raises(ValueError, match="belongs to another TreeRunner"):
            op(other)
    assert snapshot(runner) == before and root.alive and root.pins == 1
    empty = TreeRunner(model, max_tokens=16, block_size=4, attention_backend="torch")   # no span 0 there: not
    for op in (empty.pin, empty.unpin, empty.release):                               # "released", but foreign
        with pytest.raises(ValueError, match="belongs to another TreeRunner"):
            op(root)


@pytest.mark.parametrize("name", ["qwen2-untied", "gpt2-learned-positions", "bloom-alibi-fallback"])
def test_a_model_whose_weights_are_not_loaded_is_refused(name):
    """A model built on the meta device (no weights) was taken by the paged path, which failed at the first prefill
    with "Cannot copy out of meta tensor; no data!"; the fallback failed in its probe forward with "Tensor.item()
    cannot be called on meta tensors"."""
    cls, make_config = CONFIGS[name]
    with torch.device("meta"):
        model = cls(make_config()).eval()
    with pytest.raises(ValueError, match="model: its weights are not loaded \\(.* on the meta device\\)"):
        TreeRunner(model, max_tokens=64, block_size=4)


@pytest.mark.parametrize("name, part", [
    ("qwen2-untied", "model.layers.0"), ("gpt2-learned-positions", "transformer.h.0"),
    ("bloom-alibi-fallback", "transformer.h.0"), ("qwen2-untied", "model.embed_tokens"),
    ("gpt2-learned-positions", "transformer.wte"), ("bloom-alibi-fallback", "transformer.word_embeddings"),
    ("qwen2-untied", ""), ("gpt2-learned-positions", ""), ("bloom-alibi-fallback", "")])
def test_a_model_offloaded_by_accelerate_is_taken(name, part):
    """accelerate's offloading leaves the offloaded weights on the meta device and its hooks bring them in at each
    forward, so such a model runs, on either path, on its hooks' execution device. Offloaded input embeddings put the
    KV pool (and the fallback's inputs) on the meta device: "unsupported scalarType" at the first extend; a model
    offloaded whole was refused as not loaded."""
    accelerate = pytest.importorskip("accelerate")
    model = tiny_model(name)
    expected = model(torch.tensor([[1, 2, 3, 4]])).logits[0, -1]
    accelerate.cpu_offload(model.get_submodule(part), execution_device=torch.device("cpu"))
    assert any(p.is_meta for p in model.parameters())
    runner = TreeRunner(model, max_tokens=64, block_size=4, attention_backend="torch")
    assert {t.device for t in runner.pool.tensors} == {torch.device("cpu")}
    _, logits = runner.extend([None], [[1, 2, 3, 4]])
    assert (logits[0] - expected).abs().max() <= 1e-4


@pytest.mark.parametrize("name, part", [("qwen2-untied", "model.layers.0.mlp"), ("qwen2-untied", "lm_head"),
                                        ("gpt2-learned-positions", "transformer.h.0.mlp"),
                                        ("bloom-alibi-fallback", "transformer.h.0.mlp")])
def test_a_model_with_a_part_not_loaded_is_refused(name, part):
    """A part on the meta device with no accelerate hook to load it: on the paged path F.linear of a CPU input and a
    meta weight returns uninitialised memory, so the logits were garbage, silently; the fallback refused the model
    for a failed probe forward ("Tensor on device meta is not on the expected device cpu!")."""
    model = tiny_model(name)
    model.get_submodule(part).to("meta")
    with pytest.raises(ValueError, match=f"^model: its weights are not loaded \\({part}[.a-z_0-9]* has no accelerate "
                                         "hook to load its parameters, which are on the meta device\\)"):
        TreeRunner(model, max_tokens=64, block_size=4, attention_backend="torch")


@pytest.mark.parametrize("name, block", [("qwen2-untied", "model.layers.1"),
                                         ("gpt2-learned-positions", "transformer.h.1"),
                                         ("bloom-alibi-fallback", "transformer.h.1")])
def test_a_model_dispatched_over_two_devices_is_refused(name, block):
    """A device_map over two GPUs gives each block a hook moving its inputs to its device. The paged path calls the
    layers' submodules, past those hooks, with its activations and KV pool on the embeddings' device ("Expected all
    tensors to be on the same device"), and the fallback's caches, gathered from the one pool, would meet layers on
    another device; the CPU has one device, so the block here has only its hook (tests/test_model_devices.py)."""
    pytest.importorskip("accelerate")
    from tests.test_model_devices import dispatched_to
    model = tiny_model(name)
    dispatched_to(model.get_submodule(block), "cuda:1")
    with pytest.raises(ValueError, match=f"^model: a TreeRunner runs the whole model on one device, but it computes on "
                                         f"cpu \\([a-z_.]+\\) and cuda:1 \\({block}\\)"):
        TreeRunner(model, max_tokens=64, block_size=4, attention_backend="torch")


@pytest.mark.parametrize("name", ["qwen2-untied", "gpt2-learned-positions", "bloom-alibi-fallback"])
def test_a_model_whose_dtype_changed_since_the_runner_was_made_is_refused_by_name(name):
    """model.to(torch.bfloat16) after making the runner: every later call failed deep in the attention ops ("k:
    expected dtype torch.float32 (that of k_cache), got torch.bfloat16"), naming the runner's internals. Each call
    says the model changed and what to do; the model back in its dtype runs again."""
    model = tiny_model(name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # the fallback's
        runner = TreeRunner(model, max_tokens=64, block_size=4)
    span = runner.prefill([1, 2, 3])
    model.to(torch.bfloat16)
    for call in (lambda: runner.extend([span], [[4]]), lambda: runner.prefill([5]), lambda: runner.pin(span)):
        with pytest.raises(ValueError, match="^model: its weights changed from torch.float32 on cpu to torch.bfloat16 "
                                             "on cpu \\([a-z_.]+\\) since this TreeRunner was made for them; make a "
                                             "new TreeRunner"):
            call()
    model.to(torch.float32)   # its weights rounded to bf16: a new root, whose KV they compute
    _, logits = runner.extend([None], [[1, 2, 3, 4]])
    with torch.no_grad():
        torch.testing.assert_close(logits[0], model(torch.tensor([[1, 2, 3, 4]])).logits[0, -1], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("part, dtype, before, named", [
    ("embed_tokens", torch.float32, "bfloat16", r"model\.embed_tokens\.weight"),
    ("layers", torch.bfloat16, "float32", r"model\.layers\.0\.[a-z_.]+")], ids=["embeddings", "layers"])
def test_weights_whose_dtype_changed_under_a_runner_of_mixed_dtypes_are_refused_by_name(part, dtype, before, named):
    """bf16 embeddings before fp32 layers: the pool holds fp32 K/V, and the runner watches the embeddings (the first
    floating weight) as well as the first fp32 one. Watching the pool's dtype alone, a change of the embeddings went
    unchecked; watching the embeddings alone, a change of the layers would."""
    model = tiny_model("llama-gqa-untied")
    model.model.embed_tokens.to(torch.bfloat16)
    runner = TreeRunner(model, max_tokens=64, block_size=4, attention_backend="torch")
    span = runner.prefill([5, 9, 14])
    getattr(model.model, part).to(dtype)
    with pytest.raises(ValueError, match=rf"^model: its weights changed from torch.{before} on cpu to {dtype} on cpu "
                                         rf"\({named}\) since this TreeRunner was made for them"):
        runner.extend([span], [[3]])


def test_a_model_moved_to_another_device_under_its_runner_is_refused_by_name():
    """The watched weights' device is checked as their dtype is: a model moved after the runner was made (to the meta
    device here, the one other device a CPU-only run has) is refused by name at the next call."""
    model = tiny_model("llama-gqa-untied")
    runner = TreeRunner(model, max_tokens=64, block_size=4, attention_backend="torch")
    span = runner.prefill([5, 9, 14])
    model.to("meta")
    with pytest.raises(ValueError, match=r"^model: its weights changed from torch.float32 on cpu to torch.float32 on "
                                         r"meta \(model.embed_tokens.weight\) since this TreeRunner was made"):
        runner.extend([span], [[3]])


@pytest.mark.parametrize("name", ["qwen2-untied", "gpt2-learned-positions", "mpt-alibi-fallback"])
def test_prefill_names_its_own_argument(name):
    """prefill's bad token ids were blamed on "token_lists[0]", an argument of extend that prefill's caller never
    passed."""
    runner = TreeRunner(tiny_model(name), max_tokens=256, block_size=4)
    cases = [([], "expected a non-empty 1-D sequence of int token ids"), ([VOCAB], "token id 101 is outside"),
             ([1] * (MAX_POSITIONS + 1), "the child would hold 129 tokens, past the model's context of 128")]
    for token_ids, message in cases:
        with pytest.raises(ValueError, match=f"^token_ids: {message}"):
            runner.prefill(token_ids)
    assert runner.tree.span_ids() == [] and runner.num_free_blocks == runner.num_blocks


def test_arguments_of_the_wrong_kind_are_named(runner, model):
    """Were Python's and numpy's own errors, naming no argument: "'Span' object is not iterable" (one span where
    extend takes a list), "'NoneType' object is not iterable", "setting an array element with a sequence" (a
    ragged nested list) and, for a model that is not one, "'NoneType' object has no attribute 'parameters'"."""
    root = runner.prefill([1, 2, 3])
    before = snapshot(runner)
    cases = [
        (lambda: runner.extend(root, [[1]]), "parents: expected a sequence of parents, .* got Span"),
        (lambda: runner.extend([root], None), "token_lists: expected one sequence of token ids per parent, got "
                                              "NoneType"),
        (lambda: runner.extend([root], [[[1], [2, 3]]]), "token_lists\\[0\\]: expected a non-empty 1-D sequence of "
                                                         "int token ids, got shape \\[2\\] of object"),
        (lambda: runner.prefill([[1], [2, 3]]), "token_ids: expected a non-empty 1-D sequence of int token ids"),
        (lambda: runner.extend([root], [[1, 2]], cuts=[1]), "cuts\\[0\\]: expected a 1-D sequence of int offsets .*, "
                                                            "got int"),
        (lambda: runner.extend([root], [[1, 2]], cuts=5), "cuts: expected one sequence of offsets per parent"),
        (lambda: runner.release(None), "spans: expected a Span or an iterable of Spans, got NoneType"),
        # were AttributeErrors ("'NoneType' object has no attribute '_runner'")
        (lambda: runner.release([3]), "spans\\[0\\]: expected a Span of this runner, got int"),
        (lambda: runner.pin(None), "span: expected a Span of this runner, got NoneType"),
        (lambda: runner.unpin("root"), "span: expected a Span of this runner, got str"),
    ]
    for call, message in cases:
        with pytest.raises(ValueError, match=message):
            call()
    assert snapshot(runner) == before
    assert_still_correct(runner, model, root)
    with pytest.raises(ValueError, match="model: expected a loaded Hugging Face causal LM .* got NoneType"):
        TreeRunner(None, max_tokens=64)
    for flag in ("fallback", "cascade_attention", "cuda_graphs"):  # a string such as "no" counted as True
        with pytest.raises(ValueError, match=f"{flag}: expected True or False, got 'no'"):
            TreeRunner(model, max_tokens=64, **{flag: "no"})


@pytest.mark.parametrize("duplicate", [copy.copy, copy.deepcopy, pickle.dumps])
def test_copying_or_pickling_a_runner_is_refused_naming_it(runner, duplicate):
    """copy.deepcopy copied the whole model, then failed with "cannot pickle 'fastalign._C.SpanTree' object", as did
    pickle: neither named the runner nor what to do."""
    with pytest.raises(TypeError, match="a TreeRunner cannot be copied or pickled: .* make a new TreeRunner on the "
                                        "model, or on the copy of it"):
        duplicate(runner)


def test_auto_attention_keeps_a_float64_model_on_the_torch_path_on_cuda_too(monkeypatch):
    """attention_backend="auto" for a float64 model on CUDA took the Triton kernel, which takes no float64: the runner
    was made and its first extend failed. Shown on the CPU with the backend resolved as for a CUDA model."""
    import fastalign.runtime.tree_runner as tree_runner_module
    resolve = tree_runner_module.resolve_backend
    monkeypatch.setattr(tree_runner_module, "resolve_backend", lambda backend, device, *rest: resolve(
        backend, torch.device("cuda"), *rest))
    model = tiny_model("llama-gqa-untied", dtype=torch.float64)
    runner = TreeRunner(model, max_tokens=64, block_size=4)
    _, logits = runner.extend([None], [[1, 2, 3, 4]])
    torch.testing.assert_close(logits, model(torch.tensor([[1, 2, 3, 4]])).logits[:, -1].float(), rtol=1e-5,
                               atol=1e-5)
