"""The RMSNorms of a paged Llama-family forward: on the Triton backend each of the model's RMSNorm modules is stood in
for by one fused kernel (kernels/rms_norm.py), instead of the module's eight or so elementwise launches, twice or
more per layer; elsewhere, and for any module the kernel cannot stand in for, the module itself.

How a family's module applies its weight is the layout's `rms_norm` (layer_layouts): "rounded" (Llama: the
normalised row rounded to the input's dtype, times the weight), "one plus" (Gemma: times 1 + weight in fp32) or
"fp32" (OLMo 2 and 3: times the weight in fp32). The runtime tests hold each family's fused forward to the
module's outputs.
"""
import torch

WEIGHT_RULES = {"rounded": dict(weight_offset=0.0, round_before_weight=True),
                "one plus": dict(weight_offset=1.0, round_before_weight=False),
                "fp32": dict(weight_offset=0.0, round_before_weight=False)}


class FusedRMSNorm:
    """A module's RMSNorm as one kernel; a call the kernel does not fit (another width or device, a strided last
    dimension) goes to the module."""

    def __init__(self, module, eps, rule):
        from fastalign.kernels.rms_norm import rms_norm_triton
        self.module, self.eps, self.rule, self._kernel = module, eps, WEIGHT_RULES[rule], rms_norm_triton

    def __call__(self, x):
        weight = self.module.weight
        if x.shape[-1] != weight.shape[0] or x.device != weight.device or x.stride(-1) != 1:
            return self.module(x)
        return self._kernel(x, weight, self.eps, **self.rule)


def fused_rms_norm(module, rule, dtype):
    """FusedRMSNorm for `module`, or the module itself where it is not an RMSNorm that applies its weight by `rule`
    (a type named *RMSNorm with a 1-D weight and a float eps), carries hooks (accelerate's offloading, a user's), or
    under "rounded" keeps its weight in another dtype than the model's `dtype` (its output would take the weight's)."""
    if module is None:
        return None
    weight = getattr(module, "weight", None)
    eps = getattr(module, "variance_epsilon", getattr(module, "eps", None))
    hooked = (hasattr(module, "_hf_hook") or module._forward_hooks or module._forward_pre_hooks
              or "forward" in vars(module))
    if (rule not in WEIGHT_RULES or not type(module).__name__.endswith("RMSNorm") or hooked
            or not isinstance(weight, torch.Tensor) or weight.dim() != 1 or not isinstance(eps, float)
            or (rule == "rounded" and weight.dtype != dtype)):
        return module
    return FusedRMSNorm(module, eps, rule)
