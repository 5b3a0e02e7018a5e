"""Span: the user's handle on a node of a TreeRunner's tree (its parent's tokens plus its own, with KV)."""
from __future__ import annotations


class Span:
    """A token sequence with cached KV: `parent`'s sequence plus `new_tokens`. Immutable.

    Create spans with `TreeRunner.prefill` / `TreeRunner.extend`; end them with `TreeRunner.release`, or
    simply drop every reference to them (a span nobody can reach is released when collected). A span keeps
    its parent reachable, so holding a leaf keeps its whole path. Rewinding to an ancestor is just using the
    ancestor's handle: nothing is computed or copied. A released span still answers id, parent, length and
    alive; its other attributes raise ValueError. An evicted span answers all (resident is False).
    """

    __slots__ = ("_runner", "_id", "_parent", "_length", "_tree", "_owned", "__weakref__")

    def __init__(self, runner, span_id, parent, length, tree):
        self._runner = runner
        self._id = span_id
        self._parent = parent
        self._length = length
        self._tree = tree
        self._owned = True      # False once the runner released the span: nothing left for the handle to do

    def __del__(self):
        """Releases the span when its handle is collected unreleased (no weakref.finalize: a span is made per row of
        every call, and registering a finalizer cost more host time than the rest of the handle)."""
        if getattr(self, "_owned", False) and self._tree.is_live(self._id):
            self._tree.release(self._id)

    @property
    def id(self) -> int:
        """The span's id in the runner's span tree (unique for the runner's lifetime)."""
        return self._id

    @property
    def parent(self) -> Span | None:
        """The span this one extends, or None for a root (returned even after it was released)."""
        return self._parent

    @property
    def length(self) -> int:
        """Number of tokens from the root through this span."""
        return self._length

    def __len__(self) -> int:
        return self._length

    def __copy__(self):
        """The span itself: a handle is immutable, and a second handle would be released with the first."""
        return self

    def __deepcopy__(self, memo):
        return self

    def __reduce_ex__(self, protocol):
        """Refused: a span's KV is in its runner's pool (pickle went on to the runner and its model, then failed on the
        span tree)."""
        raise TypeError("a Span cannot be pickled: it belongs to its TreeRunner, whose pool holds its KV; keep its "
                        "tokens (span.tokens) and prefill them on a runner")

    @property
    def alive(self) -> bool:
        """False once released."""
        return self._runner.tree.is_live(self._id)

    @property
    def resident(self) -> bool:
        """True while the span's KV is in the pool (an evicted span is recomputed when used)."""
        self._runner.check_span(self, "span")
        return self._runner.tree.is_resident(self._id)

    @property
    def pins(self) -> int:
        """How many pins hold the span resident (TreeRunner.pin nests)."""
        self._runner.check_span(self, "span")
        return self._runner.tree.pins(self._id)

    @property
    def new_tokens(self) -> list[int]:
        """The tokens this span appends to its parent, as a list of ints."""
        self._runner.check_span(self, "span")
        return self._runner.tree.new_tokens(self._id).tolist()

    @property
    def tokens(self) -> list[int]:
        """Every token from the root through this span, as a list of ints."""
        self._runner.check_span(self, "span")
        return self._runner.tree.tokens(self._id).tolist()

    def __repr__(self):
        state = "released" if not self.alive else f"length={self._length}"
        return f"Span(id={self._id}, {state})"
