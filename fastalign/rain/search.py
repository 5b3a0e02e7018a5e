"""One prompt's RAIN search (../shared/SPEC.md §2) as a generator of engine jobs.

Inner iteration: select from the root (widening nodes on the way), evaluate the leaf (rollout + self-
evaluation) and expand it, embed the path texts, back up. Outer loop: iterate until the root has 50
visits (inherited ones included) and at least 15 new ones, or until the most visited child has fn > 6 and
q > 0.8; commit that child (ties by q), let the engine drop the discarded siblings, and go on until the
answer ends. Optionally several inner iterations run at once under virtual loss (`parallel_leaves`).

Where the reference implementation and this one differ (on purpose):
- token-set length depends on the depth from the prompt (1, 2, 4, then 10), as the reference's node
  `step` does; a set stops early at an end token or at the maximum length;
- the end tokens are the tokenizer's end of sequence and every one the model's generation config lists
  (e.g. Llama-3-Instruct's end of turn), where `model.generate` stops too;
- one q range per prompt, kept across commits (the reference's nodes could keep pointing at an old root);
- a sequence that ended (end token, max length, new turn) is terminal: never expanded or rolled out.
"""
import functools
import math
from dataclasses import dataclass, field
from typing import AbstractSet, Callable, List, Optional, Sequence

import torch

from fastalign.token_text import ending_text

from .config import RainConfig
from .dialogue import answer_text, has_new_turn, judge_path_ids
from .embeddings import PathInfo
from .jobs import Draft, EmbedJob, Evaluation, EvaluateJob, ExpandJob, ExpandResult, PromptContext
from .judge import JudgeTokens
from .minimum import RequiredPrefixes, chain_key
from .sampling import extend_key
from .tree import Node, SearchTree, mix_priors


@dataclass
class Expansion:
    """What a node's expansion drew, kept for widening: the candidate list (length > 1; widening
    prepends new groups, as the reference does, so a later widening can add a candidate an earlier one
    drew), the ranked next tokens (length 1) and the next sampler stream."""
    length: int
    entries: List[tuple] = field(default_factory=list)      # (tokens, raw prior, hidden sum)
    greedy: Optional[Draft] = None
    ranked_ids: List[int] = field(default_factory=list)
    ranked_logits: List[float] = field(default_factory=list)
    hidden: Optional[torch.Tensor] = None
    next_stream: int = 1


@dataclass
class SearchOutput:
    answer_ids: List[int]
    commits: List[dict]              # per committed step: tokens, root visits, children (tokens, n, q, fn)


def token_set_priors(greedy: Draft, samples: Sequence[Draft]):
    """(tokens, raw prior, draft) for the greedy set and each distinct sample. The greedy prior is clipped
    into [max + min, sum] of the sample priors (first capped by the sum, then raised to max + min)."""
    seen = {greedy.tokens}
    unique = []
    for draft in samples:
        if draft.tokens not in seen:
            seen.add(draft.tokens)
            unique.append(draft)
    priors = [math.exp(d.logp) for d in unique]
    g = math.exp(greedy.logp)
    if priors:
        g = max(min(g, sum(priors)), max(priors) + min(priors))
    return [(greedy.tokens, g, greedy)] + [(d.tokens, p, d) for d, p in zip(unique, priors)]


def ranked_top(ids: Sequence[int], logits: Sequence[float], m: int):
    """The m most likely of the ranked tokens (ascending id) with probabilities renormalised over them."""
    values = torch.tensor(list(logits), dtype=torch.float32)
    top = values.topk(min(m, len(ids))).indices.sort().values
    probs = torch.softmax(values[top], dim=0).tolist()
    return [ids[i] for i in top.tolist()], probs


class PromptSearch:
    """Searches one prompt. `run()` is a generator: it yields lists of jobs (ExpandJob, EvaluateJob,
    EmbedJob), expects the list of their results back, and returns a SearchOutput. `on_commit(ctx,
    old_root, new_root)` is called at each commit (the engine drops what only the discarded branches used).
    A token set that contains one of `end_ids` (the model's end tokens) ends the answer. Every sequence
    whose model outputs the search reads is registered in `required` (the tree's minimum)."""

    def __init__(self, ctx: PromptContext, config: RainConfig, tokenizer, end_ids: AbstractSet[int], embedder,
                 judge: JudgeTokens, required: RequiredPrefixes,
                 on_commit: Callable[[PromptContext, Node, Node], None]):
        self.ctx = ctx
        self.config = config
        self.tokenizer = tokenizer
        self.embedder = embedder
        self.judge = judge
        self.required = required
        self.on_commit = on_commit
        self.end_ids = end_ids
        root = Node((), None, 0.0, ctx.root_key, terminal=self._ended(ctx.root_ids, ()), seq_key=ctx.gen_key)
        self.tree = SearchTree(root, config)
        self.root_state = list(ctx.root_ids)
        # the judge's view of the committed answer: its key, and the tokens committed since the last
        # registration (registered only when a judge input needs them)
        self.root_judge_key = ctx.head_key
        self.judge_registered_key = ctx.head_key
        self.judge_pending: List[int] = []

    # --- helpers -------------------------------------------------------------------------------------
    def _ended(self, state: Sequence[int], tokens: Sequence[int]) -> bool:
        """Whether `state`, whose last `tokens` a step added to a state that had not ended (none: the root), ended.
        A new turn then ends in the text of those tokens: only the answer's end is decoded (the whole answer, at
        every node, cost O(answer) per node)."""
        if any(t in self.end_ids for t in tokens):
            return True
        if len(state) >= self.ctx.max_length:
            return True
        marker, answer = self.config.turn_marker, state[self.ctx.answer_start:]
        if not tokens:
            return has_new_turn(answer_text(self.tokenizer, state, self.ctx.answer_start), marker)
        return has_new_turn(ending_text(self.tokenizer, [], answer, len(marker), len(tokens)), marker)

    def _set_length(self, node: Node, state: Sequence[int]) -> int:
        room = self.ctx.max_length - len(state)
        return max(1, min(self.config.token_set_length(node.depth), room))

    def _add_child(self, node: Node, state: Sequence[int], tokens, prior: float, hidden_sum=None) -> Node:
        tokens = tuple(int(t) for t in tokens)
        if not math.isfinite(prior):   # (all priors NaN: select_child would find no child to walk to)
            raise FloatingPointError(f"the prior of the token set {list(tokens)} after {len(state)} tokens is {prior}: "
                                     "the model's next-token logits are not finite (NaN or inf: an overflow in "
                                     "float16, corrupted weights?)")
        child = Node(tokens, node, prior, extend_key(node.key, tokens),
                     terminal=self._ended(list(state) + list(tokens), tokens), seq_key=chain_key(node.seq_key, tokens))
        child.hidden_sum = hidden_sum
        node.children.append(child)
        return child

    # --- the tree's minimum --------------------------------------------------------------------------
    def _new_steps(self, node: Node, drafts: Sequence[Draft]) -> int:
        """Lockstep steps of an expansion that reach a candidate prefix not computed before."""
        steps = set()
        for draft in drafts:
            new = self.required.new_positions(node.seq_key, draft.tokens[:-1])
            steps.update(i for i, fresh in enumerate(new) if fresh)
        return len(steps)

    def _required_chain(self, leaf: Node, evaluation: Evaluation, expansion: Optional[ExpandResult]) -> int:
        """Calls this leaf's evaluation and expansion need one after another (see RainStats.required_calls);
        computed before this run's sequences are registered."""
        own = 0 if leaf.terminal else int(leaf.seq_key not in self.required.keys)
        rollout = sum(self.required.new_positions(leaf.seq_key, evaluation.rollout[:-1]))
        expand = own
        if expansion is not None and expansion.greedy is not None:
            expand += self._new_steps(leaf, [expansion.greedy] + expansion.samples)
        return max(own + rollout + (evaluation.judged is not None), expand)

    def _require_drafts(self, node: Node, drafts: Sequence[Draft]):
        """Each draw of a token set reads the distribution after each of its prefixes."""
        for draft in drafts:
            self.required.add(self.ctx.stats, "tree", node.seq_key, draft.tokens[:-1])

    def _require_evaluation(self, leaf: Node, evaluation: Evaluation):
        stats, required = self.ctx.stats, self.required
        if not leaf.terminal:
            required.add_key(stats, "tree", leaf.seq_key)                         # its distribution is read
            required.add(stats, "rollout", leaf.seq_key, evaluation.rollout[:-1])
        if evaluation.judged is None:
            return
        base, ids = evaluation.judged
        if base == "leaf":
            if self.judge_pending:
                required.add(stats, "judge", self.judge_registered_key, self.judge_pending)
                self.judge_registered_key, self.judge_pending = self.root_judge_key, []
            key = self.root_judge_key
            for node in reversed(list(_path_to_root(leaf, self.tree.root))):
                key = required.add(stats, "judge", key, judge_path_ids(node.tokens, self.end_ids))
        else:
            key = self.ctx.head_key
        key = required.add(stats, "judge", key, ids)
        for suffix in self.judge.suffix_ids:
            required.add(stats, "judge", key, suffix)

    # --- expansion and widening ----------------------------------------------------------------------
    def _expand(self, node: Node, state: List[int], result: ExpandResult, length: int):
        c = self.config
        exp = Expansion(length=length, hidden=result.hidden)
        node.expansion = exp
        if length == 1:
            exp.ranked_ids, exp.ranked_logits = result.ranked_ids, result.ranked_logits
            ids, probs = ranked_top(exp.ranked_ids, exp.ranked_logits, c.candidates)
            entries = [((t,), p, result.hidden) for t, p in zip(ids, probs)]
        else:
            exp.greedy = result.greedy
            exp.next_stream = 1 + len(result.samples)
            self._require_drafts(node, [result.greedy] + result.samples)
            entries = exp.entries = [(tokens, p, d.hidden_sum)
                                     for tokens, p, d in token_set_priors(result.greedy, result.samples)]
        total = sum(p for _, p, _ in entries)
        for tokens, p, hidden in entries:
            self._add_child(node, state, tokens, p / total, hidden)
        if node is self.tree.root:
            mix_priors(node.children, c.root_prior_mix)

    def _widen(self, node: Node, state: List[int]):
        """Adds candidates to `node` (a generator: multi-token sets need the engine)."""
        c = self.config
        exp: Expansion = node.expansion
        count = len(node.children) + 1
        if exp.length == 1:
            ids, probs = ranked_top(exp.ranked_ids, exp.ranked_logits, count)
            group = [((t,), p, exp.hidden) for t, p in zip(ids, probs)]
        else:
            job = ExpandJob(self.ctx, node, state, exp.length, attempts=c.widen_group - 1,
                            first_stream=exp.next_stream, greedy=exp.greedy)
            (result,) = yield [job]
            exp.next_stream += c.widen_group - 1
            self.ctx.stats.required_calls += self._new_steps(node, result.samples)
            self._require_drafts(node, result.samples)
            fresh = [(tokens, p, d.hidden_sum) for tokens, p, d in token_set_priors(exp.greedy, result.samples)]
            exp.entries = fresh + exp.entries
            group = exp.entries[:count]
        total = sum(p for _, p, _ in group)
        priors = [p / total for _, p, _ in group]
        if node is self.tree.root:
            mix = c.root_prior_mix
            priors = [(1 - mix) * p + mix / len(priors) for p in priors]
            s = sum(priors)
            priors = [p / s for p in priors]
        existing = {ch.tokens for ch in node.children}
        for (tokens, _, hidden), prior in zip(group, priors):    # a group may hold a set twice (see Expansion)
            if tuple(tokens) not in existing and len(node.children) < c.max_children:
                existing.add(self._add_child(node, state, tokens, prior, hidden).tokens)

    # --- inner iterations ----------------------------------------------------------------------------
    def _select(self):
        """Walks from the root to a leaf, widening nodes on the way. Returns (leaf, its token state)."""
        tree = self.tree
        node = tree.root
        state = list(self.root_state)
        while not node.is_leaf:
            if tree.wants_widening(node):
                yield from self._widen(node, state)
            node = tree.select_child(node)
            state.extend(node.tokens)
        return node, state

    def _iterate(self, limit: int):
        """One inner iteration, or with parallel_leaves > 1 up to that many (and at most `limit`) at once:
        leaves are picked one after another under virtual loss (a leaf picked twice ends the batch), evaluated
        and expanded in one engine run, then backed up in the order they were picked. Returns the number of
        iterations."""
        tree, ctx, c = self.tree, self.ctx, self.config
        picked = []
        for _ in range(min(c.parallel_leaves, limit)):
            leaf, state = yield from self._select()
            if any(leaf is other for other, _ in picked):
                break
            picked.append((leaf, state))
            if c.parallel_leaves > 1:
                tree.add_virtual_loss(leaf, c.virtual_loss)
        jobs, lengths = [], []
        for leaf, state in picked:
            length = 0 if leaf.terminal else self._set_length(leaf, state)
            lengths.append(length)
            jobs.append(EvaluateJob(ctx, leaf, state, leaf.terminal))
            if not leaf.terminal:
                jobs.append(ExpandJob(ctx, leaf, state, length, attempts=c.candidates - 1))
        results = iter((yield jobs))
        outcomes = [(next(results), None if leaf.terminal else next(results)) for leaf, _ in picked]
        ctx.stats.required_calls += max(self._required_chain(leaf, evaluation, expansion)
                                        for (leaf, _), (evaluation, expansion) in zip(picked, outcomes))
        evaluations, paths = [], []
        for (leaf, state), length, (evaluation, expansion) in zip(picked, lengths, outcomes):
            if c.parallel_leaves > 1:
                tree.add_virtual_loss(leaf, -c.virtual_loss)
            if expansion is not None:
                self._expand(leaf, state, expansion, length)
            self._require_evaluation(leaf, evaluation)
            evaluations.append(evaluation)
            paths.append(self._path_infos(leaf, evaluation))
        flat = [p for group in paths for p in group]
        embeddings = (yield [EmbedJob(flat)])[0] if flat else []
        pos = 0
        for (leaf, _), evaluation, group in zip(picked, evaluations, paths):
            tree.backup(leaf, evaluation.value, embeddings[pos:pos + len(group)])
            pos += len(group)
        ctx.stats.iterations += len(picked)
        return len(picked)

    def _path_infos(self, leaf: Node, evaluation) -> List[PathInfo]:
        """For each node from the leaf up to (excluding) the root: the text of its tokens, the tokens below
        it on the path and the rollout; and the hidden states that generated them."""
        tokens = list(evaluation.rollout)
        hidden = evaluation.rollout_hidden_sum
        count = len(evaluation.rollout)
        paths = []
        for node in _path_to_root(leaf, self.tree.root):
            tokens = list(node.tokens) + tokens
            if self.embedder.needs_hidden:
                hidden = node.hidden_sum if hidden is None else hidden + node.hidden_sum
                count += len(node.tokens)
            paths.append(PathInfo(hidden_sum=None if hidden is None else hidden.clone(), hidden_count=count,
                                  decode=functools.partial(self.tokenizer.decode, tokens, skip_special_tokens=True)))
        return paths

    # --- outer loop ----------------------------------------------------------------------------------
    def run(self):
        tree, c = self.tree, self.config
        answer: List[int] = []
        commits = []
        while not tree.root.terminal:
            new = 0
            while True:
                # a batch of leaves never runs past the visits the stopping rule asks for
                new += yield from self._iterate(max(c.root_visits - tree.root.fn, c.min_new_visits - new))
                best = tree.best_child()
                if best is not None and best.fn > c.early_stop_fresh_visits and best.q > c.early_stop_q:
                    break
                if tree.root.fn >= c.root_visits and new >= c.min_new_visits:
                    break
            best = tree.best_child()
            commits.append({"tokens": list(best.tokens), "root_visits": tree.root.fn, "new_visits": new,
                            "children": [(list(ch.tokens), ch.n, ch.q, ch.fn) for ch in tree.root.children]})
            old_root, _ = tree.commit(best)
            self.on_commit(self.ctx, old_root, best)
            judge_ids = judge_path_ids(best.tokens, self.end_ids)
            self.root_judge_key = chain_key(self.root_judge_key, judge_ids)
            self.judge_pending.extend(judge_ids)
            self.root_state.extend(best.tokens)
            answer.extend(best.tokens)
            self.ctx.stats.committed_tokens += len(best.tokens)
        return SearchOutput(answer, commits)


def _path_to_root(node: Node, root: Node):
    """The nodes from `node` up to (excluding) `root`."""
    while node is not root:
        yield node
        node = node.parent
