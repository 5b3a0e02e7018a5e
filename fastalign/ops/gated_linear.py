"""fastalign.gated_linear: a gated MLP's down projection, linear(act(gate) * up), that saves gate and up for the
backward but not the product, which it recomputes there; and fastalign.gated_activation, the product alone, saving
gate and up, for a down projection that must be called as the module it is (a LoRA layer).

A Hugging Face gated MLP (Llama's SwiGLU, Gemma's GeGLU) keeps four [tokens x intermediate] tensors per layer for the
backward: gate (the activation's input), act(gate) and up (the product's), and the product (the down projection's
input). gated_linear keeps two, half of the MLP's activation memory and about a third of a decoder layer's;
gated_activation three (its output, the product, is kept by the down projection). Their backward runs one kernel that
gives gate's and up's gradients (and for gated_linear recomputes the product for the weight's gradient;
kernels/gated_activation.py), instead of three elementwise ops, and the forward one instead of two.
"""
from typing import Literal, get_args

import torch
import torch.nn.functional as F

from .backend import (Backend, apply_on, autocast_off, refuse_fake_tensors_on_triton, require_triton_dtype,
                      select_backend)
from .checks import check_tensor, token_dims, FLOAT_DTYPES
from .func_transforms import FusedOpFunction, LauncherGradients

Activation = Literal["silu", "gelu_tanh"]   # the `activation` argument
ACTIVATIONS = get_args(Activation)


class GatedLinearFunction(FusedOpFunction):
    """linear(act(gate) * up, weight, bias), saving gate, up and weight; gradients flow to all four. In torch.func's
    form; its backward runs as LauncherGradients (see func_transforms)."""

    op = "gated_linear"

    @staticmethod
    def forward(gate, up, weight, bias, tanh_gelu, launcher):
        with autocast_off(gate.device):
            return F.linear(launcher.forward(gate, up, tanh_gelu=tanh_gelu), weight, bias)

    @staticmethod
    def setup_context(ctx, inputs, output):
        gate, up, weight, _, tanh_gelu, launcher = inputs
        ctx.save_for_backward(gate, up, weight)
        ctx.tanh_gelu, ctx.launcher = tanh_gelu, launcher

    @staticmethod
    def backward(ctx, grad_out):
        return apply_on(ctx.launcher, LauncherGradients, GatedLinearFunction.op, _gated_linear_gradients,
                        *ctx.saved_tensors, grad_out, ctx.tanh_gelu, ctx.launcher,
                        *ctx.needs_input_grad[:4]) + (None, None)


def _gated_linear_gradients(gate, up, weight, grad_out, tanh_gelu, launcher, need_gate, need_up, need_weight,
                            need_bias):
    """(grad_gate, grad_up, grad_weight, grad_bias) of GatedLinearFunction, each None unless asked for."""
    grad_gate = grad_up = grad_weight = grad_bias = product = None
    grad_rows = grad_out.flatten(0, -2)   # not reshape(-1, O): ambiguous where a width is 0
    with autocast_off(gate.device):
        if need_gate or need_up:
            grad_product = (grad_rows @ weight).view(gate.shape)
            product, grad_gate, grad_up = launcher.backward(gate, up, grad_product, tanh_gelu=tanh_gelu,
                                                            need_out=need_weight)
        elif need_weight:
            product = launcher.forward(gate, up, tanh_gelu=tanh_gelu)
        if need_weight:
            grad_weight = grad_rows.t() @ product.flatten(0, -2)
        if need_bias:
            grad_bias = grad_rows.sum(0)
    return grad_gate if need_gate else None, grad_up if need_up else None, grad_weight, grad_bias


class GatedActivationFunction(FusedOpFunction):
    """act(gate) * up, saving gate and up; gradients flow to both. In torch.func's form, as GatedLinearFunction."""

    op = "gated_activation"

    @staticmethod
    def forward(gate, up, tanh_gelu, launcher):
        with autocast_off(gate.device):
            return launcher.forward(gate, up, tanh_gelu=tanh_gelu)

    @staticmethod
    def setup_context(ctx, inputs, output):
        gate, up, tanh_gelu, launcher = inputs
        ctx.save_for_backward(gate, up)
        ctx.tanh_gelu, ctx.launcher = tanh_gelu, launcher

    @staticmethod
    def backward(ctx, grad_out):
        return apply_on(ctx.launcher, LauncherGradients, GatedActivationFunction.op, _gated_activation_gradients,
                        *ctx.saved_tensors, grad_out, ctx.tanh_gelu, ctx.launcher) + (None, None)


def _gated_activation_gradients(gate, up, grad_out, tanh_gelu, launcher):
    """(grad_gate, grad_up) of GatedActivationFunction."""
    with autocast_off(gate.device):
        return launcher.backward(gate, up, grad_out, tanh_gelu=tanh_gelu, need_out=False)[1:]


def _launcher_of(op, gate, up, activation, backend, others=()):
    """The gated activation's launcher for `op` on gate and up [..., I] (one shape, dtype and device) and the (name,
    tensor) pairs in `others`, which must have their dtype and device too; a clear error naming the argument
    otherwise."""
    token_dims("gate", gate)
    check_tensor("gate", gate, ndim=None, dtypes=FLOAT_DTYPES)
    for name, t in (("up", up), *others):
        if t is None and name == "bias":   # the one optional argument
            continue
        check_tensor(name, t, ndim=None)
        if t.dtype != gate.dtype:
            raise TypeError(f"{name} must have the dtype of gate ({gate.dtype}), got {t.dtype}")
        if t.device != gate.device:
            raise ValueError(f"{name} must be on gate's device ({gate.device}), got {t.device}")
    if up.shape != gate.shape:
        raise ValueError(f"up must have the shape of gate {tuple(gate.shape)}, got {tuple(up.shape)}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    launcher = select_backend("gated_activation", backend, gate.device, gate.dtype)
    require_triton_dtype(launcher, "gate", gate)
    refuse_fake_tensors_on_triton(launcher, op, gate, up, *(t for _, t in others))
    return launcher


def gated_activation(gate: torch.Tensor, up: torch.Tensor, *, activation: Activation = "silu",
                     backend: Backend = "auto") -> torch.Tensor:
    """act(gate) * up for gate, up [..., I] of one shape, floating dtype and device, rounded as torch's two ops round
    it, in that shape and dtype; gate and up are kept for the backward, not act(gate). activation, backend and the
    rest as gated_linear's."""
    launcher = _launcher_of("gated_activation", gate, up, activation, backend)
    return apply_on(launcher, GatedActivationFunction, gate, up, activation == "gelu_tanh", launcher)


def gated_linear(gate: torch.Tensor, up: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
                 activation: Activation = "silu", backend: Backend = "auto") -> torch.Tensor:
    """linear(act(gate) * up, weight, bias) for gate, up [..., I] (one shape), weight [O, I] and bias [O] or None,
    all of one floating dtype and device: a gated MLP's down projection, applied to the outputs of its gate and up
    projections; [..., O] in that dtype. activation: "silu" (torch's silu: Llama, Mistral, Qwen, OLMo) or "gelu_tanh"
    (torch's gelu(approximate="tanh"): the Gemmas). The product act(gate) * up, rounded as torch's two ops round
    it, is not kept for the backward: the backward recomputes it. Gradients flow to gate, up, weight and bias (first
    order: a second derivative raises, naming the op). torch.func's grad, vjp, jacrev and vmap (once per sample)
    work; forward mode raises. Under torch.compile the Triton backend runs outside the graph (graph breaks), the torch
    backend is traced.
    An enclosing autocast does not apply inside (cast the inputs to follow it). On fake tensors (FakeTensorMode:
    torch.export, FLOP counters) the torch backend gives the output's shape, the Triton one raises a ValueError.
    backend: "auto" (Triton on CUDA, torch's own operators elsewhere, which give the numbers of the unfused ops
    and their autograd exactly), "triton" or "torch".
    """
    launcher = _launcher_of("gated_linear", gate, up, activation, backend, (("weight", weight), ("bias", bias)))
    if weight.dim() != 2 or weight.shape[1] != gate.shape[-1]:
        raise ValueError(f"weight must be [O, I] with I = gate.shape[-1] = {gate.shape[-1]}, got shape "
                         f"{tuple(weight.shape)}")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"bias must be [{weight.shape[0]}] (one entry per row of weight), got shape "
                         f"{tuple(bias.shape)}")
    return apply_on(launcher, GatedLinearFunction, gate, up, weight, bias, activation == "gelu_tanh", launcher)
