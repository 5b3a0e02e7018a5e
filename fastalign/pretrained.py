"""How fastalign's commands load a pretrained model: with transformers' Hub kernels off unless the user asks.

transformers >= 5.25 turns its Hub kernels on by default (it depends on the `kernels` package from then on):
from_pretrained swaps layers (RMSNorm, activations, rotary embeddings) for code that it downloads from the Hub for
the model's device, and swaps again whenever the model's mode changes on another device; a model our commands load
on the CPU and train on a GPU would download kernels at its first model.train(), fail where there is no network,
and compute with code that no test of ours ran. Setting USE_HUB_KERNELS to a true value (transformers' own switch)
turns them on for our commands too.
"""
import os

TRUE_VALUES = {"1", "ON", "YES", "TRUE"}   # what transformers reads as true in USE_HUB_KERNELS


def hub_kernels_requested() -> bool:
    """Whether the environment sets USE_HUB_KERNELS to a true value (unset: transformers' default, not a request)."""
    return os.environ.get("USE_HUB_KERNELS", "").upper() in TRUE_VALUES


def load_pretrained(model_class, path, **kwargs):
    """`model_class.from_pretrained(path, **kwargs)` with transformers' Hub kernels on only when requested."""
    return model_class.from_pretrained(path, use_kernels=hub_kernels_requested(), **kwargs)
