"""Compute accounting of an unlearning run: tokens, estimated FLOPs and device-seconds.

FLOPs are the usual dense-transformer estimate, counted on the [rows x width] grid the model really computes: the
padded rows (padding included, since it costs the same), or the packed ones where the objective packed the batch
(packing.py; their attention over the dense mask counted full-square too):
  forward of the decoder  = 2 * P_dec * slots + 4 * layers * d_attn * sum_rows(width^2)   (full-square attention;
                            d_attn = query heads x head size)
  backward                = 2x forward when every weight of P_dec trains, 1x (input gradients only) otherwise
  gradient checkpointing  = one more forward
  lm_head (fused losses)  = per answer token (H: the lm_head's input width): 2*V*H forward, 2*V*H again in
                            the backward (the fused ops recompute the logits instead of storing them), +2*V*H
                            for the hidden gradient,
                            +2*V*H for the weight gradient when the lm_head trains; the KL term adds the
                            reference logits P per normal answer token, computed in the forward and again in
                            the backward (2 x 2*V*H); with grads_in_forward the gradients are taken from the
                            forward's logits, so neither is computed again (2*V*H less of each)
  reference               = one decoder forward over the normal rows (frozen copy / disabled adapter), 0 cached;
                            the cached reference costs one decoder forward over the whole normal set before
                            training instead (cache_compute), on every process
P_dec counts the decoder's matmul weights (embeddings excluded) that a token runs through: of a mixture-of-experts
layer, its router and shared experts whole and num_experts_per_tok of its routed experts. These are estimates for
comparing runs and methods (e.g. against the compute of RLHF), not measurements.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from fastalign.unlearn.models import causal_lm_parts


@dataclass(frozen=True)
class ModelShape:
    """What the FLOP estimate needs to know about a causal LM."""

    decoder_params: int
    num_layers: int
    hidden_size: int          # the lm_head's input width
    vocab_size: int
    attention_width: int      # query heads x head size, the width of the attention scores' products

    @classmethod
    def of(cls, model) -> "ModelShape":
        """Read off the model; the attention width from its config (an OPT-350m-style head projects the decoder's
        width down first, so the lm_head's width is not the decoder's), else the lm_head's width."""
        decoder, lm_head = causal_lm_parts(model)
        config = getattr(decoder, "config", None)
        params = active_matmul_params(model, config)
        heads, head_dims = getattr(config, "num_attention_heads", None), _head_dims(config)
        width = (heads * sum(head_dims) / len(head_dims) if heads and head_dims and all(head_dims)
                 else getattr(config, "hidden_size", lm_head.weight.shape[1]))
        return cls(params, int(getattr(config, "num_hidden_layers", 0)), lm_head.weight.shape[1],
                   lm_head.weight.shape[0], round(width))

    def decoder_forward(self, attention_mask: torch.Tensor) -> float:
        """Forward FLOPs over a padded batch [rows, width] (width trimmed to the longest row)."""
        rows, width = attention_mask.shape[0], int(attention_mask.sum(1).max()) if attention_mask.numel() else 0
        return self.grid_forward(rows, width)

    def grid_forward(self, rows: int, width: int) -> float:
        """Forward FLOPs over `rows` rows of `width` positions, attention full-square."""
        attention = 4.0 * self.num_layers * self.attention_width * rows * width ** 2
        return 2.0 * self.decoder_params * rows * width + attention


def _head_dims(config) -> list:
    """The config's head size, or each layer's where layers have their own (Gemma 4's wider full-attention layers:
    transformers then refuses the model-wide attribute with a RuntimeError, AmbiguousGlobalPerLayerAttributeError)."""
    try:
        return [getattr(config, "head_dim", None)]
    except RuntimeError:
        return [getattr(layer, "head_dim", None) for layer in getattr(config, "per_layer_config", None) or [None]]


def active_matmul_params(model, config) -> int:
    """How many of the decoder's matmul weights each token runs through. A module named `experts` (the routed experts
    of Mixtral, Qwen-MoE, OLMoE, DeepSeek, GPT-OSS: a list of expert MLPs, or tensors stacked over the experts) runs
    config.num_experts_per_tok of its experts on each token: its weights count at that share, not whole (which
    made a Mixtral-shaped run's FLOPs 3.3x what it computed)."""
    top_k = getattr(config, "num_experts_per_tok", None)
    decoder, _ = causal_lm_parts(model)
    share = {}   # id of a routed expert's weight -> the share of the tokens that run through it
    for name, module in decoder.named_modules():
        if not top_k or name.rsplit(".", 1)[-1] != "experts":
            continue
        if isinstance(module, torch.nn.ModuleList):
            num_experts = len(module)
        else:
            num_experts = next((p.shape[0] for p in module.parameters(recurse=False) if p.dim() == 3), 0)
        if num_experts:
            share |= dict.fromkeys((id(p) for p in module.parameters()), min(top_k, num_experts) / num_experts)
    return round(sum(p.numel() * share.get(id(p), 1.0) for p in decoder_matmul_weights(model)))


def decoder_matmul_weights(model) -> list[torch.nn.Parameter]:
    """The decoder's matmul weights, the P_dec of the estimate (lookup tables left out: the input embeddings, and
    any other embedding such as GPT-2's learned positions or Gemma 4's per-layer inputs; vectors such as norms too).
    Whether all of them train decides the backward's cost; the input embeddings do not, so a tied lm_head frozen
    with them (reference='cached') still costs a full backward."""
    decoder, _ = causal_lm_parts(model)
    embedding = decoder.get_input_embeddings() if hasattr(decoder, "get_input_embeddings") else None
    lookups = [m for m in decoder.modules() if isinstance(m, torch.nn.Embedding)]
    skip = {id(p) for lookup in lookups + ([embedding] if embedding is not None else []) for p in lookup.parameters()}
    return [p for p in decoder.parameters() if id(p) not in skip and p.dim() >= 2]


@dataclass
class ComputeTotals:
    """Running totals of a run (summed over processes): tokens, padded slots (the positions the policy's forwards
    computed: its padded rows, or its packed rows where a batch was packed), answer tokens, FLOPs, time."""

    tokens: int = 0
    padded_slots: int = 0
    answer_tokens: int = 0
    reference_tokens: int = 0
    flops: float = 0.0
    device_seconds: float = 0.0

    def add(self, other: "ComputeTotals") -> None:
        for f in dataclasses.fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def batch_compute(shape: ModelShape, batch, *, decoder_trains: bool, lm_head_trains: bool, checkpointing: bool,
                  reference_forward: bool, packed_shape: tuple[int, int] | None = None,
                  grads_in_forward: bool = False) -> ComputeTotals:
    """Estimated compute of one objective forward + backward over an UnlearningBatch (counted on its host copy), whose
    policy forward ran on its padded rows, or on packed rows of `packed_shape` [rows, width]; grads_in_forward: the
    fused losses took their gradients in the forward (no logits computed again in the backward)."""
    tokens = batch.tokens.on_host
    forward = (shape.decoder_forward(tokens.attention_mask) if packed_shape is None
               else shape.grid_forward(*packed_shape))
    policy = forward * (1 + (2 if decoder_trains else 1) + (1 if checkpointing else 0))
    answers = int(tokens.target_mask.sum())
    normal_rows = tokens.rows(batch.num_forget + batch.num_mismatch, tokens.input_ids.shape[0])
    normal_answers = int(normal_rows.target_mask.sum())
    recomputed = 0 if grads_in_forward else 1   # the backward's second product of the logits
    per_answer = 2 + recomputed + (1 if lm_head_trains else 0)   # logits, hidden gradient (+ weight gradient)
    head = 2.0 * shape.vocab_size * shape.hidden_size * (per_answer * answers + (1 + recomputed) * normal_answers)
    reference = shape.decoder_forward(normal_rows.attention_mask) if reference_forward and batch.num_normal else 0.0
    slots = int(tokens.attention_mask.numel()) if packed_shape is None else packed_shape[0] * packed_shape[1]
    return ComputeTotals(tokens=tokens.num_tokens, padded_slots=slots,
                         answer_tokens=answers,
                         reference_tokens=normal_rows.num_tokens if reference_forward else 0,
                         flops=policy + head + reference)


def cache_compute(shape: ModelShape, forward_masks, *, seconds: float, num_processes: int) -> ComputeTotals:
    """Estimated compute of building a CachedReference (its decoder forwards over the normal set, given by their
    attention masks), done in full by each of num_processes processes in `seconds` of wall time."""
    tokens = sum(int(mask.sum()) for mask in forward_masks)
    flops = sum(shape.decoder_forward(mask) for mask in forward_masks)
    return ComputeTotals(reference_tokens=tokens * num_processes, flops=flops * num_processes,
                         device_seconds=seconds * num_processes)
