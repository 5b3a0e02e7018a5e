"""How a Hugging Face model is handed its KV cache and returns it, across transformers versions.

transformers 5.17 names both the forward argument and the output field `past_key_values`; newer releases
name them `cache` (keeping the old argument, deprecated, until 5.40). fastalign supports both.
"""
import functools
import inspect


@functools.lru_cache(maxsize=None)
def _cache_parameters(model_class) -> frozenset:
    return frozenset({"cache", "past_key_values"} & set(inspect.signature(model_class.forward).parameters))


def _base_class(model):
    """The class whose forward takes the cache: a PEFT wrapper's forward names neither argument and hands its keyword
    arguments on to the transformers model it wraps."""
    return type(model.get_base_model() if hasattr(model, "get_base_model") else model)


def cache_kwargs(model, cache) -> dict:
    """The keyword argument that passes `cache` to model's forward."""
    return {"cache" if "cache" in _cache_parameters(_base_class(model)) else "past_key_values": cache}


def takes_a_cache(model) -> bool:
    """Whether model's forward has a cache argument of either name (RWKV's takes its own `state` instead)."""
    return bool(_cache_parameters(_base_class(model)))


def returned_cache(output):
    """The cache a forward returned (None if it returned none)."""
    cache = getattr(output, "cache", None)
    return getattr(output, "past_key_values", None) if cache is None else cache
