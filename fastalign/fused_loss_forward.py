"""fuse_causal_lm_loss: a transformers causal LM whose own forward takes its loss from the fused linear cross-entropy.

`fuse_causal_lm_loss(model)` replaces the forward of this one model (not of its class) so that
`model(**batch, labels=labels).loss` is computed as CausalLMLoss computes it, without the [tokens x vocab] logits,
whenever a gradient will be taken (labels given, grad mode on). Any training code that calls the model then saves
the logits' memory unchanged: a Hugging Face Trainer, accelerate, DDP or FSDP2 around the model, a PEFT model over it
(the forward replaced is the transformers model's, which PEFT's forward calls). Without labels, or under no_grad
(generation, a Trainer's evaluation, which reads the logits), the model's own forward runs.
"""
from __future__ import annotations

import dataclasses
import inspect
import warnings
from typing import Callable, TypeVar

import torch
from torch.nn.parallel import DataParallel, DistributedDataParallel
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.utils import ModelOutput

from fastalign.base_model import base_causal_lm
from fastalign.causal_lm_loss import (CausalLMLoss, check_loss_is_causal_lm_cross_entropy, per_item,
                                     predicting_positions)
from fastalign.ops.backend import Backend
from fastalign.own_forward import forward_is_its_own
from fastalign.runtime.hf_cache_argument import refuse_a_prefix_not_taken
from fastalign.unlearn.models import head_input_module, router_loss_added

# Arguments of the model's forward that are the loss's (transformers passes them on to its loss function)
_LOSS_ARGUMENTS = ("labels", "shift_labels", "num_items_in_batch", "ignore_index")
# A KV cache given to the forward, under either name transformers gives it (past_key_values; cache from 5.25)
_CACHE_ARGUMENTS = ("past_key_values", "cache")

Model = TypeVar("Model", bound=torch.nn.Module)


def fuse_causal_lm_loss(model: Model, *, backend: Backend = "auto", grads_in_forward: bool = False,
                        label_smoothing: float = 0.0) -> Model:
    """Makes `model`'s forward (a transformers causal LM, or the one under a PEFT model) take its loss on labels from
    the fused linear cross-entropy, with `loss` as it was and `logits` None; returns `model`.

    The fused forward runs where labels are given, grad mode is on, and no KV cache, logits_to_keep or
    output_router_logits is asked for; the model's own forward runs otherwise (with grad mode on and no labels, after a
    warning, once: the logits are made then). It takes the arguments the model's forward takes (its signature is
    kept, which a Trainer reads), and the loss's: shift_labels, num_items_in_batch, ignore_index. Its output has the
    loss, and hidden_states and attentions where asked for. The model is checked here as CausalLMLoss checks it; so
    is its loss function, which must be transformers' causal LM loss, and a mixture of experts whose config adds the
    router's auxiliary loss is refused (the fused forward would leave it out), and so is a model whose forward
    something else replaced before (accelerate's autocast, or the hook of dispatch_model, cpu_offload or a device_map:
    fuse first, and it wraps the fused forward). Called again, it replaces the settings (after accelerate's prepare
    too, whose autocast then covers them); copies of the model
    (copy.deepcopy, after accelerate's prepare too) keep the fused forward, on their own weights.
    backend, grads_in_forward and label_smoothing are CausalLMLoss's (label_smoothing > 0: the loss against smoothed
    targets, in place of a Trainer's label_smoothing_factor, which takes the labels out and computes it from logits;
    under no_grad, as in a Trainer's evaluation, the model's own forward gives the logits and the loss is smoothed
    from them, so that evaluation reports the smoothed loss too).
    """
    _refuse_wrapper(model)
    base = base_causal_lm(model)
    check_loss_is_causal_lm_cross_entropy(base, "the fused forward")
    current, prepared = base.forward, _prepared_fused_forward(base)
    if prepared is None and not (forward_is_its_own(base) or isinstance(current, FusedLossForward)):
        raise ValueError(_replaced_forward_refusal(base))
    loss = CausalLMLoss(base, backend=backend, grads_in_forward=grads_in_forward, label_smoothing=label_smoothing)
    if prepared is not None:   # (the wrapper, its autocast kept, calls the fused forward: only its settings change)
        prepared.loss = loss
        return model
    unfused = current.unfused if isinstance(current, FusedLossForward) else current
    base.forward = base.fused_loss_forward = FusedLossForward(loss, unfused)
    return model


class FusedLossForward:
    """The forward of a model after fuse_causal_lm_loss (kept on the model as `forward` and `fused_loss_forward`): the
    loss on labels from `loss` (the model's CausalLMLoss), the model's own forward (`unfused`) where no gradient is
    taken through a loss.

    It is a method of the model (`__self__`) as accelerate sees one: prepare wraps its `__func__` in autocast and binds
    that to the model, which copy.deepcopy binds to the copy; the function runs the `fused_loss_forward` of the model
    it is given (a forward without __func__ was wrapped as it was, and a copy of the prepared model computed on the
    original's weights). Unlike a types.MethodType, it pickles with the model (a method pickles as a look-up of its
    name on the model, made before the model's attributes are back)."""

    def __init__(self, loss: CausalLMLoss, unfused: Callable):
        self.loss, self.unfused = loss, unfused
        self.warned_of_logits = False
        self.past_key_values_taken = False   # (checked on the first call that passes them)

    @property
    def __self__(self) -> torch.nn.Module:
        return self.loss.model

    @property
    def __func__(self) -> Callable:
        """The forward as a function of the model, with the signature of the model's forward (`self` first), which
        inspect reads through accelerate's wrapper."""
        def forward(model, *args, **kwargs):
            return model.fused_loss_forward(*args, **kwargs)
        model_parameter = inspect.Parameter("self", inspect.Parameter.POSITIONAL_ONLY)
        signature = self.__signature__
        forward.__signature__ = signature.replace(parameters=[model_parameter, *signature.parameters.values()])
        forward.__wrapped__ = self   # accelerate's unwrap_model(keep_fp32_wrapper=False) gives this object back
        return forward

    @property
    def __signature__(self) -> inspect.Signature:
        """The model's own forward's: a Trainer keeps the dataset columns that it names."""
        return inspect.signature(self.unfused)

    def __call__(self, *args, **kwargs):
        arguments = _named_arguments(self.__signature__, args, kwargs)
        # (output_router_logits set on its config since it was fused: the model's own forward, with its router loss)
        loss_only = (arguments is not None and _asks_for_nothing_but_the_loss(arguments)
                     and not router_loss_added(self.loss.model))
        if not loss_only or not torch.is_grad_enabled():
            if loss_only and self.loss.label_smoothing and arguments.get("labels") is not None:
                return self._smoothed(arguments)
            return self._unfused_taking_past_key_values(arguments, *args, **kwargs)
        if arguments.get("labels") is None:
            self._warn_of_logits()
            return self.unfused(*args, **kwargs)
        model = self.loss.model
        loss_arguments = {name: arguments.pop(name) for name in _LOSS_ARGUMENTS if name in arguments}
        return_dict = arguments.pop("return_dict", None)
        arguments.pop("logits_to_keep", None)
        outputs = head_input_module(model)(**{**arguments, "use_cache": False})
        # (shift_labels, where given, are the targets; labels then only ask for the loss)
        hidden, target = predicting_positions(outputs.last_hidden_state, loss_arguments["labels"],
                                              loss_arguments.get("shift_labels"), model, arguments)
        loss = self.loss.of_hidden_states(hidden, target, loss_arguments.get("num_items_in_batch"),
                                          loss_arguments.get("ignore_index", -100))
        # (a state-space model's outputs have no attentions)
        output = CausalLMOutputWithPast(loss=loss, hidden_states=getattr(outputs, "hidden_states", None),
                                        attentions=getattr(outputs, "attentions", None))
        if return_dict is None:
            return_dict = getattr(model.config, "return_dict", True)
        return output if return_dict else output.to_tuple()

    def _smoothed(self, arguments: dict):
        """The model's own outputs of a call with labels under no_grad (a Trainer's evaluation), with the loss smoothed
        as the fused loss smooths it (label_smoothing > 0), from their logits. The own forward runs without the
        loss's arguments: its own loss, unsmoothed over the same [tokens x vocab] logits, would be thrown away."""
        kept = {name: value for name, value in arguments.items() if name not in _LOSS_ARGUMENTS}
        outputs = self._unfused_taking_past_key_values(kept, **kept)
        as_tuple = not isinstance(outputs, ModelOutput)
        logits, target = predicting_positions(outputs[0] if as_tuple else outputs.logits, arguments["labels"],
                                              arguments.get("shift_labels"), self.loss.model, arguments)
        ignore_index = arguments.get("ignore_index", -100)
        total = torch.nn.functional.cross_entropy(logits.flatten(0, -2).float(), target.flatten(),
                                                  ignore_index=ignore_index, reduction="sum",
                                                  label_smoothing=self.loss.label_smoothing)
        items = arguments.get("num_items_in_batch")
        loss = per_item(total, (target != ignore_index).sum().clamp(min=1) if items is None else items)
        # (the loss first, as the own forward with labels gives it: a tuple's, and a ModelOutput's first field)
        return (loss, *outputs) if as_tuple else dataclasses.replace(outputs, loss=loss)

    def _unfused_taking_past_key_values(self, arguments: dict | None, *args, **kwargs):
        """The model's own forward's outputs; once, where a call passes K/V as past_key_values (as PEFT's forward
        passes a prefix's) to a forward that names no such argument, a ValueError unless the forward took them: the
        cache passed holds the inputs' positions after it (transformers maps past_key_values to `cache` until 5.40; a
        forward whose **kwargs swallow it ran as the model without the prefix, silently)."""
        cache = None if self.past_key_values_taken or arguments is None else arguments.get("past_key_values")
        # (the inputs are looked up only for a call that passes a cache so: every other call, a decoding step of the
        # model's own generation among them, goes straight to the model's forward)
        inputs = None if not hasattr(cache, "get_seq_length") else next(
            (arguments[name] for name in ("input_ids", "inputs_embeds") if arguments.get(name) is not None), None)
        if inputs is None or "past_key_values" in self.__signature__.parameters:
            return self.unfused(*args, **kwargs)
        expected = cache.get_seq_length() + inputs.shape[1]
        outputs = self.unfused(*args, **kwargs)
        refuse_a_prefix_not_taken(cache, expected, type(self.loss.model).__name__)
        self.past_key_values_taken = True
        return outputs

    def _warn_of_logits(self) -> None:
        """Once: a call that takes a gradient without labels runs the model's own forward, logits and all. A Trainer
        does that where it computes the loss itself (label_smoothing_factor, compute_loss_func): it takes the labels
        out of the batch, and the fused loss then saves nothing."""
        if not self.warned_of_logits:
            self.warned_of_logits = True
            warnings.warn(f"{type(self.loss.model).__name__}: the fused model was called with grad enabled and no "
                          "labels, so its own forward ran and made the [tokens x vocab] logits: the fused loss saves "
                          "memory only when the labels reach the model's forward (a Trainer with "
                          "label_smoothing_factor or compute_loss_func takes them out of the batch and computes the "
                          "loss from the logits itself: fuse_causal_lm_loss(model, label_smoothing=...) smooths the "
                          "fused loss instead)")


def _named_arguments(signature: inspect.Signature, args: tuple, kwargs: dict) -> dict | None:
    """The call's arguments by name, those of the forward's **kwargs among them (a TypeError as the forward would
    raise it for arguments it does not take); None where some have no name (a forward's *args)."""
    named = {}
    for name, value in signature.bind(*args, **kwargs).arguments.items():
        kind = signature.parameters[name].kind
        if kind is inspect.Parameter.VAR_KEYWORD:
            named.update(value)
        elif kind is inspect.Parameter.VAR_POSITIONAL:
            if value:
                return None
        else:
            named[name] = value
    return named


def _asks_for_nothing_but_the_loss(arguments: dict) -> bool:
    """Whether a call with these arguments asks for nothing that only the model's own forward gives: a KV cache
    carried on, a slice of the logits, the router's logits and auxiliary loss. With labels and grad mode on, such a
    call takes the fused loss."""
    logits_to_keep = arguments.get("logits_to_keep", 0)
    return (all(arguments.get(name) is None for name in _CACHE_ARGUMENTS)
            and isinstance(logits_to_keep, int) and logits_to_keep == 0
            and not arguments.get("output_router_logits"))


def _prepared_fused_forward(model: torch.nn.Module) -> FusedLossForward | None:
    """The fused forward of `model` where accelerate's prepare (mixed precision: a Trainer's bf16=True) wrapped it
    after fusing: the model's forward is a wrapper, bound to the model, down to a fused forward (__wrapped__ links),
    and the forward kept as _original_forward is the model's own fused_loss_forward, which the wrapper calls; else
    None."""
    original, forward = vars(model).get("_original_forward"), vars(model).get("forward")
    if not isinstance(original, FusedLossForward) or original is not vars(model).get("fused_loss_forward"):
        return None
    if getattr(forward, "__self__", None) is not model or original.loss.model is not model:
        return None
    return original if isinstance(inspect.unwrap(getattr(forward, "__func__", forward)), FusedLossForward) else None


def _replaced_forward_refusal(model: torch.nn.Module) -> str:
    """Why fuse_causal_lm_loss refuses `model`, whose forward something replaced: accelerate's hook where it can tell
    (add_hook_to_module keeps the hook at _hf_hook and the forward it wraps at _old_forward, whose __qualname__ the
    hook's forward copies: naming that told nothing), else the forward, a wrapper such as accelerate's autocast."""
    hook, forward = getattr(model, "_hf_hook", None), model.forward
    if hook is not None and hasattr(model, "_old_forward"):
        return (f"{type(model).__name__}: this model's forward was already replaced by accelerate's hook "
                f"{type(hook).__name__} (dispatch_model, cpu_offload or from_pretrained's device_map put it there); "
                "call fuse_causal_lm_loss first, before dispatching the model: the hook then wraps the fused forward")
    if isinstance(vars(model).get("fused_loss_forward"), FusedLossForward):
        return (f"{type(model).__name__}: this model was fused and then its forward was replaced (by "
                f"{getattr(forward, '__qualname__', type(forward).__name__)}), not by accelerate's prepare alone, "
                "whose wrapper's fused forward takes new settings: fuse a fresh model, or reload this one, with them")
    return (f"{type(model).__name__}: this model's forward was already replaced (by "
            f"{getattr(forward, '__qualname__', type(forward).__name__)}); call fuse_causal_lm_loss first, before "
            "accelerate's prepare (or a Trainer's train) wraps the forward in autocast, which then covers the fused "
            "loss too")


def _refuse_wrapper(model: torch.nn.Module) -> None:
    """TypeError for a wrapper around the model (torch.compile's OptimizedModule, DistributedDataParallel,
    DataParallel): its forward is the wrapper's own (or was traced from the model's), so the fusing goes on the model,
    before it is wrapped."""
    wrapped = model.module if isinstance(model, (DistributedDataParallel, DataParallel)) else None
    wrapped = getattr(model, "_orig_mod", wrapped)
    if isinstance(wrapped, torch.nn.Module):
        raise TypeError(f"fuse_causal_lm_loss got a {type(model).__name__} around a {type(wrapped).__name__}: fuse "
                        "the model itself, then wrap it (fuse_causal_lm_loss(model) before torch.compile, "
                        "DistributedDataParallel or DataParallel)")
