"""The search core on hand-built trees: selection rule, back-up with sibling similarity, widening test,
commit and prior remixing, the greedy prior clipping and the 1-token ranking."""
import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from fastalign.rain import RainConfig
from fastalign.rain.jobs import Draft
from fastalign.rain.search import Expansion, ranked_top, token_set_priors
from fastalign.rain.tree import Node, SearchTree
from tests.cyclic_garbage import cyclic_garbage


def tree_with_children(priors, config=RainConfig()):
    root = Node((), None, 0.0, key=0)
    for i, p in enumerate(priors):
        root.children.append(Node((i,), root, p, key=i + 1))
    return SearchTree(root, config)


def test_select_uses_normalised_q_and_prior_bonus():
    tree = tree_with_children([0.5, 0.3, 0.2])
    root, (a, b, c) = tree.root, tree.root.children
    root.n = 4
    a.n, a.q = 2, -0.5
    b.n, b.q = 1, 0.9
    tree.q_min, tree.q_max = -1.0, 1.0
    expected = {}
    for ch in (a, b, c):
        q_norm = 0.0 if ch.n == 0 else (ch.q + 1.0) / (2.0 + 1e-5)
        expected[ch] = q_norm + 2.0 * ch.p * math.sqrt(4) / (1 + ch.n)
    assert tree.select_child(root) is max(expected, key=expected.get)
    for ch in (a, b, c):
        assert tree.score(ch, root.n) == pytest.approx(expected[ch], rel=1e-12)


def test_backup_updates_path_siblings_and_q_range():
    tree = tree_with_children([0.6, 0.4])
    root, (a, b) = tree.root, tree.root.children
    b.embedding = torch.tensor([1.0, 0.0])
    b.n, b.q = 1.0, -1.0
    emb_a = torch.tensor([1.0, 0.01])           # cosine ~ 0.99995 with b: b moves
    tree.backup(a, 1.0, [emb_a])
    assert (a.n, a.fn, a.q) == (1.0, 1, 1.0)
    assert (root.n, root.fn, root.q) == (1.0, 1, 1.0)
    sim = torch.nn.functional.cosine_similarity(emb_a, b.embedding, dim=0).item()
    assert b.n == pytest.approx(1.0 + 0.2 * sim)
    assert b.q == pytest.approx(-1.0 + 0.2 * sim * (1.0 - -1.0) / (1.0 + 0.2 * sim))
    assert b.fn == 0
    assert tree.q_max == 1.0 and tree.q_min == -1.0
    tree.backup(a, -0.5, [torch.tensor([0.0, 1.0])])     # dissimilar now: b stays
    before = (b.n, b.q)
    assert a.q == pytest.approx(0.25) and torch.allclose(a.embedding, torch.tensor([0.5, 0.505]))
    assert (b.n, b.q) == before


def test_child_with_only_shared_visits_has_a_normalised_q():
    """A child visited only through sibling shares (0 < n < 1) is scored on its q, not as unvisited."""
    tree = tree_with_children([0.5, 0.5])
    tree.root.n = 3
    b = tree.root.children[1]
    b.n, b.q = 0.2, 1.0
    assert tree.score(b, 3) == pytest.approx(2.0 / (2.0 + 1e-5) + 2.0 * 0.5 * math.sqrt(3) / 1.2)


def test_backup_divides_q_by_n_and_the_embedding_by_fn():
    """q averages over all visits (shared ones included); the embedding over the node's own visits."""
    tree = tree_with_children([0.5, 0.5])
    a = tree.root.children[0]
    a.n, a.fn, a.q, a.embedding = 1.5, 1, 0.0, torch.tensor([1.0, 0.0])   # 0.5 shared by a sibling
    tree.backup(a, 1.0, [torch.tensor([0.0, 1.0])])
    assert (a.n, a.fn) == (2.5, 2)
    assert a.q == pytest.approx(1.0 / 2.5)
    assert torch.allclose(a.embedding, torch.tensor([0.5, 0.5]))


def test_backup_gives_each_node_on_the_path_the_embedding_of_its_own_path_text():
    """The path's embeddings come leaf first: a node takes its own text's, not another node's on the path."""
    tree = tree_with_children([1.0])
    (a,) = tree.root.children
    leaf = Node((5,), a, 1.0, key=9)
    a.children.append(leaf)
    tree.backup(leaf, 1.0, [torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])])
    assert torch.equal(leaf.embedding, torch.tensor([1.0, 0.0]))
    assert torch.equal(a.embedding, torch.tensor([0.0, 1.0]))


def test_similarity_threshold_is_inclusive():
    tree = tree_with_children([0.5, 0.5], RainConfig(similarity_threshold=1.0))
    a, b = tree.root.children
    b.embedding, b.n, b.q = torch.tensor([1.0, 0.0]), 1.0, 0.0
    tree.backup(a, 1.0, [torch.tensor([1.0, 0.0])])      # cosine exactly 1.0
    assert b.n == pytest.approx(1.2) and b.q == pytest.approx(0.2 / 1.2)


def test_q_range_grows_beyond_a_narrow_initial_range():
    tree = tree_with_children([1.0, 0.0], RainConfig(initial_q_range=(0.0, 0.0)))
    a, b = tree.root.children
    tree.backup(a, 1.0, [torch.tensor([1.0, 0.0])])
    tree.backup(b, -1.0, [torch.tensor([0.0, 1.0])])
    assert (tree.q_min, tree.q_max) == (-1.0, 1.0)


def test_backup_rejects_wrong_number_of_embeddings():
    tree = tree_with_children([1.0])
    with pytest.raises(ValueError, match="path embeddings"):
        tree.backup(tree.root.children[0], 1.0, [])
    with pytest.raises(ValueError, match="path embeddings"):     # a surplus one was dropped unseen (zip)
        tree.backup(tree.root.children[0], 1.0, [torch.ones(2), torch.ones(2)])


def test_backup_keeps_embeddings_in_float32_whatever_the_embedders_dtype():
    """A plug-in embedder may give float16 or float64 vectors: the running means stay float32 (float16 ones lost the
    small steps of a long mean), and siblings of either dtype are compared."""
    tree = tree_with_children([0.5, 0.5])
    a, b = tree.root.children
    tree.backup(b, 1.0, [torch.tensor([1.0, 0.0], dtype=torch.float64)])
    tree.backup(a, 1.0, [torch.tensor([1.0, 0.001], dtype=torch.float16)])
    assert a.embedding.dtype == b.embedding.dtype == torch.float32
    assert b.n == pytest.approx(1.2, abs=1e-3)         # a's visit shared with b (cosine ~ 1)


def test_widening_condition():
    config = RainConfig()
    tree = tree_with_children([0.5, 0.5], config)
    a, b = tree.root.children
    assert not tree.wants_widening(tree.root)             # no embeddings yet
    a.embedding, b.embedding = torch.tensor([1.0, 0.0]), torch.tensor([1.0, 0.01])
    a.q, b.q = -0.2, -0.1
    assert tree.wants_widening(tree.root)                 # depth 0: 1-token sets, threshold 0.03
    b.q = 0.1
    assert not tree.wants_widening(tree.root)             # best child not below 0
    b.q, b.embedding = -0.1, torch.tensor([1.0, 0.5])
    assert not tree.wants_widening(tree.root)             # too diverse


def test_widening_threshold_scales_with_the_childrens_set_length():
    """Threshold = widen_variance_per_token x the children's token-set length (1 at depth 0, 2 at depth 1),
    on the unbiased variance of the children's embeddings."""
    tree = tree_with_children([0.5, 0.5])
    a, b = tree.root.children
    a.q = b.q = -0.5
    a.embedding, b.embedding = torch.tensor([1.0, 0.0]), torch.tensor([1.0, 0.3])   # variance 0.045
    assert not tree.wants_widening(tree.root)             # 0.045 > 0.03
    tree.root.depth = 1
    assert tree.wants_widening(tree.root)                 # 0.045 <= 0.06
    b.embedding = torch.tensor([1.0, 0.4])                # unbiased 0.08 (biased: 0.04)
    assert not tree.wants_widening(tree.root)


def test_widening_threshold_follows_the_sets_a_length_limited_node_expanded_into():
    """Near the length limit a node expands into sets shorter than its depth's (search._set_length): the threshold
    is 0.03 x the length of the sets it has (the reference reads its children's), not of its depth's (10 at depth 3,
    which widened such nodes 10x too readily)."""
    tree = tree_with_children([0.5, 0.5])
    a, b = tree.root.children
    a.q = b.q = -0.5
    a.embedding, b.embedding = torch.tensor([1.0, 0.0]), torch.tensor([1.0, 0.3])   # variance 0.045
    tree.root.depth = 3
    tree.root.expansion = Expansion(length=1)            # room for one token: 1-token sets
    assert not tree.wants_widening(tree.root)             # 0.045 > 0.03 x 1
    tree.root.expansion = Expansion(length=10)
    assert tree.wants_widening(tree.root)                 # 0.045 <= 0.03 x 10


def test_widening_reads_the_norm_of_the_variance_over_every_dimension():
    """Variance 0.02 in each of two dimensions: norm 0.028, under 0.03 (their sum, 0.04, is not); 0.03125 in each
    (norm 0.044) is over it."""
    tree = tree_with_children([0.5, 0.5])
    a, b = tree.root.children
    a.q = b.q = -0.5
    a.embedding, b.embedding = torch.zeros(2), torch.tensor([0.2, 0.2])
    assert tree.wants_widening(tree.root)
    b.embedding = torch.tensor([0.25, 0.25])
    assert not tree.wants_widening(tree.root)


def test_a_lone_child_widens_only_when_asked():
    """The reference never widens a node with one child (torch's unbiased variance of one embedding is NaN), which
    a confident model leaves at every depth below the root; widen_lone_child reads the variance as 0."""
    for lone, widens in ((False, False), (True, True)):
        tree = tree_with_children([1.0], RainConfig(widen_lone_child=lone))
        (child,) = tree.root.children
        child.embedding, child.q = torch.tensor([1.0, 0.0]), -0.5
        assert tree.wants_widening(tree.root) is widens
        child.q = 0.5
        assert not tree.wants_widening(tree.root)         # its value is not below widen_max_q


def test_no_widening_at_max_children():
    tree = tree_with_children([0.05] * 20)
    for child in tree.root.children:
        child.embedding, child.q = torch.tensor([1.0, 0.0]), -0.5
    assert not tree.wants_widening(tree.root)
    tree.root.children.pop()
    assert tree.wants_widening(tree.root)


def test_commit_picks_most_visited_ties_by_q_and_remixes_priors():
    tree = tree_with_children([0.2, 0.3, 0.5])
    a, b, c = tree.root.children
    a.n, a.q, b.n, b.q, c.n, c.q = 3, 0.1, 3, 0.4, 2, 0.9
    assert tree.best_child() is b
    b.children = [Node((7,), b, 0.8, 1), Node((8,), b, 0.2, 2)]
    tree.q_min, tree.q_max = -0.7, 0.9
    old_root, discarded = tree.commit(b)
    assert tree.root is b and b.parent is None and discarded == [a, c]
    assert (tree.q_min, tree.q_max) == (-0.7, 0.9)
    assert [ch.p for ch in b.children] == pytest.approx([0.75 * 0.8 + 0.125, 0.75 * 0.2 + 0.125])


def test_the_subtrees_a_commit_discards_are_no_cyclic_garbage():
    """A node and its children point at each other: the siblings' subtrees a commit discarded were left in reference
    cycles, freed only by the collector's full passes over the whole heap."""
    def commit_and_let_go():
        tree = tree_with_children([0.2, 0.3, 0.5])
        kept, *discarded = tree.root.children        # the kept one stays a leaf, as a search's last root does
        for child in discarded:
            child.children = [Node((7,), child, 0.5, 1), Node((8,), child, 0.5, 2)]
            child.children[0].children = [Node((9,), child.children[0], 1.0, 3)]
        tree.commit(kept)

    assert cyclic_garbage(commit_and_let_go, Node) == 0


def test_best_child_ties_in_visits_and_q_go_to_the_first():
    """Equal visits and equal q: the first child, as in selection."""
    tree = tree_with_children([0.2, 0.3, 0.5])
    a, b, c = tree.root.children
    a.n, a.q, b.n, b.q, c.n, c.q = 3, 0.4, 3, 0.4, 2, 0.9
    assert tree.best_child() is a


def test_commit_normalises_priors_that_a_widening_left_summing_past_one():
    """A node widened below the root keeps its children's priors and adds the new child's, so they sum past 1; the
    commit that makes it the root mixes them with uniform and normalises them."""
    tree = tree_with_children([1.0])
    (a,) = tree.root.children
    a.children = [Node((7,), a, 0.6, 1), Node((8,), a, 0.4, 2), Node((9,), a, 0.5, 3)]
    tree.commit(a)
    mixed = [0.75 * p + 0.25 / 3 for p in (0.6, 0.4, 0.5)]
    assert [ch.p for ch in a.children] == pytest.approx([m / sum(mixed) for m in mixed])


def test_token_set_priors_clip_greedy_and_drop_duplicates():
    greedy = Draft((1, 2), math.log(0.5))
    samples = [Draft((1, 2), math.log(0.5)), Draft((3, 4), math.log(0.1)), Draft((5, 6), math.log(0.05)),
               Draft((3, 4), math.log(0.1))]
    out = token_set_priors(greedy, samples)
    assert [t for t, _, _ in out] == [(1, 2), (3, 4), (5, 6)]
    assert out[0][1] == pytest.approx(0.15)              # min(0.5, 0.15) = 0.15 >= max + min = 0.15
    single = token_set_priors(greedy, [Draft((3, 4), math.log(0.1))])
    assert single[0][1] == pytest.approx(0.2)            # capped by 0.1, raised to max + min = 0.2
    alone = token_set_priors(greedy, [Draft((1, 2), math.log(0.5))])
    assert alone == [((1, 2), pytest.approx(0.5), greedy)]
    samples = [Draft((t,), math.log(p)) for t, p in ((3, 0.3), (4, 0.1), (5, 0.05))]
    three = token_set_priors(Draft((1, 2), math.log(0.2)), samples)
    assert three[0][1] == pytest.approx(0.35)            # under the sum 0.45, raised to max + min = 0.35


def test_ranked_top_renormalises_over_the_kept_tokens():
    ids = [2, 5, 9, 11]
    logits = [0.0, 3.0, 1.0, 2.0]
    top, probs = ranked_top(ids, logits, 2)
    assert top == [5, 11]
    assert probs == pytest.approx(torch.softmax(torch.tensor([3.0, 2.0]), 0).tolist())


def test_ranked_top_keeps_ascending_id_order_whatever_the_logits_order():
    """The kept tokens come in ascending id, as the ranked ids do, not most likely first: the children's order
    breaks ties in selection and commit (the first child wins). A higher id with the higher logit tells them apart."""
    top, probs = ranked_top([2, 5, 9, 11], [0.0, 2.0, 3.0, 1.0], 2)
    assert top == [5, 9]
    assert probs == pytest.approx(torch.softmax(torch.tensor([2.0, 3.0]), 0).tolist())


def test_config_validation_and_lengths():
    c = RainConfig()
    assert [c.token_set_length(d) for d in range(6)] == [1, 2, 4, 10, 10, 10]
    with pytest.raises(ValueError, match="candidates"):
        RainConfig(candidates=0).validate()
    with pytest.raises(ValueError, match="token_set_lengths"):
        RainConfig(token_set_lengths=()).validate()
    RainConfig(initial_q_range=[-1.0, 1.0], token_set_lengths=[1, 2]).validate()  # lists, as a YAML file gives



@pytest.mark.parametrize("bad, name", [
    (dict(similarity_weight=-0.2), "similarity_weight"),          # negative visits: n can reach 0
    (dict(similarity_threshold=math.nan), "similarity_threshold"),  # every sibling would share
    (dict(similarity_threshold=-0.5), "similarity_threshold"),    # opposite siblings would lose visits
    (dict(early_stop_q=math.nan), "early_stop_q"),                # would never stop early
    (dict(widen_variance_per_token=math.nan), "widen_variance_per_token"),
    (dict(widen_max_q=math.nan), "widen_max_q"),
    (dict(q_norm_eps=-1e-5), "q_norm_eps"),
    (dict(q_norm_eps=0.0, initial_q_range=(0.0, 0.0)), "q_norm_eps"),  # q_norm would divide by zero
    (dict(initial_q_range=(0.0,)), "initial_q_range"),
    (dict(token_set_lengths=(1, 2.5)), "token_set_lengths\\[1\\]"),   # a 2.5-token set ran past max_length
    (dict(candidates=2.5), "candidates"),
    (dict(widen_lone_child="no"), "widen_lone_child"),            # a quoted YAML 'no' is a true string
    (dict(root_visits=math.inf), "root_visits"),                   # never reached: the search never committed
    (dict(min_new_visits=2.5), "min_new_visits"),
    (dict(early_stop_fresh_visits=math.nan), "early_stop_fresh_visits"),  # would never stop early
    (dict(early_stop_fresh_visits="6"), "early_stop_fresh_visits"),       # every prompt failed in the search
    # these raised TypeErrors naming no setting ('>=' not supported between instances of 'str' and 'int')
    (dict(exploration="2"), "exploration"),
    (dict(virtual_loss=None), "virtual_loss"),
    (dict(similarity_threshold=[0.9]), "similarity_threshold"),
    (dict(root_prior_mix=True), "root_prior_mix"),
    (dict(q_norm_eps="0.5"), "q_norm_eps must be a number"),
    (dict(similarity_weight="0.5"), "similarity_weight must be a number"),
    (dict(widen_variance_per_token="0.5"), "widen_variance_per_token must be a number"),
    (dict(widen_max_q="0.5"), "widen_max_q must be a number"),
    (dict(early_stop_q="0.5"), "early_stop_q must be a number"),
    (dict(initial_q_range=("-1", "1")), "initial_q_range\\[0\\]"),
    (dict(initial_q_range=1.0), "initial_q_range"),
    (dict(token_set_lengths=4), "token_set_lengths"),
    # infinite: selection ignored the values (every score infinite, or every q_norm 0), a sibling's share of
    # visits made n infinite, and a pending leaf's infinite loss crashed the search
    (dict(exploration=math.inf), "exploration must be finite"),
    (dict(q_norm_eps=math.inf), "q_norm_eps must be finite"),
    (dict(initial_q_range=(-math.inf, 1.0)), "initial_q_range\\[0\\] must be finite"),
    (dict(initial_q_range=(-1.0, math.inf)), "initial_q_range\\[1\\] must be finite"),
    (dict(similarity_weight=math.inf), "similarity_weight must be finite"),
    (dict(virtual_loss=math.inf, parallel_leaves=2), "virtual_loss must be finite"),
    # out of range: each of these checks could go unseen
    (dict(exploration=-1.0), "exploration must be >= 0"),                 # selection would flee from priors
    (dict(sample_top_k=0), "sample_top_k must be >= 1"),                  # multi-token sets drawn from nothing
    (dict(token_set_lengths=(1, 0)), "token_set_lengths must be"),        # empty token sets: no progress
    (dict(root_prior_mix=1.5), "root_prior_mix must be in \\[0, 1\\]"),     # negative root priors
    (dict(root_prior_mix=-0.5), "root_prior_mix must be in \\[0, 1\\]"),
    (dict(max_children=5, candidates=10), "max_children must be >= candidates"),
    (dict(min_new_visits=0), "root_visits and min_new_visits must be >= 1"),
    (dict(max_new_tokens=-1), "max_new_tokens must be >= 0"),
    (dict(virtual_loss=0.0, parallel_leaves=2), "virtual_loss must be > 0"),   # pending leaves would not steer
    (dict(seed=2 ** 64), "seed must be an integer in \\[0, 2\\*\\*64\\), got 18446744073709551616"),  # seed 0
    (dict(seed=-1), "seed must be an integer in \\[0, 2\\*\\*64\\), got -1"),                 # searched as 2**64 - 1
    (dict(widen_group=0), "widen_group must be >= 1"),
    (dict(max_length=1), "max_length must be >= 2"),
    (dict(parallel_leaves=0), "parallel_leaves must be >= 1"),
    (dict(max_length=100.5), "max_length must be an integer"),
    (dict(max_new_tokens=2.5), "max_new_tokens must be an integer"),
    (dict(rollout_stop_chars=None), "rollout_stop_chars must be a text"),  # failed every prompt once the model ran
    (dict(rollout_stop_chars=[".", ","]), "rollout_stop_chars must be a text"),
])
def test_config_rejects_constants_that_break_the_search_silently(bad, name):
    with pytest.raises(ValueError, match=f"RainConfig: {name}"):
        RainConfig(**bad).validate()


@pytest.mark.parametrize("edge", [
    dict(exploration=0.0),                        # pure exploitation of q
    dict(q_norm_eps=0.0),                         # the range (-1, 1) is never empty
    dict(initial_q_range=(0.5, 0.5)),             # one value, q_norm_eps > 0
    dict(candidates=1, max_children=1),           # greedy only; max_children may equal candidates
    dict(sample_top_k=1, widen_group=1, token_set_lengths=(1,)),
    dict(root_prior_mix=0.0), dict(root_prior_mix=1.0),
    dict(similarity_threshold=0.0, similarity_weight=0.0),   # 0: no sharing, any similarity
    dict(similarity_threshold=math.inf, early_stop_q=math.inf, widen_max_q=-math.inf),   # rules switched off
    dict(root_visits=1, min_new_visits=1, early_stop_fresh_visits=0),
    dict(max_length=2, max_new_tokens=0, parallel_leaves=1, seed=0, rollout_stop_chars="", turn_marker=""),
])
def test_config_accepts_the_edges_of_each_range(edge):
    """A check tightened by one (`>` for `>=`) would refuse a setting the docs allow."""
    assert RainConfig(**edge).validate() == RainConfig(**edge)


def test_virtual_loss_steers_selection_and_leaves_no_trace():
    tree = tree_with_children([0.5, 0.3, 0.2])
    root, (a, b, c) = tree.root, tree.root.children
    root.n, a.n, a.q, b.n, b.q = 3, 2, 0.5, 1, 0.4
    before = {ch: tree.score(ch, root.n) for ch in (a, b, c)}
    first = tree.select_child(root)
    tree.add_virtual_loss(first, 1.0)
    assert first.vl == root.vl == 1.0
    assert tree.score(first, root.n + 1) < before[first]       # a pending leaf counts as a lost visit
    second = tree.select_child(root)
    assert second is not first
    tree.add_virtual_loss(second, 1.0)
    tree.add_virtual_loss(first, -1.0)
    tree.add_virtual_loss(second, -1.0)
    assert all(n.vl == 0.0 for n in (root, a, b, c))
    assert {ch: tree.score(ch, root.n) for ch in (a, b, c)} == before       # exactly the plain rule again
    assert tree.select_child(root) is first
    assert (root.n, a.n, a.q, b.n, b.q) == (3, 2, 0.5, 1, 0.4)               # real statistics untouched


def test_select_breaks_ties_by_child_order():
    """Equal scores (unvisited children with equal priors): the first child, as the reference's max() takes."""
    tree = tree_with_children([0.25, 0.25, 0.25, 0.25])
    tree.root.n = 1
    assert tree.select_child(tree.root) is tree.root.children[0]
    tree.root.children[2].p = 0.2500001
    assert tree.select_child(tree.root) is tree.root.children[2]


def test_defaults_are_the_reference_hh_constants():
    """SPEC §2's constants (the reference's HH setting). Every search test runs a small config, so nothing else
    would notice a changed default."""
    c = RainConfig()
    assert (c.exploration, c.q_norm_eps, c.initial_q_range) == (2.0, 1e-5, (-1.0, 1.0))
    assert (c.candidates, c.sample_top_k, c.token_set_lengths, c.root_prior_mix) == (10, 15, (1, 2, 4, 10), 0.25)
    assert (c.similarity_threshold, c.similarity_weight) == (0.95, 0.2)
    assert (c.max_children, c.widen_variance_per_token, c.widen_max_q, c.widen_group) == (20, 0.03, 0.0, 2)
    assert (c.root_visits, c.min_new_visits, c.early_stop_fresh_visits, c.early_stop_q) == (50, 15, 6, 0.8)
    assert sorted(c.rollout_stop_chars) == sorted(",.?:;\n") and c.turn_marker == "Human:"
    assert (c.parallel_leaves, c.widen_lone_child) == (1, False)     # the reference's one iteration at a time
    # no cap on new tokens besides max_length (the CLI alone caps at 256), pending leaves as one lost visit each
    assert (c.max_new_tokens, c.max_length, c.virtual_loss, c.seed) == (0, 2048, 1.0, 0)


def test_q_range_takes_every_node_on_the_backed_up_path():
    """q_min / q_max follow the q of every node the back-up updates, not the leaf's alone (with the default range
    (-1, 1) no q ever leaves it, so only a narrow initial range shows this)."""
    tree = tree_with_children([1.0], RainConfig(initial_q_range=(0.0, 0.0)))
    (a,) = tree.root.children
    a.n, a.fn, a.q, a.embedding = 1.0, 1, -1.0, torch.tensor([1.0, 0.0])     # one earlier visit, value -1
    leaf = Node((5,), a, 1.0, key=9)
    a.children.append(leaf)
    tree.backup(leaf, 0.0, [torch.tensor([1.0, 0.0]), torch.tensor([1.0, 0.0])])
    assert (leaf.q, a.q) == (0.0, -0.5)
    assert (tree.q_min, tree.q_max) == (-0.5, 0.0)


def test_virtual_visits_count_in_the_parents_visits():
    """Under virtual loss the exploration bonus reads sqrt(n_parent + pending virtual visits): here the pending
    leaf c makes the root's count 4, which lifts unvisited b (bonus 2 * 0.4 * 2 = 1.6) above a (1 + 0.2); on the
    root's real count alone a (1 + 0.1) would beat b (0.8)."""
    tree = tree_with_children([0.1, 0.4, 0.5])
    root, (a, b, c) = tree.root, tree.root.children
    root.n, a.n, a.q = 1.0, 1.0, 1.0
    tree.add_virtual_loss(c, 3.0)
    assert root.vl == 3.0
    assert tree.select_child(root) is b
    assert tree.score(b, root.n + root.vl) == pytest.approx(1.6)
    tree.add_virtual_loss(c, -3.0)
    assert tree.select_child(root) is a                  # the plain rule again: a 1.1, b 0.8, c 1.0


def test_a_new_node_is_unvisited_and_scored_on_its_prior_alone():
    """A child just made by an expansion has n = fn = q = 0: its score is c * p * sqrt(n_parent), with q_norm 0
    (hand-set statistics elsewhere would not notice a node born with a visit)."""
    tree = tree_with_children([0.3])
    (child,) = tree.root.children
    assert (child.n, child.fn, child.q, child.vl) == (0.0, 0, 0.0, 0.0)
    assert child.embedding is None and child.children == []
    assert tree.score(child, 9.0) == pytest.approx(2.0 * 0.3 * 3.0, rel=1e-12)


def test_a_pending_leaf_is_scored_as_visits_of_value_minus_one():
    """Under vl virtual visits a child with n visits of mean q is scored as n + vl visits of mean
    (q n - vl) / (n + vl), with the parent's pending visits in its count."""
    tree = tree_with_children([0.5, 0.5])
    root, (a, _) = tree.root, tree.root.children
    root.n, a.n, a.q = 4.0, 3.0, 0.6
    tree.add_virtual_loss(a, 2.0)
    q = (0.6 * 3.0 - 2.0) / 5.0
    expected = (q + 1.0) / (2.0 + 1e-5) + 2.0 * 0.5 * math.sqrt(6.0) / (1.0 + 5.0)
    assert tree.score(a, root.n + root.vl) == pytest.approx(expected, rel=1e-12)


def test_widening_reads_the_unbiased_variance_of_any_number_of_children():
    """Three children: the variance divides by 2 (n - 1), not 1. Embeddings 0, 0, 0.3 in one dimension: unbiased
    variance 0.03, under the threshold 0.06 at depth 1 (a variance dividing by 1 would be 0.06, not under it)."""
    tree = tree_with_children([0.4, 0.3, 0.3])
    tree.root.depth = 1
    for child, x in zip(tree.root.children, (0.0, 0.0, 0.3)):
        child.embedding, child.q = torch.tensor([x]), -0.5
    assert tree.wants_widening(tree.root)


@pytest.mark.parametrize("at_the_bound", ["variance", "best_q"])
def test_widening_bounds_are_strict(at_the_bound):
    """SPEC §2: the variance's norm below the threshold and the best child's q below widen_max_q, strictly. With
    widen_variance_per_token 0.5, embeddings 0 and 1 have unbiased variance exactly 0.5, the threshold at depth 0."""
    tree = tree_with_children([0.5, 0.5], RainConfig(widen_variance_per_token=0.5))
    a, b = tree.root.children
    a.embedding, b.embedding = torch.tensor([0.0]), torch.tensor([0.5])
    a.q = b.q = -0.5
    assert tree.wants_widening(tree.root)
    if at_the_bound == "variance":
        b.embedding = torch.tensor([1.0])
    else:
        b.q = 0.0
    assert not tree.wants_widening(tree.root)


def test_backup_updates_every_node_of_a_deep_path():
    """Each node from the leaf to the root gets n += 1, fn += 1, q += (v - q) / n, whatever its depth."""
    tree = tree_with_children([1.0])
    node, path = tree.root.children[0], []
    for depth in range(3):
        path.append(node)
        node.n, node.fn, node.q, node.embedding = 1.0 + depth, 1 + depth, -0.5, torch.tensor([1.0, 0.0])
        child = Node((depth,), node, 1.0, key=10 + depth)
        node.children.append(child)
        node = child
    path.append(node)
    tree.backup(node, 1.0, [torch.tensor([1.0, 0.0])] * len(path))
    for depth, visited in enumerate(path):
        n = 2.0 + depth if depth < 3 else 1.0
        assert (visited.n, visited.fn) == (n, int(n)), depth
        assert visited.q == pytest.approx(-0.5 + 1.5 / n if depth < 3 else 1.0), depth


def test_backup_reads_a_paths_sibling_similarities_in_one_cosine():
    """Every node of a deep path has siblings, some similar: one cosine (two norms) and one host read per back-up,
    not one per path node, and each sibling's share the same numbers as a cosine of the updated node alone."""
    dim, tree = 16, tree_with_children([0.5, 0.3, 0.2])
    node, path = tree.root.children[0], []
    for depth in range(5):
        path.append(node)
        node.n, node.fn, node.q = 2.0, 2, 0.1
        node.children = [Node((depth, i), node, 0.5, key=100 * depth + i) for i in range(3)]
        node = node.children[0]
    path.append(node)
    path_embeddings = [torch.randn(dim) for _ in path]
    siblings = {}
    for visited, emb in zip(path, path_embeddings):
        if visited is not path[-1]:
            visited.embedding = emb + 0.01 * torch.randn(dim)
        for i, sibling in enumerate(s for s in visited.parent.children if s is not visited):
            sibling.n, sibling.q = 1.0 + i, -0.3
            sibling.embedding = emb + (0.01 if i == 0 else 3.0) * torch.randn(dim)   # the first similar
        siblings[visited] = [s for s in visited.parent.children if s is not visited]
    norms = []

    class Norms(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            norms.append(func.overloadpacket is torch.ops.aten.linalg_vector_norm)
            return func(*args, **(kwargs or {}))

    with Norms():
        tree.backup(path[-1], 1.0, path_embeddings[::-1])
    assert sum(norms) == 2
    shared = 0
    for visited, others in siblings.items():
        sims = torch.nn.functional.cosine_similarity(visited.embedding.unsqueeze(0),
                                                     torch.stack([s.embedding for s in others]), dim=1).tolist()
        for i, (sibling, sim) in enumerate(zip(others, sims)):
            n, q = 1.0 + i, -0.3
            if sim >= tree.config.similarity_threshold:
                n += 0.2 * sim
                q += 0.2 * sim * (1.0 - q) / n
                shared += 1
            assert (sibling.n, sibling.q) == (n, q)
    assert shared >= len(path)


def test_virtual_visits_removed_in_another_order_leave_exactly_none():
    """Three leaves pending on one parent with virtual_loss 0.1, removed in another order, leave a float residue
    (~3e-17): kept, it made an unvisited child score as n = vl, q = -1 (never selected under a raised q range)."""
    tree = tree_with_children([0.5, 0.5], RainConfig(initial_q_range=(0.0, 0.5)))
    a, b = tree.root.children
    leaves = [Node((i,), a, 1.0, key=10 + i) for i in range(3)]
    a.children.extend(leaves)
    before = tree.score(a, 1.0)
    for leaf in leaves:
        tree.add_virtual_loss(leaf, 0.1)
    for leaf in reversed(leaves):
        tree.add_virtual_loss(leaf, -0.1)
    assert a.vl == 0.0 and tree.root.vl == 0.0 and all(leaf.vl == 0.0 for leaf in leaves)
    assert tree.score(a, 1.0) == before
