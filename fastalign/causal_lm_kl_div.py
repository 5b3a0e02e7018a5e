"""KL(P || Q) per token between a frozen reference causal LM (P) and a trained one (Q), from the fused linear KL.

`CausalLMKLDiv(model, reference)(input_ids=..., attention_mask=..., labels=...)` is the mean over the labelled
positions of sum_v P log(P / Q), P and Q the two models' next-token distributions, without either model's
[tokens x vocab] logits: both decoders' final hidden states go into linear_kl_div with both lm_heads (of the same
vocabulary; the reference may be of another width: a larger teacher). It serves distillation from a teacher, and the
KL to the model as it was that keeps a fine-tuned or unlearned model close to it (a frozen copy, or, for a PEFT
model, the model itself with its adapter off: reference="adapter").
"""
from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Literal

import torch

from fastalign.base_model import base_causal_lm
from fastalign.causal_lm_loss import (check_loss_reduction, final_hidden_states, hidden_and_targets, per_item,
                                      refuse_a_wrong_call, refuse_loss_keywords, refuse_tokens_before_the_text,
                                      text_tokens)
from fastalign.compute_dtype import compute_dtype
from fastalign.eval_mode import eval_mode
from fastalign.ops.backend import Backend, check_backend
from fastalign.ops.checks import Reduction, is_finite_real
from fastalign.ops.forward_gradients import check_grads_in_forward
from fastalign.ops.linear_kl_div import linear_kl_div
from fastalign.peft_adapters import AdapterOff
from fastalign.prepared_autocast import PreparedAutocast
from fastalign.unlearn.models import (causal_lm_parts, check_fused_logits, logit_multiplier, logit_setting_places,
                                      logit_softcap, scaled_head_input)
from fastalign.unlearn.sharding import head_weight


def _check_same_vocabulary(lm_head: torch.nn.Module, ref_head: torch.nn.Module) -> None:
    """ValueError naming both vocabulary sizes unless `lm_head` (the model's) and `ref_head` (the reference's) have as
    many rows."""
    vocab, ref_vocab = lm_head.weight.shape[0], ref_head.weight.shape[0]
    if vocab != ref_vocab:
        raise ValueError(f"reference must have the vocabulary of model ({vocab} words), got {ref_vocab}")


def _check_embeddings_shared(model: torch.nn.Module, reference: torch.nn.Module, inputs: dict) -> None:
    """ValueError naming inputs_embeds unless `reference`'s input embeddings are `model`'s (the same weight tensor):
    the reference gets the model's embeddings as they are, which are not its own (a teacher's, or a frozen copy's
    once the model's trained) whatever their width (one of another width failed deep in its first norm)."""
    if not isinstance(inputs.get("inputs_embeds"), torch.Tensor):
        return
    if base_causal_lm(reference).get_input_embeddings().weight is not \
            base_causal_lm(model).get_input_embeddings().weight:
        raise ValueError("inputs_embeds go to the reference too, whose input embeddings are not the model's (the "
                         "same weight tensor): pass input_ids, which each model embeds with its own embeddings")


class CausalLMKLDiv(torch.nn.Module):
    """forward(labels=None, *, shift_labels=None, num_items_in_batch=None, ignore_index=-100, reduction="mean",
    **inputs) -> the KL of `model`'s next-token distributions from `reference`'s, at the positions that have a label.

    reference: a frozen causal LM over the same vocabulary (a teacher, or a copy of the model as it was), frozen here
    (requires_grad_(False)) and run in eval mode without gradients; or "adapter", for a PEFT `model`: the model with
    its adapter disabled. inputs go to both decoders (input_ids or inputs_embeds, attention_mask, ...; inputs_embeds
    only with a reference whose input embeddings are the model's: else pass input_ids); labels and shift_labels say
    which positions count, as for CausalLMLoss (the label values themselves are not read: a position counts where its
    label is not ignore_index). The loss is the mean over the counted positions (0 where none counts), or with
    num_items_in_batch their sum divided by it; reduction="sum" their sum, and "none" the per-token KLs of the
    positions that predict ([B, T - 1] against labels, [B, T] against shift_labels; 0 at the positions not counted),
    as CausalLMLoss's. A loss's keyword the call does not take (temperature, token_weight, mask, ...) is refused by
    name: among the inputs the decoders' **kwargs dropped it. temperature T compares softmax(z / T) of both models'
    logits (standard distillation then multiplies the loss by T^2), soft-capped logits too. Both models are checked
    once, here, to compute their logits the way the fused op does. A model that accelerate's prepare wrapped in mixed
    precision is run, with the reference, under the autocast its forward would be run under, as CausalLMLoss is.
    of_hidden_states takes the model's final hidden
    states and their targets, as CausalLMLoss.of_hidden_states does: one decoder run gives the cross-entropy and the
    KL.
    With "adapter" it is not for concurrent calls from threads: the adapter is turned off in the whole model
    (peft_adapters.AdapterOff), so that another thread's call meanwhile computes the model without it too (or the
    reference with it).
    """

    def __init__(self, model: torch.nn.Module, reference: torch.nn.Module | Literal["adapter"], *,
                 temperature: float = 1.0, backend: Backend = "auto", grads_in_forward: bool = False):
        super().__init__()
        check_backend(backend)
        check_grads_in_forward("CausalLMKLDiv", grads_in_forward)
        check_fused_logits(model)
        if isinstance(reference, str):
            if reference != "adapter" or not hasattr(model, "disable_adapter"):
                raise ValueError("reference must be a causal LM, or 'adapter' for a PEFT model (its adapter "
                                 f"disabled), got {reference!r} for a {type(model).__name__}")
        elif isinstance(reference, torch.nn.Module):
            trained = {id(p) for p in model.parameters() if p.requires_grad}
            if any(id(p) in trained for p in reference.parameters()):   # freezing it would freeze the model
                raise ValueError("reference shares trainable parameters with model (the model itself, or a PEFT "
                                 "model's get_base_model(), which holds its adapter): pass a frozen copy, or "
                                 "'adapter' for the model with its adapter off")
            check_fused_logits(reference, whose="reference")
            _check_same_vocabulary(causal_lm_parts(model)[1], causal_lm_parts(reference)[1])
        else:
            raise TypeError(f"reference must be a causal LM or 'adapter', got {type(reference).__name__}")
        if not (is_finite_real(temperature) and temperature > 0):
            raise ValueError(f"temperature must be a positive finite number, got {temperature!r}")
        self.model, self.reference, self.temperature = model, reference, temperature
        self._adapter_off = AdapterOff(model) if reference == "adapter" else contextlib.nullcontext
        self.backend, self.grads_in_forward = backend, grads_in_forward
        # found in the forwards' sources: once, not traced per call
        self.logit_places = [logit_setting_places(m) for m in (model, self._reference_model())]
        self._head_factors()   # refused now, not at the first call
        self.prepared_autocast = PreparedAutocast(model)
        if isinstance(reference, torch.nn.Module):   # (after every check: a refused reference is left as it was)
            reference.requires_grad_(False)

    def _reference_model(self) -> torch.nn.Module:
        return self.model if self.reference == "adapter" else self.reference

    def _head_factors(self) -> tuple[float | None, float, float]:
        """(soft cap, model's factor, reference's factor) on the heads' inputs, read now, where the models' forwards
        read them (their configs, or attributes): z / T and a logit multiplier s are both factors on the head's
        inputs, s (h W^T + b) / T; a soft cap c takes the temperature as the cap c / T of those inputs' logits,
        c tanh(z / c) / T = (c / T) tanh((z / T) / (c / T))."""
        models = (self.model, self._reference_model())
        softcap, reference_softcap = (logit_softcap(m, places) for m, places in zip(models, self.logit_places))
        if reference_softcap != softcap:
            raise NotImplementedError(f"model and reference cap their logits differently ({softcap} and "
                                      f"{reference_softcap}): the fused KL caps both heads alike")
        multiplier, reference_multiplier = ((logit_multiplier(m, places) or 1.0) / self.temperature
                                            for m, places in zip(models, self.logit_places))
        return None if softcap is None else softcap / self.temperature, multiplier, reference_multiplier

    def _check_call(self, inputs: dict, method: str, reduction: Reduction,
                    num_items_in_batch: torch.Tensor | int | float | None) -> None:
        """ValueError for a loss's keyword among the inputs, which the decoders would drop, or a bad reduction."""
        refuse_loss_keywords(inputs, f"CausalLMKLDiv.{method}", "CausalLMKLDiv(model, reference, ...)",
                             ("temperature", "backend", "grads_in_forward"),
                             token_weight="multiply the per-token KLs of reduction='none' by it")
        check_loss_reduction(reduction, num_items_in_batch, self.grads_in_forward, "CausalLMKLDiv")

    def forward(self, labels: torch.Tensor | None = None, *positional, shift_labels: torch.Tensor | None = None,
                num_items_in_batch: torch.Tensor | int | float | None = None, ignore_index: int = -100,
                reduction: Reduction = "mean", **inputs) -> torch.Tensor:
        refuse_a_wrong_call(labels, positional, "CausalLMKLDiv", "the model and the reference",
                            "return kl(**inputs) from a Trainer subclass's compute_loss")
        self._check_call(inputs, "forward", reduction, num_items_in_batch)   # (before the decoder runs)
        # both decoders and heads run as the model's forward runs: in the autocast accelerate's prepare wrapped it in
        with self.prepared_autocast():
            hidden, target = hidden_and_targets(self.model, labels, shift_labels, inputs)
            return self._of_hidden_states(hidden, target, num_items_in_batch, ignore_index, reduction, inputs)

    if TYPE_CHECKING:   # Module.__call__ is Callable[..., Any]: callers see forward's types
        __call__ = forward

    def of_hidden_states(self, hidden: torch.Tensor, target: torch.Tensor,
                         num_items_in_batch: torch.Tensor | int | float | None = None, ignore_index: int = -100, *,
                         reduction: Reduction = "mean", **inputs) -> torch.Tensor:
        """The KL as forward gives it, from the model's final hidden states [B, T', H] of `inputs` and their targets
        [B, T'] (already shifted), as CausalLMLoss.of_hidden_states takes them: the decoder's run that gives them can
        give the cross-entropy too. hidden are the first T' positions of the decoder's outputs (all but the last
        against labels[:, 1:], all against shift_labels); the reference runs on `inputs`, its hidden states taken at
        the same positions. reduction as forward's: "none" gives the KLs of target's shape."""
        self._check_call(inputs, "of_hidden_states", reduction, num_items_in_batch)
        return self._of_hidden_states(hidden, target, num_items_in_batch, ignore_index, reduction, inputs)

    def _of_hidden_states(self, hidden: torch.Tensor, target: torch.Tensor,
                          num_items_in_batch: torch.Tensor | int | float | None, ignore_index: int,
                          reduction: Reduction, inputs: dict) -> torch.Tensor:
        """of_hidden_states after its call checks (_check_call), which forward makes before the decoder runs."""
        softcap, multiplier, reference_multiplier = self._head_factors()
        reference_model = self._reference_model()
        lm_head, ref_head = causal_lm_parts(self.model)[1], causal_lm_parts(reference_model)[1]
        if self.reference != "adapter":   # (a model resized since: resize_token_embeddings)
            _check_same_vocabulary(lm_head, ref_head)
            _check_embeddings_shared(self.model, reference_model, inputs)
        if not isinstance(target, torch.Tensor) or hidden.dim() != 3 or target.shape != hidden.shape[:-1]:
            found = tuple(target.shape) if isinstance(target, torch.Tensor) else type(target).__name__
            raise ValueError(f"hidden must be [B, T', H] and target a tensor of its [B, T'], got hidden "
                             f"{tuple(hidden.shape)} and target {found}")
        # (the reference's head weight too is read with its adapter off: PEFT's modules_to_save copy switches)
        with torch.no_grad(), eval_mode(base_causal_lm(reference_model)), self._adapter_off():
            ref_hidden = final_hidden_states(reference_model, inputs)
            ref_weight, ref_bias = head_weight(ref_head, "reference"), ref_head.bias
        text = text_tokens(inputs)
        if isinstance(text, torch.Tensor):
            refuse_tokens_before_the_text(reference_model, ref_hidden, text.shape[1],
                                          f"the inputs' {text.shape[1]} tokens", whose="reference ")
        if ref_hidden.shape[1] - target.shape[1] not in (0, 1):
            raise ValueError(f"hidden must be the model's final hidden states at the first positions of the inputs "
                             f"(all but the last against labels[:, 1:]): the reference's are {ref_hidden.shape[1]} "
                             f"positions, hidden's {target.shape[1]}")
        ref_hidden = ref_hidden[:, :target.shape[1]]
        lm_weight = head_weight(lm_head)
        # each head computes in its own dtype (a teacher in another than the student's is neither rounded to it nor
        # copied), under autocast in the autocast dtype, as the lm_heads' matmuls would; a head shared by both
        # models (an adapter off) is passed as one tensor, read once
        dtype = compute_dtype(hidden.device.type, lm_weight.dtype)
        ref_dtype = compute_dtype(ref_hidden.device.type, ref_weight.dtype)
        weight, bias = lm_weight.to(dtype), scaled_head_input(lm_head.bias, multiplier, dtype)
        shared = ref_weight is lm_weight and reference_multiplier == multiplier
        kl = linear_kl_div(scaled_head_input(hidden, multiplier, dtype), weight,
                           scaled_head_input(ref_hidden, reference_multiplier, ref_dtype),
                           weight if shared else ref_weight.to(ref_dtype), bias=bias,
                           ref_bias=bias if shared and ref_bias is lm_head.bias else
                           scaled_head_input(ref_bias, reference_multiplier, ref_dtype),
                           mask=target != ignore_index, reduction=reduction if num_items_in_batch is None else "sum",
                           softcap=softcap, backend=self.backend, grads_in_forward=self.grads_in_forward)
        return per_item(kl, num_items_in_batch)
