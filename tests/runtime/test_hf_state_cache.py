"""HFStateCacheModel: what it runs, what it keeps and what it refuses. (Its random trees match Hugging Face's
logits in test_tree_runner.py, on the "-states" models of tiny_models.py.)"""
import warnings

import pytest
import torch
import transformers

from fastalign import TreeRunner
from fastalign.runtime.hf_state_cache import HFStateCacheModel
from fastalign.runtime.kv_pool import KVPool
from tests.runtime.tiny_models import VOCAB, assert_matches, counted_runner, fill_with_nan, reference, tiny_model
from tests.vocab_rows import rows_of_prefill_last_and_cuts


def state_runner(name="qwen3.5-linear-attention-states", **kwargs):
    """counted_runner's (model, runner, calls) on HFStateCacheModel."""
    return counted_runner(name, "HFStateCacheModel", **kwargs)


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


@pytest.mark.parametrize("name", ["qwen3.5-linear-attention-states", "mamba2-states"])
def test_rows_from_states_of_different_lengths_run_as_one_batch_their_contexts_left_padded(name):
    """Rows alike in what they run but starting from spans of 8, 12 and 10 tokens (two prompts' trees, say) ran as
    three forwards, one per context length: now one, the attention layers' contexts left-padded in one cache and
    the padding masked (no attention layer, as Mamba 2: nothing to pad), with each row's own positions; the states
    it leaves are each row's own (their children, again of three context lengths, match too). The pool's unwritten
    slots are NaN: padding read from them would poison the logits."""
    model, runner, calls = state_runner(name, max_state_bytes=1 << 20)
    assert runner.model_runner.pads_context
    fill_with_nan(runner.pool)
    root = runner.prefill([5, 17, 3, 9, 1, 1, 4, 8])
    (longer,), _ = runner.extend([root], [[9, 2, 8, 1]], logits=None)
    other = runner.prefill([4, 4, 12, 30, 6, 2, 7, 9, 11, 13])
    del calls[:]
    children, logits, hidden = runner.extend([root, longer, other], [[1, 2], [3, 4], [5, 6]], logits="all",
                                             hidden="all")
    assert calls == [(3, 2, 2)] and runner.recomputed_tokens == 0
    assert_matches(model, children, logits)
    for span, row_hidden in zip(children, hidden):
        torch.testing.assert_close(row_hidden, reference(model, span)[1], rtol=1e-4, atol=1e-4)
    grandchildren, logits = runner.extend(children, [[7], [8], [9]], logits="all")
    assert calls[-1] == (3, 1, 1) and runner.recomputed_tokens == 0
    assert_matches(model, grandchildren, logits)


@pytest.mark.parametrize("name, forwards", [("qwen3.5-linear-attention-states", [(1, 1, 1), (1, 1, 1)]),
                                             ("mamba2-states", [(2, 1, 1)])])
def test_rows_from_contexts_a_power_of_two_apart_run_apart_unless_nothing_is_padded(name, forwards):
    """Contexts of 3 and 12 tokens: padded to 12, the shorter one's attention would cost four times its own, so the
    rows run apart; with no attention layer (Mamba 2) nothing is padded and they run together."""
    model, runner, calls = state_runner(name, max_state_bytes=1 << 20)
    short, long = runner.prefill([5, 17, 3]), runner.prefill(list(range(1, 13)))
    del calls[:]
    children, logits = runner.extend([short, long], [[1], [2]], logits="all")
    assert calls == forwards
    assert_matches(model, children, logits)


@pytest.mark.parametrize("first", ["new root", "continuation"])
def test_with_no_attention_layer_new_roots_and_rows_from_a_state_run_apart(first):
    """Mamba 2 pads nothing, so rows from states of any length run as one batch, but a new root has no state to start
    from: run with rows that do, it would be given one (or theirs dropped), whichever comes first in the call."""
    model, runner, calls = state_runner("mamba2-states", max_state_bytes=1 << 20)
    root = runner.prefill([5, 17, 3])
    del calls[:]
    parents, lists = [None, root], [[7, 8], [1, 2]]
    if first == "continuation":
        parents, lists = parents[::-1], lists[::-1]
    children, logits = runner.extend(parents, lists, logits="all")
    assert sorted(calls) == [(1, 2, 2), (1, 2, 2)]
    assert_matches(model, children, logits)


def test_rows_alike_run_together_wherever_they_are_in_the_call():
    """The rows of one, two and one new tokens ran as three forwards, the two alike being apart in the call: now the
    alike ones run as one, and each row still gets its own outputs."""
    model, runner, calls = state_runner()
    root = runner.prefill([5, 17, 3, 9])
    del calls[:]
    children, logits = runner.extend([root, root, root], [[1], [2, 3], [4]], logits="all")
    assert calls == [(2, 1, 1), (1, 2, 2)]
    assert_matches(model, children, logits)


def test_rows_on_rows_of_the_call_run_level_by_level():
    """Two children of the root, each with a child of its own in the same call, interleaved: the rows on rows of the
    call wait for them, as one batch (the level above), not one batch each; no token runs twice."""
    model, runner, calls = state_runner()
    root = runner.prefill([5, 17, 3, 9])
    del calls[:]
    spans, logits = runner.extend([root, 0, root, 2], [[1], [2], [3], [4]], logits="all")
    assert calls == [(2, 1, 1), (2, 1, 1)] and runner.recomputed_tokens == 0
    assert_matches(model, spans, logits)


def test_children_of_a_span_whose_state_was_dropped_run_its_tokens_again_once_in_a_call():
    """Two children (of one and two new tokens) of a span whose state was dropped, in one call: each ran the span's
    tokens again (twice the cost, twice counted); now the first one's run keeps the state, and the second starts
    from it, a level above."""
    model, runner, calls = state_runner()
    root = runner.prefill([5, 17, 3])
    (parent,), _ = runner.extend([root], [[10, 7]], logits=None)
    runner.model_runner.states.clear()
    del calls[:]
    children, logits = runner.extend([parent, parent], [[1], [2, 3]], logits="all")
    assert calls == [(1, 5, 1), (1, 1, 1), (1, 2, 2)]
    assert runner.last_context_rerun.tolist() == [5, 0] and runner.recomputed_tokens == 5
    assert_matches(model, children, logits)


def test_a_row_whose_nearest_state_another_row_of_the_call_keeps_again_starts_from_it():
    """A span and its child, both without a state, extended in one call: the row on the child ran the span's tokens
    again too, from the root's state; now it waits for the state the row on the span keeps (a level above), and
    runs the child's tokens alone again."""
    model, runner, calls = state_runner()
    root = runner.prefill([5, 17, 3])
    (span,), _ = runner.extend([root], [[10, 7]], logits=None)
    (child,), _ = runner.extend([span], [[8, 6, 4]], logits=None)
    del runner.model_runner.states[span.id], runner.model_runner.states[child.id]
    del calls[:]
    spans, logits = runner.extend([span, child], [[1], [2]], logits="all")
    assert calls == [(1, 2, 1), (1, 1, 1), (1, 3, 1), (1, 1, 1)]
    assert runner.last_context_rerun.tolist() == [2, 3] and runner.recomputed_tokens == 5
    assert_matches(model, spans, logits)


def test_a_row_with_cuts_runs_piece_by_piece_keeping_the_state_at_each_cut():
    """A span made at a cut keeps its state too (the row runs one forward per piece between its cuts; here a new
    root's, its first span at a cut): a child of it runs its new token alone."""
    model, runner, calls = state_runner()
    ((root, cut, child),), logits, hidden = runner.extend([None], [[5, 17, 3, 1, 2, 3, 4]], cuts=[[3, 5]],
                                                          logits="all", hidden="all")
    assert calls == [(1, 3, 3), (1, 2, 2), (1, 2, 2)] and {root.id, cut.id, child.id} <= set(runner.model_runner.states)
    assert_matches(model, [root, cut, child], [logits[0][:3], logits[0][3:5], logits[0][5:]])
    for span, part in ((root, hidden[0][:3]), (cut, hidden[0][3:5]), (child, hidden[0][5:])):
        torch.testing.assert_close(part, reference(model, span)[1], rtol=1e-4, atol=1e-4)
    (grandchild,), logits = runner.extend([cut], [[9]], logits="all")
    assert calls[-1] == (1, 1, 1) and runner.recomputed_tokens == 0
    assert_matches(model, [grandchild], logits)


def test_past_its_capacity_the_runner_drops_released_spans_states_then_inner_ones_then_leaves_but_pinned():
    """Released spans' states go first (one kept in the tree by a live child too: no call extends it), then those a
    row has started from (inner nodes of a search, extended less often than its leaves), then the rest, each least
    recently used first; a pinned span's never."""
    model, runner, _ = state_runner()
    mr = runner.model_runner
    mr.state_capacity = 4
    root = runner.prefill([5, 17, 3])
    runner.pin(root)

    def child(parent, tokens):
        return runner.extend([parent], [tokens], logits=None)[0][0]
    released = child(root, [1])
    kept = child(released, [2])
    runner.release(released)
    old = child(root, [10, 7])
    middle = child(root, [11, 7])
    assert set(mr.states) == {root.id, kept.id, old.id, middle.id}   # the released span's went first
    newest = child(middle, [8])
    assert set(mr.states) == {root.id, kept.id, old.id, newest.id}   # then the one a row started from
    other = child(root, [12])
    assert set(mr.states) == {root.id, old.id, newest.id, other.id}   # then the least recently used leaf; the root,
    # started from and the least recently used, is pinned


def test_a_released_span_kept_by_a_live_child_loses_its_state_before_a_span_rows_started_from():
    """A cut's span, released while its child lives (it stays in the tree, but no call extends it), was never started
    from: its state goes before the root's, which a row started from (released spans' go first, whatever the rest's
    order)."""
    model, runner, _ = state_runner()
    states = runner.model_runner
    states.state_capacity = 3
    root = runner.prefill([5, 17, 3])
    ((cut, child),), _ = runner.extend([root], [[1, 2, 3]], cuts=[[1]], logits=None)
    runner.release(cut)
    assert set(states.states) == {root.id, cut.id, child.id} and cut.id not in states.started_from
    (grandchild,), logits = runner.extend([child], [[4]], logits="all")
    assert set(states.states) == {root.id, child.id, grandchild.id}
    assert_matches(model, [grandchild], logits)


def test_among_spans_rows_started_from_the_least_recently_used_goes_first():
    """A state counts as used when a row starts from it: the root's, made first but started from last, stays; the
    child's, started from before, goes (not the grandchild's, a leaf, nor the root's second child's)."""
    model, runner, _ = state_runner()
    mr = runner.model_runner
    mr.state_capacity = 3
    root = runner.prefill([5, 17, 3])
    (child,), _ = runner.extend([root], [[1]], logits=None)
    (grandchild,), _ = runner.extend([child], [[2]], logits=None)
    (second,), _ = runner.extend([root], [[4]], logits=None)
    assert set(mr.states) == {root.id, grandchild.id, second.id}


def test_an_inner_node_loses_its_state_before_the_leaves():
    """The root, the first span of the runner, has two children: its state goes before the leaves' (its first
    child's, started from more recently, stays)."""
    model, runner, _ = state_runner()
    mr = runner.model_runner
    mr.state_capacity = 3
    root = runner.prefill([5, 17, 3])
    first, second = (runner.extend([root], [[token]], logits=None)[0][0] for token in (1, 2))
    (grandchild,), _ = runner.extend([first], [[4]], logits=None)
    assert root.id == 0 and set(mr.states) == {first.id, second.id, grandchild.id}


def test_a_span_whose_state_was_dropped_runs_from_its_nearest_ancestor_that_has_one_and_keeps_it_again():
    """A span whose state was dropped runs the tokens after its nearest ancestor with one again (counted as
    recomputed), in a forward of their own that keeps its state again for its next children."""
    model, runner, calls = state_runner()
    root = runner.prefill([5, 17, 3])
    (old,), _ = runner.extend([root], [[10, 7]], logits=None)
    del runner.model_runner.states[old.id]
    (child,), logits = runner.extend([old], [[41]], logits="all")
    assert calls[-2:] == [(1, 2, 1), (1, 1, 1)] and runner.last_context_rerun.tolist() == [2]
    assert runner.recomputed_tokens == 2 and old.id in runner.model_runner.states
    assert_matches(model, [child], logits)
    (second,), logits = runner.extend([old], [[42]], logits="all")
    assert calls[-1] == (1, 1, 1) and runner.recomputed_tokens == 2
    assert_matches(model, [second], logits)


def test_state_bytes_are_the_bytes_of_a_kept_state():
    """The memory bound counts every state tensor of a span: state_bytes is what one kept state takes."""
    _, runner, _ = state_runner()
    root = runner.prefill([5, 17, 3])
    states = runner.model_runner
    assert states.state_bytes == sum(t.numel() * t.element_size() for t in states.states[root.id])


def test_states_take_as_many_bytes_as_the_pool_and_max_bytes_is_shared_half_and_half():
    model, runner, _ = state_runner(max_tokens=64)
    mr = runner.model_runner
    assert mr.state_bytes > 0 and mr.state_capacity == runner.pool.nbytes // mr.state_bytes
    per_block = KVPool.bytes_per_block(mr.pool_shapes, block_size=4, dtype=mr.dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sized = TreeRunner(model, max_bytes=20 * per_block + 3, block_size=4)
    assert sized.num_blocks == 10 and sized.model_runner.state_capacity == 10 * per_block // mr.state_bytes


@pytest.mark.parametrize("sizing", [dict(max_tokens=64), dict(max_bytes=1 << 20)])
def test_max_state_bytes_sizes_the_states_apart_from_the_pool(sizing):
    """Given max_state_bytes, the states take that many bytes whatever the pool, and max_bytes is the pool's alone."""
    model = tiny_model("qwen3.5-linear-attention-states")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        runner = TreeRunner(model, block_size=4, max_state_bytes=50_000, **sizing)
    mr = runner.model_runner
    assert mr.state_capacity == 50_000 // mr.state_bytes
    per_block = KVPool.bytes_per_block(mr.pool_shapes, block_size=4, dtype=mr.dtype)
    assert runner.num_blocks == (16 if "max_tokens" in sizing else (1 << 20) // per_block)


@pytest.mark.parametrize("value, match", [(0, "expected a positive int or None, got 0"),
                                          (1.5, "expected a positive int or None, got 1.5"),
                                          (1 << 20, "LlamaForCausalLM keeps no recurrent state \\(it runs on "
                                                    "PagedLlama\\), so there is nothing to give room to")])
def test_max_state_bytes_is_refused_where_it_means_nothing(value, match):
    with pytest.raises(ValueError, match=f"^max_state_bytes: {match}"):
        TreeRunner(tiny_model("llama-gqa-untied"), max_tokens=64, max_state_bytes=value)


def test_max_state_bytes_that_holds_no_state_is_refused_naming_what_one_takes():
    """A room smaller than one span's state was taken as room for one (more bytes than given): refused."""
    model, runner, _ = state_runner()
    state_bytes = runner.model_runner.state_bytes
    with pytest.raises(ValueError, match=f"^max_state_bytes: {state_bytes - 1} bytes hold no state of "
                                         f"Qwen3_5ForCausalLM, which takes {state_bytes} bytes a span; give at least "
                                         "that"):
        TreeRunner(model, max_tokens=64, max_state_bytes=state_bytes - 1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert TreeRunner(model, max_tokens=64, max_state_bytes=state_bytes).model_runner.state_capacity == 1


@pytest.mark.parametrize("name", ["mamba2-states", "qwen3.5-linear-attention-states"])
def test_a_default_room_of_few_states_is_said_and_a_roomy_one_is_not(name):
    """A pure state-space model's pool is a placeholder of a few bytes a token, so the states' default room (as many
    bytes as the pool) held one state of Mamba 2, and a search ran nearly every row's tokens again, silently: a
    warning now says how many states fit and how to give them room; a pool with room for many states says
    nothing."""
    model = tiny_model(name)
    with pytest.warns(UserWarning, match="TreeRunner: the recurrent states' default room, as many bytes as the KV "
                                         r"pool \(\d+\), holds \d+ states of .* give the states room with "
                                         r"max_state_bytes \(fastalign rain: --state-memory\)"):
        TreeRunner(model, max_tokens=16, block_size=4)
    state_bytes = state_runner(name)[1].model_runner.state_bytes
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        roomy = TreeRunner(model, max_bytes=2 * 40 * state_bytes, block_size=4)
    assert roomy.model_runner.state_capacity >= 32
    assert not [w for w in caught if "default room" in str(w.message)], [str(w.message) for w in caught]
    mr = state_runner(name)[1].model_runner   # room for exactly 32 states is room enough: no warning either
    per_block = KVPool.bytes_per_block(mr.pool_shapes, block_size=4, dtype=mr.dtype)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        exact = TreeRunner(model, max_bytes=2 * -(-32 * state_bytes // per_block) * per_block, block_size=4)
    assert exact.model_runner.state_capacity == 32
    assert not [w for w in caught if "default room" in str(w.message)], [str(w.message) for w in caught]


def test_a_pure_state_space_model_holds_nothing_in_the_pool_but_runs_its_new_tokens_alone():
    """Mamba 2 has no attention layer: the pool holds one placeholder per token, each span's state does the rest."""
    model, runner, calls = state_runner("mamba2-states")
    assert runner.model_runner.attention_layers == [] and runner.model_runner.pool_shapes == [(1, 1)]
    root = runner.prefill([5, 17, 3, 9])
    (child,), logits = runner.extend([root], [[1, 2]], logits="all")
    assert calls[-1] == (1, 2, 2) and runner.recomputed_tokens == 0
    assert_matches(model, [child], logits)


def test_a_pure_state_space_models_evicted_span_comes_back_without_a_forward():
    """Mamba 2's pool holds placeholders: a span evicted from it, its state kept, ran its 20 tokens again to come
    back before a child ran from its state. Now it comes back for free, and a child of one whose state was dropped
    too runs from its nearest ancestor's state (the tokens between counted, as on any state-space model)."""
    model, runner, calls = state_runner("mamba2-states", max_tokens=32, max_state_bytes=1 << 20)
    root = runner.prefill(list(range(1, 9)))
    (evicted,), _ = runner.extend([root], [list(range(10, 22))], logits=None)
    (other,), _ = runner.extend([root], [list(range(30, 50))], logits=None)
    assert not evicted.resident and evicted.id in runner.model_runner.states
    del calls[:]
    (child,), logits = runner.extend([evicted], [[7]], logits="all")
    assert calls == [(1, 1, 1)] and runner.recomputed_tokens == 0 and runner.last_restored == {}
    assert_matches(model, [child], logits)
    (again,), _ = runner.extend([root], [list(range(50, 70))], logits=None)   # evicts the child and `evicted`
    del runner.model_runner.states[evicted.id]
    del calls[:]
    (grandchild,), logits = runner.extend([evicted], [[9]], logits="all")
    assert calls == [(1, 12, 1), (1, 1, 1)] and runner.recomputed_tokens == 12
    assert_matches(model, [grandchild], logits)


def test_a_bf16_model_with_float32_logits_and_states_keeps_its_states():
    """Mamba 2 in bf16 returns float32 logits and keeps float32 states: the probes held them to float32's rounding
    (1e-4 of their scale, against 1e-2 found) and refused the model, which then ran by recomputing every row's whole
    sequence. They now hold them to the model's dtype."""
    model = tiny_model("mamba2-states", dtype=torch.bfloat16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        runner = TreeRunner(model, max_tokens=64, block_size=4, max_state_bytes=1 << 20)
    assert type(runner.model_runner).__name__ == "HFStateCacheModel" and runner.model_runner.pads_context
    root = runner.prefill([5, 17, 3, 9])
    (child,), logits = runner.extend([root], [[1, 2]], logits="all")
    torch.testing.assert_close(logits[0], reference(model, child)[0], rtol=3e-2, atol=3e-2)


@pytest.mark.parametrize("name", ["mamba-stepped-states", "jamba-stepped-states"])
def test_a_mixer_that_continues_its_state_by_one_token_runs_new_tokens_one_at_a_time(name):
    """Mamba's and Jamba's mixers continue the state they are given over one new token only (over several they run a
    prefill, dropping it): such models ran by recomputing every row's whole sequence at every call. A prefill still
    runs its tokens in one forward; rows from a state run one token at a time, rows alike in one batch: three children
    by 2 tokens are two forwards of 3 rows x 1 token, a row cut after 1 token keeps the state at its cut. Logits and
    hidden states are the model's own, and nothing runs again."""
    model, runner, calls = state_runner(name, max_state_bytes=1 << 20)
    assert runner.model_runner.steps_singly
    root = runner.prefill([5, 17, 3, 9, 2])
    children, logits, hidden = runner.extend([root] * 3, [[1, 2], [3, 4], [6, 7]], logits="all", hidden="all")
    assert calls == [(1, 5, 1), (3, 1, 1), (3, 1, 1)]
    assert_matches(model, children, logits)
    for span, row_hidden in zip(children, hidden):
        torch.testing.assert_close(row_hidden, reference(model, span)[1][-2:], rtol=1e-4, atol=1e-4)
    (chain,), logits = runner.extend([children[0]], [[8, 9, 10]], cuts=[[1]], logits="all")
    assert calls[3:] == [(1, 1, 1)] * 3
    assert_matches(model, chain, [logits[0][:1], logits[0][1:]])
    (grandchild,), logits = runner.extend([chain[0]], [[11, 12]], logits="all")   # from the state at the cut
    assert calls[6:] == [(1, 1, 1)] * 2 and runner.recomputed_tokens == 0
    assert_matches(model, [grandchild], logits)


@pytest.mark.parametrize("dtype, seed", [(torch.float32, 0), (torch.bfloat16, 0), (torch.bfloat16, 1),
                                         (torch.bfloat16, 3)])
def test_a_mixer_that_drops_its_state_over_several_tokens_is_found_in_bf16_too(dtype, seed):
    """Jamba's Mamba mixers run several new tokens as a prefill, dropping the state they were given. Held to its
    dtype's rounding (3e-2, not float32's 1e-4 for its float32 states), a tiny bf16 Jamba passed a probe of 3 + 3 + 1
    tokens (seeds 0, 1 and 3): after its one piece of several tokens, its states were within rounding of the whole
    forward's, and it would have run several tokens from a state, silently wrong. Three such pieces (2 + 2 + 2 + 1)
    show the drop: it runs one token at a time from a state."""
    torch.manual_seed(seed)
    config = transformers.JambaConfig(vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, attn_layer_period=2,
                                      attn_layer_offset=1, expert_layer_period=2, expert_layer_offset=1,
                                      use_mamba_kernels=False, mamba_dt_rank=8, mamba_d_state=8, num_experts=4,
                                      num_experts_per_tok=2)
    model = transformers.JambaForCausalLM(config).eval().to(dtype)
    assert HFStateCacheModel(model, torch.device("cpu")).steps_singly


def test_padding_that_moves_the_states_but_not_the_logits_is_not_padded(monkeypatch):
    """The padding probe checks the states the padded rows end in, not only their logits: a model whose states pick up
    the padding (here the last padded forward's states shifted) runs contexts of different lengths apart."""
    from fastalign.runtime.row_groups import LeftPadded
    forward_tokens = HFStateCacheModel._forward_tokens

    def leaky(self, ids, grid, cache, padded, fresh, kept, want_hidden=False):
        out = forward_tokens(self, ids, grid, cache, padded, fresh, kept, want_hidden)
        if isinstance(padded, LeftPadded) and ids.shape[1] == 1:
            for t in self._batched_states(cache):
                t[0].add_(1.0)
        return out

    monkeypatch.setattr(HFStateCacheModel, "_forward_tokens", leaky)
    assert not HFStateCacheModel(tiny_model("qwen3.5-linear-attention-states"), torch.device("cpu")).pads_context


def test_a_cache_that_does_not_continue_from_its_states_is_refused(monkeypatch):
    """A cache that loses the states it is rebuilt from (here: loaded as zeros) continues neither over several new
    tokens nor over one at a time: refused, with the reason."""
    load = HFStateCacheModel._load

    def load_zeros(self, cache, kv, row_states, length):
        load(self, cache, kv, [tuple(torch.zeros_like(t) for t in states) for states in row_states], length)

    monkeypatch.setattr(HFStateCacheModel, "_load", load_zeros)
    with pytest.raises(ValueError, match="^model: Qwen3_5ForCausalLM cannot run on Hugging Face's cache with its "
                                         "recurrent states kept per span: its logits or states after a cache rebuilt "
                                         "from its K/V and states differ from its forward's over the whole sequence, "
                                         "also when run one token at a time$"):
        HFStateCacheModel(tiny_model("qwen3.5-linear-attention-states"), torch.device("cpu"))


def test_a_cache_layer_that_is_not_full_attention_is_refused():
    """Bloom's cache is per-token K/V alone (HFCacheModel's case): refused for holding no linear-attention state, and
    marked as never this runner's case (holds_states False: the TreeRunner's warning leaves its reason out)."""
    with pytest.raises(ValueError, match="cannot run on Hugging Face's cache with its recurrent states kept per span: "
                                         "its cache holds no linear-attention state") as refused:
        HFStateCacheModel(tiny_model("bloom-alibi-fallback"), torch.device("cpu"))
    assert refused.value.holds_states is False


def test_bringing_back_an_evicted_span_whose_parent_has_no_state_charges_the_tokens_run_again_to_it():
    """An evicted span comes back from its parent's state; where that was dropped, the tokens before it run again,
    counted with its own in last_restored and recomputed_tokens (RAIN charges them to the row that needed it)."""
    model, runner, _ = state_runner()
    root = runner.prefill([5, 17, 3, 9, 2, 8, 4, 6])
    (child,), _ = runner.extend([root], [[1, 2, 3, 4]], logits=None)
    del runner.model_runner.states[root.id]
    runner.tree.evict(child.id)
    (grandchild,), logits = runner.extend([child], [[7]], logits="all")
    assert runner.last_restored == {child.id: 4 + 8} and runner.recomputed_tokens == 12
    assert runner.last_context_rerun.tolist() == [0]
    assert_matches(model, [grandchild], logits)


def test_the_cache_layers_it_holds_are_full_attention_and_linear_attention_alone():
    """Full attention layers' K/V go to the pool and linear-attention layers' states beside it (a layer may be both);
    transformers' placeholder for a layer with no cache (Nemotron-H's MLP layers) is passed over; a sliding window
    (its cache keeps the window alone) or a layer of the model's own is refused, naming the layer."""
    from types import SimpleNamespace

    from transformers import cache_utils
    from fastalign.runtime.hf_state_cache import _layer_kinds
    layers = [cache_utils.LinearAttentionLayer(), cache_utils.DynamicLayer(),
              cache_utils.LinearAttentionAndFullAttentionLayer()]
    if hasattr(cache_utils, "DummyLayer"):   # transformers >= 5.25
        layers.append(cache_utils.DummyLayer())
    assert _layer_kinds(SimpleNamespace(layers=layers)) == ([1, 2], [0, 2], None)
    sliding = SimpleNamespace(layers=layers[:1] + [cache_utils.DynamicSlidingWindowLayer(sliding_window=4)])
    assert _layer_kinds(sliding)[2] == "its cache layer 1 is a DynamicSlidingWindowLayer, not full attention"
    own = SimpleNamespace(layers=layers[:1] + [object()])
    assert _layer_kinds(own)[2] == "its cache layer 1 is a object"
    assert _layer_kinds(SimpleNamespace(layers=layers[1:2]))[2] == "its cache holds no linear-attention state"


@pytest.mark.parametrize("name", ["mamba-stepped-states", "jamba-stepped-states"])
def test_a_stepping_model_runs_a_long_way_back_to_a_state_as_one_forward_from_none(name):
    """A span of 10 tokens whose state was dropped, on a root of 3: running its tokens again from the root's state
    took 10 forwards of one token (the mixers continue a state over one token only); one forward over the whole
    context of 13 costs less (FORWARD_IN_TOKENS), and keeps the span's state again. Two tokens on a root of 70 still
    run from the root's state: a forward of 72 would cost more."""
    from fastalign.runtime.hf_state_cache import FORWARD_IN_TOKENS
    model, runner, calls = state_runner(name, max_tokens=128, max_state_bytes=1 << 20)
    root = runner.prefill([5, 17, 3])
    (span,), _ = runner.extend([root], [list(range(20, 30))], logits=None)
    del runner.model_runner.states[span.id]
    del calls[:]
    (child,), logits = runner.extend([span], [[41]], logits="all")
    assert calls == [(1, 13, 1), (1, 1, 1)] and runner.last_context_rerun.tolist() == [13]
    assert span.id in runner.model_runner.states
    assert_matches(model, [child], logits)
    assert FORWARD_IN_TOKENS < 70
    long_root = runner.prefill(list(range(1, 71)))
    (span,), _ = runner.extend([long_root], [[7, 8]], logits=None)
    del runner.model_runner.states[span.id]
    del calls[:]
    (child,), logits = runner.extend([span], [[41]], logits="all")
    assert calls == [(1, 1, 1)] * 3 and runner.last_context_rerun.tolist() == [2]
    assert_matches(model, [child], logits)


def test_a_row_waiting_for_a_state_kept_again_in_the_call_does_not_join_an_earlier_group_alike():
    """A row on a span whose nearest state a later row of the call keeps again (its parent's) is a level above that
    row, even where an earlier row of the call runs alike (as many tokens again, from a context as long): in that
    row's group it would start from the state before it is kept."""
    model, runner, calls = state_runner()
    root, other = runner.prefill([5, 17, 3]), runner.prefill([4, 4, 12, 30, 6])
    (span,), _ = runner.extend([root], [[10, 7]], logits=None)
    (child,), _ = runner.extend([span], [[8, 6, 4]], logits=None)
    (alike,), _ = runner.extend([other], [[9, 2, 11]], logits=None)
    for dropped in (span, child, alike):
        del runner.model_runner.states[dropped.id]
    del calls[:]
    spans, logits = runner.extend([alike, span, child], [[1], [2], [3]], logits="all")
    assert runner.last_context_rerun.tolist() == [3, 2, 3] and runner.recomputed_tokens == 8
    assert_matches(model, spans, logits)


def test_with_no_attention_layer_rows_from_no_state_and_from_a_state_run_apart():
    """Mamba 2 pads nothing, so rows from states of any length run as one batch; a row whose every ancestor's state
    was dropped runs its whole context again from no state, and with a row from a state (as many tokens again) it
    would be given that row's state, or the row none."""
    model, runner, calls = state_runner("mamba2-states", max_state_bytes=1 << 20)
    root, other = runner.prefill([5, 17, 3]), runner.prefill([1, 2, 3])
    (lost,), _ = runner.extend([root], [[10, 7]], logits=None)
    (kept,), _ = runner.extend([other], [[4, 6, 8, 9, 11]], logits=None)
    for dropped in (root, lost, kept):
        del runner.model_runner.states[dropped.id]
    del calls[:]
    spans, logits = runner.extend([lost, kept], [[1], [2]], logits="all")
    assert runner.last_context_rerun.tolist() == [5, 5]
    assert_matches(model, spans, logits)


@pytest.mark.parametrize("base, from_state", [(64, True), (63, False)])
def test_a_stepping_model_runs_tokens_again_from_a_state_while_that_costs_no_more_than_one_forward(base, from_state):
    """5 tokens again from a state of `base` tokens are 5 one-token forwards, ~5 x FORWARD_IN_TOKENS (16) tokens of a
    prefill; one forward from no state costs 16 + base + 5: on a state of 64 tokens the first is no dearer, on one of
    63 it is."""
    model, runner, calls = state_runner("mamba-stepped-states", max_tokens=128, max_state_bytes=1 << 20)
    root = runner.prefill(list(range(1, base + 1)))
    (span,), _ = runner.extend([root], [[20, 21, 22, 23, 24]], logits=None)
    del runner.model_runner.states[span.id]
    del calls[:]
    (child,), logits = runner.extend([span], [[41]], logits="all")
    assert calls == ([(1, 1, 1)] * 6 if from_state else [(1, base + 5, 1), (1, 1, 1)])
    assert runner.last_context_rerun.tolist() == [5 if from_state else base + 5]
    assert_matches(model, [child], logits)


def test_a_span_a_row_of_the_same_call_starts_from_counts_as_started_from():
    """A row on a span made by an earlier row of its call starts from that row's state: the span is an inner node
    (its state goes before an older leaf's), and the spans counted as started from are only those with a state."""
    model, runner, _ = state_runner()
    mr = runner.model_runner
    mr.state_capacity = 2
    root = runner.prefill([5, 17, 3])
    (leaf,), _ = runner.extend([root], [[9]], logits=None)
    (inner, child), _ = runner.extend([root, 0], [[1], [2]], logits=None)
    assert set(mr.states) == {leaf.id, child.id} and mr.started_from <= set(mr.states)


@pytest.mark.parametrize("name", ["qwen3.5-linear-attention-states", "mamba-stepped-states"])
def test_a_kept_state_holds_its_own_row_alone(name):
    """A state kept from a batch of rows is a copy of its row: a view would keep the whole batch's tensor alive (the
    states' room, counted in state_bytes a span, silently exceeded by the batch's size) and would change with any
    later in-place update of the cache it came from."""
    model, runner, _ = state_runner(name, max_state_bytes=1 << 20)
    root = runner.prefill([5, 17, 3, 9])
    children, _ = runner.extend([root] * 3, [[1, 2], [3, 4], [6, 7]], logits=None)
    for child in children:
        kept = runner.model_runner.states[child.id]
        assert sum(t.untyped_storage().nbytes() for t in kept) == runner.model_runner.state_bytes


def test_a_group_of_rows_a_level_up_runs_after_every_group_below_it_whenever_it_was_formed():
    """Rows on the call's first and third rows (alike, so one group a level up) are one forward; that group, formed
    at the second row, before the third row's own group, still runs after it, from the state it keeps."""
    model, runner, calls = state_runner()
    root = runner.prefill([5, 17, 3])
    del calls[:]
    spans, logits = runner.extend([root, 0, root, 2], [[1], [2], [3, 4], [5]], logits="all")
    assert calls == [(1, 1, 1), (1, 2, 2), (2, 1, 1)] and runner.recomputed_tokens == 0
    assert_matches(model, spans, logits)


def test_an_attention_layer_whose_values_differ_in_width_from_its_keys_is_refused(monkeypatch):
    """The pool holds K and V of one shape: an attention layer caching V of another head_dim (as latent attention's
    narrower V; here twice as wide) is refused when the runner is made, naming its shapes."""
    from transformers import DynamicCache

    from fastalign.runtime import hf_state_cache

    class WiderValues(DynamicCache):
        def update(self, key_states, value_states, layer_idx, *args, **kwargs):
            keys, values = super().update(key_states, torch.cat([value_states, value_states], dim=-1), layer_idx,
                                          *args, **kwargs)
            return keys, values[..., :value_states.shape[-1]]

    monkeypatch.setattr(hf_state_cache, "DynamicCache", WiderValues)
    with pytest.raises(ValueError, match=r"its K and V differ in shape \(layer 1 holds K \[1, 2, 3, 16\] and V "
                                         r"\[1, 2, 3, 32\]\)"):
        HFStateCacheModel(tiny_model("qwen3.5-linear-attention-states"), torch.device("cpu"))


@pytest.mark.parametrize("name", ["qwen3.5-linear-attention-states", "mamba-stepped-states"])
def test_a_forward_computes_logits_at_the_tokens_read_alone(name):
    """extend(logits="last") kept the logits of every new token (logits_to_keep: the piece's tokens) and copied them
    twice, where one row per returned span is read (an 8k-token prompt at a 202048-word vocabulary in bf16: 3.3 GB a
    copy). Now each forward keeps those it reads alone: a piece's last token's; a prefill, one."""
    model, runner, _ = state_runner(name)
    rows, (children, logits), (spans, cut_logits) = rows_of_prefill_last_and_cuts(runner, VOCAB)
    assert rows == (1, 2, 4)   # at cuts: the 4 spans' rows, gathered
    assert_matches(model, children, logits[:, None])
    assert_matches(model, [span for row in spans for span in row], cut_logits[:, None])
