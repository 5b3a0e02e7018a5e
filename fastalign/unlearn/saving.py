"""How the unlearning trainer writes model/: save_pretrained, made to succeed on the models it meets at the end of
a run (a generation config transformers' strict checks refuse, a model FSDP left without parameters), and to write
a tied weight once from FSDP's gathered state."""
from __future__ import annotations

import copy
import os

import torch


def save_model(model, directory: str, state_dict) -> None:
    """model.save_pretrained, its generation config written as it is. transformers refuses to save one that fails
    its strict checks (sampling flags such as temperature set without do_sample=True): 5.17 one as loaded, as
    published configs often are (Vicuna's), later releases one changed in memory; the run would fail at its end
    with no model saved."""
    from transformers import GenerationConfig
    generation = getattr(model, "generation_config", None)
    state_dict = _without_tied_copies(model, state_dict)
    model = _savable(model, state_dict)
    if generation is None:  # a model that does not generate saves none
        model.save_pretrained(directory, state_dict=state_dict)
        return
    model.generation_config = GenerationConfig()
    try:
        model.save_pretrained(directory, state_dict=state_dict)
    finally:
        model.generation_config = generation
    path = os.path.join(directory, "generation_config.json")
    if os.path.isfile(path):
        generation.to_json_file(path, keys_to_pop=["compile_config"])


def _savable(model, state_dict):
    """`model`, or where it has no parameter left, an empty (meta) model of its class and configuration in the dtype
    of `state_dict` (its full weights). FSDP version 1 without use_orig_params flattens a unit's weights into a
    parameter of its own: a model it wrapped whole (no auto wrap) keeps none, and save_pretrained, which reads the
    dtype it records from the model's parameters, failed (StopIteration) at the end of the run."""
    if state_dict is None or next(model.parameters(), None) is not None:
        return model
    dtype = next(t.dtype for t in state_dict.values() if t.is_floating_point())
    with torch.device("meta"):
        return type(model)(copy.deepcopy(model.config)).to(dtype)


def _without_tied_copies(model, state_dict):
    """`state_dict` (None stays None) without each weight that `model` ties to another (lm_head.weight to the
    embeddings) where it holds its source's values. FSDP's gathered full state gives the two as tensors of their own,
    which save_pretrained (it finds a tie by shared storage) wrote twice: 1 GB more for Llama-3.2-1B in fp32."""
    if state_dict is None:
        return None
    tied = getattr(model, "all_tied_weights_keys", None) or {}
    return {name: t for name, t in state_dict.items()
            if not (name in tied and tied[name] in state_dict and torch.equal(t, state_dict[tied[name]]))}
