"""The fallback for hybrid and state-space causal LMs (Qwen3.5, Qwen3-Next, Mamba 2, Falcon-H1, Granite 4 hybrids,
Nemotron-H, LFM2, Mamba, Jamba, ...): Hugging Face's own forward on its own cache, whose linear-attention layers hold,
besides per-token K/V, a fixed-size state per sequence (a convolution window and a recurrent state), with each span's
state at its end kept beside the pool, so that extending a span runs its new tokens only. Where the model's mixers
continue a state over one new token only (Mamba's and Jamba's run several as a prefill, dropping it), the tokens run
from a state go one forward per token (`steps_singly`, found by a probe), each forward still all the rows alike.

The attention layers' K/V live in the paged pool, as on HFCacheModel. When a forward makes a span, the state it leaves
in each linear-attention layer is stored under the span's id; a row with cuts runs one forward per piece between them,
keeping the state at each cut's span too (the spans a search makes at cuts are those it branches from next). A row
extending span P starts from P's state, or, where P has none (its state was dropped), from its nearest ancestor that has
one, running the tokens in between again in a forward of their own that keeps P's state again (from no state at all: the
whole context, as HFRecomputeModel would; so too where the model steps singly and the tokens between would take more
forwards than a whole context's one costs, see FORWARD_IN_TOKENS); those tokens are counted in
TreeRunner.last_context_rerun. States are a cache of bounded size (`state_capacity`, set by the TreeRunner from its
max_state_bytes, by default as many bytes as the pool), released spans' dropped first, then those a row has started from
(a search's inner nodes), then the rest, least recently used first, pinned spans' never: a dropped state costs tokens
run again, never a different result (within rounding: they run in forwards of other shapes). Rows that run alike (as
many tokens again and new, cut at the same offsets) run as one batch wherever they are in a call, their attention
contexts of lengths within one power of two left-padded in one cache and masked, each row at its own positions (where a
probe finds the model's logits and states unchanged by that; else rows from contexts of one length; with no attention
layer, contexts of any length): the leaves of many prompts' searches extended alike are a few forwards.
"""
import collections
import inspect
from typing import NamedTuple

import numpy as np
import torch
from transformers import DynamicCache

from fastalign.eval_mode import eval_mode
from fastalign.model_context import runner_context
from fastalign.model_vocabulary import probe_ids
from fastalign.runtime.hf_cache import KeptLogits, agree_within_rounding, gathered_context, write_rows_kv
from fastalign.runtime.hf_cache_argument import cache_kwargs, takes_a_cache, takes_logits_to_keep
from fastalign.runtime.row_groups import LeftPadded, context_alike, left_padded_kv, row_chain
from fastalign.transfers import index_on

# What a forward costs beside its tokens, in tokens of a prefill: where the mixers continue a state over one token only
# (steps_singly), running n tokens again from a state of b tokens takes n forwards, from no state one of b + n tokens.
# A tiny Mamba's or Jamba's forward on the CPU costs as much as ~20-50 tokens of a prefill (1 ms against 0.025-0.05 ms
# a token; 64 here made RAIN's reruns slower there); a GPU's launch-bound forwards, likely more (unmeasured): the low
# end, so that only a long way back starts from no state.
FORWARD_IN_TOKENS = 16


class HFStateCacheModel:
    """The forward of a Hugging Face causal LM whose cache mixes attention and linear-attention layers, over a
    ForwardBatch, with each span's recurrent state kept under its id (TreeRunner sets `span_tree`)."""

    paged = False
    recomputes_context = False   # a row's context runs once, when its span is made (but see last_rerun)

    def __init__(self, model, device):
        self.model, self.device, self.config = model, device, model.config
        if not (hasattr(model, "can_generate") and model.can_generate()):
            raise _unfit(model, "it is not a causal language model (can_generate() is not True)")
        self.keeps_logits = takes_logits_to_keep(model)
        if not takes_a_cache(model):
            raise _unfit(model, "its forward takes no cache (no cache, past_key_values or cache_params argument)")
        try:
            with torch.inference_mode(), eval_mode(model):
                cache = self._new_cache()
                model(input_ids=torch.zeros(1, 3, dtype=torch.long, device=device), use_cache=True,
                      **cache_kwargs(model, cache))
        except Exception as err:
            raise _unfit(model, f"its forward with a DynamicCache failed ({err!r})") from err
        self.attention_layers, self.linear_layers, problem = _layer_kinds(cache)
        if problem:
            raise _unfit(model, problem, holds_states=bool(self.linear_layers))
        # (layer, state index, "conv_states" | "recurrent_states") of every state the linear layers hold
        self.state_slots = [(index, s, kind) for index in self.linear_layers
                            for s in range(cache.layers[index].number_of_states)
                            for kind in ("conv_states", "recurrent_states")
                            if getattr(cache.layers[index], kind)[s] is not None]
        if not self.state_slots:
            raise _unfit(model, "its linear-attention layers hold no state after a forward")
        self.state_bytes = sum(t[0].numel() * t.element_size() for t in self._batched_states(cache))
        for index in self.attention_layers:
            layer = cache.layers[index]
            if layer.keys.shape != layer.values.shape:   # the pool holds K and V of one shape
                raise _unfit(model, f"its K and V differ in shape (layer {index} holds K {list(layer.keys.shape)} and "
                                    f"V {list(layer.values.shape)})")
        if self.attention_layers:
            self.pool_shapes = [(cache.layers[i].keys.shape[1], cache.layers[i].keys.shape[3])
                                for i in self.attention_layers]
            self.dtype = cache.layers[self.attention_layers[0]].keys.dtype
        else:   # a pure state-space model: the pool holds nothing of use, one slot per token all the same
            self.pool_shapes, self.dtype = [(1, 1)], self._batched_states(cache)[0].dtype
        self.pool_is_placeholder = not self.attention_layers   # then an evicted span needs no forward back
        self.max_context = runner_context(model.config)
        self.states = collections.OrderedDict()   # span id -> its end state (one tensor per state slot), LRU first
        self.started_from = set()                 # the spans of `states` that a row has started from
        self.span_tree = None                     # set by the TreeRunner: rows' ancestors and tokens
        self.state_capacity = 1                   # set by the TreeRunner: the states it may keep
        self.last_rerun = np.zeros(0, dtype=np.int64)   # per row of the last forward: tokens run again
        try:   # a mixer that continues its state by one token only (Mamba's, Jamba's) runs new tokens one at a time
            exact = self._continues_exactly(_PIECES)
            self.steps_singly = not exact   # then a forward from a state runs one token at a time: _forward_tokens
            exact = exact or self._continues_exactly(_STEPS)
        except Exception as err:
            raise _unfit(model, f"its forward after a cache rebuilt from its K/V and states failed ({err!r})") \
                from err
        if not exact:
            raise _unfit(model, "its logits or states after a cache rebuilt from its K/V and states differ from "
                                "its forward's over the whole sequence, also when run one token at a time")
        self.pads_context = self._pads_exactly()   # else rows from states of different lengths run apart

    # ----- the forward

    def forward(self, batch, pool, select, want_logits, want_hidden, logits_rows=None):
        """Writes the KV of every token of `batch` into `pool` and each row's end state into `states`; returns
        (logits, hidden) of the tokens at indices `select` (None: nothing), logits in float32 (only at
        select[logits_rows] when given), hidden = the model's last hidden state. Dropout is off."""
        with eval_mode(self.model):
            return self._forward_rows(batch, pool, select, want_logits, want_hidden, logits_rows)

    def _forward_rows(self, batch, pool, select, want_logits, want_hidden, logits_rows):
        """Rows that run alike (as many tokens again and new, cut at the same offsets) and start from states of one
        length, or where the model pads contexts (`pads_context`) of lengths alike (context_alike), run as one batch
        wherever they are in the call, level by level: a row whose nearest state to start from is one that another row
        of the call stores (of a span it makes, or whose tokens it runs again) is one level above that row."""
        cu, seq_lens = batch.host_cu_q_lens.tolist(), batch.host_seq_lens.tolist()
        spans = batch.host_row_spans.tolist()
        kept = KeptLogits.of(self.keeps_logits, batch, select, logits_rows, want_logits)
        hidden = [None] * len(spans)   # per row: its last hidden states at its new tokens, where wanted
        self.last_rerun = np.zeros(len(spans), dtype=np.int64)
        groups, level_of = {}, {}   # (level, how its rows run) -> rows; span made by a row -> that row's level
        for row, (span, seq_len) in enumerate(zip(spans, seq_lens)):
            new = cu[row + 1] - cu[row]
            start, chain = row_chain(self.span_tree, span, seq_len - new)
            source = self._state_source(start, level_of)
            base = self.span_tree.length(source) if source >= 0 else 0
            again = seq_len - new - base
            if self.steps_singly and (again - 1) * FORWARD_IN_TOKENS > base:   # one forward over the whole context
                source, base, again = -1, 0, seq_len - new                   # costs less than `again` from a state
            level = level_of.get(source, -1) + 1
            ends = tuple(self.span_tree.length(s) - seq_len + new for s in chain)
            key = (context_alike(base, self.pads_context, bool(self.attention_layers)), again, ends)
            groups.setdefault((level, key), []).append(_Row(row, chain, source, start, base))
            level_of.update(dict.fromkeys(chain, level))
            if again:   # its group keeps the start's state again: a later row on that start runs from it
                level_of.setdefault(start, level)
            self.last_rerun[row] = again
        for (_, key), group in sorted(groups.items(), key=lambda item: item[0][0]):   # first met first, per level
            self._run_group(batch, pool, group, key, kept, hidden if want_hidden and select is not None else None)
        self._trim(self.state_capacity)
        if select is None:
            return None, None
        return kept.result(), torch.cat(hidden)[select] if want_hidden else None

    def _run_group(self, batch, pool, group, key, kept, hidden):
        """Run the rows of `group` from their sources' states (contexts of several lengths left-padded in one
        cache, see LeftPadded): first the tokens run again (a row starting on a span with no state), whose end
        state is kept under the row's start span (its next children start there), then the new tokens, in one
        forward per piece between cuts, keeping the state at each cut's span and at the row's span; write the new
        tokens' K/V into the pool. Their logits go to `kept`, their last hidden states to `hidden` (per row) when
        given."""
        (_, again, ends), rows = key, [member.row for member in group]
        bases = [member.base for member in group]
        cu = batch.host_cu_q_lens
        tokens = np.concatenate([np.arange(cu[row], cu[row + 1]) for row in rows])   # the group's, row by row
        cache, padded = self._new_cache(), LeftPadded.of(bases, self.device, bool(self.attention_layers))
        fresh = not bases[0]   # (the rows of a group all start from a state, or none does)
        if not fresh:
            kv = gathered_context(pool, batch.block_table[rows], bases, range(len(self.attention_layers)))
            self._load(cache, kv, [self.states[member.source] for member in group], max(bases))
        if again:   # the tokens between each source and its row's start, from the span tree
            ids = np.stack([self.span_tree.tokens(member.start)[member.base:] for member in group])
            self._forward_tokens(index_on(ids, self.device), np.full(ids.shape, -1), cache,
                                 padded, fresh, kept)
            self._store(cache, [member.start for member in group])
            fresh = False
        new_ids = batch.input_ids[index_on(tokens, self.device)].view(len(rows), ends[-1])
        grid = tokens.reshape(len(rows), ends[-1])
        pieces = []
        for piece, (begin, end) in enumerate(zip((0,) + ends, ends)):
            pieces.append(self._forward_tokens(new_ids[:, begin:end], grid[:, begin:end], cache, padded, fresh, kept,
                                               hidden is not None))
            self._store(cache, [member.chain[piece] for member in group])
            fresh = False
        if self.attention_layers:
            new = ends[-1]
            write_rows_kv(pool, batch, tokens, [(cache.layers[i].keys[:, :, -new:], cache.layers[i].values[:, :, -new:])
                                                for i in self.attention_layers])
        if hidden is not None:
            states = torch.cat(pieces, 1)
            for i, row in enumerate(rows):
                hidden[row] = states[i]

    def _forward_tokens(self, ids, grid, cache, padded, fresh, kept, want_hidden=False):
        """The model's forward of the tokens ids [rows, n] (the batch's tokens `grid`, see KeptLogits.forward) on
        `cache`: one forward, or, where the model continues a state by one token only (steps_singly) and `cache` holds
        one (not `fresh`), one forward per token; their logits go to `kept`. Returns their last hidden states where
        `want_hidden`, else None."""
        n = ids.shape[1]
        if fresh or n == 1 or not self.steps_singly:
            out = kept.forward(self.model, grid, input_ids=ids, use_cache=True, **cache_kwargs(self.model, cache),
                               output_hidden_states=want_hidden, **padded.arguments(n))
            return out.hidden_states[-1] if want_hidden else None
        steps = [self._forward_tokens(ids[:, i:i + 1], grid[:, i:i + 1], cache, padded, False, kept, want_hidden)
                 for i in range(n)]
        return torch.cat(steps, 1) if want_hidden else None

    # ----- the states

    def _store(self, cache, spans):
        """Keep row i's state in `cache` (after a forward) under spans[i], the most recently used."""
        states = self._batched_states(cache)
        for i, span in enumerate(spans):
            self.states[span] = tuple(t[i].clone() for t in states)
            self.states.move_to_end(span)

    def _state_source(self, span, coming):
        """`span` or its nearest ancestor whose end state is stored or `coming` (stored by a row of this call:
        span id -> that row's level), or -1; a stored one moves to the end of the LRU order."""
        while span >= 0 and span not in self.states and span not in coming:
            span = self.span_tree.parent(span)
        if span in self.states:
            self.states.move_to_end(span)
        if span >= 0:
            self.started_from.add(span)
        return span

    def _trim(self, capacity):
        """Drop states past `capacity`: first those of spans released (no call extends them; only bringing back an
        evicted descendant might start from one) or gone from the tree, then of unpinned spans, those a row has
        started from already before the others (a search extends its leaves more often than its inner nodes), each
        least recently used first."""
        if len(self.states) <= capacity:
            return
        tree = self.span_tree
        for span in [s for s in self.states if not (tree.exists(s) and tree.is_live(s))]:
            del self.states[span]
        unpinned = [s for s in self.states if not tree.pins(s)]
        order = [s for s in unpinned if s in self.started_from] + [s for s in unpinned if s not in self.started_from]
        for span in order[:max(len(self.states) - capacity, 0)]:
            del self.states[span]
        self.started_from &= set(self.states)

    # ----- Hugging Face's cache

    def _new_cache(self):
        return DynamicCache(config=self.config)

    def _batched_states(self, cache):
        """The tensors [rows, ...] of every state slot of `cache` after a forward."""
        return [getattr(cache.layers[index], kind)[s] for index, s, kind in self.state_slots]

    def _load(self, cache, kv, row_states, length):
        """Fill a fresh `cache` with the attention layers' K/V `kv` [(keys, values) [rows, heads, length, dim]] and
        the linear layers' states, row i's from row_states[i], as the cache would hold them after `length` tokens."""
        for index, (keys, values) in zip(self.attention_layers, kv):
            cache.layers[index].update(keys, values)
        stacked = [torch.stack(slot) for slot in zip(*row_states)]
        for (index, s, kind), tensor in zip(self.state_slots, stacked):
            layer = cache.layers[index]
            if kind == "conv_states":
                layer.update_conv_state(tensor, state_idx=s)
            else:
                layer.update_recurrent_state(tensor, state_idx=s)
            layer.has_previous_state[s] = True
        for index in self.linear_layers:   # transformers >= 5.25 counts the tokens a linear layer has seen
            counted = getattr(cache.layers[index], "cumulative_length_linear", None)
            if isinstance(counted, torch.Tensor):
                counted.fill_(length)

    def _pads_exactly(self):
        """Whether two rows whose contexts (2 and 4 tokens, each run alone) sit left-padded in one cache, as
        LeftPadded puts them, continue by 2 + 1 tokens to the logits of the model's forward over each whole
        sequence and end in its states, within rounding of its dtype (without an attention layer, nothing is padded:
        the states alone). False also where the forward takes no position_ids or fails with a 2D mask over a cache
        (a mixer that masks its input with it, say)."""
        if self.attention_layers and "position_ids" not in inspect.signature(self.model.forward).parameters:
            return False
        ids = torch.tensor([probe_ids(self.model, row) for row in ([1, 0, 2, 1, 3, 0, 0], [2, 3, 1, 1, 0, 2, 3])],
                           device=self.device)
        lengths, new = (2, 4), 3
        try:
            with torch.inference_mode(), eval_mode(self.model):
                kv, states, wholes = [], [], []
                for row, length in enumerate(lengths):
                    cache = self._new_cache()
                    self.model(input_ids=ids[row:row + 1, :length], use_cache=True, **cache_kwargs(self.model, cache))
                    kv.append([(cache.layers[i].keys, cache.layers[i].values) for i in self.attention_layers])
                    states.append(tuple(t[0] for t in self._batched_states(cache)))
                    whole_cache = self._new_cache()
                    whole = self.model(input_ids=ids[row:row + 1, :length + new], use_cache=True,
                                       **cache_kwargs(self.model, whole_cache)).logits[0, -new:]
                    wholes.append((whole, [t[0] for t in self._batched_states(whole_cache)]))
                cache, padded = self._new_cache(), LeftPadded.of(lengths, self.device, bool(self.attention_layers))
                self._load(cache, left_padded_kv(kv, lengths), states, max(lengths))
                new_ids = torch.stack([ids[row, length:length + new] for row, length in enumerate(lengths)])
                grid, kept = np.arange(2 * new).reshape(2, new), KeptLogits(self.keeps_logits, np.arange(2 * new),
                                                                            2 * new, self.device)
                for begin, end in ((0, 2), (2, 3)):
                    self._forward_tokens(new_ids[:, begin:end], grid[:, begin:end], cache, padded, False, kept)
                logits = kept.result().view(2, new, -1)
        except Exception:
            return False
        ends = self._batched_states(cache)
        dtype = self.model.dtype
        return all(agree_within_rounding(dtype, whole, (logits[row], whole)) and
                   all(agree_within_rounding(dtype, expected, (got[row], expected))
                       for got, expected in zip(ends, end_states))
                   for row, (whole, end_states) in enumerate(wholes))

    def _continues_exactly(self, ends):
        """Whether two sequences run in pieces ending at `ends` (_PIECES or _STEPS), each on a cache rebuilt from the
        states and K/V the previous forward left (another batch run in between), get the logits of the model's
        forward over the whole sequences, and end in the states it leaves, within rounding of the model's dtype. The
        states too, and three pieces of several tokens: a mixer that drops the state it was given over several tokens
        (Mamba's, Jamba's) hardly moves a tiny random model's logits, and after one such piece (3 + 3 + 1 tokens)
        a tiny bf16 Jamba's states were within bf16's rounding of the whole forward's."""
        ids = torch.tensor([probe_ids(self.model, row) for row in ([1, 0, 2, 1, 3, 0, 2], [2, 3, 1, 1, 0, 2, 3])],
                           device=self.device)
        with torch.inference_mode(), eval_mode(self.model):
            whole_cache = self._new_cache()
            whole = self.model(input_ids=ids, use_cache=True, **cache_kwargs(self.model, whole_cache)).logits
            kv, states, parts, done = [], None, [], 0
            for end in ends:
                cache = self._new_cache()
                if done:
                    self._load(cache, kv, states, done)
                self.model(input_ids=torch.zeros(2, 2, dtype=torch.long, device=self.device), use_cache=True,
                           **cache_kwargs(self.model, self._new_cache()))   # another batch in between
                parts.append(self.model(input_ids=ids[:, done:end], use_cache=True,
                                        **cache_kwargs(self.model, cache)).logits)
                kv = [(cache.layers[i].keys, cache.layers[i].values) for i in self.attention_layers]
                states = list(zip(*self._batched_states(cache)))
                done = end
        return agree_within_rounding(self.model.dtype, whole, (torch.cat(parts, 1), whole)) and all(
            agree_within_rounding(self.model.dtype, expected, (torch.stack(got), expected))
            for got, expected in zip(zip(*states), self._batched_states(whole_cache)))


# The pieces the probe runs the 7 tokens of its sequences in (their ends): several tokens from a state, else, for
# the mixers that continue a state by one token only, a prefill and then one token at a time.
_PIECES, _STEPS = (2, 4, 6, 7), (2, 3, 4, 5, 6, 7)


class _Row(NamedTuple):
    """A row of a group: its index in the batch, the spans it makes (its cuts', then its own), the span whose state
    it starts from (-1: none), the span it extends, the tokens before the state it starts from (its context in the
    pool)."""
    row: int
    chain: list
    source: int
    start: int
    base: int


def _layer_kinds(cache):
    """(attention layer indices, linear-attention layer indices, None) of a cache after a forward, or a problem that
    this runner cannot hold (a layer of another kind: a sliding window, a static or the model's own cache layer;
    no linear-attention layer: HFCacheModel's case)."""
    from transformers.cache_utils import DynamicLayer, LinearAttentionCacheLayerMixin
    layers = list(getattr(cache, "layers", ()))
    linear = [index for index, layer in enumerate(layers) if isinstance(layer, LinearAttentionCacheLayerMixin)]
    if not linear:
        return [], [], "its cache holds no linear-attention state"
    attention = []
    for index, layer in enumerate(layers):
        kind = type(layer)
        if isinstance(layer, DynamicLayer):   # full attention alone: no window, no index, no compression
            if any(issubclass(cls, DynamicLayer) and cls is not DynamicLayer
                   and not issubclass(cls, LinearAttentionCacheLayerMixin) for cls in kind.__mro__):
                return [], linear, f"its cache layer {index} is a {kind.__name__}, not full attention"
            attention.append(index)
        elif not isinstance(layer, LinearAttentionCacheLayerMixin) and \
                (kind.__name__, kind.__module__) != ("DummyLayer", DynamicLayer.__module__):   # Nemotron-H's MLPs
            return [], linear, f"its cache layer {index} is a {kind.__name__}"
    return attention, linear, None


def _unfit(model, reason, holds_states=True):
    """The error refusing `model` for `reason` (also kept as its attribute, with `holds_states`: False where its
    cache holds no linear-attention state, so that this runner was never its case)."""
    error = ValueError(f"model: {type(model).__name__} cannot run on Hugging Face's cache with its recurrent states "
                       f"kept per span: {reason}")
    error.reason, error.holds_states = reason, holds_states
    return error
