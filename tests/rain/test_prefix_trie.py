"""The tree engine's prefix trie: the rewind keeps only what the new root's subtrie can need, and dropping a
trie hands every entry back exactly once."""
import numpy as np
import torch

from fastalign.rain.prefix_trie import PrefixNode, drop_all, keep_only_below
from tests.cyclic_garbage import cyclic_garbage


def trie():
    """origin(o) - 1(a) - 2 - 3(c); 2 - 4(d); 1 - 5(x) - 6(y): entries named by letter, node 2 has none."""
    origin = PrefixNode(None, None, skey=0)
    nodes = {"origin": origin, "a": origin.child(1), "b": origin.walk([1, 2]), "c": origin.walk([1, 2, 3]),
             "d": origin.walk([1, 2, 4]), "x": origin.walk([1, 5]), "y": origin.walk([1, 5, 6])}
    for name, node in nodes.items():
        node.entry = None if name == "b" else name[0]
    return nodes


def test_rewind_to_an_uncomputed_node_keeps_its_deepest_computed_ancestor():
    for keep_origin, dropped in ((False, ["o", "x", "y"]), (True, ["x", "y"])):
        nodes, handed_back = trie(), []
        keep_only_below(nodes["b"], handed_back.append, keep_origin=keep_origin)
        assert sorted(handed_back) == dropped
        assert nodes["a"].entry == "a" and nodes["c"].entry == "c" and nodes["d"].entry == "d"
        assert list(nodes["a"].children) == [2] and list(nodes["origin"].children) == [1]  # branches cut off
        assert nodes["x"].entry is None and nodes["y"].entry is None
        assert nodes["c"].missing_path() == [] and nodes["b"].missing_path() == [nodes["b"]]


def test_rewind_to_a_computed_node_drops_every_ancestor_but_the_origin():
    nodes, handed_back = trie(), []
    keep_only_below(nodes["c"], handed_back.append, keep_origin=True)
    assert sorted(handed_back) == ["a", "d", "x", "y"]
    assert nodes["origin"].entry == "o" and nodes["c"].entry == "c"


def test_drop_all_hands_back_each_entry_once_and_empties_the_trie():
    nodes, handed_back = trie(), []
    drop_all(nodes["origin"], handed_back.append)
    drop_all(nodes["origin"], handed_back.append)
    assert sorted(handed_back) == ["a", "c", "d", "o", "x", "y"]
    assert nodes["origin"].children == {} and all(n.entry is None for n in nodes.values())


def test_a_rewound_or_dropped_trie_is_no_cyclic_garbage():
    """A node and its children point at each other: the branches a rewind cut off and the trie a finish dropped were
    left in reference cycles (about 12,600 nodes per search of 48 tokens, with their entries), freed only by the
    collector's full passes, which walk the whole heap (half a second each in a search with a model loaded)."""
    def rewind_then_finish():
        nodes = trie()
        keep_only_below(nodes["c"], lambda entry: None, keep_origin=True)
        drop_all(nodes["origin"], lambda entry: None)

    assert cyclic_garbage(rewind_then_finish, PrefixNode) == 0


def test_a_token_given_as_a_tensor_or_numpy_integer_finds_the_same_node():
    """Children are keyed by the token's value: keyed by a tensor (hashed by identity), each lookup made a new
    branch and its prefix was computed again."""
    origin = PrefixNode(None, None, skey=0)
    node = origin.walk([1, 2])
    assert origin.walk(torch.tensor([1, 2])) is node and origin.walk(np.array([1, 2])) is node
    assert origin.child(torch.tensor(1)) is origin.child(1) and list(origin.children) == [1]
