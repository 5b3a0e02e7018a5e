"""Torch launchers of the gated activation act(gate) * up (same contract as fastalign.kernels.gated_activation):
torch's own operators and their autograd formulas (aten's silu_backward and gelu_backward), so that on this path
fastalign.ops.gated_linear gives the very numbers of the module it stands for, forward and backward."""
import torch
import torch.nn.functional as F


def _activate(gate, tanh_gelu):
    return F.gelu(gate, approximate="tanh") if tanh_gelu else F.silu(gate)


def forward(gate, up, *, tanh_gelu=False):
    """act(gate) * up, rounded as torch's two ops round."""
    return _activate(gate, tanh_gelu) * up


def backward(gate, up, grad_out, *, tanh_gelu=False, need_out=True):
    """(out, grad_gate, grad_up) of out = act(gate) * up given grad_out (out None unless need_out), as torch's
    autograd of the two ops computes them."""
    activated = _activate(gate, tanh_gelu)
    grad_out = grad_out.to(gate.dtype)
    grad_activated = grad_out * up
    grad_gate = (torch.ops.aten.gelu_backward(grad_activated, gate, approximate="tanh") if tanh_gelu
                 else torch.ops.aten.silu_backward(grad_activated, gate))
    return activated * up if need_out else None, grad_gate, grad_out * activated
