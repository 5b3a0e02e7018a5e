"""fastalign/pretrained.py: our commands load models with transformers' Hub kernels off unless USE_HUB_KERNELS asks
for them (transformers >= 5.25 turns them on by default and swaps a model's layers for kernels downloaded from the
Hub, again at a mode change on another device, such as the trainer's model.train() on a GPU)."""
import ast
import importlib.util
import json
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, LlamaForCausalLM, LlamaForSequenceClassification
from transformers.utils import is_kernels_available

from fastalign.pretrained import hub_kernels_requested, load_config, load_pretrained, load_tokenizer
from tests.rain.tiny import tiny_llama, tokenizer

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


def test_a_truncated_weights_file_is_an_oserror_naming_the_directory(saved_model, tmp_path):
    """An interrupted copy or download: safetensors' own error came as a traceback from deep inside transformers;
    the commands turn an OSError into a usage error naming --model."""
    broken = tmp_path / "truncated"
    shutil.copytree(saved_model, broken)
    with open(broken / "model.safetensors", "r+b") as weights:
        weights.truncate(1000)
    with pytest.raises(OSError, match=f"^the weights in '{broken}' cannot be read, a truncated or corrupt file\\? "):
        load_pretrained(LlamaForCausalLM, broken)


def test_a_checkpoint_without_weights_the_model_needs_is_refused_not_initialised_at_random(saved_model, tmp_path):
    """transformers initialised the weights a checkpoint lacks at random and logged it: a partial checkpoint (a
    layer's weights missing here) or a causal LM's directory loaded as a sequence classifier (its head missing) made
    a model that computed nonsense, and a run that finished."""
    partial = tmp_path / "partial"
    shutil.copytree(saved_model, partial)
    weights = load_file(partial / "model.safetensors")
    save_file({k: v for k, v in weights.items() if ".layers.1." not in k}, partial / "model.safetensors",
              metadata={"format": "pt"})
    with pytest.raises(ValueError, match=f"^'{partial}' lacks 9 weights of LlamaForCausalLM \\(model.layers.1.input_"
                                         "layernorm.weight, .*, \\.\\.\\.\\), which transformers would initialise at "
                                         "random"):
        load_pretrained(LlamaForCausalLM, partial)
    with pytest.raises(ValueError, match="lacks 1 weight of LlamaForSequenceClassification \\(score.weight\\)"):
        load_pretrained(LlamaForSequenceClassification, saved_model)


def test_a_model_saved_without_its_tokenizer_is_named_not_advised_to_install_packages(saved_model, tmp_path):
    """transformers' error for a directory without tokenizer files advised installing sentencepiece or tiktoken."""
    with pytest.raises(OSError, match=f"^'{saved_model}' holds no tokenizer \\(none of tokenizer.json, "
                                      "tokenizer_config.json, .*\\): save the tokenizer beside the model"):
        load_tokenizer(saved_model)
    tokenizer().save_pretrained(tmp_path)
    assert load_tokenizer(tmp_path).get_vocab() == tokenizer().get_vocab()


@pytest.mark.parametrize("quantization, package", [
    ({"quant_method": "bitsandbytes", "load_in_4bit": True}, "bitsandbytes"),
    ({"quant_method": "gptq", "bits": 4, "group_size": 128}, "optimum")])
def test_a_checkpoint_quantized_with_a_library_not_installed_is_a_valueerror_naming_both(saved_model, tmp_path,
                                                                                          quantization, package):
    """A checkpoint downloaded in 4 bits, its library not installed: transformers' ImportError, which no command
    takes for a bad --model, came as a traceback and exit status 1."""
    if importlib.util.find_spec(package) is not None:
        pytest.skip(f"{package} is installed: the checkpoint would load")
    quantized = tmp_path / "quantized"
    shutil.copytree(saved_model, quantized)
    config = json.loads((quantized / "config.json").read_text())
    config["quantization_config"] = quantization
    (quantized / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=f"^'{quantized}' needs a package that is not installed: .*{package}"):
        load_pretrained(LlamaForCausalLM, quantized)


def test_a_model_of_its_own_code_is_a_valueerror_naming_the_directory_without_asking_to_run_it(saved_model, tmp_path,
                                                                                                monkeypatch):
    """config.json naming classes of the model's own (auto_map) that transformers lacks: transformers asked on the
    terminal whether to run the directory's code, then told to pass trust_remote_code=True, which no command takes.
    Its tokenizer, with no class of its own, loads."""
    asked = []
    monkeypatch.setattr("builtins.input", lambda prompt="": asked.append(prompt) or "n")
    custom = tmp_path / "custom"
    shutil.copytree(saved_model, custom)
    tokenizer().save_pretrained(custom)
    config = json.loads((custom / "config.json").read_text())
    config.update(model_type="xmodel", auto_map={"AutoConfig": "configuration_x.XConfig",
                                                 "AutoModelForCausalLM": "modeling_x.XForCausalLM"})
    (custom / "config.json").write_text(json.dumps(config))
    for load in (load_config, lambda path: load_pretrained(AutoModelForCausalLM, path)):
        with pytest.raises(ValueError, match=f"^'{custom}' needs code of its own to load \\(its config.json's "
                                             "auto_map\\), and fastalign does not run a model's own code: "):
            load(custom)
    assert load_tokenizer(custom).get_vocab() == tokenizer().get_vocab()
    assert asked == []


def edited_copy(saved_model, path, **settings):
    """A copy of `saved_model` at `path` whose config.json holds `settings` instead, its weights and tokenizer kept."""
    shutil.copytree(saved_model, path)
    tokenizer().save_pretrained(path)
    config = json.loads((path / "config.json").read_text())
    config.update(settings)
    (path / "config.json").write_text(json.dumps(config))
    return path


def test_a_config_json_of_another_vocabulary_than_its_weights_is_a_valueerror_naming_the_directory(saved_model,
                                                                                                  tmp_path):
    """vocab_size edited, or embeddings resized and saved without the config: transformers' RuntimeError (you set
    ignore_mismatched_sizes to False) came as a traceback from every command, which refuse a bad --model clearly."""
    rows = load_file(saved_model / "model.safetensors")["model.embed_tokens.weight"].shape[0]
    edited = edited_copy(saved_model, tmp_path / "edited", vocab_size=rows - 7)
    with pytest.raises(ValueError, match=f"^'{edited}': 2 weights of another shape than its config.json gives "
                                         f"\\(lm_head.weight: \\[{rows}, .*\\] in the weights, \\[{rows - 7}, .*\\] "
                                         "by config.json, \\.\\.\\.\\): a config.json edited"):
        load_pretrained(LlamaForCausalLM, edited)


def test_a_config_json_naming_no_torch_dtype_is_a_valueerror_naming_the_directory(saved_model, tmp_path):
    """transformers' getattr(torch, "float8") was an AttributeError traceback from the config, tokenizer and model."""
    edited = edited_copy(saved_model, tmp_path / "edited", dtype="float8")
    for load in (load_config, load_tokenizer, lambda path: load_pretrained(AutoModelForCausalLM, path)):
        with pytest.raises(ValueError, match=f"^'{edited}': its config.json gives dtype 'float8', which is no torch "
                                             "dtype"):
            load(edited)
