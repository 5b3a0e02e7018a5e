"""Samplers draw for all rows in one call: the keyed sampler's draws do not depend on the batch they are
drawn in (what the equivalence tests rely on); the torch sampler's pools are independent draws from each
row's distribution."""
import re

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from fastalign.rain import KeyedSampler, RainConfig, TorchSampler, rain_generate, sampling
from fastalign.rain.sampling import (ROLLOUT_STREAM, CheckedSampler, check_sampler, draw_key, extend_key,
                                     make_sampler, prompt_sampler, ranked_token_tensors, ranked_tokens, seed_key,
                                     top_k_and_ranked, top_k_distribution)
from fastalign.transfers import index_on

from .tiny import PROMPTS, SHORT_JUDGE, tiny_llama, tokenizer


def test_keyed_draws_are_batch_invariant():
    g = torch.Generator().manual_seed(0)
    probs = torch.softmax(torch.randn(7, 50, generator=g) * 2, dim=-1)
    keys = [draw_key(extend_key(seed_key(1), [i]), 3) for i in range(7)]
    sampler = KeyedSampler(seed=5)
    batched = sampler.draw(probs, keys)
    assert batched == [sampler.draw(probs[i:i + 1], [keys[i]])[0] for i in range(7)]
    assert sampler.draw(probs[[3, 1]], [keys[3], keys[1]]) == [batched[3], batched[1]]
    assert sampler.draw_many(probs, keys, 4) == [[t] for t in batched] and sampler.repeatable
    assert len(set(batched)) > 2


def test_torch_pools_follow_each_rows_distribution():
    probs = torch.tensor([[0.7, 0.2, 0.1, 0.0], [0.0, 0.0, 0.25, 0.75]])
    pools = TorchSampler(seed=0).draw_many(probs, [0, 0], 4000)
    assert not TorchSampler.repeatable
    for row, pool in zip(probs, pools):
        freq = torch.bincount(torch.tensor(pool), minlength=4).float() / len(pool)
        assert torch.allclose(freq, row, atol=0.03), (freq, row)


def test_top_k_distribution_keeps_each_probability_with_its_token():
    ids, probs = top_k_distribution(torch.tensor([[0.0, 3.0, 1.0, 2.0, -1.0]]), 3)
    assert ids.tolist() == [[1, 2, 3]]
    assert torch.allclose(probs[0], torch.softmax(torch.tensor([3.0, 1.0, 2.0]), dim=0))


def test_ranked_tokens_keep_each_logit_with_its_token():
    assert ranked_tokens(torch.tensor([[0.0, 3.0, 1.0, 2.0, -1.0]]), 3) == ([[1, 2, 3]], [[3.0, 1.0, 2.0]])


def test_k_beyond_the_vocabulary_keeps_every_token():
    logits = torch.tensor([[0.5, -1.0, 2.0]])
    ids, probs = top_k_distribution(logits, 15)
    assert ids.tolist() == [[0, 1, 2]] and torch.allclose(probs[0], torch.softmax(logits[0], dim=0))
    assert ranked_tokens(logits, 20) == ([[0, 1, 2]], [[0.5, -1.0, 2.0]])


def test_a_key_names_the_whole_token_sequence():
    """Sequences that differ before their last token get different keys; extending is incremental."""
    base = seed_key(0)
    assert extend_key(base, [1, 3]) != extend_key(base, [2, 3])
    assert extend_key(extend_key(base, [1]), [3]) == extend_key(base, [1, 3])
    assert draw_key(extend_key(base, [1, 3]), 1) != draw_key(extend_key(base, [2, 3]), 1)


def test_the_seed_changes_the_draws_of_both_samplers():
    probs = torch.full((16, 50), 1.0 / 50)
    keys = [draw_key(extend_key(seed_key(1), [i]), 1) for i in range(16)]
    for make in (KeyedSampler, TorchSampler):
        assert make(seed=2).draw(probs, keys) == make(seed=2).draw(probs, keys)
        assert make(seed=2).draw(probs, keys) != make(seed=3).draw(probs, keys)


def test_a_prompts_torch_sampler_depends_on_the_seed_and_its_index_alone():
    """What a prompt's search draws from: the run's draws for other prompts do not move its draws; another index or
    seed gives others. The keyed sampler is every prompt's (its keys name the prompt's tokens), and a caller's own
    sampler object without for_prompt stays shared."""
    probs = torch.full((16, 50), 1.0 / 50)
    keys = [draw_key(extend_key(seed_key(1), [i]), 1) for i in range(16)]
    run = TorchSampler(seed=2)
    first = run.for_prompt(7).draw_many(probs, keys, 3)
    run.draw(probs, keys)
    run.for_prompt(8).draw(probs, keys)
    assert prompt_sampler(run, 7).draw_many(probs, keys, 3) == first
    assert run.for_prompt(8).draw_many(probs, keys, 3) != first
    assert TorchSampler(seed=3).for_prompt(7).draw_many(probs, keys, 3) != first
    keyed, own = KeyedSampler(seed=2), object()
    assert prompt_sampler(keyed, 7) is keyed and prompt_sampler(own, 7) is own


def test_a_torch_samplers_successive_draws_go_on_from_one_another():
    """One prompt's sampler draws anew at each call (a generator seeded again per call gave one set per node)."""
    probs = torch.full((1, 50), 1.0 / 50)
    sampler = TorchSampler(seed=0).for_prompt(0)
    assert len({sampler.draw(probs, [0])[0] for _ in range(20)}) > 5
    assert len({tuple(sampler.draw_many(probs, [0], 4)[0]) for _ in range(5)}) > 1


def test_neighbouring_seeds_and_prompt_indices_draw_apart():
    """Seed 2's prompt 8 and seed 3's prompt 7 (the same seed + index) draw differently."""
    probs = torch.full((16, 50), 1.0 / 50)
    keys = [0] * 16
    assert TorchSampler(seed=2).for_prompt(8).draw_many(probs, keys, 3) != \
        TorchSampler(seed=3).for_prompt(7).draw_many(probs, keys, 3)


class _Logging(TorchSampler):
    """A TorchSampler subclass that logs its calls (to a list of the caller's, shared by its prompts' copies)."""

    def __init__(self, seed, log):
        super().__init__(seed)
        self.log = log

    def draw(self, probs, keys):
        self.log.append("draw")
        return super().draw(probs, keys)

    def draw_many(self, probs, keys, count):
        self.log.append("draw_many")
        return super().draw_many(probs, keys, count)


def test_a_torch_sampler_subclass_s_prompt_sampler_keeps_its_draws():
    """for_prompt built a plain TorchSampler, so a subclass's own draws were never called (silently ignored); a
    prompt's sampler is now a copy of the subclass with the prompt's generator, which draws as a plain one's."""
    probs = torch.full((4, 50), 1.0 / 50)
    log, plain = [], TorchSampler(seed=2)
    run = _Logging(2, log)
    own = prompt_sampler(check_sampler(run), 7)
    assert isinstance(own, CheckedSampler) and type(own.sampler) is _Logging
    assert own.draw_many(probs, [0] * 4, 3) == plain.for_prompt(7).draw_many(probs, [0] * 4, 3)
    assert own.draw(probs, [0] * 4) != run.draw(probs, [0] * 4)          # the run's generator is not the prompt's
    assert log == ["draw_many", "draw", "draw"] and run.seed == 2
    assert type(plain.for_prompt(7)) is TorchSampler
    assert plain.for_prompt(7).draw(probs, [0] * 4) == TorchSampler(draw_key(seed_key(2), 7)).draw(probs, [0] * 4)


@pytest.mark.parametrize("engine", ["tree", "slow"])
def test_rain_generate_draws_from_a_torch_sampler_subclass(engine):
    """Both engines draw from the caller's subclass (each prompt from its copy), not from a plain TorchSampler."""
    log = []
    run = rain_generate(tiny_llama(), tokenizer(), PROMPTS[:2], RainConfig(root_visits=3, min_new_visits=2,
                                                                            max_new_tokens=3),
                        judge_prompt=SHORT_JUDGE, embedding="hidden", sampler=_Logging(0, log), engine=engine)
    assert [result.error for result in run.results] == [None, None]
    assert log


def test_rollout_draws_never_share_a_key_with_expansion_samples():
    """A leaf's rollout and its expansion's samples (candidates and widenings) draw from separate streams."""
    key = extend_key(seed_key(0), [1, 2, 3])
    config = RainConfig()
    streams = range(1, config.candidates + config.max_children * config.widen_group + 1)
    assert draw_key(key, ROLLOUT_STREAM) not in {draw_key(key, stream) for stream in streams}


def test_draws_left_on_the_device_are_the_draws_of_draw_many():
    """The tree engine reads the built-in samplers' pools with a call's other outputs (draw_many_on_device): the
    same tokens draw_many gives, from a generator in the same state. A subclass that draws otherwise keeps its own
    draw_many."""
    from fastalign.rain.sampling import on_device_draws
    probs = torch.softmax(torch.randn(3, 50), dim=-1)
    keys = [draw_key(seed_key(0), s) for s in range(3)]
    for make in (lambda: TorchSampler(7).for_prompt(2), lambda: KeyedSampler(7)):
        drawn = on_device_draws(make())(probs, keys, 16)
        assert drawn.dtype == torch.int64 and drawn.tolist() == make().draw_many(probs, keys, 16)

    class Greedy(TorchSampler):
        def draw_many(self, probs, keys, count):
            return probs.argmax(-1, keepdim=True).expand(-1, count).tolist()
    assert on_device_draws(Greedy()) is None and on_device_draws(object()) is None


def test_keyed_draws_put_their_uniforms_on_the_device_by_index_on(monkeypatch):
    """The keyed sampler's uniforms, built on the host, go to the device by index_on's non-blocking copy, once per
    call (torch.tensor(list, device=cuda) made the host wait for the device's queue each call), and are the float64
    uniforms (mixed key >> 11) / 2**53 the host computes, bit for bit."""
    calls = []

    def counted(index, device):
        calls.append(len(index))
        return index_on(index, device)
    monkeypatch.setattr(sampling, "index_on", counted)
    probs = torch.softmax(torch.randn(5, 40), dim=-1)
    keys = [draw_key(seed_key(3), s) for s in range(5)]
    drawn = KeyedSampler(3).draw_many_on_device(probs, keys, 1)
    assert calls == [5]
    u = torch.tensor([(sampling._mix64(k ^ seed_key(3)) >> 11) / float(1 << 53) for k in keys], dtype=torch.float64)
    cdf = probs.double().cumsum(-1)
    assert drawn.tolist() == torch.searchsorted(cdf, u[:, None] * cdf[:, -1:], right=True).tolist()


class _PlugIn:
    """A plug-in sampler that returns the draws it is given; for_prompt, when given, returns that."""
    repeatable = False

    def __init__(self, columns=None, pools=None):
        self.columns, self.pools = columns, pools

    def draw(self, probs, keys):
        return self.columns

    def draw_many(self, probs, keys, count):
        return self.pools


class _PerPrompt(_PlugIn):
    def for_prompt(self, index):
        return TorchSampler(index) if index == 0 else _PlugIn(columns=[index])


class _OwnPools(KeyedSampler):
    def draw_many(self, probs, keys, count):
        return [[0]] * len(keys)


def test_plug_in_samplers_are_checked_and_built_in_draws_trusted():
    """A plug-in sampler's draws (integers of any kind, lists or tensors) reach the search as lists of ints; a
    built-in sampler, or a subclass that keeps both its draws (its pools stay on the device), is used as it is."""
    probs = torch.full((2, 5), 0.2)
    plug_in = check_sampler(_PlugIn(columns=[np.int64(4), torch.tensor(0)], pools=[[1, 2], torch.tensor([3])]))
    assert isinstance(plug_in, CheckedSampler) and plug_in.repeatable is False
    assert plug_in.draw(probs, [1, 2]) == [4, 0] and plug_in.draw_many(probs, [1, 2], 2) == [[1, 2], [3]]
    assert plug_in.for_prompt(3) is plug_in                    # one sampler for every prompt, as before
    per_prompt = check_sampler(_PerPrompt())
    assert isinstance(prompt_sampler(per_prompt, 0), TorchSampler)
    assert prompt_sampler(per_prompt, 2).draw(probs[:1], [0]) == [2]
    with pytest.raises(ValueError, match=re.escape("sampler: _PlugIn.draw's columns: 7 is not in [0, 5)")):
        prompt_sampler(per_prompt, 7).draw(probs[:1], [0])
    for sampler in (TorchSampler(0), KeyedSampler(1), type("Seeded", (TorchSampler,), {})(2)):
        assert check_sampler(sampler) is sampler
    assert isinstance(check_sampler(_OwnPools()), CheckedSampler)


@pytest.mark.parametrize("columns, pools, message", [
    ([0], None, "_PlugIn.draw returned 1 columns for 2 rows: expected one per row"),
    ([0, 5], None, "_PlugIn.draw's columns: 5 is not in [0, 5)"),
    ([-1, 0], None, "_PlugIn.draw's columns: -1 is not in [0, 5)"),
    ([0, 1.0], None, "_PlugIn.draw's columns: expected integers, got [0, 1.0]"),
    (None, [[1]], "_PlugIn.draw_many returned 1 pools for 2 rows: expected one per row"),
    (None, [[1], []], "_PlugIn.draw_many returned 0 draws for row 1: expected 1 to 3"),
    (None, [[1], [1, 2, 3, 4]], "_PlugIn.draw_many returned 4 draws for row 1: expected 1 to 3"),
    (None, [[1], [7]], "_PlugIn.draw_many's pool of row 1: 7 is not in [0, 5)"),
    (None, [[1], 2], "_PlugIn.draw_many's pool of row 1: expected integers, got 2"),
    (None, 3, "_PlugIn.draw_many returned int: expected one list of token ids per row"),
])
def test_a_plug_in_sampler_s_bad_draws_are_errors_naming_it(columns, pools, message):
    """Unchecked, an empty pool made the tree engine draw again forever, and a bad column failed deep in a search."""
    sampler, probs = check_sampler(_PlugIn(columns, pools)), torch.full((2, 5), 0.2)
    with pytest.raises(ValueError, match=re.escape(f"sampler: {message}")):
        if columns is not None:
            sampler.draw(probs, [1, 2])
        else:
            sampler.draw_many(probs, [1, 2], 3)


def test_torch_pools_are_drawn_with_replacement():
    """A pool holds `count` independent draws: a row with one possible token gives that token `count` times (drawn
    without replacement, a pool could not repeat a token and a row with fewer possible tokens failed)."""
    probs = torch.tensor([[0.0, 1.0, 0.0], [0.5, 0.0, 0.5]])
    pools = TorchSampler(seed=0).draw_many(probs, [0, 0], 3)
    assert pools[0] == [1, 1, 1] and set(pools[1]) <= {0, 2}


def test_keyed_draws_read_unnormalised_weights_as_their_distribution():
    """Like torch.multinomial, the keyed sampler reads a row's weights relative to its total: weights scaled by 3
    or by 1/3 draw the tokens the normalised row draws (unscaled, most draws fell on the last token or the first)."""
    probs = torch.softmax(torch.randn(64, 20, generator=torch.Generator().manual_seed(0)), dim=-1)
    keys = [draw_key(seed_key(0), s) for s in range(64)]
    sampler = KeyedSampler(seed=1)
    drawn = sampler.draw(probs, keys)
    assert sampler.draw(probs * 3, keys) == drawn and sampler.draw(probs / 3, keys) == drawn


@pytest.mark.parametrize("mixed", [0, (1 << 64) - 1], ids=["u=0", "u=max"])
def test_keyed_draws_at_the_extreme_uniforms_never_fall_on_a_zero_weight_token(monkeypatch, mixed):
    """The keyed draw takes the first token whose cumulative weight exceeds u * total: at u = 0 that skips the
    zero-weight tokens before the first weighted one, and at the largest u it stops at the last weighted one."""
    monkeypatch.setattr(sampling, "_mix64", lambda x: mixed)
    probs = torch.tensor([[0.0, 0.0, 0.5, 0.0, 0.5, 0.0]])
    assert KeyedSampler(seed=0).draw(probs, [7]) == [2 if mixed == 0 else 4]


@pytest.mark.parametrize("repeatable", [None, "no", 1])
def test_a_plug_in_samplers_repeatable_must_be_a_bool(repeatable):
    """repeatable decides whether the engine reuses a pool's first draw: a truthy string taken as True drew one
    token for every rollout."""
    plug_in = type("Flagged", (_PlugIn,), {"repeatable": repeatable})()
    with pytest.raises(ValueError, match=re.escape("sampler: Flagged.repeatable must be True or False")):
        check_sampler(plug_in)


def test_a_plug_in_sampler_giving_more_pools_or_columns_than_rows_is_an_error():
    """A surplus pool or column was paired with no row (zip) and silently dropped: the draws then belonged to
    rows they were not drawn for."""
    probs = torch.full((2, 5), 0.2)
    with pytest.raises(ValueError, match=re.escape("_PlugIn.draw_many returned 3 pools for 2 rows")):
        check_sampler(_PlugIn(pools=[[1], [2], [3]])).draw_many(probs, [1, 2], 3)
    with pytest.raises(ValueError, match=re.escape("_PlugIn.draw returned 3 columns for 2 rows")):
        check_sampler(_PlugIn(columns=[1, 2, 3])).draw(probs, [1, 2])


def test_top_k_probabilities_are_float32_whatever_the_logits_dtype():
    """A bfloat16 model's priors are products of these probabilities: cast back to bfloat16 they kept 3 digits."""
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0, -1.0]], dtype=torch.bfloat16)
    ids, probs = top_k_distribution(logits, 3)
    assert probs.dtype == torch.float32
    torch.testing.assert_close(probs[0], torch.softmax(torch.tensor([3.0, 1.0, 2.0]), dim=0), rtol=0, atol=1e-7)


@pytest.mark.parametrize("k, rank", [(15, 20), (20, 15), (5, 5), (40, 60)])
def test_top_k_and_ranked_gives_both_from_one_topk(k, rank):
    """The same ids, probabilities and ranked logits as top_k_distribution and ranked_token_tensors (k and rank
    either way round, past the vocabulary), from one topk over the vocabulary instead of one each (float32 logits:
    no exact ties, where either may keep another of the tied ids)."""
    logits = torch.randn(6, 50) * 4
    ops = []

    class Topks(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            ops.append(func.overloadpacket)
            return func(*args, **(kwargs or {}))

    with Topks():
        both = top_k_and_ranked(logits, k, rank)
    assert ops.count(torch.ops.aten.topk) == 1
    expected = [*top_k_distribution(logits, k), *ranked_token_tensors(logits, rank)]
    for got, wanted in zip([*both[0], *both[1]], expected):
        assert torch.equal(got, wanted)


def test_make_sampler_seeds_the_sampler_it_makes():
    """The run's seed reaches both built-in samplers (a torch sampler seeded 0 whatever the seed drew alike)."""
    assert make_sampler("torch", 5).seed == 5 and make_sampler("keyed", 6).seed == 6
    assert isinstance(make_sampler("torch", 5), TorchSampler) and isinstance(make_sampler("keyed", 5), KeyedSampler)
    with pytest.raises(ValueError, match="sampler must be 'torch' or 'keyed', got 'Torch'"):
        make_sampler("Torch", 0)
