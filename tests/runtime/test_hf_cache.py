"""HFCacheModel's batches of rows alike. (Its random trees match Hugging Face's logits in test_tree_runner.py, on the
"-fallback" models of tiny_models.py; its refusals are in test_tree_runner_errors.py.)"""
import warnings

import pytest
import torch
from transformers import BloomForCausalLM, Llama4ForCausalLM

from fastalign import TreeRunner
from fastalign.runtime.hf_cache import HFCacheModel
from tests.runtime.tiny_models import (CONFIGS, VOCAB, CountedForward, assert_matches, drawn_weights, fill_with_nan,
                                      tiny_model)
from tests.vocab_rows import rows_of_prefill_last_and_cuts

FALLBACKS = ["bloom-alibi-fallback", "mpt-alibi-fallback", "llama4-chunked-fallback"]


def cache_runner(name="bloom-alibi-fallback"):
    """(model, TreeRunner on HFCacheModel with a NaN-filled pool: padding read from unwritten slots would poison
    the logits, and a list that receives the model's forward calls: (batch rows, tokens per row, logits positions
    kept)), counting from after the probes."""
    model = tiny_model(name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # the fallback's warning (test_hf_paged.py)
        runner = TreeRunner(model, max_tokens=128, block_size=4, attention_backend="torch")
    assert type(runner.model_runner).__name__ == "HFCacheModel"
    fill_with_nan(runner.pool)
    calls = []
    runner.model_runner.model = CountedForward(model, calls)
    return model, runner, calls


def test_rows_alike_run_as_one_batch_wherever_they_are_after_the_rows_they_extend():
    """Three children of the root extended by two tokens each, the third after the others in the call, are one
    forward of 3 rows; then two children of the first of them (one on a copy of its partly filled block, written
    from that forward's K/V) are another, a level above."""
    model, runner, calls = cache_runner()
    root = runner.prefill([5, 17, 3, 9, 2])
    del calls[:]
    children, logits = runner.extend([root, root, 0, 0, root], [[1, 2], [3, 4], [5], [6], [7, 8]], logits="all")
    assert calls == [(3, 2, 2), (2, 1, 1)]
    assert_matches(model, children, logits)


def test_rows_on_rows_of_the_call_run_level_by_level():
    """Two children of the root, each with a child of its own in the same call, interleaved: the rows on rows of the
    call wait for them, as one batch (the level above), not one batch each."""
    model, runner, calls = cache_runner()
    root = runner.prefill([5, 17, 3, 9])
    del calls[:]
    spans, logits = runner.extend([root, 0, root, 2], [[1], [2], [3], [4]], logits="all")
    assert calls == [(2, 1, 1), (2, 1, 1)]
    assert_matches(model, spans, logits)


@pytest.mark.parametrize("name", FALLBACKS)
def test_rows_from_contexts_of_different_lengths_run_as_one_batch_their_contexts_left_padded(name):
    """Rows of two new tokens each on contexts of 9, 12 and 10 tokens (three prompts' trees) ran as three forwards,
    one per context length: now one, the contexts left-padded in one cache and the padding masked, each row at its
    own positions (Bloom's and MPT's ALiBi biases follow the mask; Llama 4's chunks of 8 tokens, which the padding
    would shift, stay each row's own). Their children, again from three context lengths, match too. A row on a
    context of 3 tokens runs apart: padded to 14, its attention would cost it over four times as much."""
    model, runner, calls = cache_runner(name)
    assert runner.model_runner.pads_context
    roots = [runner.prefill(tokens)
             for tokens in (list(range(20, 29)), list(range(1, 13)), [4, 4, 12, 30, 6, 2, 7, 9, 11, 13])]
    del calls[:]
    children, logits = runner.extend(roots[:2] + roots[2:] * 2, [[1, 2], [3, 4], [5, 6], [7, 8]], logits="all")
    assert calls == [(4, 2, 2)]
    assert_matches(model, children, logits)
    short = runner.prefill([5, 17, 3])
    grandchildren, logits = runner.extend(children[:3] + [short], [[7], [8], [9], [10]], logits="all")
    assert calls[-2:] == [(3, 1, 1), (1, 1, 1)]
    assert_matches(model, grandchildren, logits)


class NoMaskForOneToken(BloomForCausalLM):
    """Bloom that drops its attention mask where each row runs one token (as a decoder that skips the mask while it
    decodes might)."""

    def forward(self, input_ids=None, attention_mask=None, **kwargs):
        return super().forward(input_ids=input_ids, attention_mask=None if input_ids.shape[1] == 1 else attention_mask,
                               **kwargs)


def test_a_model_whose_padding_shows_in_one_token_forwards_only_runs_rows_from_contexts_of_different_lengths_apart():
    """The padding probe continues its rows by 2 tokens and then by 1: a model that masks the padding in the first
    forward but attends to it in the second must be found out, or rows of one new token on contexts of 4 and 6 tokens
    run as one batch and the shorter one's logits are off by ~0.4."""
    bloom = tiny_model("bloom-alibi-fallback")
    model = NoMaskForOneToken(bloom.config).eval()
    model.load_state_dict(bloom.state_dict())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # the fallback's warning (test_hf_paged.py)
        runner = TreeRunner(model, max_tokens=64, block_size=4, attention_backend="torch")
    assert type(runner.model_runner).__name__ == "HFCacheModel" and not runner.model_runner.pads_context
    short, long = runner.prefill([5, 17, 3, 9]), runner.prefill([4, 4, 12, 30, 6, 2])
    calls = []
    runner.model_runner.model = CountedForward(model, calls)
    children, logits = runner.extend([short, long], [[1], [2]], logits="all")
    assert calls == [(1, 1, 1), (1, 1, 1)]
    assert_matches(model, children, logits)


def test_a_model_that_counts_positions_itself_runs_rows_from_contexts_of_different_lengths_apart():
    """Llama 4's layers without RoPE scale their queries by a temperature of positions counted from the cache's
    length, padding included: past floor_scale (8 here, 8192 in its checkpoints, past any probe) a row of 9 tokens
    padded to 15 was ~0.1 off its own forward's logits. Its config says so: rows of those contexts run apart."""
    config = CONFIGS["llama4-chunked-fallback"][1]()
    config.attn_temperature_tuning, config.floor_scale, config.attn_scale = True, 8, 0.5
    torch.manual_seed(0)
    model = drawn_weights(Llama4ForCausalLM(config))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # the fallback's warning (test_hf_paged.py)
        runner = TreeRunner(model, max_tokens=64, block_size=4, attention_backend="torch")
    assert type(runner.model_runner).__name__ == "HFCacheModel" and not runner.model_runner.pads_context
    short, long = runner.prefill(list(range(2, 11))), runner.prefill(list(range(20, 35)))
    calls = []
    runner.model_runner.model = CountedForward(model, calls)
    children, logits = runner.extend([short, long], [[5], [6]], logits="all")
    assert calls == [(1, 1, 1), (1, 1, 1)]
    assert_matches(model, children, logits)


def rebuilt_as(model_class, name):
    """The tiny model `name` rebuilt as `model_class` (a subclass of its class) with its weights, in eval mode."""
    tiny = tiny_model(name)
    model = model_class(tiny.config).eval()
    model.load_state_dict(tiny.state_dict())
    return model


class PositionsFromItsInput(Llama4ForCausalLM):
    """Llama 4 that numbers its new tokens from 0 whatever its cache holds (as a model drawing positions from the
    length of its input): it cannot continue a sequence from a cache."""

    def forward(self, input_ids=None, position_ids=None, **kwargs):
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)[None]
        return super().forward(input_ids=input_ids, position_ids=positions, **kwargs)


def test_a_model_whose_tokens_after_a_cache_differ_from_its_whole_forward_is_refused():
    """Its first tokens' logits are those of its whole forward and a token after a cache gets the same logits whatever
    ran in between; only tokens run after a cache of their sequence's first ones show that it cannot continue from
    one. Refused (the runner recomputes it) rather than extending every span ~1 off its own forward's logits."""
    model = rebuilt_as(PositionsFromItsInput, "llama4-chunked-fallback")
    with pytest.raises(ValueError, match="PositionsFromItsInput cannot run on the Hugging Face cache fallback: it is "
                                         "not causal"):
        HFCacheModel(model, torch.device("cpu"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # the fallback's warning (test_hf_paged.py)
        runner = TreeRunner(model, max_tokens=64, block_size=4, attention_backend="torch")
    assert type(runner.model_runner).__name__ != "HFCacheModel"
    children, logits = runner.extend([runner.prefill([3, 1, 4])], [[1, 5]], logits="all")
    assert_matches(model, children, logits)


class DriftsWithEachForward(BloomForCausalLM):
    """Bloom whose logits move by `drift` with every forward it has run (state kept in the module, as RecurrentGemma's
    recurrent layers keep theirs, but small)."""

    forwards, drift = 0, 0.05

    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        self.forwards += 1
        out.logits = out.logits + self.drift * self.forwards
        return out


@pytest.mark.parametrize("drift", [0.05, 0.004])
def test_a_model_whose_logits_drift_by_a_little_between_forwards_keeps_state_outside_its_cache(drift):
    """The state probe allows the rounding of the model's dtype (in fp32, 1e-4 of the logits' scale), not a drift
    between two runs of one token after one cache: such a model is refused for the state it keeps outside its cache
    (its rows' logits would depend on what ran before them). A fixed 2e-2 tolerance let a drift of 0.004 a forward
    through, and the model was refused as "not causal", which it is."""
    model = rebuilt_as(DriftsWithEachForward, "bloom-alibi-fallback")
    model.drift = drift
    with pytest.raises(ValueError, match="DriftsWithEachForward cannot run on the Hugging Face cache fallback: it "
                                         "keeps state outside its cache"):
        HFCacheModel(model, torch.device("cpu"))


def test_a_copy_of_a_later_rows_partly_filled_block_gets_that_rows_kv_from_its_own_group():
    """Two children of a span made by the call's second row (the first, of another length, runs in another group),
    the second on a copy of that row's partly filled block: the copy gets the row's one new token's K/V from the
    group's own K/V, found by its place in that group, not by its index in the batch (nor left out, being one)."""
    model, runner, calls = cache_runner()
    root = runner.prefill([5, 17])
    del calls[:]
    children, logits = runner.extend([root, root, 1, 1], [[1, 2], [3], [4], [6]], logits="all")
    assert sorted(calls) == [(1, 1, 1), (1, 2, 2), (2, 1, 1)]
    assert_matches(model, children, logits)


def test_a_group_of_rows_a_level_up_runs_after_every_group_below_it_whenever_it_was_formed():
    """Rows on the call's first and third rows (alike, so one group a level up) are one forward; that group, formed
    at the second row, before the third row's own group, still runs after it, reading its K/V from the pool."""
    model, runner, calls = cache_runner()
    root = runner.prefill([5, 17, 3])
    del calls[:]
    spans, logits = runner.extend([root, 0, root, 2], [[1], [2], [3, 4], [5]], logits="all")
    assert calls == [(1, 1, 1), (1, 2, 2), (2, 1, 1)]
    assert_matches(model, spans, logits)


def test_a_forward_computes_logits_at_the_tokens_read_alone():
    """The model ran without logits_to_keep: a prefill of n tokens made [n, vocab] logits nobody reads (it computes
    no outputs), and extend(logits="last") made, and copied, every new token's where one row per returned span is
    read (an 8k-token prompt at Llama 4's 202048 words in bf16: 3.3 GB a copy). Now the lm_head runs at the tokens
    read, the last one where none is; with cuts (of rows run as one batch) at the positions read in either row."""
    model, runner, _ = cache_runner()
    rows, (children, logits), (spans, cut_logits) = rows_of_prefill_last_and_cuts(runner, VOCAB)
    assert rows == (1, 2, 2 * 3)   # at cuts: positions 2, 4 and 7 of both rows
    assert_matches(model, children, logits[:, None])
    assert_matches(model, [span for row in spans for span in row], cut_logits[:, None])
