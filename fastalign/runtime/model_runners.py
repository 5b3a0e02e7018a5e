"""Which model runner a TreeRunner computes with: the fastest whose checks pass, tried in order.

PagedLlama for a family that layer_layouts names; else PagedHF where its probe passes (both batched on the paged
pool), with a warning where the model is of such a family (a user's hooks on its layers, say); else, unless the user
refuses it, the first fallback in `_FALLBACKS` whose probes pass, with a warning that gives every faster runner's
reason for refusing the model, each said once, so that a user whose search runs slowly learns why. The probes, like
PagedHF's, size the pool: they run without autocast. They run the model's own forward as on an idle model, after
the forwards that other threads' runners of it are running (attention_routing.unrouted).
"""
import importlib
import warnings
from typing import NamedTuple, Optional

from fastalign.ops.backend import autocast_off
from fastalign.runtime.llama import LLAMA_FAMILY, PagedLlama, llama_family_problem


class _Fallback(NamedTuple):
    """A runner on Hugging Face's own forward: where it is (imported only when it is tried), how the warning names
    its refusal ("nor ...: reason"), how the model runs on it and what that costs."""
    module: str
    name: str
    refused_as: Optional[str]
    runs: str
    cost: str

    def make(self, model, device):
        return getattr(importlib.import_module(f"fastalign.runtime.{self.module}"), self.name)(model, device)


_FALLBACKS = (
    _Fallback("hf_cache", "HFCacheModel", "nor on Hugging Face's cache",
              "on Hugging Face's own cache instead, rows that run alike batched", "slower"),
    _Fallback("hf_state_cache", "HFStateCacheModel", "nor with its recurrent states kept",
              "on Hugging Face's own cache with each span's recurrent state kept, rows that run alike batched",
              "slower"),
    _Fallback("hf_recompute", "HFRecomputeModel", None,
              "by computing each row's whole sequence again at every call, with no cache", "much slower"),
)


def choose_model_runner(model, layered, backend, device, fallback):
    """The runner for `model` (`layered`: the transformers model whose layers the paged runners call, see
    tree_runner._adapters_in_layers; `backend`: their attention's, resolved, "triton" or "torch"); a ValueError
    giving every runner's reason where none takes it, or where only a fallback would and `fallback` is False."""
    problem = llama_family_problem(layered)
    if problem is None:
        return PagedLlama(layered, backend, device)
    # a model of a family that PagedLlama runs is told why it does not (a user's hooks on its layers, say)
    said = [f"{type(layered).__name__} cannot run on the paged Llama path: {problem}"] \
        if getattr(getattr(layered, "config", None), "model_type", None) in LLAMA_FAMILY else []
    # transformers' attention interface: imported for such a model
    from fastalign.runtime.attention_routing import attention_configs, unrouted
    from fastalign.runtime.hf_paged import PagedHF
    with autocast_off(device), unrouted(attention_configs(model)):
        try:
            runner = PagedHF(layered, backend, device)
        except ValueError as unfit:
            paged_reason = str(unfit).removeprefix("model: ")
        else:
            if said:
                warnings.warn(f"TreeRunner: {said[0]}; it runs on PagedHF, its own forward on the paged pool "
                              "(slower)", stacklevel=3)
            return runner
        if not fallback:
            raise ValueError(f"model: unsupported architecture for the paged runners ({problem}; {paged_reason}) and "
                             "fallback=False; pass fallback=True to run it on Hugging Face's cache, or by recomputing "
                             "whole sequences where that cannot hold its state") from None
        said, refusals = said + [paged_reason], []
        for candidate in _FALLBACKS:
            try:
                runner = candidate.make(model, device)
            except ValueError as refused:
                refusals.append(str(refused))
                reason = getattr(refused, "reason", None)
                if reason and getattr(refused, "holds_states", True) and not any(reason in s for s in said):
                    said.append(f"{candidate.refused_as}: {reason}")
                continue
            warnings.warn(f"TreeRunner: {'; '.join(said)}; it runs {candidate.runs} ({candidate.cost}; "
                          "fallback=False refuses such a model)", stacklevel=3)
            return runner
    raise ValueError("; ".join([refusals[0]] + [r.removeprefix("model: ") for r in refusals[1:]]))
