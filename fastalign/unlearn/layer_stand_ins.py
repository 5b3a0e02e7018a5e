"""Training with fastalign's ops standing in for a Hugging Face decoder's RMSNorms and gated MLPs, which keep less for
the backward and launch fewer kernels than the modules.

At Llama-3.2-1B's widths in bf16, each RMSNorm module keeps an fp32 copy of its input and the rounded normalised row
for the backward (12 KiB a token), and the gated MLP gate, act(gate), up and the product (64 KiB), of roughly 100 KiB
that a layer keeps. Within `fused_layers`:
- each RMSNorm of a family whose weight rule fastalign knows (runtime.layer_layouts) runs as fastalign.rms_norm,
  which keeps its input only (4 KiB);
- each dense gated MLP runs its down projection as fastalign.gated_linear, which keeps gate and up only (32 KiB) and
  recomputes the product in the backward; where the down projection is a LoRA layer (or has hooks), it is called on
  fastalign.gated_activation's product, which it keeps itself (48 KiB).
That is 48 KiB a token and layer less (tests/unlearn/test_layer_stand_ins.py checks the savings to the byte on a tiny
model), and one kernel each way where the modules run eight or more. The numbers are the modules': the forward's to
the bit on the torch backend, the gradients to the rounding of the norms' sums taken in another order.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from fastalign.compute_dtype import compute_dtype
from fastalign.ops.backend import Backend, check_backend
from fastalign.ops.gated_linear import gated_activation, gated_linear
from fastalign.ops.rms_norm import Rule, rms_norm
from fastalign.runtime.gated_mlps import gated_mlp_activation, kernel_activation
from fastalign.runtime.layer_layouts import LAYOUTS
from fastalign.runtime.module_hooks import runs_more_than_its_forward
from fastalign.runtime.rms_norms import KERNEL_DTYPES, rms_norm_eps


class RecomputedProductMLP:
    """The forward of a dense gated MLP module (runtime.gated_mlps.gated_mlp_activation) while gradients are recorded:
    its down projection as gated_linear where it is a plain nn.Linear; otherwise (a LoRA layer, hooks, which read the
    product) the down_proj module called on gated_activation's product. Without grad, and for a float64, 1-D (the ops
    take [..., D] with a token dimension) or meta input (a model built to trace shapes), the module's own forward.
    Weights on the meta device under an input that is not (not loaded: a module whose hook loads them is not stood in
    for) are a ValueError naming the module by `name` (qualified, in the part of the model fused_layers covers)."""

    def __init__(self, module: torch.nn.Module, activation: str, backend: str, name: str):
        self.module, self.activation, self.backend, self.name = module, activation, backend, name

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        mlp = self.module
        down = mlp.down_proj
        if not torch.is_grad_enabled() or x.dtype not in KERNEL_DTYPES or x.dim() < 2 or x.is_meta:
            return type(mlp).forward(mlp, x)
        if kernel_activation(mlp.act_fn) != self.activation:   # a hook put on it since (the trainer's context lasts)
            return type(mlp).forward(mlp, x)
        if any(p.is_meta for p in mlp.parameters()):
            raise ValueError(f"{self.name}: its weights are not loaded (on the meta device, and no accelerate hook "
                             f"loads them) while its input is on {x.device}; load them onto a device")
        gate, up = mlp.gate_proj(x), mlp.up_proj(x)
        if type(down) is not torch.nn.Linear or runs_more_than_its_forward(down):
            return down(gated_activation(gate, up, activation=self.activation, backend=self.backend))
        # an autocast's linear would compute the down projection in its dtype; gated_linear runs outside it
        dtype = compute_dtype(gate.device.type, gate.dtype)
        bias = None if down.bias is None else down.bias.to(dtype)
        return gated_linear(gate.to(dtype), up.to(dtype), down.weight.to(dtype), bias, activation=self.activation,
                            backend=self.backend)


class TrainingRMSNorm:
    """The forward of an RMSNorm module whose family applies its weight by `rule`, as fastalign.rms_norm while
    gradients are recorded; the module's own where the op would compute something else (a "rounded" norm of an input
    in another dtype than its weight: the module's output takes the promoted dtype), for a float64, 1-D or meta input,
    and without grad."""

    def __init__(self, module: torch.nn.Module, eps: float, rule: Rule, backend: Backend):
        self.module, self.eps, self.rule, self.backend = module, eps, rule, backend

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        norm, weight = self.module, self.module.weight
        if (not torch.is_grad_enabled() or x.dim() < 2 or x.shape[-1] != weight.shape[0] or x.device != weight.device
                or x.dtype not in KERNEL_DTYPES or (self.rule == "rounded" and x.dtype != weight.dtype) or x.is_meta):
            return type(norm).forward(norm, x)
        return rms_norm(x, weight, self.eps, rule=self.rule, backend=self.backend)


def _stand_in(module, name, rule, backend):
    """What forwards in place of `module` (of qualified name `name`) within fused_layers, or None."""
    activation = gated_mlp_activation(module)
    if activation is not None:
        return RecomputedProductMLP(module, activation, backend, name)
    eps = rms_norm_eps(module)
    return None if eps is None else TrainingRMSNorm(module, eps, rule, backend)


def _family_part(model):
    """(the LayerLayout of runtime.layer_layouts, the module it covers): the first module of `model` whose config's
    model type fastalign knows (the model under its wrappers; an image-text model's language model, whose top config
    names the pair, e.g. Gemma 3's 'gemma3' over 'gemma3_text'), or (None, None). Only that module is stood in for:
    a vision tower's modules belong to another family."""
    for module in model.modules():
        layout = LAYOUTS.get(getattr(getattr(module, "config", None), "model_type", None))
        if layout is not None:
            return layout, module
    return None, None


@contextlib.contextmanager
def fused_layers(model: torch.nn.Module, backend: Backend = "auto") -> Iterator[int]:
    """A context in which the RMSNorms and dense gated MLPs of the Hugging Face model `model` (any wrapper around it:
    PEFT, DDP) forward as TrainingRMSNorm and RecomputedProductMLP with the ops' `backend`; yields how many modules
    it stands in for. Their forwards are the class's again on leaving it. Only the families whose layers fastalign
    knows (runtime.layer_layouts: Llama, Mistral, Qwen 2 and 3, the Gemmas, OLMo 2 and 3, their MoEs) are stood in
    for, since another family's module of the same name may compute more (Gemma 3n's MLPs sparsify their gate), in
    the part of `model` such a family's config covers (an image-text model's language model); modules with hooks
    (accelerate's offloading, FSDP's units) are left as they are. A copy of the model made within the block
    (copy.deepcopy, torch.save of the whole model) keeps the stand-ins as its modules' forwards for good, since they
    are attributes of the modules: copy it before the block, or save its state_dict."""
    check_backend(backend)   # on entry, not at the first forward of a stand-in
    layout, part = _family_part(model)
    patched = []
    try:
        for name, module in part.named_modules() if layout is not None else ():
            stand_in = _stand_in(module, name, layout.rms_norm, backend)
            if stand_in is not None:
                module.forward = stand_in
                patched.append(module)
        yield len(patched)
    finally:
        for module in patched:
            del module.forward
