"""The trainer's AdamW, fused into one kernel per step where its parameters are CUDA tensors.

torch's default AdamW on CUDA (foreach) allocates the square roots of the second moments for all parameters at once,
a model's size of memory at the optimizer step (2.8 GiB for a 1.5B model in bf16), which becomes the step's peak once
the activations are small (packed rows, fused_layers), and launches a dozen kernels per group of tensors. The fused
implementation updates each parameter in one kernel without that buffer. Elsewhere (CPU, FSDP's sharded parameters)
torch's default stays.
"""
from __future__ import annotations

import torch


def uses_fused_adamw(params, sharded: bool = False) -> bool:
    """Whether adamw() fuses the step for `params`: all on CUDA, and not sharded by FSDP."""
    return not sharded and bool(params) and all(p.device.type == "cuda" for p in params)


def adamw(params, *, lr: float, weight_decay: float = 0.01, sharded: bool = False) -> torch.optim.AdamW:
    """torch's AdamW over `params` (a list), fused where uses_fused_adamw says so."""
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay,
                             fused=True if uses_fused_adamw(params, sharded) else None)
