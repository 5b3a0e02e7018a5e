"""The unlearning loss of SPEC §1 from one policy forward and the fused linear losses.

    L = w_fgt * L_fgt + w_rdn * L_rdn + w_nor * L_nor

One decoder forward runs over the forget, mismatch and normal rows of a batch together, on padded rows or, where
that is estimated cheaper, on the rows packed into prefix trees (packing.py: a forget row's prompt, which its
mismatch rows repeat, is computed once). Only the hidden states whose target is an answer token are gathered;
L_fgt and L_rdn come from one signed, per-sequence normalised linear_cross_entropy over the forget and mismatch
answer tokens, L_nor from linear_kl_div over the normal answer tokens against the reference. Both take the
lm_head's bias where it has one (Phi-2, GPT-J). No [tokens x vocab] logits are ever formed.

The objective is an nn.Module whose forward does all of this, so that DDP/FSDP wrappers see the lm_head
weight used inside their forward (sharding.head_weight gathers it if FSDP gave the lm_head a unit of its own).
"""
from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

import torch

from fastalign.compute_dtype import compute_dtype
from fastalign.model_vocabulary import check_embedded, input_vocabulary
from fastalign.ops.backend import Backend, check_backend
from fastalign.ops.checks import is_finite_real
from fastalign.ops.forward_gradients import check_grads_in_forward
from fastalign.ops.linear_cross_entropy import linear_cross_entropy
from fastalign.ops.linear_kl_div import linear_kl_div
from fastalign.unlearn.models import (at_positions, causal_lm_parts, check_fused_logits, logit_multiplier,
                                      logit_softcap, scaled_head_input)
from fastalign.unlearn.packing import Packing, RowPacker
from fastalign.unlearn.sharding import head_weight
from fastalign.unlearn.streams import UnlearningBatch
from fastalign.unlearn.token_weights import unlearning_token_weights


@dataclass(frozen=True)
class LossWeights:
    """w_fgt, w_rdn, w_nor of SPEC §1 (defaults 0.5, 1.0, 1.0); each must be a finite number >= 0."""

    forget: float = 0.5
    mismatch: float = 1.0
    normal: float = 1.0

    def __post_init__(self):
        for name in ("forget", "mismatch", "normal"):
            value = getattr(self, name)
            if not is_finite_real(value) or value < 0:
                raise ValueError(f"loss weight {name} must be a finite number >= 0, got {value!r}")


class LossTerms(NamedTuple):
    """The total loss (differentiable) and its three terms (detached): L_fgt <= 0 is minus the forget NLL."""

    total: torch.Tensor
    forget: torch.Tensor
    mismatch: torch.Tensor
    normal: torch.Tensor

    @property
    def forget_nll(self) -> torch.Tensor:
        """The mean per-sequence NLL of the forget answers (what early stopping watches)."""
        return -self.forget


class UnlearningObjective(torch.nn.Module):
    """forward(batch) -> LossTerms for a causal LM `model`, a reference (see reference.py) and weights.

    The reference is needed only when batches carry normal rows. backend selects the fused-op backend
    ("auto": Triton on CUDA, chunked torch elsewhere); packing how the policy's forward lays out the rows (RowPacker:
    "auto", "on" or "off"); grads_in_forward=True has the fused losses take their gradients in the forward pass
    (fastalign/ops/forward_gradients.py: one product with the lm_head fewer, for a block of whole logits rows and the
    gradients held until the backward, which may then run once; L_fgt and L_rdn are then two calls, so that each
    term keeps its own value).

    L_fgt and L_rdn are means over the batch's sequences; L_nor is the KL summed over the batch's normal
    answer tokens and divided by `normal_denominator` (default: their number, i.e. the batch's token mean).
    The trainer passes the step's average number of normal answer tokens per micro-batch (counted over every
    micro-batch of every process), so that averaging the micro-batch losses over gradient accumulation and
    processes, as accumulation and DDP/FSDP do, gives SPEC §1's mean over all the step's normal tokens.
    A batch holding a token id the model has no input embedding for is a ValueError naming its example.
    """

    def __init__(self, model: torch.nn.Module, weights: LossWeights = LossWeights(), reference=None,
                 backend: Backend = "auto", packing: Packing = "auto", grads_in_forward: bool = False):
        super().__init__()
        check_backend(backend)   # refused now, not by the op at the first step, after the decoder ran
        check_grads_in_forward("UnlearningObjective", grads_in_forward)   # a truthy string would turn it on
        if hasattr(model, "_orig_mod"):  # torch.compile(model): its forward, which the objective never calls
            warnings.warn("the objective runs the model's decoder and lm_head, not the compiled model's forward, so "
                          "torch.compile(model) compiles nothing it runs: compile the decoder instead "
                          "(model.model = torch.compile(model.model))", stacklevel=2)
        check_fused_logits(model)  # fail now, not at the first step, on a model the fused losses cannot serve
        self.model, self.weights, self.reference, self.backend = model, weights, reference, backend
        self.grads_in_forward = grads_in_forward
        # read once (they inspect the model's source); the reference shares them
        self.softcap, self.multiplier = logit_softcap(model), logit_multiplier(model)
        self.packer = RowPacker(model, packing)
        self.vocab_size = input_vocabulary(model)   # read before a wrapper (FSDP) shards the embeddings
        # whether the lm_head's weight and bias trained when the objective was built, for a forward that sees them
        # as no parameter of their own (see _as_trained)
        lm_head = causal_lm_parts(model)[1]
        self.head_trains = tuple(t is not None and t.requires_grad for t in (lm_head.weight, lm_head.bias))

    @property
    def _no_split_modules(self):
        """The wrapped model's layer classes, which FSDP's transformer auto-wrap policy shards one unit each."""
        return getattr(self.model, "_no_split_modules", None)

    def forward(self, batch: UnlearningBatch, normal_denominator: float | None = None) -> LossTerms:
        if normal_denominator is not None and not (is_finite_real(normal_denominator) and normal_denominator > 0):
            raise ValueError(f"normal_denominator must be a finite number > 0, got {normal_denominator!r}")
        self._check_embedded(batch)
        decoder, lm_head = causal_lm_parts(self.model)
        lm_weight, lm_bias = (_as_trained(t, trained) for t, trained in zip((head_weight(lm_head), lm_head.bias),
                                                                             self.head_trains))
        tokens, n_fgt, n_rdn = batch.tokens, batch.num_forget, batch.num_mismatch
        states = self.packer.forward(decoder, tokens)
        width = tokens.width
        # Under autocast (fp32 weights, bf16 compute) the fused ops take the autocast dtype like a matmul would.
        dtype = compute_dtype(states.flat.device.type, lm_weight.dtype)
        weight = lm_weight.to(dtype)
        # a model that multiplies its logits (Cohere, Granite, Falcon-H1) gets the factor on the head's inputs
        bias = scaled_head_input(lm_bias, self.multiplier, dtype)
        zero = states.flat.new_zeros((), dtype=torch.float32)

        forget = mismatch = normal = zero
        if n_fgt + n_rdn:
            answers = tokens.target_mask[:n_fgt + n_rdn, :width - 1]
            # Unit-weight terms (L_fgt, L_rdn) per token; w_fgt, w_rdn enter through the sum below, so
            # each term's value is exact even when its weight is 0.
            signed = unlearning_token_weights(answers[:n_fgt] if n_fgt else None,
                                              answers[n_fgt:] if n_rdn else None,
                                              forget_weight=1.0, mismatch_weight=1.0)
            # the answer positions, found on the host: boolean masks on the device would make it wait
            rows, columns = tokens.rows(0, n_fgt + n_rdn).answer_positions(width)
            targets = at_positions(tokens.input_ids[:n_fgt + n_rdn, 1:], rows, columns)
            token_weight = at_positions(signed.to(weight.device).view(answers.shape), rows, columns)
            head_input = scaled_head_input(states.at(rows, columns), self.multiplier, dtype)
            ce = functools.partial(linear_cross_entropy, weight=weight, bias=bias, softcap=self.softcap,
                                   backend=self.backend)
            n_forget_tokens = int((rows < n_fgt).sum())
            if self.grads_in_forward:   # a sum per term, each with its gradients
                forget, mismatch = (ce(head_input[part], target=targets[part], token_weight=token_weight[part],
                                       reduction="sum", grads_in_forward=True) if part.stop - part.start else zero
                                    for part in (slice(0, n_forget_tokens), slice(n_forget_tokens, len(targets))))
            else:
                per_token = ce(head_input, target=targets, token_weight=token_weight, reduction="none")
                forget, mismatch = per_token[:n_forget_tokens].sum(), per_token[n_forget_tokens:].sum()

        if batch.num_normal:
            if self.reference is None:
                raise ValueError("the batch has normal rows but the objective has no reference for the KL term")
            normal_tokens = tokens.rows(n_fgt + n_rdn, n_fgt + n_rdn + batch.num_normal)
            ref_hidden, ref_weight, ref_bias = self.reference(normal_tokens, batch.normal_index, lm_weight, lm_bias)
            # a head shared with the policy (adapter off, cached) is passed as the policy's tensor: read once
            ref_weight = weight if ref_weight is lm_weight else ref_weight.to(dtype)
            ref_bias = bias if ref_bias is lm_bias else scaled_head_input(ref_bias, self.multiplier, dtype)
            rows, columns = normal_tokens.answer_positions(width)
            kl_sum = linear_kl_div(scaled_head_input(states.at(rows + n_fgt + n_rdn, columns), self.multiplier, dtype),
                                   weight, scaled_head_input(ref_hidden, self.multiplier, dtype), ref_weight,
                                   bias=bias, ref_bias=ref_bias, reduction="sum", softcap=self.softcap,
                                   backend=self.backend, grads_in_forward=self.grads_in_forward)
            if normal_denominator is None:
                normal_denominator = int(normal_tokens.on_host.target_mask.sum())
            normal = kl_sum / normal_denominator if normal_denominator else kl_sum  # no token: the sum is 0

        w = self.weights
        total = w.forget * forget + w.mismatch * mismatch + w.normal * normal
        return LossTerms(total, forget.detach(), mismatch.detach(), normal.detach())

    if TYPE_CHECKING:   # Module.__call__ is Callable[..., Any]: callers see forward's types
        __call__ = forward

    def _check_embedded(self, batch: UnlearningBatch) -> None:
        """A ValueError naming the example (else the row) of `batch` that holds a token id the model has no input
        embedding for, or its padding, as the trainer's streams.check_vocabulary names it before training: the
        objective used directly failed inside the embedding with an IndexError (on CUDA, a device assert). Read on
        the batch's host copy, one min and max per batch; a batch made on the device alone is not read (the host
        would wait for the device's queued work)."""
        host = batch.tokens.on_host
        ids = host.input_ids
        if self.vocab_size is None or ids.device.type != "cpu" or not ids.numel():
            return
        low, high = torch.aminmax(ids)
        if int(low) >= 0 and int(high) < self.vocab_size:
            return
        named = len(batch.examples) == len(ids)
        for i, (row, mask) in enumerate(zip(ids.tolist(), host.attention_mask.tolist())):
            check_embedded([t for t, m in zip(row, mask) if m], self.vocab_size,
                           batch.examples[i].source if named else f"row {i} of the batch")
        check_embedded(ids[host.attention_mask == 0].tolist(), self.vocab_size, "the batch's padding")


def _as_trained(t: torch.Tensor | None, trained_when_built: bool) -> torch.Tensor | None:
    """The lm_head's weight or bias `t` as the loss takes it: detached where it does not train. A parameter says so
    itself; a plain tensor is FSDP version 1's view (use_orig_params) of the unit's flat parameter, which requires
    grad where the unit's other weights train, so what the head's parameter said when the objective was built
    decides (the cached reference refused a frozen head there as trained, and its gradient was computed)."""
    if t is None:
        return None
    trains = t.requires_grad if isinstance(t, torch.nn.Parameter) else trained_when_built
    return t if trains else t.detach()
