"""Runs any Hugging Face causal LM whose layers attend through transformers' attention interface on the paged KV
pool, batched: Phi-3 and Phi-4, Granite, SmolLM3, Cohere, gpt-oss, GPT-2, GPT-NeoX, StableLM, Starcoder 2, ... (the
families that `layer_layouts` does not name).

The model's own forward runs every token of a ForwardBatch as one sequence, its positions given; each layer's
attention call (q, k, v as the layer computed and rotated them) is routed (attention_routing) to `pool_attention`,
which writes the new K/V into the pool and attends over each row's blocks. Everything else, the family's own
embeddings, norms, MLPs, multipliers and logit caps included, is the model's code. A probe at construction decides:
a one-token forward must route exactly one call per layer, with no mask or score bias of the model's own and no
argument the pool does not compute, and a six-token sequence on a scratch pool must give the model's own logits, in
one forward and split over two. A layer's window, soft cap and attention sinks (gpt-oss's s_aux) are the ones it
passes to the attention function (as FlashAttention receives them). Each layer has a pool layer of its own K/V
heads and head_dim (Gemma 4's full layers hold fewer, wider heads than its sliding ones), except a layer that attends
to the very K/V tensors an earlier layer of the forward attended to (Gemma 4's shared K/V layers): it reads that
layer's pool layer and stores nothing. V may be narrower than K (DeepSeek's latent attention, whose layers pass
per-head K and V, 192 and 128 wide): it is stored zero-padded to K's width.
"""
import contextlib
import inspect
import threading
from typing import NamedTuple, Optional

import numpy as np
import torch
import torch.nn.functional as F

from fastalign.eval_mode import eval_mode
from fastalign.model_context import runner_context
from fastalign.model_decoder import decoder_of
from fastalign.model_vocabulary import probe_ids
from fastalign.ops.checks import is_integer
from fastalign.runtime.attention_routing import attention_configs, routed
from fastalign.runtime.forward_batch import ForwardBatch
from fastalign.runtime.hf_cache import counted_positions_problem, state_problem
from fastalign.runtime.hf_cache_argument import takes_logits_to_keep
from fastalign.runtime.kv_pool import KVPool
from fastalign.runtime.module_hooks import runs_a_users_hooks
from fastalign.runtime.pool_attention import pool_attention

# arguments of an attention call that change nothing here: dropout is checked to be off, positions are already in
# the rotated q and k, the rest are flags of the forward
_INERT_ARGUMENTS = {"dropout", "position_ids", "cache_position", "use_cache", "output_attentions",
                    "output_router_logits", "is_causal"}
_COMPUTED_ARGUMENTS = {"scaling", "sliding_window", "softcap", "s_aux"}   # what pool_attention takes of a call
_PROBE_IDS = (1, 0, 2, 1, 3, 0)
_PROBE_SPLIT = 3   # the probe's second forward attends to the first one's K/V in the pool


_forwards = threading.local()   # .frames: the _PoolLayers of each PagedHF forward running in this thread


@contextlib.contextmanager
def _frame(layers):
    """The block with `layers` (its forward) this thread's innermost frame."""
    frames = _forwards.__dict__.setdefault("frames", [])
    frames.append(layers)
    try:
        yield
    finally:
        frames.pop()


def _innermost(layers):
    """Whether `layers`' forward is this thread's innermost PagedHF forward (not another thread's, nor one of another
    runner that runs nested in it)."""
    frames = getattr(_forwards, "frames", None)
    return bool(frames) and frames[-1] is layers


@contextlib.contextmanager
def _nested_forwards_refused(decoder, layers):
    """The block with a second entry into `decoder` during `layers`' forward refused: a forward of the model from
    inside the runner's (a hook on a layer that calls the model) would have its attention routed to the runner's pool,
    attend to the batch's context and write its K/V into the batch's slots. It is refused as it enters the decoder,
    before any of its layers attends; a forward of another runner nested in this one is its own innermost frame."""
    def enter(module, args):
        if not _innermost(layers):
            return
        if layers.entered:
            raise RuntimeError("model: a forward of it ran inside a forward of a TreeRunner of it in the same thread "
                               "(a hook that calls the model?), and would attend to the runner's KV pool: run it "
                               "before or after the runner's call")
        layers.entered = True
    hook = decoder.register_forward_pre_hook(enter, prepend=True)
    try:
        yield
    finally:
        hook.remove()


class _Unfit(Exception):
    """Why the probe refuses the model."""


class PagedHF:
    """The forward of a Hugging Face causal LM over a ForwardBatch, its attention computed on a KVPool."""

    paged = True   # attention on the pool, every row of a forward in one batch
    recomputes_context = False   # a row's context runs once, when its span is made (HFRecomputeModel: every call)

    def __init__(self, model, backend, device):
        self.model, self.device, self.backend = model, device, backend   # backend: resolved, "triton" or "torch"
        self.keeps_logits = takes_logits_to_keep(model)
        self.max_context = runner_context(model.config)
        problem = _structure_problem(model)
        try:
            if problem:
                raise _Unfit(problem)
            self.decoder = _decoder(model)
            self.configs = attention_configs(model)
            self._record_layers()
            self._check_against_own_forward()
        except _Unfit as unfit:
            raise ValueError(f"model: {type(model).__name__} cannot run on the paged pool: {unfit}") from None

    def forward(self, batch, pool, select, want_logits, want_hidden, logits_rows=None):
        """Writes the KV of every token of `batch` into `pool`; returns (logits, hidden) of the tokens at indices
        `select` (None: nothing), logits in float32 (only at select[logits_rows] when given), hidden = the decoder's
        last hidden state (after its final norm). Dropout is off whatever the model's mode."""
        layers = _PoolLayers(self, batch, pool)
        with _frame(layers), _nested_forwards_refused(self.decoder, layers), eval_mode(self.model), \
                routed(self.configs, layers):
            ids, positions = batch.input_ids[None], batch.positions[None]
            if select is None or not want_logits:
                hidden, logits = self.decoder(input_ids=ids, position_ids=positions, use_cache=False)[0][0], None
            else:
                logits, hidden = self._logits(ids, positions, select if logits_rows is None else select[logits_rows],
                                              layers if want_hidden else None)
        if layers.calls != len(self.layers):  # a layer skipped its attention: its K/V are missing from the pool
            raise RuntimeError(f"model: {layers.calls} of its {len(self.layers)} layers attended in this forward")
        if select is None:
            return None, None
        return logits, hidden[select] if want_hidden else None

    def _logits(self, ids, positions, at, layers):
        """The model's own logits (its logit scaling or caps applied) at token indices `at`, float32, and the
        decoder's last hidden state at every token when given this forward's `layers` (else None): the hook on the
        decoder, which other threads' runners of the model share, records only while that forward is this thread's
        innermost frame, not another thread's output nor that of another runner's forward nested in this one."""
        want_hidden = layers is not None
        captured = layers.captured if want_hidden else None

        def capture(module, args, out):
            if _innermost(layers):
                captured.append(out[0])
        hook = self.decoder.register_forward_hook(capture) if want_hidden else None
        try:
            kept = dict(logits_to_keep=at) if self.keeps_logits else {}
            logits = self.model(input_ids=ids, position_ids=positions, use_cache=False, **kept).logits[0]
        finally:
            if hook is not None:
                hook.remove()
        return (logits if self.keeps_logits else logits[at]).float(), captured[0][0] if want_hidden else None

    def _record_layers(self):
        """Each layer's attention as a one-token forward calls it (layers: a _Layer each), the layer whose K/V each
        one reads (reads_from: None for its own; an earlier layer whose very K and V tensors it was given), and the
        pool's layers: pool_index[layer] of each, and pool_shapes, (K/V heads, K's head_dim) of each layer that stores
        its own K/V."""
        recorder = _Recorder()
        ids = torch.tensor([probe_ids(self.model, _PROBE_IDS[:1])], device=self.device)
        _run_probe(lambda: self._routed_forward(ids, recorder))
        calls = recorder.calls
        if not calls:
            raise _Unfit("its layers do not attend through transformers' attention interface (no call reached it)")
        indices = sorted(calls)
        text_config = self.model.config.get_text_config(decoder=True)
        expected = getattr(text_config, "num_hidden_layers", len(indices))
        if indices != list(range(expected)):
            raise _Unfit(f"the attention calls of a forward came from layers {indices}, not once from each of its "
                         f"{expected} layers")
        self.layers = [calls[i] for i in indices]
        heads_and_dtypes = sorted({(layer.heads, str(layer.dtype)) for layer in self.layers})
        if len(heads_and_dtypes) > 1:
            raise _Unfit(f"its layers differ in query heads or dtype ({heads_and_dtypes}): one pool holds one dtype, "
                         "and the attention ops check one query shape per shape of K/V")
        self.dtype = self.layers[0].dtype
        self.reads_from = [recorder.source(i) for i in indices]
        self.sources = {i for i in self.reads_from if i is not None}
        own = [i for i in indices if self.reads_from[i] is None]
        self.pool_shapes = [(self.layers[i].kv_heads, self.layers[i].qk_dim) for i in own]
        at = {layer: place for place, layer in enumerate(own)}
        self.pool_index = [at[i if self.reads_from[i] is None else self.reads_from[i]] for i in indices]
        self.windows = [layer.window for layer in self.layers]
        _check_layer_types(text_config, self.windows)

    def _routed_forward(self, ids, handler):
        """The model's forward of `ids` [1, n], its attention calls routed to `handler`."""
        with torch.inference_mode(), eval_mode(self.model), routed(self.configs, handler):
            self.model(input_ids=ids, use_cache=False)

    def _check_against_own_forward(self):
        """The probe's sequence on a scratch pool: run in one forward, it gives the logits of the model's own forward
        within rounding of its dtype (16 ulp of the logits' scale; a tiny bf16 Gemma 4 differs by 7), and its last
        hidden states where the model reports them as one [1, tokens, hidden] tensor; split over two forwards (the
        first asking for no outputs, as a span brought back after eviction does; the second attending to its K/V in
        the pool), the same logits as in one (4 ulp: both are computed here). A mask or bias of the model's own fails
        the first; positions or state that the model draws from anything but the positions it is given fail the
        second, by far more than rounding."""
        ids = torch.tensor(probe_ids(self.model, _PROBE_IDS), device=self.device)
        with torch.inference_mode(), eval_mode(self.model):
            own = _run_probe(lambda: self.model(input_ids=ids[None], use_cache=False, output_hidden_states=True))
        pool = KVPool(self.pool_shapes, num_blocks=1, block_size=len(_PROBE_IDS), device=self.device,
                      dtype=self.dtype)

        def on_pool(spans):
            """(logits, last hidden states) of the last span's tokens, each span run in a forward of its own."""
            with torch.inference_mode():
                for n, (start, end) in enumerate(spans):
                    batch, last = _one_row_batch(ids, start, end, self.device), n == len(spans) - 1
                    out = _run_probe(lambda: self.forward(batch, pool, batch.outputs if last else None, True, last))
            return out
        (whole, whole_hidden), (split, _) = on_pool([(0, len(_PROBE_IDS))]), on_pool([(0, _PROBE_SPLIT),
                                                                                   (_PROBE_SPLIT, len(_PROBE_IDS))])
        ulp = torch.finfo(self.dtype).eps if self.dtype.is_floating_point else 0.0
        checks = [(whole, own.logits[0].float(), max(1e-4, 16 * ulp), "its logits on the pool differ from its own "
                   "forward's by {:.3g} of their scale (more than {:.3g}): it computes something of its own around "
                   "attention (a mask, a bias)"),
                  (split, whole[_PROBE_SPLIT:], max(1e-4, 4 * ulp), "its logits on the pool change by {:.3g} of their "
                   "scale (more than {:.3g}) when its sequence is split over two forwards: it draws positions or state "
                   "from something other than the positions it is given (its cache, the length of its input)")]
        own_hidden = own.hidden_states[-1] if own.hidden_states else None
        if isinstance(own_hidden, torch.Tensor) and own_hidden.shape[0] == 1 and own_hidden.shape[1:] == \
                whole_hidden.shape:
            checks.append((whole_hidden.float(), own_hidden[0].float(), max(1e-4, 16 * ulp), "the output of its "
                           f"decoder ({type(self.decoder).__name__}) differs from the last hidden states its own "
                           "forward reports by {:.3g} of their scale (more than {:.3g})"))
        for got, expected, tolerance, what in checks:
            error = float((got - expected).abs().max() / expected.abs().max().clamp(min=1e-6))
            if not error <= tolerance:
                raise _Unfit(what.format(error, tolerance))


class _Recorder:
    """A probe forward's attention handler: checks each call and records what the pool needs of its layer, and the
    K and V tensors it was given; answers as attention over one token does (each query head gets its K/V head's
    value)."""

    def __init__(self):
        self.calls, self.kv = {}, {}

    def source(self, index):
        """The first layer that was given the very K and V tensors that layer `index` was, if not `index` itself
        (the tensors are held here, so no other tensor can have taken their identity)."""
        key, value = self.kv[index]
        return next((i for i in sorted(self.kv) if i < index and self.kv[i][0] is key and self.kv[i][1] is value),
                    None)

    def __call__(self, module, query, key, value, attention_mask, kwargs):
        index = getattr(module, "layer_idx", None)
        if not is_integer(index):
            raise _Unfit(f"its attention module {type(module).__name__} has no integer layer_idx")
        if index in self.calls:
            raise _Unfit(f"layer {index} attended twice in one forward")
        if attention_mask is not None:
            raise _Unfit(f"layer {index} passes a mask or bias of its own to attention (ALiBi, ...)")
        if not getattr(module, "is_causal", True) or kwargs.get("is_causal", True) is False:
            raise _Unfit(f"layer {index} attends bidirectionally (is_causal=False)")
        if kwargs.get("dropout") not in (None, 0, 0.0):
            raise _Unfit(f"layer {index} applies attention dropout in eval mode ({kwargs['dropout']})")
        extra = sorted(name for name, v in kwargs.items() if name not in _INERT_ARGUMENTS | _COMPUTED_ARGUMENTS
                       and v is not None and v is not False)
        if extra:
            raise _Unfit(f"layer {index} passes {', '.join(extra)} to attention, which the paged attention does not "
                         "compute")
        if (query.dim() != 4 or key.shape[:-1] != value.shape[:-1] or query.shape[0] != 1
                or query.shape[-1] != key.shape[-1] or value.shape[-1] > key.shape[-1]):
            raise _Unfit(f"layer {index}'s q, k, v are not [1, heads, tokens, head_dim], q and k of one head_dim and "
                         f"v of no more (q {list(query.shape)}, k {list(key.shape)}, v {list(value.shape)})")
        heads, kv_heads, head_dim = query.shape[1], key.shape[1], key.shape[-1]
        sinks = kwargs.get("s_aux")
        if sinks is not None and not (isinstance(sinks, torch.Tensor) and sinks.is_floating_point()
                                      and sinks.shape == (heads,)):
            raise _Unfit(f"layer {index} passes attention sinks (s_aux) that are not one float per query head "
                         f"({heads})")
        if heads % kv_heads:
            raise _Unfit(f"layer {index} has {heads} query heads, not a multiple of its {kv_heads} K/V heads")
        window = kwargs.get("sliding_window")
        if window is not None and (not is_integer(window) or window < 1):
            raise _Unfit(f"layer {index} passes sliding_window={window!r}, not a positive int or None")
        scale = kwargs.get("scaling")
        self.calls[index] = _Layer(heads, kv_heads, head_dim, value.shape[-1], key.dtype, window,
                                   float(head_dim ** -0.5 if scale is None else scale), kwargs.get("softcap"))
        self.kv[index] = key, value
        return value.repeat_interleave(heads // kv_heads, dim=1).transpose(1, 2), None


class _Layer(NamedTuple):
    """What the pool needs of one layer's attention, as its probe call showed it."""

    heads: int
    kv_heads: int
    qk_dim: int
    v_dim: int
    dtype: torch.dtype
    window: Optional[int]
    scale: float
    softcap: Optional[float]


class _PoolLayers:
    """A forward's attention handler: each layer's call answered by `pool_attention` over the batch's rows; and its
    frame: whether it has entered the decoder, and the decoder's output it captured."""

    def __init__(self, runner, batch, pool):
        self.runner, self.batch, self.pool, self.calls = runner, batch, pool, 0
        self.given = {}   # layer -> the K and V tensors it was given, for the layers that later layers read
        self.entered, self.captured = False, []

    def __call__(self, module, query, key, value, attention_mask, kwargs):
        runner, index = self.runner, module.layer_idx
        if attention_mask is not None:  # none at the probe; one now would say more than the pool's causal rows do
            raise RuntimeError(f"model: layer {index} passed a mask or bias of its own to attention")
        layer, source = runner.layers[index], runner.reads_from[index]
        q = query[0].transpose(0, 1)   # [tokens, heads, head_dim]
        if source is None:
            k, v = key[0].transpose(0, 1), value[0].transpose(0, 1)
            if layer.v_dim < layer.qk_dim:
                v = F.pad(v, (0, layer.qk_dim - layer.v_dim))
            if index in runner.sources:
                self.given[index] = key, value
        else:   # its pool layer holds only the source's K/V: anything else would be attended to silently wrong
            given = self.given.get(source)
            if given is None or given[0] is not key or given[1] is not value:
                raise RuntimeError(f"model: layer {index} attended to K/V other than the very tensors layer {source} "
                                   "attended to, as it did when the runner was made (it stores none of its own)")
            k = v = None
        out = pool_attention(runner.pool_index[index], q, k, v, self.pool, self.batch, scale=layer.scale,
                             window=layer.window, softcap=layer.softcap, backend=runner.backend,
                             sinks=kwargs.get("s_aux"))
        self.calls += 1
        return out[None, ..., :layer.v_dim], None


def _check_layer_types(config, windows):
    """The masks that the config's layer types give (transformers builds one per type) are those the pool computes:
    causal, or causal within the window the layer passed to attention. Llama 4's chunked layers, say, mask by their
    type alone: attending to their whole context would be silently wrong past a chunk. A config that names no layer
    types but a sliding_window masks every layer by that window (Mistral's and PhiMoE's decoders choose their mask by
    it alone): each layer must pass it to attention too (PhiMoE's pass none)."""
    layer_types = getattr(config, "layer_types", None) or []
    for index, (kind, window) in enumerate(zip(layer_types, windows)):
        if kind not in ("full_attention", "sliding_attention"):
            raise _Unfit(f"its layer {index} is of type {kind!r}, whose attention mask the paged attention does not "
                         "compute (it computes full_attention and sliding_attention)")
        if kind == "sliding_attention" and window is None:
            raise _Unfit(f"its layer {index} is a sliding_attention layer that passes no sliding_window to attention")
    if not layer_types:   # read only here: a config whose layers have windows of their own refuses the global one
        config_window = getattr(config, "sliding_window", None)
        if config_window is not None and None in windows:
            raise _Unfit(f"its config sets sliding_window={config_window!r}, but its layer {windows.index(None)} "
                         "passes no sliding_window to attention (the window lies in its mask alone, which the paged "
                         "attention does not compute)")


def _structure_problem(model):
    """Why `model` cannot be probed at all, read without a forward, or None."""
    if not (hasattr(model, "can_generate") and model.can_generate()):
        return "it is not a causal language model (can_generate() is not True)"
    alibi = _alibi_setting(model.config.get_text_config(decoder=True))
    if alibi:
        return (f"its positions are ALiBi biases ({alibi}=True), which it builds from an attention mask that the "
                "routed attention does not build")
    if "position_ids" not in inspect.signature(model.forward).parameters:
        return "its forward takes no position_ids"
    if runs_a_users_hooks(model):   # a forward that computes no logits (a prefill) calls the decoder alone
        return "it runs hooks on the model itself (forward hooks or pre-hooks), which a prefill (the decoder) skips"
    return state_problem(model) or counted_positions_problem(model)


def _alibi_setting(config):
    """The name of the config's setting that makes its positions ALiBi biases (Falcon's alibi, MPT's
    attn_config.alibi), or None (Bloom's are always ALiBi: its forward takes no position_ids)."""
    if getattr(config, "alibi", False) is True:
        return "alibi"
    if getattr(getattr(config, "attn_config", None), "alibi", False) is True:
        return "attn_config.alibi"
    return None


def _decoder(model):
    """decoder_of(model), or why there is none."""
    try:
        return decoder_of(model)
    except TypeError as err:
        raise _Unfit(str(err)) from None


def _run_probe(run):
    """run() with any failure but the probe's own refusal reported as the reason the model is unfit."""
    try:
        return run()
    except _Unfit:
        raise
    except Exception as err:  # whatever the model's code raises with its attention routed to the pool
        raise _Unfit(f"its forward with attention on the pool failed ({err!r})") from err


def _one_row_batch(ids, start, end, device):
    """The ForwardBatch of tokens ids[start:end] of one sequence held in block 0 of a one-block pool."""
    count = end - start
    seq_lens, cu_q_lens = np.array([end], dtype=np.int32), np.array([0, count], dtype=np.int32)
    none = torch.zeros(0, dtype=torch.long, device=device)
    return ForwardBatch(
        input_ids=ids[start:end], positions=torch.arange(start, end, device=device),
        slot_mapping=torch.arange(start, end, device=device),
        block_table=torch.zeros(1, 1, dtype=torch.int32, device=device),
        seq_lens=torch.from_numpy(seq_lens).to(device), cu_q_lens=torch.from_numpy(cu_q_lens).to(device),
        host_seq_lens=seq_lens, host_cu_q_lens=cu_q_lens, extra_src=none, extra_dst=none,
        host_extra_src=np.zeros(0, dtype=np.int64), copy_src=none, copy_dst=none,
        outputs=torch.arange(count, device=device))
