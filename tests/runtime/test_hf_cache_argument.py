"""hf_cache_argument: the cache goes to the forward argument the model names and is read back from either
output field, under transformers' old convention (`past_key_values`) and its new one (`cache`)."""
from types import SimpleNamespace

from fastalign.runtime.hf_cache_argument import cache_kwargs, returned_cache


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


def test_the_returned_cache_is_read_from_either_output_field():
    cache = object()
    assert returned_cache(SimpleNamespace(cache=cache, past_key_values=None)) is cache
    assert returned_cache(SimpleNamespace(past_key_values=cache)) is cache
    assert returned_cache(SimpleNamespace(cache=None, past_key_values=cache)) is cache
    assert returned_cache(SimpleNamespace(logits=None)) is None
