"""How the unlearning trainer writes model/ and adapter/: save_pretrained, made to succeed on the models it meets at
the end of a run (a generation config transformers' strict checks refuse, a model FSDP left without parameters), to
write a tied weight once from FSDP's gathered state, and to name the adapter's base model only where the name holds
on another machine."""
from __future__ import annotations

import copy
import os
from contextlib import contextmanager

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


def save_adapter(model, directory: str) -> None:
    """PEFT's save_pretrained of the PeftModel `model`, naming its base model (adapter_config.json's
    base_model_name_or_path, the model card's base_model and tag) by a Hub id only, else not at all (null). PEFT
    records what from_pretrained was given: for a local model its path as typed, relative to where the run started or
    absolute on the training machine, which AutoPeftModelForCausalLM resolves from the loader's working directory,
    and elsewhere looks up on the Hub. The adapter loads anywhere on a base given to
    PeftModel.from_pretrained(base, directory)."""
    base = model.get_base_model()
    with _without_local_paths([*((config, "base_model_name_or_path") for config in model.peft_config.values()),
                               (base, "name_or_path"), (base.config, "_name_or_path")]):
        model.save_pretrained(directory)


@contextmanager
def _without_local_paths(names):
    """Each (object, attribute) of `names` whose value is not a Hub id deleted from the object (a PEFT config then
    reads its field's default, None) while the block runs; set as it was after."""
    given = [(holder, attribute, vars(holder)[attribute]) for holder, attribute in names if attribute in vars(holder)]
    hidden = [(holder, attribute, value) for holder, attribute, value in given if not _is_hub_id(value)]
    for holder, attribute, _ in hidden:
        delattr(holder, attribute)
    try:
        yield
    finally:
        for holder, attribute, value in hidden:
            setattr(holder, attribute, value)


def _is_hub_id(name) -> bool:
    """Whether `name` reads as a Hub repository id ("org/model") and names no local file or directory from the working
    directory, as transformers' from_pretrained reads it too."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id
    if not isinstance(name, str) or not name or os.path.isabs(name) or os.path.exists(name):
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


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
