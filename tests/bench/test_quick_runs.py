"""Every benchmark script runs end to end in its --quick form on the CPU and writes its JSON record.

The numbers of a CPU smoke run mean nothing; what is tested is that the scripts a user runs on a GPU still
work after a change (they import the package, call its public API and the baselines' plumbing).
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
RUNS = {
    "bench_loss": ["--quick"],
    "bench_tree": ["--quick"],
    "bench_unlearn": ["--quick", "--reps", "1"],
    "bench_rain": ["--quick", "--prompts", "1", "--concurrency", "2", "--judge-prompts", "2",
                   "--max-new-tokens", "3", "--root-visits", "4"],
}
RECORD_NAMES = {"bench_rain": "rain"}


def methods_of_a_quantity_agree(results):
    """bench_loss compares like with like: each row's loss is within fp32 rounding of the first of its quantity."""
    by_quantity = {}
    for row in results:
        by_quantity.setdefault(row["quantity"], []).append(row["method"])
        assert row["loss_rel_diff"] < 1e-5, row
    assert by_quantity["mean CE"][:1] == ["fastalign"] and "naive torch" in by_quantity["mean CE"], by_quantity
    assert by_quantity["KL two heads"] == ["fastalign", "naive torch"], by_quantity


def ways_of_one_objective_agree(results):
    """bench_unlearn times one objective: every way but the reference recipe has the first step's loss of the first."""
    assert [row["method"] for row in results if "loss_rel_diff" in row] == ["fastalign", "unfused baseline",
                                                                           "fastalign cached"], results
    assert all(row["loss_rel_diff"] < 1e-5 for row in results if "loss_rel_diff" in row), results


def runner_matches_dense_attention_and_hf_generate(results):
    """bench_tree's paged attention equals dense sdpa (fp32), and the runner decodes HF generate's greedy tokens."""
    attention = [row for row in results if row["section"] == "attention"]
    assert attention and all(row["max_diff"] < 1e-5 for row in attention), attention
    (ours,) = [row for row in results if row["section"] == "decode" and row["method"] == "fastalign TreeRunner"]
    assert ours["same_greedy_tokens"] == ours["new_tokens"], ours


def slow_engine_commits_the_same_tokens(results):
    """bench_rain's speed-up compares two engines that made the same decisions."""
    (slow,) = [row for row in results if row["engine"] == "slow"]
    assert slow["same_decisions"] is True, slow


RECORD_CHECKS = {"bench_loss": methods_of_a_quantity_agree, "bench_unlearn": ways_of_one_objective_agree,
                 "bench_tree": runner_matches_dense_attention_and_hf_generate,
                 "bench_rain": slow_engine_commits_the_same_tokens}


@pytest.mark.parametrize("script", sorted(RUNS))
def test_quick_run_writes_its_record(script, tmp_path):
    # without Triton's interpreter, which the kernel tests cover: the scripts' CPU paths alone, in seconds
    env = {**{k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"},
           "FASTALIGN_BENCH_RESULTS": str(tmp_path), "FASTALIGN_COMMIT": "test"}
    done = subprocess.run([sys.executable, str(ROOT / "bench" / f"{script}.py"), *RUNS[script]], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    (path,) = tmp_path.glob(f"{RECORD_NAMES.get(script, script)}-cpu-test.json")
    record = json.loads(path.read_text())
    assert record["commit"] == "test" and record["device"].startswith("cpu") and record["results"]
    assert not [row for row in record["results"] if row.get("error")], record["results"]
    RECORD_CHECKS.get(script, lambda results: None)(record["results"])
