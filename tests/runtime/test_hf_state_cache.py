"""HFStateCacheModel: what it runs, what it keeps and what it refuses. (Its random trees match Hugging Face's
logits in test_tree_runner.py, on the "-states" models of tiny_models.py.)"""
import warnings

import pytest
import torch

from fastalign import TreeRunner
from fastalign.runtime.hf_state_cache import HFStateCacheModel
from fastalign.runtime.kv_pool import KVPool
from tests.runtime.tiny_models import CountedForward, reference, tiny_model


def state_runner(name="qwen3.5-linear-attention-states", **kwargs):
    """(model, TreeRunner on HFStateCacheModel, the model's forward calls: (batch rows, tokens per row, logits
    positions kept))."""
    model = tiny_model(name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # the warning that it runs with its states kept (test_tree_runner_errors.py)
        runner = TreeRunner(model, block_size=4, attention_backend="torch", **({"max_tokens": 64} | kwargs))
    assert type(runner.model_runner).__name__ == "HFStateCacheModel"
    calls = []
    runner.model_runner.model = CountedForward(model, calls)
    return model, runner, calls


def assert_matches(model, spans, logits):
    for span, row_logits in zip(spans, logits):
        torch.testing.assert_close(row_logits, reference(model, span)[0][-len(row_logits):], rtol=1e-4, atol=1e-4)


def test_children_extended_alike_run_as_one_batch_of_their_new_tokens_alone():
    """Three children of one span extended by one token each are one forward of 3 rows of 1 token, from the
    parent's state; a row of another length is its own. Nothing runs again."""
    model, runner, calls = state_runner()
    root = runner.prefill([5, 17, 3, 9, 2])
    children, logits = runner.extend([root, root, root, root], [[1], [2], [3], [4, 6]], logits="all")
    assert calls == [(1, 5, 1), (3, 1, 1), (1, 2, 2)]
    assert runner.last_context_rerun.tolist() == [0, 0, 0, 0] and runner.recomputed_tokens == 0
    assert_matches(model, children, logits)
    (grandchild,), logits = runner.extend([children[3]], [[7, 8, 9]], logits="all")   # a state made by a forward
    assert calls[-1] == (1, 3, 3) and runner.recomputed_tokens == 0
    assert_matches(model, [grandchild], logits)


def test_a_row_on_an_earlier_row_of_the_call_starts_from_the_state_that_row_left():
    """Rows that build on one another in one call run in order, each from the state the previous one stored: no
    token runs twice, though the three rows are alike in length."""
    model, runner, calls = state_runner()
    root = runner.prefill([5, 17, 3])
    chain, logits = runner.extend([root, 0, 1], [[1, 2], [3, 4], [6, 7]], logits="all")
    assert calls[1:] == [(1, 2, 2)] * 3 and runner.recomputed_tokens == 0
    assert_matches(model, chain, logits)


def test_a_span_without_a_state_runs_from_its_nearest_ancestor_that_has_one():
    """A span made at a cut keeps no state: extending it runs the tokens after the nearest ancestor with one again
    (here the root's), counted as recomputed, with the full sequence's logits."""
    model, runner, calls = state_runner()
    root = runner.prefill([5, 17, 3])
    ((cut, child),), _ = runner.extend([root], [[1, 2, 3, 4]], cuts=[[2]])
    assert cut.id not in runner.model_runner.states and child.id in runner.model_runner.states
    (grandchild,), logits = runner.extend([cut], [[9]], logits="all")
    assert calls[-1] == (1, 3, 1)   # the cut's 2 tokens again, then its new one; logits of the new one alone
    assert runner.last_context_rerun.tolist() == [2] and runner.recomputed_tokens == 2
    assert_matches(model, [grandchild], logits)


def test_states_stay_within_one_per_pool_block_dropping_released_then_least_recent_but_pinned():
    """The runner keeps at most one state per pool block: past that, first the states of spans gone from the tree,
    then the least recently used, a pinned span's never; results stay the Hugging Face model's."""
    model, runner, _ = state_runner(max_tokens=32)   # 8 blocks
    states = runner.model_runner.states
    root = runner.prefill([5, 17, 3])
    runner.pin(root)
    first = runner.extend([root], [[1]], logits=None)[0][0]
    runner.release(first)
    gone = first.id
    spans = [runner.extend([root], [[token]], logits=None)[0][0] for token in range(10, 17)]   # 9 states made
    assert len(states) == 8 and gone not in states and root.id in states
    (oldest, *_), newest = spans, runner.extend([spans[-1]], [[40]], logits=None)[0][0]
    assert len(states) == 8 and oldest.id not in states and root.id in states and newest.id in states
    (child,), logits = runner.extend([oldest], [[41]], logits="all")   # from the root's state: 1 token again
    assert runner.last_context_rerun.tolist() == [1]
    assert_matches(model, [child], logits)


def test_max_bytes_counts_one_state_per_block_beside_the_pool():
    model, runner, _ = state_runner()
    mr = runner.model_runner
    per_block = KVPool.bytes_per_block(mr.pool_shapes, block_size=4, dtype=mr.dtype) + mr.state_bytes
    assert mr.state_bytes > 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sized = TreeRunner(model, max_bytes=10 * per_block + per_block // 2, block_size=4)
    assert sized.num_blocks == 10


def test_a_pure_state_space_model_holds_nothing_in_the_pool_but_runs_its_new_tokens_alone():
    """Mamba 2 has no attention layer: the pool holds one placeholder per token, each span's state does the rest."""
    model, runner, calls = state_runner("mamba2-states")
    assert runner.model_runner.attention_layers == [] and runner.model_runner.pool_shapes == [(1, 1)]
    root = runner.prefill([5, 17, 3, 9])
    (child,), logits = runner.extend([root], [[1, 2]], logits="all")
    assert calls[-1] == (1, 2, 2) and runner.recomputed_tokens == 0
    assert_matches(model, [child], logits)


def test_a_cache_that_does_not_continue_from_its_states_is_refused():
    """Mamba's mixers run several new tokens as a prefill, dropping the state they were given (their logits hardly
    move on a tiny random model, their states do): refused, with the reason."""
    with pytest.raises(ValueError, match="^model: MambaForCausalLM cannot run on Hugging Face's cache with its "
                                         "recurrent states kept per span: its logits after a cache rebuilt from its "
                                         "K/V and states differ"):
        HFStateCacheModel(tiny_model("mamba-recompute"), torch.device("cpu"))


def test_a_cache_layer_that_is_not_full_attention_is_refused():
    """Bloom's cache is per-token K/V alone (HFCacheModel's case): refused for holding no linear-attention state."""
    with pytest.raises(ValueError, match="cannot run on Hugging Face's cache with its recurrent states kept per span: "
                                         "its cache holds no linear-attention state"):
        HFStateCacheModel(tiny_model("bloom-alibi-fallback"), torch.device("cpu"))
