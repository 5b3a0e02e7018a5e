"""A batch's rows packed into prefix trees: each distinct prefix computed once, and no padding.

A forget row and its K mismatch rows begin with the same prompt tokens (SPEC §1 pairs each forget prompt with K
random answers), and every row begins with the template's question marker. A padded batch computes every row
whole and pads it to the longest. Packed, the rows' token sequences are merged into prefix trees laid out along a
few packed rows: a token that several rows share is computed once, attends only to its ancestors in its tree (a
4-D attention mask) and keeps the position it has in its own sequence (position ids), so each row's hidden states
are those of the padded forward up to rounding, and so is the gradient: a shared position's hidden state feeds
every row that reads it, as the sum over the rows that repeated it did.

Packing saves the linear layers' work on repeated prefixes and on padding, but a packed row is longer, and its
attention runs a dense mask over the whole row without a causal kernel's skipping. `RowPacker.plan` estimates
both layouts' cost from the model's shape and keeps the cheaper one, batch by batch.

It is exact only for a decoder that takes position_ids and a 4-D mask and honours both: attention through sdpa or
eager, positions from position_ids (Llama, Qwen, Mistral, Gemma, Phi, ...), no recurrent layer (Mamba, linear
attention), no position bias built from the 2-D mask (ALiBi). `RowPacker` runs two rows that share a prefix both
ways once and compares; a decoder that fails runs padded batches.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Sequence, get_args

import numpy as np
import torch

from fastalign.base_model import base_causal_lm
from fastalign.compute_dtype import compute_dtype
from fastalign.eval_mode import eval_mode
from fastalign.model_vocabulary import input_vocabulary
from fastalign.ops.checks import is_integer
from fastalign.transfers import index_on
from fastalign.unlearn.batching import TokenBatch
from fastalign.unlearn.compute import ModelShape
from fastalign.unlearn.models import causal_lm_parts, final_hidden_states

Packing = Literal["auto", "on", "off"]   # the `packing` setting
MODES = get_args(Packing)
# The attention implementations that take a 4-D mask as given (an additive one, in the compute dtype).
MASKED_ATTENTION = ("sdpa", "eager")
# The entries of the additive mask of a packed forward (P x W x W) may reach this, or twice the [B, T, T] mask of the
# batch's padded rows. Every layer reads it, and where its dtype is not the queries' (an FSDP run whose parameters
# are gathered in another dtype) sdpa's memory-efficient kernel keeps a converted copy per layer for the backward, as
# it does with Hugging Face's boolean masks of padded rows: wider packed rows are not planned.
MAX_MASK_ENTRIES = 2 ** 24
# Packed rows are padded to a multiple of this width: sdpa's memory-efficient kernel takes a mask whose last dimension
# is not aligned to it as a padded copy, made again by every layer (and kept for its backward).
WIDTH_ALIGN = 16
# Cost of a query-key pair under a packed row's mask, against one of padded rows under theirs (Hugging Face masks
# padded rows too, and the kernel computes every pair of both; a batch without padding runs causal, the pairs above
# the diagonal skipped): an estimate that decides when packing pays, not a measurement.
MASKED_PAIR_COST = 1.0


@dataclass
class PackedRows:
    """Rows packed into prefix trees (host tensors). input_ids, position_ids [P, W]: the packed rows, each tree laid
    out in depth-first order; subtree_end [P, W]: one past the last position of each position's subtree (so that key
    j is query i or one of its ancestors exactly when j <= i < subtree_end[j]; a padding slot's subtree is itself);
    index [B, T]: where row b's token t lies in the packed rows flattened to [P * W] (-1: padding); num_tokens: the
    positions that hold a token."""

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    subtree_end: torch.Tensor
    index: torch.Tensor
    num_tokens: int

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.input_ids.shape)

    def allowed(self, device="cpu") -> torch.Tensor:
        """[P, W, W] bool: query i may attend to key j (j is i or an ancestor of i; a padding slot sees itself
        only, so that no softmax row is empty), built on `device` from subtree_end ([P, W] copied, not [P, W, W])."""
        end = self.subtree_end.to(device, non_blocking=True)
        position = torch.arange(end.shape[1], device=end.device)
        return (position[None, None, :] <= position[None, :, None]) & (position[None, :, None] < end[:, None, :])

    def attention_mask(self, dtype: torch.dtype, device) -> torch.Tensor:
        """The additive [P, 1, W, W] mask the decoder takes, on `device`: 0 where allowed, dtype's lowest elsewhere."""
        return torch.zeros((), dtype=dtype, device=device).masked_fill(
            ~self.allowed(device)[:, None], torch.finfo(dtype).min)


def pack_rows(input_ids: torch.Tensor, lengths: Sequence[int], capacity: int) -> PackedRows:
    """Packs the first lengths[b] tokens of each row b of input_ids [B, T] (integer token ids; lengths: B integers in
    [0, T], a row of length 0 packed as nothing) into packed rows whose tokens take at most `capacity` positions each
    (see `SortedRows.place`), all padded to the widest one's tokens rounded up to a multiple of WIDTH_ALIGN: a width
    that can exceed `capacity`."""
    rows = SortedRows(input_ids, lengths)
    return rows.layout(rows.place(capacity))


class SortedRows:
    """A batch's rows in the lexicographic order of their tokens, with the length of the prefix each shares with the
    row before it (`shared`). In that order a row shares the longest prefix with the row just before it of any before
    it, so a prefix tree of consecutive rows is laid out in depth-first order by appending each row's tokens past
    that prefix: its positions follow from the lengths alone, without building the tree."""

    def __init__(self, input_ids: torch.Tensor, lengths: Sequence[int]):
        dtype = input_ids.dtype
        if input_ids.dim() != 2 or dtype.is_floating_point or dtype.is_complex or dtype == torch.bool:
            raise TypeError(f"input_ids must be a [B, T] tensor of integer token ids, got shape "
                            f"{tuple(input_ids.shape)} of {dtype}")
        rows, width = input_ids.shape
        if len(lengths) != rows or not all(is_integer(n) and 0 <= n <= width for n in lengths):
            raise ValueError(f"lengths must hold one integer in [0, {width}] per row of input_ids [{rows}, {width}] "
                             f"(its tokens), got {list(lengths)}")
        self.batch_shape = tuple(input_ids.shape)
        self.tokens = [input_ids[b, :n].numpy() for b, n in enumerate(lengths)]
        self.lengths = [int(n) for n in lengths]
        self.order = sorted(range(len(lengths)), key=lambda b: self.tokens[b].tolist())
        self.shared = [0] * len(self.order)
        for k in range(1, len(self.order)):
            a, b = self.tokens[self.order[k - 1]], self.tokens[self.order[k]]
            n = min(len(a), len(b))
            differ = np.flatnonzero(a[:n] != b[:n])
            self.shared[k] = int(differ[0]) if len(differ) else n

    def place(self, capacity: int) -> list[int]:
        """The first of each packed row's rows (indices into `order`): each row joins the current packed row while
        that stays within `capacity` positions, else starts the next (next fit: a prefix that two packed rows both
        need is computed in each)."""
        longest = max(self.lengths)
        if longest > capacity:
            raise ValueError(f"capacity: a row of {longest} tokens does not fit packed rows of {capacity}")
        starts, size = [], 0
        for k, b in enumerate(self.order):
            new = self.lengths[b] - self.shared[k]
            if not starts or size + new > capacity:
                starts.append(k)
                size = self.lengths[b]
            else:
                size += new
        return starts

    def sizes(self, starts: list[int]) -> list[int]:
        """The positions each packed row of `place`'s `starts` holds."""
        bounds = starts + [len(self.order)]
        return [self.lengths[self.order[first]] + sum(self.lengths[self.order[k]] - self.shared[k]
                                                      for k in range(first + 1, stop))
                for first, stop in zip(bounds, bounds[1:])]

    def layout(self, starts: list[int]) -> PackedRows:
        """The tensors of the packed rows that begin at `starts`."""
        width = aligned_width(max(self.sizes(starts)))
        ids = np.zeros((len(starts), width), dtype=np.int64)
        positions = np.zeros((len(starts), width), dtype=np.int64)
        ends = np.tile(np.arange(1, width + 1, dtype=np.int64), (len(starts), 1))
        index = np.full(self.batch_shape, -1, dtype=np.int64)
        p, size, path, total = -1, 0, None, 0
        for k, b in enumerate(self.order):
            if p + 1 < len(starts) and starts[p + 1] == k:
                p, size, shared, path = p + 1, 0, 0, np.zeros(0, dtype=np.int64)
            else:
                shared = self.shared[k]
            n = self.lengths[b]
            path = np.concatenate([path[:shared], np.arange(size, size + n - shared)])
            ids[p, size:size + n - shared] = self.tokens[b][shared:]
            positions[p, size:size + n - shared] = np.arange(shared, n)
            size += n - shared
            total += n - shared
            # a position's subtree ends after the last position of the rows through it (each row's is its deepest)
            if n:   # (a row of no tokens holds no position)
                np.maximum.at(ends[p], path, path[-1] + 1)
            index[b, :n] = p * width + path
        return PackedRows(torch.from_numpy(ids), torch.from_numpy(positions), torch.from_numpy(ends),
                          torch.from_numpy(index), total)


def aligned_width(size: int) -> int:
    """The width of packed rows holding at most `size` positions: rounded up to a multiple of WIDTH_ALIGN."""
    return -(-size // WIDTH_ALIGN) * WIDTH_ALIGN


class DecoderStates:
    """The final hidden states of a batch's rows, from its padded or its packed forward: `at(rows, columns)` gives
    the [N, H] states of row rows[i]'s token columns[i] (host int64 tensors) by one index_select, which a boolean
    mask on the device would make the host wait for."""

    def __init__(self, flat: torch.Tensor, index: torch.Tensor):
        self.flat, self.index = flat, index

    def at(self, rows: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
        return self.flat.index_select(0, index_on(self.index[rows, columns], self.flat.device))


class RowPacker:
    """Runs a causal LM's decoder over a batch, its rows padded or packed (mode 'auto': whichever `plan` estimates
    cheaper, where packing is exact for the model; 'on': packed always, an error for a model it is not exact for;
    'off': padded). `unavailable` says why packing is not exact for the model (None: it is)."""

    def __init__(self, model: torch.nn.Module, mode: Packing = "auto"):
        self.unavailable = packing_unavailable(model, mode)
        self.mode = mode
        self.shape = ModelShape.of(model)
        self.window = _attention_window(model)
        self._last = (None, None)

    def plan(self, tokens: TokenBatch) -> PackedRows | None:
        """The packed layout the forward of `tokens` runs on, or None for its padded rows (the last batch's layout
        again for the same tensors unchanged since: the trainer plans before its forward; their versions tell a
        buffer refilled in place, the same tensor with other rows. Inference tensors keep no version, and may be
        refilled under inference_mode: they are planned each time)."""
        host = tokens.on_host
        planned = None if host.input_ids.is_inference() or host.attention_mask.is_inference() else (
            host.input_ids, host.attention_mask, host.input_ids._version, host.attention_mask._version)
        last = None if planned is None else self._last[0]
        if last is not None and last[0] is planned[0] and last[1] is planned[1] and last[2:] == planned[2:]:
            return self._last[1]
        attends = host.attention_mask.bool()
        if bool((attends[:, 1:] & ~attends[:, :-1]).any()):   # a token after padding
            raise ValueError("attention_mask must pad on the right: each row's tokens first, then its padding "
                             "(a tokenizer's padding_side='right'), with 1 for a token and 0 for padding")
        layout = None
        lengths = host.attention_mask.sum(1).tolist()
        fits_window = self.window is None or max(lengths) <= self.window  # the 4-D mask sets no window of its own
        if self.mode != "off" and not self.unavailable and fits_window:
            layout = self._cheapest(host.input_ids, lengths)
        self._last = (planned, layout)
        return layout

    def _cheapest(self, input_ids: torch.Tensor, lengths: list[int]) -> PackedRows | None:
        """The packed layout of least estimated cost over capacities of 1, 2, 4, ... times the longest row whose mask
        stays within the bound (MAX_MASK_ENTRIES, or twice the padded rows' mask); None where (mode 'auto') the padded
        rows cost less, or no packing fits."""
        shape, longest = self.shape, max(lengths)
        linear, pair = 2.0 * shape.decoder_params, 4.0 * shape.num_layers * shape.attention_width
        rows = SortedRows(input_ids, lengths)
        causal = 0.5 if min(lengths) == longest else 1.0   # padded rows without padding run causal
        best, best_cost = None, len(lengths) * longest * (linear + pair * longest * causal)   # the padded rows
        bound = max(MAX_MASK_ENTRIES, 2 * len(lengths) * longest * longest)
        if self.mode == "on":
            best_cost = float("inf")
        capacity = longest
        while True:
            starts = rows.place(capacity)
            width = aligned_width(max(rows.sizes(starts)))
            # a mask over the bound is no candidate ('on' packs rows of the longest row's capacity whatever its mask)
            fits = len(starts) * width * width <= bound or (capacity == longest and self.mode == "on")
            cost = len(starts) * width * (linear + pair * width * MASKED_PAIR_COST)
            if fits and cost < best_cost:
                best, best_cost = starts, cost
            if len(starts) == 1:
                break
            capacity *= 2
        return None if best is None else rows.layout(best)

    def forward(self, decoder: torch.nn.Module, tokens: TokenBatch) -> DecoderStates:
        """The decoder's final hidden states of `tokens`'s rows, by one forward on the layout `plan` chose."""
        layout = self.plan(tokens)
        if layout is None:
            hidden = final_hidden_states(decoder, tokens)
            return DecoderStates(hidden.flatten(0, 1), torch.arange(hidden.shape[0] * hidden.shape[1]).view(
                hidden.shape[0], hidden.shape[1]))
        return DecoderStates(packed_hidden_states(decoder, layout, tokens.input_ids.device).flatten(0, 1),
                             layout.index)


def packing_unavailable(model, mode: Packing = "auto") -> str | None:
    """Why packed rows are not exact for `model` (None: they are, or `mode` is 'off', which packs none); a ValueError
    for mode 'on' where they are not. RowPacker decides by it, and the trainer refuses packing='on' by it before it
    changes the model (a bf16 cast, LoRA layers)."""
    if mode not in MODES:
        raise ValueError(f"packing must be one of {MODES}, got {mode!r}")
    unavailable = None if mode == "off" else _windowed_by_index(model) or _probe(model, _attention_window(model))
    if mode == "on" and unavailable:
        raise ValueError(f"packing='on': {unavailable}; use packing='auto' or 'off'")
    return unavailable


def packed_hidden_states(decoder: torch.nn.Module, layout: PackedRows, device) -> torch.Tensor:
    """The decoder's last hidden states [P, W, H] of packed rows. The mask is built on the device, in the dtype the
    queries will have (the autocast dtype, else the embeddings'), which sdpa then takes as it is."""
    device = torch.device(device)
    dtype = compute_dtype(device.type, decoder.get_input_embeddings().weight.dtype)
    return decoder(input_ids=layout.input_ids.to(device, non_blocking=True),
                   position_ids=layout.position_ids.to(device, non_blocking=True),
                   attention_mask=layout.attention_mask(dtype, device), use_cache=False).last_hidden_state


def _attention_window(model) -> int | None:
    """The shortest attention window or chunk the model's configs set (sliding_window, attention_chunk_size; the
    text config's too, which a multimodal model keeps apart), or None: a 4-D mask replaces the one the model builds
    with its window, so longer rows than that must run padded."""
    config = getattr(base_causal_lm(model), "config", None)
    configs = [config, getattr(causal_lm_parts(model)[0], "config", None)]
    if hasattr(config, "get_text_config"):
        configs.append(config.get_text_config())
    sizes = [getattr(c, name, None) for c in configs for name in ("sliding_window", "attention_chunk_size")]
    sizes = [s for s in sizes if is_integer(s) and s > 0]
    return min(sizes) if sizes else None


def _windowed_by_index(model) -> str | None:
    """Why packed rows are not exact for a model whose local attention layers set their window by a token's index in
    its row, whatever the mask (GPT-Neo's 'local' layers, window_size): a packed row holds a row's tokens further
    from its shared prefix than its own row does. None for other models (the probe's short rows fit any window)."""
    config = getattr(base_causal_lm(model), "config", None)
    if "local" in (getattr(config, "attention_layers", None) or ()):
        return (f"its local attention layers window {getattr(config, 'window_size', '?')} tokens by their index in "
                "the row, not by position_ids (GPT-Neo's window_size), and packed rows move the indices")
    return None


def _probe(model, window: int | None) -> str | None:
    """Why packed rows would not give `model`'s decoder the hidden states of its padded rows, or None where they do:
    two rows that share a prefix, run both ways (eval mode, the model's dtype), must agree to a few roundings (a
    decoder that ignored the mask or the positions would give the second row other states altogether)."""
    decoder, lm_head = causal_lm_parts(model)
    config = getattr(decoder, "config", None)
    implementation = getattr(config, "_attn_implementation", None)
    if implementation not in MASKED_ATTENTION:
        return f"the attention implementation {implementation!r} takes no 4-D mask (packing needs sdpa or eager)"
    weight = lm_head.weight
    if any(p.is_meta for p in decoder.parameters()):
        return "the model's weights are not loaded in this process, so packing was not checked for it"
    # ids the input embeddings hold, as check_fused_logits probes them (an lm_head may have more rows)
    vocab = max(2, min(weight.shape[0], input_vocabulary(base_causal_lm(model)) or weight.shape[0]))
    n = 9 if window is None else max(2, min(9, window))   # within the window, which the packed mask does not set
    first = torch.linspace(1, vocab - 1, n).long()
    second = torch.cat([first[:n // 2], first.flip(0)[:n - 1 - n // 2]])   # parts from the first row halfway
    ids = torch.zeros(2, n, dtype=torch.long)
    ids[0], ids[1, :n - 1] = first, second
    mask = torch.ones(2, n, dtype=torch.long)
    mask[1, n - 1:] = 0
    tokens = TokenBatch(ids, mask, torch.zeros(2, n - 1, dtype=torch.bool)).to(weight.device)
    layout = pack_rows(ids, [n, n - 1], 2 * n)
    try:
        with torch.no_grad(), eval_mode(decoder):
            padded = final_hidden_states(decoder, tokens).float()
            packed = packed_hidden_states(decoder, layout, weight.device).float().flatten(0, 1)
    except Exception as err:   # a decoder that refuses position_ids or a 4-D mask
        return f"its decoder ({type(decoder).__name__}) does not take packed rows ({type(err).__name__}: {err})"
    expected = torch.cat([padded[0], padded[1, :n - 1]])
    got = packed[layout.index[mask.bool()].to(packed.device)]
    error = float((got - expected).norm() / expected.norm().clamp(min=1e-30))
    exact = all(p.dtype == torch.float32 for p in decoder.parameters() if p.is_floating_point())
    bound = 1e-4 if exact else 5e-2
    if not error <= bound:
        return (f"its decoder ({type(decoder).__name__}) gives packed rows other hidden states than padded ones "
                f"(relative difference {error:.3g}): it does not honour position_ids and a 4-D mask")
    return None
