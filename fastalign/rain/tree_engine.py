"""The fast engine: RAIN's model work on a TreeRunner, where a tree node is a handle on cached KV.

- Each node's KV is a span; children share their parent's blocks. A node's own last token is fed only when
  its logits are first needed (it is selected as a leaf), so unvisited candidates cost only their prefixes.
- An expansion decodes all its candidates in lockstep: at each step the distinct candidate prefixes are
  extended in one batched call (rows with equal prefixes share one span), the greedy row takes the arg-max
  and the sampled rows draw from the top-k; prefixes stay cached for later widening.
- The rollout rides along in the same calls; the self-evaluation extends the prompt's judge head (on top
  of the pinned few-shot prefix, computed once per engine) by the reply, then both option orders as one
  batch of two rows.
- Every job of every prompt in a `run` is a small program; each step of all programs together is ONE call
  of `runner.extend`, so concurrent prompts share model calls.
- Releasing a node releases its spans; the search releases discarded siblings at each commit and the
  whole tree at the end, and `close()` the shared prefixes, so a finished run holds no block.
"""
import math
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import torch

from .config import RainConfig
from .dialogue import judge_input, judge_path_ids, rollout_stops
from .jobs import Draft, Evaluation, EvaluateJob, ExpandJob, ExpandResult, PromptContext
from .judge import JudgeTokens
from .ledger import EMPTY_KEY, TokenLedger
from .sampling import ROLLOUT_STREAM, draw_key, extend_key, ranked_tokens, top_k_distribution


class Entry:
    """A cached prefix: its span, ledger key, top-k next-token distribution and last hidden state. Its
    span is released when its last user (the owning node, or a node waiting to be fed from it) lets go."""
    __slots__ = ("span", "key", "top_ids", "top_probs", "hidden", "users")

    def __init__(self, span, key, top_ids, top_probs, hidden):
        self.span, self.key, self.top_ids, self.top_probs, self.hidden = span, key, top_ids, top_probs, hidden
        self.users = 1


@dataclass
class NodeState:
    """Engine state of a node: its own entry once fed, and the prefixes its expansions computed."""
    own: Optional[Entry] = None
    judge: Optional[Entry] = None                # judge prefix + head + the path's tokens down to this node
    base: Optional[Entry] = None                 # a surviving root not fed yet: the entry it is fed from ...
    judge_base: Optional[Entry] = None           # ... and the judge entry its judge entry extends
    trie: Dict[tuple, Entry] = field(default_factory=dict)
    logits: Optional[torch.Tensor] = None        # full next-token logits, kept only during one run
    ranked: Optional[tuple] = None               # (ids, logits) of the top next tokens

    def prefix(self, tokens) -> Entry:
        """The entry of this node's state extended by `tokens` (its own entry for no tokens)."""
        return self.trie[tuple(tokens)] if len(tokens) else self.own

    def adopt(self, prefix: tuple, out: "Out") -> Entry:
        """The trie entry of `prefix`, made from `out` unless another program of the same call made it."""
        if prefix not in self.trie:
            self.trie[prefix] = TreeEngine._entry(out)
        return self.trie[prefix]


@dataclass
class Row:
    parent: Entry
    tokens: List[int]
    stats: object
    phase: str


@dataclass
class Out:
    span: object
    key: int
    logits: torch.Tensor
    hidden: Optional[torch.Tensor]
    top_ids: List[int]
    top_probs: torch.Tensor


class TreeEngine:
    def __init__(self, runner, tokenizer, judge: JudgeTokens, config: RainConfig, sampler, want_hidden: bool,
                 ledger: Optional[TokenLedger] = None, generation_prefix_ids: Sequence[int] = ()):
        self.runner = runner
        self.tokenizer = tokenizer
        self.judge = judge
        self.config = config
        self.sampler = sampler
        self.want_hidden = want_hidden
        self.ledger = ledger or TokenLedger()
        self.rank = config.max_children
        shared = [(self.judge.prefix_ids, "judge")]
        if generation_prefix_ids:
            shared.append((list(generation_prefix_ids), "generation"))
        outs = self._call([Row(None, ids, None, "host") for ids, _ in shared])
        self.shared = {}
        for (ids, name), out in zip(shared, outs):
            self.runner.pin(out.span)
            self.shared[name] = self._entry(out)
        self.generation_prefix_len = len(generation_prefix_ids)

    # --- the one way this engine touches the model ---------------------------------------------------
    def _call(self, rows: List[Row]) -> List[Out]:
        """ONE runner.extend over all rows; records tokens, calls and time (split by tokens over phases)."""
        start = time.perf_counter()
        result = self.runner.extend([None if r.parent is None else r.parent.span for r in rows],
                                    [r.tokens for r in rows], logits="last",
                                    hidden="last" if self.want_hidden else None)
        children, logits = result[0], result[1]
        hidden = result[2] if self.want_hidden else None
        top_ids, top_probs = top_k_distribution(logits, self.config.sample_top_k)
        top_ids, top_probs = top_ids.cpu().tolist(), top_probs.cpu()
        elapsed = time.perf_counter() - start
        self.ledger.call([r.stats for r in rows])
        total = sum(len(r.tokens) for r in rows)
        outs = []
        for i, (row, span) in enumerate(zip(rows, children)):
            key = self.ledger.feed(row.stats, EMPTY_KEY if row.parent is None else row.parent.key, row.tokens)
            share = elapsed * len(row.tokens) / total
            self.ledger.run.seconds[row.phase] += share
            if row.stats is not None:
                row.stats.seconds[row.phase] += share
            outs.append(Out(span, key, logits[i], None if hidden is None else hidden[i].float(), top_ids[i],
                            top_probs[i]))
        return outs

    def _call_unique(self, rows: List[Row]) -> List[Out]:
        """Like _call, but rows that append the same tokens to the same entry (e.g. a rollout and a candidate
        that drew the same token) run once and share the output."""
        unique, where = {}, []
        for row in rows:
            key = (id(row.parent), tuple(row.tokens))
            where.append(unique.setdefault(key, (len(unique), row))[0])
        outs = self._call([row for _, row in unique.values()])
        return [outs[i] for i in where]

    @staticmethod
    def _entry(out: Out) -> Entry:
        return Entry(out.span, out.key, out.top_ids, out.top_probs, out.hidden)

    def _let_go(self, entry: Optional[Entry]):
        if entry is None:
            return
        entry.users -= 1
        if entry.users == 0:
            self.runner.release(entry.span)

    def _execute(self, programs: List) -> List:
        """Runs generator programs that yield lists of rows and receive their outputs; each round of all
        programs' rows is one model call. Returns each program's return value."""
        results = [None] * len(programs)
        waiting = {}
        for i, program in enumerate(programs):
            self._advance(i, program, None, waiting, results)
        while waiting:
            order = list(waiting)
            rows = [row for i in order for row in waiting[i][1]]
            outs = self._call_unique(rows)
            pos = 0
            current = waiting
            waiting = {}
            for i in order:
                program, wanted = current[i]
                self._advance(i, program, outs[pos:pos + len(wanted)], waiting, results)
                pos += len(wanted)
        return results

    @staticmethod
    def _advance(i, program, sent, waiting, results):
        try:
            rows = program.send(sent)
            while not rows:                      # a program may yield nothing: resume it at once
                rows = program.send([])
            waiting[i] = (program, rows)
        except StopIteration as stop:
            results[i] = stop.value

    # --- prompts -------------------------------------------------------------------------------------
    def start(self, contexts: Sequence[PromptContext], roots: Sequence) -> None:
        """Feeds each prompt (on the generation prefix) and its judge head (on the few-shot prefix) in one call."""
        gen = self.shared.get("generation")
        rows = []
        for ctx in contexts:
            rows.append(Row(gen, list(ctx.root_ids[self.generation_prefix_len:]), ctx.stats, "expand"))
            if ctx.head_ids:
                rows.append(Row(self.shared["judge"], list(ctx.head_ids), ctx.stats, "evaluate"))
        outs = iter(self._call(rows))
        for ctx, root in zip(contexts, roots):
            out = next(outs)
            root.handle = self._node_state(out)
            ctx.handle = self._entry(next(outs)) if ctx.head_ids else self.shared["judge"]
            if not ctx.head_ids:
                ctx.handle.users += 1
            root.handle.judge = ctx.handle
            ctx.handle.users += 1

    def finish(self, ctx: PromptContext):
        self._let_go(ctx.handle)
        ctx.handle = None

    def _node_state(self, out: Out) -> NodeState:
        return NodeState(own=self._entry(out), logits=out.logits,
                         ranked=tuple(r[0] for r in ranked_tokens(out.logits.unsqueeze(0), self.rank)))

    def release(self, nodes):
        """Lets go of the nodes' spans. A child that survives its parent (the committed root) and was never
        fed keeps the prefix entry it will be fed from."""
        for node in nodes:
            state: NodeState = node.handle
            if state is None:
                continue
            for child in node.children:
                if child.parent is None:          # the committed root outlives its parent
                    self._keep_bases(child, state)
            for entry in [state.own, state.judge, state.base, state.judge_base] + list(state.trie.values()):
                self._let_go(entry)
            node.handle = None

    def _keep_bases(self, child, parent_state: NodeState):
        child.handle = child.handle or NodeState()
        if child.handle.own is None and child.handle.base is None:
            child.handle.base = parent_state.prefix(child.tokens[:-1])
            child.handle.base.users += 1
        if child.handle.judge is None and child.handle.judge_base is None:
            child.handle.judge_base = parent_state.judge
            child.handle.judge_base.users += 1

    def close(self):
        for entry in self.shared.values():
            self.runner.unpin(entry.span)
            self._let_go(entry)
        self.shared = {}

    # --- jobs ----------------------------------------------------------------------------------------
    def run(self, jobs: List[object]) -> List[object]:
        self._feed_leaves(jobs)
        programs = [self._expand(job) if isinstance(job, ExpandJob) else self._evaluate(job) for job in jobs]
        results = self._execute(programs)
        for job in jobs:
            if job.node.handle is not None:
                job.node.handle.logits = None
        return results

    def _feed_leaves(self, jobs):
        """One call that feeds, for the jobs' nodes, the last token of each node whose logits are needed
        and not computed yet, and the judge entry of each evaluated node that has none."""
        rows, targets = [], []
        for job in jobs:
            node = job.node
            state = node.handle = node.handle or NodeState()
            parent_state = node.parent.handle if node.parent is not None else None
            needs_logits = isinstance(job, ExpandJob) or not job.terminal
            if needs_logits and state.own is None and not any(t[0] is node and t[1] == "own" for t in targets):
                base = state.base or parent_state.prefix(node.tokens[:-1])
                rows.append(Row(base, [node.tokens[-1]], job.ctx.stats, "expand"))
                targets.append((node, "own"))
            if isinstance(job, EvaluateJob) and state.judge is None:
                base = state.judge_base or parent_state.judge
                tokens = judge_path_ids(self.tokenizer, node.tokens)
                if tokens:
                    rows.append(Row(base, tokens, job.ctx.stats, "evaluate"))
                    targets.append((node, "judge"))
                else:
                    state.judge = base
                    base.users += 1
        if not rows:
            return
        for (node, what), out in zip(targets, self._call(rows)):
            state = node.handle
            if what == "own":
                fed = self._node_state(out)
                state.own, state.logits, state.ranked = fed.own, fed.logits, fed.ranked
                self._let_go(state.base)
                state.base = None
            else:
                state.judge = self._entry(out)
                self._let_go(state.judge_base)
                state.judge_base = None

    def _expand(self, job: ExpandJob):
        state: NodeState = job.node.handle
        if job.length == 1:
            ids, logits = state.ranked
            return ExpandResult(ranked_ids=list(ids), ranked_logits=list(logits), hidden=state.own.hidden)
        rows = []
        if job.greedy is None:
            rows.append(_Draw(None))
        rows += [_Draw(s) for s in range(job.first_stream, job.first_stream + job.attempts)]
        eos, node_key = self.tokenizer.eos_token_id, job.node.key
        while True:
            needed: Dict[tuple, Entry] = {}
            for d in rows:
                if d.done:
                    continue
                entry = state.prefix(d.tokens)
                if d.stream is None:
                    col = int(entry.top_probs.argmax())
                else:
                    col = self.sampler.draw(entry.top_probs.unsqueeze(0),
                                            [draw_key(extend_key(node_key, d.tokens), d.stream)])[0]
                token = entry.top_ids[col]
                d.logp += math.log(float(entry.top_probs[col]))
                if entry.hidden is not None:
                    d.hidden = entry.hidden.clone() if d.hidden is None else d.hidden + entry.hidden
                d.tokens.append(token)
                if token == eos or len(d.tokens) == job.length:
                    d.done = True
                elif tuple(d.tokens) not in state.trie:
                    needed.setdefault(tuple(d.tokens), state.prefix(d.tokens[:-1]))
            if not needed:
                break
            prefixes = list(needed)
            outs = yield [Row(needed[p], [p[-1]], job.ctx.stats, "expand") for p in prefixes]
            for prefix, out in zip(prefixes, outs):
                state.adopt(prefix, out)
        drafts = [Draft(tuple(d.tokens), d.logp, d.hidden) for d in rows]
        if job.greedy is None:
            return ExpandResult(greedy=drafts[0], samples=drafts[1:])
        return ExpandResult(greedy=job.greedy, samples=drafts)

    def _evaluate(self, job: EvaluateJob):
        ctx, c = job.ctx, self.config
        state = list(job.state)
        node_state: NodeState = job.node.handle
        rollout, hidden_sum = [], None
        if not job.terminal:
            entry, logits, prefix_key = node_state.own, node_state.logits, job.node.key
            temporary = None                                  # a rollout entry past the candidate prefixes
            while not rollout_stops(self.tokenizer, c, ctx, state):
                if logits is None:
                    (out,) = yield [Row(entry, [state[-1]], ctx.stats, "simulate")]
                    self._let_go(temporary)
                    temporary = None
                    if len(rollout) < job.share_depth:
                        entry = node_state.adopt(tuple(rollout), out)
                    else:
                        entry = temporary = self._entry(out)
                    logits = out.logits
                token = self.sampler.draw(torch.softmax(logits.float(), dim=-1).unsqueeze(0),
                                          [draw_key(prefix_key, ROLLOUT_STREAM)])[0]
                prefix_key = extend_key(prefix_key, [token])
                if entry.hidden is not None:
                    hidden_sum = entry.hidden.clone() if hidden_sum is None else hidden_sum + entry.hidden
                state.append(token)
                rollout.append(token)
                logits = None
                if token == self.tokenizer.eos_token_id:
                    break
            self._let_go(temporary)
        reply, base_kind, ids = judge_input(self.judge, self.tokenizer, c, ctx, state, len(job.state))
        if reply in ctx.judge_cache:
            return Evaluation(ctx.judge_cache[reply], rollout, hidden_sum, 0)
        base = {"leaf": node_state.judge, "head": ctx.handle, "prefix": self.shared["judge"]}[base_kind]
        conversation = None
        if ids:
            (out,) = yield [Row(base, list(ids), ctx.stats, "evaluate")]
            base = conversation = self._entry(out)
        outs = yield [Row(base, list(self.judge.suffix_ids[o]), ctx.stats, "evaluate") for o in (0, 1)]
        self.runner.release([o.span for o in outs])
        self._let_go(conversation)
        value = self.judge.score(torch.stack([o.logits for o in outs]))
        ctx.judge_cache[reply] = value
        return Evaluation(value, rollout, hidden_sum,
                          len(ids) + len(self.judge.suffix_ids[0]) + len(self.judge.suffix_ids[1]))


class _Draw:
    """One candidate row of a lockstep expansion (stream None = the greedy row)."""
    __slots__ = ("stream", "tokens", "logp", "hidden", "done")

    def __init__(self, stream):
        self.stream, self.tokens, self.logp, self.hidden, self.done = stream, [], 0.0, None, False
