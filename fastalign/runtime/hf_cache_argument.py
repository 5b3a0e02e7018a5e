"""How a Hugging Face model is handed its KV cache and returns it, across transformers versions.

transformers 5.17 names both the forward argument and the output field `past_key_values` (`cache_params` for the
Mamba models); newer releases name them `cache` (keeping the old arguments, deprecated, until 5.40). fastalign
supports all three. Also whether a forward takes logits_to_keep (its lm_head at the positions read alone), and which
PEFT prompt-learning adapters a forward per new token over the cache runs as PEFT's forward does, the cache a
prefix-tuned model's decoding starts with, and whether a prefix's K/V passed as past_key_values reached the forward.
"""
import functools
import importlib.metadata
import inspect

from fastalign.base_model import base_causal_lm
from fastalign.model_decoder import prompt_learning_adapter

_NAMES = ("cache", "past_key_values", "cache_params")   # the first a forward takes is the one used
_CACHE_NAMES = frozenset(_NAMES)
_KV_PREFIXES = ("PREFIX_TUNING", "CARTRIDGE")   # PEFT's adapters whose K/V its forward passes as the cache


@functools.lru_cache(maxsize=None)
def _taken(model_class, names: frozenset) -> frozenset:
    """Which of `names` model_class's forward takes: those it names; for a forward that names none but takes **kwargs
    (a subclass's override handing them to its base class's forward), those of the nearest forward above it that
    names one."""
    for cls in model_class.__mro__:
        if "forward" not in vars(cls):
            continue
        parameters = inspect.signature(vars(cls)["forward"]).parameters
        found = names & set(parameters)
        if found or not _takes_keywords(parameters):
            return found
    return frozenset()


def _takes_keywords(parameters) -> bool:
    return any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())


def _base_class(model):
    """The class whose forward takes the cache: a PEFT wrapper's forward (and torch.compile's) names neither argument
    and hands its keyword arguments on to the transformers model it wraps."""
    return type(base_causal_lm(model))


def cache_kwargs(model, cache) -> dict:
    """The keyword argument that passes `cache` to model's forward (`past_key_values` where it names none)."""
    names = _taken(_base_class(model), _CACHE_NAMES)
    return {next((name for name in _NAMES if name in names), "past_key_values"): cache}


def takes_a_cache(model) -> bool:
    """Whether model's forward has a cache argument of any of these names (RWKV's takes its own `state` instead)."""
    return bool(_taken(_base_class(model), _CACHE_NAMES))


def takes_logits_to_keep(model) -> bool:
    """Whether model's forward takes logits_to_keep, as transformers' models do: then a caller reading a few
    positions' logits makes those alone, not [batch, tokens, vocab]. Asked of the forward a call runs, the
    instance's (a forward set on it, an accelerate wrapper); one that takes **kwargs hands them on, as PEFT's
    wrappers and a subclass's override do, to a forward that may take it (the base model's class's, up its MRO)."""
    parameters = inspect.signature(model.forward).parameters
    if "logits_to_keep" in parameters:
        return True
    return _takes_keywords(parameters) and bool(_taken(_base_class(model), frozenset({"logits_to_keep"})))


def returned_cache(output):
    """The cache a forward returned (None if it returned none)."""
    for name in _NAMES:
        cache = getattr(output, name, None)
        if cache is not None:
            return cache
    return None


def refuse_prompt_adapter_over_a_cache(model, decoding: str, kv_prefix: bool = True) -> None:
    """ValueError where `model`'s active PEFT adapter is a prompt-learning one that `decoding`, a forward per new token
    over the KV cache, runs otherwise than PEFT's forward does (answering what the model does not): one that puts
    virtual tokens before the inputs (prompt tuning, P-tuning, ...), which PEFT's forward prepends at every call, also
    before a token decoded over the cache (and before left pads, with position_ids dropped); and prefix tuning (or a
    cartridge) where `decoding` does not start its cache with the prefix's K/V (`kv_prefix` False): PEFT's forward
    passes them as the cache at every call, which would replace the decoding's cache at every step."""
    adapter = prompt_learning_adapter(model)
    if adapter is None:
        return
    if model.active_peft_config.peft_type not in _KV_PREFIXES:
        raise ValueError(f"model: its PEFT adapter ({adapter}) is a prompt-learning adapter whose virtual tokens "
                         f"PEFT's forward puts before the inputs at every call, also before each token {decoding} "
                         "decodes over the KV cache, which would answer what the model does not; use an adapter in "
                         "the layers (LoRA and its kin, merged or not)")
    if not kv_prefix:
        raise ValueError(f"model: its PEFT adapter ({adapter}) is a prompt-learning adapter whose K/V PEFT's forward "
                         f"passes as the KV cache at every call, which {decoding} does not start its cache with (it "
                         "would answer what the model does not); use an adapter in the layers (LoRA and its kin, "
                         "merged or not)")


def prefix_length(model) -> int:
    """How many positions the K/V of `model`'s active prefix-tuning (or cartridge) adapter put before the inputs in
    PEFT's forward (0 for any other model)."""
    if prompt_learning_adapter(model) is None or model.active_peft_config.peft_type not in _KV_PREFIXES:
        return 0
    return model.active_peft_config.num_virtual_tokens


def prefix_start(model, batch_size: int) -> tuple:
    """(the model that forwards over a cache run, the keyword argument that starts its cache, how many positions that
    cache holds): for a model under a PEFT prefix-tuning (or cartridge) adapter, the transformers model it wraps and a
    cache of `batch_size` rows that starts with the adapter's K/V (PEFT's get_prompt), which later forwards carry on.
    PEFT's own forward passes them at every call, as the cache where the model takes it under the name PEFT passes
    (peft 0.22 on transformers 5.24+, transformers 5.17), which replaced the cache at every decoding step. A caller
    puts that many ones before each row's attention mask and adds it to the position ids, as PEFT's forward does.
    Any other model: itself, no argument, 0."""
    length = prefix_length(model)
    if not length:
        return model, {}, 0
    wrapped = base_causal_lm(model)
    return wrapped, cache_kwargs(wrapped, model.get_prompt(batch_size)), length


def refuse_a_prefix_not_taken(cache, expected: int, passed_by: str) -> None:
    """ValueError where `cache`, which a forward given K/V as past_key_values returned (or updated: the one passed),
    holds other than `expected` positions: the forward did not take the K/V. PEFT passes a prefix's K/V (prefix
    tuning, a cartridge) as past_key_values, which transformers maps to the forward's `cache` until 5.40; a forward
    whose **kwargs swallow it instead runs as the model without them, silently."""
    held = 0 if cache is None else cache.get_seq_length()
    if held != expected:
        raise ValueError(f"{passed_by}: the K/V passed as past_key_values did not reach the model's forward (the cache "
                         f"it left holds {held} positions, not the {expected} of the K/V and the inputs), so it would "
                         f"answer and train as the model without them; transformers {_version('transformers')} and "
                         f"peft {_version('peft')} no longer hand PEFT's past_key_values to the forward's cache: use "
                         "an adapter in the layers (LoRA and its kin), or versions that do")


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "(not installed)"
