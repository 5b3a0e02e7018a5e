"""The autocast that accelerate's prepare put on a model's forward (mixed precision: a Trainer's bf16=True), for code
that runs the model's parts itself (the fused losses run its decoder, not its forward, so the wrapper never runs)."""
from __future__ import annotations

import contextlib
import inspect
import types
import warnings

import torch

from fastalign.base_model import base_causal_lm
from fastalign.ops.compiler_disable import compiler_disable


class PreparedAutocast:
    """`PreparedAutocast(model)()` is a context that runs as the prepared forward of `model` (or of the transformers
    model under it) runs: under a torch.autocast of the settings of the one accelerate's prepare wrapped it in (found
    through the wrapper's __func__ / __wrapped__ / closure, down to the forward it kept as _original_forward), where no
    autocast is on for its device already; a null context for a forward no one wrapped. A wrapper whose autocast
    cannot be found warns, once, and leaves the precision as it is.

    The settings are found once per wrapper, here (a model prepared already) or at the first call that meets it, and
    kept with it: a compiled caller reads them and builds its autocast in its graph, where dynamo cannot trace the
    search nor copy the autocast found (a model prepared after the loss was made costs its first compiled call a graph
    break, once: under fullgraph=True, call the loss once uncompiled, or make it after the prepare)."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.warned = False
        self.found = None   # (the prepared forward last met, its autocast's settings: torch.autocast's keywords)
        self()   # (a model prepared already: its settings found now, before any compiled call)

    def __call__(self) -> contextlib.AbstractContextManager:
        models = dict.fromkeys((self.model, base_causal_lm(self.model)))   # (one, where they are the same)
        prepared = [model for model in models if "_original_forward" in vars(model)]
        if not prepared:
            return contextlib.nullcontext()
        if self.found is None or self.found[0] is not vars(prepared[0])["forward"]:
            self._find(prepared[0])
        settings = self.found[1]
        if settings is None or torch.is_autocast_enabled(settings["device_type"]):   # (the loss prepared too, or
            return contextlib.nullcontext()                                          # accelerator.autocast())
        return torch.autocast(**settings)   # (a new one: an autocast keeps the state it restores on itself)

    @compiler_disable(reason="PreparedAutocast finds the autocast of a model that accelerate's prepare wrapped outside "
                             "the compiled graph (one graph break, once per wrapper): for fullgraph=True, call the "
                             "loss once uncompiled after the prepare, or make it after the prepare")
    def _find(self, model: torch.nn.Module) -> None:
        """Keeps the settings of the autocast around `model`'s prepared forward, None (and a warning) if none."""
        autocast = _autocast_around(vars(model)["forward"], vars(model)["_original_forward"])
        if autocast is None:
            self._warn_of_a_wrapper(model)
        settings = None if autocast is None else {"device_type": autocast.device, "dtype": autocast.fast_dtype,
                                                  "enabled": autocast._enabled,
                                                  "cache_enabled": autocast._cache_enabled}
        self.found = (vars(model)["forward"], settings)

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
