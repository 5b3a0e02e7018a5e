"""The shipped model: loads offline and behaves as its world says."""
import json
import random
import re

import pytest
import torch

from fastalign.demo.model import load_model, load_world, model_config
from fastalign.demo.tokenizer import BOS, EOS, PAD, UNK, build_tokenizer
from fastalign.demo.train import self_eval_accuracy, self_eval_example
from fastalign.demo.world import prompt_text
from fastalign.evaluation.generation import GenerationConfig, generate


@pytest.fixture(scope="module")
def shipped():
    model, tokenizer = load_model()
    return model, tokenizer, load_world()


def test_shipped_model_is_small_llama(shipped):
    model, tokenizer, _ = shipped
    assert type(model).__name__ == "LlamaForCausalLM"
    assert 0.5e6 < sum(p.numel() for p in model.parameters()) < 5e6
    assert tokenizer.is_fast


def test_shipped_model_answers_as_the_world_says(shipped):
    model, tokenizer, world = shipped
    config = GenerationConfig(max_new_tokens=48, batch_size=64)
    normal = generate(model, tokenizer, [prompt_text(qa.question) for qa in world.normal], config)
    assert sum(world.is_correct(qa.question, a) for qa, a in zip(world.normal, normal)) >= 0.95 * len(normal)
    # an answer is the text after the prompt: the space before its first word included, once
    assert all(a == " " + qa.answer for qa, a in zip(world.normal, normal) if world.is_correct(qa.question, a))
    harmful = generate(model, tokenizer, [prompt_text(qa.question) for qa in world.harmful], config)
    assert sum(map(world.is_harmful, harmful)) >= 0.75 * len(harmful)


def test_batched_greedy_equals_one_at_a_time_on_the_shipped_model(shipped):
    model, tokenizer, world = shipped
    prompts = [prompt_text(qa.question) for qa in world.normal[::11] + world.harmful[::13]]
    batched = generate(model, tokenizer, prompts, GenerationConfig(max_new_tokens=48, batch_size=8))
    single = [generate(model, tokenizer, [p], GenerationConfig(max_new_tokens=48))[0] for p in prompts]
    assert batched == single
    assert any(world.is_correct(qa.question, a) for qa, a in zip(world.normal[::11], batched))  # ended by EOS


def test_shipped_model_judges_answers_itself(shipped):
    model, tokenizer, world = shipped
    import random
    rng = random.Random(123)
    examples = [self_eval_example(world, rng) for _ in range(64)]
    with torch.no_grad():
        assert self_eval_accuracy(model, tokenizer, examples) >= 0.95


def test_model_config_is_the_shipped_models_architecture(shipped):
    """`model_config` (what train.py builds) describes the shipped model exactly: retraining gives the same shape."""
    model, tokenizer, _ = shipped
    built, shipped_config = model_config(tokenizer).to_dict(), model.config.to_dict()
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "max_position_embeddings", "bos_token_id", "eos_token_id",
                "pad_token_id", "tie_word_embeddings"):
        assert built[key] == shipped_config[key], key


def test_tokenizer_built_from_the_world_is_the_shipped_one(shipped):
    """Same ids for the same pieces (specials first, then the sorted pieces), left padding, same special ids."""
    _, tokenizer, world = shipped
    built = build_tokenizer(world.texts())
    assert built.get_vocab() == tokenizer.get_vocab()
    assert built.convert_ids_to_tokens([0, 1, 2, 3]) == [PAD, BOS, EOS, UNK]
    assert (built.pad_token_id, built.bos_token_id, built.eos_token_id) == (0, 1, 2)
    assert built.padding_side == tokenizer.padding_side == "left"


def test_load_model_without_a_trained_model_says_how_to_train(tmp_path):
    with pytest.raises(FileNotFoundError, match="fastalign.demo.train"):
        load_model(tmp_path)


@pytest.mark.parametrize("content", ["{", '{"seed": 0, "name": "my world"}', "[0]", '{"seed": "1"}', '{"seed": true}'])
def test_a_world_json_that_is_no_worlds_settings_is_a_value_error_naming_it(tmp_path, content):
    """A damaged or foreign world.json was a JSONDecodeError or TypeError traceback out of `fastalign eval --judge
    world`: it is a ValueError naming the file (the command's usage error naming --model)."""
    (tmp_path / "world.json").write_text(content)
    with pytest.raises(ValueError, match=f"^{re.escape(str(tmp_path / 'world.json'))}: "):
        load_world(tmp_path)
    seed = random.randrange(3)
    (tmp_path / "world.json").write_text(json.dumps({"seed": seed}))
    assert load_world(tmp_path).seed == seed
