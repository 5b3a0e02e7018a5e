"""The RAIN search tree: nodes, selection, back-up with sibling similarity, widening test, commit.

Pure host-side bookkeeping, independent of how the model runs. A node is a token set appended to its
parent; it keeps a visit count n (fractional: similar siblings share visits), a fresh count fn (real
visits only), a value q (running mean of self-evaluation scores), a prior p and an embedding e (running
mean of the embeddings of the texts below it). Engines hang their own state on `Node.handle`.

Virtual loss (optional, for several inner iterations at once): while a selected leaf's evaluation is
out, every node on its path counts `vl` extra visits of value -1 in selection, so that the next selection
of the same batch prefers another path; the real statistics never include them. With no virtual visits
pending, selection is exactly the plain rule.
"""
import math
from typing import List, Optional, Sequence, Tuple

import torch

from .config import RainConfig


class Node:
    __slots__ = ("tokens", "parent", "depth", "children", "n", "fn", "q", "p", "embedding", "terminal",
                 "key", "seq_key", "expansion", "handle", "hidden_sum", "vl")

    def __init__(self, tokens: Tuple[int, ...], parent: Optional["Node"], prior: float, key: int,
                 terminal: bool = False, seq_key: int = 0):
        self.tokens = tokens
        self.parent = parent
        self.depth = 0 if parent is None else parent.depth + 1
        self.children: List[Node] = []
        self.n = 0.0
        self.fn = 0
        self.q = 0.0
        self.p = prior
        self.embedding: Optional[torch.Tensor] = None
        self.terminal = terminal          # the sequence ends here: never expanded
        self.key = key                    # hash of the full token state, for keyed sampling
        self.seq_key = seq_key            # ledger key of the full token state, for the minimum count
        self.expansion = None             # the Expansion that created the children (kept for widening)
        self.handle = None                # engine state (KV span ...)
        self.hidden_sum = None            # sum of the hidden states that generated `tokens` (hidden pooling)
        self.vl = 0.0                     # pending virtual visits (value -1) of leaves being evaluated

    @property
    def is_leaf(self) -> bool:
        return not self.children

    def subtree(self):
        """This node and every descendant (iterative, depth first)."""
        stack = [self]
        while stack:
            node = stack.pop()
            yield node
            stack.extend(node.children)


class SearchTree:
    """The tree of one prompt's search, with the q range used to normalise values (kept across commits)."""

    def __init__(self, root: Node, config: RainConfig):
        self.root = root
        self.config = config
        self.q_min, self.q_max = config.initial_q_range

    # --- selection -----------------------------------------------------------------------------------
    def score(self, child: Node, parent_n: float) -> float:
        c = self.config
        n, q = child.n, child.q
        if child.vl:
            q = (q * n - child.vl) / (n + child.vl)
            n = n + child.vl
        q_norm = 0.0 if n == 0 else (q - self.q_min) / (self.q_max - self.q_min + c.q_norm_eps)
        return q_norm + c.exploration * child.p * math.sqrt(parent_n) / (1.0 + n)

    def select_child(self, node: Node) -> Node:
        """The child maximising q_norm + c * p * sqrt(n_parent) / (1 + n); the first one on ties (virtual
        visits included in n, q and n_parent)."""
        best, best_score = None, -math.inf
        parent_n = node.n + node.vl if node.vl else node.n
        for child in node.children:
            s = self.score(child, parent_n)
            if s > best_score:
                best, best_score = child, s
        return best

    # --- widening ------------------------------------------------------------------------------------
    def wants_widening(self, node: Node) -> bool:
        """A node widens when it has fewer than max_children children, all with embeddings, whose embedding
        variance (unbiased, per dimension) has norm below 0.03 * token-set length, and its best child has q < 0.
        The length is that of the sets the node expanded into: its depth's, or less where the length limit left
        less room (the reference reads its children's). A lone child widens only with widen_lone_child (its variance
        is then 0; the reference's is NaN)."""
        c = self.config
        children = node.children
        if len(children) < (1 if c.widen_lone_child else 2) or len(children) >= c.max_children:
            return False
        if any(ch.embedding is None for ch in children):
            return False
        variance = torch.stack([ch.embedding for ch in children]).var(dim=0, correction=min(1, len(children) - 1))
        length = c.token_set_length(node.depth) if node.expansion is None else node.expansion.length
        threshold = c.widen_variance_per_token * length
        return bool(variance.norm() < threshold) and max(ch.q for ch in children) < c.widen_max_q

    def add_virtual_loss(self, leaf: Node, visits: float):
        """Adds (or with a negative count removes) pending virtual visits on the path from the root to `leaf`."""
        node = leaf
        while node is not None:
            node.vl += visits
            if abs(node.vl) < 1e-9:
                node.vl = 0.0
            node = node.parent

    # --- back-up -------------------------------------------------------------------------------------
    def backup(self, leaf: Node, value: float, path_embeddings: Sequence[torch.Tensor]):
        """Backs `value` up from `leaf` to the root. `path_embeddings[i]` embeds the text below the i-th node
        on the way up (leaf first; the root needs none): the node's tokens, those of the path below it and
        the rollout. Similar siblings (cosine >= threshold) get a share 0.2 * sim of the visit."""
        path = []
        node = leaf
        while node is not self.root:
            path.append(node)
            node = node.parent
        if len(path_embeddings) != len(path):
            raise ValueError(f"backup: {len(path)} path embeddings needed, got {len(path_embeddings)}")
        for node, emb in zip(path, path_embeddings):
            node.n += 1
            node.fn += 1
            emb = emb.float()
            node.embedding = (emb.clone() if node.embedding is None
                              else node.embedding + (emb - node.embedding) / node.fn)
        self._share_with_siblings(path, value)
        root = self.root
        root.n += 1
        root.fn += 1
        for node in [root] + path[::-1]:
            node.q += (value - node.q) / node.n
        for node in path:
            self.q_min = min(self.q_min, node.q)
            self.q_max = max(self.q_max, node.q)

    def _share_with_siblings(self, path: Sequence[Node], value: float):
        """Shares each path node's visit with its similar siblings. A sibling of a path node is never on the path,
        so every similarity is read after all of the path's embeddings are updated: one cosine over all pairs and one
        host read per back-up, not one per node (per row, the same numbers as one cosine per node)."""
        c = self.config
        pairs = [(node, sibling) for node in path for sibling in node.parent.children
                 if sibling is not node and sibling.embedding is not None]
        if not pairs:
            return
        sims = torch.nn.functional.cosine_similarity(torch.stack([node.embedding for node, _ in pairs]),
                                                     torch.stack([sibling.embedding for _, sibling in pairs]), dim=1)
        for (_, sibling), sim in zip(pairs, sims.tolist()):
            if sim < c.similarity_threshold:
                continue
            share = c.similarity_weight * sim
            sibling.n += share
            sibling.q += share * (value - sibling.q) / sibling.n

    # --- commit --------------------------------------------------------------------------------------
    def best_child(self) -> Optional[Node]:
        """The most visited child of the root, ties broken by the higher q (then the first)."""
        best = None
        for child in self.root.children:
            if best is None or child.n > best.n or (child.n == best.n and child.q > best.q):
                best = child
        return best

    def commit(self, child: Node) -> Tuple[Node, List[Node]]:
        """Makes `child` the root and remixes its children's priors with uniform. Returns the old root and
        the discarded siblings, whose subtrees the caller releases: the rewind."""
        if child.parent is not self.root:
            raise ValueError("commit: the node is not a child of the root")
        old_root = self.root
        discarded = [s for s in old_root.children if s is not child]
        for sibling in discarded:      # unlinked, not cyclic: freed when the caller lets go, not by a full collection
            for node in sibling.subtree():
                node.parent = None
        old_root.children = []
        child.parent = None
        self.root = child
        if child.children:
            mix_priors(child.children, self.config.root_prior_mix)
        return old_root, discarded


def mix_priors(nodes: Sequence[Node], mix: float):
    """p <- normalise((1 - mix) * p + mix / len(nodes)), in place."""
    mixed = [(1.0 - mix) * n.p + mix / len(nodes) for n in nodes]
    total = sum(mixed)
    for node, p in zip(nodes, mixed):
        node.p = p / total
