"""The RMSNorms of a paged Llama-family forward: on the Triton backend each of the model's RMSNorm modules, with the
residual add before it, is stood in for by one fused kernel (kernels/rms_norm.py), instead of the add's and the
module's nine or so elementwise launches, twice or more per layer; elsewhere, and for any module the kernel cannot
stand in for, torch's add and the module itself.

How a family's module applies its weight is the layout's `rms_norm` (layer_layouts): "rounded" (Llama: the
normalised row rounded to the input's dtype, times the weight), "one plus" (Gemma: times 1 + weight in fp32) or
"fp32" (OLMo 2 and 3: times the weight in fp32). The runtime tests hold each family's fused forward to the
module's outputs.
"""
import torch

from fastalign.runtime.module_hooks import runs_more_than_its_forward

WEIGHT_RULES = {"rounded": dict(weight_offset=0.0, round_before_weight=True),
                "one plus": dict(weight_offset=1.0, round_before_weight=False),
                "fp32": dict(weight_offset=0.0, round_before_weight=False)}


class FusedRMSNorm:
    """A module's RMSNorm as one kernel (the residual add before it too, `after_add`); a call the kernel does not fit
    (another width, dtype or device, a strided last dimension) goes to torch and the module."""

    def __init__(self, module, eps, rule):
        from fastalign.kernels.rms_norm import rms_norm_after_add, rms_norm_triton
        self.module, self.eps, self.rule = module, eps, WEIGHT_RULES[rule]
        self._norm, self._after_add = rms_norm_triton, rms_norm_after_add

    def _fits(self, x):
        weight = self.module.weight
        return x.shape[-1] == weight.shape[0] and x.device == weight.device and x.stride(-1) == 1

    def __call__(self, x):
        if not self._fits(x):
            return self.module(x)
        return self._norm(x, self.module.weight, self.eps, **self.rule)

    def after_add(self, h, y):
        """(h + y, its norm)."""
        if not (self._fits(h) and self._fits(y) and h.shape == y.shape and h.dtype == y.dtype):
            return add_then_norm(self.module, h, y)
        return self._after_add(h, y, self.module.weight, self.eps, **self.rule)


def add_then_norm(norm, h, y):
    """(h + y, norm(h + y)): the residual stream after a sublayer's output y, and the next sublayer's input; norm is
    a FusedRMSNorm (one kernel), a module, or None (no norm there: the input is the stream itself)."""
    if isinstance(norm, FusedRMSNorm):
        return norm.after_add(h, y)
    total = h + y
    return total, total if norm is None else norm(total)


def fused_rms_norm(module, rule, dtype):
    """FusedRMSNorm for `module`, or the module itself where it is not an RMSNorm that applies its weight by `rule`
    (a type named *RMSNorm with a 1-D weight and a float eps), carries hooks (accelerate's offloading, a user's), or
    under "rounded" keeps its weight in another dtype than the model's `dtype` (its output would take the weight's)."""
    if module is None:
        return None
    weight = getattr(module, "weight", None)
    eps = getattr(module, "variance_epsilon", getattr(module, "eps", None))
    if (rule not in WEIGHT_RULES or not type(module).__name__.endswith("RMSNorm") or runs_more_than_its_forward(module)
            or not isinstance(weight, torch.Tensor) or weight.dim() != 1 or not isinstance(eps, float)
            or (rule == "rounded" and weight.dtype != dtype)):
        return module
    return FusedRMSNorm(module, eps, rule)
