"""fastalign.rms_norm: the RMSNorm of Hugging Face's decoder layers for training, one kernel each way, saving only its
input for the backward.

A Hugging Face RMSNorm runs some eight elementwise kernels forward and more backward, and keeps an fp32 copy of its
input and the rounded normalised rows (6 bytes a value of a 16-bit input) for the backward; this op keeps the input
(2), recomputes the rest in its backward kernel (kernels/rms_norm.py) and applies the weight as each family's module
does (`rule`).
"""
from typing import Literal

import torch

from .backend import (Backend, apply_on, autocast_off, refuse_fake_tensors_on_triton, require_triton_dtype,
                      select_backend)
from .checks import check_tensor, is_finite_real, token_dims, FLOAT_DTYPES
from .func_transforms import FusedOpFunction, LauncherGradients

# How a family's module applies its weight to the normalised rows (fp32), and the launchers' arguments for it:
# "rounded" (Llama, Mistral, Qwen, the MoEs): rounded to the input's dtype, then times the weight, in that dtype;
# "one plus" (the Gemmas): times 1 + weight in fp32, rounded once; "fp32" (OLMo 2 and 3): times the weight in fp32.
Rule = Literal["rounded", "one plus", "fp32"]
WEIGHT_RULES = {"rounded": dict(weight_offset=0.0, round_before_weight=True),
                "one plus": dict(weight_offset=1.0, round_before_weight=False),
                "fp32": dict(weight_offset=0.0, round_before_weight=False)}


class RMSNormFunction(FusedOpFunction):
    """The RMSNorm of x's rows by weight, saving x and weight; gradients flow to both. In torch.func's form; its
    backward runs as LauncherGradients (see func_transforms)."""

    op = "rms_norm"

    @staticmethod
    def forward(x, weight, eps, rule, launcher):
        with autocast_off(x.device):
            return launcher.forward(x, weight, eps, **WEIGHT_RULES[rule])

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, eps, rule, launcher = inputs
        ctx.save_for_backward(x, weight)
        ctx.eps, ctx.rule, ctx.launcher = eps, rule, launcher

    @staticmethod
    def backward(ctx, grad_out):
        return apply_on(ctx.launcher, LauncherGradients, RMSNormFunction.op, _gradients, *ctx.saved_tensors, grad_out,
                        ctx.eps, ctx.rule, ctx.launcher, ctx.needs_input_grad[1]) + (None,) * 3


def _gradients(x, weight, grad_out, eps, rule, launcher, need_weight):
    """(grad_x, grad_weight) of RMSNormFunction, grad_weight None unless need_weight."""
    with autocast_off(x.device):
        grad_x, grad_weight = launcher.backward(x, weight, grad_out, eps, **WEIGHT_RULES[rule])
    return grad_x, grad_weight if need_weight else None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, *, rule: Rule = "rounded",
             backend: Backend = "auto") -> torch.Tensor:
    """RMSNorm of x [..., D] over its last dimension with weight [D], as the Hugging Face module of `rule`'s family
    computes it (WEIGHT_RULES: "rounded" needs weight in x's dtype, as the module's output would otherwise take the
    weight's), in x's shape and dtype. Only x and weight are kept for the backward. Gradients flow to x and weight
    (first order: a second derivative raises, naming the op). torch.func's grad, vjp, jacrev and vmap (once per
    sample) work; forward mode raises. Under torch.compile the Triton backend runs outside the graph (graph breaks),
    the torch backend is traced. An enclosing autocast does not apply inside (the modules compute in fp32 under it
    too). On fake tensors (FakeTensorMode: torch.export, FLOP counters) the torch backend gives the output's shape,
    the Triton one raises a ValueError.
    backend: "auto" (Triton on CUDA, torch elsewhere), "triton" or "torch".
    """
    token_dims("x", x)
    check_tensor("x", x, ndim=None, dtypes=FLOAT_DTYPES)
    check_tensor("weight", weight, ndim=1, dtypes=FLOAT_DTYPES)
    if weight.device != x.device:
        raise ValueError(f"weight must be on x's device ({x.device}), got {weight.device}")
    if weight.shape[0] != x.shape[-1]:
        raise ValueError(f"weight must be [D] with D = x.shape[-1] = {x.shape[-1]}, got shape {tuple(weight.shape)}")
    if rule not in WEIGHT_RULES:
        raise ValueError(f"rule must be one of {tuple(WEIGHT_RULES)}, got {rule!r}")
    if rule == "rounded" and weight.dtype != x.dtype:
        raise TypeError(f"weight must have x's dtype ({x.dtype}) under rule 'rounded', got {weight.dtype}")
    # (not in dynamo's trace, as refuse_fake_tensors: compiled with dynamic=True, a module's float eps is a SymFloat,
    # which math.isfinite cannot take there; eager calls check it)
    if not torch.compiler.is_dynamo_compiling() and not (is_finite_real(eps) and eps >= 0):
        raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")
    launcher = select_backend("rms_norm", backend, x.device, x.dtype)
    require_triton_dtype(launcher, "x", x)
    refuse_fake_tensors_on_triton(launcher, "rms_norm", x, weight)
    return apply_on(launcher, RMSNormFunction, x.contiguous(), weight.contiguous(), float(eps), rule, launcher)
