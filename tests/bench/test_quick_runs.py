"""Every benchmark script runs end to end in its --quick form on the CPU and writes its JSON record.

The numbers of a CPU smoke run mean nothing; what is tested is that the scripts a user runs on a GPU still
work after a change (they import the package, call its public API and the baselines' plumbing), that the methods
each compares compute the same thing, and that its derived numbers follow their definitions in the issues.
"""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench import harness

ROOT = Path(__file__).resolve().parents[2]
CPU = harness.device_slug("cpu")   # the records' device in their file names
RUNS = {
    "bench_loss": ["--quick"],
    "bench_tree": ["--quick"],
    "bench_unlearn": ["--quick", "--reps", "1"],
    "bench_rain": ["--quick", "--prompts", "1", "--concurrency", "2", "--judge-prompts", "2",
                   "--max-new-tokens", "3", "--root-visits", "4"],
    "bench_startup": ["--quick"],
    "bench_optimizer": ["--quick", "--reps", "1"],
    "bench_causal_lm_loss": ["--quick", "--reps", "1"],
}
RECORD_NAMES = {"bench_rain": "rain", "bench_startup": "startup"}


def close(a, b):
    return abs(a - b) <= 1e-9 * max(abs(a), abs(b))


def check_bench_loss(record):
    """Like compared with like: each row's loss and gradients are within fp32 rounding of the first of its
    quantity's, and its loss_rel_diff is that relative difference. Achieved TFLOP/s: the cross-entropy on 6 N H V
    (2 N H V forward), the issue's definition; the KL on 8 N H V (4 N H V forward: the policy's and the frozen
    reference's products, only the policy's with a backward); and as a fraction of the matmul peak."""
    by_quantity, first = {}, {}
    h, v, peak = (record["config"][k] for k in ("hidden", "vocab", "matmul_peak_tflops"))
    for row in record["results"]:
        by_quantity.setdefault(row["quantity"], []).append(row["method"])
        first_loss = first.setdefault((row["quantity"], row["n"]), row["loss"])
        assert close(row["loss_rel_diff"], abs(row["loss"] - first_loss) / abs(first_loss)), row
        # two losses small against their terms, so that fp32 rounding reached 1.2e-5 of them on CI's CPU: the signed
        # sum cancels (|loss| 24 against sum_t |w_t CE_t| about 1700 at the quick shape, 3 with the unseeded heads
        # of that run; one token's term wrong moves it by about 1), and the shared head's KL is 0.005, which naive
        # torch gets by subtracting log-probabilities of about -8; a wrong term moves either by far more than 1e-4
        loss_tolerance = 1e-4 if row["quantity"] in ("signed CE", "KL shared head") else 1e-5
        assert row["loss_rel_diff"] < loss_tolerance and row["grad_rel_diff"] < 1e-5, row
        fwd, fwd_bwd = (2, 6) if row["op"] == "linear_cross_entropy" else (4, 8)  # KL: the reference has no backward
        assert close(row["fwd_bwd_tflops"], fwd_bwd * row["n"] * h * v / (row["fwd_bwd_ms"] * 1e-3) / 1e12), row
        assert close(row["fwd_tflops"], fwd * row["n"] * h * v / (row["fwd_ms"] * 1e-3) / 1e12), row
        assert close(row["fraction_of_matmul_peak"], row["fwd_bwd_tflops"] / peak), row
    assert by_quantity["mean CE"][:1] == ["fastalign"] and "naive torch" in by_quantity["mean CE"], by_quantity
    # torch's own fused op where this torch has it (2.13 does), at fp32 rounding of fastalign's like the others
    torch_has_it = hasattr(torch.nn, "LinearCrossEntropyOptions")
    assert ("torch linear_cross_entropy chunked" in by_quantity["mean CE"]) == torch_has_it, by_quantity
    assert ("torch linear_cross_entropy chunked signed-weights" in by_quantity["signed CE"]) == torch_has_it
    # TRL's chunked log-probabilities and divergence where trl is installed
    trl = importlib.util.find_spec("trl") is not None
    assert ("trl chunked log-probs" in by_quantity["mean CE"]) == trl, by_quantity
    assert ("trl chunked log-probs signed-weights" in by_quantity["signed CE"]) == trl, by_quantity
    assert by_quantity["KL two heads"] == ["fastalign", "fastalign grads-in-forward", "naive torch",
                                           *["trl chunked divergence beta=0"] * trl], by_quantity
    assert by_quantity["KL shared head"] == ["fastalign shared-head", "fastalign shared-head grads-in-forward",
                                             "naive torch"], by_quantity


def check_bench_unlearn(record):
    """One objective timed several ways: every way but the reference recipe has the first step's loss and gradient
    signatures of the first, and loss_rel_diff is that relative difference; speed-ups are the other way's step time over
    this one's. The batch the config records: 2 harmful prompts, K mismatch answers to each, 2 normal examples."""
    results, c = record["results"], record["config"]
    assert c["rows"][0] == c["batch_size"] * (2 + c["mismatch_per_prompt"]) and c["mismatch_per_prompt"] == 5, c
    compared = [row for row in results if "loss_rel_diff" in row]
    assert [row["method"] for row in compared] == ["fastalign", "unfused baseline", "fastalign cached",
                                                   "unfused, answer rows only", "fastalign, padded rows",
                                                   "fastalign, AdamW after backward",
                                                   "fastalign, grads in forward", "fastalign, unfused layers"], results
    slots = {row["method"]: row["slots"] for row in compared}   # the forget prompts packed once for their mismatch rows
    assert slots["fastalign"] < slots["fastalign, padded rows"] == slots["unfused baseline"], slots
    held = {row["method"]: row["held_mib"] for row in compared}   # the norms and MLPs keep less for the backward
    assert held["fastalign"] < held["fastalign, unfused layers"], held
    first = compared[0]["first_step_loss"]
    assert all(close(row["loss_rel_diff"], abs(row["first_step_loss"] - first) / abs(first)) for row in compared)
    assert all(row["loss_rel_diff"] < 1e-5 for row in compared), results
    assert all(row["grad_rel_diff"] < 1e-4 for row in compared), results
    ms = {row["method"]: row["step_ms"] for row in results}
    for row in results:
        assert close(row["speedup_vs_reference"], ms["reference recipe"] / row["step_ms"]), row
        assert close(row["speedup_vs_unfused"], ms["unfused baseline"] / row["step_ms"]), row
        assert close(row["speedup_vs_sliced"], ms["unfused, answer rows only"] / row["step_ms"]), row


def check_bench_tree(record):
    """Paged attention equals dense sdpa (fp32) and its bandwidth counts unique KV bytes over the best time; the
    runner decodes HF generate's greedy tokens; ratios are against one child and against HF generate."""
    results = record["results"]
    attention = [row for row in results if row["section"] == "attention"]
    assert attention and all(row["max_diff"] < 1e-5 for row in attention), attention
    c = record["config"]
    token_bytes = 2 * c["kv_heads"] * c["head_dim"] * 4  # K and V, fp32
    for row in attention:
        # the prefix once, each row's suffix and new token, and each row's copy of the prefix's partial last block
        rows, prefix = row["rows"], row["prefix"]
        unique_tokens = prefix + rows * (c["suffix"] + 1) + (rows - 1) * (prefix % c["page"])
        assert close(row["unique_mib"], unique_tokens * token_bytes / 2 ** 20), row
        seconds = (row["graph_us"] or row["eager_us"]) * 1e-6
        assert close(row["unique_gbs"], row["unique_mib"] * 2 ** 20 / seconds / 1e9), row
        assert close(row["of_copy_bw"], row["unique_gbs"] / c["copy_bandwidth_gbs"]), row
    extend = [row for row in results if row["section"] == "extend"]
    runner = [row for row in extend if row["method"].startswith("TreeRunner (")]
    whole = [row for row in extend if row["method"] == "HF forward, whole sequences"]
    one_child = {row["cascade"]: row["ms"] for row in runner if row["children"] == 1}
    assert runner and all(close(row["vs_one_child"], row["ms"] / one_child[row["cascade"]]) for row in runner)
    first = runner[0]["ms"]   # the baseline, measured once, against the first runner's one child
    assert len(whole) == 2 and all(close(row["vs_one_child"], row["ms"] / first) for row in whole), whole
    decode = {row["method"]: row for row in results if row["section"] == "decode"}
    ours, hf = decode["fastalign TreeRunner"], decode["HF generate (cache)"]
    assert ours["same_greedy_tokens"] == ours["new_tokens"] and ours["max_logit_diff"] < 1e-4, ours   # fp32
    assert close(ours["vs_hf"], ours["ms"] / hf["ms"]), decode
    assert all(close(row["tokens_per_s"], row["new_tokens"] / (row["ms"] * 1e-3)) for row in decode.values()), decode
    # what each section's rows say they measured is what the config asked for
    assert {(row["prefix"], row["rows"]) for row in attention} == {(p, r) for p in c["prefix"] for r in c["rows"]}
    assert [(row["children"], row["tokens_each"], row["prefix"]) for row in runner] == [
        (k, c["child_tokens"], c["tree_prefix"]) for k in (1, c["children"])] * len(one_child), extend
    assert [row["children"] for row in whole] == [1, c["children"]], whole
    rewind = [row["branch_tokens"] for row in results if row["section"] == "rewind"]
    assert rewind == c["branch_lengths"], rewind
    assert ours["prompt"] == c["decode_prompt"] and ours["new_tokens"] == c["decode_tokens"], ours


def check_bench_rain(record):
    """The speed-up compares two engines that made the same decisions, per committed token; the per-commit, per-call
    and per-iteration numbers are their quotients; each row ran the prompts its section names (the first --prompts,
    C at concurrency C, --judge-prompts for virtual loss), and virtual loss on makes fewer model calls per iteration
    than off (several inner iterations share a call)."""
    rows = {row["engine"]: row for row in record["results"]}
    tree, slow = rows["tree"], rows["slow"]
    assert slow["same_decisions"] is True and slow["committed"] == tree["committed"] > 0, slow
    for row in rows.values():
        assert close(row["s_per_commit"], row["wall_s"] / row["committed"]), row
        assert close(row["commits_per_s"], row["committed"] / row["wall_s"]), row
        assert close(row["tokens_per_commit"], row["tokens"] / row["committed"]), row
        assert close(row["calls_per_commit"], row["calls"] / row["committed"]), row
        assert close(row["over_minimum"], row["tokens"] / row["minimum"]), row
        assert row["errors"] == 0, row
    assert close(tree["speedup_per_commit"], slow["s_per_commit"] / tree["s_per_commit"]), tree
    assert close(tree["token_ratio_vs_slow"], slow["tokens_per_commit"] / tree["tokens_per_commit"]), tree
    assert close(tree["rain_over_greedy"], tree["wall_s"] / tree["greedy_s_same_length"]), tree
    assert tree["recomputed"] == 0 and tree["tokens"] == tree["minimum"], tree
    for row in rows.values():   # the tree engine's rows split their wall time at the model's forwards
        if row["engine"] != "slow":
            assert 0 < row["model_s"] < row["wall_s"] and close(row["model_s"] + row["outside_model_s"], row["wall_s"])
            assert close(row["outside_model_us_per_row"], 1e6 * row["outside_model_s"] / (row["rows_per_call"]
                                                                                          * row["calls"])), row
    option = dict(zip(RUNS["bench_rain"][1::2], RUNS["bench_rain"][2::2]))
    assert tree["prompts"] == slow["prompts"] == int(option["--prompts"]), rows
    assert rows[f"tree x{option['--concurrency']}"]["prompts"] == int(option["--concurrency"]), rows
    virtual = [rows["tree vl=1"], rows["tree vl=4"]]
    for row in virtual:
        assert row["prompts"] == row["judged"] == int(option["--judge-prompts"]), row
        assert close(row["calls_per_iteration"], row["calls"] / row["iterations"]), row
    assert [row["parallel_leaves"] for row in virtual] == [1, 4], virtual
    assert virtual[1]["calls_per_iteration"] < virtual[0]["calls_per_iteration"], virtual


def check_bench_startup(record):
    """Every row against `import torch`, the first; the heavy libraries each row left imported: a transformers model
    class brings them, importing fastalign or taking its fused ops none, the first fused-loss call torch._dynamo (the
    op keeps out of compiled graphs; dynamo imports triton) and none of the engines' libraries."""
    rows = {row["what"]: row for row in record["results"]}
    torch_s = rows["import torch"]["median_s"]
    assert all(close(row["over_torch_s"], row["median_s"] - torch_s) for row in rows.values()), rows
    assert {"transformers", "torch._dynamo"} <= set(rows["import a transformers model class"]["heavy_modules"])
    assert rows["import fastalign"]["heavy_modules"] == [], rows["import fastalign"]
    assert rows["from fastalign import linear_cross_entropy"]["heavy_modules"] == []
    assert "torch._dynamo" in rows["first fused loss"]["heavy_modules"], rows["first fused loss"]
    assert not {"transformers", "accelerate", "peft"} & set(rows["first fused loss"]["heavy_modules"])


def check_bench_optimizer(record):
    """Three optimizers over the same weights, and torchao's stochastic rounding where it is installed: the bytes a
    weight each keeps (KahanAdamW: bf16 weight, moments and compensation), the fidelity that sets them apart (torch's
    AdamW on bf16 weights loses the updates at the SPEC's learning rate; stochastic rounding keeps them on average,
    with noise), and speed-ups against fp32 AdamW's step."""
    rows = {row["method"]: row for row in record["results"]}
    torchao = importlib.util.find_spec("torchao") is not None
    assert list(rows) == ["KahanAdamW", "torch AdamW, bf16", "torch AdamW, fp32",
                          *["torchao AdamW, bf16 stochastic rounding"] * torchao], rows
    assert [row["bytes_per_weight"] for row in rows.values()] == [8.0, 6.0, 12.0, *[6.0] * torchao], rows
    errors = [row["fidelity_error"] for row in rows.values()]
    assert errors[0] < 0.05 and errors[1] > 0.9 and errors[2] < 0.01, rows
    assert all(error > 10 * errors[0] for error in errors[3:]), rows
    # the weights the model computes with: KahanAdamW's are float64 AdamW's rounded to bf16 (the floor), the others'
    # are what the step keeps (its compensation aside, KahanAdamW's error is the others' measure)
    floor = rows["KahanAdamW"]["bf16_floor"]
    assert rows["KahanAdamW"]["weights_fidelity_error"] <= 1.01 * floor < rows["torch AdamW, bf16"]["fidelity_error"]
    assert all(row["weights_fidelity_error"] == row["fidelity_error"] for row in list(rows.values())[1:]), rows
    fp32_ms = rows["torch AdamW, fp32"]["step_ms"]
    assert all(close(row["speedup_vs_fp32"], fp32_ms / row["step_ms"]) for row in rows.values()), rows


def check_bench_causal_lm_loss(record):
    """The fused losses against the first way of their quantity, the model's own cross-entropy and the KL from both
    models' logits (fp32: the same loss and gradients to rounding), each row's speed-up and leanness against that
    row, and the logits' size the config states."""
    rows, c = record["results"], record["config"]
    assert [(row["quantity"], row["method"]) for row in rows][:7] == [
        ("CE", "model's own loss"), ("CE", "fastalign CausalLMLoss"), ("CE", "fastalign fused model forward"),
        ("CE", "fastalign grads-in-forward"), ("CE", "fastalign + fused layers"), ("KL", "KL from both models' logits"),
        ("KL", "fastalign CausalLMKLDiv")]
    # then torch's own fused op where this torch has it (2.13 does), Liger where it is installed, and TRL's divergence
    # and fused head where trl is, the head last (it patches the model's forward)
    assert [row["method"] for row in rows[7:8]] == (["torch linear_cross_entropy chunked on hidden states"]
                                                    if hasattr(torch.nn, "LinearCrossEntropyOptions") else []), rows
    trl = importlib.util.find_spec("trl") is not None
    assert [row["method"] for row in rows if row["method"].startswith("trl")] == [
        "trl chunked divergence on hidden states", "trl fused LM head"] * trl, rows
    assert rows[-1]["method"] == "trl fused LM head" or not trl, rows
    first = {}
    for row in rows:
        base = first.setdefault(row["quantity"], row)
        assert row["loss_rel_diff"] < 1e-5 and row["grad_rel_diff"] < 1e-4, row
        assert close(row["loss_rel_diff"], abs(row["loss"] - base["loss"]) / abs(base["loss"])), row
        assert close(row["speedup"], base["step_ms"] / row["step_ms"]), row
        # (at this tiny shape a step's extra memory can round to none or below, and then has no ratio)
        if row["extra_mib"] > 0 and base["extra_mib"] > 0:
            assert close(row["leaner"], base["extra_mib"] / row["extra_mib"]), row
        else:
            assert "leaner" not in row, row
    # the fused forward is CausalLMLoss's computation: the same peak (the profiler's count, exact on a CPU); and each
    # step allocates its own gradients, which its peak holds (a step that freed the previous ones had a lower peak)
    assert rows[1]["peak_mib"] == rows[2]["peak_mib"], rows[1:3]
    assert all(row["extra_mib"] >= 0 for row in rows), rows
    assert rows[5]["loss"] > 1e-3   # the reference is another model: a KL well above rounding
    assert close(c["logits_mib"], c["rows"] * c["tokens"] * c["vocab"] * 4 / 2 ** 20), c


RECORD_CHECKS = {"bench_loss": check_bench_loss, "bench_unlearn": check_bench_unlearn, "bench_tree": check_bench_tree,
                 "bench_rain": check_bench_rain, "bench_startup": check_bench_startup,
                 "bench_optimizer": check_bench_optimizer, "bench_causal_lm_loss": check_bench_causal_lm_loss}


def another_fastalign(tmp_path):
    """A folder holding a fastalign package that cannot be imported: put ahead of the checkout on PYTHONPATH (as an
    installed wheel, or another checkout's editable install, is), the scripts must still measure the checkout whose
    commit their records name (five of them imported whatever `import fastalign` found first)."""
    package = tmp_path / "elsewhere" / "fastalign"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("raise ImportError('another fastalign than the checkout the bench is in')\n")
    return str(package.parent)


@pytest.mark.parametrize("script", sorted(RUNS))
def test_quick_run_writes_its_record(script, tmp_path):
    # without Triton's interpreter, which the kernel tests cover: the scripts' CPU paths alone, in seconds
    env = {**{k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"},
           "FASTALIGN_BENCH_RESULTS": str(tmp_path), "FASTALIGN_COMMIT": "test",
           "PYTHONPATH": another_fastalign(tmp_path)}
    done = subprocess.run([sys.executable, str(ROOT / "bench" / f"{script}.py"), *RUNS[script]], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    (path,) = tmp_path.glob(f"{RECORD_NAMES.get(script, script)}-{CPU}-test-quick.json")
    record = json.loads(path.read_text())
    assert record["commit"] == "test" and record["device"].startswith("cpu") and record["results"]
    assert not [row for row in record["results"] if row.get("error")], record["results"]
    RECORD_CHECKS[script](record)


def test_quick_run_of_the_hybrid_family_writes_its_own_record(tmp_path):
    """bench_tree --family qwen3_5: Qwen3.5's hybrid runs with each span's recurrent state kept, beside the default
    run's record (its name holds the family), the runner decoding HF generate's greedy tokens."""
    env = {**{k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"},
           "FASTALIGN_BENCH_RESULTS": str(tmp_path), "FASTALIGN_COMMIT": "test"}
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_tree.py"), "--quick", "--sections", "runner",
                           "--family", "qwen3_5", "--branch-lengths", "16"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    (path,) = tmp_path.glob(f"bench_tree-{CPU}-test-qwen3_5-runner-quick.json")   # the family, the one section
    record = json.loads(path.read_text())
    assert record["config"]["family"] == "qwen3_5" and record["config"]["branch_lengths"] == [16]
    results = record["results"]
    assert not [row for row in results if row.get("error")], results
    assert {row["method"] for row in results if row["section"] == "extend"} == {
        "TreeRunner (HFStateCacheModel)", "HF forward, whole sequences"}
    decode = {row["method"]: row for row in results if row["section"] == "decode"}
    assert decode["fastalign TreeRunner"]["same_greedy_tokens"] == record["config"]["decode_tokens"], decode


def test_quick_run_of_the_8b_ways(tmp_path):
    """bench_unlearn --quick --preset 8b: the ways of the one-GPU 8B run (LoRA with the adapter-disabled reference;
    every weight in bf16, stepped by KahanAdamW, with the cached reference), with gradient checkpointing, on the tiny
    model in bf16: they run and, on the same untrained model, agree on the first step's loss."""
    env = {**{k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"},
           "FASTALIGN_BENCH_RESULTS": str(tmp_path), "FASTALIGN_COMMIT": "test"}
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_unlearn.py"), "--quick", "--preset", "8b",
                           "--dtype", "bfloat16", "--reps", "1"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    # a record of its own, beside the comparison's, which gpu_session.sh measures in the same call
    assert [path.name for path in tmp_path.glob("bench_unlearn-*")] == [f"bench_unlearn-{CPU}-test-8b-quick.json"]
    record = json.loads((tmp_path / f"bench_unlearn-{CPU}-test-8b-quick.json").read_text())
    config, results = record["config"], record["results"]
    assert config["ways"] == "8b" and config["preset"] == "quick" and config["gradient_checkpointing"], config
    assert config["dtype"] == "torch.bfloat16", config
    assert [row["method"] for row in results] == ["fastalign LoRA", "fastalign full + cached"], results
    assert not [row for row in results if row.get("error")], results
    assert results[1]["loss_rel_diff"] == 0.0 and results[1]["step_ms"] > 0, results
