"""How much of a LoRA update merging it into the base weights loses to their precision.

PEFT's merge_and_unload adds each layer's delta (B @ A * scaling, in the adapters' fp32) into the base weight
in place, in the weight's own dtype: the merged weight is (W0 + delta) rounded to that dtype. A bf16 weight
keeps 8 significant bits, so a delta much smaller than the weight is mostly rounded away (std 1e-4 on weights
of std 0.02: about a third of it; 1e-5, as unlearning's small learning rates give: about 90%), and the merged
model barely differs from the original. The unmerged adapter keeps the update exactly; the trainer warns where
model/ lost more of it than MERGE_ERROR_WARNING (warn_of_a_lossy_merge).
"""
from __future__ import annotations

import math
import warnings
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:   # (the trainer imports this module)
    from fastalign.unlearn.trainer import RunSummary

# Above this share of the update lost, the trainer warns that the merged model/ is not the model trained.
MERGE_ERROR_WARNING = 0.1


def merge_rounding_error(model) -> float | None:
    """||merged change - delta|| / ||delta|| over all LoRA layers of the PEFT `model`, before it is merged.

    delta is each layer's get_delta_weight, the merged change what merging it leaves in the layer's weight
    dtype ((W0 + delta) rounded, minus W0; several active adapters are merged one after another, as PEFT does).
    Computed layer by layer (a few fp32 copies of one weight at a time). 0 for an update of zero; None when an
    adapter uses a LoRA variant (e.g. DoRA), whose merge is not the delta added to the weight.
    """
    from peft.tuners.lora import LoraLayer

    lost_sq = update_sq = 0.0
    with torch.no_grad():
        for module in model.modules():
            if not isinstance(module, LoraLayer):
                continue
            adapters = [a for a in module.active_adapters if a in module.lora_A]
            if any(a in module.lora_variant for a in adapters):
                return None
            weight = module.get_base_layer().weight
            original = weight.detach().float()
            merged, delta = weight.detach(), torch.zeros_like(original)
            for adapter in adapters:
                step = module.get_delta_weight(adapter).float()
                merged = (merged.float() + step).to(weight.dtype)
                delta += step
            lost_sq += float(torch.linalg.vector_norm(merged.float() - original - delta, dtype=torch.float64)) ** 2
            update_sq += float(torch.linalg.vector_norm(delta, dtype=torch.float64)) ** 2
    return math.sqrt(lost_sq / update_sq) if update_sq else 0.0


def warn_of_a_lossy_merge(summary: RunSummary) -> None:
    """Warns when model/ lost more of the LoRA update than MERGE_ERROR_WARNING: a silently weaker model."""
    error = summary.merge_rounding_error
    if error is not None and error > MERGE_ERROR_WARNING:
        warnings.warn(f"merging the LoRA adapter into the weights of {summary.model_dir} lost {error:.1%} of its "
                      f"update (merge_rounding_error {error:.4g} > {MERGE_ERROR_WARNING:g}: the weights' precision, "
                      "e.g. bf16, rounds small changes away), so that model is not the model trained. The "
                      f"unmerged adapter in {summary.adapter_dir} keeps the update exactly: serve it on the base "
                      "model (PeftModel.from_pretrained(base, adapter_dir), base loaded in the dtype it trained "
                      "in), or train with fp32 weights (precision fp32 or bf16-mixed), whose merge keeps it",
                      stacklevel=4)
