"""How the trainer writes model/ and adapter/ (fastalign/unlearn/saving.py)."""
import json
import os

import pytest
import torch
from safetensors import safe_open
from transformers import LlamaConfig, LlamaForCausalLM

from fastalign.unlearn.saving import save_adapter, save_model


def one_layer_llama(tied: bool) -> LlamaForCausalLM:
    return LlamaForCausalLM(LlamaConfig(vocab_size=53, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=tied))


def test_a_tied_weight_of_fsdps_gathered_state_is_written_once_and_loads_tied(tmp_path):
    """FSDP's full state holds the tied lm_head.weight and the embeddings as tensors of their own: model/ held a second
    copy of the embeddings as lm_head.weight (158,424 bytes against 117,368 for the tiny model)."""
    model = one_layer_llama(tied=True)
    with torch.no_grad():
        model.lm_head.weight.normal_()   # (the embeddings too: they are one tensor)
    gathered = {name: t.clone() for name, t in model.state_dict().items()}   # as FSDP gathers them, unshared
    names = set(gathered)
    assert "lm_head.weight" in names
    save_model(model, str(tmp_path), gathered)
    with safe_open(tmp_path / "model.safetensors", "pt") as saved:
        assert set(saved.keys()) == names - {"lm_head.weight"}
    loaded = LlamaForCausalLM.from_pretrained(tmp_path)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight)


def test_untied_weights_of_a_gathered_state_are_all_written(tmp_path):
    model = one_layer_llama(tied=False)
    gathered = {name: t.clone() for name, t in model.state_dict().items()}
    names = set(gathered)
    save_model(model, str(tmp_path), gathered)
    with safe_open(tmp_path / "model.safetensors", "pt") as saved:
        assert set(saved.keys()) == names


def adapted_from(name_or_path: str):
    """A LoRA PeftModel on the tiny Llama loaded from `name_or_path` (or built and named so, as one loaded from the Hub
    is), its adapter's update non-zero."""
    import peft
    base = (LlamaForCausalLM.from_pretrained(name_or_path) if os.path.isdir(name_or_path) else
            one_layer_llama(tied=False))
    base.name_or_path = base.config.name_or_path = name_or_path   # (a no-op for the model loaded from it)
    model = peft.get_peft_model(base, peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_()
    return model


def card_metadata(directory) -> str:
    return (directory / "README.md").read_text().split("---")[1]


@pytest.mark.parametrize("relative", [True, False])
def test_an_adapter_names_no_local_path_of_its_base_model(tmp_path, monkeypatch, relative):
    """adapter_config.json's base_model_name_or_path and the model card held the base model's path as given, relative
    to where the run started or absolute on the training machine: AutoPeftModelForCausalLM loaded it from there only,
    and elsewhere looked the path up on the Hub. The adapter names no base model then, and loads on a base given to
    PeftModel.from_pretrained from anywhere; the model in memory keeps its names."""
    import peft
    monkeypatch.chdir(tmp_path)
    one_layer_llama(tied=False).save_pretrained(tmp_path / "base")
    given = "base" if relative else str(tmp_path / "base")
    model = adapted_from(given)
    save_adapter(model, "adapter")
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["base_model_name_or_path"] is None
    assert "base" not in card_metadata(tmp_path / "adapter") and "base_model" not in card_metadata(tmp_path / "adapter")
    base = model.get_base_model()
    assert (base.name_or_path, base.config.name_or_path, model.peft_config["default"].base_model_name_or_path) == (
        given, given, given)

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    loaded = peft.PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(tmp_path / "base"), tmp_path / "adapter")
    ids = torch.tensor([[1, 5, 9, 2]])
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


@pytest.mark.filterwarnings("ignore:Could not find a config file in an-org/a-model")
def test_an_adapter_names_a_base_model_from_the_hub_by_its_id(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")   # (PEFT looks up the base model's config on the Hub)
    save_adapter(adapted_from("an-org/a-model"), "adapter")
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["base_model_name_or_path"] == "an-org/a-model"
    assert "base_model: an-org/a-model" in card_metadata(tmp_path / "adapter")
