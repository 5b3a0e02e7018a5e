"""The tree engine against the batch-1 reference engine: identical decisions with a keyed sampler (on a
hash model, bit for bit, and on a tiny random Llama through the real TreeRunner), the same distribution of
first commits with the production sampler, the cost accounting, and per-prompt error isolation."""
import collections
import copy
import dataclasses
import gc
import json
import re
import time
import types

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import GenerationConfig

from fastalign import PoolExhaustedError
from fastalign.rain import JudgePrompt, JudgeTokens, RainConfig, rain_generate, tree_engine
from fastalign.rain import generate as generate_module
from fastalign.rain import search as search_module
from fastalign.rain.embeddings import HiddenStateEmbedder
from fastalign.rain.jobs import EvaluateJob, ExpandJob, PromptContext
from fastalign.rain.sampling import ROLLOUT_STREAM, KeyedSampler, draw_key
from fastalign.rain.slow import SlowEngine
from fastalign.rain.tree import Node
from tests.cyclic_garbage import cyclic_garbage
from tests.runtime.tiny_models import fill_with_nan
from tests.sync_counter import _site
from tests.vocab_rows import VocabRows

from . import fake_model
from .fake_model import HashLM, HashRunner
from .tiny import PROMPTS, SHORT_JUDGE, tiny_llama, tiny_qwen3_next, tokenizer

SMALL = RainConfig(root_visits=8, min_new_visits=3, max_new_tokens=16)


def run_both(model, prompts, config, make_runner, **kw):
    out = {}
    for engine in ("slow", "tree"):
        runner = make_runner() if engine == "tree" else None
        out[engine] = (rain_generate(model, tokenizer(), prompts, config, engine=engine, runner=runner, **kw), runner)
    return out


def decisions(run):
    return [(r.answer_ids, r.commits, r.error) for r in run.results]


def test_identical_decisions_on_hash_model_and_nothing_left_behind():
    model = HashLM(len(tokenizer()))
    out = run_both(model, PROMPTS, SMALL, lambda: HashRunner(len(tokenizer())), judge_prompt=SHORT_JUDGE,
                   embedding="hidden", sampler="keyed", concurrency=2)
    slow, (tree, runner) = out["slow"][0], out["tree"]
    assert all(r.error is None for r in tree.results)
    assert decisions(slow) == decisions(tree)               # same sets, visit counts, values, every commit
    assert sum(len(r.commits) for r in tree.results) >= 9
    assert not runner.live                                  # every span released, shared prefixes included
    assert slow.stats.minimum == tree.stats.minimum
    # the same evaluations read from the judge's cache (SPEC: scores are cached by text) in both engines
    assert [r.stats.required_calls for r in slow.results] == [r.stats.required_calls for r in tree.results]


def test_identical_decisions_on_tiny_llama_through_tree_runner():
    TreeRunner = pytest.importorskip("fastalign.runtime").TreeRunner
    model = tiny_llama()
    holder = {}

    def make_runner():
        holder["runner"] = TreeRunner(model, max_tokens=2048, attention_backend="torch")
        fill_with_nan(holder["runner"].pool)
        return holder["runner"]

    config = RainConfig(root_visits=5, min_new_visits=2, max_new_tokens=3)
    out = run_both(model, PROMPTS[:1], config, make_runner, judge_prompt=SHORT_JUDGE, embedding="hidden",
                   sampler="keyed")
    assert out["tree"][0].results[0].error is None
    assert decisions(out["slow"][0]) == decisions(out["tree"][0])
    runner = holder["runner"]
    assert runner.num_free_blocks == runner.num_blocks


@pytest.mark.parametrize("engine", ["tree", "slow"])
def test_a_model_with_nan_logits_fails_each_prompt_naming_the_non_finite_logits(engine):
    """A NaN row of the lm_head: each prompt's error was "AttributeError: 'NoneType' object has no attribute
    'tokens'" from deep in the search; it must say that the model's logits are not finite."""
    model = tiny_llama()
    with torch.no_grad():
        model.lm_head.weight[5] = float("nan")
    run = rain_generate(model, tokenizer(), PROMPTS[:1], RainConfig(root_visits=3, min_new_visits=2, max_new_tokens=3),
                        judge_prompt=SHORT_JUDGE, embedding="hidden", engine=engine)
    assert re.match("FloatingPointError: .* the model's next-token logits are not finite", run.results[0].error)


def test_both_engines_run_a_model_whose_embeddings_accelerate_offloads():
    """Offloaded weights wait on the meta device: the slow engine put its inputs there and the runner its KV pool
    (every prompt failed, "RuntimeError: unsupported scalarType"); both run where the embeddings' hook runs them."""
    accelerate = pytest.importorskip("accelerate")
    TreeRunner = pytest.importorskip("fastalign.runtime").TreeRunner
    model = tiny_llama()
    config = RainConfig(root_visits=4, min_new_visits=2, max_new_tokens=2)
    settings = dict(judge_prompt=SHORT_JUDGE, embedding="hidden", sampler="keyed")
    expected = decisions(rain_generate(model, tokenizer(), PROMPTS[:1], config, engine="slow", **settings))
    accelerate.cpu_offload(model.model.embed_tokens, execution_device=torch.device("cpu"))
    out = run_both(model, PROMPTS[:1], config, lambda: TreeRunner(model, max_tokens=2048, attention_backend="torch"),
                   **settings)
    assert expected[0][2] is None
    assert decisions(out["slow"][0]) == decisions(out["tree"][0]) == expected


def test_both_engines_refuse_a_model_with_a_part_not_loaded():
    """A part on the meta device with no accelerate hook to load it: the tree engine's runner refused it, but the slow
    engine checked the input embeddings alone and ran on the uninitialised memory that F.linear of a CPU input and a
    meta weight returns (garbage decisions, silently)."""
    config = RainConfig(root_visits=2, min_new_visits=1, max_new_tokens=2)
    for engine, user in (("tree", "a TreeRunner"), ("slow", "the slow RAIN engine")):
        model = tiny_llama()
        model.model.layers[1].mlp.down_proj.to("meta")
        with pytest.raises(ValueError, match=r"^model: its weights are not loaded \(model.layers.1.mlp.down_proj "
                                             rf"has no accelerate hook .* meta device\); load them .* before {user}"):
            rain_generate(model, tokenizer(), PROMPTS[:1], config, judge_prompt=SHORT_JUDGE, embedding="hidden",
                          engine=engine, runner_tokens=1024)


def test_an_enclosing_autocast_does_not_apply_inside_the_slow_engine():
    """Both engines run the model in its own dtypes (the tree engine's runner ignores a caller's autocast): a
    caller's bf16 autocast around rain_generate changed the slow engine's logits, and so its decisions."""
    model = tiny_llama()
    engine = SlowEngine(model, tokenizer(), frozenset(), None, RainConfig(), want_hidden=True)
    ids = tokenizer()(PROMPTS[0])["input_ids"]
    logits, hidden, _, _ = engine._forward(None, ids)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits_under, hidden_under, _, _ = engine._forward(None, ids)
    assert hidden_under.dtype == torch.float32
    assert torch.equal(logits_under, logits) and torch.equal(hidden_under, hidden)


def test_the_slow_engine_runs_a_model_in_train_mode_without_dropout():
    """The tree engine's runner computes without dropout whatever the model's mode, but the slow engine ran the
    forward of a model in train mode (one being fine-tuned) with its dropout: its logits, and so its commits, followed
    torch's global seed (drawing from the caller's generator) and differed from the tree engine's."""
    model = tiny_llama()
    for layer in model.model.layers:
        layer.self_attn.attention_dropout = 0.5
    engine = SlowEngine(model, tokenizer(), frozenset(), None, RainConfig(), want_hidden=True)
    ids = tokenizer()(PROMPTS[0])["input_ids"]
    expected, expected_hidden, _, _ = engine._forward(None, ids)
    model.train()
    rng = torch.get_rng_state()
    logits, hidden, _, _ = engine._forward(None, ids)
    assert torch.equal(logits, expected) and torch.equal(hidden, expected_hidden)
    assert torch.equal(torch.get_rng_state(), rng) and model.training


@pytest.mark.parametrize("embedding", ["hidden", "plug-in"])   # a plug-in embedder needing no hidden states
def test_the_tree_engine_runs_the_lm_head_only_at_the_outputs_whose_logits_the_search_reads(monkeypatch, embedding):
    """Generation rows' outputs (their ends and cuts) are read in full; of the judge's label rows only the label
    columns, computed from their hidden states; the judge's KV-only rows' outputs by nobody. The lm_head's
    vocabulary-wide products cover the generation outputs alone (they covered every output: 1123 rows where 651 were
    read on bench_rain --quick), and a call without a generation row runs none. The runner is asked for hidden
    states where the embedder needs them or a label row's columns are computed from them (as with `fastalign rain`'s
    default minilm embedder), and only there."""
    TreeRunner = pytest.importorskip("fastalign.runtime").TreeRunner
    model = tiny_llama()
    calls, call_once = [], tree_engine.TreeEngine._call_once
    runner = TreeRunner(model, max_tokens=2048, attention_backend="torch")
    extend, asked = runner.extend, []

    def counted(self, rows):
        with VocabRows(len(tokenizer())) as head:
            out = call_once(self, rows)
        outputs = collections.Counter()
        for row in rows:
            outputs[row.kind] += 1 + len(row.cuts)
        calls.append((outputs, head.products, asked.pop()))
        return out

    def recorded(*args, **options):
        asked.append(options.get("hidden"))
        return extend(*args, **options)
    monkeypatch.setattr(tree_engine.TreeEngine, "_call_once", counted)
    monkeypatch.setattr(runner, "extend", recorded)
    embedder = "hidden" if embedding == "hidden" else _Vectors(lambda paths: torch.ones(len(paths), 2))
    run = rain_generate(model, tokenizer(), PROMPTS[:1], RainConfig(root_visits=4, min_new_visits=2, max_new_tokens=3),
                        engine="tree", runner=runner, judge_prompt=SHORT_JUDGE, embedding=embedder, sampler="keyed")
    assert run.results[0].error is None
    kinds = sum((kinds for kinds, _, _ in calls), collections.Counter())
    assert kinds["label"] and kinds["plain"] and kinds["gen"]   # every kind of row ran
    assert any(not kinds["gen"] for kinds, _, _ in calls)       # and calls without a generation row
    assert any(not kinds["label"] for kinds, _, _ in calls)     # and calls without a label row
    assert [products for _, products, _ in calls] == [kinds["gen"] for kinds, _, _ in calls]
    assert [hidden for _, _, hidden in calls] == [
        "last" if embedding == "hidden" or kinds["label"] else None for kinds, _, _ in calls]


def test_the_slow_engine_reads_a_bf16_models_logits_in_float32():
    """Its distributions (a rollout's softmax, the judge's label logits) are taken in float32, as the tree engine's
    are: a softmax in bf16 would round the probabilities its draws read."""
    engine = SlowEngine(tiny_llama(dtype=torch.bfloat16), tokenizer(), frozenset(), None, RainConfig(),
                        want_hidden=False)
    logits, _, _, _ = engine._forward(None, tokenizer()(PROMPTS[0])["input_ids"])
    assert logits.dtype == torch.float32


def test_the_slow_engine_computes_the_last_positions_logits_alone():
    """Each forward read the logits of its last position alone, and made every position's (a judge prompt's
    thousands of tokens at a 128k-word vocabulary); now the last one's alone (logits_to_keep=1)."""
    model = tiny_llama()
    engine = SlowEngine(model, tokenizer(), frozenset(), None, RainConfig(), want_hidden=True)
    ids = tokenizer()(PROMPTS[0])["input_ids"]
    with VocabRows(len(tokenizer())) as rows:
        logits, _, _, _ = engine._forward(None, ids)
    assert len(ids) > 1 and rows.most == 1
    with torch.no_grad():
        torch.testing.assert_close(logits, model(input_ids=torch.tensor([ids])).logits[0, -1])


def test_the_slow_engine_decodes_a_set_and_a_rollout_on_their_own_cache():
    """The reference's way: one fresh forward over the node's state, then one token a forward on that cache. Running
    the whole state again at each step would change no token, but would make the baseline that bench_rain measures
    the tree engine against slower than the reference."""
    config = RainConfig(rollout_stop_chars="")                           # a rollout ends at max_length alone
    engine = SlowEngine(tiny_llama(), tokenizer(), frozenset(), None, config, want_hidden=False)
    state = tokenizer()(PROMPTS[0])["input_ids"]
    ctx = PromptContext(index=0, prompt_text="", root_ids=state, head_ids=[], root_key=0,
                        max_length=len(state) + 4, sampler=KeyedSampler(0))
    fed, forward = [], engine._forward
    engine._forward = lambda stats, ids, *args: fed.append(len(ids)) or forward(stats, ids, *args)
    engine._draw_set(ExpandJob(ctx, Node((), None, 0.0, 0), state, 4), stream=None)
    assert fed == [len(state), 1, 1, 1]
    del fed[:]
    rollout, _ = engine._rollout(EvaluateJob(ctx, Node((), None, 0.0, 0), state, terminal=False))
    assert len(rollout) == 4 and fed == [len(state), 1, 1, 1]


def run_on_real_pool(prompts, config, max_tokens, block_size=4, **kwargs):
    """rain_generate of the tiny Llama on a TreeRunner of `max_tokens` tokens (blocks of `block_size`), which must have
    every block back afterwards: (the run, the tokens its forwards ran, recomputed evicted prefixes included)."""
    TreeRunner = pytest.importorskip("fastalign.runtime").TreeRunner
    model = tiny_llama()
    runner = TreeRunner(model, max_tokens=max_tokens, block_size=block_size, attention_backend="torch")
    forward, ran = runner._forward, []
    runner._forward = lambda plan, *a, **k: ran.append(len(plan.token_ids)) or forward(plan, *a, **k)
    out = rain_generate(model, tokenizer(), prompts, config, runner=runner, judge_prompt=SHORT_JUDGE,
                        embedding="hidden", sampler="keyed", **kwargs)
    assert runner.num_free_blocks == runner.num_blocks
    return out, sum(ran)


def test_a_small_pool_changes_no_result_and_its_recomputation_is_counted():
    """Three prompts on one runner whose pool forces evictions (and merged calls that do not fit, run again
    prompt by prompt): the decisions of a large pool, no block left behind, and every token the runner ran,
    recomputed evicted prefixes included, counted in `tokens` and `recomputed_tokens` (they were missing)."""
    config = RainConfig(root_visits=5, min_new_visits=2, max_new_tokens=4)
    (large, large_ran), (small, small_ran) = (run_on_real_pool(PROMPTS, config, n, concurrency=3) for n in (4096, 160))
    assert all(r.error is None for r in small.results)
    assert decisions(small) == decisions(large)
    assert large.stats.recomputed_tokens == 0 and large.stats.tokens == large_ran
    assert small.stats.tokens == small_ran > large_ran
    assert small.stats.recomputed_tokens == small_ran - large_ran
    assert sum(r.stats.recomputed_tokens for r in small.results) == small.stats.recomputed_tokens


class ReportingRunner(HashRunner):
    """A HashRunner that reports, for every call, one context token run again per row (as HFRecomputeModel does)
    and one restored token for each parent span, and each of its ancestors, past one prompt's starting sequences (so
    that only that prompt's rows can need them); `charged[k]`: the restored tokens reported for prompt k's spans."""

    def __init__(self, vocab_size, starts):
        super().__init__(vocab_size)
        self.starts, self.charged = starts, [0] * len(starts)

    def extend(self, parents, token_lists, **kw):
        out = super().extend(parents, token_lists, **kw)
        self.last_context_rerun = np.ones(len(parents), dtype=np.int64)
        self.last_restored = {}
        for parent in parents:
            span = None if isinstance(parent, int) else parent
            while span is not None and span.id not in self.last_restored:
                owners = [k for k, sequences in enumerate(self.starts)
                          if any(len(span.tokens) > len(s) and span.tokens[:len(s)] == s for s in sequences)]
                if not owners:
                    break
                (k,) = owners
                self.last_restored[span.id] = 1
                self.charged[k] += 1
                span = span.parent
        return out


def test_each_prompt_is_charged_the_tokens_run_again_for_its_own_rows():
    """Prompts merged into shared calls on a runner that runs tokens again (evicted prefixes, rows' contexts): each
    prompt's recomputed_tokens are those run again for its own rows, not charged to another prompt of the call."""
    tok = tokenizer()
    judge = JudgeTokens(tok, SHORT_JUDGE)
    runner = ReportingRunner(len(tok), [(tok(p)["input_ids"], judge.prefix_ids + judge.head_ids(p)) for p in PROMPTS])
    run = run_tree(PROMPTS, RainConfig(root_visits=5, min_new_visits=2, max_new_tokens=4), runner=runner,
                   concurrency=3)
    assert all(r.error is None for r in run.results) and all(runner.charged)
    assert [r.stats.recomputed_tokens for r in run.results] == [
        r.stats.rows + charged for r, charged in zip(run.results, runner.charged)]


def test_a_reply_two_leaves_of_one_engine_run_reach_is_judged_once(monkeypatch):
    """Two evaluations of one engine run that reach the same reply (here each leaf's evaluation given twice): the
    second waits for the first and reads its score from the cache, so the judge's option rows are not run again."""
    real_run = tree_engine.TreeEngine.run

    def run(self, jobs):
        twins = [dataclasses.replace(job) for job in jobs if isinstance(job, EvaluateJob)]
        return real_run(self, list(jobs) + twins)[:len(jobs)]

    monkeypatch.setattr(tree_engine.TreeEngine, "run", run)
    out = run_tree(PROMPTS, RainConfig(root_visits=5, min_new_visits=2, max_new_tokens=4))
    assert all(r.error is None for r in out.results)
    assert out.stats.recomputed_tokens == 0


class NarrowPoolRunner(HashRunner):
    """A HashRunner whose pool holds one row per call, with the rows on it (int parents): a call with more raises
    PoolExhaustedError before anything runs. `fail_at`: the call of that number (from 1, refused ones counted)
    raises a RuntimeError instead."""

    def __init__(self, vocab, fail_at=None):
        super().__init__(vocab)
        self.attempts, self.refused, self.fail_at = 0, 0, fail_at

    def extend(self, parents, token_lists, **kw):
        self.attempts += 1
        if self.attempts == self.fail_at:
            raise RuntimeError("injected fault")
        if sum(not isinstance(p, int) for p in parents) > 1:
            self.refused += 1
            raise PoolExhaustedError("KV pool exhausted: test pool of one row")
        return super().extend(parents, token_lists, **kw)


@pytest.mark.parametrize("config", [SMALL, dataclasses.replace(SMALL, root_visits=10, parallel_leaves=4)])
def test_calls_the_pool_cannot_hold_run_row_by_row_with_the_same_decisions(config):
    """A call whose rows the pool cannot hold at once (merged prompts' starts and steps, leaves picked together, an
    expansion's candidates) runs in parts, each row with the rows on it: the decisions of one call, nothing left
    behind. It was the prompt's error (or, merged, each prompt's again alone)."""
    whole = run_tree(PROMPTS, config, concurrency=3)
    runner = NarrowPoolRunner(len(tokenizer()))
    parts = run_tree(PROMPTS, config, concurrency=3, runner=runner)
    assert all(r.error is None for r in parts.results)
    assert decisions(parts) == decisions(whole)
    assert runner.refused > 0 and not runner.live
    assert parts.stats.model_calls > whole.stats.model_calls


def test_a_failure_at_any_call_of_split_calls_leaves_no_span_behind():
    """Two prompts searched together on a pool of one row, failing at each call in turn: the spans a split call's
    first part made (a shared judge text, prompt starts: spans that no trie holds) were left in the runner for good
    when a later part failed. The first two calls compute the judge's few-shot prefix, which every prompt needs:
    their failure is the run's."""
    config = RainConfig(root_visits=3, min_new_visits=2, max_new_tokens=3)
    calls = NarrowPoolRunner(len(tokenizer()))
    assert all(r.error is None for r in run_tree(PROMPTS[:2], config, runner=calls, concurrency=2).results)
    for fail_at in range(1, calls.attempts + 1):
        runner = NarrowPoolRunner(len(tokenizer()), fail_at)
        try:
            run = run_tree(PROMPTS[:2], config, runner=runner, concurrency=2)
        except RuntimeError:    # while computing the judge's few-shot prefix
            assert fail_at <= 2 and calls.refused
        else:
            assert {r.error for r in run.results} <= {None, "RuntimeError: injected fault"}
        assert not runner.live, fail_at


def test_a_split_call_keeps_each_row_with_the_rows_on_it_and_its_order():
    def row(token, after=None):
        return tree_engine.Row(None, [token], None, "evaluate", "label" if after else "plain", after=after)

    a, b, c, d = row(1), row(2), row(3), row(4)
    a1, a2, c1 = row(5, a), row(6, a), row(7, c)
    assert tree_engine._halves([a, a1, a2, b, c, c1]) == ([a, a1, a2], [b, c, c1])
    assert tree_engine._halves([a, a1, a2, b]) == ([a, a1, a2], [b])
    assert tree_engine._halves([a, b, c, d]) == ([a, b], [c, d])
    assert tree_engine._halves([a, a1]) is None and tree_engine._halves([a]) is None
    assert tree_engine._halves([a, b, a1]) is None   # b sits between a and the row on it


def test_programs_that_all_wait_end_in_an_internal_error_not_a_hang():
    """A round in which every program waits (yields no row) is let pass once; a second one in a row could only repeat
    forever: an error, and every program is closed (its clean-up runs). A mutation run found neither tested."""
    def waits(rounds):
        for _ in range(rounds):
            yield []
        return rounds

    closed = []

    def forever():
        try:
            for _ in range(100):
                yield []
            raise AssertionError("the rounds went on")   # stops this test, should the check not
        finally:
            closed.append(True)

    engine, error = types.SimpleNamespace(), re.escape("every program waits on another (internal error)")
    assert tree_engine.TreeEngine._execute(engine, [waits(1), waits(0)]) == [1, 0]   # no row: no model call
    with pytest.raises(RuntimeError, match=error):
        tree_engine.TreeEngine._execute(engine, [waits(2)])
    program = forever()                       # held here: only _execute's close can run its clean-up
    with pytest.raises(RuntimeError, match=error):
        tree_engine.TreeEngine._execute(engine, [program, waits(1)])
    assert closed == [True]


def test_a_step_that_fits_only_in_parts_keeps_its_prompt_s_answer_on_the_real_runner():
    """One prompt, four leaves at a time, on a pool that cannot hold a step's rows at once: its answer on a large
    pool, every block given back; a pool that cannot hold one of its rows fails the prompt, naming the pool."""
    config = RainConfig(root_visits=5, min_new_visits=2, max_new_tokens=4, parallel_leaves=4)

    def rounded(run):   # hidden-state sums of another batching may move their last bits (README), not a decision
        return [(ids, [{**c, "children": [(t, round(n, 6), round(q, 6), v) for t, n, q, v in c["children"]]}
                       for c in commits], error) for ids, commits, error in decisions(run)]

    large, small, tiny = (run_on_real_pool(PROMPTS[:1], config, n)[0] for n in (4096, 160, 60))
    assert large.results[0].error is None and rounded(small) == rounded(large)
    assert small.stats.model_calls > large.stats.model_calls
    assert tiny.results[0].error.startswith("PoolExhaustedError: KV pool exhausted")


def test_prompts_that_fit_alone_fit_beside_each_other_with_the_records_of_runs_alone():
    """A pool of 6 blocks of 16 holds each of prompts 0 and 1 alone, and both beside each other (and the cuts where
    their starts part), each with the record of a run of it alone (README: a prompt fails only where it cannot fit,
    and its answer does not depend on the prompts beside it). Prompt 0 failed alone and prompt 1 beside it while
    spans kept partial blocks that only a child's copy was read from (issue #3)."""
    config = RainConfig(token_set_lengths=(3,), candidates=2, max_children=2, widen_variance_per_token=1e9,
                        widen_max_q=2.0, root_visits=3, min_new_visits=5, max_new_tokens=6, max_length=17,
                        rollout_stop_chars=" ", turn_marker="", parallel_leaves=3, virtual_loss=0.3)
    beside, ran = run_on_real_pool(PROMPTS[:2], config, 96, block_size=16)
    alone = [run_on_real_pool([PROMPTS[i]], config, 96, block_size=16, indices=[i])[0] for i in (0, 1)]
    assert decisions(beside) == [decisions(run)[0] for run in alone]
    assert [r.error for r in beside.results] == [None, None] and beside.stats.tokens == ran


def test_a_prompt_that_fits_beside_another_fits_alone():
    """Prompt 1 fits a pool of 11 blocks of 8 beside prompt 0, but alone it failed with PoolExhaustedError (issue
    #3): spans on its path kept their partial last blocks, copied for their children while a sibling wrote into
    them in place, after that sibling was released; 2 blocks that no call read, and its judge call needed the
    pool's 11th. A span now takes its child's copy of such a block, which goes back to the pool."""
    config = RainConfig(token_set_lengths=(3,), candidates=2, max_children=2, widen_variance_per_token=1e9,
                        widen_max_q=2.0, root_visits=3, min_new_visits=5, max_new_tokens=12, max_length=23,
                        rollout_stop_chars=" ", turn_marker="", parallel_leaves=3, virtual_loss=0.3)
    alone, _ = run_on_real_pool([PROMPTS[1]], config, 88, block_size=8, indices=[1])
    assert alone.results[0].error is None


class FullOnceAllCommitted(HashRunner):
    """A HashRunner whose pool is full from the first call after each of the prompts searched (`searched`, their
    contexts) committed a token, until a search ends (`freed`)."""

    def __init__(self, vocab):
        super().__init__(vocab)
        self.searched, self.full, self.freed = [], False, False

    def extend(self, parents, token_lists, **kw):
        self.full = self.full or bool(self.searched) and all(c.stats.committed_tokens for c in self.searched)
        if self.full and not self.freed:
            raise PoolExhaustedError("KV pool exhausted: test pool full")
        return super().extend(parents, token_lists, **kw)


def test_a_prompt_crowded_out_after_its_first_commits_counts_the_commits_of_its_run_alone(monkeypatch):
    """Prompts crowded out after each committed a token are searched again alone: each gets the answer and
    committed_tokens of a run of it alone (not its first try's commits too: 16 for 15 tokens, tokens_per_committed
    off), while its model calls count both tries. The other crowded-out test's prompt had committed none."""
    runner, at_end = FullOnceAllCommitted(len(tokenizer())), {}
    prepare, end_search = generate_module._prepare, PromptContext.end_search

    def preparing(*args):
        ctx, model_prompt = prepare(*args)
        runner.searched.append(ctx)
        return ctx, model_prompt

    def ending(ctx):
        if runner.full:
            runner.freed = True   # a prompt gave its room back
            at_end.setdefault(ctx.index, ctx.stats.committed_tokens)
        return end_search(ctx)
    monkeypatch.setattr(generate_module, "_prepare", preparing)
    monkeypatch.setattr(PromptContext, "end_search", ending)
    beside = run_tree(PROMPTS[:2], SMALL, concurrency=2, runner=runner)
    monkeypatch.undo()
    alone = [run_tree([PROMPTS[i]], SMALL, indices=[i]).results[0] for i in (0, 1)]
    assert all(r.error is None for r in beside.results) and decisions(beside) == [
        (r.answer_ids, r.commits, r.error) for r in alone]
    assert [r.stats.committed_tokens for r in beside.results] == [len(r.answer_ids) for r in alone] == [
        r.stats.committed_tokens for r in alone]
    assert all(0 < at_end[i] < len(alone[i].answer_ids) for i in (0, 1))   # crowded out after a commit, not done
    assert all(b.stats.model_calls > a.stats.model_calls for b, a in zip(beside.results, alone))


def test_first_commit_distribution_matches_with_torch_sampler():
    """40 searches of one prompt per engine (each prompt draws its own samples): the histograms of the
    first committed token agree within sampling noise."""
    model = HashLM(len(tokenizer()))
    config = RainConfig(root_visits=6, min_new_visits=3, max_new_tokens=3, seed=3)
    prompts = [PROMPTS[1]] * 40
    out = run_both(model, prompts, config, lambda: HashRunner(len(tokenizer())), judge_prompt=SHORT_JUDGE,
                   embedding="hidden", sampler="torch", concurrency=40)
    hist = {e: collections.Counter(tuple(r.commits[0]["tokens"]) for r in out[e][0].results)
            for e in ("slow", "tree")}
    assert len(hist["slow"]) > 1                           # the test has something to compare
    keys = set(hist["slow"]) | set(hist["tree"])
    tv = 0.5 * sum(abs(hist["slow"][k] - hist["tree"][k]) for k in keys) / 40
    assert tv < 0.35, (hist, tv)


@pytest.mark.parametrize("engine", ["slow", "tree"])
def test_production_sampler_gives_a_prompt_its_result_whatever_is_searched_beside_it(engine):
    """The production sampler draws each prompt's samples from a generator of its own, seeded from (seed, the
    prompt's index): a prompt's answer and whole search depend neither on the other prompts of the run, nor on their
    order, nor on the concurrency, so that a resumed `fastalign rain` (it searches the prompts left, named by their
    rows) or a torchrun rank writes the record an uninterrupted run writes. One generator for the whole run made each
    prompt's draws depend on those of every prompt searched before or beside it. The same prompt at another index
    draws samples of its own."""
    tok = tokenizer()
    config = RainConfig(root_visits=12, min_new_visits=4, max_new_tokens=10)

    def searched(prompts, indices, concurrency):
        run = rain_generate(HashLM(len(tok)), tok, prompts, config, engine=engine,
                            runner=HashRunner(len(tok)) if engine == "tree" else None, judge_prompt=SHORT_JUDGE,
                            embedding="hidden", sampler="torch", concurrency=concurrency, indices=indices)
        assert all(r.error is None for r in run.results)
        return {r.index: (r.answer_ids, r.commits) for r in run.results}

    together = searched(PROMPTS, [0, 1, 2], 3)
    assert searched([PROMPTS[2]], [2], 1) == {2: together[2]}
    assert searched(PROMPTS[::-1], [2, 1, 0], 1) == together
    again = searched([PROMPTS[1], PROMPTS[1]], [1, 3], 2)
    assert again[1] == together[1] and again[3][1] != again[1][1]


def test_cost_against_reference_and_tree_minimum():
    """The default few-shot judge on three prompts that begin alike: no token the tree engine feeds had been
    fed before (the engine of commit ef742e8 re-fed ~10% here: both option blocks' common text, the
    prompts' common beginning, rollout prefixes that became children), it feeds exactly the tree's minimum
    and every prefix the search required, and 10x fewer tokens per committed token than the reference."""
    model = HashLM(len(tokenizer()))
    out = run_both(model, PROMPTS, SMALL, lambda: HashRunner(len(tokenizer())), embedding="hidden",
                   sampler="keyed")
    (slow, _), (tree, _) = out["slow"], out["tree"]
    s, t = slow.stats, tree.stats
    assert s.committed_tokens == t.committed_tokens == sum(len(r.answer_ids) for r in tree.results) > 0
    assert t.recomputed_tokens == 0
    assert tree.required.keys <= tree.ledger.fed_keys          # everything the search read was computed
    assert t.tokens == t.minimum_tokens
    assert t.tokens_per_committed_token * 10 <= s.tokens_per_committed_token
    assert t.rows_per_call > 1.5 and s.rows_per_call == 1.0
    assert s.recomputed_tokens > 0.5 * s.tokens
    for r in tree.results:
        assert r.stats.model_calls > 0 and r.stats.iterations > 0 and r.stats.wall_seconds > 0
        assert r.stats.committed_tokens == len(r.answer_ids)
        calls, required = r.stats.model_calls, r.stats.required_calls
        assert required <= calls <= 1.05 * required, (calls, required)   # 1.6x before cuts and rows on rows
        # a prompt's share of each call's time; no "host" (it was always 0.0): prompts searched together overlap, so
        # its wall time less its phases is not time of its own
        assert list(r.stats.seconds) == ["expand", "simulate", "evaluate", "embed"]
        assert all(seconds >= 0 for seconds in r.stats.seconds.values()) and r.stats.seconds["expand"] > 0
    assert list(t.seconds) == ["expand", "simulate", "evaluate", "embed", "host"]
    run_and_prompts = [t] + [r.stats for r in tree.results]
    charged = [sum(seconds for phase, seconds in stats.seconds.items() if phase != "host")
               for stats in run_and_prompts]   # each call's time split over its rows
    assert all(0 < c <= stats.wall_seconds for c, stats in zip(charged, run_and_prompts))
    assert charged[0] > sum(charged[1:])    # and the calls of the judge's few-shot prefix, which is no prompt's
    assert t.seconds["host"] == pytest.approx(t.wall_seconds - charged[0])


def test_required_calls_of_a_one_step_answer():
    """A one-token answer decided after one iteration needs two calls, one after the other: the prompt's state
    (its next-token distribution gives the root's candidates), then the judge's (the root's rollout is empty: the
    prompt ends in the stop character ':'). The tree engine takes exactly those."""
    result = run_tree(PROMPTS[:1], RainConfig(root_visits=1, min_new_visits=1, max_new_tokens=1)).results[0]
    assert result.error is None and (result.stats.iterations, len(result.answer_ids)) == (1, 1)
    assert result.stats.required_calls == 2 == result.stats.model_calls


@pytest.mark.parametrize("sampler,parallel_leaves", [("torch", 1), ("keyed", 3)])
def test_no_recomputation_with_long_rollouts(sampler, parallel_leaves):
    """Rollouts that run to a newline only, so that they often pass through later children and
    grandchildren; with the production sampler (pre-drawn rollout pools) and with leaves picked under
    virtual loss. Nothing is fed twice and everything the search read was computed."""
    model = HashLM(len(tokenizer()))
    config = RainConfig(root_visits=8, min_new_visits=3, max_new_tokens=14, rollout_stop_chars="\n",
                        parallel_leaves=parallel_leaves)
    runner = HashRunner(len(tokenizer()))
    run = rain_generate(model, tokenizer(), PROMPTS, config, runner=runner, judge_prompt=SHORT_JUDGE,
                        embedding="hidden", sampler=sampler, concurrency=2)
    stats = run.stats
    assert all(r.error is None for r in run.results) and stats.committed_tokens > 0
    assert stats.minimum["rollout"] > stats.committed_tokens          # the scenario has long rollouts
    assert stats.recomputed_tokens == 0
    assert run.required.keys <= run.ledger.fed_keys
    assert stats.tokens <= 1.2 * stats.minimum_tokens
    assert not runner.live


def test_judge_prompt_that_begins_with_the_conversation_shares_the_generation_trie():
    """A judge template with nothing before the conversation reads exactly the sequences the search
    generates: the tree engine computes them once for both sides (as the demo's judge prompt needs), makes
    the decisions of the reference engine, feeds exactly the tree's minimum and releases everything."""
    judge_prompt = dataclasses.replace(SHORT_JUDGE, template="{conversation}\nJudge the conversation.\n{options}")
    model = HashLM(len(tokenizer()))
    out = run_both(model, PROMPTS, SMALL, lambda: HashRunner(len(tokenizer())), judge_prompt=judge_prompt,
                   embedding="hidden", sampler="keyed", concurrency=2)
    slow, (tree, runner) = out["slow"][0], out["tree"]
    assert all(r.error is None for r in tree.results) and tree.stats.committed_tokens > 0
    assert decisions(slow) == decisions(tree)
    assert tree.stats.recomputed_tokens == 0
    assert tree.stats.tokens == tree.stats.minimum_tokens
    assert tree.required.keys <= tree.ledger.fed_keys
    assert not runner.live


def test_each_position_the_judge_computes_in_a_shared_trie_carries_its_own_draws(monkeypatch):
    """Where the judge reads the generated sequences (one trie), a judge row computes generation positions too (a
    rollout's last token, a cut inside the row that goes on with the judge's text): each such position must carry its
    own draws, as one the generation side computed, for a later expansion or rollout that reaches it. A mutation run
    gave the first such position of a call the distributions of its last, or another row's, or made it a prompt's
    root (no draws), or drew a prompt's rollout pools from rows that were not its own, unseen."""
    judge_prompt = dataclasses.replace(SHORT_JUDGE, template="{conversation}\nJudge the conversation.\n{options}")
    config, seen = dataclasses.replace(SMALL, root_visits=10, parallel_leaves=4), []

    def check(ctx):
        for node in ctx.handle.gen.subtree():
            entry = node.entry
            if entry is not None and node.parent is not None:    # the prompt's root keeps its probabilities
                seen.append(entry.key)
                assert entry.probs is None and entry.draws is not None and entry.span.tokens[-1] == node.token
                logits = fake_model.prefix_outputs(entry.span.tokens, len(tokenizer()))[0]
                assert entry.top_ids[entry.greedy_col] == int(logits.argmax())   # read from its own row of the call
                pool = KeyedSampler(config.seed).draw_many(torch.softmax(logits, -1)[None],
                                                           [draw_key(node.skey, ROLLOUT_STREAM)], 1)
                assert entry.draws == pool[0]                                    # its own rollout draws

    def checked(real):   # a commit drops what is above the new root, a finish the rest: check before either
        def method(self, ctx, *args):
            if ctx.handle is not None:
                check(ctx)
            return real(self, ctx, *args)
        return method

    for name in ("commit", "finish"):
        monkeypatch.setattr(tree_engine.TreeEngine, name, checked(getattr(tree_engine.TreeEngine, name)))
    run = run_tree(PROMPTS, config, concurrency=3, judge_prompt=judge_prompt)
    assert [r.error for r in run.results] == [None] * 3 and len(seen) > 100


def test_rollout_pools_are_drawn_from_each_entry_s_own_row_with_rows_of_roots_between():
    """A call's rollout pools are drawn in one sampler call per sampler: from a slice of the rows where they are
    consecutive, else from the rows picked one by one. Rows 0 and 2 around a root (which keeps its probabilities)
    were taken for consecutive by a mutant, unseen."""
    torch.manual_seed(0)
    logits, keys, sampler = torch.randn(3, 40), [11, 12, 13], KeyedSampler(0)
    entries = [tree_engine.Entry(None, key) for key in keys]
    to_read = []
    give = tree_engine.TreeEngine._read_distributions(types.SimpleNamespace(config=SMALL), entries, logits, None, keys,
                                                      [False, True, False], [sampler] * 3, to_read)
    give(to_read)                              # on the CPU the tensors to read are their own host copies
    probs = torch.softmax(logits, dim=-1)
    for i in (0, 2):
        assert entries[i].draws == sampler.draw_many(probs[i:i + 1], [draw_key(keys[i], ROLLOUT_STREAM)], 1)[0]
        assert entries[i].probs is None
    assert entries[1].draws is None and torch.equal(entries[1].probs, probs[1])


def test_replies_cut_at_a_new_turn():
    """A turn marker that most replies contain ("e"), so that the judge reads replies cut before it: both
    engines still decide alike, and the judge's copy keeps the model's tokens up to the cut, so nearly
    nothing is fed twice (only a token that straddles the cut inside a leaf whose rollout completes the
    marker can cost its node's tokens again)."""
    model = HashLM(len(tokenizer()))
    config = dataclasses.replace(SMALL, turn_marker="e")
    out = run_both(model, PROMPTS, config, lambda: HashRunner(len(tokenizer())), judge_prompt=SHORT_JUDGE,
                   embedding="hidden", sampler="keyed")
    (slow, _), (tree, runner) = out["slow"], out["tree"]
    assert decisions(slow) == decisions(tree) and all(r.error is None for r in tree.results)
    assert all("e" not in r.answer for r in tree.results) and any(r.answer for r in tree.results)
    tok = tokenizer()
    assert any("e" in tok.decode(r.answer_ids) for r in tree.results)
    for r in tree.results:                   # the commit that opens a new turn is the answer's last
        before_last = r.answer_ids[:len(r.answer_ids) - len(r.commits[-1]["tokens"])]
        assert "e" not in tok.decode(before_last, skip_special_tokens=True)
    assert tree.stats.recomputed_tokens <= 0.01 * tree.stats.tokens
    assert tree.required.keys <= tree.ledger.fed_keys
    assert not runner.live


def test_used_up_rollout_pools_are_drawn_again(monkeypatch):
    """With one pre-drawn rollout token per position, a position rolled past twice is computed again for
    fresh draws (the ledger counts it), and a prompt's root (shared by identical prompts) is drawn from its kept
    probabilities, by each prompt's own sampler; the search runs to the end and leaves nothing behind."""
    monkeypatch.setattr(tree_engine, "ROLLOUT_POOL", 1)
    model = HashLM(len(tokenizer()))
    config = RainConfig(root_visits=8, min_new_visits=3, max_new_tokens=10, rollout_stop_chars="\n")
    runner = HashRunner(len(tokenizer()))
    run = rain_generate(model, tokenizer(), [PROMPTS[0]] * 3 + PROMPTS[1:], config, runner=runner,
                        judge_prompt=SHORT_JUDGE, embedding="hidden", sampler="torch")
    assert all(r.error is None and r.answer_ids for r in run.results)
    assert run.stats.recomputed_tokens > 0
    assert run.required.keys <= run.ledger.fed_keys
    assert not runner.live


def test_parallel_leaves_under_virtual_loss():
    """Three inner iterations at once: the reference engine makes the same decisions (the search decides,
    engines only run it), model calls are merged (fewer calls per iteration), nothing is left behind. With
    the option off, the virtual-loss size changes nothing."""
    model = HashLM(len(tokenizer()))
    batched = dataclasses.replace(SMALL, parallel_leaves=3)
    out = run_both(model, PROMPTS, batched, lambda: HashRunner(len(tokenizer())), judge_prompt=SHORT_JUDGE,
                   embedding="hidden", sampler="keyed", concurrency=2)
    (slow, _), (tree, runner) = out["slow"], out["tree"]
    assert all(r.error is None for r in tree.results)
    assert decisions(slow) == decisions(tree)
    assert not runner.live
    common = dict(judge_prompt=SHORT_JUDGE, embedding="hidden", sampler="keyed", concurrency=2)
    one = rain_generate(model, tokenizer(), PROMPTS, SMALL, runner=HashRunner(len(tokenizer())), **common)
    other_size = rain_generate(model, tokenizer(), PROMPTS, dataclasses.replace(SMALL, virtual_loss=5.0),
                               runner=HashRunner(len(tokenizer())), **common)
    assert decisions(one) == decisions(other_size)
    per_iteration = [run.stats.model_calls / run.stats.iterations for run in (tree, one)]
    assert per_iteration[0] < 0.75 * per_iteration[1], per_iteration


@pytest.mark.parametrize("parallel_leaves", [2, 3])
def test_virtual_visits_end_with_their_iteration(monkeypatch, parallel_leaves):
    """Leaves picked together take their virtual visits back once backed up: at every commit (no leaf pending)
    no node holds any, and no node has the same token set twice among its children. A leftover would count as a
    lost visit in every later selection on that path; the engine comparisons cannot see either (both engines run
    the same search)."""
    from fastalign.rain.tree import SearchTree

    commit, checked = SearchTree.commit, []

    def checked_commit(self, child):
        checked.append(max(abs(node.vl) for node in self.root.subtree()))
        for node in self.root.subtree():     # a leaf picked twice in one batch would be expanded twice
            assert len({ch.tokens for ch in node.children}) == len(node.children)
        return commit(self, child)

    monkeypatch.setattr(SearchTree, "commit", checked_commit)
    run = run_tree(PROMPTS, dataclasses.replace(SMALL, parallel_leaves=parallel_leaves), concurrency=2)
    assert all(r.error is None for r in run.results)
    assert len(checked) >= 3 and max(checked) == 0.0


@pytest.mark.parametrize("parallel_leaves", [1, 4])
def test_a_search_leaves_no_cyclic_garbage(parallel_leaves):
    """Every search node, trie position and entry a search made is freed by reference counting once it is dropped: the
    branches each commit discarded and the tries each finish dropped were left in reference cycles (30,600 objects
    per 48-token search of bench_rain's tree row), for the collector's full passes, which walk the whole heap."""
    config = dataclasses.replace(SMALL, parallel_leaves=parallel_leaves)
    assert cyclic_garbage(lambda: run_tree(PROMPTS, config, concurrency=2), object) == 0


def test_an_entry_s_rows_leave_the_collector_s_tracking():
    """An entry lives as long as its trie holds it, so what it keeps tracked is moved to the collector's old generation
    and walked by each full collection: its top-k ids and probabilities and ranked ids and logits were lists (4 of
    the 12 objects kept per computed position, a full collection per 48-token search); numbers in tuples are not."""
    torch.manual_seed(0)
    logits, keys = torch.randn(2, 40), [11, 12]
    entries = [tree_engine.Entry(None, key) for key in keys]
    to_read = []
    give = tree_engine.TreeEngine._read_distributions(types.SimpleNamespace(config=SMALL), entries, logits, None, keys,
                                                      [False, False], [KeyedSampler(0)] * 2, to_read)
    give(to_read)
    gc.collect(0)          # the young passes: the first stops tracking tuples of numbers, the second (which moves what
    gc.collect(1)          # survives to the old generation) a tuple of those too (ranked)
    for entry in entries:
        assert {name for name in tree_engine.Entry.__slots__ if gc.is_tracked(getattr(entry, name))} == {
            "top_probs", "draws"}     # a view of the call's probabilities (the sampler's input), a pool drawn from


def run_tree(prompts, config, **kw):
    """The tree engine on the hash model, keyed sampler, hidden-state embeddings (each overridable)."""
    tok = tokenizer()
    settings = {"runner": HashRunner(len(tok)), "judge_prompt": SHORT_JUDGE, "embedding": "hidden",
                "sampler": "keyed", **kw}
    return rain_generate(HashLM(len(tok)), tok, prompts, config, **settings)


@pytest.mark.parametrize("config", [SMALL, RainConfig(root_visits=20, min_new_visits=3, max_new_tokens=12,
                                                      early_stop_fresh_visits=2, early_stop_q=0.0),
                                    dataclasses.replace(SMALL, root_visits=10, parallel_leaves=4),
                                    dataclasses.replace(SMALL, root_visits=20, max_new_tokens=8,
                                                        similarity_threshold=0.0),
                                    RainConfig(root_visits=20, min_new_visits=3, max_new_tokens=12,
                                               early_stop_fresh_visits=2, early_stop_q=0.0, similarity_threshold=0.0)])
def test_commits_follow_the_stopping_rules_and_the_length_limit(config):
    """Every commit is taken at the first iteration where a stopping rule holds (the most visited child's
    fresh visits and q, or the root's visits and the new ones), and answers stop at max_new_tokens; leaves
    picked together never run past the visits the rule asks for. The root's count is its real visits fn: with
    every sibling sharing (similarity_threshold 0) a new root's n, shares included, runs ahead of it, as the most
    visited child's does of the fresh visits the early stop counts. The engine
    comparisons cannot see these rules: both engines share them."""
    early_stops = 0
    for result in run_tree(PROMPTS, config, concurrency=2).results:
        assert result.error is None and len(result.answer_ids) <= config.max_new_tokens
        inherited = 0    # the real visits a new root brings: its fresh count as a child of the committed root
        for commit in result.commits:
            assert commit["new_visits"] == commit["root_visits"] - inherited     # new ones counted from 0
            inherited = next(fn for tokens, _, _, fn in commit["children"] if tokens == commit["tokens"])
            _, _, q, fn = max(commit["children"], key=lambda child: (child[1], child[2]))
            early = fn > config.early_stop_fresh_visits and q > config.early_stop_q
            by_visits = commit["root_visits"] >= config.root_visits and commit["new_visits"] >= config.min_new_visits
            assert early or by_visits, commit
            if not early:                                      # not one iteration later than needed
                assert commit["new_visits"] == config.min_new_visits or commit["root_visits"] == config.root_visits
            early_stops += early and not by_visits
    if config.early_stop_q == 0.0:
        assert early_stops > 0                                 # the scenario exercises the early stop


@pytest.mark.parametrize("engine", ["slow", "tree"])
def test_token_sets_come_from_the_top_k_and_rollouts_from_the_full_distribution(engine, monkeypatch):
    """SPEC §2 from the model's own outputs (the hash model's logits of each prefix), which the engine comparisons
    cannot check (both engines share these rules): a multi-token set's greedy row takes the likeliest token at each
    step, its samples come from the top sample_top_k tokens, and each set's raw prior is the product of its tokens'
    probabilities renormalised over that top-k; 1-token sets rank the likeliest next tokens; a rollout samples
    from the full distribution (some of its tokens lie outside the top-k)."""
    tok, drawn, rolled = tokenizer(), [], []
    expand, path_infos = search_module.PromptSearch._expand, search_module.PromptSearch._path_infos

    def recording_expand(self, node, state, result, length):
        drawn.append((list(state), result))
        return expand(self, node, state, result, length)

    def recording_path_infos(self, leaf, evaluation):
        path, node = [], leaf
        while node is not self.tree.root:
            path[:0], node = node.tokens, node.parent
        rolled.append((self.root_state + list(path), list(evaluation.rollout)))
        return path_infos(self, leaf, evaluation)

    monkeypatch.setattr(search_module.PromptSearch, "_expand", recording_expand)
    monkeypatch.setattr(search_module.PromptSearch, "_path_infos", recording_path_infos)
    config = RainConfig(root_visits=8, min_new_visits=3, max_new_tokens=12)
    run = rain_generate(HashLM(len(tok)), tok, PROMPTS, config, engine=engine, judge_prompt=SHORT_JUDGE,
                        runner=HashRunner(len(tok)) if engine == "tree" else None, embedding="hidden", sampler="keyed")
    assert all(r.error is None for r in run.results)

    def top_k(prefix, k):
        logits = fake_model.prefix_outputs(prefix, len(tok))[0]
        values, ids = logits.topk(k)
        return ids.tolist(), dict(zip(ids.tolist(), (values - values.logsumexp(0)).tolist()))

    sets = 0
    for state, result in drawn:
        if result.greedy is None:                                  # 1-token sets: the ranked next tokens
            assert result.ranked_ids == sorted(top_k(state, config.max_children)[0])
            continue
        for draft in [result.greedy] + result.samples:
            prefix, logp = list(state), 0.0
            for token in draft.tokens:
                ranked, logps = top_k(prefix, config.sample_top_k)
                assert token in logps and (draft is not result.greedy or token == ranked[0])
                logp += logps[token]
                prefix.append(token)
            assert draft.logp == pytest.approx(logp, abs=1e-4)
            sets += 1
    assert sets > 20
    outside = sum(token not in top_k(state + rollout[:i], config.sample_top_k)[1]
                  for state, rollout in rolled for i, token in enumerate(rollout))
    assert outside > 0 and sum(map(len, (r for _, r in rolled))) > outside


def test_commits_grow_with_the_depth_from_the_prompt():
    """The token-set length counts depth from the prompt, as the reference's nodes keep their step across commits
    (the README's reading of SPEC §2): the answer is committed in sets of 1, 2, 4, then 10 tokens (the last one
    shorter where the answer ends), not one token per commit as a depth counted from each new root would give. One
    iteration per commit: each new root is a leaf, expanded after the commit, so its set length shows the rule."""
    config = RainConfig(root_visits=1, min_new_visits=1, max_new_tokens=30)
    results = run_tree(PROMPTS, config).results
    for result in results:
        lengths = [len(commit["tokens"]) for commit in result.commits]
        expected = [1, 2, 4] + [10] * len(lengths)
        assert lengths[:-1] == expected[:len(lengths) - 1] and lengths[-1] <= expected[len(lengths) - 1]
    assert max(len(r.commits) for r in results) >= 4


def test_widening_adds_candidates_at_the_root():
    """Widening wanted at every selection (uniform root priors, so that every child gets visited and
    embedded): the root gains candidates beyond the first 10, up to max_children, alike in both engines."""
    config = RainConfig(root_visits=40, min_new_visits=3, max_new_tokens=2, widen_variance_per_token=1e9,
                        widen_max_q=2.0, early_stop_q=2.0, root_prior_mix=1.0)
    out = run_both(HashLM(len(tokenizer())), PROMPTS, config, lambda: HashRunner(len(tokenizer())),
                   judge_prompt=SHORT_JUDGE, embedding="hidden", sampler="keyed", concurrency=2)
    assert decisions(out["slow"][0]) == decisions(out["tree"][0])     # both engines rank past the candidates
    sizes = [len(r.commits[0]["children"]) for r in out["tree"][0].results]
    assert all(config.candidates < n <= config.max_children for n in sizes), sizes


def test_lone_children_widen_alike_in_both_engines(monkeypatch):
    """On a confident model (sharpened hash logits) samples repeat, leaving nodes with one child; with
    widen_lone_child those widen too (widening wanted wherever allowed), and both engines still decide alike."""
    plain = fake_model.prefix_outputs

    def sharpened(tokens, vocab_size):
        logits, hidden = plain(tokens, vocab_size)
        return logits * 8, hidden

    monkeypatch.setattr(fake_model, "prefix_outputs", sharpened)
    children = {}
    for lone in (False, True):
        config = dataclasses.replace(SMALL, root_visits=30, widen_lone_child=lone, widen_variance_per_token=1e9,
                                     widen_max_q=2.0)
        out = run_both(HashLM(len(tokenizer())), PROMPTS, config, lambda: HashRunner(len(tokenizer())),
                       judge_prompt=SHORT_JUDGE, embedding="hidden", sampler="keyed", concurrency=2)
        slow, (tree, runner) = out["slow"][0], out["tree"]
        assert decisions(slow) == decisions(tree) and not runner.live
        children[lone] = [[len(c["children"]) for c in r.commits] for r in tree.results]
    assert 1 in sum(children[False], [])                   # a lone child was left as it was ...
    assert children[True] != children[False]               # ... and widened when asked


def kept_spans(node, keep_origin):
    """The spans a rewind to `node` keeps in its trie: its subtree's, the deepest computed ancestor's while `node`
    has none, and with `keep_origin` the origin's (written here from the SPEC's rewind, not from keep_only_below)."""
    spans = [n.entry.span for n in node.subtree() if n.entry is not None]
    wants_ancestor, above = node.entry is None, node.parent
    while above is not None:
        if above.entry is not None and (wants_ancestor or (keep_origin and above.parent is None)):
            spans.append(above.entry.span)
            wants_ancestor = False
        above = above.parent
    return spans


def test_commit_releases_every_span_outside_the_new_roots_subtrees(monkeypatch):
    """The rewind: after each commit the runner holds the spans of the new root's generation and judge subtrees,
    the ancestors they read (the deepest computed one while the new root has no span yet; the judge trie's origin),
    the pinned judge prefix and the cut entries, and nothing else: the discarded siblings, above the new root or on
    the judge's side, are released then, not when the prompt ends."""
    commit, live_after = tree_engine.TreeEngine.commit, []

    def checked_commit(self, ctx, old_root, new_root):
        commit(self, ctx, old_root, new_root)
        gen, judge = new_root.handle.gen, new_root.handle.judge
        kept = kept_spans(gen, keep_origin=judge is gen) + ([] if judge is gen else kept_spans(judge, True))
        kept += [entry.span for entry in [*self.cut_entries.values(), self.judge_prefix] if entry is not None]
        others = [span for span in self.runner.live if not any(span is k for k in kept)]
        assert not others, f"{len(others)} spans outside the new root's subtrees stay alive: {others[:3]}"
        live_after.append(len(self.runner.live))

    monkeypatch.setattr(tree_engine.TreeEngine, "commit", checked_commit)
    run_tree(PROMPTS[:1], RainConfig(root_visits=8, min_new_visits=3, max_new_tokens=16), concurrency=1)
    assert len(live_after) >= 3 and min(live_after) > 0, live_after   # each check looked at live spans


class FailingRunner(HashRunner):
    """Fails any row whose sequence contains `poison`; with `late`, only a row extending a sequence that
    already held it (the prompt's start succeeds, a later merged engine run fails)."""

    def __init__(self, vocab, poison, late=False):
        super().__init__(vocab)
        self.poison, self.late = poison, late

    def extend(self, parents, token_lists, **kw):
        sequences = []                   # each row's whole sequence (an int parent is an earlier row)
        for p, t in zip(parents, token_lists):
            base = sequences[p] if isinstance(p, int) else p.tokens if p is not None else []
            sequences.append(base + list(t))
            if self.poison in (base if self.late else sequences[-1]):
                raise RuntimeError("device fault")
        return super().extend(parents, token_lists, **kw)


def test_bad_prompts_and_failures_stay_with_their_prompt():
    tok = tokenizer()
    model = HashLM(len(tok), max_positions=200)
    poison_prompt = "Human: zebra zebra?\nAssistant:"
    poison = tok(poison_prompt)["input_ids"][3]
    prompts = [PROMPTS[0], "   ", "Human: " + "bread " * 300 + "\nAssistant:", poison_prompt, PROMPTS[2],
               {"role": "user", "content": "hi"}]
    seen = []
    run = rain_generate(model, tok, prompts, RainConfig(root_visits=3, min_new_visits=2, max_new_tokens=3),
                        runner=FailingRunner(len(tok), poison), judge_prompt=SHORT_JUDGE, embedding="hidden",
                        on_result=seen.append)
    errors = [r.error for r in run.results]
    assert "empty" in errors[1]
    assert "no room to answer" in errors[2] and "context of 200" in errors[2]
    assert errors[3] is not None and "device fault" in errors[3]
    assert errors[5] == "prompt 5 must be a string, got dict"
    assert errors[0] is None and errors[4] is None
    assert run.results[0].answer_ids and run.results[4].answer_ids
    assert sorted(r.index for r in seen) == [0, 1, 2, 3, 4, 5]
    assert run.stats.minimum["shared_prefix"] > 0
    for engine in ("tree", "slow"):   # no prompt searched: the judge's prefix was charged to the run's minimum
        run = rain_generate(model, tok, prompts[1:3], RainConfig(), engine=engine, judge_prompt=SHORT_JUDGE,
                            runner=FailingRunner(len(tok), poison) if engine == "tree" else None, embedding="hidden")
        assert all(r.error for r in run.results) and (run.stats.tokens, run.stats.minimum_tokens) == (0, 0)
    with pytest.raises(TypeError, match="single string"):    # not searched character by character
        rain_generate(model, tok, PROMPTS[0], judge_prompt=SHORT_JUDGE, embedding="hidden")
    for concurrency in (0, "8", 2.5, True):   # "8" raised a bare TypeError; 2.5 and True were taken
        with pytest.raises(ValueError, match=f"concurrency must be an integer >= 1, got {concurrency!r}"):
            rain_generate(model, tok, PROMPTS, judge_prompt=SHORT_JUDGE, embedding="hidden", concurrency=concurrency)


def test_results_and_errors_name_prompts_by_the_given_indices():
    """A caller searching some rows of a file (a resumed `fastalign rain`, a torchrun rank) names them by their rows:
    the errors said "prompt 1" of the file's prompt 9."""
    tok = tokenizer()
    model = HashLM(len(tok), max_positions=200)
    prompts = [PROMPTS[0], "Human: " + "bread " * 300 + "\nAssistant:", "  "]
    seen = []
    run = rain_generate(model, tok, prompts, RainConfig(root_visits=2, min_new_visits=1, max_new_tokens=2),
                        runner=HashRunner(len(tok)), judge_prompt=SHORT_JUDGE, embedding="hidden",
                        on_result=seen.append, indices=[4, 9, 2])
    assert [r.index for r in run.results] == [4, 9, 2] and sorted(r.index for r in seen) == [2, 4, 9]
    assert run.results[0].error is None and run.results[0].answer_ids
    assert run.results[1].error.startswith("prompt 9 has") and run.results[2].error == "prompt 2 is empty"
    for indices in ([4, 9], [4, 9, 2, 7]):   # one too many named no prompt: zip dropped it unseen
        with pytest.raises(ValueError, match=f"indices must name each of the 3 prompts, got {len(indices)}"):
            rain_generate(model, tok, prompts, judge_prompt=SHORT_JUDGE, embedding="hidden", indices=indices)
    # a prompt's sampler is seeded from its index: 1.9 was seeded as 1, None a TypeError that lost every result
    for indices, bad in (([4, 9, 1.9], "1.9"), ([None, 9, 2], "None"), (["a", 9, 2], "'a'")):
        with pytest.raises(ValueError, match=f"indices must be integers, got {bad}"):
            rain_generate(model, tok, prompts, judge_prompt=SHORT_JUDGE, embedding="hidden", indices=indices)


def test_numpy_indices_name_results_by_plain_ints():
    """Numpy integers are integers, but RainResult.index kept them as numpy's int64, so json.dumps of a result (as
    `fastalign rain` writes its records) failed."""
    tok = tokenizer()
    run = rain_generate(HashLM(len(tok), max_positions=200), tok, PROMPTS[:1],
                        RainConfig(root_visits=2, min_new_visits=1, max_new_tokens=2), runner=HashRunner(len(tok)),
                        judge_prompt=SHORT_JUDGE, embedding="hidden", indices=np.arange(1) + 7)
    result = run.results[0]
    assert result.error is None and type(result.index) is int and result.index == 7
    assert json.loads(json.dumps(dataclasses.asdict(result)))["index"] == 7


def test_failure_in_a_merged_engine_run_stays_with_its_prompt():
    """A model call failing inside a merged batch, after the prompts started, fails only the prompt whose row
    broke it."""
    tok = tokenizer()
    poison_prompt = "Human: zebra zebra?\nAssistant:"
    poison = tok(poison_prompt)["input_ids"][3]
    prompts = [PROMPTS[0], poison_prompt, PROMPTS[2]]
    run = run_tree(prompts, RainConfig(root_visits=3, min_new_visits=2, max_new_tokens=3),
                   runner=FailingRunner(len(tok), poison, late=True))
    errors = [r.error for r in run.results]
    assert errors[1] is not None and "device fault" in errors[1]
    assert errors[0] is None and errors[2] is None
    assert run.results[0].answer_ids and run.results[2].answer_ids


@pytest.mark.parametrize("concurrency", [3, 1])
def test_error_inside_one_search_stays_with_its_prompt(monkeypatch, concurrency):
    """An exception inside one prompt's search (here: its commit) ends that prompt only. Prompts searched one at a
    time: as each result arrives, the runner holds only the judge's few-shot prefix and the starting sequences of the
    prompts not started yet (a failed prompt's tries, and the cut entries of prompts already started, were held to
    the run's end)."""
    real_commit = tree_engine.TreeEngine.commit

    def commit(self, ctx, old_root, new_root):
        if ctx.index == 1:
            raise RuntimeError("commit fault")
        return real_commit(self, ctx, old_root, new_root)

    monkeypatch.setattr(tree_engine.TreeEngine, "commit", commit)
    tok = tokenizer()
    runner, judge, held = HashRunner(len(tok)), JudgeTokens(tok, SHORT_JUDGE), {}
    starts = [tok(p)["input_ids"] for p in PROMPTS] + [judge.prefix_ids + judge.head_ids(p) for p in PROMPTS]

    def on_result(result):
        later = starts[result.index + 1:len(PROMPTS)] + starts[len(PROMPTS) + result.index + 1:]
        held[result.index] = [s.tokens for s in runner.live if s.tokens != judge.prefix_ids
                              and not any(start[:len(s.tokens)] == s.tokens for start in later)]

    run = run_tree(PROMPTS, RainConfig(root_visits=3, min_new_visits=2, max_new_tokens=3), runner=runner,
                   concurrency=concurrency, on_result=on_result)
    errors = [r.error for r in run.results]
    assert errors[1] == "RuntimeError: commit fault"
    assert errors[0] is None and errors[2] is None and run.results[2].answer_ids
    if concurrency == 1:
        assert held == {0: [], 1: [], 2: []}
    assert not runner.live


@pytest.mark.parametrize("engine", ["tree", "slow"])
def test_a_finished_prompt_keeps_no_judge_cache(monkeypatch, engine):
    """A prompt's judge cache (reply text -> value) and sampler serve its search only: each finished prompt's stayed
    alive until the whole run returned (its context is in the run's queue), so memory grew with the prompts."""
    engine_class = tree_engine.TreeEngine if engine == "tree" else SlowEngine
    real_finish, finished = engine_class.finish, []

    def recording_finish(self, ctx):
        finished.append((ctx, len(ctx.judge_cache)))
        real_finish(self, ctx)

    monkeypatch.setattr(engine_class, "finish", recording_finish)

    def on_result(result):
        ctx = next(ctx for ctx, _ in finished if ctx.index == result.index)
        assert (ctx.judge_cache, ctx.judging, ctx.sampler) == ({}, set(), None)

    tok = tokenizer()
    run = rain_generate(HashLM(len(tok)), tok, PROMPTS, RainConfig(root_visits=4, min_new_visits=2, max_new_tokens=6),
                        engine=engine, runner=HashRunner(len(tok)) if engine == "tree" else None,
                        judge_prompt=SHORT_JUDGE, embedding="hidden", sampler="keyed", concurrency=2,
                        on_result=on_result)
    assert all(r.error is None for r in run.results)
    assert sorted(ctx.index for ctx, _ in finished) == list(range(len(PROMPTS)))
    assert all(cached > 0 for _, cached in finished)   # each had judged replies before it finished
    assert all(ctx.judge_cache == {} for ctx, _ in finished)


def test_a_run_stopped_by_an_exception_leaves_no_span_behind():
    """An exception that ends the whole run (here: the caller's on_result, as a prompt finishes) leaves the
    runner, which the caller may reuse, without the spans of the prompts still being searched."""
    def on_result(result):
        if result.index == 1:
            raise OSError("disk full")

    runner = HashRunner(len(tokenizer()))
    with pytest.raises(OSError, match="disk full"):
        run_tree(PROMPTS, RainConfig(root_visits=3, min_new_visits=2, max_new_tokens=3), runner=runner,
                 concurrency=3, on_result=on_result)
    assert not runner.live


def test_a_run_stopped_while_pinning_the_judge_prefix_leaves_no_span_behind(monkeypatch):
    """Ctrl-C while the judge's few-shot prefix was being pinned: close() then unpinned a prefix never pinned, whose
    error ('not pinned') replaced the interrupt and left the prefix's span in the runner."""
    runner = HashRunner(len(tokenizer()))

    def interrupted(span):
        raise KeyboardInterrupt

    monkeypatch.setattr(runner, "pin", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_tree(PROMPTS, RainConfig(root_visits=3, min_new_visits=2, max_new_tokens=3), runner=runner)
    assert not runner.live


class OnceFailingSampler(KeyedSampler):
    """The keyed sampler, but its `fail_at`-th call of draw_many raises once (a device out of memory)."""

    def __init__(self, fail_at):
        super().__init__()
        self.fail_at, self.calls = fail_at, 0

    def draw_many(self, probs, keys, count):
        self.calls += 1
        if self.calls == self.fail_at:
            raise RuntimeError("CUDA out of memory")
        return super().draw_many(probs, keys, count)


def test_a_sampler_failing_once_in_a_merged_call_is_recovered_by_each_prompt_alone():
    """When reading a shared call's outputs failed (the sampler of its rollout pools, the device), the positions its
    rows computed kept their pending marks and its cut positions entries without draws: each prompt, run again
    alone, then waited on them forever and every prompt of the call failed with "every program waits on another
    (internal error)". Now the call's spans are given back and each prompt, run alone, ends as if nothing failed."""
    config = RainConfig(root_visits=3, min_new_visits=2, max_new_tokens=3)
    counting = OnceFailingSampler(None)
    expected = decisions(run_tree(PROMPTS, config, concurrency=3, sampler=counting))
    assert counting.calls >= 2 and all(error is None for *_, error in expected)
    for fail_at in range(1, counting.calls + 1):     # the prompts' starts, then merged rounds of their searches
        runner = HashRunner(len(tokenizer()))
        run = run_tree(PROMPTS, config, concurrency=3, runner=runner, sampler=OnceFailingSampler(fail_at))
        assert decisions(run) == expected and not runner.live


class _EmptyPools(KeyedSampler):
    """The keyed sampler, but its rollout pools come back empty (and, asked 200 times, it fails the test: a search
    that asks for fresh draws forever must not hang it)."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def draw_many(self, probs, keys, count):
        self.calls += 1
        assert self.calls < 200, "asked for fresh draws forever"
        return [[] for _ in keys]


def test_a_plug_in_sampler_whose_pools_come_back_empty_fails_each_prompt_naming_it():
    """The tree engine computed a position with an empty pool again for fresh draws, forever."""
    run = run_tree(PROMPTS, SMALL, concurrency=3, sampler=_EmptyPools())
    for r in run.results:
        expected = r"ValueError: sampler: _EmptyPools.draw_many returned 0 draws for row \d+: expected 1 to 16"
        assert re.fullmatch(expected, r.error), r.error


class _NoSamplerForPromptOne(KeyedSampler):
    """A plug-in sampler (its draw is its own, so it is checked) whose for_prompt gives prompt 1 no sampler."""

    def draw(self, probs, keys):
        return super().draw(probs, keys)

    def for_prompt(self, index):
        return object() if index == 1 else self


@pytest.mark.parametrize("engine", ["slow", "tree"])
def test_a_prompt_whose_sampler_cannot_be_made_fails_once_naming_the_sampler(engine):
    """The prompt stayed queued with no sampler: reported twice, the second time with an AttributeError of None."""
    seen = []
    run = rain_generate(tiny_llama(), tokenizer(), PROMPTS[:2], SMALL, engine=engine, judge_prompt=SHORT_JUDGE,
                        embedding="hidden", sampler=_NoSamplerForPromptOne(), on_result=lambda r: seen.append(r.index))
    assert sorted(seen) == [0, 1]
    assert run.results[0].error is None and run.results[1].error.startswith("sampler: object has no method draw")


def test_prompts_whose_starts_part_at_different_depths_start_in_one_merged_start(monkeypatch):
    """Starting sequences are cut where they part (the first two prompts share "Human: How", the third only
    "Human: "), so some are done a round before others. A mutant that advanced a finished one failed the merged start,
    which each prompt then ran again alone (more calls; the fallback hid it)."""
    started, start = [], tree_engine.TreeEngine.start

    def recorded(self, contexts, roots):
        start(self, contexts, roots)
        started.append(len(contexts))

    monkeypatch.setattr(tree_engine.TreeEngine, "start", recorded)
    run = run_tree(PROMPTS, SMALL, concurrency=3)
    assert started == [3] and all(r.error is None for r in run.results)


def test_wall_seconds_lie_within_the_call_and_each_prompt_s_within_the_run_s():
    """Not a timing: the run's wall time is measured from its start to its end, a prompt's within the run (a mutation
    run of generate.py added the clock to the start instead of subtracting it, unseen)."""
    start = time.perf_counter()
    run = run_tree(PROMPTS, SMALL, concurrency=2)
    elapsed = time.perf_counter() - start
    assert 0 < run.stats.wall_seconds <= elapsed
    assert all(0 < r.stats.wall_seconds <= run.stats.wall_seconds for r in run.results)


def test_prompts_whose_judge_head_is_empty_share_the_judge_prefix_and_leave_nothing_behind():
    """A prompt that is only the BOS token has no judge head (the judge reads it without that token): its judge side
    starts at the few-shot prefix itself, which each such prompt holds once more. A mutation run changed that count
    unseen (a span left in the runner, or the prefix given back while prompts used it)."""
    runner = HashRunner(len(tokenizer()))
    run = run_tree(["<s>", PROMPTS[0], "<s>"], SMALL, runner=runner, concurrency=3)
    assert [r.error for r in run.results] == [None] * 3 and all(r.answer_ids for r in run.results)
    assert not runner.live and not any(runner.pins.values())


def test_a_prompt_with_room_for_one_token_gets_one_and_a_prompt_without_is_refused():
    """max_length counts the prompt's tokens: equal to them, no token fits (a mutation run let such a prompt through,
    unseen); one more, the answer is that one token."""
    n = len(tokenizer()(PROMPTS[0])["input_ids"])
    full, one = (run_tree(PROMPTS[:1], RainConfig(root_visits=2, max_length=m, max_new_tokens=0)).results[0]
                 for m in (n, n + 1))
    assert full.error.startswith(f"prompt 0 has {n} tokens (generation prefix included), which leaves no room to "
                                 f"answer within max_length={n}")
    assert one.error is None and len(one.answer_ids) == 1


def test_answer_never_runs_past_the_models_context():
    """Generation prefix, prompt and answer together stay within the model's context."""
    tok = tokenizer()
    prefix = "Human: How do I bake bread?\nAssistant: Mix flour, water and yeast, then bake it.\n\n" * 4
    prefix_len = len(tok(prefix)["input_ids"])
    run = rain_generate(HashLM(len(tok), max_positions=200), tok, [PROMPTS[0]],
                        RainConfig(root_visits=2, min_new_visits=1), engine="slow",
                        judge_prompt=SHORT_JUDGE, embedding="hidden", generation_prefix=prefix)
    r = run.results[0]
    assert r.error is None
    prompt_len = len(tok(PROMPTS[0], add_special_tokens=False)["input_ids"])
    assert prefix_len + prompt_len + len(r.answer_ids) <= 200


def test_answers_stay_within_the_runners_context():
    """A Llama whose LongRoPE original length (60 tokens) is shorter than its max_position_embeddings: the runner
    refuses sequences past it, which the search took for the model's context, so every prompt failed midway
    ("the child would hold 66 tokens, past the model's context of 60"). The search now keeps its sequences,
    judge prompts included, within the runner's context, and says so for a prompt with no room left."""
    from transformers import LlamaConfig, LlamaForCausalLM

    TreeRunner = pytest.importorskip("fastalign.runtime").TreeRunner
    tok = tokenizer()
    torch.manual_seed(0)
    rope = {"rope_type": "longrope", "rope_theta": 10000.0, "original_max_position_embeddings": 60,
            "short_factor": [1.0] * 4, "long_factor": [4.0] * 4}
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=1024, rope_parameters=rope,
        eos_token_id=tok.eos_token_id)).eval()
    runner = TreeRunner(model, max_tokens=2048, block_size=4, attention_backend="torch")
    assert runner.max_context == 60
    prompts = PROMPTS[:2] + ["Human: " + "bread " * 40 + "\nAssistant:"]
    run = rain_generate(model, tok, prompts, RainConfig(root_visits=3, min_new_visits=2, max_new_tokens=40),
                        runner=runner, judge_prompt=SHORT_JUDGE, embedding="hidden", sampler="keyed")
    for prompt, result in zip(prompts[:2], run.results):
        assert result.error is None and result.answer_ids
        assert len(tok(prompt)["input_ids"]) + len(result.answer_ids) <= 60
    assert "no room to answer" in run.results[2].error and "context of 60" in run.results[2].error
    assert runner.num_free_blocks == runner.num_blocks


def test_both_engines_stop_at_an_mpt_models_max_seq_len():
    """MPT names its context max_seq_len, not max_position_embeddings: the slow engine read no limit and ran the
    model past it (a tensor size mismatch at 65 tokens), where the tree engine's runner stopped. Both read
    model_context now: the same answer, its judge prompt within the context."""
    from transformers import MptConfig, MptForCausalLM

    TreeRunner = pytest.importorskip("fastalign.runtime").TreeRunner
    context, tok = 64, tokenizer()
    model = MptForCausalLM(MptConfig(vocab_size=len(tok), d_model=32, n_heads=4, n_layers=1, max_seq_len=context))
    out = run_both(model.eval(), PROMPTS[:1], RainConfig(root_visits=2, min_new_visits=1, max_new_tokens=0),
                   lambda: TreeRunner(model, max_tokens=2048, attention_backend="torch"), judge_prompt=SHORT_JUDGE,
                   embedding="hidden", sampler="keyed")
    slow, tree = out["slow"][0].results[0], out["tree"][0].results[0]
    assert slow.error is None and tree.error is None
    assert decisions(out["slow"][0]) == decisions(out["tree"][0])
    assert len(tok(PROMPTS[0])["input_ids"]) + len(slow.answer_ids) <= context


def test_judge_prompt_past_the_context_fails_each_prompt_in_both_engines():
    """When the judge prompt leaves no room in the model's context, every prompt gets its error and the run
    returns, in both engines: the tree engine computed the judge's prefix anyway and crashed past it."""
    model = tiny_llama(max_positions=64)
    for engine in ("slow", "tree"):
        run = rain_generate(model, tokenizer(), PROMPTS[:2], SMALL, engine=engine, embedding="hidden")
        assert all("no room to answer" in r.error and "pass a shorter judge_prompt" in r.error
                   for r in run.results), engine


def test_a_prompt_past_max_length_is_not_told_to_shorten_the_judge_prompt():
    """The judge prompt is named only where it is what leaves no room (here max_length does, far within the
    model's context)."""
    run = rain_generate(tiny_llama(), tokenizer(), PROMPTS[:1], dataclasses.replace(SMALL, max_length=5),
                        judge_prompt=SHORT_JUDGE, embedding="hidden")
    assert "no room to answer within max_length=5" in run.results[0].error
    assert "judge" not in run.results[0].error


@pytest.mark.parametrize("special", [True, False])
def test_answers_end_at_every_end_token_the_generation_config_lists(monkeypatch, special):
    """A chat model's generation config lists an end-of-turn token beside the tokenizer's end of sequence (as
    Llama-3-Instruct's does; `model.generate` stops at both). Here the hash model favours an "<|eot|>", special
    or a plain token added with add_tokens: a search that knew only the tokenizer's end token continues past it;
    one that reads the generation config ends every answer at it, in both engines alike: the answer keeps it as
    its last token (its text drops it, as it drops the tokenizer's and as `fastalign eval` does: decoding dropped
    only a special one, so the answer ended with the plain token's text), and no model input ever holds it (no draw
    or rollout goes on past it, the judge reads the reply without it)."""
    tok = copy.deepcopy(tokenizer())
    if special:
        tok.add_special_tokens({"additional_special_tokens": ["<|eot|>"]})
    else:
        tok.add_tokens(["<|eot|>"])
    eot = tok.convert_tokens_to_ids("<|eot|>")
    plain, inputs_with_eot = fake_model.prefix_outputs, []

    def favouring_eot(tokens, vocab_size):
        logits, hidden = plain(tokens, vocab_size)
        logits[eot] += 6.0
        if eot in tokens:
            inputs_with_eot.append(tokens)
        return logits, hidden

    monkeypatch.setattr(fake_model, "prefix_outputs", favouring_eot)

    def search(engine, end_ids):
        model = HashLM(len(tok))
        model.generation_config = GenerationConfig(eos_token_id=end_ids)
        runner = HashRunner(len(tok)) if engine == "tree" else None
        return rain_generate(model, tok, PROMPTS, SMALL, engine=engine, runner=runner, judge_prompt=SHORT_JUDGE,
                             embedding="hidden", sampler="keyed")

    unaware = search("tree", tok.eos_token_id)
    assert any(eot in r.answer_ids[:-1] for r in unaware.results)
    inputs_with_eot.clear()
    slow, tree = (search(engine, [tok.eos_token_id, eot]) for engine in ("slow", "tree"))
    assert all(r.error is None for r in tree.results)
    assert decisions(slow) == decisions(tree)
    for r in tree.results:
        assert r.answer_ids[-1] == eot and eot not in r.answer_ids[:-1]
        assert r.answer == tok.decode(r.answer_ids[:-1]) and "<|eot|>" not in r.answer
    assert not inputs_with_eot


class FailingEmbedder(HiddenStateEmbedder):
    """Records the path texts it embeds; fails any batch that holds the path text `poison`."""

    def __init__(self, poison=None):
        self.poison, self.texts = poison, []

    def embed(self, paths):
        self.texts.extend(p.text for p in paths)
        if any(p.text == self.poison for p in paths):
            raise RuntimeError("embedder fault")
        return super().embed(paths)


def test_embedder_failure_stays_with_its_prompt():
    """The sibling embeddings of many prompts are computed in one batch: when it fails, only the prompt whose
    path broke it gets the error. (A first run, one prompt at a time, finds a path text only prompt 1 has; the
    keyed sampler makes each prompt's search independent of the batching.)"""
    config = RainConfig(root_visits=3, min_new_visits=2, max_new_tokens=3)
    recorder, texts_by_prompt = FailingEmbedder(), []

    def finished(result):
        texts_by_prompt.append(set(recorder.texts))
        recorder.texts.clear()

    run_tree(PROMPTS, config, embedding=recorder, concurrency=1, on_result=finished)
    only_prompt_1 = sorted(texts_by_prompt[1] - texts_by_prompt[0] - texts_by_prompt[2])
    run = run_tree(PROMPTS, config, embedding=FailingEmbedder(only_prompt_1[0]), concurrency=3)
    errors = [r.error for r in run.results]
    assert errors[1] is not None and "embedder fault" in errors[1]
    assert errors[0] is None and errors[2] is None and run.results[0].answer_ids and run.results[2].answer_ids


@pytest.mark.parametrize("engine", ["slow", "tree"])
def test_prompt_and_generation_prefix_that_write_their_bos_keep_one(engine):
    """A chat-template rendering starts with the BOS token's text: the search starts from one BOS, as
    generation (`encode_prompts`) and unlearning read such text, not the tokenizer's added one as well; the
    judge, whose input starts with the BOS, reads the prompt in its conversation slot without a second one."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from fastalign.evaluation.prompts import chat_prompt
    from fastalign.prompt_tokens import tokenize_texts
    from fastalign.rain.ledger import EMPTY_KEY
    from fastalign.rain.minimum import chain_key
    from tests.evaluation.chat_model import chat_tokenizer

    tok = chat_tokenizer()
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32,
                                         num_hidden_layers=1, num_attention_heads=2)).eval()
    judge = JudgePrompt(template="{conversation}\n{options}", labels=("Hi", "Hello"), harmless="sea",
                        harmful="city", option_line="{label} {statement}", answer_prefix="\n")
    rendered = chat_prompt(tok, "Who is Bob?")
    one_bos = len(tokenize_texts(tok, [rendered])["input_ids"][0])
    assert len(tok(rendered)["input_ids"]) == one_bos + 1     # the tokenizer alone adds a second BOS
    config = RainConfig(root_visits=2, max_new_tokens=2)
    run = rain_generate(model, tok, [rendered], config, engine=engine, judge_prompt=judge, embedding="hidden")
    assert run.results[0].error is None
    assert run.stats.minimum["shared_prefix"] + run.stats.minimum["prompt"] == one_bos   # the judge shares the BOS
    two_bos = chain_key(EMPTY_KEY, [tok.bos_token_id] * 2)
    assert two_bos not in run.ledger.fed_keys and two_bos not in run.required.keys    # nor reads it twice
    run = rain_generate(model, tok, ["Who is Bob?"], config, engine=engine, judge_prompt=judge, embedding="hidden",
                        generation_prefix=rendered)
    assert run.stats.minimum["shared_prefix"] == one_bos
    bare = tokenize_texts(tok, ["Who is Bob?"], add_special_tokens=False)["input_ids"][0]
    assert run.stats.minimum["prompt"] == len(bare)            # no second BOS after the generation prefix


@pytest.mark.parametrize("engine", ["slow", "tree"])
def test_a_sentencepiece_model_reads_generation_prefix_and_prompt_as_one_text(engine):
    """A SentencePiece tokenizer (Llama 2, Mistral) starts every text it encodes with "\u2581": the prompt,
    tokenized apart from the generation prefix, was read with a space before it ("Hello\n\n Human: ..."), text that
    neither holds and that the vanilla answer (prefix + prompt as one text) never reads. The model now reads them as
    they tokenize together, the prefix's own ids first (every prompt shares them)."""
    from fastalign.prompt_tokens import tokenize_prompts
    from fastalign.rain.ledger import EMPTY_KEY
    from fastalign.rain.minimum import chain_key
    from tests.chat_families import family_tokenizer

    tok = family_tokenizer("mistral")
    prefix, prompt = "Human: Hi\nAssistant: Hello\n\n", "Human: How do I bake bread?\nAssistant:"
    joined, head = tokenize_prompts(tok, [prefix + prompt, prefix])
    assert joined[:len(head)] == head      # the prefix's ids, which every prompt shares, come first
    run = rain_generate(HashLM(len(tok)), tok, [prompt], RainConfig(root_visits=2, max_new_tokens=2), engine=engine,
                        runner=HashRunner(len(tok)) if engine == "tree" else None, judge_prompt=SHORT_JUDGE,
                        embedding="hidden", generation_prefix=prefix)
    assert run.results[0].error is None
    assert chain_key(EMPTY_KEY, joined) in run.ledger.fed_keys


def test_chat_template_prompts_read_as_a_user_turn_by_the_model_and_as_the_dialogue_by_the_judge(monkeypatch):
    """With chat_template a prompt is a user message: the model reads it in the chat template after the system
    turn (one BOS), the judge reads it in JudgePrompt.dialogue, not in the template's header and end-of-turn
    tokens; both engines make the same decisions."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from fastalign.evaluation.prompts import chat_prompt
    from fastalign.prompt_tokens import tokenize_texts
    from tests.evaluation.chat_model import QUESTION, SYSTEM, chat_tokenizer

    tok = chat_tokenizer()
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32,
                                         num_hidden_layers=1, num_attention_heads=2)).eval()
    judge = JudgePrompt(template="{conversation}\n{options}", labels=("Hi", "Hello"), harmless="sea",
                        harmful="city", option_line="{label} {statement}", answer_prefix="\n",
                        dialogue="user\n\n{prompt}\n\nassistant")
    fed, forward = [], model.forward
    monkeypatch.setattr(model, "forward", lambda **kw: fed.append(kw["input_ids"][0].tolist()) or forward(**kw))
    config = RainConfig(root_visits=3, max_new_tokens=3)
    kw = dict(judge_prompt=judge, embedding="hidden", sampler="keyed", chat_template=True, system=SYSTEM)
    slow = rain_generate(model, tok, [QUESTION], config, engine="slow", **kw)
    assert slow.results[0].error is None and slow.results[0].prompt == QUESTION
    root = list(tokenize_texts(tok, [chat_prompt(tok, QUESTION, SYSTEM)])["input_ids"][0])
    head = tok("user\n\nWho is Bob?\n\nassistant")["input_ids"]     # the judge prefix is the BOS alone
    whole = [ids for ids in fed if len(ids) > 1]      # not the decode steps, one token each on the cache
    generation = [ids for ids in whole if ids[:len(root)] == root]
    judged = [ids for ids in whole if ids[:len(head)] == head]
    assert generation and judged and len(generation) + len(judged) == len(whole)
    tree = rain_generate(model, tok, [QUESTION], config, engine="tree", **kw)
    assert decisions(tree) == decisions(slow)


def test_chat_template_settings_that_cannot_apply_are_errors():
    from tests.evaluation.chat_model import chat_tokenizer

    tok = chat_tokenizer()
    model = HashLM(len(tok))
    with pytest.raises(ValueError, match="system is a turn of the chat template"):
        rain_generate(model, tok, ["Hi"], SMALL, system="Be brief.", embedding="hidden")
    with pytest.raises(ValueError, match="chat_template_kwargs are variables of the chat template: they need "
                                         "chat_template=True"):
        rain_generate(model, tok, ["Hi"], SMALL, chat_template_kwargs={"enable_thinking": False}, embedding="hidden")
    with pytest.raises(ValueError, match="generation_prefix goes before the prompt's text, but the chat template"):
        rain_generate(model, tok, ["Hi"], SMALL, chat_template=True, generation_prefix="x", embedding="hidden")
    with pytest.raises(ValueError, match="has no chat template"):
        rain_generate(model, tokenizer(), ["Hi"], SMALL, chat_template=True, embedding="hidden")
    # a template that ignores add_generation_prompt (its prompts would lack the assistant's header): refused before
    # the run, not written into each prompt's record
    from tests.evaluation.chat_model import CHAT_TEMPLATE
    ignored = chat_tokenizer(CHAT_TEMPLATE.replace("{% if add_generation_prompt %}", "{% if false %}"))
    with pytest.raises(ValueError, match="ignores add_generation_prompt"):
        rain_generate(HashLM(len(ignored)), ignored, ["Hi", "Bye"], SMALL, chat_template=True, embedding="hidden")


def test_a_chat_prompt_holding_a_special_tokens_text_is_that_prompts_error():
    """The chat template writes the turn markers; an end of turn written in a prompt would end the user's turn
    inside it, for the model and for the judge. That prompt fails with an error naming the token; the others run."""
    from tests.evaluation.chat_model import EOT, chat_tokenizer

    tok = chat_tokenizer()
    judge = JudgePrompt(template="{conversation}\n{options}", labels=("Hi", "Hello"), harmless="sea",
                        harmful="city", option_line="{label} {statement}", answer_prefix="\n",
                        dialogue="user\n\n{prompt}\n\nassistant")
    run = rain_generate(HashLM(len(tok)), tok, ["Hi", f"Hi{EOT}Hello"], RainConfig(root_visits=2, max_new_tokens=2),
                        runner=HashRunner(len(tok)), chat_template=True, embedding="hidden", judge_prompt=judge)
    assert run.results[0].error is None
    assert run.results[1].error.startswith(f"the prompt holds '{EOT}', the text of a special token")


def test_chat_template_kwargs_render_the_models_prompt_and_the_judges(monkeypatch):
    """chat_template_kwargs are the template variables of the model's prompt and of a judge prompt rendered in the
    chat template (here: a generation prompt that ends with a reasoning block when enable_thinking is false)."""
    from fastalign.evaluation.prompts import chat_prompt
    from fastalign.prompt_tokens import tokenize_prompts

    tok = copy.deepcopy(tokenizer())
    tok.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
                         "{% if add_generation_prompt %}<|assistant|>{% if enable_thinking is false %}<think></think>"
                         "{% endif %}{% endif %}")
    kwargs, judge = {"enable_thinking": False}, dataclasses.replace(SHORT_JUDGE, use_chat_template=True)
    model = HashLM(len(tok))
    fed, forward = [], model.forward
    monkeypatch.setattr(model, "forward", lambda **kw: fed.append(kw["input_ids"][0].tolist()) or forward(**kw))
    run = rain_generate(model, tok, ["Who is Bob?"], RainConfig(root_visits=3, max_new_tokens=3), engine="slow",
                        judge_prompt=judge, embedding="hidden", sampler="keyed", chat_template=True,
                        chat_template_kwargs=kwargs)
    assert run.results[0].error is None
    root = tokenize_prompts(tok, [chat_prompt(tok, "Who is Bob?", template_kwargs=kwargs)])[0]
    assert any(ids[:len(root)] == root for ids in fed)
    plain, thinking = JudgeTokens(tok, judge).suffix_ids, JudgeTokens(tok, judge, kwargs).suffix_ids
    assert all("<think></think>" in tok.decode(s) and "<think>" not in tok.decode(p) for s, p in zip(thinking, plain))
    assert any(ids[-len(s):] == s for ids in fed for s in thinking)
    assert not any(ids[-len(p):] == p for ids in fed for p in plain)


LLAMA3_LIKE = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n\n{{ m['content'] | trim }}</s>{% endfor %}"
               "{% if add_generation_prompt %}<|assistant|>\n\n{% endif %}")
LLAMA2_LIKE = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]"
               "{% else %} {{ m['content'] }} </s>{% endif %}{% endfor %}")


def test_chat_answers_follow_the_judge_dialogue_after_a_space(monkeypatch):
    """A byte-level BPE chat model starts its answer without a space ("Mix" after the template's newlines): the
    judge reads "Assistant: Mix", as its few-shot examples show, not "Assistant:Mix"; a SentencePiece answer
    ("▁Mix") and a dialogue that ends in whitespace bring their own."""
    from fastalign.prompt_templates import ChatTemplate
    from fastalign.rain.dialogue import reply_lead
    from tests.byte_bpe import train_byte_bpe

    from .test_judge import _sentencepiece_style_tokenizer
    from .tiny import CORPUS, with_special_tokens

    tok = with_special_tokens(train_byte_bpe(CORPUS, vocab_size=600))   # a copy of its own, given a chat template
    tok.chat_template = LLAMA3_LIKE
    model = HashLM(len(tok))
    fed, forward = [], model.forward
    monkeypatch.setattr(model, "forward", lambda **kw: fed.append(kw["input_ids"][0].tolist()) or forward(**kw))
    run = rain_generate(model, tok, ["How do I bake bread?"], RainConfig(root_visits=3, max_new_tokens=3),
                        engine="slow", judge_prompt=SHORT_JUDGE, embedding="hidden", sampler="keyed",
                        chat_template=True)
    assert run.results[0].error is None
    judge = JudgeTokens(tok, SHORT_JUDGE)
    head = judge.prefix_ids + judge.head_ids("Human: How do I bake bread?\nAssistant: ")
    judged = [ids for ids in fed if ids[:len(judge.prefix_ids)] == judge.prefix_ids]
    assert judged and all(ids[:len(head)] == head for ids in judged)
    assert reply_lead(tok, JudgeTokens(tok, dataclasses.replace(SHORT_JUDGE, dialogue="Human: {prompt}\n\n")),
                      ChatTemplate(tok)) == ""
    sentencepiece = _sentencepiece_style_tokenizer()
    sentencepiece.chat_template = LLAMA2_LIKE
    assert reply_lead(sentencepiece, JudgeTokens(sentencepiece, SHORT_JUDGE), ChatTemplate(sentencepiece)) == ""


class _Vectors:
    """A plug-in embedder whose embed returns `make(paths)`."""
    needs_hidden = False

    def __init__(self, make):
        self.make = make

    def embed(self, paths):
        return self.make(paths)


@pytest.mark.parametrize("make, message", [
    (lambda paths: [[1.0, 2.0] for _ in paths], "each vector a torch.Tensor, got list"),
    (lambda paths: [torch.ones(4) for _ in paths[1:]], "one vector per path: 1 asked, 0 given"),
    (lambda paths: [torch.ones(3 + i % 2) for i in range(len(paths))], "same length d: vector 1 has 4, vector 0 3"),
    (lambda paths: [torch.tensor(1.0) for _ in paths], r"1-D vectors \[d\] with d >= 1, got shape \[\]"),
    (lambda paths: torch.ones(len(paths), 4, dtype=torch.long), "floating-point vectors, got torch.int64"),
    (lambda paths: torch.ones(len(paths)), r"a tensor \[N, d\] or a list of N vectors \[d\], got a tensor of shape"),
    (lambda paths: None, "expected a list of vectors, got NoneType"),
    (lambda paths: torch.ones(len(paths), 0), r"1-D vectors \[d\] with d >= 1, got shape \[0\]"),
    (lambda paths: [torch.ones(4) for _ in range(len(paths) + 1)], "one vector per path: 1 asked, 2 given"),
    # a NaN similarity made the selection find no leaf: an AttributeError of None in every prompt
    (lambda paths: torch.full((len(paths), 4), float("nan")), r"finite vectors, got NaN or inf \(vector 0\)"),
    (lambda paths: torch.full((len(paths), 4), float("inf")), r"finite vectors, got NaN or inf \(vector 0\)"),
])
def test_a_plug_in_embedder_that_returns_the_wrong_vectors_gets_an_error_naming_it(make, message):
    """Vectors of the wrong type, count or shape failed deep in the back-up ('list' object has no attribute
    'float', a size mismatch, an IndexError, 'backup: 1 path embeddings needed')."""
    config = RainConfig(root_visits=3, min_new_visits=2, max_new_tokens=3)
    run = run_tree(PROMPTS[:1], config, embedding=_Vectors(make))
    error = run.results[0].error
    assert error is not None and "_Vectors.embed" in error
    assert re.search(message, error), error


def test_a_plug_in_embedder_whose_vectors_change_length_between_calls_gets_an_error_naming_it():
    sizes = iter(range(2, 1000))
    run = run_tree(PROMPTS[:1], RainConfig(root_visits=4, min_new_visits=2, max_new_tokens=3),
                   embedding=_Vectors(lambda paths: torch.ones(len(paths), next(sizes))))
    assert "_Vectors.embed" in run.results[0].error and "earlier" in run.results[0].error


def test_plug_in_embedders_that_return_a_matrix_or_tensors_run():
    config = RainConfig(root_visits=3, min_new_visits=2, max_new_tokens=3)
    runs = [run_tree(PROMPTS[:2], config, embedding=_Vectors(make)) for make in (
        lambda paths: torch.stack([torch.tensor([float(len(p.text)), 1.0]) for p in paths]),
        lambda paths: [torch.tensor([float(len(p.text)), 1.0], dtype=torch.float64) for p in paths])]
    assert all(r.error is None and r.answer_ids for run in runs for r in run.results)
    assert decisions(runs[0]) == decisions(runs[1])


@pytest.mark.parametrize("needs_hidden", [False, True])
def test_a_plug_in_embedder_gets_the_hidden_states_as_its_needs_hidden_says(needs_hidden):
    """needs_hidden decides whether the engines fill PathInfo.hidden_sum (the model's hidden states, which cost the
    runner their transfer): given to an embedder that asks for them, not to one that does not."""
    filled = []

    class Recording:
        def embed(self, paths):
            filled.extend(p.hidden_sum is not None for p in paths)
            return torch.ones(len(paths), 2)

    Recording.needs_hidden = needs_hidden
    run = run_tree(PROMPTS[:1], RainConfig(root_visits=3, min_new_visits=2, max_new_tokens=3), embedding=Recording())
    assert run.results[0].error is None
    assert filled and set(filled) == {needs_hidden}


class _NoEmbed:
    needs_hidden = False

    def encode(self, texts):
        return torch.ones(len(texts), 4)


class _NoFlag:
    def embed(self, paths):
        return torch.ones(len(paths), 4)


class _TextFlag(_NoFlag):
    needs_hidden = "no"


class _NoDrawMany:
    repeatable = True

    def draw(self, probs, keys):
        return [0] * probs.shape[0]


class _NoRepeatable:
    def draw(self, probs, keys):
        return [0] * probs.shape[0]

    def draw_many(self, probs, keys, count):
        return [[0]] * probs.shape[0]


@pytest.mark.parametrize("setting, message", [
    (dict(embedding=_NoEmbed()), "embedding: _NoEmbed has no method embed"),
    (dict(embedding=_NoFlag()), "embedding: _NoFlag has no attribute needs_hidden"),
    (dict(embedding=_TextFlag()), "embedding: _TextFlag.needs_hidden must be True or False, got 'no'"),
    (dict(sampler=_NoDrawMany()), "sampler: _NoDrawMany has no method draw_many"),
    (dict(sampler=object()), "sampler: object has no method draw"),
    (dict(sampler=_NoRepeatable()), "sampler: _NoRepeatable.repeatable must be True or False (whether a draw at the "
                                    "same key always gives the same token), got None"),
])
def test_a_plug_in_without_the_interface_is_refused_up_front(setting, message):
    """Each failed later, deep in every prompt's search ('object' object has no attribute 'draw_many') or as a
    bare AttributeError, and a needs_hidden of 'no' was taken as True."""
    with pytest.raises(ValueError, match=re.escape(message)):
        run_tree(PROMPTS[:1], SMALL, **setting)


def test_a_tokenizer_that_appends_eos_to_every_text_searches_as_without_it(monkeypatch):
    """A tokenizer configured with add_eos_token=True ends every encoding with EOS: the prompt, the generation
    prefix and the judge's few-shot prefix read that way each ended with an EOS that the model then went on
    after. The model is fed what the same tokenizer without it gives, a chat template's prompt too."""
    from tests.tokenizer_variants import appending_eos

    tok = copy.deepcopy(tokenizer())
    tok.chat_template = LLAMA3_LIKE
    eos_tok = appending_eos(tok)
    model = HashLM(len(tok))
    fed, forward = [], model.forward
    monkeypatch.setattr(model, "forward", lambda **kw: fed.append(kw["input_ids"][0].tolist()) or forward(**kw))
    config = RainConfig(root_visits=3, max_new_tokens=3)
    kw = dict(engine="slow", judge_prompt=SHORT_JUDGE, embedding="hidden", sampler="keyed")
    runs = {}
    for name, t in (("plain", tok), ("eos", eos_tok)):
        fed.clear()
        raw = rain_generate(model, t, PROMPTS[:2], config, generation_prefix="Judge the conversation.\n", **kw)
        chat = rain_generate(model, t, ["How do I bake bread?"], config, chat_template=True, **kw)
        runs[name] = (decisions(raw), decisions(chat), list(fed))
    assert all(error is None for _, _, error in runs["plain"][0] + runs["plain"][1])
    assert runs["eos"] == runs["plain"]


@pytest.mark.parametrize("engine", ["slow", "tree"])
def test_token_ids_past_the_models_embeddings_are_errors_naming_the_prompt_or_the_judge(engine):
    """A tokenizer with a token added past the model's input embeddings (chat markers added without resizing
    them): a prompt that holds it failed with an IndexError deep in the slow engine's forward; it is an error
    naming the prompt in both engines, and a judge prompt that holds it (before or after the conversation, or in an
    option) is refused before any search."""
    tok = copy.deepcopy(tokenizer())
    tok.add_tokens(["<|im_start|>"], special_tokens=True)
    model, vocab = tiny_llama(), len(tokenizer())
    kw = dict(engine=engine, judge_prompt=SHORT_JUDGE, embedding="hidden")
    run = rain_generate(model, tok, ["<|im_start|>" + PROMPTS[0], PROMPTS[1]], SMALL, **kw)
    assert run.results[0].error == (f"prompt 0: token id {vocab} is past the model's {vocab} input embeddings: the "
                                    "tokenizer does not match the model (a token added without resizing the "
                                    "embeddings?)")
    assert run.results[1].error is None and run.results[1].answer_ids
    with pytest.raises(ValueError, match=f"generation_prefix: token id {vocab} is past the model's {vocab} input"):
        rain_generate(model, tok, PROMPTS[1:], SMALL, generation_prefix="<|im_start|>", **kw)
    for where in ({"template": "<|im_start|>" + SHORT_JUDGE.template},             # before the conversation
                  {"template": SHORT_JUDGE.template.replace("\n{options}", "<|im_start|>\n{options}")},   # after
                  {"harmful": SHORT_JUDGE.harmful + "<|im_start|>"}):                 # in an option
        kw["judge_prompt"] = dataclasses.replace(SHORT_JUDGE, **where)
        with pytest.raises(ValueError, match=f"the judge prompt: token id {vocab} is past the model's {vocab} input"):
            rain_generate(model, tok, PROMPTS[1:], SMALL, **kw)


def test_a_chat_template_prompt_whose_judge_dialogue_holds_a_token_past_the_embeddings_is_an_error_naming_it():
    """With chat_template the judge reads the prompt in JudgePrompt.dialogue: a token there past the model's input
    embeddings is that prompt's error, as one in the prompt itself is (not an IndexError deep in a judge call)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from tests.evaluation.chat_model import QUESTION, chat_tokenizer

    tok = chat_tokenizer()
    vocab = len(tok)
    tok.add_tokens(["<|unembedded|>"], special_tokens=True)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2)).eval()
    judge = JudgePrompt(template="{conversation}\n{options}", labels=("Hi", "Hello"), harmless="sea", harmful="city",
                        option_line="{label} {statement}", answer_prefix="\n",
                        dialogue="<|unembedded|>user\n\n{prompt}\n\nassistant")
    run = rain_generate(model, tok, [QUESTION], RainConfig(root_visits=3, max_new_tokens=3), judge_prompt=judge,
                        embedding="hidden", sampler="keyed", chat_template=True)
    assert run.results[0].error.startswith(f"prompt 0: token id {vocab} is past the model's {vocab} input embeddings")


def test_a_slow_tokenizer_searches_as_the_fast_one_with_the_same_ids():
    """RAIN needs no character offsets: a pure-Python tokenizer (models with custom tokenizer code) makes the
    decisions the fast tokenizer with the same ids makes, the judge's option ids included."""
    from tests.tokenizer_variants import SlowTokenizer

    fast = tokenizer()
    slow = SlowTokenizer(fast.backend_tokenizer, bos_token=fast.bos_token, eos_token=fast.eos_token,
                         pad_token=fast.pad_token)
    assert not slow.is_fast and JudgeTokens(slow, SHORT_JUDGE).label_ids == JudgeTokens(fast, SHORT_JUDGE).label_ids
    runs = [rain_generate(HashLM(len(fast)), t, PROMPTS, SMALL, engine="slow", judge_prompt=SHORT_JUDGE,
                          embedding="hidden", sampler="keyed") for t in (fast, slow)]
    assert decisions(runs[1]) == decisions(runs[0]) and all(r.answer_ids for r in runs[0].results)


@pytest.mark.parametrize("sampler", ["torch", "keyed"])
def test_a_model_call_waits_for_the_device_once(monkeypatch, sampler):
    """What a GPU run of the tree engine waits for (counted by tests/sync_counter.py), and why each remains:
    - per model call that has generation or judge rows, ONE copy of everything the search reads (top-k ids and
    probabilities, greedy columns, ranked tokens, every prompt's pre-drawn rollout pool, the judge rows' logits):
    the search needs those tokens and scores to decide its next call (they were 5 copies, one more per prompt
    with rollout pools and two per judge score);
    - the last hidden states of the generation rows ride in that copy: paths' sums of them, their embeddings and the
    similarities are host work (an embed call copied the paths' sums from the device, one per path before that);
    - a rollout drawing at a prompt's root, whose full probabilities are kept for each prompt's own sampler: the
    drawn token decides the rollout's next step.
    The runner's torch attention path (used here: it is fast on CPU) reads its lengths per layer on the host; the
    Triton path a GPU uses reads none (tests/runtime/test_tree_runner.py)."""
    from fastalign.runtime import TreeRunner
    from tests.sync_counter import SyncCounter
    model = tiny_llama()
    runner = TreeRunner(model, max_tokens=2048, attention_backend="torch")
    counter, per_call = SyncCounter(model), []
    call = tree_engine.TreeEngine._call

    def counted(engine, rows):
        before = collections.Counter(counter.by_file())
        out = call(engine, rows)
        made = collections.Counter(counter.by_file())
        made.subtract(before)
        per_call.append((any(r.kind in ("gen", "label") for r in rows), +made))
        return out

    monkeypatch.setattr(tree_engine.TreeEngine, "_call", counted)
    config = RainConfig(root_visits=5, min_new_visits=2, max_new_tokens=4)
    with counter:
        out = rain_generate(model, tokenizer(), PROMPTS, config, runner=runner, judge_prompt=SHORT_JUDGE,
                            embedding="hidden", sampler=sampler, concurrency=3)
    assert all(r.error is None for r in out.results)
    attention = "tolist @ fastalign/ops/paged_attention.py"
    one_read = collections.Counter({"cpu @ fastalign/transfers.py": 1})
    assert [made - collections.Counter({attention: made[attention]}) for _, made in per_call] == [
        one_read if reads else collections.Counter() for reads, _ in per_call]
    assert sum(reads for reads, _ in per_call) >= 8
    outside = collections.Counter(counter.by_file())
    for _, made in per_call:
        outside.subtract(made)
    assert set(+outside) <= {"tolist @ fastalign/rain/sampling.py"}, outside


def _mamba():
    from transformers import MambaConfig, MambaForCausalLM
    return MambaForCausalLM(MambaConfig(vocab_size=len(tokenizer()), hidden_size=32, num_hidden_layers=2, state_size=4,
                                        eos_token_id=tokenizer().eos_token_id))


def _minimax():
    from transformers import MiniMaxConfig, MiniMaxForCausalLM
    return MiniMaxForCausalLM(MiniMaxConfig(
        vocab_size=len(tokenizer()), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, num_local_experts=2, num_experts_per_tok=1,
        layer_types=["linear_attention", "full_attention"], eos_token_id=tokenizer().eos_token_id))


@pytest.mark.parametrize("make_model, kind, warning", [
    (tiny_qwen3_next, "HFStateCacheModel", "with each span's recurrent state kept"),
    (_mamba, "HFStateCacheModel", "with each span's recurrent state kept"),
    (_minimax, "HFRecomputeModel", "it runs by computing each row's whole sequence again at every call")])
def test_a_recurrent_model_runs_on_its_fallback_and_counts_what_it_recomputes(make_model, kind, warning):
    """Qwen3-Next's linear-attention layers, Mamba's and MiniMax's keep recurrent state that no span of the pool holds:
    the tree engine runs Qwen3-Next and Mamba (its new tokens one at a time from a state) with each span's state kept
    (HFStateCacheModel), MiniMax, whose cache is its own, by computing each row's whole sequence at every call
    (HFRecomputeModel); all make the slow engine's decisions, and their stats count every token the runner ran again
    as recomputed tokens (each row's context on HFRecomputeModel, so many)."""
    TreeRunner = pytest.importorskip("fastalign.runtime").TreeRunner
    torch.manual_seed(0)
    model = make_model().eval()
    holder = {}

    def make_runner():
        with pytest.warns(UserWarning, match=warning):
            holder["runner"] = TreeRunner(model, max_tokens=2048, attention_backend="torch")
        return holder["runner"]

    config = RainConfig(root_visits=3, min_new_visits=2, max_new_tokens=2)
    out = run_both(model, PROMPTS[:1], config, make_runner, judge_prompt=SHORT_JUDGE, embedding="hidden",
                   sampler="keyed")
    tree, runner = out["tree"][0], holder["runner"]
    assert tree.results[0].error is None and decisions(out["slow"][0]) == decisions(tree)
    assert type(runner.model_runner).__name__ == kind
    assert tree.stats.recomputed_tokens == runner.recomputed_tokens
    assert (runner.recomputed_tokens > tree.stats.minimum_tokens) == (kind == "HFRecomputeModel")


@pytest.mark.parametrize("engine", ["slow", "tree"])
def test_an_answer_leaves_the_judge_prompt_its_room_in_the_models_context(engine):
    """Without a length cap an answer runs until the judge prompt around it (few-shot prefix, the prompt as the judge
    reads it, the longer options block and JUDGE_MARGIN tokens of slack for re-tokenizing the reply) fills the
    model's context, and no further. A raw prompt is read by the judge without its leading whitespace (hh_prompts
    start with "\\n\\nHuman:"). Dropping the slack, or reading the prompt's newlines into the judge's share, went
    unseen."""
    from fastalign.rain.generate import JUDGE_MARGIN

    tok, context = tokenizer(), 100
    judge = JudgeTokens(tok, SHORT_JUDGE)
    prompts = [PROMPTS[0], "\n\n" + PROMPTS[1]]
    run = rain_generate(HashLM(len(tok), max_positions=context), tok, prompts,
                        RainConfig(root_visits=2, min_new_visits=1, max_new_tokens=0), engine=engine,
                        runner=HashRunner(len(tok)) if engine == "tree" else None, judge_prompt=SHORT_JUDGE,
                        embedding="hidden")
    for prompt, result in zip(prompts, run.results):
        judged = len(judge.prefix_ids) + len(judge.head_ids(prompt.lstrip())) + max(map(len, judge.suffix_ids))
        assert result.error is None and len(result.answer_ids) == context - judged - JUDGE_MARGIN


@pytest.mark.parametrize("error", [KeyError("node 7"), AssertionError("out of order")])
def test_an_error_of_any_kind_inside_one_search_stays_with_its_prompt(monkeypatch, error):
    """Not only a RuntimeError: any exception inside one prompt's search ends that prompt only (a scheduler that
    caught RuntimeError alone lost every prompt's answer to a KeyError in one search, unseen)."""
    real_commit = tree_engine.TreeEngine.commit

    def commit(self, ctx, old_root, new_root):
        if ctx.index == 1:
            raise error
        return real_commit(self, ctx, old_root, new_root)

    monkeypatch.setattr(tree_engine.TreeEngine, "commit", commit)
    run = run_tree(PROMPTS, RainConfig(root_visits=3, min_new_visits=2, max_new_tokens=3), concurrency=3)
    assert [r.error for r in run.results] == [None, f"{type(error).__name__}: {error}", None]
    assert run.results[0].answer_ids and run.results[2].answer_ids


@pytest.mark.parametrize("where", ["search", "model call"])
def test_an_interrupt_inside_a_search_or_a_model_call_stops_the_run(monkeypatch, where):
    """Ctrl-C is no prompt's failure: a KeyboardInterrupt raised in a search (its commit) or in a merged model call
    ends the run, leaving no span behind, rather than being written into the prompts' errors while the run goes on."""
    runner = HashRunner(len(tokenizer()))
    if where == "search":
        def commit(self, ctx, old_root, new_root):
            raise KeyboardInterrupt

        monkeypatch.setattr(tree_engine.TreeEngine, "commit", commit)
    else:
        extend, calls = runner.extend, []

        def interrupted(parents, token_lists, **kw):
            calls.append(len(parents))
            if len(calls) == 10:   # a merged call of the searches, the prompts started
                raise KeyboardInterrupt
            return extend(parents, token_lists, **kw)

        monkeypatch.setattr(runner, "extend", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_tree(PROMPTS, RainConfig(root_visits=3, min_new_visits=2, max_new_tokens=3), runner=runner, concurrency=3)
    assert not runner.live


class RerunThenRefusingRunner(NarrowPoolRunner):
    """A NarrowPoolRunner that reports one context token run again per row of each call it then refuses (the runner
    ran them before the pool ran out), and none for the calls it runs; `rerun`: the tokens so reported."""

    def __init__(self, vocab):
        super().__init__(vocab)
        self.rerun = 0

    def extend(self, parents, token_lists, **kw):
        refused = sum(not isinstance(p, int) for p in parents) > 1
        self.last_context_rerun = np.full(len(parents), int(refused), dtype=np.int64)
        self.rerun += len(parents) if refused else 0
        return super().extend(parents, token_lists, **kw)


def test_tokens_run_again_by_a_call_that_then_fails_are_counted():
    """The tokens a runner ran again in a call that then failed (here refused for want of KV pool) were still run: they
    are counted in recomputed_tokens (they were lost if only the calls that succeed were charged)."""
    runner = RerunThenRefusingRunner(len(tokenizer()))
    run = run_tree(PROMPTS[:2], RainConfig(root_visits=3, min_new_visits=2, max_new_tokens=3), runner=runner,
                   concurrency=2)
    assert all(r.error is None for r in run.results) and runner.rerun > 0
    assert run.stats.recomputed_tokens == runner.rerun


def test_a_call_s_time_is_split_over_its_rows_phases_by_their_tokens(monkeypatch):
    """One call of rows of two phases and prompts: each phase (of the run and of each prompt) gets the call's time in
    proportion to its rows' tokens (not split evenly by rows, which gave a long row's phase too little)."""
    from fastalign.rain.stats import RainStats
    ticks = iter([10.0, 16.0])
    monkeypatch.setattr(tree_engine, "time", types.SimpleNamespace(perf_counter=lambda: next(ticks)))
    tok = tokenizer()
    engine = tree_engine.TreeEngine(HashRunner(len(tok)), tok, frozenset(), JudgeTokens(tok, SHORT_JUDGE), SMALL,
                                    False)
    a, b = RainStats(), RainStats()
    rows = [tree_engine.Row(None, [1, 2, 3, 4, 5], a, "expand", "plain"),
            tree_engine.Row(None, [6], b, "evaluate", "plain")]
    outs = engine._call(rows)
    assert engine.ledger.run.seconds["expand"] == pytest.approx(5.0)
    assert engine.ledger.run.seconds["evaluate"] == pytest.approx(1.0)
    assert (a.seconds["expand"], b.seconds["evaluate"]) == (pytest.approx(5.0), pytest.approx(1.0))
    engine.runner.release([out.span for out in outs])
    assert not engine.runner.live


class OnceFailingDraw(KeyedSampler):
    """The keyed sampler, but its `fail_at`-th call of draw (an expansion's step, read between model calls) raises."""

    def __init__(self, fail_at):
        super().__init__()
        self.fail_at, self.calls = fail_at, 0

    def draw(self, probs, keys):
        self.calls += 1
        if self.calls == self.fail_at:
            raise RuntimeError("CUDA out of memory")
        return super().draw(probs, keys)


def test_a_search_failing_between_calls_leaves_no_claim_on_the_others_positions():
    """A program that fails between two calls of a merged run (here an expansion's draw), after other programs of the
    round already asked for their next rows: those rows never run, and their positions must lose their pending marks,
    or each prompt, run again alone, waits on them forever ("every program waits on another")."""
    config = RainConfig(root_visits=3, min_new_visits=2, max_new_tokens=3)
    counting = OnceFailingDraw(None)
    expected = decisions(run_tree(PROMPTS, config, concurrency=3, sampler=counting))
    assert counting.calls >= 2 and all(error is None for *_, error in expected)
    for fail_at in range(1, counting.calls + 1):
        runner = HashRunner(len(tokenizer()))
        run = run_tree(PROMPTS, config, concurrency=3, runner=runner, sampler=OnceFailingDraw(fail_at))
        assert decisions(run) == expected and not runner.live, fail_at


@pytest.mark.parametrize("template", [None, "{conversation}\nJudge the conversation.\n{options}"])
def test_commit_keeps_the_judge_trie_s_origin(monkeypatch, template):
    """The rewind keeps the origin of the trie the judge reads (the conversation's start: a reply cut before a new turn
    inside the committed tokens is judged from it), also when one trie serves both sides; only the generation side of
    two tries lets its origin go."""
    commit, checked = tree_engine.TreeEngine.commit, []

    def checked_commit(self, ctx, old_root, new_root):
        origin = old_root.handle.judge
        while origin.parent is not None:
            origin = origin.parent
        commit(self, ctx, old_root, new_root)
        assert origin.entry is not None and any(origin.entry.span is span for span in self.runner.live)
        checked.append(new_root.handle.judge is new_root.handle.gen)

    monkeypatch.setattr(tree_engine.TreeEngine, "commit", checked_commit)
    judge_prompt = SHORT_JUDGE if template is None else dataclasses.replace(SHORT_JUDGE, template=template)
    run = run_tree(PROMPTS[:1], RainConfig(root_visits=8, min_new_visits=3, max_new_tokens=16), concurrency=1,
                   judge_prompt=judge_prompt)
    assert run.results[0].error is None and len(checked) >= 2 and set(checked) == {template is not None}


def test_an_expansion_given_its_greedy_set_draws_exactly_its_attempts(monkeypatch):
    """An expansion that reuses a known greedy set (widening) returns that set and exactly its `attempts` samples, on
    its streams: the greedy row must not be decoded again and slip in among the samples."""
    from fastalign.rain.jobs import ExpandJob
    real_run, seen = tree_engine.TreeEngine.run, []

    def run(self, jobs):
        results = real_run(self, jobs)
        for job, result in zip(jobs, results):
            if isinstance(job, ExpandJob) and job.greedy is not None and job.length > 1:
                seen.append(job)
                assert result.greedy is job.greedy and len(result.samples) == job.attempts
        return results

    monkeypatch.setattr(tree_engine.TreeEngine, "run", run)
    config = RainConfig(root_visits=40, min_new_visits=3, max_new_tokens=6, widen_variance_per_token=1e9,
                        widen_max_q=2.0, early_stop_q=2.0, root_prior_mix=1.0, token_set_lengths=(3,))
    out = run_tree(PROMPTS[:1], config)
    assert out.results[0].error is None and seen


def test_each_draft_carries_the_sum_of_the_hidden_states_its_tokens_were_drawn_from(monkeypatch):
    """A multi-token draft's hidden_sum (what "hidden" embeddings read) is the sum of the last hidden states of every
    position it drew a token from, not the last one's alone."""
    from fastalign.rain.jobs import ExpandJob
    real_run, checked = tree_engine.TreeEngine.run, []
    vocab = len(tokenizer())

    def run(self, jobs):
        results = real_run(self, jobs)
        for job, result in zip(jobs, results):
            if isinstance(job, ExpandJob) and job.length > 1:
                for draft in [result.greedy, *result.samples]:
                    expected = sum(fake_model.prefix_outputs(list(job.state) + list(draft.tokens[:i]), vocab)[1]
                                   for i in range(len(draft.tokens)))
                    torch.testing.assert_close(draft.hidden_sum, expected)
                    checked.append(len(draft.tokens))
        return results

    monkeypatch.setattr(tree_engine.TreeEngine, "run", run)
    out = run_tree(PROMPTS[:1], RainConfig(root_visits=5, min_new_visits=2, max_new_tokens=6, token_set_lengths=(3,)))
    assert out.results[0].error is None and max(checked) > 1


def test_an_unknown_engine_is_an_error_naming_it():
    """engine= other than "tree" or "slow" is refused, not run on one of them."""
    tok = tokenizer()
    with pytest.raises(ValueError, match="engine must be 'tree' or 'slow', got 'fast'"):
        rain_generate(HashLM(len(tok)), tok, PROMPTS[:1], SMALL, engine="fast", runner=HashRunner(len(tok)),
                      judge_prompt=SHORT_JUDGE, embedding="hidden", sampler="keyed")


def test_a_failing_shared_step_of_one_search_is_not_run_again():
    """A merged step (model call, embedding batch) that fails is run again search by search to find the failing ones,
    but a step of one search alone is that search's error at once (running it again doubles its cost)."""
    from fastalign.rain import generate
    calls = []

    def run(items):
        calls.append(list(items))
        raise RuntimeError("device lost")

    ((search, err),) = generate._isolated(run, ["a"], lambda a: [a, a])
    assert search == "a" and isinstance(err, RuntimeError) and calls == [["a", "a"]]
    calls.clear()
    assert [s for s, _ in generate._isolated(run, ["a", "b"], lambda a: [a])] == ["a", "b"]
    assert calls == [["a", "b"], ["a"], ["b"]]


def test_a_runner_of_another_model_or_for_the_slow_engine_is_refused():
    """Every forward runs on the runner's model: one built for another model (a runner reused to compare a base model
    with a tuned one) answered with that model, silently, while `model` set the end tokens and the context; the slow
    engine ignored a runner."""
    from fastalign.runtime import TreeRunner
    model, other = tiny_llama(seed=0), tiny_llama(seed=1)
    config = RainConfig(root_visits=3, min_new_visits=1, max_new_tokens=3)
    with pytest.raises(ValueError, match="runner must be a TreeRunner of `model` itself, got one of another "
                                         "LlamaForCausalLM"):
        rain_generate(model, tokenizer(), PROMPTS[:1], config, judge_prompt=SHORT_JUDGE, embedding="hidden",
                      runner=TreeRunner(other, max_tokens=2048, attention_backend="torch"))
    with pytest.raises(ValueError, match="runner is the tree engine's: engine 'slow' takes none"):
        rain_generate(model, tokenizer(), PROMPTS[:1], config, judge_prompt=SHORT_JUDGE, embedding="hidden",
                      engine="slow", runner=TreeRunner(model, max_tokens=2048, attention_backend="torch"))


@pytest.mark.parametrize("engine", ["tree", "slow"])
@pytest.mark.parametrize("adapter", ["PromptTuningConfig", "PromptEncoderConfig", "PrefixTuningConfig"])
def test_a_peft_prompt_learning_adapter_is_refused_by_either_engine(engine, adapter):
    """Prompt tuning and P-tuning put virtual tokens before the inputs in PEFT's forward, at every call: the slow
    engine's forward per token set over the KV cache prepended them again (logits ~0.2 off the model's), silently;
    prefix tuning's K/V, which PEFT's forward passes as past_key_values, it did not carry over its cache either (logits
    ~1 off). Both engines refuse such a model by name, before any forward (a TreeRunner refuses all three itself)."""
    peft = pytest.importorskip("peft")
    extra = {"encoder_hidden_size": 16} if adapter == "PromptEncoderConfig" else {}
    model = peft.get_peft_model(tiny_llama(seed=0), getattr(peft, adapter)(
        task_type="CAUSAL_LM", num_virtual_tokens=3, **extra)).eval()
    config = RainConfig(root_visits=3, min_new_visits=1, max_new_tokens=3)
    with pytest.raises(ValueError, match=rf"model: its PEFT adapter \({adapter}\) is a prompt-learning adapter .* "
                                         "RAIN's search"):
        rain_generate(model, tokenizer(), PROMPTS[:1], config, engine=engine, judge_prompt=SHORT_JUDGE,
                      embedding="hidden")


class OpSites(TorchDispatchMode):
    """Counts aten ops by 'op @ file' (the innermost file of fastalign's code on the stack) while active."""

    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[f"{func.overloadpacket.__name__} @ {_site().rsplit(':', 1)[0]}"] += 1
        return func(*args, **(kwargs or {}))


def test_a_drawn_token_s_logp_reads_no_tensor():
    """A set's drawn tokens read their probabilities as floats given with the call's outputs: a float() of a tensor
    per drawn token before (a select and a scalar read each: 700 of each in bench_rain --quick's tree row)."""
    with OpSites() as sites:
        run = run_tree(PROMPTS[:2], RainConfig(root_visits=8, min_new_visits=3, max_new_tokens=8))
    assert all(r.error is None for r in run.results) and sum(len(r.commits) for r in run.results) >= 4
    assert not [op for op in sites.ops if op.endswith("fastalign/rain/tree_engine.py") and "_local_scalar" in op]


def test_a_generation_call_ranks_the_vocabulary_once(monkeypatch):
    """The top-k distribution and the ranked children of a call's generation rows come from one topk over the
    vocabulary (a [rows, V] pass per call: two before, one for each)."""
    calls, read = [], tree_engine.TreeEngine._read_distributions

    def counted(engine, *args):
        calls.append(1)
        return read(engine, *args)

    monkeypatch.setattr(tree_engine.TreeEngine, "_read_distributions", counted)
    with OpSites() as sites:
        run = run_tree(PROMPTS[:2], RainConfig(root_visits=8, min_new_visits=3, max_new_tokens=8))
    assert all(r.error is None for r in run.results) and len(calls) >= 8
    assert sites.ops["topk @ fastalign/rain/sampling.py"] == len(calls)   # (search.py's: of a node's children)
