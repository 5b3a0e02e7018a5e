"""How a Hugging Face model is handed its KV cache and returns it, across transformers versions.

transformers 5.17 names both the forward argument and the output field `past_key_values` (`cache_params` for the
Mamba models); newer releases name them `cache` (keeping the old arguments, deprecated, until 5.40). fastalign
supports all three. Also whether a forward takes logits_to_keep (its lm_head at the positions read alone).
"""
import functools
import inspect

_NAMES = ("cache", "past_key_values", "cache_params")   # the first a forward takes is the one used


@functools.lru_cache(maxsize=None)
def _cache_parameters(model_class) -> frozenset:
    """The cache arguments of model_class's forward; for a forward that names none but takes **kwargs (a subclass's
    override handing them to its base class's forward), those of the nearest forward above it that names one."""
    for cls in model_class.__mro__:
        if "forward" not in vars(cls):
            continue
        parameters = inspect.signature(vars(cls)["forward"]).parameters
        names = frozenset(set(_NAMES) & set(parameters))
        if names or not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
            return names
    return frozenset()


def _base_class(model):
    """The class whose forward takes the cache: a PEFT wrapper's forward names neither argument and hands its keyword
    arguments on to the transformers model it wraps."""
    return type(model.get_base_model() if hasattr(model, "get_base_model") else model)


def cache_kwargs(model, cache) -> dict:
    """The keyword argument that passes `cache` to model's forward (`past_key_values` where it names none)."""
    names = _cache_parameters(_base_class(model))
    return {next((name for name in _NAMES if name in names), "past_key_values"): cache}


def takes_a_cache(model) -> bool:
    """Whether model's forward has a cache argument of any of these names (RWKV's takes its own `state` instead)."""
    return bool(_cache_parameters(_base_class(model)))


def takes_logits_to_keep(model) -> bool:
    """Whether model's forward (under a PEFT wrapper, whose forward names neither, its base model's) takes
    logits_to_keep, as transformers' models do: then a caller reading a few positions' logits makes those alone,
    not [batch, tokens, vocab]."""
    return "logits_to_keep" in inspect.signature(_base_class(model).forward).parameters


def returned_cache(output):
    """The cache a forward returned (None if it returned none)."""
    for name in _NAMES:
        cache = getattr(output, name, None)
        if cache is not None:
            return cache
    return None
