"""The tree engine against the batch-1 reference engine: identical decisions with a keyed sampler (on a
hash model, bit for bit, and on a tiny random Llama through the real TreeRunner), the same distribution of
first commits with the production sampler, the cost accounting, and per-prompt error isolation."""
import collections

import pytest
import torch

from fastalign.rain import RainConfig, rain_generate

from .fake_model import HashLM, HashRunner
from .tiny import PROMPTS, SHORT_JUDGE, tiny_llama, tokenizer

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


def test_identical_decisions_on_tiny_llama_through_tree_runner():
    TreeRunner = pytest.importorskip("fastalign.runtime").TreeRunner
    model = tiny_llama()
    holder = {}

    def make_runner():
        holder["runner"] = TreeRunner(model, max_tokens=2048, attention_backend="torch")
        return holder["runner"]

    config = RainConfig(root_visits=5, min_new_visits=2, max_new_tokens=3)
    out = run_both(model, PROMPTS[:1], config, make_runner, judge_prompt=SHORT_JUDGE, embedding="hidden",
                   sampler="keyed")
    assert out["tree"][0].results[0].error is None
    assert decisions(out["slow"][0]) == decisions(out["tree"][0])
    runner = holder["runner"]
    assert runner.num_free_blocks == runner.num_blocks


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


def test_cost_against_reference_and_tree_minimum():
    model = HashLM(len(tokenizer()))
    out = run_both(model, PROMPTS[:2], SMALL, lambda: HashRunner(len(tokenizer())), embedding="hidden",
                   sampler="keyed")
    slow, tree = out["slow"][0].stats, out["tree"][0].stats
    assert slow.committed_tokens == tree.committed_tokens > 0
    assert tree.tokens_per_committed_token * 10 <= slow.tokens_per_committed_token
    assert tree.tokens <= 1.2 * tree.minimum_tokens
    assert tree.rows_per_call > 1.5 and slow.rows_per_call == 1.0
    # the few-shot prefix, the prompts and every node are fed once; what repeats are rollout tokens that
    # later reappear as a child's tokens (mostly in the judge's copy of the path), which the minimum
    # counts once per use. The reference engine re-feeds most of what it runs.
    assert tree.recomputed_tokens < 0.12 * tree.tokens
    assert tree.recomputed_tokens < 0.05 * slow.recomputed_tokens
    assert slow.recomputed_tokens > 0.5 * slow.tokens
    for r in out["tree"][0].results:
        assert r.stats.model_calls > 0 and r.stats.iterations > 0 and r.stats.wall_seconds > 0
        assert set(r.stats.seconds) == {"expand", "simulate", "evaluate", "embed", "host"}


class FailingRunner(HashRunner):
    """Fails any row that extends a sequence containing `poison`."""

    def __init__(self, vocab, poison):
        super().__init__(vocab)
        self.poison = poison

    def extend(self, parents, token_lists, **kw):
        for p, t in zip(parents, token_lists):
            if self.poison in (p.tokens if p is not None else []) + list(t):
                raise RuntimeError("device fault")
        return super().extend(parents, token_lists, **kw)


def test_bad_prompts_and_failures_stay_with_their_prompt():
    tok = tokenizer()
    model = HashLM(len(tok), max_positions=200)
    poison_prompt = "Human: zebra zebra?\nAssistant:"
    poison = tok(poison_prompt)["input_ids"][3]
    prompts = [PROMPTS[0], "   ", "Human: " + "bread " * 300 + "\nAssistant:", poison_prompt, PROMPTS[2]]
    seen = []
    run = rain_generate(model, tok, prompts, RainConfig(root_visits=3, min_new_visits=2, max_new_tokens=3),
                        runner=FailingRunner(len(tok), poison), judge_prompt=SHORT_JUDGE, embedding="hidden",
                        on_result=seen.append)
    errors = [r.error for r in run.results]
    assert "empty" in errors[1]
    assert "no room to answer" in errors[2] and "context of 200" in errors[2]
    assert errors[3] is not None and "device fault" in errors[3]
    assert errors[0] is None and errors[4] is None
    assert run.results[0].answer_ids and run.results[4].answer_ids
    assert sorted(r.index for r in seen) == [0, 1, 2, 3, 4]
