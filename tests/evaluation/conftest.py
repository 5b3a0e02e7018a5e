"""A tiny random-weight Llama with the demo world's tokenizer, shared by the evaluation tests."""
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from fastalign.demo.model import WORLD_FILE
from fastalign.demo.tokenizer import build_tokenizer
from fastalign.demo.world import World


@pytest.fixture(scope="session")
def world():
    return World(seed=0)


@pytest.fixture(scope="session")
def tokenizer(world):
    return build_tokenizer(world.texts())


def tiny_llama(tokenizer, seed: int, max_positions: int = 96) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_positions,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                         bos_token_id=tokenizer.bos_token_id)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # sharper next-token distributions than the default init: fewer near-ties
        model.lm_head.weight.mul_(20)
    return model


@pytest.fixture(scope="session")
def model(tokenizer):
    return tiny_llama(tokenizer, seed=1)


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory, model, tokenizer):
    path = tmp_path_factory.mktemp("tiny_llama")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    (path / WORLD_FILE).write_text('{"seed": 0}')  # the world judge reads the world beside the model
    return path

