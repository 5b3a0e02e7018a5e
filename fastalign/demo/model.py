"""The demo's tiny Llama model: its architecture, and loading the trained weights shipped with the package.

`python -m fastalign.demo.train` writes the weights, tokenizer and world seed into `assets/`;
`load_model()` and `load_world()` read them back offline. transformers is imported by the functions that make a model
(1.5 s): `fastalign --help` reads ASSETS.
"""
from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import TYPE_CHECKING, Tuple, Union

from fastalign.data_files import read_text
from fastalign.ops.checks import is_integer
from fastalign.pretrained import load_pretrained

from .world import World

if TYPE_CHECKING:
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

ASSETS = Path(__file__).resolve().parent / "assets"
WORLD_FILE = "world.json"


def model_config(tokenizer: PreTrainedTokenizerFast) -> LlamaConfig:
    """0.92M parameters: 4 layers of width 128, a context of 256 positions (the longest world text
    is the ~180-token self-evaluation prompt)."""
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=384, num_hidden_layers=4,
                       num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)


def load_model(path: Union[str, Path] = ASSETS) -> Tuple[LlamaForCausalLM, PreTrainedTokenizerFast]:
    """The trained demo model (eval mode, float32, CPU) and its tokenizer, from `path` (default: shipped)."""
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"no trained demo model in {path}; run `python -m fastalign.demo.train`")
    model = load_pretrained(LlamaForCausalLM, path).eval()
    return model, PreTrainedTokenizerFast.from_pretrained(path)


def load_world(path: Union[str, Path] = ASSETS) -> World:
    """The world the model in `path` was trained on (default: the shipped model's); ValueError naming its world.json
    when that is not an object of World's settings (integers), a damaged or foreign file."""
    file = Path(path) / WORLD_FILE
    try:
        settings = json.loads(read_text(file))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{file}: not valid JSON ({exc.msg})") from None
    names = list(inspect.signature(World).parameters)
    if not (isinstance(settings, dict) and set(settings) <= set(names) and all(map(is_integer, settings.values()))):
        raise ValueError(f"{file}: expected an object of the world's settings ({', '.join(names)}: integers), got "
                         f"{json.dumps(settings)[:80]}")
    return World(**settings)
