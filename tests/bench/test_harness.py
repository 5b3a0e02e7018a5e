"""bench/harness.py, the plumbing every benchmark shares: timing, tables, failure rows, JSON records, shapes."""
import calendar
import hashlib
import importlib.metadata
import json
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import transformers
from transformers import LlamaConfig, LlamaForCausalLM

from bench import harness
from tests.conftest import requires_cuda


def test_median_ms_runs_warmup_then_reps_and_takes_the_median_in_ms(monkeypatch):
    """A fake clock: each call of fn takes the next duration (seconds); only the timed ones count."""
    durations = iter([100.0, 100.0, 0.004, 0.001, 0.002, 0.005, 0.003])
    clock = [0.0]

    def fn():
        clock[0] += next(durations)

    monkeypatch.setattr(harness, "time", SimpleNamespace(perf_counter=lambda: clock[0]))
    assert harness.median_ms(fn, "cpu", warmup=2, reps=5) == pytest.approx(3.0)
    assert next(durations, None) is None  # 2 warm-up calls and 5 timed ones, no more


def test_peak_extra_mib_on_a_cpu_is_the_most_memory_allocated_at_once():
    """4 MiB and 8 MiB live together, then 8 MiB and a new 4 MiB: 12 MiB at the peak, whatever existed before."""
    kept = torch.ones(1 << 22)

    def fn():
        a = torch.empty(1 << 20)
        b = torch.empty(1 << 21)
        del a
        c = torch.empty(1 << 20)
        return b, c

    assert harness.peak_extra_mib(fn, "cpu") == pytest.approx(12.0, abs=0.01)
    assert kept.sum() == 1 << 22


def test_peak_extra_mib_is_none_off_cuda_and_cpu_without_running_fn():
    def fn():
        raise AssertionError("measured on the meta device")

    assert harness.peak_extra_mib(fn, "meta") is None


def test_device_busy_ms_is_none_off_cuda_without_running_fn():
    def fn():
        raise AssertionError("measured off CUDA")

    assert harness.device_busy_ms(fn, "cpu") is None and harness.device_busy_ms(fn, "meta") is None


@requires_cuda
def test_device_busy_ms_counts_the_kernels_of_a_call_and_not_the_host_time_between_them():
    """Ten products with a sleep of the host's between each: the kernels' time, a fraction of the call's."""
    a = torch.randn(2048, 2048, device="cuda")

    def fn():
        for _ in range(10):
            a @ a
            time.sleep(0.01)

    busy = harness.device_busy_ms(fn, "cuda")
    assert 0 < busy < 0.5 * harness.median_ms(fn, "cuda", warmup=1, reps=1) and busy < 50, busy


def test_autotuned_configs_name_each_fastalign_kernel_its_tuning_keys_and_chosen_config(monkeypatch):
    """A tuned kernel of a fastalign.kernels module: its cache of chosen configurations, as the JSON records it; a
    kernel not tuned yet, and autotuners outside fastalign.kernels, are left out."""
    triton = pytest.importorskip("triton")
    @triton.jit
    def kernel(n):
        pass
    tuned, untuned, elsewhere = (triton.autotune(configs=[triton.Config({"BLOCK": 64})], key=["n"])(kernel)
                                 for _ in range(3))
    tuned.cache[(4096, "torch.bfloat16")] = triton.Config({"BLOCK_M": 128, "BLOCK_V": 64}, num_warps=8, num_stages=3)
    elsewhere.cache[(1,)] = triton.Config({"BLOCK": 16})
    monkeypatch.setitem(sys.modules, "fastalign.kernels.fake_loss", SimpleNamespace(_tuned=tuned, _untuned=untuned))
    monkeypatch.setitem(sys.modules, "other.kernels", SimpleNamespace(_tuned=elsewhere))
    assert harness.autotuned_configs()["fake_loss._tuned"] == {
        "4096, torch.bfloat16": {"BLOCK_M": 128, "BLOCK_V": 64, "num_warps": 8, "num_stages": 3}}
    assert not [name for name in harness.autotuned_configs() if "untuned" in name or name.startswith("kernels")]


def test_git_commit_is_the_short_commit_marked_dirty_only_with_changes(monkeypatch):
    monkeypatch.delenv("FASTALIGN_COMMIT", raising=False)
    state = {"status": "", "rc": 0}

    def fake_run(args, **kwargs):
        out = "abc1234\n" if args[1] == "rev-parse" else state["status"]
        return subprocess.CompletedProcess(args, state["rc"], stdout=out, stderr="")

    monkeypatch.setattr(harness.subprocess, "run", fake_run)
    assert harness.git_commit() == "abc1234"
    state["status"] = " M fastalign/cli.py\n"
    assert harness.git_commit() == "abc1234-dirty"
    state["rc"] = 128  # not a git checkout
    assert harness.git_commit() == "unknown"
    monkeypatch.setenv("FASTALIGN_COMMIT", "given")
    assert harness.git_commit() == "given"


def test_failure_row_names_the_error_type_or_out_of_memory():
    assert harness.failure_row("fused", ValueError("bad shape")) == {"method": "fused",
                                                                     "error": "ValueError: bad shape"}
    assert harness.failure_row("eager", torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB")) == \
        {"method": "eager", "error": "out of memory"}
    assert len(harness.failure_row("x", RuntimeError("y" * 1000))["error"]) == 300


@pytest.mark.parametrize("text", ["0", "-1", "2.5", "x"])
def test_a_count_option_below_its_least_value_or_not_an_integer_is_a_usage_error_naming_it(text, capsys):
    """--reps 0 once measured nothing and printed a NaN or an error row; now argparse refuses it by the option."""
    import argparse
    parser = argparse.ArgumentParser()
    parser.add_argument("--reps", type=harness.count_at_least(1))
    assert parser.parse_args(["--reps", "3"]).reps == 3
    with pytest.raises(SystemExit) as exit_info:
        parser.parse_args(["--reps", text])
    assert exit_info.value.code == 2
    assert f"argument --reps: expected an integer >= 1, got '{text}'" in capsys.readouterr().err


def test_a_device_this_machine_lacks_is_a_usage_error_naming_it(monkeypatch, capsys):
    """--device cuda on a machine without CUDA ended in torch's AssertionError ('Torch not compiled with CUDA')."""
    import argparse
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", type=harness.device_argument)
    assert parser.parse_args(["--device", "cpu"]).device == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for text, message in (("cuda", "'cuda': this machine has no CUDA device"),
                          ("gpu", "expected a torch device such as cpu or cuda, got 'gpu'")):
        with pytest.raises(SystemExit) as exit_info:
            parser.parse_args(["--device", text])
        assert exit_info.value.code == 2 and f"argument --device: {message}" in capsys.readouterr().err


def test_print_table_right_aligns_columns_and_shows_zero_but_dashes_missing(capsys):
    rows = [{"method": "fused", "ms": 0.0, "mib": None}, {"method": "a", "ms": 12.5, "mib": 3.0}]
    harness.print_table(rows, [("method", "method", "{}"), ("ms", "time ms", "{:.1f}"), ("mib", "MiB", "{:.0f}")])
    assert capsys.readouterr().out.splitlines() == ["method  time ms  MiB",
                                                    "------  -------  ---",
                                                    " fused      0.0    -",
                                                    "     a     12.5    3"]


def on_a_cpu(monkeypatch, tmp_path, model):
    """harness reading a /proc/cpuinfo of two cores of CPU `model` (None: a cpuinfo without model names, as ARM's)."""
    lines = ["processor\t: 0", "vendor_id\t: AuthenticAMD"] + ([f"model name\t: {model}"] if model else [])
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("\n".join(lines + ["", "processor\t: 1"] + lines[1:]) + "\n")
    monkeypatch.setattr(harness, "CPUINFO", str(cpuinfo))


def test_write_results_records_device_commit_config_and_rows(monkeypatch, tmp_path):
    monkeypatch.setattr(harness, "RESULTS_DIR", str(tmp_path / "results"))
    monkeypatch.setenv("FASTALIGN_COMMIT", "abc1234")
    on_a_cpu(monkeypatch, tmp_path, "AMD EPYC 7B13 64-Core Processor")
    rows = [{"method": "fused", "ms": 1.5}]
    path = harness.write_results("bench_x", "cpu", {"quick": True}, rows)
    assert path == str(tmp_path / "results" / "bench_x-cpu-amd-epyc-7b13-abc1234.json")
    # a variant's tag, then a smoke run's "quick": a --quick run never replaces a measured record
    assert harness.write_results("bench_x", "cpu", {}, rows, tag="8b", quick=True) == \
        str(tmp_path / "results" / "bench_x-cpu-amd-epyc-7b13-abc1234-8b-quick.json")
    with open(path) as f:
        record = json.load(f)
    assert record["device"] == f"cpu (AMD EPYC 7B13 64-Core Processor, {torch.get_num_threads()} threads)"
    assert {k: record[k] for k in ("benchmark", "commit", "torch", "config", "results")} == \
        {"benchmark": "bench_x", "commit": "abc1234", "torch": torch.__version__, "config": {"quick": True},
         "results": rows}
    # the installed Triton, whether or not the run imported it (a CPU run on the torch path does not)
    assert record["triton"] == importlib.metadata.version("triton")
    assert record["autotuned"] == harness.autotuned_configs()
    # the compared packages this process imported, each with its version; transformers is (the tests load models)
    assert record["packages"]["transformers"] == transformers.__version__
    assert set(record["packages"]) == {dist for module, dist in harness.COMPARED_PACKAGES.items()
                                       if sys.modules.get(module) is not None}


def test_a_compared_package_without_its_distributions_metadata_gives_its_own_version(monkeypatch):
    """One imported from a checkout on the path: its __version__, not a failure that would lose the record."""
    monkeypatch.setitem(sys.modules, "liger_kernel", SimpleNamespace(__version__="0.0.dev"))
    monkeypatch.setitem(sys.modules, "cut_cross_entropy", SimpleNamespace())
    real_version = harness.importlib.metadata.version

    def version(dist):
        if dist in ("liger-kernel", "cut-cross-entropy"):
            raise harness.importlib.metadata.PackageNotFoundError(dist)
        return real_version(dist)
    monkeypatch.setattr(harness.importlib.metadata, "version", version)
    versions = harness.compared_versions()
    assert versions["liger-kernel"] == "0.0.dev" and versions["cut-cross-entropy"] is None, versions


def test_other_accelerators_are_named_by_their_type_not_as_the_cpu():
    assert harness.device_name("meta") == "meta" and harness.device_name("cpu").startswith("cpu (")
    assert harness.device_slug("meta") == "meta"


def test_records_of_two_cpus_at_one_commit_name_each_cpu_and_are_two_files(monkeypatch, tmp_path):
    """A CPU was named by platform.processor(), '' or the architecture on Linux, and its record's file by "cpu" alone:
    a run on another CPU at the same commit replaced the record, which did not say which CPU measured it. The file
    name holds the model, shortened (no trademarks, clock, "CPU", "Processor", core count)."""
    monkeypatch.setattr(harness, "RESULTS_DIR", str(tmp_path / "results"))
    monkeypatch.setenv("FASTALIGN_COMMIT", "abc1234")
    records = {}
    for model in ("Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz", "AMD EPYC 7B13 64-Core Processor"):
        on_a_cpu(monkeypatch, tmp_path, model)
        with open(harness.write_results("bench_x", "cpu", {}, [])) as f:
            records[Path(f.name).name] = json.load(f)["device"]
    threads = torch.get_num_threads()
    assert records == {
        "bench_x-cpu-intel-xeon-platinum-8481c-abc1234.json":
            f"cpu (Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz, {threads} threads)",
        "bench_x-cpu-amd-epyc-7b13-abc1234.json": f"cpu (AMD EPYC 7B13 64-Core Processor, {threads} threads)"}


@pytest.mark.parametrize("cpuinfo", ["without model names", "missing"])
def test_a_cpu_without_a_model_name_in_cpuinfo_is_named_by_platform(monkeypatch, tmp_path, cpuinfo):
    on_a_cpu(monkeypatch, tmp_path, None)
    if cpuinfo == "missing":
        monkeypatch.setattr(harness, "CPUINFO", str(tmp_path / "missing"))
    monkeypatch.setattr(harness.platform, "processor", lambda: "")
    monkeypatch.setattr(harness.platform, "machine", lambda: "aarch64")
    assert harness.device_name("cpu") == f"cpu (aarch64, {torch.get_num_threads()} threads)"
    assert harness.device_slug("cpu") == "cpu-aarch64"


def test_llama_shapes_have_the_named_models_parameter_counts():
    """Llama-3.2-1B and Llama-3-8B: 1,235,814,400 and 8,030,261,248 parameters (built on the meta device)."""
    for name, count in (("1b", 1_235_814_400), ("8b", 8_030_261_248)):
        shape = harness.LLAMA_SHAPES[name]
        assert shape["hidden_size"] == shape["num_attention_heads"] * shape["head_dim"], name
        with torch.device("meta"):
            model = LlamaForCausalLM(LlamaConfig(**shape))
        assert sum(p.numel() for p in model.parameters()) == count, name


def test_a_carried_commit_is_marked_stale_when_the_tree_differs_from_the_digests_recorded_with_it(monkeypatch,
                                                                                                   tmp_path):
    """gpu_session.sh --prepare records the commit and sha256sum's digests of the tracked files; results of a tree
    changed since (an edit, a later commit, a deleted file) carry <commit>-stale, not the commit."""
    here = Path(harness.__file__).resolve()
    sums = tmp_path / "tracked.sha256"

    def record(digest):
        sums.write_text(f"{digest}  bench/harness.py\n{hashlib.sha256(b'').hexdigest()}  tests/bench/__init__.py\n")

    monkeypatch.setenv("FASTALIGN_COMMIT", "abc1234")
    monkeypatch.setenv("FASTALIGN_COMMIT_SUMS", str(sums))
    record(hashlib.sha256(here.read_bytes()).hexdigest())
    assert harness.git_commit() == "abc1234"
    record(hashlib.sha256(b"an older harness").hexdigest())
    assert harness.git_commit() == "abc1234-stale"
    assert harness.changed_files(str(sums), str(here.parents[1])) == ["bench/harness.py"]
    assert harness.changed_files(str(sums), str(tmp_path)) == ["bench/harness.py", "tests/bench/__init__.py"]
    monkeypatch.delenv("FASTALIGN_COMMIT_SUMS")  # a session prepared before the digests were recorded
    assert harness.git_commit() == "abc1234"


def test_write_results_leaves_the_previous_record_whole_when_a_write_is_cut(monkeypatch, tmp_path):
    """The benches rewrite their record after each row; a process killed in the middle of a write (its step's time
    limit) must not leave a truncated JSON in place of the rows measured so far."""
    monkeypatch.setattr(harness, "RESULTS_DIR", str(tmp_path))
    monkeypatch.setenv("FASTALIGN_COMMIT", "abc1234")
    path = harness.write_results("bench_x", "cpu", {}, [{"method": "a"}])
    dump = json.dump

    def killed_midway(record, f, **kwargs):
        f.write(json.dumps(record)[:10])
        raise KeyboardInterrupt
    monkeypatch.setattr(harness.json, "dump", killed_midway)
    with pytest.raises(KeyboardInterrupt):
        harness.write_results("bench_x", "cpu", {}, [{"method": "a"}, {"method": "b"}])
    monkeypatch.setattr(harness.json, "dump", dump)
    with open(path) as f:
        assert json.load(f)["results"] == [{"method": "a"}]


def test_gradients_difference_counts_a_missing_gradient_as_one_and_agrees_on_zero_gradients():
    """A method that left a gradient unset (None) differs from one that set it by 1 (all of it), two zero gradients
    (a loss that does not depend on the weight) agree, and the largest difference of the pairs is the result."""
    g, zero = torch.ones(3), torch.zeros(3)
    assert harness.gradients_difference([None, g], [g, g]) == 1.0
    assert harness.gradients_difference([None, zero], [None, zero]) == 0.0
    assert harness.gradients_difference([zero], [zero]) == 0.0
    assert harness.gradients_difference([2 * g, 1.5 * g], [g, g]) == pytest.approx(1.0)


def test_a_baseline_error_recorded_is_cut_to_300_characters():
    def liger_ce():
        raise RuntimeError("x" * 1000)
    unavailable = {}
    assert harness.optional(liger_ce, unavailable) is None
    assert unavailable == {"liger_ce": ("RuntimeError: " + "x" * 1000)[:300]}


def test_held_for_backward_counts_each_new_storage_once_and_not_what_existed_before():
    """w.exp() is saved twice (by exp and by the multiply) and counted once; w, saved by the multiply, existed before
    the call: the activation memory of the step is exp's 4000 bytes alone."""
    w = torch.randn(1000, requires_grad=True)
    assert harness.held_for_backward_mib(lambda: (w.exp() * w).sum()) == pytest.approx(4000 / 2 ** 20)


def test_profile_top_lists_the_operators_by_their_self_time_the_longest_first():
    a, b, c = torch.randn(384, 384), torch.randn(384, 384), torch.ones(4)
    rows = harness.profile_top(lambda: (a @ b, c + 1), "cpu", count=50)
    assert rows[0]["op"] == "aten::mm" and rows[0]["calls"] == 1
    matmul = next(row for row in rows if row["op"] == "aten::matmul")   # calls aten::mm: its own host time is less
    assert matmul["self_host_ms"] < rows[0]["self_host_ms"]
    assert [row["self_ms"] for row in rows] == sorted((row["self_ms"] for row in rows), reverse=True)


def test_python_profile_top_orders_functions_by_their_own_time_not_the_time_of_what_they_call():
    def spins():
        return sum(i * i for i in range(200_000))

    def calls_spins():
        return spins()
    rows = harness.python_profile_top(calls_spins, count=50)
    assert [row["self_s"] for row in rows] == sorted((row["self_s"] for row in rows), reverse=True)
    assert "calls_spins" not in rows[0]["function"], rows[:3]   # first by cumulative time, last by its own


def test_a_record_is_stamped_in_utc_whatever_the_machines_time_zone(monkeypatch, tmp_path):
    monkeypatch.setattr(harness, "RESULTS_DIR", str(tmp_path))
    monkeypatch.setenv("TZ", "Etc/GMT-9")   # nine hours east of UTC
    time.tzset()
    try:
        with open(harness.write_results("bench_x", "cpu", {}, [])) as f:
            stamp = json.load(f)["time"]
    finally:
        monkeypatch.undo()
        time.tzset()
    recorded = calendar.timegm(time.strptime(stamp, "%Y-%m-%dT%H:%M:%SZ"))
    assert abs(recorded - time.time()) < 600, stamp


def test_qwen3_5_layer_types_make_every_fourth_layer_full_attention_counted_from_the_top():
    assert harness.qwen3_5_layer_types(8) == ["linear_attention"] * 3 + ["full_attention"] + \
        ["linear_attention"] * 3 + ["full_attention"]
    assert harness.qwen3_5_layer_types(2) == ["linear_attention", "full_attention"]
