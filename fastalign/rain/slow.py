"""The reference engine: RAIN's model work done the way the published implementation does it.

Batch size 1 everywhere and no reuse between nodes: every candidate token set starts with a fresh forward
over the node's whole token state (then decodes its remaining tokens on that sample's own cache), every
rollout starts with a fresh forward, and every self-evaluation runs two fresh forwards over the whole judge
prompt, few-shot prefix included. It is the correctness and speed baseline of the tree engine: given the
same logits and a keyed sampler, both produce identical results.
"""
import math
from typing import AbstractSet, List, Optional, Sequence

import torch

from fastalign.eval_mode import eval_mode
from fastalign.model_devices import input_device
from fastalign.ops.backend import autocast_off
from fastalign.runtime.hf_cache_argument import cache_kwargs, returned_cache, takes_logits_to_keep
from fastalign.transfers import index_on

from .config import RainConfig
from .dialogue import judge_input, judge_path_ids, rollout_stops
from .jobs import Draft, Evaluation, EvaluateJob, ExpandJob, ExpandResult
from .judge import JudgeTokens
from .ledger import EMPTY_KEY, TokenLedger
from .sampling import ROLLOUT_STREAM, draw_key, extend_key, ranked_tokens, top_k_distribution


class SlowEngine:
    def __init__(self, model, tokenizer, end_ids: AbstractSet[int], judge: JudgeTokens, config: RainConfig,
                 want_hidden: bool, ledger: Optional[TokenLedger] = None):
        self.model = model
        self.tokenizer = tokenizer
        self.end_ids = end_ids
        self.judge = judge
        self.config = config
        self.want_hidden = want_hidden
        self.ledger = ledger or TokenLedger()
        self.device = input_device(model, "the slow RAIN engine")
        # the last position's logits alone are read: not [tokens, vocab] over a whole judge prompt
        self.last_logits = dict(logits_to_keep=1) if takes_logits_to_keep(model) else {}

    # --- the one way this engine touches the model --------------------------------------------------
    @torch.no_grad()
    def _forward(self, stats, ids: Sequence[int], cache=None, cache_key: int = EMPTY_KEY):
        """One batch-1 forward of `ids` (on top of `cache`, whose sequence is named `cache_key`).
        Returns (last logits [V], last hidden [d] or None, cache, key). In the model's own dtypes and without dropout
        (a model in train mode is run in eval mode), as the tree engine's runner computes: an enclosing autocast does
        not apply."""
        with autocast_off(self.device), eval_mode(self.model):
            out = self.model(input_ids=index_on([list(ids)], self.device), use_cache=True,
                             output_hidden_states=self.want_hidden, **cache_kwargs(self.model, cache),
                             **self.last_logits)
        self.ledger.call([stats])
        key = self.ledger.feed(stats, cache_key, ids)
        hidden = out.hidden_states[-1][0, -1] if self.want_hidden else None
        return out.logits[0, -1].float(), hidden, returned_cache(out), key

    # --- jobs ----------------------------------------------------------------------------------------
    def prepare(self, contexts):
        """Nothing to prepare: this engine keeps no state between calls."""

    def start(self, contexts, roots):
        pass

    def commit(self, ctx, old_root, new_root):
        """Nothing to release: this engine keeps no cache between calls."""

    def finish(self, ctx):
        pass

    def close(self):
        pass

    def run(self, jobs: List[object]) -> List[object]:
        out = []
        for job in jobs:
            if isinstance(job, ExpandJob):
                with self.ledger.phase([job.ctx.stats], "expand"):
                    out.append(self._expand(job))
            elif isinstance(job, EvaluateJob):
                out.append(self._evaluate(job))
            else:
                raise TypeError(f"SlowEngine cannot run {type(job).__name__}")
        return out

    def _expand(self, job: ExpandJob) -> ExpandResult:
        stats = job.ctx.stats
        if job.length == 1:
            logits, hidden, _, _ = self._forward(stats, job.state)
            ids, values = ranked_tokens(logits.unsqueeze(0), self.config.max_children)
            return ExpandResult(ranked_ids=ids[0], ranked_logits=values[0], hidden=hidden)
        greedy = self._draw_set(job, stream=None)
        samples = [self._draw_set(job, stream=s) for s in range(job.first_stream, job.first_stream + job.attempts)]
        return ExpandResult(greedy=greedy, samples=samples)

    def _draw_set(self, job: ExpandJob, stream: Optional[int]) -> Draft:
        """One token set: a fresh forward over the state, then cached decoding of the set's tokens."""
        stats, k = job.ctx.stats, self.config.sample_top_k
        logits, hidden, cache, key = self._forward(stats, job.state)
        prefix_key = job.node.key
        tokens, logp, hidden_sum = [], 0.0, None
        while True:
            ids, probs = top_k_distribution(logits.unsqueeze(0), k)
            if stream is None:
                col = int(probs[0].argmax())
            else:
                col = job.ctx.sampler.draw(probs, [draw_key(prefix_key, stream)])[0]
            token = int(ids[0, col])
            tokens.append(token)
            logp += math.log(float(probs[0, col]))
            if hidden is not None:
                hidden_sum = hidden.float().clone() if hidden_sum is None else hidden_sum + hidden.float()
            prefix_key = extend_key(prefix_key, [token])
            if token in self.end_ids or len(tokens) == job.length:
                return Draft(tuple(tokens), logp, hidden_sum)
            logits, hidden, cache, key = self._forward(stats, [token], cache, key)

    def _evaluate(self, job: EvaluateJob) -> Evaluation:
        stats = job.ctx.stats
        with self.ledger.phase([stats], "simulate"):
            rollout, hidden_sum = ([], None) if job.terminal else self._rollout(job)
        with self.ledger.phase([stats], "evaluate"):
            value, judged = self._judge(job.ctx, list(job.state) + rollout, len(job.state))
        return Evaluation(value, rollout, hidden_sum, judged)

    def _rollout(self, job: EvaluateJob):
        c, stats = self.config, job.ctx.stats
        state, rollout, hidden_sum = list(job.state), [], None
        cache, key, logits, hidden = None, EMPTY_KEY, None, None
        prefix_key = job.node.key
        while not rollout_stops(self.tokenizer, c, job.ctx, state):
            if cache is None:
                logits, hidden, cache, key = self._forward(stats, state)
            else:
                logits, hidden, cache, key = self._forward(stats, [state[-1]], cache, key)
            probs = torch.softmax(logits, dim=-1).unsqueeze(0)
            token = job.ctx.sampler.draw(probs, [draw_key(prefix_key, ROLLOUT_STREAM)])[0]
            prefix_key = extend_key(prefix_key, [token])
            if hidden is not None:
                hidden_sum = hidden.float().clone() if hidden_sum is None else hidden_sum + hidden.float()
            state.append(token)
            rollout.append(token)
            if token in self.end_ids:
                break
        return rollout, hidden_sum

    def _judge(self, ctx, state: List[int], leaf_len: int):
        reply, base, ids = judge_input(self.judge, self.tokenizer, self.end_ids, self.config, ctx, state,
                                       leaf_len)
        if reply in ctx.judge_cache:
            return ctx.judge_cache[reply], None
        if base == "leaf":
            conversation = list(ctx.head_ids) + judge_path_ids(state[ctx.answer_start:leaf_len], self.end_ids) + ids
        else:
            conversation = list(ctx.head_ids) + ids
        logits = torch.stack([self._forward(ctx.stats, self.judge.full_ids(conversation, order))[0]
                              for order in (0, 1)])
        value = self.judge.score(logits[:, self.judge.label_columns])
        ctx.judge_cache[reply] = value
        return value, (base, list(ids))
