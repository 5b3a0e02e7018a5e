"""Corners of the SpanTree contract (span_tree.h, bindings.cpp) that the random walk of test_span_store
rarely or never reaches: misuse that must be refused with the state left as it was, the order in which
blocks are handed out, and eviction sequences whose bookkeeping goes wrong only several steps later.
Each test was seen failing on a mutated line of csrc/ that the other runtime tests let through."""
import os
import resource
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fastalign._C import SpanTree
from tests.runtime.test_span_store import fresh, grow, reads


def state(tree):
    return (tree.span_ids(), tree.refcounts().tolist(), sorted(tree.free_blocks().tolist()),
            [tree.block_table(i).tolist() for i in tree.span_ids()], [tree.locks(i) for i in tree.span_ids()])


def finished(tree, parents, lens):
    """The plan of rows of the given lengths (of token 1) on parents, unlocked as a finished call leaves it."""
    plan = tree.plan_extend(np.array(parents), np.ones(sum(lens), dtype=np.int32), np.cumsum([0, *lens]))
    tree.finish(plan)
    return plan


def alone(scenario):
    """Runs `scenario` (a function of this module) in a fresh Python, so that its memory limit touches no other
    test; its asserts decide, and its stderr is the failure shown."""
    call = f"from {__name__} import {scenario.__name__}; {scenario.__name__}()"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    result = subprocess.run([sys.executable, "-c", call], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def out_of_memory(call):
    """call() under an address-space limit 128 MiB above the process's size: a large allocation in it genuinely
    fails (std::bad_alloc, a MemoryError in Python), as in a process near its memory limit. Linux only."""
    with open("/proc/self/statm") as statm:
        size = int(statm.read().split()[0]) * resource.getpagesize()
    limits = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (size + 128 * 2 ** 20, limits[1]))
    try:
        with pytest.raises(MemoryError):
            call()
    finally:
        resource.setrlimit(resource.RLIMIT_AS, limits)


linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="limits memory by /proc and RLIMIT_AS")


def root_and_child():
    """(store, pool, root, child): a pool of 8 blocks of 2 holding a root of 3 tokens and its child of 1."""
    store, pool = fresh(8, 2)
    (root,) = grow(store, pool, [-1], [[1, 2, 3]])
    (child,) = grow(store, pool, [root], [[4]])
    return store, pool, root, child


def test_first_allocations_take_blocks_in_order_and_freed_blocks_come_back_first():
    """A fresh pool hands out blocks 0, 1, 2, ... (block_allocator.cpp) and reuses freed blocks before
    never-used ones, which keeps a lightly used pool's KV in its first blocks."""
    store, pool = fresh(8, 2)
    tree = store.tree
    (root,) = grow(store, pool, [-1], [[1, 2, 3, 4, 5]])
    assert tree.block_table(root).tolist() == [0, 1, 2]
    tree.release(root)
    (again,) = grow(store, pool, [-1], [[6, 7, 8]])
    assert set(tree.block_table(again).tolist()) <= {0, 1, 2}


def test_a_newly_computed_span_is_more_recently_used_than_older_ones():
    """Computing a span is a use: a new root goes after an older span in the eviction order, and the
    older one is evicted first when the pool runs out."""
    store, pool = fresh(3, 2)
    tree = store.tree
    (old,) = grow(store, pool, [-1], [[1, 2]])
    (child,) = grow(store, pool, [old], [[3, 4]])
    tree.release(child)
    (new,) = grow(store, pool, [-1], [[5, 6]])
    assert tree.lru_order() == [old, new]
    grow(store, pool, [-1], [[7, 8, 9, 10]])             # needs 2 blocks, 1 is free
    assert not tree.is_resident(old) and tree.is_resident(new)


def test_abandoning_a_finished_plan_is_refused():
    """abandon() is only for a plan whose forward failed: once the plan's locks are lifted it must refuse,
    instead of dropping the KV (and deleting the spans) of a finished call."""
    tree = SpanTree(8, 4)
    plan = finished(tree, [-1], [5])
    before = state(tree)
    with pytest.raises(ValueError, match="already finished"):
        tree.abandon(plan)
    assert state(tree) == before and tree.is_resident(plan.row_spans[0])


def test_abandoning_a_finished_plan_whose_span_a_later_call_locked_is_refused():
    """abandon() took a plan for unfinished while its span was locked: a finished plan whose span a later call had
    locked since was accepted, the live span's KV dropped and the span deleted under the caller's lock and handle
    (its unlock then failed: "unknown span"). A finished plan is refused whatever locks its spans hold now."""
    tree = SpanTree(8, 4)
    plan = finished(tree, [-1], [5])
    (span,) = plan.row_spans.tolist()
    tree.lock([span])
    before = state(tree)
    with pytest.raises(ValueError, match="already finished"):
        tree.abandon(plan)
    assert state(tree) == before and tree.is_resident(span)
    tree.unlock([span])
    assert tree.lru_order() == [span]


def test_a_finished_plan_whose_span_a_later_plan_restored_is_neither_held_nor_abandoned():
    """A plan is named by a serial, not by the spans it holds: a finished plan whose span was evicted and is being
    restored by a running plan is not held, and abandoning it is refused, leaving the running plan's span as it is
    (with one serial for every plan, it was taken for the running one and its span deleted under it)."""
    tree = SpanTree(8, 4)
    plan = finished(tree, [-1], [5])
    (span,) = plan.row_spans.tolist()
    tree.evict(span)
    running = tree.plan_restore(np.array([span]))
    before = state(tree)
    assert not tree.holds(plan) and tree.holds(running)
    with pytest.raises(ValueError, match="already finished"):
        tree.abandon(plan)
    assert state(tree) == before and tree.is_resident(span)
    tree.finish(running)
    assert tree.lru_order() == [span]


def test_a_plan_of_another_tree_is_neither_held_nor_abandoned():
    """Plan serials are process-wide: a tree with a running plan of the same span ids neither holds nor abandons
    another tree's plan, so its own running plan stays (with one serial for every plan, it was undone)."""
    mine, other = SpanTree(8, 4), SpanTree(8, 4)
    others = other.plan_extend(np.array([-1]), np.ones(3, dtype=np.int32), np.array([0, 3]))
    running = mine.plan_extend(np.array([-1]), np.ones(3, dtype=np.int32), np.array([0, 3]))
    assert others.row_spans.tolist() == running.row_spans.tolist()
    before = state(mine)
    assert not mine.holds(others) and mine.holds(running)
    with pytest.raises(ValueError, match="not one this tree runs .*or another tree's"):
        mine.abandon(others)
    assert state(mine) == before
    mine.finish(running)
    other.finish(others)


def restore_whose_block_table_cannot_be_allocated():
    """A restore of one long row beside many short ones, whose dense [rows, max_blocks] block table (800 MB), made
    after every span is attached, fails."""
    long, short = 100_000, 2000
    tree = SpanTree(long + short + 16, 1)
    (base,) = finished(tree, [-1], [long]).row_spans
    targets = finished(tree, [base] + [-1] * short, [1] * (short + 1)).row_spans.tolist()
    for span in targets:
        tree.evict(span)
    tree.pin(base)
    before = state(tree)
    out_of_memory(lambda: tree.plan_restore(targets))
    assert state(tree) == before
    assert sorted(tree.plan_restore(targets).row_spans.tolist()) == targets


@linux_only
def test_a_restore_failing_for_memory_changes_nothing():
    """plan_restore made its block table after the try that undoes a failed plan: on std::bad_alloc there, every
    span it attached stayed resident and locked with KV no forward wrote. The next restore then ran no forward (a
    TreeRunner read never-written blocks as the context: silently wrong logits) and the spans could never be
    released. It must fail as PoolExhausted does: a MemoryError that changes nothing."""
    alone(restore_whose_block_table_cannot_be_allocated)


def extend_whose_tokens_cannot_be_copied():
    """An extend whose first row (cut in two) is made, and whose second row's 64 Mi tokens cannot be copied."""
    tree = SpanTree(64, 16)
    (root,) = finished(tree, [-1], [20]).row_spans
    before, evictable = state(tree), tree.lru_order()
    huge = 64 * 2 ** 20
    tokens = np.random.randint(0, 1000, 3 + huge, dtype=np.int32)
    out_of_memory(lambda: tree.plan_extend(np.array([root, -2]), tokens, np.array([0, 3, 3 + huge]), np.array([1]),
                                           np.array([0, 1, 1])))
    assert state(tree) == before and tree.lru_order() == evictable
    tree.release(root)
    assert tree.span_ids() == [] and tree.num_free_blocks == 64


@linux_only
def test_an_extend_failing_for_memory_while_making_its_spans_changes_nothing():
    """plan_extend locked its parents and made its spans outside the try that undoes a failed call, and a span was
    in the tree before its tokens were copied: on std::bad_alloc the parent stayed locked for good (never evicted,
    never released) and a half-made span stayed (its length counting tokens it did not hold), beside the spans of
    the rows before. It must be a MemoryError that changes nothing."""
    alone(extend_whose_tokens_cannot_be_copied)


def test_abandoning_a_plan_a_later_plan_builds_on_is_refused_and_changes_nothing():
    """abandon() of a plan whose span has a child from a plan still outstanding used to drop the span's lock,
    then fail in drop_kv: the span was left resident, unlocked and evictable with KV never written, and the
    plan could no longer be abandoned. It must refuse (as lock and unlock do) and change nothing, so that
    undoing the plans newest first still gives the pool back."""
    tree = SpanTree(4, 4)
    (root,) = finished(tree, [-1], [5]).row_spans
    plan_a = tree.plan_extend(np.array([root]), np.array([6], dtype=np.int32), np.array([0, 1]))
    plan_b = tree.plan_extend(np.array(plan_a.row_spans), np.array([7], dtype=np.int32), np.array([0, 1]))
    before = state(tree)
    with pytest.raises(ValueError, match="a later plan builds on"):
        tree.abandon(plan_a)
    assert state(tree) == before
    tree.abandon(plan_b)
    tree.abandon(plan_a)
    assert tree.span_ids() == [root] and tree.refcounts().tolist() == [1, 1, 0, 0]


def test_abandoning_a_plan_under_an_evicted_child_is_refused_until_the_child_is_released():
    """A child of the plan's span, computed and evicted since, has no KV to block abandon(): deleting the span
    left the child with an unknown parent. abandon() must refuse until the child is released."""
    tree = SpanTree(4, 4)
    (root,) = finished(tree, [-1], [5]).row_spans
    plan_a = tree.plan_extend(np.array([root]), np.array([6], dtype=np.int32), np.array([0, 1]))
    (child,) = finished(tree, plan_a.row_spans, [1]).row_spans
    tree.evict(child)
    before = state(tree)
    with pytest.raises(ValueError, match="a later plan builds on"):
        tree.abandon(plan_a)
    assert state(tree) == before
    tree.release(child)
    tree.abandon(plan_a)
    assert tree.span_ids() == [root]


def test_misuse_of_locks_pins_release_and_evict_is_refused_and_changes_nothing():
    """Unlocking an unlocked span, pinning an evicted one, releasing or evicting a locked one: each is a
    ValueError naming the problem, and the tree is left exactly as it was."""
    store, pool, root, child = root_and_child()
    tree = store.tree
    tree.evict(child)
    before = state(tree)
    with pytest.raises(ValueError, match="is not locked"):
        tree.unlock([root])
    with pytest.raises(ValueError, match="not resident"):
        tree.pin(child)
    assert state(tree) == before and tree.pins(child) == 0
    tree.lock([root])
    locked = state(tree)
    with pytest.raises(ValueError, match="in use by a running call"):
        tree.evict(root)
    with pytest.raises(ValueError, match="in use by a running call"):
        tree.release(root)
    assert state(tree) == locked and tree.is_live(root) and tree.is_resident(root)
    tree.unlock([root])
    assert state(tree) == before


def test_releasing_a_pinned_span_with_an_evicted_child_makes_it_evictable():
    """Release drops the pins of a span kept as the prefix of a (here evicted) child: with no resident
    child either, it must join the eviction order at once, not only once some child's KV is dropped."""
    store, pool = fresh(8, 2)
    tree = store.tree
    (root,) = grow(store, pool, [-1], [[1, 2]])
    tree.pin(root)
    (child,) = grow(store, pool, [root], [[3]])
    tree.evict(child)
    assert tree.lru_order() == []
    tree.release(root)
    assert tree.exists(root) and tree.lru_order() == [root]


def test_a_copy_counts_as_made_when_its_plan_finishes_not_when_a_caller_s_lock_goes():
    """A copier's copy counted as made once its lock count fell below the count it had when its plan attached it,
    whichever lock went: a caller's lock lifted before the plan's (lock, restore, unlock) gave the parent the copy
    no forward had written and freed the parent's block, so that after the failed forward was abandoned the parent
    read another sequence's tokens. Only the plan's finish makes its copies."""
    store, pool = fresh(8, 4)
    tree = store.tree
    first, second, other = (np.random.randint(0, 1000, n).tolist() for n in (2, 2, 4))
    (parent,) = grow(store, pool, [-1], [first])                 # block 0 holds 2 of 4 slots
    (in_place,) = grow(store, pool, [parent], [second[:1]])
    (copier,) = grow(store, pool, [parent], [second[1:]])        # a copy of block 0
    tree.evict(copier)
    tree.release(grow(store, pool, [-1], [other])[0])            # writes the block the copy had, and goes
    tree.lock([copier])                                          # a caller's lock, taken before the plan's
    plan = tree.plan_restore([copier])
    assert len(plan.copy_src) == 1
    tree.evict(in_place)                                         # no child writes into block 0 in place now
    table = tree.block_table(parent).tolist()
    tree.unlock([copier])                                        # the caller's lock goes; the plan still holds one
    assert tree.block_table(parent).tolist() == table and tree.locks(copier) == 1
    tree.abandon(plan)                                           # the forward failed
    assert tree.block_table(parent).tolist() == table and reads(tree, pool, parent) == first


def test_a_plan_s_lock_is_lifted_by_finish_or_abandon_only():
    """unlock() cannot tell a plan's lock from a caller's: it refuses, changing nothing, to lift the lock of a plan
    still to finish, and finish() lifts it once (making the spans evictable), then refuses the plan."""
    tree = SpanTree(8, 4)
    plan = tree.plan_extend(np.array([-1]), np.random.randint(0, 1000, 5, dtype=np.int32), np.array([0, 5]))
    (span,) = plan.row_spans.tolist()
    before = state(tree)
    with pytest.raises(ValueError, match=f"span {span} is locked fewer times than it is listed.*finish"):
        tree.unlock(plan.spans)
    assert state(tree) == before and tree.locks(span) == 1
    tree.finish(plan)
    assert tree.locks(span) == 0 and tree.lru_order() == [span]
    with pytest.raises(ValueError, match=r"finish: the plan is not one this tree runs \(already finished"):
        tree.finish(plan)
    assert tree.locks(span) == 0 and tree.lru_order() == [span]


def test_restored_copy_does_not_give_back_the_in_place_slot_of_a_sibling():
    """A child appends in place to its parent's partial block, is evicted, a sibling then appends in place
    at the same slot, and the child is restored (now as a copy) and evicted again: dropping the copy must
    leave the sibling's slot taken, so that a third child copies rather than overwrites the sibling's KV."""
    store, pool = fresh(8, 4)
    tree = store.tree
    (root,) = grow(store, pool, [-1], [[1, 2, 3, 4, 5, 6]])   # block 1 holds 2 of 4 slots
    (first,) = grow(store, pool, [root], [[7]])                 # in place, at slot 2
    tree.evict(first)
    (second,) = grow(store, pool, [root], [[8]])                # in place again, at slot 2
    store.make_resident([first], pool.run)                      # slot 2 is taken: a copy
    assert tree.block_table(first)[1] != tree.block_table(root)[1]
    tree.evict(first)
    (third,) = grow(store, pool, [root], [[9]])
    assert tree.block_table(third)[1] != tree.block_table(second)[1]
    assert reads(tree, pool, second) == [1, 2, 3, 4, 5, 6, 8]
    assert reads(tree, pool, third) == [1, 2, 3, 4, 5, 6, 9]


def test_restore_keeps_the_resident_bases_of_all_the_paths_it_recomputes():
    """With the pool full, recomputing evicted children of two parents in one round evicts other spans,
    never the resident parent that a later row of the round builds on, even when it is the least recently
    used span."""
    store, pool = fresh(4, 2)
    tree = store.tree
    (one,) = grow(store, pool, [-1], [[1, 2]])
    (child_one,) = grow(store, pool, [one], [[3, 4]])
    tree.evict(child_one)
    (two,) = grow(store, pool, [-1], [[5, 6]])
    (child_two,) = grow(store, pool, [two], [[7, 8]])
    tree.evict(child_two)
    others = [grow(store, pool, [-1], [[t, t]])[0] for t in (9, 10)]     # the pool is full
    assert tree.lru_order() == [one, two] + others
    forwards = pool.forwards
    store.make_resident([child_one, child_two], pool.run)
    assert pool.forwards == forwards + 1
    assert all(tree.is_resident(s) for s in (one, two, child_one, child_two))
    assert not any(tree.is_resident(s) for s in others)
    assert reads(tree, pool, child_one) == [1, 2, 3, 4] and reads(tree, pool, child_two) == [5, 6, 7, 8]


def test_row_parents_and_cut_offsets_are_checked_by_the_tree_itself():
    """plan_extend refuses a row that builds on itself or on a later row, and cut counts that decrease
    (the Python layer checks these too, but the tree must not read past its arrays when called directly)."""
    tree = SpanTree(8, 4)
    for parents in ([-2], [-1, -3]):
        with pytest.raises(ValueError, match="a parent row must be an earlier row"):
            tree.plan_extend(np.array(parents), np.ones(len(parents), dtype=np.int32),
                             np.arange(len(parents) + 1))
    # rows of 4 tokens; row 0 takes cuts [1, 2], row 1 would take none, row 2 [2, 3]
    with pytest.raises(ValueError, match="cu_cuts must not decrease"):
        tree.plan_extend(np.array([-1, -1, -1]), np.ones(12, dtype=np.int32), np.array([0, 4, 8, 12]),
                         np.array([1, 2, 3]), np.array([0, 2, 1, 3]))
    assert tree.span_ids() == [] and tree.num_free_blocks == 8


def test_a_parent_row_past_int64_is_named_as_given():
    """A parent -2 - j names row j: for parent INT64_MIN the refusal showed j wrapped around int64
    (9223372036854775806), a row the caller never gave. It names the parent as given."""
    tree = SpanTree(8, 4)
    with pytest.raises(ValueError, match="got parent -9223372036854775808 "):
        tree.plan_extend(np.array([np.iinfo(np.int64).min]), np.ones(1, dtype=np.int32), np.array([0, 1]))
    assert tree.span_ids() == [] and tree.num_free_blocks == 8


def test_arrays_of_non_integers_or_of_values_their_type_does_not_hold_are_refused():
    """The bindings cast each array to its integer type: tokens 2^40 + 5 became 5, a parent 0.5 became 0 (the root
    span), silently. Arrays of other dtypes and values past the type are refused, naming the array; lists of ints
    and an empty call (whose np.array([]) is float64) still plan."""
    tree = SpanTree(8, 4)
    with pytest.raises(ValueError, match=r"tokens: expected values in \[-2147483648, 2147483647\], got values from 1 "
                                         r"to 1099511627781"):
        tree.plan_extend(np.array([-1]), np.array([1, 2 ** 40 + 5]), np.array([0, 2]))
    with pytest.raises(ValueError, match="cu_cuts: expected values in"):
        tree.plan_extend(np.array([-1]), np.ones(3, dtype=np.int32), np.array([0, 3]), np.array([1]),
                         np.array([0, 2 ** 64 - 1], dtype=np.uint64))
    with pytest.raises(ValueError, match="cu_lens: expected an array of integers, got dtype float64"):
        tree.plan_extend(np.array([-1]), np.ones(2, dtype=np.int32), np.array([0, 2.7]))
    with pytest.raises(ValueError, match="cuts: expected an array of integers, got dtype bool"):
        tree.plan_extend(np.array([-1]), np.ones(3, dtype=np.int32), np.array([0, 3]), np.array([True]),
                         np.array([0, 1]))
    (root,) = tree.plan_extend(np.array([-1]), np.ones(2, dtype=np.int32), np.array([0, 2])).row_spans
    before = state(tree)
    with pytest.raises(ValueError, match="parents: expected an array of integers, got dtype float64"):
        tree.plan_extend(np.array([0.5]), np.ones(1, dtype=np.int32), np.array([0, 1]))
    assert state(tree) == before
    assert tree.plan_extend([-1], [1, 2], [0, 2]).num_rows == 1 and tree.plan_extend([], [], [0]).num_rows == 0


def test_arrays_of_more_than_one_dimension_are_refused():
    """parents, tokens and cuts must be 1-D: a 2-D array is an error, not silently flattened."""
    tree = SpanTree(8, 4)
    with pytest.raises(ValueError, match="parents must be one-dimensional"):
        tree.plan_extend(np.array([[-1]]), np.ones(2, dtype=np.int32), np.array([0, 2]))
    with pytest.raises(ValueError, match="tokens must be one-dimensional"):
        tree.plan_extend(np.array([-1]), np.ones((1, 2), dtype=np.int32), np.array([0, 2]))
    with pytest.raises(ValueError, match="cuts must be one-dimensional"):
        tree.plan_extend(np.array([-1]), np.ones(3, dtype=np.int32), np.array([0, 3]), np.array([[1]]),
                         np.array([0, 1]))
    assert tree.span_ids() == [] and tree.num_free_blocks == 8


def test_offset_arrays_are_checked_whole_before_any_offset_is_used():
    """cu_lens and cu_cuts are checked over every row before a row's cuts are read or its length summed:
    checked row by row, a cu_cuts rising past the number of cuts in an early row read cuts[] past its
    end (a heap overflow under AddressSanitizer) before the later row that falls back was refused, and a
    huge cu_lens entry overflowed the row's length (int64, UndefinedBehaviorSanitizer)."""
    tree = SpanTree(8, 4)
    with pytest.raises(ValueError, match="cu_cuts must not decrease"):
        tree.plan_extend(np.array([-1, -1]), np.ones(8, dtype=np.int32), np.array([0, 4, 8]),
                         np.array([1]), np.array([0, 1000, 1]))
    plan = finished(tree, [-1], [5])
    before = state(tree)
    with pytest.raises(ValueError, match="token list 1 is empty"):
        tree.plan_extend(np.array([plan.row_spans[0], -1]), np.ones(3, dtype=np.int32),
                         np.array([0, 2**63 - 1, 3]))
    assert state(tree) == before


def test_unlocking_a_span_listed_more_often_than_it_is_locked_is_refused():
    """unlock() is all or nothing also when a span is listed twice: unlocking a span locked once with
    [a, a] drove its count to -1 (and the next lock to 0: evictable while in use)."""
    tree = SpanTree(8, 4)
    plan = finished(tree, [-1, -2], [3, 3])
    a, b = plan.row_spans.tolist()
    tree.lock([a, a, b])
    with pytest.raises(ValueError, match=f"span {b} is locked fewer times"):
        tree.unlock([a, b, a, b])
    assert tree.locks(a) == 2 and tree.locks(b) == 1
    with pytest.raises(ValueError, match=f"span {a} is locked fewer times"):
        tree.unlock([a, a, a])
    assert tree.locks(a) == 2
    tree.unlock([a, b, a])
    assert tree.locks(a) == tree.locks(b) == 0 and tree.lru_order() == [b]


@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_random_offset_arrays_plan_exactly_when_they_describe_rows_and_cuts(data):
    """plan_extend on arbitrary cu_lens, cuts and cu_cuts (huge and negative entries included) plans when
    they describe non-empty rows and cuts strictly inside them, else raises ValueError leaving the tree as
    it was; under AddressSanitizer and UndefinedBehaviorSanitizer no case may read past an array or overflow."""
    tree = SpanTree(16, 4)
    plan = finished(tree, [-1], [5])
    rows = data.draw(st.integers(1, 3), label="rows")
    entry = st.one_of(st.integers(-2, 12), st.sampled_from([2**62, 2**63 - 1, -2**63]))
    num_tokens, num_cuts = data.draw(st.integers(0, 10)), data.draw(st.integers(0, 3))
    cu_lens = [0] + [data.draw(entry) for _ in range(rows - 1)] + [num_tokens]
    cuts = [data.draw(entry) for _ in range(num_cuts)]
    cu_cuts = [0] + [data.draw(entry) for _ in range(rows - 1)] + [num_cuts]
    parents = [data.draw(st.sampled_from([-1, int(plan.row_spans[0])] + [-2 - j for j in range(r)]))
               for r in range(rows)]
    valid = all(b > a for a, b in zip(cu_lens, cu_lens[1:])) and all(b >= a for a, b in zip(cu_cuts, cu_cuts[1:]))
    for r in range(rows if valid else 0):
        offsets = [0] + cuts[cu_cuts[r]:cu_cuts[r + 1]] + [cu_lens[r + 1] - cu_lens[r]]
        valid = valid and all(b > a for a, b in zip(offsets, offsets[1:]))
    arrays = (np.array(parents), np.ones(num_tokens, dtype=np.int32), np.array(cu_lens), np.array(cuts, dtype=np.int64),
              np.array(cu_cuts))
    before = state(tree)
    if valid:
        made = tree.plan_extend(*arrays)
        assert made.num_rows == rows and len(made.cut_spans) == num_cuts and made.num_tokens == num_tokens
    else:
        with pytest.raises(ValueError):
            tree.plan_extend(*arrays)
        assert state(tree) == before


@settings(max_examples=300, deadline=None)
@given(calls=st.lists(st.tuples(st.booleans(), st.lists(st.integers(0, 2), max_size=4)), max_size=12))
def test_random_lock_and_unlock_lists_count_every_listing_all_or_nothing(calls):
    """Random lock / unlock lists with repeats against a count per span: an unlock listing a span more
    often than it is locked is refused and changes nothing; the eviction order holds the unlocked leaves."""
    tree = SpanTree(8, 2)
    plan = finished(tree, [-1, -2, -1], [1, 1, 1])
    spans, held = plan.row_spans.tolist(), Counter()
    for locking, indices in calls:
        ids = [spans[i] for i in indices]
        if locking:
            tree.lock(ids)
            held.update(ids)
        elif any(held[i] < n for i, n in Counter(ids).items()):
            with pytest.raises(ValueError, match="not locked|locked fewer times"):
                tree.unlock(ids)
        else:
            tree.unlock(ids)
            held.subtract(ids)
        assert [tree.locks(i) for i in spans] == [held[i] for i in spans]
        assert set(tree.lru_order()) == {i for i in spans[1:] if held[i] == 0}


def test_lock_listing_an_unknown_span_locks_nothing():
    """lock() is all or nothing: a list naming an unknown id after a live span must not leave the live span
    locked (unevictable and unreleasable for good, with no unlock the caller knows to make)."""
    tree = SpanTree(8, 4)
    plan = finished(tree, [-1], [5])
    (span,) = plan.row_spans.tolist()
    before = state(tree)
    with pytest.raises(ValueError, match="unknown span 99"):
        tree.lock([span, 99])
    assert state(tree) == before and tree.lru_order() == [span]
    tree.release(span)


def test_queries_of_an_unknown_span_are_value_errors_naming_it():
    """Every accessor and lock/unlock raise ValueError("unknown span N") for an id the tree never had or has
    freed, as the Python layer expects of a bad id (not IndexError, not a crash)."""
    tree = SpanTree(8, 4)
    plan = finished(tree, [-1], [5])
    (gone,) = plan.row_spans.tolist()
    tree.release(gone)
    for span in (gone, 99):
        for query in (tree.parent, tree.length, tree.tokens, tree.new_tokens, tree.block_table, tree.is_resident,
                      tree.pins, tree.locks, lambda i: tree.lock([i]), lambda i: tree.unlock([i])):
            with pytest.raises(ValueError, match=f"unknown span {span}"):
                query(span)
    assert not tree.exists(gone) and not tree.is_live(gone) and tree.num_free_blocks == 8


def test_extending_or_restoring_spans_the_tree_cannot_use_is_refused():
    """plan_extend on an evicted parent (the tree itself, not only SpanStore, must refuse it: its empty block
    table would be read past its end) and plan_restore of a released span kept as a prefix are ValueErrors
    that leave the tree as it was."""
    tree = SpanTree(8, 4)
    plan = finished(tree, [-1, -2], [5, 2])
    root, child = plan.row_spans.tolist()
    tree.evict(child)
    before = state(tree)
    with pytest.raises(ValueError, match=f"extend: parent span {child} is not resident"):
        tree.plan_extend(np.array([child]), np.ones(1, dtype=np.int32), np.array([0, 1]))
    assert state(tree) == before
    tree.release(root)                                  # kept as the child's prefix
    before = state(tree)
    with pytest.raises(ValueError, match=f"restore: span {root} is unknown or was released"):
        tree.plan_restore([root])
    assert state(tree) == before


@pytest.mark.parametrize("cu_lens", [[1, 3], [0, 2], [0, 4], [-1, 3]])
def test_cu_lens_must_start_at_zero_and_end_at_the_number_of_tokens(cu_lens):
    """Offsets that do not start at 0 or end at len(tokens) are refused: else a row reads tokens before or past
    the token array (a heap overflow), or tokens are silently left out of every row."""
    tree = SpanTree(8, 4)
    with pytest.raises(ValueError, match="cu_lens must start at 0 and end at the number of tokens"):
        tree.plan_extend(np.array([-1]), np.arange(3, dtype=np.int32), np.array(cu_lens))
    with pytest.raises(ValueError, match="cu_lens must have one entry more than parents"):   # not a row ignored
        tree.plan_extend(np.array([-1]), np.arange(3, dtype=np.int32), np.array([0, 3, 3]))
    with pytest.raises(ValueError, match="cu_cuts must have one entry more than parents"):
        tree.plan_extend(np.array([-1]), np.arange(3, dtype=np.int32), np.array([0, 3]), np.array([1]),
                         np.array([0, 1, 1]))
    assert tree.span_ids() == [] and tree.num_free_blocks == 8


def test_evicting_a_pinned_span_one_with_a_resident_child_or_an_evicted_one_is_refused():
    """evict() refuses a pinned span, a span whose child is still resident and an evicted span (a ValueError naming
    the reason, nothing changed); only the random walk of test_span_store reached these, and not on every run."""
    store, pool, root, child = root_and_child()
    tree = store.tree
    tree.pin(child)
    before = state(tree)
    with pytest.raises(ValueError, match=f"evict: span {child} is pinned"):
        tree.evict(child)
    with pytest.raises(ValueError, match=f"evict: span {root} has resident children"):
        tree.evict(root)
    assert state(tree) == before and tree.is_resident(root) and tree.is_resident(child)
    tree.unpin(child)
    tree.evict(child)
    with pytest.raises(ValueError, match=f"evict: span {child} is not resident"):
        tree.evict(child)
    tree.evict(root)
    assert reads(tree, pool, grow(store, pool, [child], [[5]])[0]) == [1, 2, 3, 4, 5]


def test_a_released_prefix_shared_by_two_children_stays_until_both_are_released():
    """A released span kept as the prefix of two live children is freed with the last of them, not the first:
    the other child still reads its tokens (and the blocks it shares) through it."""
    store, pool = fresh(8, 2)
    tree = store.tree
    (root,) = grow(store, pool, [-1], [[1, 2, 3]])
    a, b = grow(store, pool, [root, root], [[4], [5]])
    tree.release(root)
    tree.release(a)
    assert tree.span_ids() == [root, b] and tree.tokens(b).tolist() == [1, 2, 3, 5]
    assert reads(tree, pool, b) == [1, 2, 3, 5]
    tree.release(b)
    assert tree.span_ids() == [] and tree.num_free_blocks == 8
