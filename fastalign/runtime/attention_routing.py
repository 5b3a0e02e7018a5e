"""Routing a Hugging Face model's attention calls to a handler while one of its forwards runs.

transformers' decoders compute q, k and v (projections, q/k norms, rotary embeddings of any kind) in their own
attention modules and then call the function that `config._attn_implementation` names in its AttentionInterface.
`routed(configs, handler)` points the model's configs at the function registered here, which passes every call
made in this thread to `handler`; when the block ends the configs name their own implementation again (the blocks
recorded on each config let blocks of several threads overlap). With a name transformers has no mask function for, its
decoders build no attention mask: the handler masks as it attends. A call from a thread without a handler (the
model used elsewhere while a runner's forward runs in it) is refused rather than computed without its cache.
fastalign's own uses of the model's plain forward (the probes that make a runner) run in an `unrouted(configs)`
block instead: it waits until no other thread's routed block runs on those configs, and keeps new ones waiting.
"""
import contextlib
import threading

from transformers import AttentionInterface

IMPLEMENTATION = "fastalign_tree_runner"

_local = threading.local()        # .handler: this thread's handler while a routed block runs; .routing: see _routing
_changed = threading.Condition()  # guards the two below; notified as a block ends
_routed = {}                      # id(config) -> [its own implementation, the routed blocks running (tokens)]
_unrouted = {}                    # id(config) -> [the thread whose unrouted blocks run on it, those blocks (tokens)]


def _routed_attention(module, query, key, value, attention_mask, **kwargs):
    """The attention function the configs name while routed: this thread's handler computes the call."""
    handler = getattr(_local, "handler", None)
    if handler is None:
        raise RuntimeError("model: its attention is routed to a fastalign TreeRunner's KV pool while a forward of the "
                           "runner runs in another thread; run the model elsewhere after that call, or load a copy")
    return handler(module, query, key, value, attention_mask, kwargs)


AttentionInterface.register(IMPLEMENTATION, _routed_attention)


@contextlib.contextmanager
def routed(configs, handler):
    """Runs the block with the attention of every module whose config is one of `configs` computed by
    handler(module, query, key, value, attention_mask, kwargs) -> (output [batch, tokens, heads, head_dim], None),
    query/key/value as transformers passes them ([batch, heads, tokens, head_dim]). It waits while another thread's
    unrouted block runs on one of them, but not for one that waits for this thread's routed blocks to end (a block
    nested in them would wait for itself)."""
    routing, me, outer, registered = _routing(), threading.get_ident(), getattr(_local, "handler", None), []
    token = object()
    try:
        with _changed:
            _changed.wait_for(lambda: _unrouted_only_by({me, *_waiting_for(routing)}, configs))
            for config in configs:
                registered.append(config)   # first: the finally undoes whatever of the rest a Ctrl-C let happen
                _join(_routed, id(config), config._attn_implementation, token)
                _join(routing, id(config), None, token)
                _set(config, IMPLEMENTATION)
        _local.handler = handler
        yield
    finally:
        _local.handler = outer
        with _changed:
            for config in registered:
                _leave(routing, id(config), token)
                left = _leave(_routed, id(config), token)
                if left is not None:
                    _set(config, left[0])
            _changed.notify_all()


@contextlib.contextmanager
def unrouted(configs):
    """Runs the block with `configs` naming their own implementations, as on an idle model, but for this thread's
    own routed blocks inside it: waits until no other thread's routed or unrouted block runs on them, and keeps new
    ones of other threads waiting until it ends. A RuntimeError inside a routed block of this thread on them (a
    runner of the model made within a forward of another of its runners), which would wait for itself."""
    if any(id(config) in _routing() for config in configs):
        raise RuntimeError("model: a TreeRunner of it is being made inside a forward of another of its runners in the "
                           "same thread; make it before or after that forward")
    me, claimed, token = threading.get_ident(), [], object()
    try:
        with _changed:
            _changed.wait_for(lambda: _unrouted_only_by({me}, configs))
            for config in configs:
                claimed.append(config)   # first: the finally undoes whatever of the rest a Ctrl-C let happen
                _join(_unrouted, id(config), me, token)
            _changed.wait_for(lambda: not any(id(config) in _routed for config in configs))
        yield
    finally:
        with _changed:
            for config in claimed:
                _leave(_unrouted, id(config), token)
            _changed.notify_all()


def _join(table, key, value, token):
    """Adds the block `token` to table[key] = [value, the blocks on key], made with `value` by the first (under
    _changed). A block, not a count: leaving one that had not joined yet (a Ctrl-C in between) is a no-op."""
    table.setdefault(key, [value, set()])[1].add(token)


def _leave(table, key, token):
    """Takes the block `token` off table[key], if on it; the entry, deleted, where no block is left on it (a Ctrl-C
    may have left it made and empty): what the caller undoes; else None."""
    entry = table.get(key)
    if entry is None:
        return None
    entry[1].discard(token)
    if entry[1]:
        return None
    del table[key]
    return entry


def _unrouted_only_by(threads, configs):
    """Whether no thread but `threads` (idents) runs an unrouted block on any of `configs` (under _changed)."""
    return all(id(config) not in _unrouted or _unrouted[id(config)][0] in threads for config in configs)


def _waiting_for(routing):
    """The threads with an unrouted block on a config of `routing` (a thread's routed blocks; under _changed): it
    came after those blocks (they waited for any before), so it waits for them to end and runs nothing until then."""
    return {_unrouted[key][0] for key in routing if key in _unrouted}


def attention_configs(model):
    """The distinct configs of `model`'s modules that name an attention implementation: the ones to route."""
    return list({id(m.config): m.config for m in model.modules()
                 if hasattr(getattr(m, "config", None), "_attn_implementation_internal")}.values())


def _routing():
    """This thread's routed blocks: config id -> [None, those running on it (tokens)]."""
    return _local.__dict__.setdefault("routing", {})


def _set(config, implementation):
    """config's own implementation set to `implementation`, not its sub-configs' (each is routed, or not, as itself)."""
    config._attn_implementation_internal = implementation
