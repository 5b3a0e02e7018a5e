"""Optimizers for training weights in 16 bits: KahanAdamW, AdamW whose bf16 weights keep updates far below their
last place."""
from .kahan_adamw import KahanAdamW

__all__ = ["KahanAdamW"]
