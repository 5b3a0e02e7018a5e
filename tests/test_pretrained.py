"""fastalign/pretrained.py: our commands load models with transformers' Hub kernels off unless USE_HUB_KERNELS asks
for them (transformers >= 5.25 turns them on by default and swaps a model's layers for kernels downloaded from the
Hub, again at a mode change on another device, such as the trainer's model.train() on a GPU)."""
import ast
from pathlib import Path

import pytest
from transformers import LlamaForCausalLM
from transformers.utils import is_kernels_available

from fastalign.pretrained import hub_kernels_requested, load_pretrained
from tests.rain.tiny import tiny_llama

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama")
    tiny_llama().save_pretrained(path)
    return path


def test_a_model_loads_without_hub_kernels_when_none_are_requested(saved_model, monkeypatch):
    """transformers' default with USE_HUB_KERNELS unset is on from 5.25 (kernelized at load, again at train())."""
    monkeypatch.delenv("USE_HUB_KERNELS", raising=False)
    model = load_pretrained(LlamaForCausalLM, saved_model)
    model.train()
    assert not model.use_kernels


@pytest.mark.skipif(not is_kernels_available(), reason="transformers' Hub kernels need the kernels package")
def test_a_request_turns_hub_kernels_on(saved_model, monkeypatch):
    monkeypatch.setenv("USE_HUB_KERNELS", "yes")
    assert load_pretrained(LlamaForCausalLM, saved_model).use_kernels   # on the CPU: nothing swapped or downloaded


@pytest.mark.parametrize("value, requested", [("YES", True), ("1", True), ("on", True), ("True", True),
                                              ("NO", False), ("0", False), ("", False), (None, False)])
def test_what_use_hub_kernels_requests(value, requested, monkeypatch):
    if value is None:
        monkeypatch.delenv("USE_HUB_KERNELS", raising=False)
    else:
        monkeypatch.setenv("USE_HUB_KERNELS", value)
    assert hub_kernels_requested() is requested


def model_loads(path):
    """The lines of `path` that call from_pretrained on a transformers model class (not a tokenizer or config)."""
    return [node.lineno for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
            and node.func.attr == "from_pretrained" and isinstance(node.func.value, ast.Name)
            and (node.func.value.id.startswith("AutoModel") or node.func.value.id.endswith("Model")
                 or "For" in node.func.value.id)]


def test_every_model_our_code_loads_goes_through_load_pretrained():
    direct = {str(path.relative_to(ROOT)): lines for folder in ("fastalign", "bench")
              for path in sorted((ROOT / folder).rglob("*.py")) if (lines := model_loads(path))}
    assert direct == {}, "load these with fastalign.pretrained.load_pretrained"
