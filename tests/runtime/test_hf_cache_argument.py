"""hf_cache_argument: the cache goes to the forward argument the model names and is read back from either
output field, under transformers' old convention (`past_key_values`) and its new one (`cache`)."""
import functools
import inspect
import re
from types import SimpleNamespace

import pytest
import torch

from fastalign.runtime.hf_cache_argument import (cache_kwargs, prefix_length, prefix_start, refuse_a_prefix_not_taken,
                                                 returned_cache, takes_a_cache, takes_logits_to_keep)
from tests.runtime.tiny_models import tiny_model


class NewStyle:
    def forward(self, input_ids, cache=None, **kwargs):
        pass


class OldStyle:
    def forward(self, input_ids, past_key_values=None, **kwargs):
        pass


def test_the_cache_goes_to_the_argument_the_forward_names():
    cache = object()
    assert cache_kwargs(NewStyle(), cache) == {"cache": cache}
    assert cache_kwargs(OldStyle(), cache) == {"past_key_values": cache}


class Wrapper:  # as PEFT's wrappers: a forward naming neither argument, its keywords handed on to the model wrapped
    def __init__(self, base):
        self.base = base

    def forward(self, input_ids=None, **kwargs):
        pass

    def get_base_model(self):
        return self.base


class BothStyles:  # a release between the conventions: both arguments named, the old one deprecated
    def forward(self, input_ids, cache=None, past_key_values=None, **kwargs):
        pass


def test_a_forward_naming_both_gets_the_new_argument():
    """`past_key_values` warns that it goes away: where the forward names both, the cache goes to `cache`."""
    cache = object()
    assert cache_kwargs(BothStyles(), cache) == {"cache": cache}


def test_a_wrapper_passes_the_cache_under_the_name_its_base_model_takes():
    cache = object()
    assert cache_kwargs(Wrapper(NewStyle()), cache) == {"cache": cache}
    assert cache_kwargs(Wrapper(OldStyle()), cache) == {"past_key_values": cache}


class NoCache:  # as RWKV's: its own state, under an argument of its own
    def forward(self, input_ids, state=None, **kwargs):
        pass


def test_a_forward_takes_a_cache_under_either_name_or_none():
    assert takes_a_cache(NewStyle()) and takes_a_cache(OldStyle()) and takes_a_cache(Wrapper(OldStyle()))
    assert not takes_a_cache(NoCache()) and not takes_a_cache(Wrapper(NoCache()))


def override(base):
    """A user's subclass of `base` whose forward names no cache and hands its keywords on to base's forward."""
    class Override(base):
        def forward(self, input_ids=None, **kwargs):
            return super().forward(input_ids, **kwargs)
    return Override


def test_an_override_handing_its_keywords_on_gets_the_argument_of_the_forward_it_calls():
    cache = object()
    assert cache_kwargs(override(NewStyle)(), cache) == {"cache": cache}
    assert cache_kwargs(override(OldStyle)(), cache) == {"past_key_values": cache}
    assert takes_a_cache(override(NewStyle)()) and takes_a_cache(override(OldStyle)())
    assert not takes_a_cache(override(NoCache)())
    # a transformers model's: under the name its class's forward takes (`cache` since transformers 5.25, where
    # `past_key_values` warns that it goes in 5.40)
    bloom = tiny_model("bloom-alibi-fallback")
    (name,) = cache_kwargs(override(type(bloom))(bloom.config), None)
    assert name in inspect.signature(type(bloom).forward).parameters


class ExplicitArguments(OldStyle):  # an override that names no cache and takes no keywords to hand on
    def forward(self, input_ids, attention_mask=None):
        pass


def test_an_override_taking_no_keywords_takes_no_cache_whatever_its_base_class_takes():
    """Its base class's cache argument never reaches the base's forward: the fallback's refusal must say the forward
    takes no cache, not pass it one."""
    assert not takes_a_cache(ExplicitArguments())


def test_a_peft_lora_model_gets_the_argument_its_transformers_model_names():
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(tiny_model("llama-gqa-untied"), peft.LoraConfig(r=2, target_modules=["q_proj"]))
    (name,) = cache_kwargs(model, None)
    assert name in inspect.signature(type(model.get_base_model()).forward).parameters


def test_a_compiled_model_gets_the_argument_and_logits_to_keep_of_the_model_it_wraps():
    """torch.compile's wrapper, like PEFT's, hands its keywords on: its own forward's class named no cache, so a
    compiled model took no cache (the fallback refused it) and was given `past_key_values` where it takes `cache`."""
    model = tiny_model("qwen2-tied")
    compiled = torch.compile(model)   # a wrapper only: nothing is compiled before it runs
    assert cache_kwargs(compiled, None) == cache_kwargs(model, None) and takes_a_cache(compiled)
    assert takes_logits_to_keep(compiled) == takes_logits_to_keep(model) is True


class KeepsLogits:
    def forward(self, input_ids, logits_to_keep=0, **kwargs):
        pass


def test_logits_to_keep_is_asked_of_the_forward_a_call_runs():
    """Every caller (the runners, evaluation, the slow engine) asks here: a forward that names it takes it; one that
    hands its keywords on (PEFT's wrapper, a subclass's override) takes what the forward it calls takes; a forward
    set on the instance that takes no keywords does not, whatever its class's forward takes."""
    assert takes_logits_to_keep(KeepsLogits()) and not takes_logits_to_keep(OldStyle())
    assert takes_logits_to_keep(Wrapper(KeepsLogits())) and not takes_logits_to_keep(Wrapper(OldStyle()))
    assert takes_logits_to_keep(override(KeepsLogits)()) and not takes_logits_to_keep(override(OldStyle)())
    model = KeepsLogits()
    model.forward = lambda input_ids, attention_mask=None: None
    assert not takes_logits_to_keep(model)
    model.forward = lambda input_ids, **kwargs: None
    assert takes_logits_to_keep(model)


def test_the_returned_cache_is_read_from_either_output_field():
    cache = object()
    assert returned_cache(SimpleNamespace(cache=cache, past_key_values=None)) is cache
    assert returned_cache(SimpleNamespace(past_key_values=cache)) is cache
    assert returned_cache(SimpleNamespace(cache=None, past_key_values=cache)) is cache
    assert returned_cache(SimpleNamespace(logits=None)) is None


class NamesLogitsToKeepAlone:   # an older transformers model's forward, or a user's: no **kwargs
    def forward(self, input_ids, logits_to_keep=0):
        pass


def test_a_forward_naming_logits_to_keep_without_keywords_takes_it():
    """The forwards above that name it all take **kwargs too, so asking only up the MRO of a forward that hands its
    keywords on passed: one naming it and taking no keywords (its class's, or one set on the instance) takes it."""
    assert takes_logits_to_keep(NamesLogitsToKeepAlone())
    model = OldStyle()
    model.forward = lambda input_ids, logits_to_keep=0: None
    assert takes_logits_to_keep(model)


def peft_prefix_argument() -> str:
    """The forward argument under which PEFT's forward passes a prefix's K/V: `cache` from peft 0.22 on transformers
    5.24 or later (peft's get_transformers_cache_name), past_key_values before."""
    try:
        from peft.import_utils import get_transformers_cache_name
    except ImportError:
        return "past_key_values"
    return get_transformers_cache_name()


def drop_past_key_values(monkeypatch, model_class) -> None:
    """model_class's forward, its signature kept, without the past_key_values it is given: as a forward whose **kwargs
    swallow them would run once transformers maps them to `cache` no more (5.40). Skips where PEFT passes the prefix
    as `cache` (peft 0.22 on transformers 5.24+) or the forward names its cache past_key_values (transformers 5.17):
    nothing maps past_key_values there."""
    forward = model_class.forward
    if peft_prefix_argument() != "past_key_values" or "past_key_values" in inspect.signature(forward).parameters:
        pytest.skip(f"PEFT passes the prefix as {peft_prefix_argument()} to a {model_class.__name__}.forward: no "
                    "mapping of past_key_values to its cache to stand in for")

    @functools.wraps(forward)
    def dropping(self, *args, **kwargs):
        kwargs.pop("past_key_values", None)
        return forward(self, *args, **kwargs)
    monkeypatch.setattr(model_class, "forward", dropping)


def test_a_prefix_not_taken_is_refused_naming_the_adapter_and_the_versions():
    """A prefix's K/V that PEFT passes as past_key_values reach the model only while transformers maps that argument
    to the forward's `cache`: the cache it leaves must hold the prefix's positions and the inputs', else a
    ValueError that names who passed them and the transformers and peft versions."""
    peft = pytest.importorskip("peft")
    import transformers
    from transformers import DynamicCache
    cache = DynamicCache()
    cache.update(torch.randn(1, 2, 5, 4), torch.randn(1, 2, 5, 4), 0)
    refuse_a_prefix_not_taken(cache, 5, "model")
    versions = rf"transformers {re.escape(transformers.__version__)} and peft {re.escape(peft.__version__)}"
    with pytest.raises(ValueError, match=r"^the adapter: the K/V passed as past_key_values did not reach the model's "
                                         rf"forward \(the cache it left holds 5 positions, not the 8 .*{versions}"):
        refuse_a_prefix_not_taken(cache, 8, "the adapter")
    with pytest.raises(ValueError, match="holds 0 positions, not the 3"):
        refuse_a_prefix_not_taken(None, 3, "model")


@pytest.mark.parametrize("adapter", ["PrefixTuningConfig", "CartridgeConfig", "LoraConfig"])
def test_the_prefix_length_is_the_virtual_tokens_of_a_kv_prefix_alone(adapter):
    peft = pytest.importorskip("peft")
    settings = {"target_modules": ["q_proj"]} if adapter == "LoraConfig" else {"num_virtual_tokens": 3}
    config = getattr(peft, adapter)(task_type="CAUSAL_LM", **settings)
    model = peft.get_peft_model(tiny_model("llama-gqa-untied"), config)
    assert prefix_length(model) == (0 if adapter == "LoraConfig" else 3)
    assert prefix_length(model.get_base_model()) == 0


@pytest.mark.parametrize("adapter", ["PrefixTuningConfig", "CartridgeConfig", "LoraConfig"])
def test_a_kv_prefix_starts_the_cache_of_the_model_it_wraps(adapter):
    """A prefix-tuned (or cartridge) model's decoding runs on the transformers model under PEFT's wrapper, its cache
    started with the adapter's K/V for each row, under the cache argument that model takes; any other model runs
    itself, with no argument."""
    peft = pytest.importorskip("peft")
    settings = {"target_modules": ["q_proj"]} if adapter == "LoraConfig" else {"num_virtual_tokens": 3}
    model = peft.get_peft_model(tiny_model("llama-gqa-untied"), getattr(peft, adapter)(task_type="CAUSAL_LM",
                                                                                       **settings))
    runner, start, length = prefix_start(model, 2)
    if adapter == "LoraConfig":
        assert (runner, start, length) == (model, {}, 0)
        return
    assert runner is model.get_base_model() and length == 3
    (name, cache), = start.items()
    assert {name: cache} == cache_kwargs(runner, cache)
    key = cache.layers[0].keys
    assert cache.get_seq_length() == 3 and key.shape[0] == 2 and key.shape[2] == 3
