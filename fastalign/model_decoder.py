"""The module of a Hugging Face causal LM that turns input ids into its last hidden states (the decoder: embeddings,
layers, final norm), read the same way by the runtime and the unlearning losses."""
import inspect
import weakref

import torch


def decoder_of(model) -> torch.nn.Module:
    """The first of model.get_decoder(), model.model and model.base_model that is a module of its own whose forward
    takes input_ids. get_decoder() guesses by attribute name and may return what is no decoder: ModernBERT's decoder
    model gets its vocabulary projection (an nn.Linear named `decoder`), Mllama's text model gets itself."""
    candidates = (model.get_decoder(), getattr(model, "model", None), getattr(model, "base_model", None))
    for candidate in candidates:
        if isinstance(candidate, torch.nn.Module) and candidate is not model and _takes_input_ids(candidate):
            return candidate
    raise TypeError(f"{type(model).__name__}: cannot find the decoder that produces its final hidden states (none of "
                    "get_decoder(), .model and .base_model is a module of its own whose forward takes input_ids)")


def prompt_learning_adapter(model) -> str | None:
    """The config type of `model`'s active PEFT adapter (PromptTuningConfig, PrefixTuningConfig, ...) where it is a
    prompt-learning one, else None: its virtual tokens (or their K/V) come before every sequence in the PEFT model's
    forward alone, so a decoder run on the inputs does not see them. None too inside PEFT's `disable_adapter()`,
    which sets the base model's forward in place of the PEFT model's: then no forward puts them anywhere."""
    config = getattr(model, "active_peft_config", None)
    base = getattr(model, "base_model", None)
    if config is None or not getattr(config, "is_prompt_learning", True) or \
            (base is not None and model.forward == base.forward):
        return None
    return type(config).__name__


def forward_parameters(module) -> dict:
    """The parameters of module.forward by name ({} where its signature cannot be read)."""
    try:
        return dict(inspect.signature(module.forward).parameters)
    except (TypeError, ValueError):
        return {}


def _takes_input_ids(module) -> bool:
    """Whether module.forward takes an `input_ids` argument (by name, or among its **kwargs). Read once per forward
    function (the class's, or one set on the module), not at every call: decoder_of runs at every loss call, and
    inspect.signature was most of its host time."""
    if torch.compiler.is_compiling():   # (dynamo traces the weak dictionary's lookups badly: read it directly)
        return _reads_input_ids(module)
    forward = module.forward
    function = getattr(forward, "__func__", forward)
    try:
        return _TAKES_INPUT_IDS[function]
    except KeyError:
        pass
    except TypeError:   # a forward that cannot be weakly referenced
        return _reads_input_ids(module)
    takes = _TAKES_INPUT_IDS[function] = _reads_input_ids(module)
    return takes


def _reads_input_ids(module) -> bool:
    """_takes_input_ids, read from the signature of module.forward."""
    parameters = forward_parameters(module)
    return "input_ids" in parameters or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())


_TAKES_INPUT_IDS = weakref.WeakKeyDictionary()   # forward function -> _takes_input_ids
