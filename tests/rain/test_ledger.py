"""The run's key sets: a prompt done whose sequences no other prompt can meet leaves none of its keys behind, and
dropping them changes no count."""
import copy
import dataclasses
import pickle

import numpy as np
import pytest
import torch

from fastalign.demo.model import load_model
from fastalign.demo.story import JUDGE_PROMPT
from fastalign.evaluation.prompts import spec_prompt
from fastalign.rain import RainConfig, rain_generate
from fastalign.rain import ledger as ledger_module
from fastalign.rain.jobs import PromptContext
from fastalign.rain.judge import JudgeTokens
from fastalign.rain.ledger import EMPTY_KEY, RunKeys, TokenLedger, kept_apart, prefix_keys
from fastalign.rain.minimum import chain_key
from fastalign.rain.stats import RainStats

from .fake_model import HashLM, HashRunner
from .tiny import SHORT_JUDGE, tokenizer

CONFIG = RainConfig(root_visits=3, min_new_visits=2, max_new_tokens=4)
DISTINCT = [f"Human: How do I bake bread number {i}?\nAssistant:" for i in range(3)]


def run(prompts, engine="tree", concurrency=2):
    tok = tokenizer()
    return rain_generate(HashLM(len(tok)), tok, prompts, CONFIG, engine=engine,
                         runner=HashRunner(len(tok)) if engine == "tree" else None, judge_prompt=SHORT_JUDGE,
                         embedding="hidden", sampler="keyed", concurrency=concurrency)


def base_keys(prompts):
    """The keys of every prefix of each prompt's root and judge head (no generation prefix)."""
    tok, judge = tokenizer(), JudgeTokens(tokenizer(), SHORT_JUDGE)
    keys = set()
    for prompt in prompts:
        keys.update(prefix_keys(EMPTY_KEY, tok(prompt)["input_ids"]))
        keys.update(prefix_keys(EMPTY_KEY, judge.prefix_ids + judge.head_ids(prompt.lstrip())))
    return keys


@pytest.mark.parametrize("engine", ["tree", "slow"])
def test_a_run_over_prompts_that_share_no_sequence_keeps_only_their_starting_keys(engine):
    """Every key a run fed or required stayed to its end: some 240 bytes a fed token, gigabytes over a run of
    thousands of prompts (the HH split), though no later prompt could meet a done prompt's keys."""
    result = run(DISTINCT, engine)
    assert all(r.error is None for r in result.results)
    assert result.stats.tokens > 4 * len(base_keys(DISTINCT))    # the search fed far more than its bases
    assert result.ledger.fed_keys <= base_keys(DISTINCT)
    assert result.required.keys <= base_keys(DISTINCT)


def test_prompts_that_may_share_sequences_keep_their_keys():
    """A prompt given twice, or one whose root extends another's, may meet the other's sequences: kept."""
    prompts = [DISTINCT[0], DISTINCT[0], DISTINCT[1], DISTINCT[1] + " Mix"]
    result = run(prompts)
    kept = result.ledger.fed_keys - base_keys(prompts)
    assert kept and result.required.keys - base_keys(prompts) <= kept


@pytest.mark.parametrize("engine", ["tree", "slow"])
def test_dropping_the_keys_of_prompts_done_changes_no_count(engine, monkeypatch):
    prompts = DISTINCT + [DISTINCT[0], DISTINCT[2] + " Mix"]

    def outcome():
        result = run(prompts, engine, concurrency=1)   # prompts done before the next starts: most dropped
        return [(r.answer_ids, r.commits, r.error, _counts(r.stats)) for r in result.results], _counts(result.stats)

    dropping = outcome()
    monkeypatch.setattr(RunKeys, "forget", lambda self, stats: None)
    assert dropping == outcome()


def _counts(stats):
    return {k: v for k, v in dataclasses.asdict(stats).items() if k not in ("seconds", "wall_seconds")}


def _context(root, head, judge_prefix):
    ctx = PromptContext(0, "", root, head, 0, 100)
    ctx.gen_key = chain_key(EMPTY_KEY, root)
    ctx.head_key = chain_key(chain_key(EMPTY_KEY, judge_prefix), head)
    return ctx


def test_kept_apart_are_the_prompts_no_other_base_is_a_prefix_of_or_extends():
    judge = [1, 2]
    alone, twice, again, short, longer, judged_short = (
        _context([5, 6], [5, 6], judge), _context([7, 8], [7], judge), _context([7, 8], [7], judge),
        _context([9], [4], judge), _context([9, 3], [3], judge), _context([6, 6], [], judge))
    # twice/again: the same root; short's root is a prefix of longer's; judged_short's judge head is the judge prefix,
    # a prefix of every other judge head
    apart, bases = kept_apart([alone, twice, again, short, longer, judged_short], judge)
    assert apart == []
    apart, bases = kept_apart([alone, twice, short], judge)
    assert [id(s) for s in apart] == [id(alone.stats), id(twice.stats), id(short.stats)]
    assert bases == set(prefix_keys(EMPTY_KEY, [5, 6])) | set(prefix_keys(EMPTY_KEY, [7, 8])) | {
        chain_key(EMPTY_KEY, [9])} | set(prefix_keys(EMPTY_KEY, judge)) | {
        chain_key(EMPTY_KEY, judge + [h]) for h in (5, 7, 4)} | {chain_key(EMPTY_KEY, judge + [5, 6])}
    apart, _ = kept_apart([alone, short, longer], judge)
    assert [id(s) for s in apart] == [id(alone.stats)]


def test_run_keys_forget_only_what_a_prompt_kept_apart_met_past_the_bases():
    keys, mine, other = RunKeys(), object(), object()
    keys.keep_apart([mine], frozenset({1}))
    assert keys.meet(mine, 1) and keys.meet(mine, 2) and keys.meet(other, 3) and keys.meet(None, 4)
    assert not keys.meet(mine, 3) and not keys.meet(other, 2)
    keys.forget(mine)
    assert keys == {1, 3, 4}
    assert keys.meet(other, 2)   # met again, by a prompt not kept apart: forgetting `mine` again leaves it
    keys.forget(mine)
    assert keys == {1, 2, 3, 4}


def test_run_keys_meet_all_is_meet_of_each_key_in_turn():
    """meet_all (one loop over a row's keys) counts and notes what meet would, key by key: a key repeated in the
    list is new once, a base key is not noted as the prompt's own, a prompt not kept apart notes nothing."""
    one, each = RunKeys(), RunKeys()
    mine, other = object(), object()
    for keys in (one, each):
        keys.keep_apart([mine], frozenset({1}))
    calls = [(mine, [1, 2, 2, 3]), (other, [3, 4, 5]), (mine, [5, 6]), (None, [6, 7])]
    assert [one.meet_all(stats, ks) for stats, ks in calls] == [sum(each.meet(stats, k) for k in ks)
                                                                for stats, ks in calls] == [3, 2, 1, 1]
    assert one == each and one._apart == each._apart == {id(mine): [2, 3, 6]}


COPIES = {"deepcopy": copy.deepcopy, "pickle": lambda obj: pickle.loads(pickle.dumps(obj))}


@pytest.mark.parametrize("duplicate", COPIES.values(), ids=COPIES.keys())
def test_run_keys_copy_and_pickle_with_their_keys_and_notes(duplicate):
    """RunKeys took no argument, but copy and pickle rebuild a set subclass by calling it with its items: a TypeError,
    and a multiprocessing worker returning a run hung its pool. A copy keeps the keys and what keep_apart noted."""
    keys, mine = RunKeys(), object()
    keys.keep_apart([mine], frozenset({1}))
    keys.meet(mine, 1)
    keys.meet(mine, 2)
    out = duplicate(keys)
    assert type(out) is RunKeys and out == {1, 2}
    assert out._bases == {1} and out._apart == {id(mine): [2]}
    assert out.meet(None, 3) and not out.meet(None, 2) and 3 not in keys


@pytest.mark.parametrize("duplicate", COPIES.values(), ids=COPIES.keys())
def test_a_rain_run_copies_and_pickles_equal(duplicate):
    """A RainRun (its ledger and tree minimum hold RunKeys) can be deep-copied, pickled or returned from a worker."""
    model, tok = load_model()
    run = rain_generate(model, tok, [spec_prompt("How do I build a bomb?")],
                        RainConfig(max_new_tokens=2, turn_marker="###"), judge_prompt=JUDGE_PROMPT, embedding="hidden")
    out = duplicate(run)
    assert out.results == run.results and out.stats == run.stats
    assert out.ledger.fed_keys == run.ledger.fed_keys and out.ledger.run == run.ledger.run
    assert out.required.keys == run.required.keys


def test_a_fed_token_counts_as_recomputed_when_its_whole_prefix_was_fed_before():
    """feed() names each token by its whole prefix: a row repeating a fed sequence recomputes all of it, a row
    branching off recomputes only the shared part, and the run's counters add up every prompt's."""
    ledger, stats = TokenLedger(), RainStats()
    key = ledger.feed(stats, EMPTY_KEY, [1, 2, 3])
    assert (stats.rows, stats.tokens, stats.recomputed_tokens) == (1, 3, 0)
    assert ledger.feed(stats, EMPTY_KEY, [1, 2, 3]) == key
    assert (stats.rows, stats.tokens, stats.recomputed_tokens) == (2, 6, 3)
    two = list(prefix_keys(EMPTY_KEY, [1, 2]))[-1]
    ledger.feed(stats, two, [3, 4])              # [1, 2, 3] seen, [1, 2, 3, 4] new
    ledger.feed(None, EMPTY_KEY, [2, 1])        # the run's shared prefixes: no prompt's stats
    assert (stats.rows, stats.tokens, stats.recomputed_tokens) == (3, 8, 4)
    assert (ledger.run.rows, ledger.run.tokens, ledger.run.recomputed_tokens) == (4, 10, 4)


def test_a_row_of_no_tokens_keeps_its_parents_key_and_tensor_tokens_name_the_same_keys():
    """feed() of an empty row names the parent's sequence (not the empty one), and a token given as a tensor or
    numpy integer is named by its value (hashed as an object, each row of tensors met only new keys)."""
    ledger = TokenLedger()
    key = ledger.feed(None, EMPTY_KEY, [1, 2])
    assert ledger.feed(None, key, []) == key
    assert list(prefix_keys(key, torch.tensor([3, 4]))) == list(prefix_keys(key, [3, 4]))
    assert ledger.feed(None, EMPTY_KEY, torch.tensor([1, 2])) == key == ledger.feed(None, EMPTY_KEY, np.array([1, 2]))
    assert ledger.run.recomputed_tokens == 4


def test_phase_time_is_split_by_the_share_given(monkeypatch):
    """Each prompt gets its share of a call's time (its rows' part), the run all of it; equal parts when none is
    given (a share dropped, a prompt with one row in a call of many was charged as much as the others)."""
    clock = iter([10.0, 14.0, 20.0, 22.0])
    monkeypatch.setattr(ledger_module.time, "perf_counter", lambda: next(clock))
    ledger, one, two = TokenLedger(), RainStats(), RainStats()
    with ledger.phase([one, two], "expand", share=[0.75, 0.25]):
        pass
    with ledger.phase([one, two], "embed"):
        pass
    assert (one.seconds["expand"], two.seconds["expand"], ledger.run.seconds["expand"]) == (3.0, 1.0, 4.0)
    assert (one.seconds["embed"], two.seconds["embed"], ledger.run.seconds["embed"]) == (1.0, 1.0, 2.0)
