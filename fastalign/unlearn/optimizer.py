"""The trainer's AdamW: Kahan-compensated for bf16 weights, fused into one kernel per step on CUDA.

Weights trained in bf16 (`precision="bf16"` without LoRA) take fastalign.KahanAdamW: at the SPEC's learning rate (2e-6)
an update is a small fraction of a bf16 weight's last place, and torch's AdamW, which rounds each updated weight to
bf16, would leave nearly all of them unchanged; KahanAdamW keeps what the rounding lost (2 bytes a weight more) and
steps each parameter in one Triton kernel on CUDA. Other weights (fp32, and LoRA's adapters) take torch's AdamW,
fused where its parameters are CUDA tensors that FSDP does not shard: torch's default on CUDA (foreach) allocates the
square roots of the second moments for all parameters at once, a model's size of memory at the optimizer step
(2.8 GiB for a 1.5B model in bf16), which becomes the step's peak once the activations are small (packed rows,
fused_layers), and launches a dozen kernels per group of tensors; the fused implementation updates each parameter in
one kernel without that buffer. Elsewhere (CPU, FSDP's sharded parameters) torch's default stays.
"""
from __future__ import annotations

import torch

from fastalign.optim import KahanAdamW


def uses_fused_adamw(params, sharded: bool = False) -> bool:
    """Whether adamw() fuses torch's step for `params`: all on CUDA, and not sharded by FSDP."""
    return not sharded and bool(params) and all(p.device.type == "cuda" for p in params)


def adamw(params, *, lr: float, weight_decay: float = 0.01, sharded: bool = False) -> torch.optim.Optimizer:
    """The AdamW that trains `params` (a list): KahanAdamW where one of them is bf16, else torch's, fused where
    uses_fused_adamw says so."""
    if any(p.dtype == torch.bfloat16 for p in params):
        return KahanAdamW(params, lr=lr, weight_decay=weight_decay)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay,
                             fused=True if uses_fused_adamw(params, sharded) else None)
