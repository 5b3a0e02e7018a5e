"""The fast engine: RAIN's model work on a TreeRunner, where every computed prefix is a span of cached KV.

- Each prompt keeps two tries of computed prefixes (prefix_trie.py): the generation side (the search
  tree's token states, candidate prefixes, rollouts) and the judge side (the few-shot prefix and the
  conversation as the judge reads it). Whatever a job needs is fed from its deepest computed ancestor, so
  a prefix still held is never computed again; every position where a later sequence may branch gets
  an entry of its own (every generated token; on the judge side each rollout token and each position
  of a node's tokens where a sibling parts from them), either as the end of a row or as a cut inside one
  (`runner.extend(..., cuts=...)`: a span at a chosen position, made by the row's own forward), which is
  what keeps the count of recomputed tokens at zero without costing calls.
- An expansion decodes all its candidates in lockstep: each step extends the distinct candidate prefixes
  in one batched call and draws every sampled row in one sampler call.
- The rollout feeds one token per call; the judge's copy of the rollout rides along in the same calls.
  Once the reply is complete, ONE row feeds whatever the judge input still lacks (the rollout's last
  token, cut there) and the text both option blocks share, and the same call runs both option blocks
  as two rows on top of that row (a row may extend a row of the same call).
- Draws: every generation row's outputs are reduced right after its call, for all rows at once: top-k
  distribution (expansion), ranked tokens (1-token sets), last hidden state, and a pool of rollout
  tokens pre-drawn from the full softmax (one batched call per model call of each prompt's own sampler), so no
  full logits are kept and a rollout passing a computed position needs no model work. A prompt's root, which
  prompts that start alike share, keeps its full next-token probabilities instead, and each prompt's rollout
  draws from them with its own sampler.
- The LM head runs where logits are read alone: at the generation rows' outputs. A judge's label rows get the label
  columns' logits from their last hidden states (TreeRunner.head_at_columns; their whole logits on a runner that
  cannot), the judge's KV-only rows none, and a call without a generation row runs no [rows, vocab] product.
- Every job of every prompt in a `run` is a small program; each round of all programs' rows is ONE call
  of `runner.extend`, so concurrent prompts (and leaves picked together) share model calls; a round whose rows the
  KV pool cannot hold at once runs in parts, as small as one row with the rows built on it. Rows that
  would compute the same position run once (the position is marked pending; others wait a round).
- Prompt starts (roots.py) cut the run's starting sequences where they part, so prompts share the rows
  of their common beginning and the judge's few-shot prefix (pinned) is computed once.
- A judge prompt that begins with the conversation itself (no few-shot text before it) reads the very
  sequences the search generates: then one trie serves both sides, its judge-side rows reduce their
  outputs like generation rows ("gen"), and the judge's copy of a path or rollout costs nothing.
- A commit keeps only the new root's subtries (the rewind); `finish` drops a prompt's tries and `close`
  the shared prefixes and the tries of prompts never finished (a run an exception stopped), so a run that
  is over holds no span.
"""
import math
import time
from dataclasses import dataclass, field
from typing import AbstractSet, Dict, List, Optional, Sequence, Tuple

import torch

from fastalign._C import PoolExhaustedError
from fastalign.transfers import index_on, to_host

from .config import RainConfig
from .dialogue import judge_input, judge_path_ids, rollout_stops
from .jobs import Draft, Evaluation, EvaluateJob, ExpandJob, ExpandResult, PromptContext
from .judge import JudgeTokens
from .ledger import EMPTY_KEY, TokenLedger
from .minimum import chain_key
from .prefix_trie import PrefixNode, drop_all, keep_only_below
from .roots import RootPlan
from .sampling import ROLLOUT_STREAM, draw_key, extend_key, on_device_draws, seed_key, top_k_and_ranked

ROLLOUT_POOL = 16      # rollout tokens pre-drawn per computed position (a position is rarely rolled past more)


class Entry:
    """A computed prefix: its span and ledger key; on the generation side also what draws read from its
    last position (top-k ids and probabilities: a tensor for the sampler, floats for each drawn token's logp;
    greedy column, ranked ids/logits, last hidden state, pre-drawn rollout tokens; a prompt's root, which no row
    can compute again and prompts that start alike share, keeps its full next-token probabilities instead, drawn
    from by each prompt's own sampler). `users` counts the tries (and shared tables) holding it."""
    __slots__ = ("span", "key", "top_ids", "top_probs", "top_prob_list", "greedy_col", "ranked", "hidden", "draws",
                 "probs", "users")

    def __init__(self, span, key):
        self.span, self.key = span, key
        self.top_ids = self.top_probs = self.top_prob_list = self.greedy_col = self.ranked = self.hidden = None
        self.draws = self.probs = None
        self.users = 1


@dataclass
class Row:
    parent: Optional[Entry]
    tokens: List[int]
    stats: object
    phase: str
    kind: str                                   # "gen": reduce its outputs; "plain": KV only; "label": logits
    target: Optional[PrefixNode] = None         # the trie position this row computes (None: transient)
    skey: int = 0                               # sampling key of a "gen" row's sequence
    sampler: object = None                      # the sampler of a "gen" row's prompt (its rollout pools)
    cuts: List[Tuple[int, PrefixNode]] = field(default_factory=list)  # (offset, position) inside the row
                                                                      # that gets an entry too
    after: Optional["Row"] = None               # a row of the same call that this row extends (parent None)


@dataclass
class NodeState:
    """Engine state of a search node: its positions in the prompt's generation and judge tries."""
    gen: PrefixNode
    judge: Optional[PrefixNode] = None


@dataclass
class _Rollout:
    tokens: List[int] = field(default_factory=list)
    hidden_sum: Optional[torch.Tensor] = None
    done: bool = False


class _Draw:
    """One candidate row of a lockstep expansion (stream None = the greedy row)."""
    __slots__ = ("stream", "node", "tokens", "logp", "hidden", "done")

    def __init__(self, stream, node):
        self.stream, self.node, self.tokens, self.logp, self.hidden, self.done = stream, node, [], 0.0, None, False


class TreeEngine:
    def __init__(self, runner, tokenizer, end_ids: AbstractSet[int], judge: JudgeTokens, config: RainConfig,
                 want_hidden: bool, ledger: Optional[TokenLedger] = None,
                 generation_prefix_ids: Sequence[int] = ()):
        self.runner = runner
        self.tokenizer = tokenizer
        self.end_ids = end_ids
        self.judge = judge
        self.config = config
        self.want_hidden = want_hidden
        self.ledger = ledger or TokenLedger()
        self.generation_prefix = list(generation_prefix_ids)
        self.plan: Optional[RootPlan] = None
        self.cut_entries: Dict[int, Entry] = {}      # entries where starting sequences part
        self.judge_prefix: Optional[Entry] = None
        self.started: Dict[int, PromptContext] = {}  # prompts started and not finished yet, by index
        self._label_columns: Optional[torch.Tensor] = None   # judge.label_columns on the model's device

    # --- the one way this engine touches the model ---------------------------------------------------
    def _call(self, rows: List[Row]) -> List[object]:
        """`_call_once`, or where the KV pool cannot hold all the rows at once (PoolExhaustedError), `_call` on each
        half of them in turn (`_halves`: a row stays with the rows of the call built on it): a step that needs more
        blocks than the pool has (one prompt's leaves, or prompts searched together) goes on in smaller calls, with
        the results of one call. It fails only where one row and those on it cannot fit."""
        try:
            return self._call_once(rows)
        except PoolExhaustedError:
            halves = _halves(rows)
            if halves is None:
                raise
        first, second = halves
        outs = self._call(first)
        try:
            return outs + self._call(second)
        except BaseException:   # the first half's spans that no trie holds are nobody's
            self.runner.release([out.span for r, out in zip(first, outs) if r.kind != "label" and r.target is None])
            raise

    def _call_once(self, rows: List[Row]) -> List[object]:
        """ONE runner.extend over all rows. Returns per row its Entry (set on its target position too) or,
        for "label" rows, its next-token logits; positions at a row's cuts get entries of their own from
        the same row (runner cuts). Records tokens (those the runner recomputes for evicted parents too),
        calls and time (split by tokens over phases)."""
        start = time.perf_counter()
        offsets = [[end for end, _ in r.cuts] for r in rows]
        index = {id(r): i for i, r in enumerate(rows)}
        full, labels, outputs = _outputs_read(rows)
        label_head = self.runner.head_at_columns(self.judge.label_columns) if labels else None
        if labels and label_head is None:   # the runner cannot compute a few columns alone: the label rows' logits
            full = sorted(full + labels)
        hidden_wanted = self.want_hidden or label_head is not None
        try:
            result = self.runner.extend([index[id(r.after)] if r.after is not None else
                                         None if r.parent is None else r.parent.span for r in rows],
                                        [r.tokens for r in rows], cuts=offsets if any(offsets) else None,
                                        logits="last" if full else None,
                                        logits_of=full if full and len(full) < outputs else None,
                                        hidden="last" if hidden_wanted else None)
        except BaseException:
            self._record_recomputed(rows)
            _abandon(rows)
            raise
        self._record_recomputed(rows)
        chains = result[0] if any(offsets) else [[span] for span in result[0]]
        logits = _LogitRows(result[1], full)
        hidden = result[2] if hidden_wanted else None
        try:    # the positions get their entries only once every read succeeded (a sampler, the device may fail)
            outs, cut_entries, label_logits = self._entries(rows, chains, index, logits, hidden, labels, label_head)
        except BaseException:               # the call's spans are nobody's: give them back, and the positions
            self.runner.release([span for chain in chains for span in chain])
            _abandon(rows)
            raise
        for node, entry in cut_entries:
            node.entry, node.pending = entry, False
        label_logits = iter(label_logits)
        for i, row in enumerate(rows):
            if row.kind == "label":
                self.runner.release(outs[i].span)
                outs[i] = next(label_logits)
            elif row.target is not None:
                row.target.entry, row.target.pending = outs[i], False
        elapsed = time.perf_counter() - start
        self.ledger.call([r.stats for r in rows])
        total = sum(len(r.tokens) for r in rows)
        for row in rows:
            share = elapsed * len(row.tokens) / total
            self.ledger.run.seconds[row.phase] += share
            if row.stats is not None:
                row.stats.seconds[row.phase] += share
        return outs

    def _entries(self, rows: List[Row], chains, index, logits: "_LogitRows", hidden, labels: List[int], label_head):
        """Entries of a call's spans, what the search reads from its generation rows read into them: (one entry
        per row, [(cut position, its entry)], the logits of the label rows (at output indices `labels`) on the
        host)."""
        # gen: (entry, output index, skey, is a root, sampler) to read
        outs, cut_entries, gen, at = [], [], [], 0
        for r, chain in zip(rows, chains):
            parent = outs[index[id(r.after)]] if r.after is not None else r.parent
            parent_key = EMPTY_KEY if parent is None else parent.key
            for (end, node), span in zip(r.cuts, chain):
                cut_entries.append((node, Entry(span, chain_key(parent_key, r.tokens[:end]))))
                if r.kind == "gen":
                    gen.append((cut_entries[-1][1], at, node.skey, False, r.sampler))
                at += 1
            outs.append(Entry(chain[-1], self.ledger.feed(r.stats, parent_key, r.tokens)))
            if r.kind == "gen":
                gen.append((outs[-1], at, r.skey, r.target is None, r.sampler))
            at += 1
        return outs, cut_entries, self._read_outputs(gen, logits, hidden, labels, label_head)

    def _record_recomputed(self, rows: List[Row]):
        """Charges the tokens that the runner ran again in the last call to bring back evicted spans (also
        when the call then failed) to the first row whose parent needed each span. Free without evictions. On a
        runner that computes each row's whole sequence (HFRecomputeModel), each row's context too; on one that keeps
        recurrent states (HFStateCacheModel), the tokens a row ran after the nearest state kept."""
        for row, context in zip(rows, self.runner.last_context_rerun.tolist()):
            if context:
                self.ledger.recompute(row.stats, context)
        restored = dict(self.runner.last_restored)
        for row in rows:
            span, n = None if row.parent is None else row.parent.span, 0
            while span is not None and restored:
                n += restored.pop(span.id, 0)
                span = span.parent
            if n:
                self.ledger.recompute(row.stats, n)

    def _read_outputs(self, gen, logits: "_LogitRows", hidden, labels: List[int], label_head) -> List[torch.Tensor]:
        """Reads what the search needs of a call's outputs: for each generation row (gen: (entry, output index,
        skey, is a root, sampler)) its draws (_read_distributions), and the logits of the label rows at `labels`,
        returned on the host. The host reads all of them in ONE copy from the device: a copy waits for the
        device's queued work, and the search needs them (token ids, probabilities, judge scores) to go on. Of a label
        row only the judge's label columns are read (JudgeTokens.label_columns), not its whole vocabulary: computed
        from its last hidden state by `label_head` (TreeRunner.head_at_columns), or where that is None gathered from
        its logits."""
        to_read = []
        if labels and label_head is not None:
            to_read.append(label_head(hidden[index_on(labels, hidden.device)]))
        elif labels:
            if self._label_columns is None or self._label_columns.device != logits.device:
                self._label_columns = index_on(self.judge.label_columns, logits.device)
            to_read.append(logits.at(labels)[:, self._label_columns])
        give = None
        if gen:
            outputs = [g[1] for g in gen]
            give = self._read_distributions([g[0] for g in gen], logits.at(outputs),
                                            None if not self.want_hidden else hidden[index_on(outputs, hidden.device)],
                                            [g[2] for g in gen], [g[3] for g in gen], [g[4] for g in gen], to_read)
        host = to_host(to_read)
        if give is not None:
            give(host)
        return list(host[0]) if labels else []

    def _read_distributions(self, entries: List[Entry], logits: torch.Tensor, hidden, skeys: List[int],
                            roots: List[bool], samplers: List[object], to_read: List[torch.Tensor]):
        """What the search reads from generation rows, for all of them at once (the rollout pools: in one call of
        each prompt's sampler; a root, shared by prompts that start alike, keeps its probabilities instead).
        Appends the device tensors the host must read to `to_read`; returns the function that gives the entries
        their values from `to_read`'s host copies (in its order)."""
        first = len(to_read)
        (top_ids, top_probs), ranked = top_k_and_ranked(logits, self.config.sample_top_k, self.config.max_children)
        # the hidden states come to the host too: the sums of a path's states, the embeddings and their similarities
        # are a few vectors each, which the host adds in less time than it takes to launch one device kernel
        to_read += [top_ids, top_probs, top_probs.argmax(dim=-1), *ranked,
                    *([] if hidden is None else [hidden.float()])]
        probs = torch.softmax(logits.float(), dim=-1)
        draws, by_sampler, pools = [None] * len(entries), {}, []
        for i, (sampler, root) in enumerate(zip(samplers, roots)):
            if not root:
                by_sampler.setdefault(id(sampler), (sampler, []))[1].append(i)
        for sampler, rows in by_sampler.values():
            first_row, last_row = rows[0], rows[-1]   # increasing: a slice where consecutive (no index copy)
            picked = (probs[first_row:last_row + 1] if last_row - first_row + 1 == len(rows)
                      else probs[index_on(rows, probs.device)])
            keys = [draw_key(skeys[i], ROLLOUT_STREAM) for i in rows]
            draw_on_device = on_device_draws(sampler)
            if draw_on_device is None:            # a plug-in sampler: its own draws, as lists
                for i, pool in zip(rows, sampler.draw_many(picked, keys, ROLLOUT_POOL)):
                    draws[i] = pool
            else:
                pools.append(rows)
                to_read.append(draw_on_device(picked, keys, ROLLOUT_POOL))

        def give(host):
            top_ids, top_probs, greedy, ranked_ids, ranked_logits = host[first:first + 5]
            top_ids, top_prob_rows = _host_rows(top_ids), _host_rows(top_probs)
            ranked_ids, ranked_logits, greedy = _host_rows(ranked_ids), _host_rows(ranked_logits), greedy.tolist()
            at = first + 5
            hidden_rows = [None] * len(entries)
            if hidden is not None:
                hidden_rows, at = host[at].unbind(), at + 1
            for rows, drawn in zip(pools, host[at:at + len(pools)]):
                for i, pool in zip(rows, drawn.tolist()):
                    draws[i] = pool
            for i, (entry, row_probs, row_hidden) in enumerate(zip(entries, top_probs.unbind(), hidden_rows)):
                entry.top_ids, entry.top_probs, entry.greedy_col = top_ids[i], row_probs, greedy[i]
                entry.top_prob_list = top_prob_rows[i]   # floats: a drawn token's logp reads no tensor
                entry.ranked = (ranked_ids[i], ranked_logits[i])
                entry.hidden = row_hidden
                entry.draws = draws[i]
                entry.probs = probs[i] if roots[i] else None
        return give

    def _drop(self, entry: Optional[Entry]):
        if entry is None:
            return
        entry.users -= 1
        if entry.users == 0:
            self.runner.release(entry.span)

    def _execute(self, programs: List) -> List:
        """Runs generator programs that yield lists of rows (an empty list: wait one round) and receive
        their outputs; each round of all programs' rows is one model call. Returns their return values."""
        results = [None] * len(programs)
        waiting = []

        def advance(i, program, sent):
            try:
                waiting.append((i, program, program.send(sent)))
            except StopIteration as stop:
                results[i] = stop.value

        idle = 0
        try:
            for i, program in enumerate(programs):
                advance(i, program, None)
            while waiting:
                current, waiting = waiting, []
                rows = [row for _, _, wanted in current for row in wanted]
                idle = 0 if rows else idle + 1
                if idle > 1:
                    raise RuntimeError("RAIN tree engine: every program waits on another (internal error)")
                outs = self._call(rows) if rows else []
                pos = 0
                for i, program, wanted in current:
                    advance(i, program, outs[pos:pos + len(wanted)])
                    pos += len(wanted)
        except BaseException:
            for _, _, wanted in waiting:
                _abandon(wanted)
            for program in programs:         # runs their clean-up now (a retry must not see their claims)
                program.close()
            raise
        return results

    def _ensure(self, targets: Sequence[PrefixNode], ctx: PromptContext, phase: str, kind: str, cuts=frozenset()):
        """Program step: until every target position has an entry, yields the rows that compute what they
        lack from their deepest computed ancestor (one row per target, giving `cuts` on the way, positions
        that must get their own entry, entries from the same row), waiting while a position on the way is
        being computed by another row."""
        while True:
            rows = []
            busy = False
            for target in targets:
                row = self._row_to(target, ctx, phase, kind, cuts)
                if row is None:
                    busy = busy or target.entry is None
                else:
                    rows.append(row)
            if not rows and not busy:
                return
            yield rows

    @staticmethod
    def _row_to(target: PrefixNode, ctx: PromptContext, phase: str, kind: str, cuts=frozenset(),
                suffix: Sequence[int] = ()):
        """The row that computes `target` (and the `cuts` on the way) from its deepest computed ancestor,
        followed by `suffix` (then the row's own end is transient and `target` is one of its cuts); its
        positions are marked pending. None when `target` has an entry, or a position on the way is pending."""
        if target.entry is not None:
            return None
        path = target.missing_path()
        if not path or path[0].parent.pending:
            return None
        inner = [(i + 1, node) for i, node in enumerate(path[:-1]) if node in cuts]
        if suffix:
            inner.append((len(path), target))
        for _, node in inner:
            node.pending = True
        target.pending = True
        end = None if suffix else target
        return Row(path[0].parent.entry, [n.token for n in path] + list(suffix), ctx.stats, phase, kind, end,
                   target.skey if kind == "gen" and end is not None else 0, ctx.sampler if kind == "gen" else None,
                   inner)

    # --- prompts -------------------------------------------------------------------------------------
    def prepare(self, contexts: Sequence[PromptContext]):
        """Plans where the run's starting sequences part and computes the judge's few-shot prefix (not when no
        prompt is left to judge: every prompt may have failed because that prefix leaves no room)."""
        n = len(self.generation_prefix)
        self.plan = RootPlan(self.judge.prefix_ids, self.generation_prefix,
                             [(ctx.root_ids[n:], ctx.head_ids) for ctx in contexts])
        self.plan_of = {ctx.index: pair for ctx, pair in zip(contexts, self.plan.prompts)}
        self.gen_root_ends = {root.keys[-1] for root, _ in self.plan.prompts if root.keys}
        if self.plan.judge_prefix.tokens and contexts:
            (prefix,) = self._start_sequences([(self.plan.judge_prefix, None, "evaluate")])
            try:
                self.runner.pin(prefix.span)
            except BaseException:   # close() unpins only a pinned prefix: this one is given back here
                self._drop(prefix)
                raise
            self.judge_prefix = prefix

    def _start_sequences(self, items) -> List[Entry]:
        """Computes starting sequences (RootSequence, stats, phase) in rounds of one call, each row ending
        at the sequence's next cut, reusing cuts already computed. Returns each sequence's entry (one more
        user each); drops cut entries no sequence still to start passes through."""
        done_at = []
        for seq, _, _ in items:
            done_at.append(max([p for p in seq.cuts if seq.keys[p - 1] in self.cut_entries], default=0))
        while True:
            rows, wanted = [], {}
            for (seq, stats, phase), at in zip(items, done_at):
                if at == len(seq.tokens):
                    continue
                cut = next(p for p in seq.cuts if p > at)
                key = seq.keys[cut - 1]
                if key in wanted:
                    continue
                wanted[key] = len(rows)
                gen = key in self.gen_root_ends
                rows.append(Row(self.cut_entries[seq.keys[at - 1]] if at else None, seq.tokens[at:cut], stats,
                                phase, "gen" if gen else "plain",
                                skey=extend_key(seed_key(self.config.seed), seq.tokens[:cut]) if gen else 0))
            if not rows:
                break
            for key, entry in zip(wanted, self._call(rows)):
                self.cut_entries[key] = entry
            for i, (seq, _, _) in enumerate(items):
                if done_at[i] < len(seq.tokens):
                    done_at[i] = next(p for p in seq.cuts if p > done_at[i])
        out = []
        for seq, _, _ in items:
            entry = self.cut_entries[seq.keys[-1]]
            entry.users += 1
            out.append(entry)
        for seq, _, _ in items:
            for key in self.plan.started(seq):
                self._drop(self.cut_entries.pop(key))
        return out

    def start(self, contexts: Sequence[PromptContext], roots: Sequence) -> None:
        """Computes each prompt's root (after the generation prefix) and judge head (after the few-shot prefix)."""
        items = []
        for ctx in contexts:
            root_seq, head_seq = self.plan_of[ctx.index]
            items.append((root_seq, ctx.stats, "expand"))
            if ctx.head_ids and not _judges_generation(ctx):
                items.append((head_seq, ctx.stats, "evaluate"))
        entries = iter(self._start_sequences(items))
        for ctx, root in zip(contexts, roots):
            gen = PrefixNode(None, None, skey=ctx.root_key)
            gen.entry = next(entries)
            if _judges_generation(ctx):
                judge = gen
            else:
                judge = PrefixNode(None, None)
                if ctx.head_ids:
                    judge.entry = next(entries)
                else:
                    judge.entry = self.judge_prefix
                    self.judge_prefix.users += 1
            root.handle = NodeState(gen, judge)
            ctx.handle = NodeState(gen, judge)
            self.started[ctx.index] = ctx

    def commit(self, ctx: PromptContext, old_root, new_root):
        """The rewind: keeps only what the new root's subtree can need."""
        state = old_root.handle
        if new_root.handle is None:
            new_root.handle = NodeState(state.gen.walk(new_root.tokens))
        if new_root.handle.judge is None:
            new_root.handle.judge = state.judge.walk(judge_path_ids(new_root.tokens, self.end_ids))
        if _judges_generation(ctx):          # one trie: the judge keeps the origin it may read from
            keep_only_below(new_root.handle.gen, self._drop, keep_origin=True)
            return
        keep_only_below(new_root.handle.gen, self._drop, keep_origin=False)
        keep_only_below(new_root.handle.judge, self._drop, keep_origin=True)

    def finish(self, ctx: PromptContext):
        self.started.pop(ctx.index, None)
        if ctx.handle is not None:
            drop_all(ctx.handle.gen, self._drop)
            drop_all(ctx.handle.judge, self._drop)
            ctx.handle = None

    def close(self):
        for ctx in list(self.started.values()):
            self.finish(ctx)
        for entry in self.cut_entries.values():
            self._drop(entry)
        self.cut_entries = {}
        if self.judge_prefix is not None:
            self.runner.unpin(self.judge_prefix.span)
            self._drop(self.judge_prefix)
            self.judge_prefix = None

    # --- positions of search nodes -------------------------------------------------------------------
    def _gen_node(self, node) -> PrefixNode:
        if node.handle is None:
            node.handle = NodeState(self._gen_node(node.parent).walk(node.tokens))
        return node.handle.gen

    def _judge_node(self, node) -> PrefixNode:
        self._gen_node(node)
        if node.handle.judge is None:
            node.handle.judge = self._judge_node(node.parent).walk(judge_path_ids(node.tokens, self.end_ids))
        return node.handle.judge

    def _sibling_cuts(self, node) -> set:
        """Judge-side positions inside `node`'s tokens where a sibling's tokens part from them."""
        if node.parent is None:
            return set()
        ids = judge_path_ids(node.tokens, self.end_ids)
        base = self._judge_node(node.parent)
        cuts = set()
        for sibling in node.parent.children:
            if sibling is node:
                continue
            other = judge_path_ids(sibling.tokens, self.end_ids)
            j = 0
            while j < min(len(ids), len(other)) and ids[j] == other[j]:
                j += 1
            if 0 < j < len(ids):
                cuts.add(base.walk(ids[:j]))
        return cuts

    # --- jobs ----------------------------------------------------------------------------------------
    def run(self, jobs: List[object]) -> List[object]:
        expands, rollouts, judges = [], [], []
        for j, job in enumerate(jobs):
            if isinstance(job, ExpandJob):
                expands.append((j, self._expand(job)))
            else:
                rollout = _Rollout(done=job.terminal)
                if not job.terminal:
                    rollouts.append((None, self._rollout(job, rollout)))
                judges.append((j, self._evaluate(job, rollout)))
        ordered = expands + rollouts + judges            # a rollout draws before its judge looks at it
        values = self._execute([program for _, program in ordered])
        results = [None] * len(jobs)
        for (j, _), value in zip(ordered, values):
            if j is not None:
                results[j] = value
        return results

    def _expand(self, job: ExpandJob):
        ctx = job.ctx
        origin = self._gen_node(job.node)
        yield from self._ensure([origin], ctx, "expand", "gen")
        if job.length == 1:
            ids, logits = origin.entry.ranked
            return ExpandResult(ranked_ids=list(ids), ranked_logits=list(logits), hidden=origin.entry.hidden)
        rows = [] if job.greedy is not None else [_Draw(None, origin)]
        rows += [_Draw(s, origin) for s in range(job.first_stream, job.first_stream + job.attempts)]
        while True:
            active = [d for d in rows if not d.done]
            sampled = [d for d in active if d.stream is not None]
            picks = iter(ctx.sampler.draw(torch.stack([d.node.entry.top_probs for d in sampled]),
                                          [draw_key(d.node.skey, d.stream) for d in sampled]) if sampled else [])
            for d in active:
                entry = d.node.entry
                col = entry.greedy_col if d.stream is None else next(picks)
                token = entry.top_ids[col]
                d.logp += math.log(entry.top_prob_list[col])
                if entry.hidden is not None:
                    d.hidden = entry.hidden.clone() if d.hidden is None else d.hidden + entry.hidden
                d.tokens.append(token)
                d.node = d.node.child(token)
                d.done = token in self.end_ids or len(d.tokens) == job.length
            needed = list({id(d.node): d.node for d in rows if not d.done}.values())
            if not needed:
                break
            yield from self._ensure(needed, ctx, "expand", "gen")
        drafts = [Draft(tuple(d.tokens), d.logp, d.hidden) for d in rows]
        if job.greedy is None:
            return ExpandResult(greedy=drafts[0], samples=drafts[1:])
        return ExpandResult(greedy=job.greedy, samples=drafts)

    def _rollout(self, job: EvaluateJob, out: _Rollout):
        """Samples the leaf's continuation up to the end of its sentence from pre-drawn pools, computing
        each drawn token's position (all but the last) as its own row."""
        ctx, c = job.ctx, self.config
        state = list(job.state)
        node = self._gen_node(job.node)
        try:
            while not rollout_stops(self.tokenizer, c, ctx, state):
                yield from self._ensure([node], ctx, "simulate", "gen")
                entry = node.entry
                if entry.probs is not None:      # a prompt's root (shared by prompts that start alike): its own draw
                    token = ctx.sampler.draw_many(entry.probs.unsqueeze(0), [draw_key(node.skey, ROLLOUT_STREAM)],
                                                  1)[0][0]
                elif not entry.draws:            # pool used up: compute the position again for fresh draws
                    node.entry = None
                    yield from self._ensure([node], ctx, "simulate", "gen")
                    self._drop(entry)
                    continue
                else:
                    token = entry.draws[0] if ctx.sampler.repeatable else entry.draws.pop()
                if entry.hidden is not None:
                    out.hidden_sum = entry.hidden.clone() if out.hidden_sum is None else out.hidden_sum + entry.hidden
                state.append(token)
                out.tokens.append(token)
                node = node.child(token)
                if token in self.end_ids:
                    break
        finally:
            out.done = True

    def _evaluate(self, job: EvaluateJob, rollout: _Rollout):
        """The judge's side of an evaluation: the leaf's path and, token by token, its rollout (while the
        rollout runs: each token rides in the call that computes it on the generation side), then the
        cache check, then ONE call: a row with whatever the judge input still lacks (the rollout's last
        token; a reply cut before a new turn ends in tokens of its own; a terminal leaf's path is fed only
        now) and the text both option blocks share, and the option blocks on top of it."""
        ctx = job.ctx
        kind = _judge_row_kind(ctx)
        rollout_nodes = set()
        if not job.terminal:
            node = self._judge_node(job.node)
            yield from self._ensure([node], ctx, "evaluate", kind, self._sibling_cuts(job.node))
            fed = 0
            while not rollout.done:
                if fed == len(rollout.tokens):
                    yield []
                    continue
                drawn = []
                for token in rollout.tokens[fed:]:
                    if token not in self.end_ids:
                        node = node.child(token)
                        drawn.append(node)
                fed = len(rollout.tokens)
                if drawn:                        # tokens drawn without model work arrive together
                    yield from self._ensure([node], ctx, "evaluate", kind, set(drawn))
            for token in rollout.tokens[fed:]:   # drawn last: each a position of its own in the last row
                if token not in self.end_ids:
                    node = node.child(token)
                    rollout_nodes.add(node)
        state = list(job.state) + rollout.tokens
        reply, base, ids = judge_input(self.judge, self.tokenizer, self.end_ids, self.config, ctx, state,
                                       len(job.state))
        while reply in ctx.judging:              # the same reply is being judged by another leaf
            yield []
        if reply in ctx.judge_cache:
            return Evaluation(ctx.judge_cache[reply], rollout.tokens, rollout.hidden_sum, None)
        ctx.judging.add(reply)
        try:
            origin = self._judge_node(job.node) if base == "leaf" else ctx.handle.judge
            node = origin.walk(ids)
            cuts = self._sibling_cuts(job.node) if job.terminal else rollout_nodes
            value = yield from self._score(node, ctx, cuts, kind)
        finally:
            ctx.judging.discard(reply)
        ctx.judge_cache[reply] = value
        return Evaluation(value, rollout.tokens, rollout.hidden_sum, (base, list(ids)))

    def _score(self, conversation: PrefixNode, ctx: PromptContext, cuts, kind: str):
        """Program: the conversation's missing tokens (entries at `cuts` on the way and at its end) and the
        text both option blocks share in one row (of `kind`), and both option blocks as two rows on that
        row, in ONE call."""
        shared_ids = list(self.judge.shared_suffix_ids)
        while True:
            if conversation.entry is not None:
                row = Row(conversation.entry, shared_ids, ctx.stats, "evaluate", "plain") if shared_ids else None
            else:
                row = self._row_to(conversation, ctx, "evaluate", kind, cuts, shared_ids)
            if row is not None or conversation.entry is not None:
                break
            yield []                             # a position on the way is being computed by another row
        if row is None:
            logits = yield [Row(conversation.entry, list(ids), ctx.stats, "evaluate", "label")
                            for ids in self.judge.option_ids]
        else:
            shared, *logits = yield [row] + [Row(None, list(ids), ctx.stats, "evaluate", "label", after=row)
                                             for ids in self.judge.option_ids]
            if shared_ids:                       # the row's end is the transient shared text
                self._drop(shared)
        return self.judge.score(torch.stack(logits))


def _outputs_read(rows: Sequence[Row]) -> Tuple[List[int], List[int], int]:
    """Of a call's outputs (each row's cuts, then its end, in order): the indices of those whose logits the search
    reads in full (a "gen" row's, cuts included), those of the "label" rows (the judge's label columns), and how many
    outputs there are ("plain" rows' are read by nobody)."""
    full, labels, at = [], [], 0
    for row in rows:
        if row.kind == "gen":
            full += range(at, at + len(row.cuts) + 1)
        elif row.kind == "label":
            labels.append(at + len(row.cuts))
        at += len(row.cuts) + 1
    return full, labels, at


class _LogitRows:
    """A call's logits, computed at some of its outputs (`computed`, increasing): `at` gives those of chosen outputs."""

    def __init__(self, logits: Optional[torch.Tensor], computed: List[int]):
        self.logits, self.row = logits, {output: i for i, output in enumerate(computed)}

    @property
    def device(self):
        return self.logits.device

    def at(self, outputs: List[int]) -> torch.Tensor:
        rows = [self.row[output] for output in outputs]
        if rows == list(range(len(self.row))):   # all of them, in order: no index copy
            return self.logits
        return self.logits[index_on(rows, self.logits.device)]


def _judges_generation(ctx: PromptContext) -> bool:
    """True when the judge's input begins with exactly the generated sequence (few-shot prefix + head ==
    generation prefix + prompt): one trie then serves both sides."""
    return ctx.head_key == ctx.gen_key


def _host_rows(values: torch.Tensor) -> List[tuple]:
    """The rows of a host tensor as tuples of numbers: an entry keeps its rows as long as its trie holds it, and the
    collector stops tracking a tuple of numbers at its first young pass, where a list stays tracked, moved to the old
    generation and walked by every full collection (4 of the 12 objects kept per computed position)."""
    return list(map(tuple, values.tolist()))


def _judge_row_kind(ctx: PromptContext) -> str:
    """Judge-side rows on a shared trie compute positions the search may read: they reduce their outputs."""
    return "gen" if _judges_generation(ctx) else "plain"


def _halves(rows: Sequence[Row]) -> Optional[Tuple[List[Row], List[Row]]]:
    """The rows of a call in two, as near the middle as a split where no row builds on (`after`) a row before it
    allows; None where they cannot part."""
    index = {id(row): i for i, row in enumerate(rows)}
    splits, lowest = [], len(rows)
    for i in range(len(rows) - 1, 0, -1):
        lowest = min(lowest, i if rows[i].after is None else index[id(rows[i].after)])
        if lowest >= i:
            splits.append(i)
    if not splits:
        return None
    at = min(splits, key=lambda i: abs(2 * i - len(rows)))
    return list(rows[:at]), list(rows[at:])


def _abandon(rows: Sequence[Row]):
    """Clears the pending marks of rows that will not run."""
    for row in rows:
        for node in [node for _, node in row.cuts] + [row.target]:
            if node is not None and node.entry is None:
                node.pending = False
