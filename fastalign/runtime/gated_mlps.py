"""The dense MLPs of a paged Llama-family forward, down(act(gate(x)) * up(x)): on the Triton backend the activation and
the product run as one kernel (kernels/gated_activation.py) between the model's own projection modules, instead of
two elementwise launches per layer; elsewhere, for a sparse mixture of experts, and for any MLP whose activation the
kernel does not compute, the module itself.

The kernel computes SiLU (Llama's SwiGLU, Mistral's, Qwen's, OLMo's) and the tanh approximation of GELU (the Gemmas'
GeGLU), as torch's `silu` and `gelu(approximate="tanh")` do, which the activation modules of Hugging Face and torch
call. The runtime tests hold the fused forward to the module's outputs.
"""
import functools

import torch

from fastalign.runtime.module_hooks import runs_more_than_its_forward

_HF_ACTIVATIONS = "transformers.activations"


def kernel_activation(act):
    """"silu" or "gelu_tanh" where the activation module `act` computes what the kernel does (torch's SiLU, GELU with
    approximate="tanh", or Hugging Face's modules calling them), else None (another function, a hook on it, or a
    forward of its own)."""
    if not isinstance(act, torch.nn.Module) or runs_more_than_its_forward(act):
        return None
    kind, module = type(act).__name__, type(act).__module__
    if isinstance(act, torch.nn.SiLU) or (kind == "SiLUActivation" and module == _HF_ACTIVATIONS):
        return "silu"
    if isinstance(act, torch.nn.GELU):
        return "gelu_tanh" if act.approximate == "tanh" else None
    inner = getattr(act, "act", None)   # Hugging Face's GELUTanh: a partial of gelu, or its own 16-bit python ops
    if (kind == "GELUTanh" and module == _HF_ACTIVATIONS and isinstance(inner, functools.partial)
            and inner.func is torch.nn.functional.gelu and inner.keywords == {"approximate": "tanh"}):
        return "gelu_tanh"
    return None


class FusedGatedMLP:
    """A dense gated MLP module whose activation and product run as one kernel; its projections run as the modules
    they are (a LoRA adapter's too). A call whose gate and up the kernel does not take (another dtype or device, a
    strided last dimension) gets the module's activation and torch's product."""

    def __init__(self, module, activation):
        from fastalign.kernels.gated_activation import forward
        self.module, self.tanh_gelu = module, activation == "gelu_tanh"
        self._kernel = forward

    def __call__(self, x):
        """The MLP's output for x [T, H]."""
        mlp = self.module
        gate, up = mlp.gate_proj(x), mlp.up_proj(x)
        if (gate.shape == up.shape and gate.dtype == up.dtype and gate.device == up.device
                and gate.stride(-1) == 1 and up.stride(-1) == 1):
            hidden = self._kernel(gate, up, tanh_gelu=self.tanh_gelu)
        else:
            hidden = mlp.act_fn(gate) * up
        return mlp.down_proj(hidden)


def gated_mlp_activation(module):
    """"silu" or "gelu_tanh" for a dense gated MLP (a type named *MLP with gate_proj, up_proj, down_proj and act_fn,
    computing down(act(gate(x)) * up(x))) whose activation the kernel computes, else None: another module, a sparse
    mixture of experts, one with hooks, or another activation."""
    if not type(module).__name__.endswith("MLP") or runs_more_than_its_forward(module):
        return None
    if not all(isinstance(getattr(module, name, None), torch.nn.Module)
               for name in ("gate_proj", "up_proj", "down_proj")):
        return None
    return kernel_activation(getattr(module, "act_fn", None))


def fused_gated_mlp(module, backend):
    """FusedGatedMLP for the layer's `mlp` on the "triton" backend where gated_mlp_activation finds one, or None (the
    module is called as it is)."""
    activation = gated_mlp_activation(module) if backend == "triton" else None
    return None if activation is None else FusedGatedMLP(module, activation)
