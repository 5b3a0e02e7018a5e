"""How a Hugging Face model is handed its KV cache and returns it, across transformers versions.

transformers 5.17 names both the forward argument and the output field `past_key_values`; newer releases
name them `cache` (keeping the old argument, deprecated, until 5.40). fastalign supports both.
"""
import functools
import inspect


@functools.lru_cache(maxsize=None)
def _argument_name(model_class) -> str:
    return "cache" if "cache" in inspect.signature(model_class.forward).parameters else "past_key_values"


def cache_kwargs(model, cache) -> dict:
    """The keyword argument that passes `cache` to model's forward. A PEFT wrapper's forward names neither and hands
    its keyword arguments on to the transformers model it wraps, whose forward is the one that takes it."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return {_argument_name(type(base)): cache}


def returned_cache(output):
    """The cache a forward returned (None if it returned none)."""
    cache = getattr(output, "cache", None)
    return getattr(output, "past_key_values", None) if cache is None else cache
