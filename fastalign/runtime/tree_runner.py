"""TreeRunner: a language model whose KV cache is a tree of spans that a search grows and prunes.

A span (see span.py) is a handle on cached KV: creating children of spans computes only their new
tokens, all rows in ONE batched forward; a child shares its parent's blocks; releasing a branch gives
its blocks back; rewinding to an ancestor is using the ancestor's handle. The pool is fixed-size; when it
is full, least-recently-used unpinned spans are evicted and transparently recomputed if used again, so
eviction is a cache policy that changes a result by rounding at most (a span recomputed in another batch; see
csrc/span_tree.h).

Llama-family models (Llama, Mistral, Qwen2, Qwen3, Gemma, Gemma 2, Gemma 3, OLMo 2, OLMo 3, Mixtral, Qwen2-MoE,
Qwen3-MoE) run on the paged pool with the paged attention kernels (llama.py), as do other causal LMs whose layers
attend through transformers' attention interface (hf_paged.py: Phi-3, Granite, GPT-2, ...); the rest fall back to
Hugging Face's own forward and cache (hf_cache.py, rows alike batched; hf_state_cache.py where it holds linear-attention
states too, each span's kept, rows alike batched), or, where it cannot continue from a rebuilt cache, to its forward
over whole sequences (hf_recompute.py), with the same API.
"""
import collections
import threading
import warnings
from typing import Any, Iterable, Literal, Sequence, get_args, overload

import numpy as np
import torch

from fastalign._C import PoolExhaustedError, SpanTree
from fastalign.model_decoder import prompt_learning_adapter
from fastalign.model_devices import model_device
from fastalign.model_vocabulary import input_vocabulary
from fastalign.one_call import one_call_at_a_time
from fastalign.ops.backend import Backend, autocast_off, resolve_backend
from fastalign.ops.checks import int_ids, is_integer
from fastalign.runtime import graphed_forward
from fastalign.runtime.forward_batch import ForwardBatch
from fastalign.runtime.graphed_forward import GraphedForward
from fastalign.runtime.kv_pool import KVPool
from fastalign.runtime.llama import PagedLlama
from fastalign.runtime.model_runners import choose_model_runner
from fastalign.runtime.span import Span
from fastalign.runtime.span_store import SpanStore
from fastalign.transfers import index_on


_Outputs = Literal["last", "all"]   # which outputs extend returns (logits=, hidden=): at the last tokens, or at all
Output = _Outputs | None
_OUTPUTS = (*get_args(_Outputs), None)
_FEW_STATES = 32   # fewer states than this in the default room: the runner warns (a search keeps more spans)


def _adapters_in_layers(model):
    """The transformers model under a PEFT wrapper whose adapters live in its layers (LoRA and its kin: the paged
    path runs them as it runs the layers), so that such a model gets the paged path; else `model` itself. A
    prompt-learning adapter is refused: its virtual tokens (or their K/V) come before every sequence in the wrapper's
    forward alone, which neither path runs with the cache of a span."""
    if getattr(model, "active_peft_config", None) is None:
        return model
    adapter = prompt_learning_adapter(model)
    if adapter is not None:
        raise ValueError(f"model: its PEFT adapter ({adapter}) is a prompt-learning adapter, whose virtual tokens a "
                         "TreeRunner cannot cache; use an adapter in the layers (LoRA and its kin)")
    return model.get_base_model()


def _graph_capture(model_runner, backend):
    """How TreeRunner(cuda_graphs=True) captures `model_runner`'s forward; a ValueError where it cannot."""
    capture = graphed_forward.capture_for(model_runner.device)
    if not isinstance(model_runner, PagedLlama) or backend != "triton" or capture is None:
        raise ValueError(f"cuda_graphs: CUDA graphs take a model on the paged Llama path with the Triton attention "
                         f"backend, on a CUDA device; this one runs on {type(model_runner).__name__} with the "
                         f"{backend or 'Hugging Face'} attention on {model_runner.device}: pass cuda_graphs=False")
    return capture


# a call while another runs would compute from KV that the running call has not written yet, or release what it uses
_one_call_at_a_time = one_call_at_a_time(
    "its forward", "use one TreeRunner per thread (they may share one model) or serialise the calls")


def _as_list(value, name, expected):
    """`value` as a list; a ValueError naming `name` and what was `expected` when it is not iterable."""
    try:
        return list(value)
    except TypeError:
        raise ValueError(f"{name}: expected {expected}, got {type(value).__name__}") from None


def _ids(value, name, what, expected, empty=False):
    """int_ids of `value`, a tensor or array as it is (a list of its 0-d elements would cost a Python step each), any
    other iterable as a list (_as_list's error where it is not iterable)."""
    if not isinstance(value, (torch.Tensor, np.ndarray)):
        value = _as_list(value, name, expected)
    return int_ids(value, name, what, empty=empty)


class TreeRunner:
    """Runs `model` (a loaded Hugging Face causal LM, without dropout whatever its mode) over a tree of cached spans.
    The model computes on one device, where the KV pool goes (weights that accelerate offloads are fine, a device_map
    over several devices is refused), in the dtype it has when the runner is made: a call after `model.to(...)`
    changed either is refused. Each call runs the model's modules as they are then (on PagedLlama its layers and norms
    too, and the config values its forward reads at each call, such as final_logit_softcapping; another number of
    layers than the pool's is refused) and takes the token ids its input embeddings hold then; which runner it runs
    on, the pool's shapes and hooks (a user's hooks added later are skipped on the paged Llama path: add them first)
    are looked at when the runner is made, as is each layer's attention on PagedHF (its probe). Weights changed in
    place (an optimizer step, load_state_dict, a LoRA adapter added) change what later calls compute, but spans cached
    before keep the old weights' K/V, and their children attend to it: release them, or make a new runner, after
    changing the weights.

    Size the KV pool with exactly one of `max_tokens` (rounded up to whole blocks) or `max_bytes`.
    Families that layer_layouts names run on PagedLlama; any other causal LM whose layers attend through
    transformers' attention interface, on PagedHF once its probe passes; the rest on Hugging Face's own cache
    (HFCacheModel; HFStateCacheModel where it holds linear-attention states too: Qwen3.5, Mamba 2, Mamba and Jamba
    (a token at a time from a state), ..., each span's state kept in at most `max_state_bytes`, by default as many
    bytes as the pool, max_bytes then shared half and half; more room for states means fewer tokens run again, see
    hf_state_cache.py; both batch rows alike across prompts), or where it cannot continue from a rebuilt cache
    (RWKV, RecurrentGemma, MiniMax) by computing each row's whole sequence at every
    call (HFRecomputeModel, much slower), unless `fallback=False`, which refuses them. `attention_backend` is passed to
    `fastalign.ops.paged_attention` ("auto", "triton", "torch").
    `cascade_attention`: on the Triton backend, rows of a forward that share whole prefix blocks (the
    children of one span, consecutive in the call) read those blocks once per group instead of once per
    row (planned on the host for each forward, `plan_shared_prefix`); results are the same either way.
    `cuda_graphs`: on a CUDA model on PagedLlama with the Triton backend, calls of at most 512 new tokens replay
    CUDA graphs (one per shape bucket, captured at its first call) instead of launching each kernel (see
    graphed_forward.py; the pool gets one scratch block more); results are the same either way. A graph replays the
    modules, weight tensors and config values of its capture: make a new runner after replacing any of them.
    An enclosing autocast does not apply inside (load the model in the dtype to run it in; see autocast_off).
    Threads: a runner runs one call (prefill, extend, pin, unpin, release) at a time, and refuses another made
    meanwhile with a RuntimeError; give each thread its own runner (runners may share one model) or serialise calls.
    A runner made while another thread's runner of the model runs a forward is made after that forward. A plain
    forward, generate or CausalLMLoss on a PagedHF model from another thread while a runner's forward runs on it is
    refused with a RuntimeError (its attention is routed to that runner's pool meanwhile), as is a forward of the
    model inside a runner's forward in the same thread (a hook that calls it), before it computes anything.
    """

    def __init__(self, model: torch.nn.Module, *, max_tokens: int | None = None, max_bytes: int | None = None,
                 block_size: int = 16, fallback: bool = True, attention_backend: Backend = "auto",
                 cascade_attention: bool = True, max_state_bytes: int | None = None, cuda_graphs: bool = False):
        if max_state_bytes is not None and (not is_integer(max_state_bytes) or max_state_bytes <= 0):
            raise ValueError(f"max_state_bytes: expected a positive int or None, got {max_state_bytes!r}")
        if not is_integer(block_size) or block_size <= 0:
            raise ValueError(f"block_size: expected a positive int, got {block_size!r}")
        block_size = int(block_size)
        for name, value in (("fallback", fallback), ("cascade_attention", cascade_attention),
                            ("cuda_graphs", cuda_graphs)):
            if not isinstance(value, bool):  # a string such as "no" would count as True
                raise ValueError(f"{name}: expected True or False, got {value!r}")
        if not isinstance(model, torch.nn.Module):
            raise ValueError(f"model: expected a loaded Hugging Face causal LM (a torch.nn.Module), got "
                             f"{type(model).__name__}")
        # where the pool lives and every forward runs (an offloaded weight's hook brings it there); a model on
        # several devices is refused: the paged path calls the layers' submodules, not the hooks of a device_map's
        # blocks, and the fallback's cache would mix devices
        device = model_device(model, "a TreeRunner") or torch.device("cpu")
        layered = _adapters_in_layers(model)
        # resolved here, on either path, once: before the runners, which take a model they cannot run as unfit (a
        # ValueError) and fall back
        backend = resolve_backend(attention_backend, device, "attention_backend", getattr(layered, "dtype", None))
        self.model_runner = choose_model_runner(model, layered, backend, device, fallback)
        self.model = model
        mr = self.model_runner
        # weights whose dtype and device each call checks are still those the runner was made for (model.to(...)):
        # the first, and the first in the pool's dtype (a model of bf16 embeddings before fp32 layers keeps fp32 K/V)
        floating = [(name, p) for name, p in model.named_parameters() if p.is_floating_point()]
        in_pool_dtype = [(name, p) for name, p in floating if p.dtype == mr.dtype]
        self._watched = {name: (p.dtype, p.device) for name, p in floating[:1] + in_pool_dtype[:1]}
        geometry = dict(block_size=block_size, dtype=mr.dtype)
        keeps_states = hasattr(mr, "state_bytes")   # HFStateCacheModel: recurrent states beside the pool
        if max_state_bytes is not None and not keeps_states:
            raise ValueError(f"max_state_bytes: {type(model).__name__} keeps no recurrent state (it runs on "
                             f"{type(mr).__name__}), so there is nothing to give room to")
        # its states take max_state_bytes, else as many bytes as the pool: given max_bytes alone, half of it each
        halved = keeps_states and max_state_bytes is None and is_integer(max_bytes)
        num_blocks = KVPool.num_blocks_for(max_tokens=max_tokens, max_bytes=max_bytes, shares=2 if halved else 1,
                                           block_size=block_size,
                                           bytes_per_block=KVPool.bytes_per_block(mr.pool_shapes, **geometry))
        backend = backend if self.paged else None   # (the fallbacks compute Hugging Face's attention)
        capture = _graph_capture(mr, backend) if cuda_graphs else None
        # with graphs, one block more, which no span holds: the padding tokens' K/V go there
        self.pool = KVPool(mr.pool_shapes, num_blocks=num_blocks + (capture is not None), device=mr.device,
                           **geometry)
        if capture is not None:
            self.model_runner = GraphedForward(mr, scratch_slot=num_blocks * block_size, capture=capture)
        self.store = SpanStore(num_blocks, block_size)
        if hasattr(mr, "span_tree"):   # the Hugging Face cache fallbacks: which rows build on which
            mr.span_tree = self.store.tree
        if keeps_states:
            mr.state_capacity = self._state_capacity(model, max_state_bytes)
        self._cascade_block_size = block_size if cascade_attention and backend == "triton" else None
        self.max_context = mr.max_context
        self._busy = threading.Lock()   # held by the running call (see _one_call_at_a_time)
        self.recomputed_tokens = 0      # tokens run again over the runner's life: evicted spans brought back, and
        # on HFRecomputeModel the contexts of rows, on HFStateCacheModel those after the nearest state kept
        self.last_restored: dict[int, int] = {}   # span id -> tokens run again for it by the last extend / pin
        self.last_context_rerun = np.zeros(0, dtype=np.int64)  # on HFRecomputeModel, per row of the last extend:
        # the context tokens run again for its outputs; on HFStateCacheModel, those after the nearest state kept;
        # (empty on the other runners, which read the context from the pool)

    def _state_capacity(self, model, max_state_bytes):
        """How many spans' recurrent states fit in `max_state_bytes`, by default in as many bytes as the pool: a
        ValueError where the given bytes hold none, a warning where the default room holds fewer than a search
        keeps spans (a pure state-space model's pool is a placeholder of a few bytes a token)."""
        state_bytes, name = self.model_runner.state_bytes, type(model).__name__
        if max_state_bytes is not None:
            if max_state_bytes < state_bytes:
                raise ValueError(f"max_state_bytes: {max_state_bytes} bytes hold no state of {name}, which takes "
                                 f"{state_bytes} bytes a span; give at least that")
            return int(max_state_bytes) // state_bytes
        capacity = self.pool.nbytes // state_bytes
        if capacity < _FEW_STATES:
            warnings.warn(f"TreeRunner: the recurrent states' default room, as many bytes as the KV pool "
                          f"({self.pool.nbytes}), holds {capacity} states of {name} ({state_bytes} bytes each); "
                          "spans past them run their tokens again (same results, more compute): give the states room "
                          "with max_state_bytes (fastalign rain: --state-memory)", stacklevel=3)
        return max(capacity, 1)

    def __reduce_ex__(self, protocol):
        """Refused, for copy.copy, copy.deepcopy and pickle alike: the KV pool and span tree are the runner's own
        (deepcopy copied the whole model, then failed on the span tree)."""
        raise TypeError("a TreeRunner cannot be copied or pickled: its KV pool and spans are its own; make a new "
                        "TreeRunner on the model, or on the copy of it")

    # ----- the tree

    @property
    def tree(self) -> SpanTree:
        """The C++ span tree (fastalign._C.SpanTree), for inspection."""
        return self.store.tree

    @property
    def paged(self) -> bool:
        """True where the model computes attention on the paged pool, batched (PagedLlama, PagedHF); False on the
        Hugging Face cache fallback."""
        return self.model_runner.paged

    @property
    def vocab_size(self) -> int | None:
        """The token ids the model embeds (its input embeddings' rows), read at each call as its forward reads them:
        model.resize_token_embeddings(...) after the runner was made changes it."""
        return input_vocabulary(self.model)

    @property
    def block_size(self) -> int:
        return self.pool.block_size

    @property
    def num_blocks(self) -> int:
        return self.tree.num_blocks   # the blocks spans can hold (with cuda_graphs the pool has one more)

    @property
    def num_free_blocks(self) -> int:
        return self.tree.num_free_blocks

    @_one_call_at_a_time
    def prefill(self, token_ids: Sequence[int]) -> Span:
        """A new root span holding `token_ids` (one forward, no outputs). To also get the next-token
        logits, use `extend([None], [token_ids])`."""
        (root,), _ = self._extend([None], [token_ids], cuts=None, logits=None, hidden=None, row_name="token_ids")
        return root

    @overload
    def extend(self, parents: Sequence[Span | int | None], token_lists: Sequence[Sequence[int]], *,
               cuts: None = None, logits: Literal["last"] = "last", hidden: None = None
               ) -> tuple[list[Span], torch.Tensor]: ...

    @overload
    def extend(self, parents: Sequence[Span | int | None], token_lists: Sequence[Sequence[int]], *,
               cuts: None = None, logits: Literal["all"], hidden: None = None
               ) -> tuple[list[Span], list[torch.Tensor]]: ...

    @overload
    def extend(self, parents: Sequence[Span | int | None], token_lists: Sequence[Sequence[int]], *,
               cuts: None = None, logits: None, hidden: None = None) -> tuple[list[Span], None]: ...

    @overload
    def extend(self, parents: Sequence[Span | int | None], token_lists: Sequence[Sequence[int]], *,
               cuts: Sequence[Sequence[int]], logits: Output = "last", hidden: None = None
               ) -> tuple[list[list[Span]], Any]: ...

    @overload
    def extend(self, parents: Sequence[Span | int | None], token_lists: Sequence[Sequence[int]], *,
               cuts: Sequence[Sequence[int]] | None = None, logits: Output = "last", hidden: _Outputs
               ) -> tuple[Any, Any, Any]: ...

    @_one_call_at_a_time
    def extend(self, parents: Sequence[Span | int | None], token_lists: Sequence[Sequence[int]], *,
               cuts: Sequence[Sequence[int]] | None = None, logits: Output = "last", hidden: Output = None,
               logits_of: Sequence[int] | None = None) -> tuple[Any, ...]:
        """Append token_lists[i] (one or more token ids) to parents[i] (a Span, None to start a new root,
        or the int j < i: the child of row j of this call), every row in ONE forward. Parents may repeat
        and may be evicted (they are recomputed). A row on an earlier row attends to that row's tokens as
        the same forward computes them: rows that build on one another cost one call, no token twice.

        cuts: None, or one sequence per row of increasing offsets strictly inside the row (1 <= c <
        len(token_lists[i])): each offset c also makes a span of the row's first c tokens, in the same
        forward and without computing any token twice (row i then grows the chain parents[i] -> span at
        its first cut -> ... -> its child). With cuts, the first value returned is a list of R lists,
        row i's spans at its cuts and then its child.

        logits / hidden choose the outputs: "last" -> a tensor [S, vocab] / [S, hidden_size] taken at the
        last token of each returned span, in order (S = R without cuts: the next-token logits of each
        child); "all" -> a list of R tensors [n_i, ...], one row per new token of row i (logits at token t
        predict token t + 1); None -> not computed. Logits are float32; hidden states are the final hidden
        states (after the final norm) in the dtype the model's final norm gives them (its own; float32 for a bf16
        Mamba or Mamba 2 with config.residual_in_fp32, the default: the norm returns its input's dtype, and that
        residual stream is kept in float32); both are ordinary tensors without grad.
        logits_of: None, or with logits="last" the indices (into the S returned spans, in that order) of the spans
        whose logits to compute: the logits are then [len(logits_of), vocab], in the order given, and the LM head runs
        at those tokens alone (a search that reads some spans' logits need not pay the [S, vocab] product for all).
        Returns (children, logits), or (children, logits, hidden) when hidden is not None.
        """
        return self._extend(parents, token_lists, cuts=cuts, logits=logits, hidden=hidden,
                            row_name="token_lists[{}]", logits_of=logits_of)

    def head_at_columns(self, columns: Sequence[int]):
        """A function from final hidden states [N, hidden_size] (extend's with hidden="last"; those of hidden="all",
        a list by span, concatenated) to the model's float32
        logits at the vocabulary `columns` [N, len(columns)], computed from those rows of the LM head alone, as the
        runner computes the model's head now (bias, soft cap): to read a few columns of many rows without the
        [N, vocab] product. None where the runner cannot compute the head at chosen columns alone (a head other than
        a plain Linear, or hooks on it; the runners other than PagedLlama, whose logits the model's forward makes):
        ask extend for those rows' logits there."""
        columns = _ids(columns, "columns", "vocabulary ids", "a sequence of vocabulary ids", empty=True)
        head_at = getattr(self.model_runner, "head_at_columns", None)
        return None if head_at is None else head_at(columns)

    def _extend(self, parents, token_lists, *, cuts, logits, hidden, row_name, logits_of=None):
        """`extend`, naming row i's token ids `row_name.format(i)` in its errors (prefill's are `token_ids`)."""
        self.last_restored = {}     # first: a call refused below restores nothing
        self.last_context_rerun = np.zeros(0, dtype=np.int64)
        self._check_model_unchanged()
        for name, value in (("logits", logits), ("hidden", hidden)):
            if value not in _OUTPUTS:
                raise ValueError(f"{name}: expected one of {_OUTPUTS}, got {value!r}")
        parents = _as_list(parents, "parents", "a sequence of parents, one per row (a Span, None or an earlier row's "
                           "index)")
        if not parents:
            raise ValueError("parents: expected at least one parent (None starts a new root)")
        parent_ids = np.array([self._parent_code(p, i) for i, p in enumerate(parents)], dtype=np.int64)
        parents = [int(p) if isinstance(p, np.integer) else p for p in parents]
        tokens, cu_lens = self._pack_tokens(token_lists, len(parents), row_name)
        row_cuts = None if cuts is None else self._check_cuts(cuts, cu_lens)
        lengths = np.array(self._lengths(parents, cu_lens))   # of every row's span once extended
        self._check_context(lengths, row_name)
        self._check_fits(parents, lengths, np.diff(cu_lens))
        ends = cu_lens[1:] - 1                      # the token that ends each returned span
        if row_cuts is not None:
            ends = np.array([cu_lens[r] + c - 1 for r, offsets in enumerate(row_cuts) for c in offsets
                             + [cu_lens[r + 1] - cu_lens[r]]], dtype=np.int64)
        logits_of = self._check_logits_of(logits_of, logits, len(ends))

        def run(plan):  # outputs only for the new children, not for spans recomputed on the way
            return self._forward(plan, logits, hidden, ends, logits_of) if plan.creates_spans else self._forward(plan)

        flat_cuts = cu_cuts = None
        if row_cuts is not None:
            flat_cuts = np.array([c for offsets in row_cuts for c in offsets], dtype=np.int64)
            cu_cuts = np.zeros(len(parents) + 1, dtype=np.int64)
            cu_cuts[1:] = np.cumsum([len(offsets) for offsets in row_cuts])
        child_ids, cut_ids, (out_logits, out_hidden) = self.store.extend(parent_ids, tokens, cu_lens, run,
                                                                         flat_cuts, cu_cuts)
        if self.model_runner.recomputes_context and (logits, hidden) != (None, None):
            self.last_context_rerun = lengths - np.diff(cu_lens)
            self.recomputed_tokens += int(self.last_context_rerun.sum())
        elif hasattr(self.model_runner, "last_rerun"):   # HFStateCacheModel: from the nearest state kept
            self.last_context_rerun = self.model_runner.last_rerun
        try:    # the new spans are the caller's only once returned: an interrupt or an error before gives them back
            children = self._handles(parents, row_cuts, child_ids, cut_ids, lengths, cu_lens)
            results = (children, out_logits if logits_of is not None else self._format(out_logits, logits, cu_lens,
                                                                                         ends))
            if hidden is not None:
                results += (self._format(out_hidden, hidden, cu_lens, ends),)
        except BaseException:
            for span_id in np.concatenate([cut_ids, child_ids]).tolist():
                if self.tree.is_live(span_id):  # a handle made already finds it released
                    self.tree.release(span_id)
            raise
        return results

    def _handles(self, parents, row_cuts, child_ids, cut_ids, lengths, cu_lens):
        """The Spans of the new span ids of `_extend`: one per row, or with cuts a chain per row."""
        if row_cuts is None:
            children = []
            for i, p, n in zip(child_ids, parents, lengths.tolist()):
                children.append(Span(self, int(i), children[p] if isinstance(p, int) else p, int(n), self.tree))
            return children
        children, cut_ids = [], iter(cut_ids.tolist())
        for parent, offsets, child_id, length, row_len in zip(parents, row_cuts, child_ids, lengths.tolist(),
                                                              np.diff(cu_lens)):
            parent = children[parent][-1] if isinstance(parent, int) else parent
            base, chain = length - int(row_len), []
            for c in offsets:
                chain.append(Span(self, next(cut_ids), chain[-1] if chain else parent, base + c, self.tree))
            chain.append(Span(self, int(child_id), chain[-1] if chain else parent, length, self.tree))
            children.append(chain)
        return children

    @_one_call_at_a_time
    def release(self, spans: Span | Iterable[Span]) -> None:
        """End one span or an iterable of spans. A released span's KV is freed once no live descendant
        needs it as a prefix; its descendants stay valid. Releasing also drops its pins."""
        spans = [spans] if isinstance(spans, Span) else _as_list(spans, "spans", "a Span or an iterable of Spans")
        ids = [self.check_span(s, f"spans[{i}]").id for i, s in enumerate(spans)]
        if len(set(ids)) != len(ids):
            raise ValueError("spans: the same span is listed twice")
        for span in spans:
            self.tree.release(span.id)      # first: a release refused (a span in use) leaves the handle its owner
            span._owned = False

    @_one_call_at_a_time
    def pin(self, span: Span) -> None:
        """Keep `span` (and so its ancestors) resident until unpinned or released; pins nest. An evicted
        span is recomputed first."""
        self.last_restored = {}
        self.check_span(span, "span")
        self._check_model_unchanged()
        self.store.make_resident([span.id], self._forward)
        self.tree.pin(span.id)

    @_one_call_at_a_time
    def unpin(self, span: Span) -> None:
        """Undo one `pin` of `span`."""
        self.check_span(span, "span")
        self.tree.unpin(span.id)

    def _check_model_unchanged(self):
        """A ValueError where the model's weights changed dtype or device since the runner was made (model.to(...)):
        the KV pool and the model runner were made for the weights as they were (read from two weights, host-side)."""
        for name, made_for in self._watched.items():
            weight = self.model.get_parameter(name)
            if (weight.dtype, weight.device) != made_for:
                raise ValueError(f"model: its weights changed from {made_for[0]} on {made_for[1]} to {weight.dtype} "
                                 f"on {weight.device} ({name}) since this TreeRunner was made for them; make a new "
                                 "TreeRunner for the model as it is now")

    def check_span(self, span, name):
        """`span` itself when it is a live span of this runner; a ValueError naming `name` otherwise."""
        if not isinstance(span, Span):
            raise ValueError(f"{name}: expected a Span of this runner, got {type(span).__name__}")
        if span._runner is not self:
            raise ValueError(f"{name}: {span!r} belongs to another TreeRunner")
        if not self.tree.is_live(span.id):
            raise ValueError(f"{name}: span {span.id} was released")
        return span

    # ----- internals

    def _pack_tokens(self, token_lists, rows, row_name):
        """Flat int32 tokens and int64 row offsets, after checking every list and token id (the ids of all
        rows at once: numpy checks row by row cost ~15 us of host time a row)."""
        if isinstance(token_lists, (str, bytes)):
            raise ValueError("token_lists: expected one sequence of token ids per parent")
        token_lists = _as_list(token_lists, "token_lists", "one sequence of token ids per parent")
        if len(token_lists) != rows:
            raise ValueError(f"token_lists: expected {rows} lists (one per parent), got {len(token_lists)}")
        arrays = [int_ids(ids, row_name.format(i), "token ids") for i, ids in enumerate(token_lists)]
        cu_lens = np.zeros(rows + 1, dtype=np.int64)
        cu_lens[1:] = np.cumsum([a.size for a in arrays])
        tokens, vocab_size = np.concatenate(arrays), self.vocab_size
        bad = tokens < 0
        if vocab_size is not None:   # None: not known (check_embedded's rule), no upper bound checked
            bad |= tokens >= vocab_size
        if bad.any():
            i = int(np.searchsorted(cu_lens, np.argmax(bad), side="right")) - 1  # the first bad id's row
            token = arrays[i][bad[cu_lens[i]:cu_lens[i + 1]]][0]                # as given, not as concatenated
            bounds = f"[0, {vocab_size})" if vocab_size is not None else "[0, ...) (its size is not known)"
            raise ValueError(f"{row_name.format(i)}: token id {token} is outside the vocabulary {bounds}")
        return tokens.astype(np.int32), cu_lens

    @staticmethod
    def _check_cuts(cuts, cu_lens):
        """Each row's cut offsets as a list of ints, after checking them against the row's length."""
        if isinstance(cuts, (str, bytes)):
            raise ValueError("cuts: expected one sequence of offsets per parent")
        cuts = _as_list(cuts, "cuts", "one sequence of offsets per parent")
        rows = len(cu_lens) - 1
        if len(cuts) != rows:
            raise ValueError(f"cuts: expected {rows} sequences (one per parent), got {len(cuts)}")
        checked = []
        for i, offsets in enumerate(cuts):
            n = int(cu_lens[i + 1] - cu_lens[i])
            offsets = _ids(offsets, f"cuts[{i}]", "offsets", "a 1-D sequence of int offsets ([] for none)",
                           empty=True).tolist()
            if any(b <= a for a, b in zip([0] + offsets, offsets)) or (offsets and offsets[-1] >= n):
                raise ValueError(f"cuts[{i}]: expected increasing offsets in [1, {n - 1}] (strictly inside the "
                                 f"row of {n} tokens), got {offsets}")
            checked.append(offsets)
        return checked

    @staticmethod
    def _check_logits_of(logits_of, logits, spans):
        """extend's `logits_of` as an int64 array of indices into its `spans` returned spans (None stays None)."""
        if logits_of is None:
            return None
        if logits != "last":
            raise ValueError(f"logits_of: chooses among the logits at the returned spans' last tokens, so it takes "
                             f"logits=\"last\", got logits={logits!r}")
        array = _ids(logits_of, "logits_of", "indices of returned spans (logits=None for no logits)",
                     "a sequence of indices of returned spans")
        if array.min() < 0 or array.max() >= spans:
            raise ValueError(f"logits_of: expected indices in [0, {spans}) (this call returns {spans} spans), got "
                             f"{array.tolist()}")
        return array.astype(np.int64)

    def _parent_code(self, parent, row):
        """The span tree's code of parents[row]: its span id, -1 for a new root, -2 - j for row j's child."""
        if parent is None:
            return -1
        if is_integer(parent):
            if not 0 <= parent < row:
                raise ValueError(f"parents[{row}]: a row index must name an earlier row of this call (0 <= j < "
                                 f"{row}), got {parent}")
            return -2 - int(parent)
        if not isinstance(parent, Span):
            raise ValueError(f"parents[{row}]: expected a Span of this runner, None (a new root) or the int index of "
                             f"an earlier row of this call, got {type(parent).__name__}")
        return self.check_span(parent, f"parents[{row}]").id

    @staticmethod
    def _lengths(parents, cu_lens):
        lengths = []
        for p, n in zip(parents, np.diff(cu_lens)):
            base = 0 if p is None else lengths[p] if isinstance(p, (int, np.integer)) else p.length
            lengths.append(base + int(n))
        return lengths

    def _check_context(self, lengths, row_name):
        if self.max_context is None:
            return
        for i, length in enumerate(lengths.tolist()):
            if length > self.max_context:
                raise ValueError(f"{row_name.format(i)}: the child would hold {length} tokens, past the model's "
                                 f"context of {self.max_context} (max_position_embeddings, or where smaller "
                                 "LongRoPE's original length, past which Hugging Face rotates every position anew)")

    def _check_fits(self, parents, lengths, new_tokens):
        """PoolExhaustedError before anything is evicted when the call cannot fit even in an empty pool (the span
        tree would first evict every evictable span, then blame spans "that cannot be evicted"). A lower bound
        on the blocks the call holds at once: its span parents' blocks, which stay resident (each block once: the
        blocks of resident parents' paths, or as many as the longest evicted parent needs if that is more), plus,
        for each row, the blocks past its parent's last (possibly partly filled) one, plus a copy of a partly
        filled last block for every row on that parent but one (only one child can go on writing into it)."""
        bs = self.block_size
        starts = lengths - new_tokens
        needed = int((-(-lengths // bs) + starts // -bs).sum())   # ceil(a/b) - ceil((a-n)/b)
        on_partial = collections.Counter(p.id if isinstance(p, Span) else -1 - p
                                         for p, start in zip(parents, starts.tolist()) if p is not None and start % bs)
        needed += sum(rows - 1 for rows in on_partial.values())
        spans = {p.id: p for p in parents if isinstance(p, Span)}.values()
        if needed + sum(-(-p.length // bs) for p in spans) <= self.num_blocks:
            return                  # fits even with no block shared between parents: no need to look at blocks
        resident = [self.tree.block_table(p.id) for p in spans if self.tree.is_resident(p.id)]
        held = len(np.unique(np.concatenate(resident))) if resident else 0
        needed += max([held] + [-(-p.length // bs) for p in spans if not self.tree.is_resident(p.id)])
        if needed > self.num_blocks:
            raise PoolExhaustedError(f"KV pool exhausted: this call needs at least {needed} blocks of {bs} tokens "
                                     f"(its parents' and its new tokens') and the pool has {self.num_blocks}; give "
                                     "the runner a larger pool (max_tokens / max_bytes) or extend fewer tokens per "
                                     "call")

    def _forward(self, plan, logits=None, hidden=None, ends=None, logits_of=None):
        """Run one plan: block copies, then the model over its rows. Returns (logits, hidden) at the tokens
        that the choices ("last", "all" or None) need: every token when either is "all" (logits only at
        `ends` when they are "last"), else the tokens at `ends` (the returned spans' last tokens); (None,
        None) when both are None. With `logits_of` (logits "last"), logits at ends[logits_of] alone. Under
        no_grad, not inference_mode: the outputs are the caller's to modify in place (`logits /= temperature`)
        or to feed a module that trains, which inference tensors refuse."""
        device = self.model_runner.device
        if not plan.creates_spans and getattr(self.model_runner, "pool_is_placeholder", False):
            return None, None   # a pure state-space model's evicted spans: nothing to bring back (states aside)
        if not plan.creates_spans and not self.model_runner.recomputes_context:  # bringing back evicted spans
            self.recomputed_tokens += len(plan.token_ids)     # (HFRecomputeModel only writes their ids again)
            self.last_restored.update(zip(plan.row_spans.tolist(), np.diff(plan.cu_q_lens).tolist()))
        cascade = self._cascade_block_size
        if isinstance(self.model_runner, GraphedForward) and self.model_runner.takes(
                len(plan.token_ids), len(plan.seq_lens), len(plan.extra_src)):
            cascade = None   # a graph's launches are fixed: no cascade plan
        some = logits_of is not None and hidden is not None   # the head at some of the tokens selected
        if logits_of is not None and hidden is None:   # logits alone: only the tokens they are asked at
            ends = ends[logits_of]
        with torch.no_grad(), autocast_off(device):
            batch = ForwardBatch.from_plan(plan, device, outputs=() if ends is None else ends,
                                           cascade_block_size=cascade)
            if len(batch.copy_src):
                self.pool.copy_blocks(batch.copy_src, batch.copy_dst)
            logits_rows = index_on(logits_of, device) if some else None
            if logits is None and hidden is None:
                select = None
            elif "all" in (logits, hidden):
                select = torch.arange(batch.num_tokens, device=device)
                if logits == "last":  # hidden states at every token, but the LM head only where asked
                    logits_rows = batch.outputs if logits_rows is None else batch.outputs[logits_rows]
            else:
                select = batch.outputs
            outputs = self.model_runner.forward(batch, self.pool, select, logits is not None, hidden is not None,
                                                logits_rows)
        if hasattr(self.model_runner, "last_rerun"):   # HFStateCacheModel: context tokens run from the nearest state
            rerun = self.model_runner.last_rerun
            self.recomputed_tokens += int(rerun.sum())
            if not plan.creates_spans:   # charged to the span brought back, as its own tokens are
                for span, tokens in zip(plan.row_spans.tolist(), rerun.tolist()):
                    self.last_restored[span] += tokens
        return outputs

    @staticmethod
    def _format(out, which, cu_lens, ends):
        """Outputs of the selected tokens in the shape `which` asks for (all tokens were selected when
        either output asked for "all")."""
        if which is None:
            return None
        if which == "last" and out.shape[0] != len(ends):
            return out[index_on(ends, out.device)]
        if which == "all":
            return list(torch.split(out, np.diff(cu_lens).tolist()))
        return out
