"""The autocast that accelerate's prepare put on a model's forward (mixed precision: a Trainer's bf16=True), for code
that runs the model's parts itself (the fused losses run its decoder, not its forward, so the wrapper never runs)."""
from __future__ import annotations

import contextlib
import copy
import inspect
import types
import warnings

import torch

from fastalign.base_model import base_causal_lm


class PreparedAutocast:
    """`PreparedAutocast(model)()` is a context that runs as the prepared forward of `model` (or of the transformers
    model under it) runs: under a copy of the torch.autocast that accelerate's prepare wrapped it in (found through
    the wrapper's __func__ / __wrapped__ / closure, down to the forward it kept as _original_forward), where no
    autocast is on for its device already; a null context for a forward no one wrapped. A wrapper whose autocast
    cannot be found warns, once, and leaves the precision as it is."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.warned = False

    def __call__(self) -> contextlib.AbstractContextManager:
        models = dict.fromkeys((self.model, base_causal_lm(self.model)))   # (one, where they are the same)
        prepared = [model for model in models if "_original_forward" in vars(model)]
        if not prepared:
            return contextlib.nullcontext()
        autocast = _autocast_around(vars(prepared[0])["forward"], vars(prepared[0])["_original_forward"])
        if autocast is None:
            self._warn_of_a_wrapper(prepared[0])
            return contextlib.nullcontext()
        if torch.is_autocast_enabled(autocast.device):   # (the loss prepared too, or accelerator.autocast())
            return contextlib.nullcontext()
        return copy.copy(autocast)   # (an autocast keeps the state it restores on itself: a copy, not the same one)

    def _warn_of_a_wrapper(self, model: torch.nn.Module) -> None:
        if not self.warned:
            self.warned = True
            warnings.warn(f"{type(model).__name__}: accelerate's prepare wrapped this model's forward (mixed "
                          "precision), but its autocast was not found, so the loss runs the decoder in the weights' "
                          "own precision: call the loss under accelerator.autocast(), or prepare the loss module too "
                          "(accelerator.prepare(loss))")


def _autocast_around(forward, original) -> torch.autocast | None:
    """The torch.autocast in `forward`'s chain of wrappers (bound methods' __func__, decorators' __wrapped__ and
    closures) above `original`, the forward they wrap; None if there is none."""
    stops = {id(original), id(getattr(original, "__func__", None))}
    seen, pending = set(), [forward]
    while pending:
        wrapper = pending.pop()
        if isinstance(wrapper, torch.autocast):
            return wrapper
        if id(wrapper) in seen or id(wrapper) in stops or isinstance(wrapper, torch.nn.Module):
            continue
        seen.add(id(wrapper))
        enclosed = inspect.getclosurevars(wrapper).nonlocals if isinstance(wrapper, types.FunctionType) else {}
        pending += [getattr(wrapper, "__func__", None), getattr(wrapper, "__wrapped__", None), *enclosed.values()]
        pending = [item for item in pending if callable(item)]
    return None
