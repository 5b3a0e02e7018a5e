"""The language-modelling loss of a Hugging Face causal LM on its labels, from the fused linear cross-entropy.

`CausalLMLoss(model)(input_ids=..., attention_mask=..., labels=...)` is `model(..., labels=labels).loss` (the
loss transformers' ForCausalLMLoss computes: targets shifted by one, -100 ignored, a token mean, or a sum over
num_items_in_batch) without the [tokens x vocab] logits: the decoder's final hidden states go straight into
linear_cross_entropy with the lm_head's weight and bias, the model's logit multiplier and soft cap applied as its
forward applies them. It is a module, so that DDP or FSDP can wrap it as they wrap the model (the lm_head weight is
then read inside the wrapped forward).
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import torch
from transformers.loss.loss_utils import ForCausalLMLoss
from transformers.utils import ModelOutput

from fastalign.base_model import base_causal_lm
from fastalign.compute_dtype import compute_dtype
from fastalign.ops.backend import Backend, check_backend
from fastalign.ops.checks import Reduction, check_label_smoothing, check_reduction
from fastalign.ops.forward_gradients import check_grads_in_forward
from fastalign.ops.linear_cross_entropy import linear_cross_entropy
from fastalign.prepared_autocast import PreparedAutocast
from fastalign.unlearn.models import (SOFTCAPS, causal_lm_parts, check_fused_logits, check_no_router_loss,
                                      forward_reads, head_input_module, logit_multiplier, logit_setting_places,
                                      logit_softcap, scaled_head_input)
from fastalign.unlearn.sharding import head_weight


class CausalLMLoss(torch.nn.Module):
    """forward(labels=None, *, shift_labels=None, num_items_in_batch=None, ignore_index=-100, reduction="mean",
    **inputs) -> the loss of `model` (a transformers causal LM, or a PEFT model over one) as its forward with those
    labels gives it.

    inputs go to the model's decoder as they would to the model (input_ids or inputs_embeds, attention_mask,
    position_ids, ...). labels [B, T] are aligned with the inputs: position t predicts labels[:, t + 1] and the last
    position predicts nothing; shift_labels [B, T] are targets already shifted (position t predicts
    shift_labels[:, t]), as sequence-parallel and packed-sequence trainers pass them; given both, shift_labels are the
    targets, as in the model's forward. The loss is the mean over the tokens whose target is not ignore_index (0, not
    NaN, where there are none), or with num_items_in_batch (a number or a tensor, what a Hugging Face Trainer passes
    under gradient accumulation) their sum divided by it; reduction="sum" their sum, and "none" the per-token losses
    of the positions that predict ([B, T - 1] against labels, [B, T] against shift_labels; see of_hidden_states,
    which takes a token_weight too).

    The model is checked once, here, to compute its logits the way the fused op does (check_fused_logits): a model that
    transforms its hidden states or logits in a way fastalign does not reproduce raises NotImplementedError instead of
    training another loss; so does a model whose forward's loss is not transformers' causal LM loss (BartForCausalLM's,
    on labels it does not shift: check_loss_is_causal_lm_cross_entropy), and a mixture of experts whose config adds the
    router's auxiliary loss to its loss (output_router_logits; checked at every call too), which this loss leaves
    out. A model that accelerate's prepare wrapped in mixed precision (a Trainer's bf16=True) is run under the autocast
    its forward would be run under (where none is on already): a loss in a Trainer's compute_loss computes as the
    model does. A vision-language model's inputs (pixel_values, ...) reach its multimodal model, whose hidden states its
    lm_head reads; one that puts other tokens before the text (GIT its images) is refused at the call
    (predicting_positions). backend, grads_in_forward and label_smoothing are linear_cross_entropy's, checked here:
    with label_smoothing eps > 0 the loss is torch's cross_entropy(label_smoothing=eps) of the model's logits (what
    a Trainer's label_smoothing_factor asks for, which it computes from the logits), no longer the model's own loss.
    """

    def __init__(self, model: torch.nn.Module, *, backend: Backend = "auto", grads_in_forward: bool = False,
                 label_smoothing: float = 0.0):
        super().__init__()
        check_backend(backend)
        check_grads_in_forward("CausalLMLoss", grads_in_forward)
        check_label_smoothing(label_smoothing)
        check_fused_logits(model)
        check_loss_is_causal_lm_cross_entropy(model, "CausalLMLoss")
        self.model, self.backend, self.grads_in_forward = model, backend, grads_in_forward
        self.label_smoothing = label_smoothing
        self.logit_places = logit_setting_places(model)   # found in the forward's source: once, not traced per call
        self.prepared_autocast = PreparedAutocast(model)

    def forward(self, labels: torch.Tensor | None = None, *positional, shift_labels: torch.Tensor | None = None,
                num_items_in_batch: torch.Tensor | int | float | None = None, ignore_index: int = -100,
                reduction: Reduction = "mean", **inputs) -> torch.Tensor:
        refuse_a_wrong_call(labels, positional, "CausalLMLoss", "the model",
                            "fuse_causal_lm_loss(model) makes the model's forward take this loss under a plain "
                            "Trainer (or return loss_fn(**inputs) from a Trainer subclass's compute_loss)")
        refuse_loss_keywords(inputs, "CausalLMLoss.forward", "CausalLMLoss(model, ...)",
                             ("backend", "grads_in_forward", "label_smoothing"),
                             token_weight="pass it to of_hidden_states, or multiply the per-token losses of "
                                          "forward(..., reduction='none') by it")
        if inputs.get("output_router_logits"):
            raise NotImplementedError("output_router_logits=True asks for the router's auxiliary loss, which "
                                      "CausalLMLoss leaves out; add it yourself from the model's router logits")
        check_no_router_loss(self.model, "CausalLMLoss")   # (set on the config since)
        check_loss_reduction(reduction, num_items_in_batch, self.grads_in_forward, "CausalLMLoss")   # (before the run)
        # the decoder and head run as the model's forward runs: in the autocast accelerate's prepare wrapped it in
        with self.prepared_autocast():
            hidden, target = hidden_and_targets(self.model, labels, shift_labels, inputs)
            return self._of_hidden_states(hidden, target, num_items_in_batch, ignore_index, None, reduction)

    if TYPE_CHECKING:   # Module.__call__ is Callable[..., Any]: callers see forward's types
        __call__ = forward

    def of_hidden_states(self, hidden: torch.Tensor, target: torch.Tensor,
                         num_items_in_batch: torch.Tensor | int | float | None = None, ignore_index: int = -100, *,
                         token_weight: torch.Tensor | None = None, reduction: Reduction = "mean") -> torch.Tensor:
        """The loss of the decoder's final hidden states [..., H] against their targets [...] (already shifted), from
        the model's own logits (its multiplier and soft cap applied), weighted by token_weight [...] (float, of any
        sign, a constant; default 1) as linear_cross_entropy weighs it. reduction "mean" (the default) is the
        weighted sum over the number of targets not ignore_index, "sum" the weighted sum (with num_items_in_batch,
        either is the weighted sum divided by it), and "none" the per-token weighted losses of target's shape, 0 at
        ignored targets: -loss.sum(-1) over a row's answer tokens is the sequence's log-probability (DPO, SimPO)."""
        check_loss_reduction(reduction, num_items_in_batch, self.grads_in_forward, "CausalLMLoss")
        return self._of_hidden_states(hidden, target, num_items_in_batch, ignore_index, token_weight, reduction)

    def _of_hidden_states(self, hidden: torch.Tensor, target: torch.Tensor,
                          num_items_in_batch: torch.Tensor | int | float | None, ignore_index: int,
                          token_weight: torch.Tensor | None, reduction: Reduction) -> torch.Tensor:
        """of_hidden_states after its checks, which forward makes before the decoder runs."""
        _, lm_head = causal_lm_parts(self.model)
        lm_weight = head_weight(lm_head)
        # under autocast the op takes the autocast dtype, as the lm_head's matmul would
        dtype = compute_dtype(hidden.device.type, lm_weight.dtype)
        # a model that multiplies its logits (Cohere, Granite, Falcon-H1) gets the factor on the head's inputs; the
        # factor and the soft cap are read now, where the model's forward reads them (its config, or an attribute)
        multiplier = logit_multiplier(self.model, self.logit_places)
        head_input = scaled_head_input(hidden, multiplier, dtype)
        bias = scaled_head_input(lm_head.bias, multiplier, dtype)
        loss = linear_cross_entropy(head_input, lm_weight.to(dtype), target, token_weight=token_weight, bias=bias,
                                    ignore_index=ignore_index,
                                    reduction=reduction if num_items_in_batch is None else "sum",
                                    softcap=logit_softcap(self.model, self.logit_places),
                                    label_smoothing=self.label_smoothing, backend=self.backend,
                                    grads_in_forward=self.grads_in_forward)
        return per_item(loss, num_items_in_batch)


def check_loss_reduction(reduction: Reduction, num_items_in_batch: torch.Tensor | int | float | None,
                         grads_in_forward: bool, computed_by: str) -> None:
    """ValueError for a reduction not of the fused ops', "none" with num_items_in_batch, which divides a summed loss,
    or "none" where `computed_by`'s grads_in_forward takes a gradient (grad mode on), which only a scalar loss has."""
    check_reduction(reduction)
    if reduction == "none" and grads_in_forward and torch.is_grad_enabled():
        raise ValueError(f"{computed_by}(grads_in_forward=True) takes the gradient of a scalar loss in the forward: "
                         "reduction='none' (the per-token losses) needs grads_in_forward=False, or torch.no_grad() "
                         "where no gradient is taken")
    if reduction == "none" and num_items_in_batch is not None:
        raise ValueError("num_items_in_batch divides a summed loss: it cannot go with reduction='none' (the per-token "
                         "losses); pass one or the other")


def refuse_a_wrong_call(labels, positional: tuple, loss: str, runs: str, instead: str) -> None:
    """TypeError, before the decoder runs, for a call of `loss`'s forward given more than the labels positionally
    or a model's outputs, as a Trainer calls its compute_loss_func (outputs, labels, num_items_in_batch=...): it
    `runs` the decoders itself on the batch, and `instead` says what serves; or given a batch (a dict) as labels."""
    if positional or isinstance(labels, ModelOutput):
        raise TypeError(f"{loss} is no compute_loss_func: it runs {runs} itself on the batch, without the [tokens x "
                        "vocab] logits, where a Trainer's compute_loss_func gets the model's outputs, logits made "
                        f"already: {instead}")
    if isinstance(labels, Mapping):
        raise TypeError(f"{loss} got a batch (a dict) as its labels: pass the batch as keywords: loss_fn(**batch)")


# what to do instead of passing a loss's keyword among a call's decoder inputs, whose **kwargs drop it
_LOSS_KEYWORDS = {
    "mask": "a position counts where its label is not ignore_index (set the others' labels to it)",
    "softcap": f"the model's own logit soft cap (its config's {' or '.join(SOFTCAPS)}) is applied",
    "temperature": "the loss is the model's own, at temperature 1",
}


def refuse_loss_keywords(inputs: dict, called: str, constructor: str, made_with: tuple[str, ...], *,
                         token_weight: str) -> None:
    """ValueError naming a loss's keyword (token_weight, mask, softcap, temperature, or one of `made_with`) among the
    decoder inputs of a call of `called`: it went on to the decoder, whose **kwargs dropped it, and the loss was
    silently computed without it. The message says where it belongs: `constructor` for those in `made_with` (set when
    the loss is made), the `token_weight` advice for a token weight."""
    for name in inputs:
        if name in made_with:
            where = f"it is set when the loss is made, {constructor}'s {name}="
        elif name == "token_weight":
            where = token_weight
        elif name in _LOSS_KEYWORDS:
            where = _LOSS_KEYWORDS[name]
        else:
            continue
        raise ValueError(f"{called} takes no {name}: {where} (among the inputs it went on to the decoder, which "
                         "ignored it)")


def check_loss_is_causal_lm_cross_entropy(model: torch.nn.Module, computed_by: str) -> None:
    """NotImplementedError for a model whose forward's loss is more or other than transformers' causal LM
    cross-entropy of its logits, the loss `computed_by` computes: a loss of its own (BartForCausalLM and the other
    seq2seq decoders' take it on labels they do not shift), a loss function of its own, or a router's auxiliary loss
    that its config adds."""
    base = base_causal_lm(model)
    loss_function = getattr(base, "loss_function", None)
    if not forward_reads(base, "loss_function"):
        raise NotImplementedError(f"{type(base).__name__}: its forward computes its loss itself, not through "
                                  f"transformers' ForCausalLMLoss, which {computed_by} computes")
    if loss_function is not ForCausalLMLoss:
        raise NotImplementedError(f"{type(base).__name__}: its forward's loss is not transformers' ForCausalLMLoss "
                                  f"(it has {getattr(loss_function, '__name__', loss_function)!r}), which "
                                  f"{computed_by} computes")
    check_no_router_loss(base, computed_by)


def hidden_and_targets(model: torch.nn.Module, labels: torch.Tensor | None, shift_labels: torch.Tensor | None,
                       inputs: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """predicting_positions of the final_hidden_states of `inputs`, the labels checked before the decoder runs."""
    check_targets(labels, shift_labels, inputs)
    return predicting_positions(final_hidden_states(model, inputs), labels, shift_labels, model, inputs)


def final_hidden_states(model: torch.nn.Module, inputs: dict) -> torch.Tensor:
    """The final hidden states [B, T, H] of `inputs` (run without a KV cache, its outputs as a dict whatever
    return_dict the inputs carry) from the module of `model` that the lm_head reads (unlearn.models.head_input_module).
    Without a cache transformers' masks split a row packed by position_ids that restart (no attention_mask) into its
    sequences, where the model's default cache would not."""
    return head_input_module(model)(**{**inputs, "use_cache": False, "return_dict": True}).last_hidden_state


def check_targets(labels: torch.Tensor | None, shift_labels: torch.Tensor | None, inputs: dict) -> tuple:
    """ValueError unless labels or shift_labels is given, and the one read (shift_labels where given) is an integer
    tensor of the shape of the inputs' tokens (input_ids', or inputs_embeds' first two dimensions: [B, T], where the
    inputs give neither) (the one read, its name)."""
    if labels is None and shift_labels is None:
        raise ValueError("labels (aligned with the inputs) or shift_labels (already shifted) is needed, got neither")
    given, name = (labels, "labels") if shift_labels is None else (shift_labels, "shift_labels")
    text = text_tokens(inputs)
    shape = tuple(text.shape[:2]) if isinstance(text, torch.Tensor) else None
    if (not isinstance(given, torch.Tensor) or given.dim() != 2 or not holds_class_ids(given.dtype)
            or shape not in (None, tuple(given.shape))):
        found = f"{tuple(given.shape)} {given.dtype}" if isinstance(given, torch.Tensor) else type(given).__name__
        raise ValueError(f"{name} must be an integer tensor of the inputs' shape {shape or '[B, T]'}, got {found}")
    return given, name


def predicting_positions(hidden: torch.Tensor, labels: torch.Tensor | None, shift_labels: torch.Tensor | None,
                         model: torch.nn.Module, inputs: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(hidden states [B, T', H] of the positions that predict, their targets [B, T'] int64 on hidden's device) of
    final hidden states [B, T, H] of `model`: as they are against shift_labels where given (position t predicts
    shift_labels[:, t]), else shifted against labels (position t predicts labels[:, t + 1]; the last position
    nothing). Given both, shift_labels are the targets and labels are not read, as in transformers' causal LM loss
    (a Trainer under context parallelism passes both). The one read must be an integer tensor of shape [B, T].
    NotImplementedError where the labels have the shape of the `inputs`' tokens (input_ids, inputs_embeds) and the
    hidden states of `model` are longer: it put other tokens before the text (GIT its image tokens, and takes its loss
    on the text's positions alone), whose loss is not the plain one."""
    given, name = check_targets(labels, shift_labels, inputs)
    text = text_tokens(inputs)
    if isinstance(text, torch.Tensor):
        refuse_tokens_before_the_text(model, hidden, given.shape[1], f"the {name} ({given.shape[1]})")
    if given.shape != hidden.shape[:-1]:   # (inputs of no tokens: the decoder's positions)
        raise ValueError(f"{name} must be an integer tensor of the inputs' shape {tuple(hidden.shape[:-1])}, "
                         f"got {tuple(given.shape)} {given.dtype}")
    if shift_labels is None:   # position t predicts token t + 1: the last position has no target
        hidden, given = hidden[:, :-1], labels[:, 1:]
    return hidden, given.to(device=hidden.device, dtype=torch.long)


def text_tokens(inputs: dict) -> torch.Tensor | None:
    """The inputs' tokens: input_ids, else inputs_embeds (None where neither is given)."""
    return inputs.get("input_ids") if inputs.get("input_ids") is not None else inputs.get("inputs_embeds")


def refuse_tokens_before_the_text(model: torch.nn.Module, hidden: torch.Tensor, length: int, text: str,
                                  whose: str = "") -> None:
    """NotImplementedError where `model`'s final hidden states [B, T, H] are longer than the text's `length`
    positions (`text` says what gave that length; `whose` prefixes the model's name): it put other tokens before the
    text (GIT its image tokens, and takes its loss on the text's positions alone), whose loss is not the plain one."""
    if hidden.shape[1] > length:
        raise NotImplementedError(f"{whose}{type(base_causal_lm(model)).__name__}: its hidden states "
                                  f"({hidden.shape[1]} positions) are longer than {text}: it puts other tokens "
                                  "(images) before the text and takes its loss on the text's positions alone, not "
                                  "the causal LM loss over its inputs that fastalign computes")


def holds_class_ids(dtype: torch.dtype) -> bool:
    """Whether dtype holds class ids: an integer type, not bool (a mask passed where the ids belong)."""
    return not (dtype.is_floating_point or dtype.is_complex or dtype == torch.bool)


def per_item(loss: torch.Tensor, num_items_in_batch: torch.Tensor | int | float | None) -> torch.Tensor:
    """A sum over num_items_in_batch (a number, or a tensor on any device) where it is given; the loss as it is
    (a mean) otherwise."""
    if num_items_in_batch is None:
        return loss
    if isinstance(num_items_in_batch, torch.Tensor):
        num_items_in_batch = num_items_in_batch.to(loss.device)
    return loss / num_items_in_batch
