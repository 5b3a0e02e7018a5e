"""A token trie of one prompt's computed sequences (generation or judge side), for the tree engine.

A `PrefixNode` is one position: the sequence from the trie's origin through its token. Its `entry` is the
computed prefix ending exactly there (a span on the runtime and what the search reads from it), or None:
not computed yet, computed only inside a longer row (a runtime row cannot be cut afterwards), or given
back. The engine feeds what a node lacks from its deepest ancestor that has an entry, so a prefix that is
still held is never computed twice; keeping an entry wherever a later sequence may branch is what makes
the count of recomputed tokens zero.

`keep_only_below` is the rewind: after a commit only the new root's subtrie can be needed again (and, if
the new root itself was never computed, the deepest computed position above it); everything else is
handed to `drop`.
"""
from typing import Callable, Iterable, Iterator, List, Optional

from .sampling import extend_key


class PrefixNode:
    __slots__ = ("parent", "token", "children", "entry", "pending", "_skey")

    def __init__(self, parent: Optional["PrefixNode"], token: Optional[int], skey: Optional[int] = None):
        self.parent = parent
        self.token = token
        self.children = {}
        self.entry = None
        self.pending = False         # a row that will give this node its entry is in the current call
        self._skey = skey

    @property
    def skey(self) -> int:
        """Sampling key of the sequence (generation side): the origin's key extended by the tokens."""
        if self._skey is None:
            self._skey = extend_key(self.parent.skey, [self.token])
        return self._skey

    def child(self, token: int) -> "PrefixNode":
        token = int(token)
        node = self.children.get(token)
        if node is None:
            node = self.children[token] = PrefixNode(self, token)
        return node

    def walk(self, tokens: Iterable[int]) -> "PrefixNode":
        node = self
        for t in tokens:
            node = node.child(t)
        return node

    def missing_path(self) -> List["PrefixNode"]:
        """The nodes from just below the deepest ancestor-or-self that has an entry or is pending, down to
        this one (empty when this node has an entry or is pending)."""
        path = []
        node = self
        while node.entry is None and not node.pending:
            path.append(node)
            node = node.parent
            if node is None:
                raise RuntimeError("prefix trie: no computed ancestor to extend (the origin was given back)")
        path.reverse()
        return path

    def subtree(self) -> Iterator["PrefixNode"]:
        stack = [self]
        while stack:
            node = stack.pop()
            yield node
            stack.extend(node.children.values())


def keep_only_below(node: PrefixNode, drop: Callable[[object], None], keep_origin: bool = True):
    """Drops every entry that is neither at or below `node` nor on its ancestor chain as needed: the
    deepest computed ancestor while `node` has no entry, and the trie's origin when `keep_origin`."""
    keep_ancestor = node.entry is None
    child, above = node, node.parent
    while above is not None:
        for token, other in list(above.children.items()):
            if other is not child:
                _drop_subtrie(other, drop)
                del above.children[token]
        if above.entry is not None:
            if keep_ancestor:
                keep_ancestor = False
            elif not (keep_origin and above.parent is None):
                drop(above.entry)
                above.entry = None
        child, above = above, above.parent


def drop_all(origin: PrefixNode, drop: Callable[[object], None]):
    _drop_subtrie(origin, drop)
    origin.children = {}


def _drop_subtrie(top: PrefixNode, drop: Callable[[object], None]):
    """Hands every entry at or below `top` to `drop` and clears the parent links there: a node and its children
    point at each other, so a subtrie left linked is cyclic garbage that only the collector's full passes free
    (thousands of nodes per search, with their entries' tensors), where unlinked it goes as soon as it is dropped."""
    for n in top.subtree():
        if n.entry is not None:
            drop(n.entry)
            n.entry = None
        n.parent = None
