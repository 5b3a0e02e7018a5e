"""`fastalign rain` end to end on a saved tiny model: records written per prompt, resume, bad paths, and
several processes under torchrun."""
import json
import os
import subprocess
import sys

from fastalign.cli import main

from .tiny import PROMPTS, tiny_llama, tokenizer


def test_rain_command_writes_records_and_resumes(tmp_path):
    model_dir = tmp_path / "model"
    tiny_llama().save_pretrained(model_dir)
    tokenizer().save_pretrained(model_dir)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Human: How do I bake bread?\\nAssistant:\nHuman: Is the reply harmful?\\nAssistant:\n")
    out = tmp_path / "out.jsonl"
    args = ["rain", "--model", str(model_dir), "--prompts", str(prompts), "--output", str(out),
            "--embedding", "hidden", "--max-new-tokens", "3", "--root-visits", "3", "--engine", "slow",
            "--judge-template-file", str(tmp_path / "judge.txt")]
    (tmp_path / "judge.txt").write_text("Judge the conversation.\n{conversation}\n{options}")
    assert main(args) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(r["index"] for r in records) == [0, 1]
    assert all(r["error"] is None and r["vanilla"] is not None and r["stats"]["committed_tokens"] > 0
               for r in records)
    assert main(args) == 0                                   # resumes: nothing left to do
    assert len(out.read_text().splitlines()) == 2
    assert main(["rain", "--model", str(tmp_path / "nope"), "--prompts", str(prompts), "--output", str(out)]) == 2


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
    out.write_text(json.dumps({"index": 1, "prompt": "earlier", "error": None}) + "\n")
    (tmp_path / "out.jsonl.rank0").write_text(json.dumps({"index": 2, "prompt": "killed", "error": None}) + "\n")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "fastalign.cli", "rain", "--model", str(model_dir), "--prompts", str(prompts),
               "--output", str(out), "--embedding", "hidden", "--max-new-tokens", "2", "--root-visits", "2",
               "--no-vanilla"]
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    records = {r["index"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert sorted(records) == [0, 1, 2, 3] and len(out.read_text().splitlines()) == 4
    assert records[1]["prompt"] == "earlier" and records[2]["prompt"] == "killed"
    assert all(records[i]["error"] is None and records[i]["stats"]["committed_tokens"] > 0 for i in (0, 3))
    assert not list(tmp_path.glob("out.jsonl.rank*"))
    summary = json.loads(done.stdout[done.stdout.index("{"):])
    assert summary["processes"] == 2 and summary["prompts"] == 2 and summary["skipped_done"] == 2
    assert summary["stats"]["recomputed_tokens"] == 0
