"""The slow path for causal LMs that neither paged runner takes (PagedLlama's families, PagedHF's probe): Hugging
Face's own forward and cache.

The KV still lives in the paged pool, so that spans, sharing, eviction and every guarantee of the tree are the same
as on the fast path. Rows run in groups (below): their contexts are gathered from the pool into a `DynamicCache`,
the model runs their new tokens with that cache, and the K/V the model appended to the cache are written back into
the pool. This works for any model whose cache layers hold per-token K and V of one
shape [batch, kv_heads, tokens, head_dim] and that keeps no other state between forwards (Bloom and MPT, whose ALiBi
biases PagedHF does not compute, ...; not RecurrentGemma); it costs one gather of the context per group of rows.
Rows with as many new tokens run as one batch wherever they are in the call (row_groups.py), their contexts of
different lengths (within one power of two, so that padding at most doubles a row's) left-padded in one cache and
masked, each row at its own positions, where a probe finds the model's logits unchanged by that and its config names
no positions it counts itself (else rows with contexts of one length): the leaves of many prompts' searches extended
alike are a few forwards.
"""
import inspect

import numpy as np
import torch
from transformers import DynamicCache

from fastalign.eval_mode import eval_mode
from fastalign.model_context import runner_context
from fastalign.model_vocabulary import probe_ids
from fastalign.ops.paged_attention import write_kv
from fastalign.runtime.hf_cache_argument import cache_kwargs, takes_a_cache, takes_logits_to_keep
from fastalign.runtime.row_groups import LeftPadded, context_alike, left_padded_kv, row_chain
from fastalign.transfers import index_on


class HFCacheModel:
    """The forward of any Hugging Face causal LM with a DynamicCache over a ForwardBatch, rows alike batched."""

    paged = False   # attention by the model's own code on gathered caches (PagedLlama and PagedHF: on the pool)
    recomputes_context = False   # a row's context runs once, when its span is made (HFRecomputeModel: every call)

    def __init__(self, model, device):
        self.model, self.device = model, device   # where it computes (model_device): its inputs and the pool's
        if not (hasattr(model, "can_generate") and model.can_generate()):
            raise _unfit(model, "it is not a causal language model (can_generate() is not True)")
        try:
            with torch.inference_mode(), eval_mode(model):
                cache = DynamicCache()
                out = model(input_ids=torch.zeros(1, 1, dtype=torch.long, device=self.device), use_cache=True,
                            **cache_kwargs(model, cache))
                keys = cache.layers[0].keys
        except Exception as err:
            raise _unfit(model, _unfit_cause(model, f"its one-token forward with a DynamicCache failed ({err!r})")) \
                from err
        values = cache.layers[0].values
        problem = _kv_problem(out, keys, values)
        if problem:
            raise _unfit(model, _unfit_cause(model, problem))
        for index, layer in enumerate(cache.layers):
            if _shape(layer.keys) != _shape(keys) or _shape(layer.values) != _shape(keys):
                raise _unfit(model, f"its cache layers differ in shape (layer {index} holds K {_shape(layer.keys)} "
                                    f"and V {_shape(layer.values)}, layer 0 K and V {_shape(keys)})")
        if not _rebuilt_cache_probe(model, lambda: self._state_is_in_cache(cache)):
            raise _unfit(model, _unfit_cause(model, "it keeps state outside its cache (the logits of a token after a "
                                                    "cached one changed when another sequence ran in between)"))
        if not _rebuilt_cache_probe(model, self._is_causal):
            raise _unfit(model, "it is not causal (the outputs at a sequence's first tokens changed when tokens were "
                                "appended, as in an encoder such as BertLMHeadModel without config.is_decoder=True), "
                                "so that no cache can give its full-sequence outputs")
        self.num_layers = len(cache.layers)
        self.pool_shapes = [(keys.shape[1], keys.shape[3])] * self.num_layers   # KVPool's layers: its cache's
        self.dtype = keys.dtype
        self.max_context = runner_context(model.config)
        self.span_tree = None   # set by the TreeRunner: which rows of a call build on which
        self.takes_positions = "position_ids" in inspect.signature(model.forward).parameters
        self.keeps_logits = takes_logits_to_keep(model)
        # else rows with contexts of different lengths run apart; a model that counts positions itself counts the
        # padding too, where no probe of a few tokens sees it (Llama 4's temperature, which changes every 8192)
        self.pads_context = counted_positions_problem(model) is None and self._pads_exactly()

    def forward(self, batch, pool, select, want_logits, want_hidden, logits_rows=None):
        """Writes the KV of every token of `batch` into `pool`; returns (logits, hidden) of the tokens
        at indices `select` (None: nothing), logits in float32 (only at select[logits_rows] when given),
        hidden = the model's last hidden state. Dropout is off whatever the model's mode (the paged path has none):
        it would make the K/V cached for the tree, and every logit, random."""
        with eval_mode(self.model):
            return self._forward_rows(batch, pool, select, want_logits, want_hidden, logits_rows)

    def _forward_rows(self, batch, pool, select, want_logits, want_hidden, logits_rows):
        """Rows with as many new tokens and contexts of one length (where the model pads contexts, of lengths within
        one power of two: padding at most doubles a row's) run as one batch wherever they are in the call, level by
        level: a row on a span that another row of the call makes (its own span or one at a cut) runs one level above
        it, and reads that row's K/V from the pool."""
        cu, seq_lens = batch.host_cu_q_lens.tolist(), batch.host_seq_lens.tolist()
        groups, level_of = {}, {}   # (level, how its rows run) -> rows; span made by a row -> that row's level
        for row, (span, seq_len) in enumerate(zip(batch.host_row_spans.tolist(), seq_lens)):
            new = cu[row + 1] - cu[row]
            context = seq_len - new
            start, chain = row_chain(self.span_tree, span, context)
            level = level_of.get(start, -1) + 1
            level_of.update(dict.fromkeys(chain, level))
            groups.setdefault((level, new, context_alike(context, self.pads_context)), []).append(row)
        kept = KeptLogits.of(self.keeps_logits, batch, select, logits_rows, want_logits)
        hidden = [None] * len(seq_lens)   # per row: its last hidden states at its new tokens, where wanted
        for (_, new, *_), rows in sorted(groups.items(), key=lambda item: item[0][0]):   # first met first, per level
            contexts = [seq_lens[row] - new for row in rows]
            tokens = np.concatenate([np.arange(cu[row], cu[row + 1]) for row in rows])   # the group's, row by row
            token_index = index_on(tokens, self.device)
            cache = DynamicCache(ddp_cache_data=gathered_context(pool, batch.block_table[rows], contexts,
                                                                 range(self.num_layers))) if max(contexts) else \
                DynamicCache()
            arguments = LeftPadded.of(contexts, self.device, positions=self.takes_positions).arguments(new) or {
                "attention_mask": torch.ones(len(rows), contexts[0] + new, dtype=torch.long, device=self.device)}
            out = kept.forward(self.model, tokens.reshape(len(rows), new),
                               input_ids=batch.input_ids[token_index].view(len(rows), new), use_cache=True,
                               **cache_kwargs(self.model, cache), **arguments,
                               output_hidden_states=want_hidden and select is not None)
            write_rows_kv(pool, batch, tokens, [(layer.keys[:, :, -new:], layer.values[:, :, -new:])
                                                for layer in cache.layers])
            if want_hidden and select is not None:
                for i, row in enumerate(rows):
                    hidden[row] = out.hidden_states[-1][i]
        if select is None:
            return None, None
        return kept.result(), torch.cat(hidden)[select] if want_hidden else None

    def _pads_exactly(self):
        """Whether two rows whose contexts (2 and 4 tokens, each run alone) sit left-padded in one cache, as
        LeftPadded puts them, continue by 2 + 1 tokens to the logits of the model's forward over each whole sequence,
        within rounding of its dtype. False also where the forward fails with a 2D mask over a cache, or takes no
        position_ids and counts the padding as positions (Bloom's and MPT's ALiBi biases follow the mask: they pass)."""
        ids = torch.tensor([probe_ids(self.model, row) for row in ([1, 0, 2, 1, 3, 0, 0], [2, 3, 1, 1, 0, 2, 3])],
                           device=self.device)
        lengths, new = (2, 4), 3
        try:
            with torch.inference_mode(), eval_mode(self.model):
                kv, wholes = [], []
                for row, length in enumerate(lengths):
                    cache = DynamicCache()
                    self.model(input_ids=ids[row:row + 1, :length], use_cache=True, **cache_kwargs(self.model, cache))
                    kv.append([(layer.keys, layer.values) for layer in cache.layers])
                    wholes.append(self.model(input_ids=ids[row:row + 1, :length + new]).logits[0, -new:])
                cache = DynamicCache(ddp_cache_data=left_padded_kv(kv, lengths))
                padded = LeftPadded(lengths, self.device, self.takes_positions)
                new_ids = torch.stack([ids[row, length:length + new] for row, length in enumerate(lengths)])
                logits = torch.cat([self.model(input_ids=new_ids[:, begin:end], use_cache=True,
                                               **cache_kwargs(self.model, cache), **padded.arguments(end - begin)
                                               ).logits for begin, end in ((0, 2), (2, 3))], 1)
        except Exception:
            return False
        return all(agree_within_rounding(self.model.dtype, whole, (logits[row], whole))
                   for row, whole in enumerate(wholes))

    def _state_is_in_cache(self, cache):
        """Whether the model carries nothing from one forward to the next but the cache, as running rows one
        by one on caches rebuilt from the pool needs: a token after the one `cache` holds gets the same
        logits with or without another sequence run in between (RecurrentGemma keeps its recurrent and
        convolution states in its modules, and its logits silently went wrong)."""
        def after_cached():
            rebuilt = DynamicCache(ddp_cache_data=[(layer.keys, layer.values) for layer in cache.layers])
            return self.model(input_ids=torch.ones(1, 1, dtype=torch.long, device=self.device), use_cache=True,
                              attention_mask=torch.ones(1, 2, dtype=torch.long, device=self.device),
                              **cache_kwargs(self.model, rebuilt)).logits

        with torch.inference_mode(), eval_mode(self.model):
            before = after_cached()
            self.model(input_ids=torch.tensor([[1, 0]], device=self.device), use_cache=True,
                       **cache_kwargs(self.model, DynamicCache()))
            return agree_within_rounding(self.model.dtype, before, (before, after_cached()))

    def _is_causal(self):
        """Whether a token's logits depend on the tokens before it alone: a sequence's first tokens get the same
        logits when more tokens follow them, run in one forward or after a cache of them. A bidirectional model
        (BertLMHeadModel or RobertaForCausalLM with is_decoder=False) otherwise gives logits that depend on
        how the tree split its sequence into spans, silently. Compared relative to the logits' scale, within
        rounding of the model's dtype (even a freshly initialised encoder's small logits move by ~3e-3 of it)."""
        ids = torch.tensor([probe_ids(self.model, [1, 0, 2, 1, 3, 0])], device=self.device)
        with torch.inference_mode(), eval_mode(self.model):
            def run(input_ids, cache, length):
                return self.model(input_ids=input_ids, use_cache=True, **cache_kwargs(self.model, cache),
                                  attention_mask=torch.ones(1, length, dtype=torch.long, device=self.device)).logits
            cache = DynamicCache()
            prefix = run(ids[:, :3], cache, 3)
            after_cache = run(ids[:, 3:], cache, 6)
            whole = run(ids, DynamicCache(), 6)
        return agree_within_rounding(self.model.dtype, whole, (prefix, whole[:, :3]), (after_cache, whole[:, 3:]))


def gathered_context(pool, block_rows, lengths, layers):
    """(keys, values) [rows, heads, max(lengths), dim] of the first lengths[i] tokens of row i of `block_rows`
    [rows, max_blocks], for each pool layer of `layers`; a row shorter than the longest sits at the right end,
    after zeros (its padding, which the forward masks)."""
    longest, size, device = max(lengths), pool.block_size, block_rows.device
    source = (torch.arange(longest, device=device)
              - index_on([longest - n for n in lengths], device)[:, None])   # < 0: padding
    padding = (source < 0)[:, :, None, None] if min(lengths) < longest else None
    source = source.clamp(min=0)
    slots = block_rows.long().gather(1, source // size) * size + source % size   # [rows, longest]

    def tokens(t):   # [blocks, block_size, heads, dim] -> [rows, heads, longest, dim], padding zeros (past a row's
        gathered = t.flatten(0, 1)[slots]   # blocks the table may point anywhere, not at zeros)
        if padding is not None:
            gathered.masked_fill_(padding, 0)
        return gathered.transpose(1, 2)

    return [(tokens(pool.k(i)), tokens(pool.v(i))) for i in layers]


def write_rows_kv(pool, batch, tokens, layers_kv):
    """Write the K/V of a group of rows' new tokens, the batch tokens `tokens` (row by row), into the pool (and
    where the batch copies a token to a block of a later row, there too): layers_kv[i] = (keys, values)
    [rows, heads, new, dim] of pool layer i."""
    place = np.full(batch.num_tokens, -1)   # batch token -> its place among the group's new K/V
    place[tokens] = np.arange(len(tokens))
    extra = np.flatnonzero(place[batch.host_extra_src] >= 0)
    device = batch.slot_mapping.device
    slots = batch.slot_mapping[index_on(tokens, device)]
    extra_src = index_on(place[batch.host_extra_src[extra]], device)
    extra_dst = batch.extra_dst[index_on(extra, device)]
    for index, kv in enumerate(layers_kv):
        keys, values = (t.transpose(1, 2).flatten(0, 1) for t in kv)
        write_kv(keys, values, pool.k(index), pool.v(index), slots)
        if len(extra):
            write_kv(keys[extra_src], values[extra_src], pool.k(index), pool.v(index), extra_dst)


def agree_within_rounding(dtype, whole, *pairs):
    """Whether the tensors of each pair agree relative to the scale of `whole`, within rounding of `dtype`, the
    model's (1e-4 in fp32 and fp64, 3e-2 in 16 bits): not of `whole`'s own, as a bf16 Mamba 2 returns float32
    logits and keeps float32 states, which a 1e-4 tolerance refused (and the model ran by recomputing)."""
    tolerance = 1e-4 if dtype in (torch.float32, torch.float64) and whole.dtype in (torch.float32, torch.float64) \
        else 3e-2
    scale = whole.abs().max().float().clamp(min=1e-6)
    return all(float((a.float() - b.float()).abs().max() / scale) <= tolerance for a, b in pairs)


class KeptLogits:
    """The logits a fallback's forwards return, at the batch's token indices select[logits_rows] (`select` where
    logits_rows is None; none where no logits are wanted), each forward computing them at the input positions of
    those tokens alone (logits_to_keep, where the model's forward takes it): TreeRunner.extend promises logits=None
    not computed and "last" at the returned spans' last tokens, where every new token's would be [tokens, vocab]."""

    def __init__(self, keeps_logits, at, num_tokens, device):
        """keeps_logits: whether the model's forward takes logits_to_keep; at: the wanted tokens (host int array), or
        None; num_tokens: the batch's."""
        self.keeps_logits, self.at, self.device = keeps_logits, at, device
        self.wanted = np.zeros(num_tokens + 1, dtype=bool)   # per batch token; the last: no token (-1)
        if at is not None:
            self.wanted[at] = True
        self.tokens, self.logits = [], []   # the wanted tokens met so far, and their logits [tokens, vocab]

    @classmethod
    def of(cls, keeps_logits, batch, select, logits_rows, want_logits):
        """The logits of a runner's forward(batch, pool, select, want_logits, want_hidden, logits_rows)."""
        at = None if select is None or not want_logits else \
            (select if logits_rows is None else select[logits_rows]).cpu().numpy()
        return cls(keeps_logits, at, batch.num_tokens, batch.input_ids.device)

    def forward(self, model, grid, **arguments):
        """model(**arguments), whose input is `grid` [rows, length] (the batch token at each position, -1 where the
        position holds none of the batch's new tokens), its logits kept at the positions of wanted tokens (at the last
        position alone where none is); the wanted tokens' logits are kept here. Returns the model's output."""
        length = grid.shape[1]
        columns = np.flatnonzero(self.wanted[grid].any(0)) if self.keeps_logits else np.arange(length)
        if len(columns) == 0 or columns[0] == length - len(columns):   # a suffix (an int, which every model takes)
            count = max(len(columns), 1)
            kept, columns = count, np.arange(length - count, length)
        else:
            kept = index_on(columns, self.device)
        out = model(**arguments, **(dict(logits_to_keep=kept) if self.keeps_logits else {}))
        rows, places = np.nonzero(self.wanted[grid[:, columns]])
        if len(rows):
            self.tokens.append(grid[rows, columns[places]])
            device = out.logits.device   # (the last layer's, for a model spread over devices)
            self.logits.append(out.logits[index_on(rows, device), index_on(places, device)])
        return out

    def result(self):
        """The logits [len(at), vocab] in float32 at the wanted tokens, in their order; None where none are wanted."""
        if self.at is None:
            return None
        tokens = np.concatenate(self.tokens)
        place = np.zeros(len(self.wanted), dtype=np.int64)   # batch token -> its row among the kept logits
        place[tokens] = np.arange(len(tokens))
        logits = torch.cat(self.logits)
        return logits[index_on(place[self.at], logits.device)].float()


def _rebuilt_cache_probe(model, probe):
    """probe() (a check run by forwards after a cache rebuilt from K/V), whatever the model's own code raises there
    (XLM asserts on the mask's length) turned into a refusal, so that the runner goes on to its next fallback."""
    try:
        return probe()
    except Exception as err:
        raise _unfit(model, f"its forward after a cache rebuilt from its K/V failed ({err!r})") from err


def _unfit(model, reason):
    """The error refusing `model` for `reason`, with what the fallback runs (`reason` also kept as its attribute)."""
    error = ValueError(f"model: {type(model).__name__} cannot run on the Hugging Face cache fallback: {reason}; the "
                       "fallback runs causal LMs whose cache holds per-token K and V of one shape [batch, kv_heads, "
                       "tokens, head_dim] in every layer and no other state (Bloom, MPT, ...)")
    error.reason = reason
    return error


def state_problem(model):
    """What the model's config and class say it caches besides per-token K and V, or None: read without a forward,
    to name the cause when a probe refuses the model (only then: the probes alone decide what runs). Recurrent
    layers (Mamba, linear attention, LFM2's convolutions) are those of a kind transformers gives a linear-attention
    cache layer. transformers 5.25 no longer marks the models that name no such layers stateful (RWKV, xLSTM,
    DeepSeek-V4): there, a kind whose cache layer the model's own code defines (DeepSeek-V4's compressed attention)
    is named instead."""
    layers = _cache_layer_classes(model.config.get_text_config(decoder=True))
    recurrent = [(index, kind) for index, kind, cls in layers if _is_linear_attention_layer(cls)]
    if recurrent:
        return (f"its cache holds recurrent state (Mamba/linear-attention layers: "
                f"{', '.join(sorted({kind for _, kind in recurrent}))} at {_plural(recurrent, 'layer')} "
                f"{', '.join(str(index) for index, _ in recurrent)}), not per-token K and V")
    if getattr(model, "_is_stateful", False):  # transformers 5.17 to 5.24: RWKV, xLSTM, DeepSeek-V4's compressor
        return (f"its cache holds recurrent or compressed state (transformers marks {type(model).__name__} "
                "stateful), not per-token K and V")
    own = {kind: cls.__name__ for _, kind, cls in layers if cls.__module__ != _CACHE_MODULE}
    if own:
        return (f"its cache {_plural(own, 'layer')} of {_plural(own, 'kind')} {', '.join(sorted(own))} "
                f"{'are' if len(own) > 1 else 'is'} the model's own ({', '.join(sorted(set(own.values())))}), not "
                "transformers' per-token K and V")
    return None


def counted_positions_problem(model):
    """What the model's config says of positions it counts itself, from its cache's length and its input's, rather
    than taking them from position_ids, or None: read from the config, as no probe of a few tokens can see it. Llama
    4's layers without RoPE scale their queries by a temperature of such a position (attn_temperature_tuning), which
    changes every floor_scale (8192) tokens: on the pool it would count a token's place in a batch of rows, and in a
    left-padded cache the padding."""
    config = model.config.get_text_config(decoder=True)
    if getattr(config, "attn_temperature_tuning", False) and 0 in (getattr(config, "no_rope_layers", None) or ()):
        return ("its layers without RoPE (no_rope_layers) scale their queries by a temperature of positions it counts "
                "from its cache and input (attn_temperature_tuning), not of the positions it is given")
    return None


def _unfit_cause(model, finding):
    """Why the fallback refuses `model`: its trait that explains a failed probe (`state_problem`, or a forward that
    takes no cache: RWKV's takes its own `state`), else what the probe found."""
    no_cache = None if takes_a_cache(model) else ("its forward takes no cache (no cache, past_key_values or "
                                                  "cache_params argument)")
    return state_problem(model) or no_cache or finding


_CACHE_MODULE = "transformers.cache_utils"   # where transformers' own cache layers are defined


def _plural(items, word):
    return word + "s" if len(items) > 1 else word


def _cache_layer_classes(config):
    """(index, kind, cache layer class) of each layer of `config` whose kind transformers maps to a cache layer (a
    model's own code registers the classes of its own kinds there when imported)."""
    try:  # transformers' own name (5.17 to 5.25): without it, the probe's own finding names the cause
        from transformers.cache_utils import DYNAMIC_LAYER_TYPE_MAPPING
    except ImportError:
        return []
    types = list(getattr(config, "layer_types", None) or [])
    return [(index, kind, DYNAMIC_LAYER_TYPE_MAPPING[kind]) for index, kind in enumerate(types)
            if kind in DYNAMIC_LAYER_TYPE_MAPPING]


def _is_linear_attention_layer(cls):
    try:
        from transformers.cache_utils import LinearAttentionCacheLayerMixin
    except ImportError:
        return False
    return issubclass(cls, LinearAttentionCacheLayerMixin)


def _kv_problem(out, keys, values):
    """Why the output and layer-0 cache of a one-token forward are not logits and per-token K and V of one shape
    [batch, kv_heads, tokens, head_dim], or None."""
    if getattr(out, "logits", None) is None:
        return "it returns no logits"
    if keys is None or values is None:
        return "its cache's layer 0 holds no K and V after a forward"
    if keys.dim() != 4 or keys.shape[2] != 1:
        return (f"its cache does not hold per-token K and V [batch, kv_heads, tokens, head_dim] (layer 0 holds K "
                f"{_shape(keys)} after one token)")
    if values.shape[:-1] == keys.shape[:-1] and values.shape != keys.shape:
        return (f"its K and V differ in head_dim (K {keys.shape[-1]}, V {values.shape[-1]}: multi-head latent "
                "attention)")
    if values.shape != keys.shape:
        return f"its K and V differ in shape (layer 0 holds K {_shape(keys)} and V {_shape(values)})"
    return None


def _shape(tensor):
    """A cache entry's shape as a list (None for an entry the layer does not hold)."""
    return None if tensor is None else list(tensor.shape)
