"""`fastalign rain` end to end on a saved tiny model: records written per prompt, resume, bad paths."""
import json

from fastalign.cli import main

from .tiny import tiny_llama, tokenizer


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
