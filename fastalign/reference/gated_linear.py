"""Slow, obviously correct float64 versions of fastalign.gated_activation and fastalign.gated_linear, for tests: a
gated MLP's product and its down projection written out from the activations' definitions, differentiated by
autograd."""
import math

import torch


def gated_activation(gate, up, *, activation="silu"):
    """float64 act(gate) * up, act SiLU or the tanh approximation of GELU."""
    x = gate.double()
    if activation == "silu":
        activated = x * torch.sigmoid(x)
    else:
        activated = 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))
    return activated * up.double()


def gated_linear(gate, up, weight, bias=None, *, activation="silu"):
    """float64 (act(gate) * up) @ weight.T + bias."""
    out = gated_activation(gate, up, activation=activation) @ weight.double().t()
    return out if bias is None else out + bias.double()
