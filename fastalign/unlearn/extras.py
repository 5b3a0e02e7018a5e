"""The optional packages a run imports only when it trains (accelerate; peft for LoRA), and the error naming the
extra that installs a missing one, so that a run finds it before loading a model rather than after."""
from __future__ import annotations

import importlib

from fastalign.unlearn.config import UnlearnConfig


class MissingExtraError(ImportError):
    """A package the run needs is not installed; the message names the extra that installs it."""


# The packages the trainer imports only when it runs: the extra that installs each, and what needs it.
_EXTRAS = {"accelerate": ("unlearn", "the unlearning trainer"), "peft": ("lora", "lora=True")}


def require(module: str):
    """`module` (a key of _EXTRAS) imported, or MissingExtraError naming its extra."""
    extra, user = _EXTRAS[module]
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise MissingExtraError(f"{user} needs {module}: pip install 'fastalign[{extra}]'") from e


def require_extras(config: UnlearnConfig) -> None:
    """MissingExtraError unless what a run of `config` trains with is installed (accelerate; peft for lora=True):
    checked before a model loads, rather than found by the trainer once the model and data have loaded."""
    for module in ("accelerate", "peft") if config.lora else ("accelerate",):
        require(module)
