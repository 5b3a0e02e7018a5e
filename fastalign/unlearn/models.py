"""Access to the two halves of a Hugging Face causal LM that the fused losses need.

The losses take the decoder's final hidden states (after its last norm) and the lm_head weight (and bias)
instead of logits, so the model is split into its decoder (model_decoder.decoder_of) and its output embedding
(`get_output_embeddings()`). PEFT wrappers are looked through: their LoRA layers live inside the
decoder's modules, so calling the decoder runs them. An adapter on the lm_head itself is refused, since
reading its weight would leave the adapter out, and so is a prompt-learning adapter, whose virtual tokens only the
PEFT model's forward adds. One on input embeddings tied to the lm_head is served (PEFT's forward runs the lm_head on the
tied base weight, which the losses read), but the unlearning trainer, which merges it, refuses it
(check_mergeable_adapter)."""
from __future__ import annotations

import functools
import inspect
import re
import sys

import torch

from fastalign.base_model import base_causal_lm
from fastalign.eval_mode import eval_mode
from fastalign.model_context import text_config
from fastalign.model_decoder import decoder_of, forward_parameters, prompt_learning_adapter
from fastalign.model_devices import META, check_head_loaded, compute_devices, loaded_devices
from fastalign.model_vocabulary import input_vocabulary
from fastalign.ops.checks import is_finite_real
from fastalign.transfers import index_on
from fastalign.unlearn.batching import TokenBatch

# Model types (of the text config) whose logits_scaling multiplies the logits (MuP), where Granite's divides them
_MULTIPLYING_LOGITS_SCALING = {"hyperclovax"}


def _logits_scaling_factor(value: float, config) -> float:
    """The factor on the logits of a logits_scaling: Granite's divides them, HyperCLOVAX's multiplies them."""
    return value if getattr(text_config(config), "model_type", None) in _MULTIPLYING_LOGITS_SCALING else 1 / value


# Config attributes of models that multiply their logits by a constant after the lm_head, each with the factor it
# names (of its value and the model's config): Cohere's logit_scale, Granite's logits_scaling (a divisor, which
# HyperCLOVAX's is not), Falcon-H1's lm_head_multiplier. The objective scales the hidden states and the bias by it
# instead (s (h W^T + b) = (s h) W^T + s b), so that the fused losses serve these models; a soft cap the losses
# apply themselves.
_LOGIT_MULTIPLIERS = {"logit_scale": lambda value, config: value, "logits_scaling": _logits_scaling_factor,
                      "lm_head_multiplier": lambda value, config: value}
# Config attributes of a soft cap c of the logits (c tanh(z / c)): Gemma 2's and 3's name, RecurrentGemma's
SOFTCAPS = ("final_logit_softcapping", "logits_soft_cap")


def forward_reads(model, name: str) -> bool:
    """Whether the source of the forward of `model`'s class holds `name`: a config attribute it reads (a config may
    carry settings its architecture ignores, e.g. a Llama given final_logit_softcapping), a method or a variable;
    True where its source cannot be read."""
    source = function_source(type(model).forward)
    return source is None or name in source


@functools.lru_cache(maxsize=None)
def function_source(function) -> str | None:
    """The source of a function (a model's forward, its prepare_inputs_for_generation), read once (the losses ask at
    every call); None where it cannot be read."""
    try:
        return inspect.getsource(function)
    except (OSError, TypeError):
        return None


def router_loss_added(model) -> bool:
    """Whether the model's forward adds a router's auxiliary loss to its loss as its config now stands: a mixture of
    experts whose config sets output_router_logits (a composite model's text config: Qwen3-VL-MoE's), and whose
    forward reads aux_loss."""
    base = base_causal_lm(model)
    config = getattr(base, "config", None)
    return (any(getattr(c, "output_router_logits", False) for c in (config, text_config(config)))
            and forward_reads(base, "aux_loss"))


def check_no_router_loss(model, computed_by: str) -> None:
    """NotImplementedError where router_loss_added(model): the loss `computed_by` computes leaves that loss out."""
    if router_loss_added(model):
        raise NotImplementedError(f"{type(base_causal_lm(model)).__name__}: its config's output_router_logits adds "
                                  f"the router's auxiliary loss to the loss, which {computed_by} leaves out; set it "
                                  "False (on the config, or on its text_config), or add the auxiliary loss yourself")


def cast_weights(model, dtype: torch.dtype):
    """Casts the parameters and persistent buffers of `model` to `dtype` in place, as from_pretrained(dtype=...)
    loads them; buffers computed at construction (non-persistent, e.g. the rotary embedding's inv_freq) keep
    their dtype. model.to(dtype) would round inv_freq to bf16 too, shifting the rotary angles (the more, the
    later the position): the model trained, or used as reference, would not be the one saved and reloaded."""
    persistent = model.state_dict().keys()
    kept = [(name, buffer) for name, buffer in model.named_buffers(remove_duplicate=False) if name not in persistent]
    model.to(dtype)
    for name, buffer in kept:
        owner, _, attribute = name.rpartition(".")
        model.get_submodule(owner).register_buffer(attribute, buffer, persistent=False)
    return model


def check_trainable_dtypes(model) -> None:
    """Raises on a float16 weight to train: AdamW's eps (1e-8) rounds to 0 in float16 and its second moments
    underflow, so the first step turns such weights into inf or NaN."""
    for name, p in model.named_parameters():
        if p.requires_grad and p.dtype == torch.float16:
            raise ValueError(f"model parameter {name} is torch.float16 and trains: AdamW's eps rounds to 0 in float16 "
                             "and its second moments underflow, so the first step would make weights inf or NaN; "
                             "load the model in float32 (precision 'fp32' or 'bf16-mixed') or bfloat16 (precision "
                             "'bf16'), or train a LoRA adapter on the float16 model (lora=True: float32 weights)")


def finite(t: torch.Tensor) -> torch.Tensor:
    """Whether `t` holds no NaN or inf, as a bool tensor on its device; a float8 one, which torch.isfinite does not
    take, read in float32 a chunk at a time (not a float32 copy of a whole weight)."""
    if t.is_floating_point() and t.element_size() == 1:
        return torch.stack([torch.isfinite(chunk.float()).all() for chunk in t.reshape(-1).split(1 << 24)]).all()
    return torch.isfinite(t).all()


def enable_activation_checkpointing(model):
    """Recompute each decoder layer's activations in the backward pass (non-reentrant checkpoints).

    transformers after 5.17 names this activation_checkpointing_enable (gradient_checkpointing_enable is
    deprecated there, to go in v6); 5.17 has only the old name."""
    base = base_causal_lm(model)
    if hasattr(base, "activation_checkpointing_enable"):
        base.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def check_activation_checkpointing(model) -> None:
    """ValueError where `model` cannot recompute its layers' activations (enable_activation_checkpointing would
    raise), found before a trainer changes anything of it."""
    base = base_causal_lm(model)
    if not getattr(base, "supports_gradient_checkpointing", False):
        raise ValueError(f"{type(base).__name__} does not support activation checkpointing: set "
                         "gradient_checkpointing=False (--no-gradient-checkpointing)")


# where transformers (5.17, 5.25) keeps a module's checkpointing: whether it is on, and the function that recomputes
_CHECKPOINTING_ATTRIBUTES = ("gradient_checkpointing", "_gradient_checkpointing_func")


def activation_checkpointing_settings(model) -> list[tuple[torch.nn.Module, dict]]:
    """Each module of `model` that transformers' checkpointing sets (those with a gradient_checkpointing flag), with
    the checkpointing attributes it holds of its own: its flag (every_n_layers leaves some layers off) and the function
    that recomputes it (with the options it was enabled with, use_reentrant=True, say, or a function of the caller's),
    for restore_activation_checkpointing."""
    return [(module, {name: vars(module)[name] for name in _CHECKPOINTING_ATTRIBUTES if name in vars(module)})
            for module in model.modules() if hasattr(module, "gradient_checkpointing")]


def restore_activation_checkpointing(settings: list[tuple[torch.nn.Module, dict]]) -> None:
    """Gives each module of `settings` (activation_checkpointing_settings') its checkpointing attributes back, removing
    those it did not hold of its own (a layer's flag that its class sets, a function not set yet)."""
    for module, attributes in settings:
        for name in _CHECKPOINTING_ATTRIBUTES:
            if name in attributes:
                setattr(module, name, attributes[name])
            elif name in vars(module):
                delattr(module, name)


def causal_lm_parts(model) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(decoder, lm_head) of a causal LM; a clear error for models the fused losses cannot serve."""
    adapter = prompt_learning_adapter(model)
    if adapter is not None:
        raise NotImplementedError(f"{type(model).__name__}: its PEFT adapter ({adapter}) is a prompt-learning adapter, "
                                  "whose virtual tokens PEFT's forward puts before the inputs; the fused losses run "
                                  "the decoder on the inputs alone: for the loss on labels, fuse_causal_lm_loss(model) "
                                  "fuses the base model's forward, which PEFT calls with them")
    base = base_causal_lm(model)
    if getattr(getattr(base, "config", None), "is_encoder_decoder", False):
        raise TypeError(f"{type(base).__name__} is an encoder-decoder model; the fused losses take a decoder-only "
                        "causal LM (such as LlamaForCausalLM), whose decoder reads the whole sequence")
    get_head = getattr(base, "get_output_embeddings", None)
    lm_head = get_head() if get_head is not None else None
    if lm_head is None:
        raise TypeError(f"{type(base).__name__} has no lm_head (get_output_embeddings() gives None); the fused losses "
                        "take a causal LM such as LlamaForCausalLM")
    if not isinstance(getattr(lm_head, "weight", None), torch.Tensor):
        raise NotImplementedError(f"{type(base).__name__}: its lm_head (get_output_embeddings()) is a "
                                  f"{type(lm_head).__name__} without a weight tensor, not a Linear whose weight the "
                                  "fused losses apply to the final hidden states")
    if hasattr(lm_head, "base_layer"):  # a PEFT tuner layer (e.g. LoRA) wrapped around the lm_head
        raise ValueError(f"the lm_head carries a PEFT adapter ({type(lm_head).__module__}.{type(lm_head).__name__}); "
                         "the fused losses read lm_head.weight, so the adapter would neither act nor train: "
                         "leave the lm_head out of lora_targets (PEFT's target_modules)")
    if hasattr(lm_head, "token_adapter"):   # PEFT's TrainableTokensWrapper: trained rows added in its forward
        raise ValueError("the lm_head carries PEFT's trainable tokens (trainable_token_indices, tied to the input "
                         "embeddings): the fused losses read lm_head.weight, without the trained tokens' rows; untie "
                         "the embeddings or leave trainable_token_indices out")
    return decoder_of(base), lm_head


def check_no_stray_adapter(model) -> None:
    """ValueError where `model` holds PEFT adapter layers without being a PeftModel: those a trainer with lora=True
    constructed over it put in and no train() of it took out, or the caller's own (inject_adapter_in_model). A full
    run on it would train what the layers leave trainable (PEFT froze the weights they wrap: the adapters alone) and
    write a model/ under PEFT's names (q_proj.base_layer.weight), whose wrapped weights transformers reloads at
    random."""
    tuners = sys.modules.get("peft.tuners.tuners_utils")   # (a model holds such layers only once peft was imported)
    if tuners is None or hasattr(model, "disable_adapter"):
        return
    names = [name for name, module in model.named_modules() if isinstance(module, tuners.BaseTunerLayer)]
    if names:
        raise ValueError(f"lora=False trains the model's own weights, but the model holds {len(names)} PEFT adapter "
                         f"layer(s) outside a PeftModel ({', '.join(names[:3])}{', ...' if len(names) > 3 else ''}): "
                         "left by a trainer with lora=True constructed over it that never trained, or injected by "
                         "your code; training it would train those layers alone and save them under PEFT's names. "
                         "Load the model again, or train an adapter (lora=True)")


def check_mergeable_adapter(model) -> None:
    """ValueError where merging `model`'s PEFT adapter would not give the model trained (the unlearning trainer merges
    the adapter it trained into the model it saves): input embeddings that carry an adapter and are tied to the
    lm_head (PEFT's forward runs the lm_head on the tied base weight, so training leaves the lm_head alone, but the
    merge would change it too); a LoRA layer that wraps a weight of no dtype merge_and_unload adds the adapter into
    (int8 that a bitsandbytes-like Linear dequantizes in its forward, float8 that an FP8 Linear rescales in its own:
    the run would train, then fail in the merge), named. Only PEFT's generic layers (peft.tuners.lora.layer) add into
    the weight as stored: its layers for bitsandbytes, HQQ or torchao weights dequantize, merge and quantize again."""
    base = base_causal_lm(model)
    get_head, get_embeddings = getattr(base, "get_output_embeddings", None), getattr(base, "get_input_embeddings", None)
    lm_head = get_head() if get_head is not None else None
    embeddings = get_embeddings() if get_embeddings is not None else None
    tied_weight = getattr(getattr(embeddings, "base_layer", None), "weight", None)
    if tied_weight is not None and tied_weight is getattr(lm_head, "weight", None):
        raise ValueError("the input embeddings carry a PEFT adapter and are tied to the lm_head: merging it would "
                         "change the lm_head too, so the saved model would not be the one trained (whose lm_head "
                         "the adapter left alone); leave the input embeddings out of lora_targets")
    for name, module in model.named_modules():
        if type(module).__module__ != "peft.tuners.lora.layer":
            continue
        weight = getattr(getattr(module, "base_layer", None), "weight", None)
        if isinstance(weight, torch.Tensor) and weight.dtype not in COMPUTE_DTYPES:
            raise ValueError(f"the LoRA layer {name.removeprefix('base_model.model.')} wraps a {weight.dtype} weight, "
                             "into which PEFT's merge_and_unload cannot merge the adapter to write model/; leave it "
                             "out of lora_targets, or load the model in float32, bfloat16 or float16")


def head_input_module(model) -> torch.nn.Module:
    """The module whose last hidden states the model's lm_head reads, to run with all of the inputs the model's forward
    takes: a vision-language model's multimodal model (its `.model`, which encodes the images and places them among
    the text's embeddings, and masks as the model does, PaliGemma's prefix both ways), else the decoder (decoder_of).
    The decoder alone took pixel_values into its **kwargs and dropped them: the loss of a model that saw no image."""
    decoder = causal_lm_parts(model)[0]
    inner = getattr(base_causal_lm(model), "model", None)
    if isinstance(inner, torch.nn.Module) and inner is not decoder and "pixel_values" in forward_parameters(inner):
        return inner
    return decoder


def logit_setting_places(model) -> dict[str, str | None]:
    """Where the forward of `model`'s class reads each logits setting (the soft cap, the multipliers): None where it
    reads none; "self" or "self.model" where it copied the setting at construction (Cohere's self.logit_scale,
    Falcon-H1's self.model.lm_head_multiplier, Mistral Large 4's self.final_logit_softcapping: a config changed since
    does not reach it); else "config" (its config's, or its text config's: a vision-language model's, PaliGemma's,
    Aya Vision's). Found in the forward's source, which dynamo cannot trace (a graph break at every compiled call):
    a loss finds the places once, when made, and reads the values there at each call."""
    base = base_causal_lm(model)
    places = {}
    for name in (*SOFTCAPS, *_LOGIT_MULTIPLIERS):
        attribute = re.search(rf"\bself\.(model\.)?{name}\b", function_source(type(base).forward) or "")
        places[name] = (None if not forward_reads(base, name) else "config" if attribute is None
                        else "self.model" if attribute.group(1) else "self")
    return places


def _forward_setting(base, name: str, place: str | None):
    """The value of the logits setting `name` that `base`'s forward reads at `place` (logit_setting_places), or None
    where it reads none."""
    if place is None:
        return None
    if place != "config":
        return getattr(base.model if place == "self.model" else base, name, None)
    config = getattr(base, "config", None)
    value = getattr(config, name, None)
    return value if value is not None or config is None else getattr(text_config(config), name, None)


def logit_softcap(model, places: dict[str, str | None] | None = None) -> float | None:
    """The model's soft cap c (SOFTCAPS: its final_logit_softcapping, RecurrentGemma's logits_soft_cap) where its
    forward applies it (its logits are c * tanh(z / c)), or None for plain logits; read where its forward reads it
    (`places`: logit_setting_places(model), found now if None)."""
    places = logit_setting_places(model) if places is None else places
    base = base_causal_lm(model)
    values = [_forward_setting(base, name, places[name]) for name in SOFTCAPS]
    value = next((value for value in values if value is not None), None)
    return None if value is None else float(value)


def logit_multiplier(model, places: dict[str, str | None] | None = None) -> float | None:
    """The constant s by which the model's forward multiplies its logits after the lm_head (see _LOGIT_MULTIPLIERS),
    or None where it multiplies by none; each factor read where its forward reads it (`places`, as logit_softcap's)."""
    places = logit_setting_places(model) if places is None else places
    base = base_causal_lm(model)
    config, multiplier = getattr(base, "config", None), 1.0
    for name, factor in _LOGIT_MULTIPLIERS.items():
        value = _forward_setting(base, name, places[name])
        if value is None:
            continue
        if not is_finite_real(value) or value == 0:
            raise ValueError(f"{type(base).__name__}: its config's {name} must be a finite nonzero number, got "
                             f"{value!r}")
        multiplier *= factor(float(value), config)
    return None if multiplier == 1.0 else multiplier


def scaled_head_input(tensor: torch.Tensor | None, multiplier: float | None, dtype: torch.dtype):
    """Hidden states or an lm_head bias, times the logit multiplier where there is one, in `dtype` (one rounding);
    None stays None."""
    if tensor is None:
        return None
    return (tensor if multiplier is None else tensor * multiplier).to(dtype)


# The dtypes the fused ops compute with: an lm_head weight stored in another (int8, float8) is rescaled or dequantized
# in its forward, which the fused losses do not run
COMPUTE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _tensors_besides_weight_and_bias(head: torch.nn.Module) -> list[str]:
    """The names of the parameters and buffers `head` holds besides its weight and bias, where the weight counts what
    it is computed from at each access (a parametrization's sources: weight_norm's), and PEFT's modules_to_save copy
    of a head (a ModulesToSaveWrapper, whose weight is its active copy's) holds what its copies hold."""
    if hasattr(head, "original_module") and hasattr(head, "modules_to_save"):
        return [name for copy in (head.original_module, *head.modules_to_save.values())
                for name in _tensors_besides_weight_and_bias(copy)]
    names = [name for name, _ in (*head.named_parameters(), *head.named_buffers())]
    return [name for name in names if name not in ("weight", "bias")
            and not name.startswith(("parametrizations.weight.", "parametrizations.bias."))]


def _check_plain_head(base, lm_head: torch.nn.Module, whose: str) -> None:
    """NotImplementedError, naming `base` and whose model it is, where `lm_head` computes with more than its weight
    as stored and its bias: the fused losses read those and never run the lm_head, so a weight stored for its forward
    to rescale (float8, int8), or parameters or buffers of its own (a LoRA path whose B starts at zero, a learned
    logit scale starting at 1: what the probe cannot see before they train), would give another model's loss. A
    forward of its own with nothing more to read (Ergo's, which accumulates its logits in float32) is left to the
    probe."""
    name, weight = type(base).__name__, lm_head.weight
    if weight.dtype not in COMPUTE_DTYPES:
        raise NotImplementedError(f"{name}: the {whose}'s lm_head weight {tuple(weight.shape)} {weight.dtype} is of "
                                  "no dtype the fused losses compute with (float16, bfloat16, float32, float64): "
                                  f"they read it as the weight the lm_head ({type(lm_head).__name__}) computes with, "
                                  "which a quantized or float8 one is only once its forward rescales it")
    extra = _tensors_besides_weight_and_bias(lm_head)
    if extra:
        raise NotImplementedError(f"{name}: its logits are not its lm_head's weight applied to the final hidden states "
                                  f"alone: the {whose}'s lm_head is a {type(lm_head).__name__}, which holds "
                                  f"parameters or buffers besides weight and bias ({', '.join(extra[:3])}); the fused "
                                  "losses read its weight and bias alone, so what its forward computes with them "
                                  "would neither act nor train")


# the tokens of check_fused_logits' probe: ids spread over the vocabulary
_PROBE_TOKENS = 4


def check_fused_logits(model, *, whose: str = "model") -> None:
    """Raises NotImplementedError unless `model`'s logits are what the fused losses compute from its parts:
    F.linear(s * final hidden states of its decoder, lm_head.weight, s * lm_head.bias), s the logit_multiplier,
    capped as logit_softcap says; first, without running it, for an lm_head whose weight's dtype or parameters say it
    computes something else (_check_plain_head: a LoRA path starting at zero agrees with the probe until it trains).
    Parts that accelerate offloads run as in the model's forward (their hooks load them). ValueError, naming the model
    as `whose` ("model" or "reference"), where the probe or the fused losses cannot run it: a part on the meta device
    that no hook loads (loaded_devices), an offloaded lm_head, which only its hook loads (check_head_loaded). A model
    with no weight loaded (FSDP's low-memory loading gives them to one process) is not probed: there is nothing to run
    yet.

    This probe catches the transforms no known config name reveals: a multiplier under a name of its own, hidden
    states rescaled or normed between the decoder and the lm_head, a hook on the lm_head that changes its output.
    It compares one short forward of the model (eval mode, its own dtype) with the computation the fused losses
    stand for, done in the model's order (the multiplier after the linear map: the fused losses' scaled hidden
    states and bias give the same product, which fp32 rounds otherwise by several ulps of the unscaled dot product,
    beyond the bound at widths of 128 and more), up to four roundings of that dtype (2 eps of the largest logit): the
    two are the same operations when nothing is missed, and a looser bound lets a bf16 head that rescales its logits
    by 2% through. A forward that accelerate's prepare wrapped in mixed precision's autocast (a Trainer's with
    bf16=True) is compared unwrapped (accelerate keeps it as _original_forward): the wrapper's logits are bf16's, not
    that dtype's."""
    decoder, lm_head = causal_lm_parts(model)
    base, weight, softcap = base_causal_lm(model), lm_head.weight, logit_softcap(model)
    multiplier = logit_multiplier(model)
    _check_plain_head(base, lm_head, whose)
    # no weight loaded in this process (FSDP's low-memory loading gives them to one): nothing to run yet; a model
    # accelerate offloads whole has all its weights on meta too, but its hooks load them
    if all(p.is_meta for p in base.parameters()) and META in compute_devices(base):
        return
    loaded_devices(base, "a fused loss", whose)
    check_head_loaded(lm_head, whose)
    # ids the input embeddings hold (an lm_head may have more rows: a checkpoint's unembedding padded past them)
    vocab = min(weight.shape[0], input_vocabulary(base) or weight.shape[0])
    ids = torch.linspace(0, vocab - 1, _PROBE_TOKENS, device=weight.device).long()[None]
    mask = torch.ones_like(ids)
    with torch.no_grad(), eval_mode(base):
        forward = vars(base).get("_original_forward", base)
        logits = forward(input_ids=ids, attention_mask=mask, use_cache=False).logits.float()
        hidden = decoder(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
        if hidden.shape[-1] != weight.shape[-1]:
            expected = None
        else:
            # in the model's order, the multiplier after the linear map: the fused losses' (s h) W^T + s b is the
            # same product, rounded otherwise by a few ulps of the unscaled dot product (fp32 rounding, no transform)
            expected = torch.nn.functional.linear(scaled_head_input(hidden, None, weight.dtype), weight,
                                                  scaled_head_input(lm_head.bias, None, weight.dtype))
            expected = expected if multiplier is None else expected * multiplier
            expected = (expected if softcap is None else torch.tanh(expected / softcap) * softcap).float()
    if expected is None or expected.shape != logits.shape:
        found = (f"hidden states {tuple(hidden.shape)}, lm_head weight {tuple(weight.shape)} {weight.dtype}, logits "
                 f"{tuple(logits.shape)}")
    else:
        scale, error = float(logits.abs().max()), float((expected - logits).abs().max())
        # the dtype both compute in (a weight stored coarser than the hidden states must not loosen the bound)
        if error <= 2 * torch.finfo(torch.promote_types(hidden.dtype, weight.dtype)).eps * max(scale, 1.0):
            return
        found = f"they differ by up to {error:.3g} on logits up to {scale:.3g}"
    raise NotImplementedError(f"{type(base).__name__}: its logits are not its lm_head's weight applied to the final "
                              f"hidden states of its decoder ({found}): it transforms them, or the hidden states, in "
                              "a way the fused losses do not reproduce, so they would train another objective")


def final_hidden_states(decoder: torch.nn.Module, tokens: TokenBatch) -> torch.Tensor:
    """The decoder's last hidden states [B, W, H], W = the longest row (columns of padding only are cut)."""
    width = tokens.width
    return decoder(input_ids=tokens.input_ids[:, :width], attention_mask=tokens.attention_mask[:, :width],
                   use_cache=False).last_hidden_state


def at_positions(t: torch.Tensor, rows: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
    """t[rows, columns] of a [B, W, ...] tensor, at positions the host found (int64, on the CPU), by one index_select:
    a boolean mask on the device would make the host wait for the device, in the forward and again in the
    backward."""
    return t.flatten(0, 1).index_select(0, index_on(rows * t.shape[1] + columns, t.device))


def at_answer_targets(hidden: torch.Tensor, tokens: TokenBatch) -> torch.Tensor:
    """Rows [N, H] of hidden [B, W, H] at the positions whose target is an answer token (tokens.target_mask),
    row-major order (TokenBatch.answer_positions)."""
    return at_positions(hidden, *tokens.answer_positions(hidden.shape[1]))
