"""The span tree and its store against a plain Python model of the tree, without any language model.

The "forward" here writes (token, position) pairs into a host array standing for the KV pool, so that
every invariant about blocks can be checked together with what a span would actually read back: a
resident span's block table must yield exactly its tokens at their positions, whatever copies, in-place
appends, evictions, recomputations and failed forwards happened before.
"""
import numpy as np
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import event as hypothesis_event
from hypothesis.control import currently_in_test_context
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from fastalign._C import PoolExhaustedError, SpanTree
from fastalign.runtime.span_store import SpanStore


class InjectedFailure(Exception):
    pass


def event(name):
    """Count how often a path was taken (shown by --hypothesis-show-statistics)."""
    if currently_in_test_context():
        hypothesis_event(name)


class FakePool:
    """The pool's contents as (token, position) per slot; -1 where nothing was written."""

    def __init__(self, tree):
        self.tree = tree
        self.slots = np.full((tree.num_blocks * tree.block_size, 2), -1, dtype=np.int64)
        self.fail = False
        self.forwards = 0

    def run(self, plan):
        self.check_plan(plan)
        self.forwards += 1
        event("recompute evicted spans" if not plan.creates_spans else "extend")
        if len(plan.copy_src):
            event("copy-on-write")
        bs = self.tree.block_size
        view = self.slots.reshape(self.tree.num_blocks, bs, 2)
        view[plan.copy_dst] = view[plan.copy_src]
        written = np.stack([plan.token_ids, plan.positions], axis=1)
        if self.fail:  # a forward that dies half-way: some KV written, then an exception
            half = plan.num_tokens // 2
            self.slots[plan.slot_mapping[:half]] = written[:half]
            raise InjectedFailure
        self.slots[plan.slot_mapping] = written
        self.slots[plan.extra_dst] = written[plan.extra_src]
        if len(plan.extra_src):
            event("copy of a block this forward fills")
        return plan.num_rows

    def check_plan(self, plan):
        """The plan's metadata says what the paged attention contract needs, row by row."""
        tree, bs = self.tree, self.tree.block_size
        cu = plan.cu_q_lens
        assert cu[0] == 0 and cu[-1] == plan.num_tokens and np.all(np.diff(cu) > 0)
        assert len(np.unique(plan.slot_mapping)) == plan.num_tokens
        assert not set(plan.copy_src.tolist()) & set(plan.copy_dst.tolist()), "a block is copied onto itself"
        slots = np.concatenate([plan.slot_mapping, plan.extra_dst])
        assert len(np.unique(slots)) == len(slots), "a slot is written twice"
        for r, span in enumerate(plan.row_spans):
            seq_len = tree.length(span)
            assert plan.seq_lens[r] == seq_len
            table = tree.block_table(span)
            assert len(table) == -(-seq_len // bs)
            assert np.array_equal(plan.block_table[r, :len(table)], table)
            q = cu[r + 1] - cu[r]
            assert np.array_equal(plan.positions[cu[r]:cu[r + 1]], np.arange(seq_len - q, seq_len))
            assert np.array_equal(plan.token_ids[cu[r]:cu[r + 1]], tree.tokens(span)[seq_len - q:])
            pos = plan.positions[cu[r]:cu[r + 1]]
            assert np.array_equal(plan.slot_mapping[cu[r]:cu[r + 1]], table[pos // bs] * bs + pos % bs)


class SpanTreeMachine(RuleBasedStateMachine):
    """Random prefill / extend / release / pin / unpin / evict / failing forwards on a small pool."""

    @initialize(block_size=st.sampled_from([1, 3, 4]), num_blocks=st.integers(1, 16))
    def setup(self, block_size, num_blocks):
        self.store = SpanStore(num_blocks, block_size)
        self.tree = self.store.tree
        self.pool = FakePool(self.tree)
        self.parent = {}   # id -> parent id (-1 for a root), for every span ever created
        self.tokens = {}   # id -> full token sequence
        self.live = set()
        self.pins = {}     # live id -> pin count

    # ----- helpers

    def resident_children(self, span):
        return [c for c in self.tree.span_ids() if self.parent[c] == span and self.tree.is_resident(c)]

    def extend(self, parents, lists, cuts):
        cu = np.concatenate([[0], np.cumsum([len(t) for t in lists])]).astype(np.int64)
        tokens = np.concatenate(lists).astype(np.int32)
        flat_cuts = np.array([c for offsets in cuts for c in offsets], dtype=np.int64)
        cu_cuts = np.concatenate([[0], np.cumsum([len(c) for c in cuts])]).astype(np.int64)
        before = set(self.tree.span_ids())
        try:
            children, cut_spans, rows = self.store.extend(np.array(parents, dtype=np.int64), tokens, cu,
                                                          self.pool.run, flat_cuts, cu_cuts)
        except (PoolExhaustedError, InjectedFailure) as err:
            event(type(err).__name__)
            assert set(self.tree.span_ids()) <= before, "a failed extend left new spans behind"
            if isinstance(err, PoolExhaustedError):  # it evicted all it could: the same call cannot fit now
                with pytest.raises(PoolExhaustedError):
                    self.store.extend(np.array(parents, dtype=np.int64), tokens, cu, self.pool.run, flat_cuts,
                                      cu_cuts)
            return
        assert rows == len(parents) and len(cut_spans) == len(flat_cuts)
        if len(flat_cuts):
            event("extend with cuts")
        cut_spans = iter(cut_spans.tolist())
        children = children.tolist()
        for child, parent, new, offsets in zip(children, parents, lists, cuts):
            parent = children[-2 - parent] if parent < -1 else parent      # -2 - j: row j's child
            base = self.tokens[parent] if parent >= 0 else []
            for span, c in [(next(cut_spans), c) for c in offsets] + [(child, len(new))]:
                assert span not in before
                self.parent[span] = parent
                self.tokens[span] = base + list(new[:c])
                self.live.add(span)
                self.pins[span] = 0
                parent = span

    # ----- rules

    @rule(data=st.data(), fail=st.booleans())
    def extend_rows(self, data, fail):
        bs = self.tree.block_size
        rows = data.draw(st.integers(1, 4))
        choices = [-1] + sorted(self.live)
        parents = [data.draw(st.sampled_from(choices + [-2 - j for j in range(r)])) for r in range(rows)]
        lists = [data.draw(st.lists(st.integers(0, 50), min_size=1, max_size=2 * bs + 1)) for _ in range(rows)]
        cuts = [sorted(data.draw(st.sets(st.integers(1, len(t) - 1), max_size=2))) if len(t) > 1 else []
                for t in lists]
        self.pool.fail = fail and data.draw(st.integers(0, 3)) == 0
        try:
            self.extend(parents, lists, cuts)
        finally:
            self.pool.fail = False

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def release(self, data):
        span = data.draw(st.sampled_from(sorted(self.live)))
        self.tree.release(span)
        self.live.discard(span)
        del self.pins[span]
        with pytest.raises(ValueError, match="released"):
            self.tree.release(span)

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def pin(self, data):
        span = data.draw(st.sampled_from(sorted(self.live)))
        try:
            self.store.make_resident([span], self.pool.run)
        except PoolExhaustedError:
            return
        self.tree.pin(span)
        self.pins[span] += 1

    @precondition(lambda self: any(self.pins.values()))
    @rule(data=st.data())
    def unpin(self, data):
        span = data.draw(st.sampled_from(sorted(s for s, n in self.pins.items() if n)))
        self.tree.unpin(span)
        self.pins[span] -= 1

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def evict(self, data):
        span = data.draw(st.sampled_from(sorted(self.live)))
        allowed = self.tree.is_resident(span) and self.pins[span] == 0 and not self.resident_children(span)
        if allowed:
            self.tree.evict(span)
            assert not self.tree.is_resident(span)
        else:
            with pytest.raises(ValueError):
                self.tree.evict(span)

    # ----- invariants

    @invariant()
    def nodes_are_live_spans_and_their_ancestors(self):
        needed = set()
        for span in self.live:
            while span >= 0 and span not in needed:
                needed.add(span)
                span = self.parent[span]
        assert set(self.tree.span_ids()) == needed
        for span in needed:
            assert self.tree.is_live(span) == (span in self.live)
            assert self.tree.tokens(span).tolist() == self.tokens[span]
            assert self.tree.parent(span) == self.parent[span]
            assert self.tree.locks(span) == 0

    @invariant()
    def pins_keep_spans_resident(self):
        for span in self.live:
            assert self.tree.pins(span) == self.pins[span]
            if self.pins[span]:
                assert self.tree.is_resident(span), f"pinned span {span} was evicted"

    @invariant()
    def residency_is_closed_under_ancestors(self):
        for span in self.tree.span_ids():
            if self.tree.is_resident(span) and self.parent[span] >= 0:
                assert self.tree.is_resident(self.parent[span])

    @invariant()
    def refcounts_count_resident_spans(self):
        tree, bs = self.tree, self.tree.block_size
        expected = np.zeros(tree.num_blocks, dtype=np.int64)
        unique_tokens, bound = 0, 0
        for span in tree.span_ids():
            table = tree.block_table(span)
            if not tree.is_resident(span):
                assert len(table) == 0
                continue
            assert len(table) == -(-tree.length(span) // bs)
            assert len(set(table.tolist())) == len(table)
            expected[table] += 1
            own = len(tree.new_tokens(span))
            unique_tokens += own
            bound += -(-own // bs) + 1
        assert np.array_equal(tree.refcounts(), expected)
        free = tree.free_blocks()
        assert len(set(free.tolist())) == len(free), "a block was freed twice"
        assert set(free.tolist()) == set(np.flatnonzero(expected == 0).tolist()), "a block leaked"
        assert tree.num_free_blocks == len(free)
        used = tree.num_blocks - len(free)
        assert unique_tokens <= used * bs and used <= bound

    @invariant()
    def resident_spans_read_their_tokens(self):
        tree, bs = self.tree, self.tree.block_size
        for span in tree.span_ids():
            if not tree.is_resident(span):
                continue
            table, length = tree.block_table(span), tree.length(span)
            pos = np.arange(length)
            stored = self.pool.slots[table[pos // bs] * bs + pos % bs]
            assert stored[:, 0].tolist() == self.tokens[span], f"span {span} reads wrong tokens"
            assert np.array_equal(stored[:, 1], pos)
            parent = self.parent[span]
            if parent >= 0:  # full blocks of the parent are shared, never copied
                full = tree.length(parent) // bs
                assert np.array_equal(table[:full], tree.block_table(parent)[:full])

    @invariant()
    def no_partial_block_stays_beside_a_child_s_copy(self):
        """A span's partial last block that none of its resident children holds (none writes into it in place)
        while one holds a copy of it is read by no descendant: it must go, not stay while one is resident."""
        tree, bs = self.tree, self.tree.block_size
        for span in tree.span_ids():
            length = tree.length(span)
            if not tree.is_resident(span) or length % bs == 0:
                continue
            block = tree.block_table(span)[length // bs]
            held = {int(tree.block_table(c)[length // bs]) for c in self.resident_children(span)}
            assert not held or block in held, f"span {span} keeps block {block} beside its children's {held}"

    @invariant()
    def lru_holds_exactly_the_evictable_spans(self):
        tree = self.tree
        evictable = {s for s in tree.span_ids() if tree.is_resident(s) and tree.pins(s) == 0
                     and not self.resident_children(s)}
        assert set(tree.lru_order()) == evictable


TestSpanTreeMachine = SpanTreeMachine.TestCase
TestSpanTreeMachine.settings = settings(max_examples=60, stateful_step_count=30, deadline=None,
                                        suppress_health_check=[HealthCheck.too_slow])


# ----- deterministic cases


def fresh(num_blocks, block_size):
    store = SpanStore(num_blocks, block_size)
    return store, FakePool(store.tree)


def grow(store, pool, parents, lists):
    cu = np.concatenate([[0], np.cumsum([len(t) for t in lists])]).astype(np.int64)
    children, _, _ = store.extend(np.array(parents, dtype=np.int64), np.concatenate(lists).astype(np.int32), cu,
                                  pool.run)
    return children.tolist()


def test_a_copy_of_a_copied_block_gets_every_token_the_forward_writes_into_it():
    """Row 2 copies row 0's partial block (row 1 took it in place) and row 4 copies row 2's (row 3 took that one):
    all in one forward, so row 0's two tokens reach the first copy only as extras of that forward, and must reach
    the second copy the same way (both of them: the extras are walked whole)."""
    store, pool = fresh(8, 4)
    spans = grow(store, pool, [-1, -2, -2, -4, -4], [[1, 2], [3], [4], [5], [6]])
    expected = ([1, 2], [1, 2, 3], [1, 2, 4], [1, 2, 4, 5], [1, 2, 4, 6])
    assert pool.forwards == 1 and len({tuple(store.tree.block_table(s)) for s in spans}) == 3
    for span, tokens in zip(spans, expected):
        assert reads(store.tree, pool, span) == list(tokens), span


def test_an_evicted_in_place_child_gives_its_parent_s_slots_back():
    """After the child that appended into its parent's partial block (block 0 here) is evicted, the next child
    appends in place again: no copy, no extra block."""
    store, pool = fresh(4, 4)
    (root,) = grow(store, pool, [-1], [[1, 2, 3]])
    (child,) = grow(store, pool, [root], [[4]])
    assert store.tree.block_table(child).tolist() == store.tree.block_table(root).tolist() == [0]
    store.tree.evict(child)
    (again,) = grow(store, pool, [root], [[5]])
    assert store.tree.block_table(again).tolist() == [0] and store.tree.num_free_blocks == 3
    assert reads(store.tree, pool, again) == [1, 2, 3, 5]


def test_first_child_appends_in_place_and_later_children_copy():
    store, pool = fresh(8, 4)
    (root,) = grow(store, pool, [-1], [[1, 2, 3, 4, 5, 6]])  # blocks 0 (full) and 1 (2 of 4 slots)
    first, second = grow(store, pool, [root, root], [[7], [8, 9]])
    tree = store.tree
    root_table = tree.block_table(root).tolist()
    assert tree.block_table(first).tolist() == root_table  # wrote slot 2 of the root's partial block
    second_table = tree.block_table(second).tolist()
    assert second_table[0] == root_table[0] and second_table[1] != root_table[1]
    assert tree.refcounts()[root_table].tolist() == [3, 2]


def test_evicted_span_is_recomputed_on_use():
    store, pool = fresh(3, 2)
    (root,) = grow(store, pool, [-1], [[1, 2]])
    (a,) = grow(store, pool, [root], [[3, 4]])
    (b,) = grow(store, pool, [root], [[5, 6, 7, 8]])  # pool full: a (least recently used leaf) is evicted
    tree = store.tree
    assert not tree.is_resident(a) and tree.is_resident(b)
    assert tree.lru_order() == [b]
    forwards = pool.forwards
    (c,) = grow(store, pool, [a], [[9]])  # a comes back (one forward), then c (another); b is evicted
    assert pool.forwards == forwards + 2
    assert tree.is_resident(a) and tree.is_resident(c) and not tree.is_resident(b)
    assert tree.tokens(c).tolist() == [1, 2, 3, 4, 9]


def test_pinned_spans_filling_the_pool_give_a_clear_error_and_a_consistent_pool():
    store, pool = fresh(4, 2)
    (root,) = grow(store, pool, [-1], [[1, 2, 3, 4, 5, 6]])
    store.tree.pin(root)
    with pytest.raises(PoolExhaustedError, match="KV pool exhausted.*pinned"):
        grow(store, pool, [root], [[7, 8, 9]])
    assert store.tree.span_ids() == [root] and store.tree.locks(root) == 0   # the failed call unlocked its parent
    assert store.tree.num_free_blocks == 1
    (child,) = grow(store, pool, [root], [[7]])
    assert store.tree.tokens(child).tolist() == [1, 2, 3, 4, 5, 6, 7]


def test_released_parent_lives_while_a_child_needs_it():
    store, pool = fresh(8, 4)
    (root,) = grow(store, pool, [-1], [[1, 2, 3]])
    (child,) = grow(store, pool, [root], [[4, 5]])
    tree = store.tree
    tree.release(root)
    assert not tree.is_live(root) and tree.exists(root)
    assert tree.tokens(child).tolist() == [1, 2, 3, 4, 5]
    with pytest.raises(ValueError, match="released"):
        grow(store, pool, [root], [[6]])
    tree.release(child)
    assert tree.span_ids() == [] and tree.num_free_blocks == 8


def test_bad_tree_arguments():
    tree = SpanTree(4, 2)
    with pytest.raises(ValueError, match="num_blocks must be positive"):
        SpanTree(0, 2)
    with pytest.raises(ValueError, match="block_size must be positive"):
        SpanTree(4, 0)
    with pytest.raises(ValueError, match="token list 0 is empty"):
        tree.plan_extend(np.array([-1]), np.zeros(0, dtype=np.int32), np.array([0, 0]))
    with pytest.raises(ValueError, match="cu_lens must have one entry more"):
        tree.plan_extend(np.array([-1]), np.zeros(2, dtype=np.int32), np.array([0]))
    three = (np.array([-1]), np.zeros(3, dtype=np.int32), np.array([0, 3]))
    for cuts, cu_cuts, message in (([3], [0, 1], r"cuts of row 0: expected increasing offsets in \[1, 2\]"),
                                   ([0], [0, 1], "cuts of row 0"), ([2, 1], [0, 2], "cuts of row 0"),
                                   ([1], [1, 1], "cu_cuts must start at 0"),
                                   ([1], [0, 0], "cu_cuts must end at the number of cuts"),
                                   ([1], [0], "cu_cuts must have one entry more")):
        with pytest.raises(ValueError, match=message):
            tree.plan_extend(*three, np.array(cuts), np.array(cu_cuts))
    with pytest.raises(ValueError, match="both cuts and cu_cuts"):
        tree.plan_extend(*three, np.array([1]))
    for op in (tree.release, tree.pin, tree.unpin, tree.evict):
        with pytest.raises(ValueError, match="span 7 is unknown"):
            op(7)
    assert tree.num_free_blocks == 4 and tree.span_ids() == []


def test_in_place_append_comes_back_after_eviction_release_and_failed_forward():
    """A parent's partly filled last block takes its next child in place again once the child that had
    appended there is evicted, released or failed: no copy, no extra block."""
    store, pool = fresh(8, 4)
    tree = store.tree
    (root,) = grow(store, pool, [-1], [[1, 2, 3, 4, 5, 6]])     # block 1 holds 2 of 4 slots
    table = tree.block_table(root).tolist()
    (first,) = grow(store, pool, [root], [[7]])                 # in place
    assert tree.block_table(first).tolist() == table
    tree.evict(first)
    free = tree.num_free_blocks
    (again,) = grow(store, pool, [root], [[8]])                 # in place again: no copy, no block
    assert tree.block_table(again).tolist() == table and tree.num_free_blocks == free
    tree.release(again)
    pool.fail = True
    with pytest.raises(InjectedFailure):
        grow(store, pool, [root], [[9]])
    pool.fail = False
    (late,) = grow(store, pool, [root], [[10]])
    assert tree.block_table(late).tolist() == table and tree.num_free_blocks == free


def test_evicting_the_child_that_appended_in_place_spares_a_sibling_its_copy():
    """The pool full, a second child of a span whose in-place child is evictable needs no block: evicting
    that child gives the slots back. Deciding on a copy first, then evicting for its block, raised
    PoolExhausted (after evicting the child anyway) for a call that fits."""
    store, pool = fresh(2, 4)
    tree = store.tree
    (root,) = grow(store, pool, [-1], [[1, 2, 3, 4, 5, 6]])     # blocks 0 and 1 (2 of 4 slots): the whole pool
    table = tree.block_table(root).tolist()
    (first,) = grow(store, pool, [root], [[7]])                 # in place
    (second,) = grow(store, pool, [root], [[8, 9]])             # evicts `first`, then in place
    assert not tree.is_resident(first)
    assert tree.block_table(second).tolist() == table and tree.num_free_blocks == 0
    assert tree.tokens(second).tolist() == [1, 2, 3, 4, 5, 6, 8, 9]


def test_a_partial_block_no_child_writes_into_goes_for_a_child_s_copy():
    """The root's partial block 0 is copied for its second child (the first wrote into it in place); once the first
    is released, only the root reads block 0, and the second child's copy holds the same KV: the root takes the
    copy and block 0 is free. Kept, it made the second child's 9-token extension fail in a pool of 3 blocks of 4
    (issue #3: a prompt that fits beside another failed alone)."""
    store, pool = fresh(3, 4)
    tree = store.tree
    (root,) = grow(store, pool, [-1], [[1, 2]])
    (first,) = grow(store, pool, [root], [[3]])                  # in place into block 0
    (second,) = grow(store, pool, [root], [[4]])                 # copies block 0 into block 1
    tree.release(first)
    assert tree.block_table(root).tolist() == tree.block_table(second).tolist() == [1]
    assert tree.num_free_blocks == 2
    (third,) = grow(store, pool, [second], [[5, 6, 7, 8, 9, 10]])   # 3 blocks: the whole pool
    assert reads(tree, pool, third) == [1, 2, 4, 5, 6, 7, 8, 9, 10] and reads(tree, pool, root) == [1, 2]
    (fourth,) = grow(store, pool, [root], [[11]])                # the root's block is its child's now: a copy
    assert reads(tree, pool, fourth) == [1, 2, 11] and not tree.is_resident(third)


def test_evicting_for_a_copy_does_not_free_the_block_it_copies_from():
    """A third child of a span whose partial block 0 the first child took in place and the second copied (block 1),
    in a pool of 2: its copy's block is found by evicting the first child, after which the span would take the
    second's copy and free block 0, the very block the third copies from, to become its copy (a plan that copies a
    block onto itself). Registered as a copier before it evicts, the third keeps block 0 to copy from."""
    store, pool = fresh(2, 4)
    tree = store.tree
    (root,) = grow(store, pool, [-1], [[1, 2]])
    (first,) = grow(store, pool, [root], [[3]])                  # in place into block 0
    grow(store, pool, [root], [[4]])                             # copies block 0 into block 1: the whole pool
    (third,) = grow(store, pool, [root], [[5]])                  # FakePool.check_plan: no block copied onto itself
    assert not tree.is_resident(first) and reads(tree, pool, third) == [1, 2, 5]


def test_eviction_takes_the_least_recently_used_span():
    """The pool full, a new span evicts the least recently used unpinned span first."""
    store, pool = fresh(3, 2)
    a, b, c = (grow(store, pool, [-1], [[t, t]])[0] for t in (1, 2, 3))
    grow(store, pool, [-1], [[4, 4]])
    assert [store.tree.is_resident(s) for s in (a, b, c)] == [False, True, True]


def test_extending_a_span_makes_it_recently_used():
    """Extending a span counts as a use: the other one becomes the first to go."""
    store, pool = fresh(3, 2)
    (a,) = grow(store, pool, [-1], [[1, 2]])
    (b,) = grow(store, pool, [-1], [[3, 4]])
    (c,) = grow(store, pool, [a], [[5, 6]])
    store.tree.release(c)
    assert store.tree.lru_order() == [b, a]
    grow(store, pool, [-1], [[7, 8, 9, 10]])
    assert store.tree.is_resident(a) and not store.tree.is_resident(b)


def test_release_drops_the_pins_of_a_kept_prefix():
    """A released span kept only as a child's prefix loses its pins: it can be evicted once the child goes."""
    store, pool = fresh(3, 2)
    tree = store.tree
    (root,) = grow(store, pool, [-1], [[1, 2]])
    tree.pin(root)
    (child,) = grow(store, pool, [root], [[3, 4]])
    tree.release(root)                       # kept as the child's prefix, but no longer pinned
    assert tree.pins(root) == 0
    tree.evict(child)
    assert tree.lru_order() == [root]
    grow(store, pool, [-1], [[5, 6, 7, 8, 9, 10]])   # needs all 3 blocks: the root's KV goes
    assert not tree.is_resident(root)


def reads(tree, pool, span):
    """The tokens a resident span reads back from its block table."""
    bs, pos = tree.block_size, np.arange(tree.length(span))
    return pool.slots[tree.block_table(span)[pos // bs] * bs + pos % bs, 0].tolist()


def test_interrupted_forward_is_undone_like_a_failed_one():
    """A forward stopped by a BaseException that is no Exception (KeyboardInterrupt) is rolled back too."""
    store, pool = fresh(8, 4)
    (root,) = grow(store, pool, [-1], [[1, 2, 3, 4, 5, 6]])
    tree = store.tree
    before = (tree.span_ids(), tree.refcounts().tolist(), tree.num_free_blocks)

    def interrupted(plan):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        store.extend(np.array([root, root]), np.array([7, 8, 9], dtype=np.int32), np.array([0, 1, 3]), interrupted)
    assert (tree.span_ids(), tree.refcounts().tolist(), tree.num_free_blocks) == before and tree.locks(root) == 0


def test_an_interrupt_just_after_the_plan_finished_reaches_the_caller():
    """A KeyboardInterrupt delivered once finish() has returned, still inside the store's try: the plan is done, so
    nothing is undone and the caller gets the interrupt (abandon refused the finished plan with a ValueError)."""
    store, pool = fresh(8, 4)
    tree = store.tree

    class InterruptedAfterFinish:
        def __getattr__(self, name):
            return getattr(tree, name)

        def finish(self, plan):
            tree.finish(plan)
            raise KeyboardInterrupt   # as a signal handler's, at the next bytecode

    store.tree = InterruptedAfterFinish()
    with pytest.raises(KeyboardInterrupt):
        grow(store, pool, [-1], [[1, 2, 3, 4, 5]])
    (span,) = tree.span_ids()
    assert tree.is_resident(span) and tree.locks(span) == 0 and reads(tree, pool, span) == [1, 2, 3, 4, 5]


def test_make_resident_recomputes_an_evicted_span_and_its_evicted_ancestors():
    store, pool = fresh(8, 2)
    tree = store.tree
    (root,) = grow(store, pool, [-1], [[1, 2, 3]])
    (child,) = grow(store, pool, [root], [[4, 5]])
    tree.evict(child)
    tree.evict(root)
    forwards = pool.forwards
    store.make_resident([child], pool.run)
    assert pool.forwards == forwards + 1 and tree.is_resident(root) and tree.is_resident(child)
    assert reads(tree, pool, child) == [1, 2, 3, 4, 5] and tree.locks(child) == tree.locks(root) == 0


def test_make_resident_of_spans_that_cannot_all_fit_is_a_clear_error_not_a_loop():
    """Two evicted siblings whose blocks, with their evicted parent's, are more than the pool holds: restoring one
    must not evict the other (each round would undo the last, forever); the call fails after its first round."""
    store, pool = fresh(2, 2)
    tree = store.tree
    (root,) = grow(store, pool, [-1], [[1, 2]])
    (a,) = grow(store, pool, [root], [[3, 4]])
    (b,) = grow(store, pool, [root], [[5, 6]])   # evicts a
    for span in (b, root):
        tree.evict(span)
    forwards = pool.forwards
    with pytest.raises(PoolExhaustedError):
        store.make_resident([a, b], pool.run)
    assert pool.forwards <= forwards + 2 and tree.locks(a) == tree.locks(b) == tree.locks(root) == 0


def test_evicted_siblings_under_an_evicted_parent_are_restored_in_two_rounds():
    """One round restores the parent with one sibling (a span written by a forward is no base in it); the
    other sibling needs a second round before the extension."""
    store, pool = fresh(8, 2)
    tree = store.tree
    (root,) = grow(store, pool, [-1], [[1, 2, 3]])
    a, b = grow(store, pool, [root, root], [[4], [5]])
    for span in (a, b, root):
        tree.evict(span)
    forwards = pool.forwards
    c, d = grow(store, pool, [a, b], [[6], [7]])
    assert pool.forwards == forwards + 3
    assert reads(tree, pool, c) == [1, 2, 3, 4, 6] and reads(tree, pool, d) == [1, 2, 3, 5, 7]


def test_rows_copying_a_block_that_an_earlier_row_copies_read_the_whole_prefix():
    """All block copies of a plan happen at once before its forward, so a row on an earlier row of the same
    call that copies that row's partial last block (itself a copy, which another row appended to in place)
    must get the prefix slots from the original block, and slots the forward writes into the earlier copy
    (its tokens or its own extras) as extras: else the copy reads stale KV (wrong logits in TreeRunner)."""
    for block_size, parents in ((4, [0, -2, -2]), (8, [0, -2, -2, -4, -4])):
        store, pool = fresh(16, block_size)
        tree = store.tree
        (root,) = grow(store, pool, [-1], [[1, 2]])
        grow(store, pool, [root], [[3]])              # in place: the root's block has one slot past the root
        parents = [root if p == 0 else p for p in parents]
        rows = grow(store, pool, parents, [[5 + r] for r in range(len(parents))])
        for span in rows:
            assert reads(tree, pool, span) == tree.tokens(span).tolist()


def test_span_zero_as_a_parent_is_kept_while_another_parent_is_recomputed():
    """Span id 0 is a parent like any other: SpanStore.extend locks it while recomputing an evicted parent of the
    same call, so that making room evicts another span, not span 0 (which failed the call as not resident)."""
    store, pool = fresh(4, 2)
    tree = store.tree
    (first,) = grow(store, pool, [-1], [[1]])
    assert first == 0
    (a,) = grow(store, pool, [-1], [[3, 4]])
    (b,) = grow(store, pool, [a], [[5, 6, 7]])       # the pool is full
    tree.evict(b)
    (other,) = grow(store, pool, [-1], [[9, 10]])    # one block left; span 0 is the least recently used
    assert tree.lru_order()[0] == first
    c, d = grow(store, pool, [first, b], [[11], [12]])   # recomputing b needs 2 blocks: `other` goes
    assert tree.is_resident(first) and not tree.is_resident(other)
    assert reads(tree, pool, c) == [1, 11] and reads(tree, pool, d) == [3, 4, 5, 6, 7, 12]
