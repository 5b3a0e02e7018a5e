"""The RMSNorms of a paged Llama-family forward: on the Triton backend each of the model's RMSNorm modules, with the
residual add before it (and the norm of the sublayer's output before that, where the family has one), is stood in
for by one fused kernel (kernels/rms_norm.py), instead of the add's and the modules' nine or so elementwise launches
each, twice or more per layer; elsewhere, and for any module the kernel cannot stand in for, torch's add and the
module itself.

How a family's module applies its weight is the layout's `rms_norm` (layer_layouts): "rounded" (Llama: the
normalised row rounded to the input's dtype, times the weight), "one plus" (Gemma: times 1 + weight in fp32) or
"fp32" (OLMo 2 and 3: times the weight in fp32). The runtime tests hold each family's fused forward to the
module's outputs.
"""
import torch

from fastalign.ops.rms_norm import WEIGHT_RULES
from fastalign.runtime.module_hooks import runs_more_than_its_forward

KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)   # what the kernels compute in fp32 and round to


class FusedRMSNorm:
    """A module's RMSNorm as one kernel (with the residual add and the norm before it too: add_then_norm); a call the
    kernel does not fit (another width or device, a strided last dimension, float64) goes to the module."""

    def __init__(self, module, eps, rule):
        from fastalign.kernels.rms_norm import forward, rms_norm_after_add
        self.module, self.eps, self.rule = module, eps, WEIGHT_RULES[rule]
        self._norm, self._after_add = forward, rms_norm_after_add

    def _fits(self, x):
        """Whether the kernel computes the module's output for x: under "rounded" only where x has the weight's dtype
        (the kernel's output takes x's, the module's the wider of the two: bf16 embeddings into an fp32 norm)."""
        weight = self.module.weight
        return (x.shape[-1] == weight.shape[0] and x.device == weight.device and x.stride(-1) == 1
                and x.dtype in KERNEL_DTYPES and (x.dtype == weight.dtype or not self.rule["round_before_weight"]))

    def __call__(self, x):
        if not self._fits(x):
            return self.module(x)
        return self._norm(x, self.module.weight, self.eps, **self.rule)


def add_then_norm(norm, h, y, y_norm=None):
    """(h + y', norm(h + y')) with y' = y_norm(y), or y itself where y_norm is None: the residual stream after a
    sublayer's output y (normalised first where the family normalises a sublayer's output: the Gemmas', OLMo's), and
    the next sublayer's input (the stream itself where norm is None: OLMo's). norm and y_norm are FusedRMSNorm, all of
    it one kernel where that fits, or modules, or None."""
    norms = [n for n in (norm, y_norm) if n is not None]
    if norms and all(isinstance(n, FusedRMSNorm) and n._fits(h) and n._fits(y) and n.rule == norms[0].rule
                     for n in norms) and h.shape == y.shape and h.dtype == y.dtype:
        weight, eps = (None, None) if norm is None else (norm.module.weight, norm.eps)
        y_weight, y_eps = (None, None) if y_norm is None else (y_norm.module.weight, y_norm.eps)
        return norms[0]._after_add(h, y, weight, eps, **norms[0].rule, y_weight=y_weight, y_eps=y_eps)
    total = h + (y if y_norm is None else y_norm(y))
    return total, total if norm is None else norm(total)


def rms_norm_eps(module):
    """The eps of `module` where it is an RMSNorm that fastalign's kernels can stand in for (a type named *RMSNorm,
    without hooks (accelerate's offloading, a user's), with a 1-D weight and a float eps, variance_epsilon or eps),
    else None."""
    weight = getattr(module, "weight", None)
    eps = getattr(module, "variance_epsilon", getattr(module, "eps", None))
    if (not type(module).__name__.endswith("RMSNorm") or runs_more_than_its_forward(module)
            or not isinstance(weight, torch.Tensor) or weight.dim() != 1 or not isinstance(eps, float)):
        return None
    return eps


def fused_rms_norm(module, rule, dtype):
    """FusedRMSNorm for `module`, or the module itself where it is not an RMSNorm (rms_norm_eps) that applies its
    weight by `rule`, or under "rounded" keeps its weight in another dtype than the model's `dtype` (its output would
    take the weight's)."""
    if module is None:
        return None
    eps = rms_norm_eps(module)
    if eps is None or rule not in WEIGHT_RULES or (rule == "rounded" and module.weight.dtype != dtype):
        return module
    return FusedRMSNorm(module, eps, rule)
