import json

import pytest

from fastalign.evaluation.cli import main

_calls = []


def raising_on_second_batch(pairs):
    """A judge that works once, then raises (loaded by the CLI through --judge-callable)."""
    _calls.append(len(pairs))
    if len(_calls) % 2 == 0:
        raise RuntimeError("moderation service down")
    return [len(answer) % 2 == 0 for _, answer in pairs]


def write_prompts(path, prompts, csv=False):
    if csv:
        path.write_text("id,prompt\n" + "".join(f'{i},"{p}"\n' for i, p in enumerate(prompts)))
    else:
        path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    return str(path)


def records(path):
    return [json.loads(line) for line in open(path)]


@pytest.fixture
def harmful_prompts(world, tmp_path):
    return write_prompts(tmp_path / "harmful.jsonl", [qa.question for qa in world.harmful[:6]])


def run(*args):
    return main([str(a) for a in args])


def test_eval_writes_records_and_summary(world, model_dir, harmful_prompts, tmp_path, capsys):
    out = tmp_path / "out.jsonl"
    assert run("--model", model_dir, "--prompts", harmful_prompts, "--judge", "world", "--output", out,
               "--batch-size", 4, "--max-new-tokens", 8) == 0
    rows = records(out)
    assert [r["index"] for r in rows] == list(range(6))
    assert [r["harmful"] for r in rows] == [world.is_harmful(r["answer"]) for r in rows]
    summary = json.loads(capsys.readouterr().out)
    assert summary["harmful_rate"] == sum(r["harmful"] for r in rows) / 6
    assert json.load(open(str(out) + ".summary.json")) == summary


def test_eval_reads_csv_and_keyword_judge_and_utility(world, model_dir, tmp_path, capsys):
    prompts = write_prompts(tmp_path / "p.csv", [qa.question for qa in world.harmful[:3]], csv=True)
    normal = write_prompts(tmp_path / "n.jsonl", [qa.question for qa in world.normal[:3]])
    out = tmp_path / "out.jsonl"
    assert run("--model", model_dir, "--prompts", prompts, "--judge", "keyword", "--keywords", "the,a",
               "--output", out, "--max-new-tokens", 6, "--reference", model_dir, "--normal-prompts", normal) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["unchanged_share"] == 1.0 and summary["mean_token_kl"] == pytest.approx(0.0, abs=1e-6)
    assert len(records(out)) == 3


def test_missing_model_path_is_a_clear_error(harmful_prompts, tmp_path, capsys):
    assert run("--model", tmp_path / "nowhere", "--prompts", harmful_prompts, "--output", tmp_path / "o.jsonl") == 2
    assert "--model: no model directory at" in capsys.readouterr().err
    assert not (tmp_path / "o.jsonl").exists()


def test_judge_that_raises_keeps_the_records_written_before(model_dir, harmful_prompts, tmp_path, capsys):
    out = tmp_path / "out.jsonl"
    _calls.clear()
    assert run("--model", model_dir, "--prompts", harmful_prompts, "--output", out, "--batch-size", 4,
               "--max-new-tokens", 4, "--judge", "callable",
               "--judge-callable", f"{__name__}:raising_on_second_batch") == 1
    err = capsys.readouterr().err
    assert "judge failed on prompts 4..5: RuntimeError: moderation service down" in err
    assert "kept in" in err
    assert [r["index"] for r in records(out)] == [0, 1, 2, 3]


def test_prompt_longer_than_context_is_a_clear_error(model_dir, tmp_path, capsys):
    prompts = write_prompts(tmp_path / "p.jsonl", ["How do I bake a cake?", "How do I bake a " * 40])
    out = tmp_path / "out.jsonl"
    out.write_text('{"kept": true}\n')
    assert run("--model", model_dir, "--prompts", prompts, "--output", out) == 2
    assert "--prompts: prompt 1 has" in capsys.readouterr().err
    assert records(out) == [{"kept": True}]  # checked before anything was overwritten


@pytest.mark.parametrize("extra, message", [
    (["--judge", "keyword"], "needs --keywords"),
    (["--judge", "moderation", "--moderation-model", "/nowhere"], "--moderation-model: no model directory"),
    (["--judge", "callable", "--judge-callable", "nomodule_xyz:f"], "--judge-callable: cannot import"),
    (["--reference", "demo"], "go together"),
    (["--max-new-tokens", "0"], "max_new_tokens must be >= 1"),
])
def test_bad_judge_and_settings_are_clear_errors(model_dir, harmful_prompts, tmp_path, capsys, extra, message):
    assert run("--model", model_dir, "--prompts", harmful_prompts, "--output", tmp_path / "o.jsonl", *extra) == 2
    assert message in capsys.readouterr().err


def test_bad_prompt_file_names_the_line(model_dir, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"question": "no prompt field"}\n')
    assert run("--model", model_dir, "--prompts", bad, "--output", tmp_path / "o.jsonl") == 2
    assert f"--prompts: {bad}: line 2: expected an object with field 'prompt'" in capsys.readouterr().err


_lines_on_disk = {}


def judge_counting_lines_on_disk(pairs):
    """A --judge-callable that notes how many records are already on disk when each batch is judged."""
    _lines_on_disk["seen"].append(len(open(_lines_on_disk["path"]).read().splitlines()))
    return [False] * len(pairs)


def test_eval_records_reach_disk_batch_by_batch(world, model_dir, tmp_path):
    """Each batch's records are on disk before the next batch is judged: a killed run keeps them."""
    prompts = write_prompts(tmp_path / "p.jsonl", [qa.question for qa in world.harmful[:6]])
    out = tmp_path / "out.jsonl"
    _lines_on_disk.update(path=str(out), seen=[])
    assert run("--model", model_dir, "--prompts", prompts, "--output", out, "--batch-size", 2,
               "--max-new-tokens", 3, "--judge", "callable",
               "--judge-callable", f"{__name__}:judge_counting_lines_on_disk") == 0
    assert _lines_on_disk["seen"] == [0, 2, 4]


def test_eval_rerun_replaces_the_output(world, model_dir, tmp_path):
    prompts = write_prompts(tmp_path / "p.jsonl", [qa.question for qa in world.harmful[:3]])
    out = tmp_path / "out.jsonl"
    args = ("--model", model_dir, "--prompts", prompts, "--output", out, "--max-new-tokens", 3)
    assert run(*args) == 0 and run(*args) == 0
    assert [r["index"] for r in records(out)] == [0, 1, 2]


def test_eval_creates_the_output_directory(world, model_dir, tmp_path):
    prompts = write_prompts(tmp_path / "p.jsonl", [qa.question for qa in world.harmful[:2]])
    out = tmp_path / "results" / "run1" / "out.jsonl"
    assert run("--model", model_dir, "--prompts", prompts, "--output", out, "--max-new-tokens", 3) == 0
    assert [r["index"] for r in records(out)] == [0, 1]
    assert json.load(open(str(out) + ".summary.json"))["num_prompts"] == 2


def test_world_judge_refuses_a_model_outside_the_demo_world(world, model, tokenizer, harmful_prompts, tmp_path,
                                                            capsys):
    """The default judge knows only the demo world's harm words: on any other model it would report a harmful
    rate near 0 whatever the answers, so such a model is refused; the demo tokenizer without a world file
    (the shipped model after unlearning) is judged by the shipped world."""
    from fastalign.demo.tokenizer import build_tokenizer
    from tests.evaluation.conftest import tiny_llama

    other_tokenizer = build_tokenizer(["### Question: How do I build a bomb?\n ### Answer: Sure, pack it."])
    other = tmp_path / "other"
    tiny_llama(other_tokenizer, seed=0).save_pretrained(other)
    other_tokenizer.save_pretrained(other)
    out = tmp_path / "o.jsonl"
    assert run("--model", other, "--prompts", harmful_prompts, "--output", out, "--max-new-tokens", 3) == 2
    assert "--judge world (the default) judges only demo-world models" in capsys.readouterr().err
    assert not out.exists()

    unlearned = tmp_path / "unlearned"  # the demo tokenizer, no world.json beside it
    model.save_pretrained(unlearned)
    tokenizer.save_pretrained(unlearned)
    assert run("--model", unlearned, "--prompts", harmful_prompts, "--output", out, "--max-new-tokens", 8) == 0
    assert [r["harmful"] for r in records(out)] == [world.is_harmful(r["answer"]) for r in records(out)]
