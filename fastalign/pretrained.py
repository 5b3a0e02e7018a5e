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
# files one of which a saved tokenizer holds (fast, SentencePiece, BPE/WordPiece vocabularies, tiktoken)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "spiece.model", "vocab.json",
                   "vocab.txt", "tiktoken.model")


def hub_kernels_requested() -> bool:
    """Whether the environment sets USE_HUB_KERNELS to a true value (unset: transformers' default, not a request)."""
    return os.environ.get("USE_HUB_KERNELS", "").upper() in TRUE_VALUES


def _from_pretrained(from_pretrained, path, **kwargs):
    """`from_pretrained(path, **kwargs)` that never runs a model's own code: a directory whose config.json names
    classes of its own (auto_map) and transformers has none of is a ValueError naming `path`. Left to decide,
    transformers asked on the terminal whether to run that code, then told to pass trust_remote_code=True, which no
    command takes. A config.json whose dtype torch has no such name ("float8") is a ValueError naming `path` too:
    transformers' getattr(torch, dtype) raised an AttributeError, a traceback where the commands refuse a bad
    --model."""
    try:
        return from_pretrained(path, trust_remote_code=False, **kwargs)
    except ValueError as exc:
        if "trust_remote_code" not in str(exc):
            raise
        raise ValueError(f"{str(path)!r} needs code of its own to load (its config.json's auto_map), and fastalign "
                         "does not run a model's own code: give a model of an architecture transformers implements") \
            from None
    except AttributeError as exc:
        import torch

        if exc.obj is not torch:
            raise
        raise ValueError(f"{str(path)!r}: its config.json gives dtype {exc.name!r}, which is no torch dtype (such as "
                         "\"bfloat16\", \"float16\" or \"float32\")") from None


def load_config(path):
    """`AutoConfig.from_pretrained(path)`, running no code of the model's own (see _from_pretrained)."""
    from transformers import AutoConfig

    return _from_pretrained(AutoConfig.from_pretrained, path)


def load_pretrained(model_class, path, **kwargs):
    """`model_class.from_pretrained(path, **kwargs)` with transformers' Hub kernels on only when requested, running
    no code of the model's own (see _from_pretrained). Weights
    that cannot be read (a truncated or corrupt safetensors file) are an OSError, and a checkpoint that lacks weights
    the model needs, holds weights of other shapes than its config.json gives, or needs a package that is not
    installed (its quantization_config's bitsandbytes or optimum) a ValueError, each naming `path`: transformers would
    raise safetensors' error, a RuntimeError and an ImportError from deep inside (tracebacks, where the commands refuse
    a bad --model), and initialise the missing weights at random with a log line (a partial download; a causal LM's
    directory loaded as a classifier, its head random), a model that computes nonsense without failing."""
    from safetensors import SafetensorError

    try:
        model, info = _from_pretrained(model_class.from_pretrained, path, use_kernels=hub_kernels_requested(),
                                       output_loading_info=True, ignore_mismatched_sizes=True, **kwargs)
    except SafetensorError as exc:
        raise OSError(f"the weights in {str(path)!r} cannot be read, a truncated or corrupt file? ({exc})") from None
    except ImportError as exc:   # its quantization_config's library, an attn_implementation's (flash-attn)
        raise ValueError(f"{str(path)!r} needs a package that is not installed: {exc}") from None
    missing = sorted(info["missing_keys"])
    if missing:
        raise ValueError(f"{str(path)!r} lacks {len(missing)} weight{'s' if len(missing) > 1 else ''} of "
                         f"{type(model).__name__} ({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}), "
                         "which transformers would initialise at random: an incomplete checkpoint, or one of another "
                         "kind of model")
    mismatched = sorted(info["mismatched_keys"])
    if mismatched:
        key, theirs, ours = mismatched[0]
        raise ValueError(f"{str(path)!r}: {len(mismatched)} weight{'s' if len(mismatched) > 1 else ''} of another "
                         f"shape than its config.json gives ({key}: {list(theirs)} in the weights, {list(ours)} by "
                         f"config.json{', ...' if len(mismatched) > 1 else ''}): a config.json edited, or saved apart "
                         "from its weights (embeddings resized after it was saved?)")
    return model


def load_tokenizer(path, **kwargs):
    """`AutoTokenizer.from_pretrained(path, **kwargs)`, running no code of the model's own (see
    _from_pretrained); an OSError naming `path` where that directory holds no tokenizer file at all (a model
    saved without its tokenizer), for which transformers advises installing sentencepiece or tiktoken."""
    from transformers import AutoTokenizer

    if os.path.isdir(path) and not any(os.path.exists(os.path.join(path, name)) for name in TOKENIZER_FILES):
        raise OSError(f"{str(path)!r} holds no tokenizer (none of {', '.join(TOKENIZER_FILES)}): save the "
                      "tokenizer beside the model (tokenizer.save_pretrained)")
    return _from_pretrained(AutoTokenizer.from_pretrained, path, **kwargs)
