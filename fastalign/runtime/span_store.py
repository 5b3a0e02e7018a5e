"""The span tree (fastalign._C.SpanTree) plus the policy that makes eviction invisible to results.

Every call that uses spans goes through `SpanStore.extend` or `SpanStore.make_resident`: the spans it
uses are locked (never evicted while the call runs), evicted ones are recomputed first (one forward per
round of `plan_restore`), and a forward that raises is rolled back, so that the tree never names blocks
whose KV was not written. `run(plan)` is the caller's forward: it copies `plan.copy_src` blocks into
`plan.copy_dst`, computes the KV of the plan's tokens into `plan.slot_mapping`, and returns whatever the
caller wants back. The store knows nothing about models or devices, which is what lets the property
tests drive it without one.
"""
import numpy as np

from fastalign._C import SpanTree


class SpanStore:
    """Owns the span tree of one KV pool of `num_blocks` blocks of `block_size` tokens."""

    def __init__(self, num_blocks, block_size):
        self.tree = SpanTree(num_blocks, block_size)

    def extend(self, parent_ids, tokens, cu_lens, run, cuts=None, cu_cuts=None):
        """Create one child per row and compute its KV: `parent_ids` [R] int64 (-1: a new root), row r's
        tokens are `tokens[cu_lens[r]:cu_lens[r + 1]]`; with `cuts`, also a span at each of row r's offsets
        `cuts[cu_cuts[r]:cu_cuts[r + 1]]` (see SpanTree.plan_extend). Returns (child ids, cut span ids row
        by row, run's result for the plan); the plan's rows are the children, in order."""
        used = [int(p) for p in parent_ids if p >= 0]
        self.tree.lock(used)
        try:
            self._restore(used, run)
            plan = self.tree.plan_extend(np.asarray(parent_ids, dtype=np.int64), tokens, cu_lens, cuts, cu_cuts)
            result = self._run(plan, run)
        finally:
            self.tree.unlock(used)
        return plan.row_spans, plan.cut_spans, result

    def make_resident(self, ids, run):
        """Recompute whichever of `ids` (and of their ancestors) were evicted."""
        ids = [int(i) for i in ids]
        self.tree.lock(ids)
        try:
            self._restore(ids, run)
        finally:
            self.tree.unlock(ids)

    def _restore(self, ids, run):
        while True:
            plan = self.tree.plan_restore(ids)
            if plan.num_rows == 0:
                return
            self._run(plan, run)

    def _run(self, plan, run):
        """run(plan), then finish the plan (lifting its locks); if run raises, the plan is undone."""
        try:
            result = run(plan)
            self.tree.finish(plan)          # inside: an interrupt before it still undoes the plan
        except BaseException:
            if self.tree.holds(plan):       # (an interrupt just after finish: the plan is done, nothing to undo)
                self.tree.abandon(plan)
            raise
        return result
