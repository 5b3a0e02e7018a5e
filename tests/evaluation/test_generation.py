import pytest
import torch

from fastalign.evaluation.generation import GenerationConfig, generate
from fastalign.evaluation.prompts import spec_prompt


def prompts_of(world):
    # Different lengths, so that a batch is left-padded.
    return [spec_prompt(qa.question) for qa in world.normal[:4] + world.harmful[::30]] + ["### Question: Hi"]


def slow_greedy(model, tokenizer, prompt, max_new_tokens):
    """One prompt, no cache: the whole sequence re-run for every new token."""
    ids = tokenizer(prompt)["input_ids"]
    out = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            token = int(model(input_ids=torch.tensor([ids + out])).logits[0, -1].argmax())
            if token == tokenizer.eos_token_id:
                break
            out.append(token)
    return tokenizer.decode(out, skip_special_tokens=True)


def test_batched_greedy_equals_one_prompt_at_a_time(world, tokenizer, model):
    prompts = prompts_of(world)
    config = GenerationConfig(max_new_tokens=12, batch_size=4)
    batched = generate(model, tokenizer, prompts, config)
    single = [generate(model, tokenizer, [p], GenerationConfig(max_new_tokens=12, batch_size=1))[0] for p in prompts]
    assert batched == single
    assert batched == [slow_greedy(model, tokenizer, p, 12) for p in prompts]
    assert len(set(batched)) > 1


def test_stop_strings_cut_the_answer(world, tokenizer, model):
    prompts = prompts_of(world)
    full = generate(model, tokenizer, prompts, GenerationConfig(max_new_tokens=12))
    stop = full[0][len(full[0]) // 2:][:3]
    assert stop
    cut = generate(model, tokenizer, prompts, GenerationConfig(max_new_tokens=12, stop_strings=(stop,)))
    for whole, short in zip(full, cut):
        assert short == (whole[: whole.index(stop)] if stop in whole else whole)


def test_sampling_is_reproducible_and_differs_from_greedy(world, tokenizer, model):
    prompts = prompts_of(world)
    config = GenerationConfig(max_new_tokens=10, do_sample=True, temperature=2.0, top_k=20, seed=3)
    first = generate(model, tokenizer, prompts, config)
    assert first == generate(model, tokenizer, prompts, config)
    assert first != generate(model, tokenizer, prompts, GenerationConfig(max_new_tokens=10))


def test_prompt_longer_than_context_is_refused(tokenizer, model):
    long_prompt = "### Question: " + "How do I bake a " * 30
    with pytest.raises(ValueError, match="prompt 1 has .* exceeds the model's context of 96"):
        generate(model, tokenizer, ["### Question: Hi", long_prompt], GenerationConfig(max_new_tokens=8))


@pytest.mark.parametrize("kwargs, message", [({"max_new_tokens": 0}, "max_new_tokens"),
                                             ({"batch_size": 0}, "batch_size"),
                                             ({"do_sample": True, "temperature": 0.0}, "temperature"),
                                             ({"top_k": -1}, "top_k")])
def test_bad_generation_settings_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        GenerationConfig(**kwargs)
