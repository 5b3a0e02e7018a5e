"""Routing a Hugging Face model's attention calls to a handler while one of its forwards runs.

transformers' decoders compute q, k and v (projections, q/k norms, rotary embeddings of any kind) in their own
attention modules and then call the function that `config._attn_implementation` names in its AttentionInterface.
`routed(configs, handler)` points the model's configs at the function registered here, which passes every call
made in this thread to `handler`; when the block ends the configs name their own implementation again (a count
per config lets blocks of several threads overlap). With a name transformers has no mask function for, its
decoders build no attention mask: the handler masks as it attends. A call from a thread without a handler (the
model used elsewhere while a runner's forward runs in it) is refused rather than computed without its cache.
"""
import contextlib
import threading

from transformers import AttentionInterface

IMPLEMENTATION = "fastalign_tree_runner"

_handlers = threading.local()   # .handler: this thread's handler while a routed block runs
_lock = threading.Lock()
_routed = {}                    # id(config) -> [its own implementation, routed blocks running]


def _routed_attention(module, query, key, value, attention_mask, **kwargs):
    """The attention function the configs name while routed: this thread's handler computes the call."""
    handler = getattr(_handlers, "handler", None)
    if handler is None:
        raise RuntimeError("model: its attention is routed to a fastalign TreeRunner's KV pool while a forward of the "
                           "runner runs in another thread; run the model elsewhere after that call, or load a copy")
    return handler(module, query, key, value, attention_mask, kwargs)


AttentionInterface.register(IMPLEMENTATION, _routed_attention)


@contextlib.contextmanager
def routed(configs, handler):
    """Runs the block with the attention of every module whose config is one of `configs` computed by
    handler(module, query, key, value, attention_mask, kwargs) -> (output [batch, tokens, heads, head_dim], None),
    query/key/value as transformers passes them ([batch, heads, tokens, head_dim])."""
    outer, _handlers.handler = getattr(_handlers, "handler", None), handler
    with _lock:
        for config in configs:
            entry = _routed.setdefault(id(config), [config._attn_implementation, 0])
            entry[1] += 1
            _set(config, IMPLEMENTATION)
    try:
        yield
    finally:
        _handlers.handler = outer
        with _lock:
            for config in configs:
                entry = _routed[id(config)]
                entry[1] -= 1
                if entry[1] == 0:
                    _set(config, entry[0])
                    del _routed[id(config)]


def _set(config, implementation):
    """config's own implementation set to `implementation`, not its sub-configs' (each is routed, or not, as itself)."""
    config._attn_implementation_internal = implementation
