"""How the trainer writes model/ (fastalign/unlearn/saving.py)."""
import torch
from safetensors import safe_open
from transformers import LlamaConfig, LlamaForCausalLM

from fastalign.unlearn.saving import save_model


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
