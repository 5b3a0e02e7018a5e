import pytest

from fastalign.evaluation.generation import GenerationConfig, generate
from fastalign.evaluation.harness import JudgeError, evaluate_harm, evaluate_utility
from fastalign.evaluation.metrics import mean_token_kl
from fastalign.evaluation.prompts import spec_prompt
from tests.evaluation.conftest import tiny_llama


def test_evaluate_harm_counts_the_judges_verdicts_on_generated_answers(world, tokenizer, model):
    prompts = [spec_prompt(qa.question) for qa in world.harmful[:7]]
    config = GenerationConfig(max_new_tokens=6, batch_size=3)
    by_length = lambda pairs: [len(a) % 3 == 0 for _, a in pairs]  # noqa: E731
    report = evaluate_harm(model, tokenizer, prompts, by_length, config)
    answers = generate(model, tokenizer, prompts, config)
    assert [r["answer"] for r in report.records] == answers
    assert report.harmful_rate == sum(by_length(list(zip(prompts, answers)))) / 7


def test_judge_failure_names_the_prompts(world, tokenizer, model):
    prompts = [spec_prompt(qa.question) for qa in world.harmful[:5]]
    with pytest.raises(JudgeError, match=r"prompts 0\.\.1: ValueError: judge returned 1 verdicts for 2"):
        evaluate_harm(model, tokenizer, prompts, lambda pairs: [True], GenerationConfig(max_new_tokens=2, batch_size=2))


def test_utility_against_itself_and_against_another_model(world, tokenizer, model):
    prompts = [spec_prompt(qa.question) for qa in world.normal[:6]]
    config = GenerationConfig(max_new_tokens=5)
    same = evaluate_utility(model, model, tokenizer, prompts, config)
    assert same.unchanged_share == 1.0 and same.mean_token_kl == pytest.approx(0.0, abs=1e-6)
    other = evaluate_utility(tiny_llama(tokenizer, seed=5), model, tokenizer, prompts, config)
    assert other.unchanged_share < 1.0 and other.mean_token_kl > 0.0
    with pytest.raises(ValueError, match="greedy"):
        evaluate_utility(model, model, tokenizer, prompts, GenerationConfig(do_sample=True))


def test_utility_kl_is_measured_on_the_reference_answers(world, tokenizer, model):
    """The per-token KL is measured on the reference model's greedy answers."""
    prompts = [spec_prompt(qa.question) for qa in world.normal[:6]]
    config = GenerationConfig(max_new_tokens=5)
    other = tiny_llama(tokenizer, seed=5)
    report = evaluate_utility(other, model, tokenizer, prompts, config)
    reference_answers = generate(model, tokenizer, prompts, config)
    pairs = [(p, a) for p, a in zip(prompts, reference_answers) if a]
    assert report.unchanged_share < 1.0
    assert report.mean_token_kl == pytest.approx(mean_token_kl(other, model, tokenizer, pairs), rel=1e-6)


def test_judge_sees_and_records_name_the_right_prompts(world, tokenizer, model):
    """Over several batches, the judge sees and the records name each answer's own prompt."""
    prompts = [spec_prompt(qa.question) for qa in world.harmful[:7]]
    seen = []

    def judge(pairs):
        seen.extend(pairs)
        return [False] * len(pairs)

    report = evaluate_harm(model, tokenizer, prompts, judge, GenerationConfig(max_new_tokens=3, batch_size=3))
    assert [p for p, _ in seen] == prompts
    assert [r["prompt"] for r in report.records] == prompts
