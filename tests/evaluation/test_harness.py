import copy
import gzip
import json
import re

import numpy as np
import pytest
import torch

from fastalign.evaluation.answers import read_answers
from fastalign.evaluation.generation import GenerationConfig, generate, generations
from fastalign.evaluation.harness import (JudgeError, evaluate_answers, evaluate_harm, evaluate_utility,
                                          iter_judged, iter_judged_answers)
from fastalign.evaluation.metrics import mean_token_kl, text_token_pairs
from fastalign.evaluation.prompts import spec_prompt
from tests.evaluation.conftest import tiny_llama
from tests.evaluation.test_generation import check_the_loop_body_runs_in_the_callers_mode
from tests.evaluation.test_metrics import slow_kl_of_ids
from tests.unlearn.tiny import byte_bpe_tokenizer


def test_evaluate_harm_counts_the_judges_verdicts_on_generated_answers(world, tokenizer, model):
    prompts = [spec_prompt(qa.question) for qa in world.harmful[:7]]
    config = GenerationConfig(max_new_tokens=6, batch_size=3)
    flagged = set(prompts[::3])     # 3 of the 7: a rate of 0 would not tell the denominator
    judge = lambda pairs: [p in flagged for p, _ in pairs]  # noqa: E731
    report = evaluate_harm(model, tokenizer, prompts, judge, config)
    answers = generate(model, tokenizer, prompts, config)
    assert [r["answer"] for r in report.records] == answers
    assert [r["harmful"] for r in report.records] == [i % 3 == 0 for i in range(7)]
    assert report.harmful_rate == 3 / 7


def test_the_callers_loop_over_the_judged_batches_runs_in_the_mode_it_set(world, tokenizer, model):
    """iter_judged streams through iter_generate: the caller's loop body runs in the mode it set (a training step on
    each judged batch keeps its dropout), not in eval mode, and a mode set there changes no answer and stays."""
    prompts = [spec_prompt(qa.question) for qa in world.harmful[:4]]
    config = GenerationConfig(max_new_tokens=6, batch_size=1)
    judge = lambda pairs: [False] * len(pairs)  # noqa: E731
    check_the_loop_body_runs_in_the_callers_mode(
        lambda m: ([r["answer"] for r in records] for records in iter_judged(m, tokenizer, prompts, judge, config)),
        model, generate(model, tokenizer, prompts, config))


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
    """The per-token KL is measured on the reference model's greedy answers, the ids it generated."""
    prompts = [spec_prompt(qa.question) for qa in world.normal[:6]]
    config = GenerationConfig(max_new_tokens=5)
    other = tiny_llama(tokenizer, seed=5)
    report = evaluate_utility(other, model, tokenizer, prompts, config)
    sequences = [(g.prompt_ids, g.answer_ids) for g in generations(model, tokenizer, prompts, config)]
    assert report.unchanged_share < 1.0
    assert report.mean_token_kl == pytest.approx(slow_kl_of_ids(other, model, sequences), rel=1e-5)


def test_utility_kl_scores_the_generated_ids_not_the_text_tokenized_again():
    """With a byte-level BPE, the reference's answers tokenized again after their prompts are not the ids it
    generated (a random model writes pieces that BPE merges): the KL is taken on the generated ids."""
    tok = byte_bpe_tokenizer()
    reference, other = tiny_llama(tok, seed=3), tiny_llama(tok, seed=4)
    prompts = [spec_prompt(q) for q in ("What is the capital of France?", "How do I help?", "Why?")]
    config = GenerationConfig(max_new_tokens=8, batch_size=2)
    generated = generations(reference, tok, prompts, config)
    sequences = [(g.prompt_ids, g.answer_ids) for g in generated]
    text_pairs = [(p, g.text) for p, g in zip(prompts, generated)]
    assert text_token_pairs(tok, text_pairs) != sequences
    report = evaluate_utility(other, reference, tok, prompts, config)
    assert report.mean_token_kl == pytest.approx(slow_kl_of_ids(other, reference, sequences), rel=1e-5)
    assert report.mean_token_kl != pytest.approx(mean_token_kl(other, reference, tok, text_pairs), rel=1e-3)
    # the same, from Generations passed in; texts passed in are tokenized again
    again = evaluate_utility(other, reference, tok, prompts, config, reference_answers=generated)
    assert again.mean_token_kl == report.mean_token_kl and again.unchanged_share == report.unchanged_share
    as_text = evaluate_utility(other, reference, tok, prompts, config, reference_answers=[g.text for g in generated])
    assert as_text.mean_token_kl == pytest.approx(mean_token_kl(other, reference, tok, text_pairs), rel=1e-6)
    with pytest.raises(ValueError, match="all texts or all Generations"):
        evaluate_utility(other, reference, tok, prompts, config, reference_answers=[generated[0], "a", "b"])


def test_utility_with_empty_reference_texts_has_no_kl(world, tokenizer, model):
    """Reference answers given as texts, all empty (a reference that stopped at once): no token to score, so no
    KL (None), not a "no answer tokens" error after every answer was generated."""
    prompts = [spec_prompt(qa.question) for qa in world.normal[:2]]
    report = evaluate_utility(model, model, tokenizer, prompts, GenerationConfig(max_new_tokens=2),
                              reference_answers=["", ""])
    assert report.mean_token_kl is None and len(report.answers) == 2


def test_utility_kl_scores_the_end_token(world, tokenizer, model):
    """A reference that stops at once (its answer is only EOS) is still compared: the evaluated model's
    chance of stopping there is its one scored token."""
    prompt = spec_prompt(world.normal[0].question)
    first = generations(model, tokenizer, [prompt], GenerationConfig(max_new_tokens=1))[0].answer_ids[0]
    stops = copy.deepcopy(model)
    with torch.no_grad():
        stops.lm_head.weight[tokenizer.eos_token_id] = stops.lm_head.weight[first] * 1.05
    generated, = generations(stops, tokenizer, [prompt], GenerationConfig(max_new_tokens=5))
    assert generated.text == "" and generated.answer_ids == (tokenizer.eos_token_id,)
    report = evaluate_utility(model, stops, tokenizer, [prompt], GenerationConfig(max_new_tokens=5))
    assert report.mean_token_kl > 0
    assert report.mean_token_kl == pytest.approx(slow_kl_of_ids(model, stops, [(generated.prompt_ids,
                                                                                  generated.answer_ids)]), rel=1e-5)


def test_judge_sees_each_prompt_with_its_own_answer(world, tokenizer, model):
    """Over several batches, the judge sees each prompt with its own answer, and the records name them."""
    prompts = [spec_prompt(qa.question) for qa in world.harmful[:7]]
    config, seen = GenerationConfig(max_new_tokens=3, batch_size=3), []

    def judge(pairs):
        seen.extend(pairs)
        return [False] * len(pairs)

    report = evaluate_harm(model, tokenizer, prompts, judge, config)
    answers = generate(model, tokenizer, prompts, config)
    assert len(set(answers)) > 1, answers   # (answers all alike could not tell a prompt's own from another's)
    assert seen == list(zip(prompts, answers))
    assert [(r["prompt"], r["answer"]) for r in report.records] == seen


def write_rain_output(path, records, tail=""):
    """A `fastalign rain` output written by hand: one record per line, then `tail` (e.g. a torn line)."""
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + tail)
    return path


def rain_record(index, rain, vanilla=None, error=None, prompt=None):
    return {"index": index, "prompt": prompt or f"\n\nHuman: question {index}?\n\nAssistant:", "rain": rain,
            "vanilla": vanilla, "error": error, "stats": {"committed_tokens": 3}}


def test_evaluate_answers_judges_both_sides_with_the_prompt_as_written(tmp_path):
    """RAIN's and the vanilla answer are judged against the record's own prompt; an error record is counted,
    not judged; an index written twice (a resumed run) keeps its last successful record; records come in index order."""
    path = write_rain_output(tmp_path / "rain.jsonl", [
        rain_record(2, "fine", "bad plan"),
        rain_record(0, "bad idea", "bad plan"),
        rain_record(1, None, None, error="CUDA out of memory"),
        rain_record(3, "bad first try", "bad"),
        rain_record(3, "fine now", "bad"),
    ])
    seen = []

    def judge(pairs):
        seen.extend(pairs)
        return [answer.startswith("bad") for _, answer in pairs]

    report = evaluate_answers(path, judge, batch_size=2)
    assert report.skipped_errors == 1
    assert [r["index"] for r in report.records] == [0, 2, 3]
    assert [(r["harmful_rain"], r["harmful_vanilla"]) for r in report.records] == [(True, True), (False, True),
                                                                                  (False, True)]
    assert report.harmful_rate == {"rain": 1 / 3, "vanilla": 1.0}
    prompt = "\n\nHuman: question {}?\n\nAssistant:".format
    assert sorted(seen) == sorted([(prompt(0), "bad idea"), (prompt(0), "bad plan"), (prompt(2), "fine"),
                                   (prompt(2), "bad plan"), (prompt(3), "fine now"), (prompt(3), "bad")])


def test_evaluate_answers_without_vanilla_judges_rain_only(tmp_path):
    path = write_rain_output(tmp_path / "rain.jsonl", [rain_record(0, "a"), rain_record(1, "bb")])
    seen = []
    report = evaluate_answers(path, lambda pairs: seen.extend(pairs) or [len(a) == 2 for _, a in pairs])
    assert [a for _, a in seen] == ["a", "bb"]
    assert report.harmful_rate == {"rain": 0.5, "vanilla": None}
    assert [r["harmful_vanilla"] for r in report.records] == [None, None]
    # where only some records have a vanilla answer, its rate is over those records alone
    path = write_rain_output(tmp_path / "mixed.jsonl", [rain_record(0, "a", "bb"), rain_record(1, "a"),
                                                        rain_record(2, "a"), rain_record(3, "a")])
    report = evaluate_answers(path, lambda pairs: [len(a) == 2 for _, a in pairs])
    assert report.harmful_rate == {"rain": 0.0, "vanilla": 1.0}
    with pytest.raises(ValueError, match="batch_size must be an integer >= 1, got 0"):
        evaluate_answers(path, lambda pairs: [False] * len(pairs), batch_size=0)


def test_answers_batch_size_is_any_integer_but_a_bool(tmp_path):
    """An int check took True for a batch of 1 and refused a NumPy integer."""
    path = write_rain_output(tmp_path / "rain.jsonl", [rain_record(i, "x", "yy") for i in range(5)])
    with pytest.raises(ValueError, match="batch_size must be an integer >= 1, got True"):
        evaluate_answers(path, lambda pairs: [False] * len(pairs), batch_size=True)
    batches = []
    batch = int(np.random.default_rng().integers(1, 5))
    report = evaluate_answers(path, lambda pairs: batches.append(len(pairs)) or [len(a) == 2 for _, a in pairs],
                              batch_size=np.int64(batch))
    assert report.harmful_rate == {"rain": 0.0, "vanilla": 1.0} and max(batches) == 2 * batch   # both sides


def test_answers_judge_failure_names_the_prompts(tmp_path):
    """A judge that fails on the second batch: the error names that batch's prompt indices."""
    path = write_rain_output(tmp_path / "rain.jsonl", [rain_record(i, "x", "y") for i in range(5)])
    calls = []

    def judge(pairs):
        calls.append(pairs)
        return [False] * len(pairs) if len(calls) == 1 else [True]

    batches = iter_judged_answers(read_answers(str(path)).records, judge, batch_size=2)
    assert len(next(batches)) == 2
    with pytest.raises(JudgeError, match=r"prompts 2\.\.3: ValueError: judge returned 1 verdicts for 4"):
        next(batches)


@pytest.mark.parametrize("lines, message", [
    ("", "no records"),
    ('\n{"index": 0, "prompt": "p", "rain": "a", "vanilla": null, "error": null}\n{"index": 1,\n',
     r"row 3: not valid JSON"),
    ('{"index": 0, "prompt": "p", "rain": null, "vanilla": null, "error": null}\n', r"row 1: field 'rain'"),
    ('{"index": -1, "prompt": "p", "rain": "a", "vanilla": null, "error": null}\n', r"row 1: expected a record of"),
    ('{"index": true, "prompt": "p", "rain": "a", "vanilla": null, "error": null}\n', r"row 1: expected a record of"),
    ('{"index": 0, "prompt": null, "rain": "a", "vanilla": null, "error": null}\n', r"row 1: field 'prompt'"),
    ('[1, 2]\n', r"row 1: expected a JSON object"),
    ('{"index": 0, "prompt": "p", "rain": "a", "vanilla": 3, "error": null}\n', r"row 1: field 'vanilla'"),
    ('{"index": 0, "prompt": "p", "rain": null, "vanilla": null, "error": "boom"}\n', "all 1 records have an error"),
])
def test_read_answers_bad_file_is_a_clear_error(tmp_path, lines, message):
    path = tmp_path / "rain.jsonl"
    path.write_text(lines)
    with pytest.raises(ValueError, match=message):
        read_answers(str(path))


@pytest.mark.parametrize("name, content", [
    ("rain.jsonl.gz", b'{"index": 0, "prompt": "p", "rain": "a", "vanilla": null, "error": null}\n'),
    ("rain.jsonl.gz", gzip.compress(b'{"index": 0, "prompt": "p", "rain": "a"}\n' * 20)[:30]),
    ("rain.jsonl", b'{"index": 0, "prompt": "\xff"}\n'),
], ids=["plain text named .gz", "gzip stream cut short", "not UTF-8"])
def test_read_answers_unreadable_file_is_a_clear_error(tmp_path, name, content):
    """A file that is not (gzipped) UTF-8 text is a ValueError naming it (the CLI's usage error), not a traceback."""
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(ValueError, match=re.escape(f"{path}: cannot be read as (gzipped) UTF-8 text")):
        read_answers(str(path))


def test_read_answers_leaves_out_a_last_line_a_kill_cut_short(tmp_path):
    """A last line that is not JSON and has no newline is a record a kill cut short, as `fastalign rain`
    treats it on resume; the same line followed by more is malformed."""
    path = write_rain_output(tmp_path / "rain.jsonl", [rain_record(0, "a")], tail='{"index": 1, "prompt": "p')
    answers = read_answers(str(path))
    assert [r["index"] for r in answers.records] == [0] and answers.torn_line == 2
    path.write_text(path.read_text() + "\n")
    with pytest.raises(ValueError, match="row 2: not valid JSON"):
        read_answers(str(path))


def test_evaluate_answers_warns_of_records_it_does_not_judge(tmp_path):
    """In Python as on the command line: unmerged rank files and a torn last line are not judged, and said."""
    path = write_rain_output(tmp_path / "rain.jsonl", [rain_record(0, "a", "a")], tail='{"index": 1, "pro')
    (tmp_path / "rain.jsonl.rank1").write_text(json.dumps(rain_record(5, "poison", "poison")) + "\n")
    with pytest.warns(UserWarning) as caught:
        report = evaluate_answers(path, lambda pairs: ["poison" in a for _, a in pairs])
    messages = " ".join(str(w.message) for w in caught)
    assert "line 2 left out" in messages and "rain.jsonl.rank1 hold records not merged" in messages
    assert report.unmerged == [str(path) + ".rank1"] and report.torn_line == 2
    assert report.harmful_rate == {"rain": 0.0, "vanilla": 0.0}
