"""The shipped model: loads offline and behaves as its world says."""
import pytest
import torch

from fastalign.demo.model import load_model, load_world
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
