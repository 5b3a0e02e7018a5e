"""The benchmark scripts' parts, in process, on tiny shapes: what each compares and how it derives its numbers.

test_quick_runs checks the JSON records of whole runs; these check what a record cannot show: that each method's
loss is its quantity's definition on inputs shared by the quantity's methods, that a comparison would see a
difference (a perturbed method), that unique KV tokens are the pool slots the rows read, that timing loops leave
out their warm-up and that failures become rows. Timings are faked (never asserted on): only formulas are checked.
"""
import collections
import contextlib
import copy
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import bench_causal_lm_loss  # noqa: E402
import bench_loss  # noqa: E402
import bench_optimizer  # noqa: E402
import bench_rain  # noqa: E402
import bench_tree  # noqa: E402
import bench_unlearn  # noqa: E402
from bench import harness  # noqa: E402
from tests.conftest import TRITON_DEVICE  # noqa: E402
from tests.unlearn import tiny as unlearn_tiny  # noqa: E402


def fake_clock(monkeypatch, module, durations):
    """module.time.perf_counter advances by the next of `durations` (seconds) on each call of the returned tick."""
    clock = [0.0]
    monkeypatch.setattr(module, "time", SimpleNamespace(perf_counter=lambda: clock[0]))
    durations = iter(durations)

    def tick():
        clock[0] += next(durations)
    return tick


@pytest.mark.parametrize("script, argv", [(bench_causal_lm_loss, ["--reps", "0"]),
                                          (bench_loss, ["--quick", "--tokens", "256", "0"]),
                                          (bench_optimizer, ["--quick", "--fidelity-steps", "0"]),
                                          (bench_rain, ["--quick", "--prompts", "0"]),
                                          (bench_tree, ["--quick", "--page", "0"]),
                                          (bench_tree, ["--quick", "--suffix", "-1"]),
                                          (bench_unlearn, ["--quick", "--reps", "0"])])
def test_every_scripts_counts_refuse_zero_as_a_usage_error_before_measuring(script, argv, monkeypatch, capsys):
    """A count of 0 (or a negative suffix) measured nothing: an error row, a NaN or a division by zero in the table."""
    monkeypatch.setattr(sys, "argv", [script.__name__ + ".py", *argv])
    with pytest.raises(SystemExit) as exit_info:
        script.main()
    assert exit_info.value.code == 2
    assert "expected an integer >= " in capsys.readouterr().err


@pytest.mark.parametrize("script, argv, message", [
    (bench_tree, ["--quick", "--sections", "attention", "--heads", "4", "--kv-heads", "3"],
     "--heads 4 must be a multiple of --kv-heads 3"),
    (bench_tree, ["--quick", "--sections", "runner", "--attention-backend", "triton"],
     "--attention-backend triton runs the Triton kernels: it needs --device cuda"),
    (bench_tree, ["--quick", "--sections", "attention", "--splits", "8"], "--splits runs the Triton kernels"),
    (bench_loss, ["--quick", "--row-block-mib", "96"], "--row-block-mib sizes the blocks of --stages'"),
    (bench_rain, ["--quick", "--model", "/nowhere"], "--quick and --demo bring their own")])
def test_options_that_cannot_run_together_are_usage_errors_before_measuring(script, argv, message, monkeypatch,
                                                                          capsys):
    """Each ran: a record of error rows replacing the good one (heads not a multiple of kv heads, the Triton backend
    off a GPU), an option measuring nothing more (--splits on the torch path, --row-block-mib without --stages), or
    a record naming a model never loaded (--quick --model)."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(sys, "argv", [script.__name__ + ".py", *argv])
    with pytest.raises(SystemExit) as exit_info:
        script.main()
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


# ---- bench_loss ----

def definition(quantity, h, w, a, b):
    """The quantity's loss from its inputs, in fp64: mean CE, sum of token-weighted CE, KL(ref || policy) per row."""
    h, w = h.double(), w.double()
    if quantity in ("mean CE", "signed CE"):
        ce = F.cross_entropy(h @ w.t(), a, reduction="none")
        return float(ce.mean() if quantity == "mean CE" else (ce * b.double()).sum())
    log_q = torch.log_softmax(h @ w.t(), -1)
    log_p = torch.log_softmax(a.double() @ b.double().t(), -1)
    return float((log_p.exp() * (log_p - log_q)).sum() / h.shape[0])


def test_loss_rows_are_their_quantitys_definition_on_inputs_shared_within_the_quantity(monkeypatch, tmp_path):
    """Every method of a quantity gets the same inputs (a shared head's KL the same weight twice, the two heads' KL
    two, the signed CE weights of both signs), each row's loss is the quantity on them, loss_rel_diff is its relative
    difference from the quantity's first row; TFLOP/s count 2NHV per logits product forward and 4NHV per backward of a
    product with gradients (the KL's frozen reference has none)."""
    seen, called = [], []
    for name in ("fastalign_ce", "fastalign_ce_signed", "fastalign_ce_in_forward", "fastalign_ce_signed_in_forward",
                 "naive_ce", "compiled_chunked_ce", "fastalign_kl", "fastalign_kl_in_forward", "naive_kl"):
        def spy(*args, _fn=getattr(bench_loss, name), _name=name):
            if not torch.is_grad_enabled():  # the forward-only call (each row's backward is run once too)
                seen.append([a.detach().clone() for a in args])
                called.append(_name)
            return _fn(*args)
        monkeypatch.setattr(bench_loss, name, spy)
    # baselines not installed here
    monkeypatch.setattr(bench_loss.harness, "optional", lambda factory, unavailable: None)
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: fn)
    monkeypatch.setattr(bench_loss.harness, "median_ms", lambda fn, device, **kwargs: 2.0)  # forward called once a row
    monkeypatch.setattr(bench_loss.harness, "peak_extra_mib", lambda fn, device: 0.0)   # (it runs fn again on a CPU)
    monkeypatch.setattr(bench_loss.harness, "RESULTS_DIR", str(tmp_path))
    n, h, v = 48, 16, 67
    args = SimpleNamespace(device="cpu", dtype="float32", quick=False, hidden=h, vocab=v, tokens=[n], verbose=False)
    rows = bench_loss.run(args, {"matmul_peak_tflops": 4.0})
    (path,) = tmp_path.glob("bench_loss-*.json")   # not the default 8B head: a variant named by its shape
    assert path.name.endswith(f"-h{h}-v{v}.json") and len(json.loads(path.read_text())["results"]) == len(rows)
    assert len(rows) == len(seen) and not [row for row in rows if "error" in row], rows
    # each row runs the candidate it is named after
    assert [(row["method"].split()[0], row["op"]) for row in rows] == [
        ({"fastalign": "fastalign", "naive": "naive", "compiled": "torch.compile"}[name.split("_")[0]],
         "linear_kl_div" if "_kl" in name else "linear_cross_entropy") for name in called], rows
    assert [row["method"].endswith("grads-in-forward") for row in rows] == ["in_forward" in name for name in called]
    # the table tells every row apart (two "linear_kl_div naive torch" rows, of two heads and of one, did not)
    names = [key for key, _, fmt in bench_loss.COLUMNS if fmt == "{}" and key != "error"]
    assert "quantity" in names and len({tuple(row[key] for key in names) for row in rows}) == len(rows), names
    first = {}
    for row, inputs in zip(rows, seen):
        quantity = row["quantity"]
        reference = first.setdefault(quantity, (row, inputs))
        assert all(torch.equal(x, y) for x, y in zip(inputs, reference[1])), row
        assert row["loss"] == pytest.approx(definition(quantity, *inputs), rel=1e-5), row
        assert row["loss_rel_diff"] == pytest.approx(abs(row["loss"] / reference[0]["loss"] - 1), abs=1e-12), row
        fwd, fwd_bwd = (2, 6) if row["op"] == "linear_cross_entropy" else (4, 8)  # KL: the reference has no backward
        assert row["fwd_tflops"] == pytest.approx(fwd * n * h * v / 2e-3 / 1e12), row
        assert row["fwd_bwd_tflops"] == pytest.approx(fwd_bwd * n * h * v / 2e-3 / 1e12), row
        assert row["fraction_of_matmul_peak"] == pytest.approx(row["fwd_bwd_tflops"] / 4.0), row
        # the memory beyond the gradients of hidden and weight, against the fp32 logits' bytes
        assert row["extra_mib"] == pytest.approx(-(n * h + v * h) * 4 / 2 ** 20), row
        assert row["extra_vs_logits"] == pytest.approx(-(n * h + v * h) / (n * v)), row
    (_, two_heads), (_, shared) = first["KL two heads"], first["KL shared head"]
    assert not torch.equal(two_heads[1], two_heads[3]) and torch.equal(shared[1], shared[3])
    signed_weights = first["signed CE"][1][3]
    assert (signed_weights < 0).any() and (signed_weights > 0).any()


def test_loss_rows_record_their_gradients_difference_from_the_quantitys_first(monkeypatch, tmp_path):
    """A method with the right loss but the wrong gradients (here twice them) does other work than the first method of
    its quantity: equal losses do not show it, grad_rel_diff (the largest relative L2 difference of the gradients of
    hidden and weight) does; the methods that compute the same gradients agree to fp32 rounding."""
    def doubled_gradient(h, w, y, tw, _naive=bench_loss.naive_ce):
        loss = _naive(h, w, y, tw)
        return loss + (loss - loss.detach())  # the same value, twice the gradient
    monkeypatch.setattr(bench_loss, "naive_ce", doubled_gradient)
    monkeypatch.setattr(bench_loss.harness, "optional", lambda factory, unavailable: None)
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: fn)
    monkeypatch.setattr(bench_loss.harness, "median_ms", lambda fn, device, **kwargs: 2.0)
    monkeypatch.setattr(bench_loss.harness, "RESULTS_DIR", str(tmp_path))
    args = SimpleNamespace(device="cpu", dtype="float32", quick=False, hidden=16, vocab=67, tokens=[24], verbose=False)
    rows = {(row["quantity"], row["method"]): row for row in bench_loss.run(args, {"matmul_peak_tflops": 1.0})}
    naive = rows["mean CE", "naive torch"]
    assert naive["loss_rel_diff"] < 1e-5 and naive["grad_rel_diff"] == pytest.approx(1.0, rel=1e-4), naive
    assert rows["mean CE", "fastalign"]["grad_rel_diff"] == 0.0
    for quantity, method in (("mean CE", "fastalign grads-in-forward"), ("KL two heads", "fastalign grads-in-forward"),
                             ("signed CE", "fastalign signed-weights grads-in-forward"),
                             ("KL shared head", "fastalign shared-head grads-in-forward")):
        assert rows[quantity, method]["grad_rel_diff"] < 1e-5 and rows[quantity, method]["loss_rel_diff"] < 1e-5
    assert rows["mean CE", "torch.compile chunked"]["grad_rel_diff"] < 1e-5
    assert rows["KL two heads", "naive torch"]["grad_rel_diff"] < 1e-5


def test_loss_stages_run_the_kernels_with_the_gradients_each_names(monkeypatch, tmp_path):
    """--stages: the forward, then the backward with both, one and neither of the gradients' products, then the
    forward with gradients with both and neither, and with both in blocks of each --row-block-mib budget, each run on
    the kernel API with those gradients asked for, its TFLOP/s counted on the products it computes (2NHV each). A
    budget's row is named by the block it runs; a budget whose block another row ran is not run again (a 96 MiB row
    at N 8192 ran the default's 256-row blocks under the name of a smaller block)."""
    from fastalign.kernels import chunked_backward, linear_cross_entropy as kernel
    asked = []

    def spy_on(name, weight_flag):
        launcher = getattr(kernel, name)

        def spy(*args, need_hidden_grad=True):
            asked.append((name, need_hidden_grad, args[weight_flag]))
            return launcher(*args, need_hidden_grad=need_hidden_grad)
        monkeypatch.setattr(kernel, name, spy)
    spy_on("backward", 6)
    spy_on("forward_with_gradients", 5)
    budgets, plan = [], kernel.row_block_plan

    def plan_spy(*args):   # the block budget each forward with gradients is planned with
        budgets.append(chunked_backward._ROW_BLOCK_BYTES)
        return plan(*args)
    monkeypatch.setattr(kernel, "row_block_plan", plan_spy)

    def block_plan(num_rows, vocab, bytes_per_logit):   # rows as the budget allows, 8 at least, N at most
        return min(num_rows, max(8, chunked_backward._ROW_BLOCK_BYTES // 2 ** 23)), vocab
    monkeypatch.setattr(chunked_backward, "row_block_plan", block_plan)   # (the bench's labels, not the kernel's)
    monkeypatch.setattr(bench_loss.harness, "median_ms", lambda fn, device, **kwargs: (fn(), 2.0)[1])
    monkeypatch.setattr(bench_loss.harness, "device_busy_ms", lambda fn, device: 1.5)   # a CUDA device's
    monkeypatch.setattr(bench_loss.harness, "RESULTS_DIR", str(tmp_path))
    n, h, v = 24, 16, 67
    args = SimpleNamespace(device="cpu", dtype="float32", quick=False, hidden=h, vocab=v, tokens=[n],
                           row_block_mib=[96, 192, 48, 40, 384])
    config = {"matmul_peak_tflops": 2.0}
    earlier = [{"op": "linear_cross_entropy", "method": "fastalign"}]   # the table's rows, kept first in the record
    rows = bench_loss.stage_rows(args, config, earlier)
    (path,) = tmp_path.glob("bench_loss-*.json")
    assert json.loads(path.read_text())["results"] == earlier + rows
    assert [row["method"] for row in rows] == ["fastalign forward", "fastalign backward",
                                               "fastalign backward, d_hidden only", "fastalign backward, d_weight only",
                                               "fastalign backward, G chunks only",
                                               "fastalign forward with gradients",
                                               "fastalign forward with gradients, G only",
                                               "fastalign forward with gradients, 12-row blocks (0 MiB)",
                                               "fastalign forward with gradients, 8-row blocks (0 MiB)"], rows
    assert [(row.get("rows_per_block"), row.get("row_block_budget_mib")) for row in rows] == [
        *[(None, None)] * 5, (24, 192), (24, 192), (12, 96), (8, 48)]
    assert all(row["block_mib"] == row["rows_per_block"] * v * 8 / 2 ** 20 for row in rows[5:])
    assert config["row_block_budgets_skipped"] == {
        f"N=24, {mib} MiB": f"runs the {rows}-row blocks (0 MiB) of '{name}'"
        for mib, rows, name in ((192, 24, "forward with gradients"), (40, 8, "forward with gradients, 8-row blocks"
                                                                                " (0 MiB)"),
                                (384, 24, "forward with gradients"))}
    assert asked == [("backward", True, True), ("backward", True, False), ("backward", False, True),
                     ("backward", False, False), ("forward_with_gradients", True, True),
                     ("forward_with_gradients", False, False), *[("forward_with_gradients", True, True)] * 2]
    default = chunked_backward._ROW_BLOCK_BYTES
    assert budgets == [default, default, 96 * 2 ** 20, 48 * 2 ** 20] and default == 192 * 2 ** 20
    assert [row["tflops"] * 2e-3 * 1e12 / (2 * n * h * v) for row in rows] == pytest.approx(
        [1, 3, 2, 2, 1, 3, 1, 3, 3])
    assert all(row["busy"] == 0.75 for row in rows)   # the GPU's kernel time against the wall time
    assert all(row["fraction_of_matmul_peak"] == row["tflops"] / 2.0 for row in rows)


def test_loss_row_blocks_are_the_plans_the_gpu_runs_at_the_budget_asked_for(monkeypatch):
    """At N 8192 of the 8B head in bf16, row_block_plan keeps d_weight's rounding to 32 segments: a 96 MiB budget runs
    the default's 256-row blocks (188 MiB), 384 MiB 512 rows."""
    from fastalign.kernels import chunked_backward
    monkeypatch.setattr(chunked_backward, "INTERPRET", False)   # the GPU's plan
    blocks = {mib: bench_loss.row_block(8192, 128256, torch.bfloat16, mib and mib * 2 ** 20) for mib in (None, 96, 384)}
    assert {mib: block["rows_per_block"] for mib, block in blocks.items()} == {None: 256, 96: 256, 384: 512}
    assert blocks[96]["block_mib"] == 256 * 128256 * 6 / 2 ** 20 and blocks[96]["row_block_budget_mib"] == 96
    assert blocks[None]["row_block_budget_mib"] == 192 and chunked_backward._ROW_BLOCK_BYTES == 192 * 2 ** 20


def test_loss_baseline_that_cannot_be_loaded_is_recorded_with_its_error(monkeypatch, tmp_path):
    """Liger, Cut Cross-Entropy or TRL missing (or failing to import) on the GPU machine: the JSON record says which
    baselines were not compared and why, beside the rows of the others."""
    monkeypatch.setitem(sys.modules, "liger_kernel", None)  # importing it raises ImportError
    monkeypatch.setitem(sys.modules, "cut_cross_entropy", None)
    monkeypatch.setitem(sys.modules, "trl", None)
    monkeypatch.delattr(torch.nn, "LinearCrossEntropyOptions", raising=False)   # as in a torch without it
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: fn)
    monkeypatch.setattr(bench_loss.harness, "median_ms", lambda fn, device, **kwargs: 2.0)
    monkeypatch.setattr(bench_loss.harness, "RESULTS_DIR", str(tmp_path))
    args = SimpleNamespace(device="cpu", dtype="float32", quick=False, hidden=16, vocab=67, tokens=[8], verbose=False)
    rows = bench_loss.run(args, {"matmul_peak_tflops": 1.0})
    (path,) = tmp_path.glob("bench_loss-*.json")
    record = json.loads(path.read_text())
    assert len(record["results"]) == len(rows) == 12, record["results"]
    unavailable = record["config"]["unavailable"]
    torch_rows = ["torch_chunked_ce", "torch_chunked_ce_signed"]
    assert sorted(unavailable) == ["cce_ce", "cce_exact_ce", "liger_ce", "liger_kl", *torch_rows, "trl_ce",
                                   "trl_ce_signed", "trl_kl"], unavailable
    assert all(error.startswith("AttributeError" if name in torch_rows else "ModuleNotFoundError")
               for name, error in unavailable.items()), unavailable


def test_loss_fastalign_rows_come_before_the_third_party_baselines(monkeypatch, tmp_path):
    """A third-party kernel that hits an illegal memory access leaves every later CUDA call of the process failing:
    every fastalign row is measured before the first Liger, CCE or TRL row, each quantity still led by fastalign's."""
    def baseline(factory, unavailable):
        def loss(a, b, c, d):
            return (bench_loss.naive_kl(a, b, c, d) if factory.__name__.endswith("_kl") else
                    bench_loss.naive_ce(a, b, c, d))
        return loss
    monkeypatch.setattr(bench_loss.harness, "optional", baseline)
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: fn)
    monkeypatch.setattr(bench_loss.harness, "median_ms", lambda fn, device, **kwargs: 2.0)
    monkeypatch.setattr(bench_loss.harness, "RESULTS_DIR", str(tmp_path))
    args = SimpleNamespace(device="cpu", dtype="float32", quick=False, hidden=16, vocab=67, tokens=[8], verbose=False)
    methods = [row["method"] for row in bench_loss.run(args, {"matmul_peak_tflops": 1.0})]
    third_party = [i for i, m in enumerate(methods) if m.startswith(("liger", "cut-cross-entropy", "trl"))]
    assert len(third_party) == 7 and all(i < third_party[0] for i, m in enumerate(methods)
                                         if m.startswith("fastalign")), methods


def test_loss_matmul_peak_counts_2_n_cubed_flops(monkeypatch):
    """The reference point of 'fraction of peak': one n x n by n x n matmul does 2 n^3 FLOPs."""
    sizes = []

    def median_ms(fn, device, **kwargs):
        sizes.append(fn().shape[0])
        assert kwargs["warmup"] >= 50   # a GPU still raising its clocks would give a low peak
        return 4.0
    monkeypatch.setattr(bench_loss.harness, "median_ms", median_ms)
    assert bench_loss.matmul_peak_tflops("cpu", torch.float32) == pytest.approx(2 * sizes[0] ** 3 / 4e-3 / 1e12)


def test_loss_record_of_the_default_8b_head_is_untagged_and_another_head_is_named_by_its_shape(monkeypatch):
    tags = []
    monkeypatch.setattr(bench_loss.harness, "write_results",
                        lambda *args, tag=None, quick=False: tags.append((tag, quick)))
    for hidden, vocab, quick in ((4096, 128256, False), (2048, 128256, False), (16, 67, True)):
        bench_loss.write(SimpleNamespace(hidden=hidden, vocab=vocab, quick=quick, device="cpu"), {}, [])
    assert tags == [(None, False), ("h2048-v128256", False), (None, True)]


def test_loss_method_that_raises_becomes_an_error_row():
    """One failing method gives its row an error, so the others' rows are still measured."""
    def broken(h, w, y, tw):
        raise RuntimeError("kernel failed")

    def inputs():
        return torch.zeros(4, 3, requires_grad=True), torch.zeros(5, 3), torch.zeros(4, dtype=torch.long), None

    row, grads = bench_loss.measure("broken", broken, inputs, lambda a: a[:1], 1.0, 3.0, torch.device("cpu"), 0, 1)
    assert row == {"method": "broken", "error": "RuntimeError: kernel failed"} and grads is None


def test_loss_measure_times_the_forward_on_detached_inputs_and_returns_one_backwards_gradients(monkeypatch):
    """The forward-only calls get detached inputs (Liger computes gradients in any forward of inputs that need them),
    a head passed twice still one tensor (the shared-head path); every backward starts from no gradient, so the
    gradients returned are one backward's, not the sum of the timed ones'. extra_mib is the backward's peak less the
    gradients' bytes, extra_vs_logits that against the logits' bytes."""
    calls = []

    def loss_fn(h, w, y, w2):
        calls.append((torch.is_grad_enabled(), h.requires_grad or w.requires_grad, w is w2))
        return (h @ w.t()).sum() + (h @ w2.t()).sum()
    h, w = torch.randn(4, 3, requires_grad=True), torch.randn(5, 3, requires_grad=True)
    monkeypatch.setattr(bench_loss.harness, "peak_extra_mib", lambda fn, device: (fn(), 10.0)[1])
    row, grads = bench_loss.measure("m", loss_fn, lambda: (h, w, None, w), lambda a: a[:2], 1.0, 3.0,
                                    torch.device("cpu"), 2 * 2 ** 20, 4 * 2 ** 20)
    assert {call for call in calls if not call[0]} == {(False, False, True)} and (True, True, True) in calls
    torch.testing.assert_close(grads[0], 2 * w.detach().sum(0).expand(4, 3))
    torch.testing.assert_close(grads[1], 2 * h.detach().sum(0).expand(5, 3))
    assert (row["extra_mib"], row["extra_vs_logits"]) == (8.0, 2.0)


# ---- bench_unlearn ----

def test_unlearn_ratios_are_against_the_first_spec_row_and_the_other_ways_step_times():
    """loss_rel_diff against the first way that computes SPEC §1 (not the reference recipe, which computes its own
    objective and gets none); speed-ups are the other way's step time over this one's, against either unfused
    baseline; failed rows are left alone."""
    rows = [{"method": "fastalign", "first_step_loss": 2.0, "step_ms": 10.0, "peak_gib": 9.0, "step_extra_gib": 0.5,
             "held_mib": 100.0},
            {"method": "unfused baseline", "first_step_loss": 2.2, "step_ms": 20.0, "peak_gib": 12.0,
             "step_extra_gib": 4.0, "held_mib": 400.0},
            {"method": "unfused, answer rows only", "first_step_loss": 2.0, "step_ms": 16.0, "peak_gib": 10.0,
             "step_extra_gib": 2.0, "held_mib": 250.0},
            {"method": "reference recipe", "first_step_loss": 7.0, "step_ms": 80.0, "peak_gib": 24.0,
             "step_extra_gib": 8.0, "held_mib": 1000.0},
            {"method": "broken", "error": "RuntimeError: x"},
            {"method": "fastalign cached", "first_step_loss": 1.9, "step_ms": 5.0, "peak_gib": 6.0,
             "step_extra_gib": 1.0, "held_mib": 80.0}]
    bench_unlearn.add_ratios(rows)
    diffs = {row["method"]: row.get("loss_rel_diff") for row in rows}
    assert diffs == pytest.approx({"fastalign": 0.0, "unfused baseline": 0.1, "unfused, answer rows only": 0.0,
                                   "reference recipe": None, "broken": None, "fastalign cached": 0.05})
    assert [row.get("speedup_vs_reference") for row in rows] == pytest.approx([8.0, 4.0, 5.0, 1.0, None, 16.0])
    assert [row.get("speedup_vs_unfused") for row in rows] == pytest.approx([2.0, 1.0, 1.25, 0.25, None, 4.0])
    assert [row.get("speedup_vs_sliced") for row in rows] == pytest.approx([1.6, 0.8, 1.0, 0.2, None, 3.2])
    # memory: the total peak, and the step's own working memory beyond the resident model and optimizer state
    assert [row.get("memory_vs_unfused") for row in rows] == pytest.approx([0.75, 1.0, 10 / 12, 2.0, None, 0.5])
    assert [row.get("extra_memory_vs_unfused") for row in rows] == pytest.approx([0.125, 1.0, 0.5, 2.0, None, 0.25])
    assert [row.get("memory_vs_sliced") for row in rows] == pytest.approx([0.9, 1.2, 1.0, 2.4, None, 0.6])
    assert [row.get("extra_memory_vs_sliced") for row in rows] == pytest.approx([0.25, 2.0, 1.0, 4.0, None, 0.5])
    # what autograd keeps for the backward, on any device
    assert [row.get("held_vs_unfused") for row in rows] == pytest.approx([0.25, 1.0, 0.625, 2.5, None, 0.2])
    assert [row.get("held_vs_sliced") for row in rows] == pytest.approx([0.4, 1.6, 1.0, 4.0, None, 0.32])
    reordered = [{**rows[3]}, {**rows[0]}]   # the reference recipe measured first: still no SPEC row to compare with
    bench_unlearn.add_ratios(reordered)
    assert [row.get("loss_rel_diff") for row in reordered] == [None, 0.0]


def test_unlearn_a_way_that_trains_fewer_parameters_says_which():
    """The cached reference freezes the lm_head: its step trains the rest, which grad_rel_diff (over the parameters
    both trained) showed as agreement without a word."""
    rows = [{"method": "fastalign", "first_step_loss": 2.0, "step_ms": 10.0, "peak_gib": None, "step_extra_gib": 0.5,
             "held_mib": 100.0, "grad_signatures": {"lm_head.weight": [3.0, 1.0], "model.norm.weight": [1.0, -1.0]}},
            {"method": "fastalign cached", "first_step_loss": 2.0, "step_ms": 8.0, "peak_gib": None,
             "step_extra_gib": 0.5, "held_mib": 90.0, "grad_signatures": {"model.norm.weight": [1.0, -1.0]}}]
    bench_unlearn.add_ratios(rows)
    assert rows[1]["grad_rel_diff"] == 0.0 and rows[1]["not_trained"] == ["lm_head.weight"]
    assert rows[0]["not_trained"] is None


def test_unlearn_the_optimizer_in_the_backward_lets_its_model_go():
    """Its hooks hold the optimizer, which holds the parameters: a cycle through the autograd engine that Python's
    collector cannot see, which kept every such way's model and AdamW state (11 GiB a way at 1B) through the rows
    measured after it. release() removes them, as measure does after each way."""
    import gc
    import weakref
    model = torch.nn.Linear(3, 3)
    weight = weakref.ref(model.weight)
    step = bench_unlearn.optimizer_step(model, in_backward=True)
    step.release()
    del model, step
    gc.collect()
    assert weight() is None


def test_unlearn_extra_memory_ratios_need_no_total_peak():
    """On a CPU the step's extra memory is measured (the profiler's allocations) and its total peak is not: the extra
    memory ratios are made all the same."""
    rows = [{"method": "fastalign", "first_step_loss": 2.0, "step_ms": 10.0, "peak_gib": None, "step_extra_gib": 0.5,
             "held_mib": 100.0},
            {"method": "unfused baseline", "first_step_loss": 2.0, "step_ms": 20.0, "peak_gib": None,
             "step_extra_gib": 1.5, "held_mib": 400.0}]
    bench_unlearn.add_ratios(rows)
    assert [row.get("extra_memory_vs_unfused") for row in rows] == pytest.approx([1 / 3, 1.0])
    assert [row.get("memory_vs_unfused") for row in rows] == [None, None]


def test_unlearn_timed_steps_follow_a_second_untimed_step(monkeypatch):
    """The first step records the loss and allocates AdamW's state; the second, whose activations the allocator may
    have to place anew around that state, is not timed either."""
    calls = []
    monkeypatch.setattr(bench_unlearn.harness, "median_ms", lambda fn, device, **kwargs: calls.append(kwargs) or 2.0)
    monkeypatch.setattr(bench_unlearn.harness, "device_busy_ms", lambda fn, device: 1.5)   # a CUDA device's
    monkeypatch.setattr(bench_unlearn.harness, "peak_extra_mib", lambda fn, device: 512.0)

    def build(model, batch, normal, args):
        def step():
            return torch.tensor(1.0)
        step.grid = (3, 8)   # rows x width of its policy forwards
        return step
    batch = SimpleNamespace(to=lambda device: batch)
    row = bench_unlearn.measure("way", build, batch, [], unlearn_args(), torch.device("cpu"), torch.float32)
    assert row["step_ms"] == 2.0 and calls == [{"warmup": 1, "reps": 1}], (row, calls)
    assert row["gpu_busy"] == 0.75   # the share of the step's time the GPU runs kernels
    assert (row["grid"], row["slots"], row["step_extra_gib"]) == ("3 x 8", 24, 0.5)


def unlearn_args():
    return SimpleNamespace(preset="quick", ways="compare", batch_size=2, prompt_tokens=[4, 8], answer_tokens=[4, 8],
                           max_length=32, gradient_checkpointing=False, reps=1, profile=False)


def test_unlearn_way_that_raises_becomes_an_error_row(monkeypatch):
    def build(model, batch, normal, args):
        raise RuntimeError("no step")

    batch = SimpleNamespace(to=lambda device: batch)
    row = bench_unlearn.measure("broken", build, batch, [], unlearn_args(), torch.device("cpu"), torch.float32)
    assert row == {"method": "broken", "error": "RuntimeError: no step"}


def test_unlearn_rows_record_their_first_steps_gradient_difference_from_the_first_spec_way(monkeypatch):
    """A way with the right loss but the wrong gradients (here twice them, or of the other sign) does other work than
    fastalign: the equal first-step losses do not show it, grad_rel_diff (the relative difference of the first step's
    per-parameter gradient signatures, norm and projection, over the parameters both train) does; the ways that
    compute SPEC §1 agree to fp32 rounding, the cached reference's way on every parameter but its frozen lm_head."""
    monkeypatch.setattr(bench_unlearn.harness, "median_ms", lambda fn, device, **kwargs: 1.0)

    def doubled_gradient(model, batch, normal, args):
        def logits_at(net, tokens):
            logits = bench_unlearn.full_logits_at_answers(net, tokens)
            return logits + (logits - logits.detach())  # the same value, twice the gradient
        return bench_unlearn.unfused_step(model, batch, logits_at)

    def opposite_gradient(model, batch, normal, args):
        def logits_at(net, tokens):
            logits = bench_unlearn.full_logits_at_answers(net, tokens)
            return 2 * logits.detach() - logits  # the same value, the gradient of the other sign: the same norms
        return bench_unlearn.unfused_step(model, batch, logits_at)
    args = unlearn_args()
    batch, normal = bench_unlearn.synthetic_batch(bench_unlearn.PRESETS["quick"]["vocab_size"], args)
    ways = [("fastalign", bench_unlearn.fastalign_frozen_copy), ("unfused baseline", bench_unlearn.unfused_baseline),
            ("fastalign cached", bench_unlearn.fastalign_cached), ("doubled", doubled_gradient),
            ("opposite", opposite_gradient)]
    rows = [bench_unlearn.measure(name, build, batch, normal, args, torch.device("cpu"), torch.float32)
            for name, build in ways]
    bench_unlearn.add_ratios(rows)
    by_name = {row["method"]: row for row in rows}
    assert by_name["doubled"]["loss_rel_diff"] < 1e-5, rows
    assert by_name["doubled"]["grad_rel_diff"] == pytest.approx(1.0, rel=1e-4), rows
    assert by_name["opposite"]["loss_rel_diff"] < 1e-5 and by_name["opposite"]["grad_rel_diff"] > 0.5, rows
    assert by_name["fastalign"]["grad_rel_diff"] == 0.0
    assert by_name["unfused baseline"]["grad_rel_diff"] < 1e-4 and by_name["fastalign cached"]["grad_rel_diff"] < 1e-4
    assert "lm_head.weight" in by_name["fastalign"]["grad_signatures"]
    assert "lm_head.weight" not in by_name["fastalign cached"]["grad_signatures"]


def test_unlearn_gradient_difference_over_no_common_parameter_is_none():
    """Ways that train no parameter in common (LoRA adapters against full weights) have no gradient to compare."""
    assert bench_unlearn.gradient_difference({"a": [1.0, 0.0]}, {"b": [1.0, 0.0]}) is None
    difference = bench_unlearn.gradient_difference({"a": [2.0, 0.0], "b": [1.0, 1.0]},
                                                   {"a": [1.0, 0.0], "c": [5.0, 1.0]})
    assert difference == pytest.approx(1.0)


def test_unlearn_gradient_signature_over_chunks_is_the_norm_and_a_projection():
    """The norm whatever the chunks (143 elements: a last chunk of 3, of 1); the projection on the name's +-1 vector:
    of the other sign for the opposite gradient, elsewhere for another name's or for the same entries in another
    order."""
    grad = torch.randn(13, 11)
    for chunk in (7, 71):
        norm, projection = bench_unlearn.gradient_signature("w", grad, chunk=chunk)
        assert norm == pytest.approx(float(grad.double().norm()), rel=1e-6)
        assert bench_unlearn.gradient_signature("w", -grad, chunk=chunk) == pytest.approx([norm, -projection])
        for other in (bench_unlearn.gradient_signature("v", grad, chunk=chunk),
                      bench_unlearn.gradient_signature("w", grad.flip(0), chunk=chunk)):
            assert other[0] == pytest.approx(norm) and abs(other[1] - projection) > 0.1 * norm


@pytest.mark.parametrize("weights", [dict(forget=0.3, mismatch=0.0, normal=0.0), dict(forget=0.0, mismatch=0.7,
                                                                                     normal=0.0),
                                     dict(forget=0.0, mismatch=0.0, normal=0.6)], ids=["forget", "mismatch", "normal"])
def test_unlearn_spec_ways_agree_on_each_term_and_the_policy_has_drifted(monkeypatch, weights):
    """Term by term (each weight alone, not the defaults), the ways that compute SPEC §1 have the same first-step
    loss, and the reference recipe's has its sign (the forget term ascends: negative); the KL term is not zero, since
    the policy has drifted from the reference each way built. The reference recipe's forwards are padded to
    --max-length, the others' to the batch's longest row."""
    monkeypatch.setattr(bench_unlearn, "WEIGHTS", bench_unlearn.LossWeights(**weights))
    monkeypatch.setattr(bench_unlearn.harness, "median_ms", lambda fn, device, **kwargs: 1.0)
    widths, make_model, stepping = {}, bench_unlearn.make_model, [False]

    def recording_model(args, device, dtype):
        model = make_model(args, device, dtype)
        model.model.register_forward_pre_hook(
            lambda module, a, kw: widths[way].add(kw["input_ids"].shape[1]) if stepping[0] else None, with_kwargs=True)
        return model

    def recorded(build):   # the forwards of the steps, not those that check the model while the way is built
        def wrapped(*build_args):
            step = build(*build_args)
            stepping[0] = True
            return step
        return wrapped
    monkeypatch.setattr(bench_unlearn, "make_model", recording_model)
    args = unlearn_args()
    batch, normal = bench_unlearn.synthetic_batch(bench_unlearn.PRESETS["quick"]["vocab_size"], args)
    losses, grids = {}, {}
    for way, build in bench_unlearn.COMPARE:
        widths[way], stepping[0] = set(), False
        row = bench_unlearn.measure(way, recorded(build), batch, normal, args, torch.device("cpu"), torch.float32)
        losses[way], grids[way] = row["first_step_loss"], [int(n) for n in row["grid"].split(" x ")]
    reference = losses.pop("reference recipe")
    spec = list(losses.values())
    assert spec == pytest.approx([spec[0]] * len(spec), rel=1e-5, abs=1e-6), losses  # fp32 rounding of the terms
    assert (reference < 0) == (spec[0] < 0) and (weights["forget"] > 0) == (spec[0] < 0), (reference, losses)
    assert weights["normal"] == 0 or spec[0] > 1e-6, losses
    assert widths.pop("reference recipe") == {args.max_length}
    # padded to the batch's longest row, or (fastalign's policy forward) packed into rows of the way's grid
    assert all(0 < x <= batch.tokens.input_ids.shape[1] or x == grids[way][1] for way, w in widths.items() for x in w)
    assert batch.tokens.input_ids.shape[1] < args.max_length
    assert grids["fastalign"][1] > batch.tokens.input_ids.shape[1] and grids["fastalign, padded rows"] == \
        grids["unfused baseline"] == [len(batch.tokens.input_ids), batch.tokens.input_ids.shape[1]], grids


@pytest.mark.parametrize("way", [bench_unlearn.unfused_baseline, bench_unlearn.unfused_sliced])
def test_unlearn_unfused_reference_runs_over_the_normal_rows_at_their_own_longest_row(way):
    """A careful user runs the frozen copy over the normal rows padded to their own longest row, as fastalign's
    reference is: the baseline sliced them from the whole batch's padded width (2 x 309 slots where 2 x 186 suffice
    at 1B), work that overstated fastalign's speedup."""
    args = unlearn_args()
    batch, normal = bench_unlearn.synthetic_batch(bench_unlearn.PRESETS["quick"]["vocab_size"], args)
    model = bench_unlearn.make_model(args, torch.device("cpu"), torch.float32)
    shapes = []   # (the policy's decoder or not, the forward's input shape); deepcopy gives the reference the hook
    model.model.register_forward_pre_hook(
        lambda module, a, kw: shapes.append((module is model.model, tuple(kw["input_ids"].shape))), with_kwargs=True)
    step = way(model, batch, normal, args)
    step()
    normal_rows = batch.examples[batch.num_forget + batch.num_mismatch:]
    trimmed = (len(normal_rows), max(len(e.input_ids) for e in normal_rows))
    assert trimmed[1] < batch.tokens.input_ids.shape[1]   # the batch's other rows are longer: the test tells apart
    assert shapes == [(True, tuple(batch.tokens.input_ids.shape)), (False, trimmed)], shapes


# ---- bench_tree ----

@pytest.mark.parametrize("rows,prefix,suffix,page", [(1, 100, 10, 16), (4, 100, 10, 16), (3, 64, 5, 16),
                                                     (5, 37, 0, 8)])
def test_tree_unique_tokens_are_the_pool_slots_the_rows_read(rows, prefix, suffix, page):
    """Unique KV tokens: every pool slot some row reads, once. The prefix's full blocks are one set of blocks for
    all rows; the rest of each row (the prefix's partial block, suffix, new token) lies in blocks of its own."""
    batch, unique_tokens, _, _ = bench_tree.shared_prefix_batch(rows, prefix, suffix, 2, 1, 4, page, torch.float32,
                                                                torch.device("cpu"))
    seq_len = prefix + suffix + 1
    assert batch["seq_lens"].tolist() == [seq_len] * rows
    slots = [{(int(table[i // page]), i % page) for i in range(seq_len)} for table in batch["block_table"]]
    assert unique_tokens == len(set().union(*slots))
    full = prefix // page
    shared = [{int(b) for b in table[:full]} for table in batch["block_table"]]
    private = [{int(b) for b in table[full:-(-seq_len // page)]} for table in batch["block_table"]]
    assert all(s == shared[0] for s in shared) and len(shared[0]) == full
    assert sum(map(len, private)) == len(set().union(*private, shared[0])) - full


def test_tree_copy_bandwidth_counts_bytes_read_and_written(monkeypatch):
    copied = []

    def median_ms(fn, device, **kwargs):
        copied.append(fn().nbytes)
        return 2.0
    monkeypatch.setattr(bench_tree.harness, "median_ms", median_ms)
    assert bench_tree.copy_bandwidth_gbs("cpu") == pytest.approx(2 * copied[0] / 2e-3 / 1e9)


def tree_attention_args(**kwargs):
    return SimpleNamespace(**{**dict(prefix=[40], rows=[3], suffix=4, heads=4, kv_heads=2, head_dim=8, page=16,
                                     iters=1, dense_limit_gib=8.0, splits=[]), **kwargs})


def test_tree_attention_max_diff_is_each_method_against_dense_sdpa(monkeypatch):
    """A paged attention off by 0.5 shows as a max_diff of 0.5 (dense sdpa's own is 0); over --dense-limit-gib the
    dense row is an error row and nothing is compared."""
    monkeypatch.setattr(bench_tree, "triton_interpreting", lambda: False)
    monkeypatch.setattr(bench_tree.harness, "median_ms", lambda fn, device, **kwargs: 1.0)
    paged = bench_tree.paged_attention
    monkeypatch.setattr(bench_tree, "paged_attention", lambda **kw: paged(**kw) + 0.5)
    rows = bench_tree.attention_rows(tree_attention_args(), torch.device("cpu"), torch.float32, 1.0)
    assert [(row["method"], row["max_diff"]) for row in rows] == [
        ("fastalign paged (torch)", pytest.approx(0.5, abs=1e-5)), ("dense sdpa", 0.0)]
    rows = bench_tree.attention_rows(tree_attention_args(dense_limit_gib=0.0), torch.device("cpu"), torch.float32, 1.0)
    assert [(row["method"], row.get("max_diff"), "error" in row) for row in rows] == [
        ("dense sdpa", None, True), ("fastalign paged (torch)", None, False)]


def test_tree_attention_rows_count_the_unique_kv_bytes_over_one_calls_time(monkeypatch):
    """unique GB/s: the K and V bytes of the pool slots the rows read, over one call's time (a timed run makes
    --iters calls), the graph's where there is one; against the copy bandwidth given. max_diff is the largest
    |difference| (a paged output 0.5 too low is off by 0.5); a plan time only for the cascade's rows; the dense
    copies of all rows (not one row's) against --dense-limit-gib."""
    monkeypatch.setattr(bench_tree, "triton_interpreting", lambda: False)
    monkeypatch.setattr(bench_tree.harness, "median_ms", lambda fn, device, **kwargs: (fn(), 2.0)[1])
    paged = bench_tree.paged_attention
    monkeypatch.setattr(bench_tree, "paged_attention", lambda **kw: paged(**kw) - 0.5)
    args = tree_attention_args(iters=4)
    _, unique_tokens, _, _ = bench_tree.shared_prefix_batch(3, 40, 4, 4, 2, 8, 16, torch.float32, torch.device("cpu"))
    unique_bytes = unique_tokens * 2 * 2 * 8 * 4   # K and V, 2 KV heads of 8 fp32 values
    rows = bench_tree.attention_rows(args, torch.device("cpu"), torch.float32, 0.5)
    assert [row["method"] for row in rows] == ["fastalign paged (torch)", "dense sdpa"]
    for row in rows:
        assert row["unique_mib"] == unique_bytes / 2 ** 20 and row["eager_us"] == 500.0 and row["plan_us"] is None
        assert row["unique_gbs"] == pytest.approx(unique_bytes / 500e-6 / 1e9) and row["of_copy_bw"] == \
            pytest.approx(row["unique_gbs"] / 0.5)
    assert rows[0]["max_diff"] == pytest.approx(0.5, abs=1e-5)
    monkeypatch.setattr(bench_tree, "per_call_us", lambda fn, device, iters: (fn(0), (100.0, 400.0))[1])
    rows = bench_tree.attention_rows(args, torch.device("cpu"), torch.float32, 0.5)
    assert rows[0]["unique_gbs"] == pytest.approx(unique_bytes / 100e-6 / 1e9)
    dense_bytes = 3 * (40 + 4 + 1) * 2 * 2 * 8 * 4
    rows = bench_tree.attention_rows(tree_attention_args(dense_limit_gib=(dense_bytes - 1) / 2 ** 30),
                                     torch.device("cpu"), torch.float32, 0.5)
    assert [(row["method"], "error" in row) for row in rows] == [("dense sdpa", True), ("fastalign paged (torch)",
                                                                                       False)]


def test_tree_attention_times_the_kernel_at_each_split_count_asked_for(monkeypatch):
    """--splits 1 3: the Triton kernel (interpreted here) also with 1 and 3 key parts per row, each compared with dense
    sdpa like the kernel's own choice."""
    monkeypatch.setattr(bench_tree, "triton_interpreting", lambda: True)
    monkeypatch.setattr(bench_tree.harness, "median_ms", lambda fn, device, **kwargs: 1.0)
    from fastalign.kernels import paged_attention as kernels
    launched = []
    launch = kernels.paged_attention_triton
    monkeypatch.setattr(kernels, "paged_attention_triton", lambda *a, **kw: launched.append(kw.get("num_splits"))
                        or launch(*a, **kw))
    rows = bench_tree.attention_rows(tree_attention_args(splits=[1, 3]), torch.device("cpu"), torch.float32, 1.0)
    split_rows = [row for row in rows if "splits)" in row["method"]]
    assert [row["method"] for row in split_rows] == ["fastalign paged (triton, 1 splits)",
                                                     "fastalign paged (triton, 3 splits)"], rows
    assert all(row["max_diff"] < 1e-5 for row in split_rows) and {1, 3} <= set(launched), (rows, launched)


def test_tree_attention_method_that_raises_becomes_an_error_row(monkeypatch):
    """A paged kernel that fails (does not build or launch) gives its row an error and dense sdpa is still timed; a
    dense sdpa that fails leaves the paged rows timed, with no reference to compare them with."""
    monkeypatch.setattr(bench_tree, "triton_interpreting", lambda: False)
    monkeypatch.setattr(bench_tree.harness, "median_ms", lambda fn, device, **kwargs: fn() and 1.0)

    def broken(*args, **kwargs):
        raise RuntimeError("kernel failed")
    monkeypatch.setattr(bench_tree, "paged_attention", broken)
    rows = bench_tree.attention_rows(tree_attention_args(), torch.device("cpu"), torch.float32, 1.0)
    assert [(row["method"], row.get("error"), row.get("max_diff")) for row in rows] == [
        ("fastalign paged (torch)", "RuntimeError: kernel failed", None), ("dense sdpa", None, 0.0)], rows
    monkeypatch.undo()
    monkeypatch.setattr(bench_tree, "triton_interpreting", lambda: False)
    monkeypatch.setattr(bench_tree.harness, "median_ms", lambda fn, device, **kwargs: fn() and 1.0)
    monkeypatch.setattr(bench_tree, "dense_sdpa", broken)
    rows = bench_tree.attention_rows(tree_attention_args(), torch.device("cpu"), torch.float32, 1.0)
    assert [(row["method"], row.get("error"), row.get("max_diff")) for row in rows] == [
        ("dense sdpa", "RuntimeError: kernel failed", None), ("fastalign paged (torch)", None, None)], rows


def test_tree_attention_rows_are_written_as_they_are_measured(monkeypatch, tmp_path):
    """gpu_session.sh cuts bench_tree at its step's time limit: the attention rows measured by then are in the JSON
    (each row rewrites it, as in the other benches), not lost with the rest of the section."""
    monkeypatch.setattr(bench_tree, "triton_interpreting", lambda: False)
    monkeypatch.setattr(bench_tree.harness, "RESULTS_DIR", str(tmp_path))
    monkeypatch.setenv("FASTALIGN_COMMIT", "test")
    timings = []

    def per_call_us(fn, device, iters):
        timings.append(1)
        if len(timings) == 3:
            raise KeyboardInterrupt  # the step's limit strikes while the third method is timed
        return None, 1.0
    monkeypatch.setattr(bench_tree, "per_call_us", per_call_us)
    monkeypatch.setattr(sys, "argv", ["bench_tree.py", "--quick", "--device", "cpu", "--sections", "attention"])
    with pytest.raises(KeyboardInterrupt):
        bench_tree.main()
    # one section alone: a variant
    (path,) = tmp_path.glob(f"bench_tree-{harness.device_slug('cpu')}-test-attention-quick.json")
    record = json.loads(path.read_text())
    assert [(row["section"], row["prefix"], row["rows"], row["method"]) for row in record["results"]] == [
        ("attention", 100, 1, "fastalign paged (torch)"), ("attention", 100, 1, "dense sdpa")], record
    assert record["config"]["copy_bandwidth_gbs"] > 0 and record["config"]["rows"] == [1, 4], record["config"]


def test_tree_attention_inputs_that_cannot_be_built_give_an_error_row(monkeypatch):
    """A (prefix, rows) pair whose pool, copies or dense copies do not fit (out of memory) gives an error row, and the
    other pairs are still measured; the runner sections that follow are not lost with them. Dense copies that do not
    fit leave the paged rows of their pair timed, with nothing to compare them with."""
    monkeypatch.setattr(bench_tree, "triton_interpreting", lambda: False)
    monkeypatch.setattr(bench_tree.harness, "median_ms", lambda fn, device, **kwargs: fn() and 1.0)
    built = bench_tree.shared_prefix_batch

    def shared_prefix_batch(rows, *args):
        if rows == 3:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB")
        return built(rows, *args)
    monkeypatch.setattr(bench_tree, "shared_prefix_batch", shared_prefix_batch)
    rows = bench_tree.attention_rows(tree_attention_args(rows=[3, 2]), torch.device("cpu"), torch.float32, 1.0)
    assert [(row["rows"], row["method"], row.get("error")) for row in rows] == [
        (3, "inputs", "out of memory"), (2, "fastalign paged (torch)", None), (2, "dense sdpa", None)], rows
    monkeypatch.setattr(bench_tree, "shared_prefix_batch", built)

    def dense_copies(batch, seq_len):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 8 GiB")
    monkeypatch.setattr(bench_tree, "dense_copies", dense_copies)
    rows = bench_tree.attention_rows(tree_attention_args(), torch.device("cpu"), torch.float32, 1.0)
    assert [(row["method"], row.get("error"), row.get("max_diff")) for row in rows] == [
        ("dense sdpa", "out of memory", None), ("fastalign paged (torch)", None, None)], rows


def test_tree_runner_sections_are_reported_as_they_finish_and_a_failing_one_becomes_an_error_row(monkeypatch):
    """The runner sections take minutes on a GPU: the JSON is rewritten after each, so a step cut at its time limit
    keeps the sections it finished, and one that raises leaves the others' rows."""
    monkeypatch.setattr(bench_tree, "extend_rows", lambda *a: [{"section": "extend", "ms": 1.0}])
    monkeypatch.setattr(bench_tree, "rewind_rows", lambda *a: [{"section": "rewind", "release_us": 1.0}])

    def broken(*args):
        raise RuntimeError("decode failed")
    monkeypatch.setattr(bench_tree, "decode_rows", broken)
    args = SimpleNamespace(quick=True, family="llama", tree_prefix=20, pool_tokens=256, attention_backend="auto",
                           children=2, child_tokens=2, branch_lengths=[4], decode_prompt=4, decode_tokens=2)
    reported = []
    rows = bench_tree.runner_rows(args, torch.device("cpu"), torch.float32,
                                  report=lambda rows: reported.append([row["section"] for row in rows]))
    assert reported == [["extend"], ["extend", "rewind"], ["extend", "rewind", "decode"]], reported
    assert rows[-1] == {"section": "decode", "method": "decode", "error": "RuntimeError: decode failed"}, rows


def test_tree_rewind_and_decode_after_a_runner_that_could_not_be_built_say_why(monkeypatch):
    """The Triton backend refused (no GPU, no interpreter): the rewind and decode rows give the extend section's error,
    not an AttributeError of None."""
    import fastalign.runtime

    def refused(*args, **kwargs):
        raise ValueError("attention_backend='triton' needs a CUDA device")
    monkeypatch.setattr(fastalign.runtime, "TreeRunner", refused)
    args = SimpleNamespace(quick=True, family="llama", tree_prefix=20, pool_tokens=256, attention_backend="triton",
                           children=2, child_tokens=2, branch_lengths=[4], decode_prompt=4, decode_tokens=2)
    rows = bench_tree.runner_rows(args, torch.device("cpu"), torch.float32)
    assert [(row["section"], row["error"]) for row in rows] == [
        ("extend", "ValueError: attention_backend='triton' needs a CUDA device"),
        ("rewind", "RuntimeError: no TreeRunner: the extend section could not build one "
                   "(attention_backend='triton' needs a CUDA device)"),
        ("decode", "RuntimeError: no TreeRunner: the extend section could not build one "
                   "(attention_backend='triton' needs a CUDA device)")], rows


def test_tree_attention_calls_read_distinct_kv_past_the_l2_cache(monkeypatch):
    """One timed run of each method reads K/V of its own at every call, at least 4x the L2 cache in all, so that a
    call's KV comes from HBM and not from L2 where the previous call left it (the same KV read again and again
    would measure L2 bandwidth against the HBM copy bandwidth)."""
    l2 = 64 << 10
    monkeypatch.setattr(bench_tree, "l2_cache_bytes", lambda device: l2, raising=False)
    monkeypatch.setattr(bench_tree, "triton_interpreting", lambda: False)
    timed = []

    def median_ms(fn, device, **kwargs):
        timed.append([])
        fn()
        timed.append(None)
        return 1.0

    def recording(fn):
        def call(*args, **kwargs):
            if timed and timed[-1] is not None:
                timed[-1].append(kwargs["k_cache"] if "k_cache" in kwargs else args[1])
            return fn(*args, **kwargs)
        return call
    monkeypatch.setattr(bench_tree.harness, "median_ms", median_ms)
    monkeypatch.setattr(bench_tree, "paged_attention", recording(bench_tree.paged_attention))
    monkeypatch.setattr(bench_tree, "dense_sdpa", recording(bench_tree.dense_sdpa))
    rows = bench_tree.attention_rows(tree_attention_args(), torch.device("cpu"), torch.float32, 1.0)
    runs = [run for run in timed if run is not None]
    assert [row["method"] for row in rows] == ["fastalign paged (torch)", "dense sdpa"] and len(runs) == 2
    for run in runs:  # a cycle over distinct tensors: between two reads of one, all the others are read
        ptrs = [k.data_ptr() for k in run]
        cycle = list(dict.fromkeys(ptrs))
        assert len(cycle) > 1 and ptrs == [cycle[i % len(cycle)] for i in range(len(ptrs))], ptrs
        assert sum(2 * k.nbytes for k in run[:len(cycle)]) >= 4 * l2  # K and V
    assert rows[0]["max_diff"] < 1e-5


class FakeModelRunner:
    """What the extend rows name as the runner's model runner."""


class FakeRunner:
    """Records the runner calls of the extend and rewind sections."""
    def __init__(self):
        self.calls, self.token_lists, self.model_runner = [], [], FakeModelRunner()

    def extend(self, parents, token_lists, **kwargs):
        self.calls.append(("extend", parents, [len(t) for t in token_lists]))
        self.token_lists.append(token_lists)
        return [object() for _ in parents], None

    def release(self, span):
        self.calls.append(("release",))


def test_tree_extend_section_times_one_batched_extend_of_k_children(monkeypatch):
    """Each timed step is one extend of k children of the root by tokens_each tokens (then released, untimed), each
    child with tokens of its own, as RAIN's children are distinct samples."""
    torch.manual_seed(0)
    runner, root = FakeRunner(), SimpleNamespace(length=100)
    rows = bench_tree.extend_rows(runner, root, 50, "cpu", [1, 10], 7, "-", baseline=False)
    extends = [call for call in runner.calls if call[0] == "extend"]
    assert extends == [("extend", [root], [7])] * 7 + [("extend", [root] * 10, [7] * 10)] * 7
    assert all(len({tuple(tokens) for tokens in lists}) == len(lists) for lists in runner.token_lists)
    assert [(row["children"], row["tokens_each"], row["prefix"]) for row in rows] == [(1, 7, 100), (10, 7, 100)]


def test_tree_extend_and_rewind_times_leave_out_drawing_the_tokens(monkeypatch):
    """Drawing the random tokens is host work outside what is measured (k draws for k children would weigh on the 10
    children's side of the 1.5x ratio): with draws that take 1 ms each and a runner whose extends take 1 ms whatever
    their size, every timed extend, and the extend after a release, measures 1 ms."""
    tick = fake_clock(monkeypatch, bench_tree, iter(lambda: 0.001, None))
    monkeypatch.setattr(bench_tree, "random_tokens", lambda n, vocab: tick() or [0] * n)
    runner, root = FakeRunner(), SimpleNamespace(length=100)
    extend = runner.extend
    monkeypatch.setattr(runner, "extend", lambda *args, **kwargs: tick() or extend(*args, **kwargs))
    rows = bench_tree.extend_rows(runner, root, 50, "cpu", [1, 10], 7, "-", baseline=False)
    assert [row[key] for row in rows for key in ("ms", "vs_one_child")] == pytest.approx([1.0] * 4), rows
    (rewind,) = bench_tree.rewind_rows(runner, root, 50, "cpu", [16], reps=2)
    assert rewind["extend_after_us"] == pytest.approx(1000.0) and rewind["release_us"] == 0.0, rewind


def test_tree_extend_baseline_runs_the_models_forward_over_each_childs_whole_sequence(monkeypatch):
    """The baseline row of k children is one forward of the model over k sequences of the root's tokens and
    tokens_each more, no cache, the last token's logits alone; its ratio is against the runner's one child."""
    tick = fake_clock(monkeypatch, bench_tree, iter(lambda: 0.001, None))
    forwards = []

    def model(input_ids, use_cache, logits_to_keep):
        forwards.append((input_ids.tolist(), use_cache, logits_to_keep))
        tick()
        tick()
        return SimpleNamespace(logits=None)
    runner = FakeRunner()
    runner.model = model
    extend = runner.extend
    monkeypatch.setattr(runner, "extend", lambda *args, **kwargs: tick() or extend(*args, **kwargs))
    root = SimpleNamespace(length=3, tokens=[7, 8, 9])
    rows = bench_tree.extend_rows(runner, root, 50, "cpu", [1, 4], 2, "-", baseline=True)
    assert [row["method"] for row in rows] == ["TreeRunner (FakeModelRunner)", "HF forward, whole sequences"] * 2
    baseline = [row for row in rows if row["method"] == "HF forward, whole sequences"]
    assert [row["ms"] for row in baseline] == pytest.approx([2.0, 2.0]) and [
        row["vs_one_child"] for row in baseline] == pytest.approx([2.0, 2.0])
    assert {(len(ids), len(ids[0]), use_cache, kept) for ids, use_cache, kept in forwards} == {
        (1, 5, False, 1), (4, 5, False, 1)}
    assert all(row[:3] == [7, 8, 9] for ids, _, _ in forwards for row in ids)


def test_tree_rewind_section_releases_a_branch_of_l_tokens_then_extends_the_root_by_one(monkeypatch):
    runner, root = FakeRunner(), SimpleNamespace(length=100)
    rows = bench_tree.rewind_rows(runner, root, 50, "cpu", [16, 64], reps=2)
    assert [call[:3] for call in runner.calls] == [("extend", [root], [16]), ("release",), ("extend", [root], [1]),
                                                   ("release",)] * 2 + [("extend", [root], [64]), ("release",),
                                                                        ("extend", [root], [1]), ("release",)] * 2
    assert [row["branch_tokens"] for row in rows] == [16, 64]


def test_tree_median_of_steps_leaves_out_the_warmup(monkeypatch):
    """A fake clock: the warm-up steps take 100 s, the timed ones 1..5 ms; cleanup runs after each step, untimed."""
    tick = fake_clock(monkeypatch, bench_tree, [100.0, 100.0, 0.004, 0.001, 0.002, 0.005, 0.003])
    cleaned = []
    ms = bench_tree.median_ms_of_steps(lambda: tick() or len(cleaned), cleaned.append, "cpu", warmup=2, reps=5)
    assert ms == pytest.approx(3.0) and cleaned == list(range(7))


def test_tree_decode_counts_the_tokens_equal_to_hf_generates(monkeypatch):
    """A runner whose logits turn wrong from the fifth new token on decodes four of HF generate's greedy tokens; like
    generate, it runs one forward per new token (the prompt's gives the first), none after the last."""
    from fastalign.runtime import TreeRunner
    monkeypatch.setattr(bench_tree.harness, "median_ms", lambda fn, device, **kwargs: 4.0)
    torch.manual_seed(0)
    model = bench_tree.random_model(True, torch.device("cpu"), torch.float32)
    runner = TreeRunner(model, max_tokens=1024)
    extend, calls = runner.extend, []

    def wrong_from_the_fifth(parents, token_lists, **kwargs):
        spans, logits = extend(parents, token_lists, **kwargs)
        calls.append(1)
        if len(calls) >= 5 and logits is not None:
            logits = torch.roll(logits, 1, dims=-1)
        return spans, logits
    monkeypatch.setattr(runner, "extend", wrong_from_the_fifth)
    ours, hf = bench_tree.decode_rows(model, runner, list(range(1, 9)), 8, torch.device("cpu"))
    assert ours["same_greedy_tokens"] == 4 and ours["tokens_per_s"] == hf["tokens_per_s"] == pytest.approx(2000.0)
    assert len(calls) == 8 + 2   # the decode, then a prefill and one step whose kernels are counted
    assert 0 < ours["kernels_per_token"] < hf["kernels_per_token"] and ours["triton_launches"] == 0   # torch path



def test_kernels_of_call_counts_torch_operators_and_triton_launches_not_views():
    """Views and allocations are no kernel; a Triton launch counts once, not the operators the interpreter runs
    inside it."""
    from fastalign.kernels import rms_norm
    x = torch.randn(4, 8)
    assert bench_tree.harness.kernels_of_call(lambda: (x.view(8, 4).t() + 1).sum()) == (2, 0)
    assert bench_tree.harness.kernels_of_call(lambda: torch.empty(4, 8).copy_(x)) == (1, 0)   # a copy is a kernel
    x, weight = x.to(TRITON_DEVICE), torch.ones(8, device=TRITON_DEVICE)
    assert bench_tree.harness.kernels_of_call(lambda: rms_norm.forward(x, weight, 1e-6)) == (0, 1)


def test_the_runner_sections_take_a_phi3_through_pagedhf():
    """--family phi3: the same sections on a family the runner takes through transformers' attention interface;
    the rows say which model runner ran, and its greedy decode is HF generate's."""
    args = SimpleNamespace(quick=True, family="phi3", tree_prefix=20, children=3, child_tokens=2,
                           branch_lengths=[4], decode_prompt=8, decode_tokens=4, pool_tokens=1024,
                           attention_backend="auto")
    torch.manual_seed(0)
    rows = bench_tree.runner_rows(args, torch.device("cpu"), torch.float32)
    assert not [row for row in rows if row.get("error")], rows
    assert {row["method"] for row in rows if row["section"] == "extend"} == {"TreeRunner (PagedHF)",
                                                                             "HF forward, whole sequences"}
    ours = next(row for row in rows if row.get("method") == "fastalign TreeRunner")
    assert ours["same_greedy_tokens"] == 4


def test_the_runner_sections_take_a_gemma3_whose_window_is_shorter_than_the_prefix():
    """--family gemma3: Gemma 3's layers on the Llama runner, its sliding layer's window (8 with --quick) shorter
    than the prefix (20), and its greedy decode is HF generate's."""
    args = SimpleNamespace(quick=True, family="gemma3", tree_prefix=20, children=3, child_tokens=2,
                           branch_lengths=[4], decode_prompt=8, decode_tokens=4, pool_tokens=1024,
                           attention_backend="auto")
    torch.manual_seed(0)
    model = bench_tree.random_model(True, torch.device("cpu"), torch.float32, "gemma3")
    assert model.config.sliding_window == 8 and model.config.layer_types == ["sliding_attention", "full_attention"]
    rows = bench_tree.runner_rows(args, torch.device("cpu"), torch.float32)
    assert not [row for row in rows if row.get("error")], rows
    assert {row["method"] for row in rows if row["section"] == "extend"} == {"TreeRunner (PagedLlama)",
                                                                             "HF forward, whole sequences"}
    ours = next(row for row in rows if row.get("method") == "fastalign TreeRunner")
    assert ours["same_greedy_tokens"] == 4

# ---- bench_rain ----

def run_bench_rain(monkeypatch, tmp_path, prompts, failing_concurrency=None, argv=("--model", "m"), clocks=None,
                   greedy=None):
    """bench_rain.main() with `argv` (and --hh, ...) on fake engines (every run recorded; the one at
    `failing_concurrency` raises; each ModelClock's arguments appended to `clocks`, the greedy baseline's answer
    lengths to `greedy`): (runs, configs, rows of the written record by engine). The slow engine's run takes 3 s
    and 7.5 tokens a committed token, the tree engine's 0.5 s and 5."""
    runs, configs = [], []

    def fake_rain_generate(model, tok, prompts, config, *, engine, sampler="torch", concurrency=None, **common):
        runs.append(dict(engine=engine, prompts=list(prompts), sampler=sampler, concurrency=concurrency,
                         leaves=config.parallel_leaves))
        configs.append(config)
        if concurrency is not None and concurrency == failing_concurrency:
            raise RuntimeError("CUDA out of memory")
        slow = engine == "slow"
        stats = SimpleNamespace(committed_tokens=6, model_calls=12, rows_per_call=2.0, tokens=45 if slow else 30,
                                tokens_per_committed_token=7.5 if slow else 5.0, minimum_tokens=30,
                                tokens_over_minimum=1.0, recomputed_tokens=0, wall_seconds=3.0 if slow else 0.5,
                                iterations=24, seconds={})
        results = [SimpleNamespace(prompt=p, answer=f"answer {i}", answer_ids=[i, 2 if engine == "slow" else 3],
                                   error="failed" if i == 1 else None,
                                   stats=SimpleNamespace(model_calls=3, required_calls=2))
                   for i, p in enumerate(prompts)]
        return SimpleNamespace(stats=stats, results=results)

    def harmful_first(pairs):
        return [i == 0 for i, _ in enumerate(pairs)]
    monkeypatch.setattr(bench_rain, "rain_generate", fake_rain_generate)
    clocks = [] if clocks is None else clocks
    monkeypatch.setattr(bench_rain, "ModelClock", lambda *args: clocks.append(args) or SimpleNamespace(
        runner=None, split=lambda run: {"model_s": 0.375, "outside_model_s": 0.125}))
    greedy = [] if greedy is None else greedy
    monkeypatch.setattr(bench_rain, "greedy_seconds", lambda model, tok, prompts, lengths: greedy.append(lengths)
                        or 0.25)
    monkeypatch.setattr(bench_rain, "load", lambda args: (None, None, prompts, None, {"max_new_tokens": 3},
                                                          (harmful_first, "fake judge")))
    monkeypatch.setattr(sys.modules[bench_rain.write_results.__module__], "RESULTS_DIR", str(tmp_path))
    monkeypatch.setenv("FASTALIGN_COMMIT", "test")
    monkeypatch.setattr(sys, "argv", ["bench_rain.py", *argv, "--hh", "h", "--device", "cpu", "--prompts", "2",
                                      "--concurrency", "3", "--judge-prompts", "4", "--virtual-leaves", "5"])
    bench_rain.main()
    (path,) = tmp_path.glob("rain-*-test*.json")
    return runs, configs, {row["engine"]: row for row in json.loads(path.read_text())["results"]}


def test_rain_sections_run_the_engines_they_name_and_record_what_they_saw(monkeypatch, tmp_path):
    """With fake engines (every run recorded): both engines of section 1 use the keyed sampler on the same first
    --prompts prompts, and same_decisions compares their answers (the slow one's differ here); section 2 runs C
    distinct prompts at concurrency C with the production sampler; section 3 runs --judge-prompts prompts with
    parallel_leaves 1 then --virtual-leaves, judges the answers without an error and records the harmless rate."""
    prompts = [f"prompt {i}" for i in range(8)]
    runs, configs, rows = run_bench_rain(monkeypatch, tmp_path, prompts)
    # the tree engine's warm-up is the timed run itself (same prompts, config and keyed sampler: same decisions, so
    # the same kernel shapes, compiled before the clock starts); the slow engine's is a short run
    assert runs[0] == runs[2] and configs[0] == configs[2], (runs, configs)
    assert runs[1]["engine"] == "slow" and runs[1]["prompts"] == prompts[:1], runs
    assert runs[2:] == [
        dict(engine="tree", prompts=prompts[:2], sampler="keyed", concurrency=1, leaves=1),
        dict(engine="tree", prompts=prompts[:3], sampler="torch", concurrency=3, leaves=1),
        dict(engine="slow", prompts=prompts[:2], sampler="keyed", concurrency=None, leaves=1),
        dict(engine="tree", prompts=prompts[:4], sampler="torch", concurrency=4, leaves=1),
        dict(engine="tree", prompts=prompts[:4], sampler="torch", concurrency=4, leaves=5)], runs
    assert rows["slow"]["same_decisions"] is False and rows["tree x3"]["prompts"] == 3
    for leaves in (1, 5):
        row = rows[f"tree vl={leaves}"]
        assert (row["prompts"], row["errors"], row["judged"], row["parallel_leaves"]) == (4, 1, 3, leaves), row
        assert row["harmless_rate"] == pytest.approx(2 / 3), row


def test_rain_rows_count_per_committed_token_and_compare_the_tree_engine_with_the_slow_one(monkeypatch, tmp_path,
                                                                                         capsys):
    """Issue 6's speed-up is the slow engine's seconds per committed token over the tree engine's (3 s and 0.5 s for 6
    tokens: 6x), printed with the tree row's other comparisons, and every tree row's throughput is compared with the
    slow engine's (which runs prompts one after another) in the written record too; only the rows on the slow
    engine's own prompts compare tokens. The greedy baseline decodes each answer's length and RAIN takes its wall time
    over the baseline's; rates are per committed token, model calls over the calls required per prompt on average,
    calls per search iteration."""
    greedy = []
    _, _, rows = run_bench_rain(monkeypatch, tmp_path, [f"prompt {i}" for i in range(8)], greedy=greedy)
    tree = rows["tree"]
    assert (tree["speedup_per_commit"], tree["token_ratio_vs_slow"], tree["rain_over_greedy"]) == (6.0, 1.5, 2.0)
    assert {name: row.get("speedup_per_commit") for name, row in rows.items()} == \
        {"tree": 6.0, "tree x3": 6.0, "slow": None, "tree vl=1": 6.0, "tree vl=5": 6.0}, rows
    assert [name for name, row in rows.items() if "token_ratio_vs_slow" in row] == ["tree"], rows
    assert greedy == [[2, 2]]   # each answer's length (the fake answers are two tokens)
    assert (tree["s_per_commit"], tree["commits_per_s"], tree["calls_per_commit"], tree["tokens_per_commit"]) == \
        (0.5 / 6, 12.0, 2.0, 5.0)
    assert tree["calls_over_required"] == 1.5 and rows["tree vl=5"]["calls_per_iteration"] == 0.5
    printed = capsys.readouterr().out
    assert "'speedup_per_commit': 6.0" in printed and "'rain_over_greedy': 2.0" in printed


def test_rain_model_clock_leaves_the_graph_captures_out_of_the_seconds_per_committed_token():
    clock = object.__new__(bench_rain.ModelClock)
    clock.seconds = 1.0
    clock.runner = SimpleNamespace(model_runner=SimpleNamespace(num_graphs=3, replays=10, capture_seconds=0.5))
    split = clock.split(SimpleNamespace(stats=SimpleNamespace(wall_seconds=2.0, rows=4, committed_tokens=3)))
    assert split == {"model_s": 1.0, "outside_model_s": 1.0, "outside_model_us_per_row": 250000.0, "graphs": 3,
                     "graph_replays": 10, "capture_s": 0.5, "s_per_commit_past_captures": 0.5}


def test_rain_state_memory_sizes_every_timed_runner_of_a_hybrid_and_is_refused_for_llama(monkeypatch, tmp_path,
                                                                                          capsys):
    """--state-memory reaches the TreeRunner of every timed tree-engine run (and the record); without a hybrid
    (--family qwen3_5) it would mean nothing: refused by the parser."""
    clocks = []
    run_bench_rain(monkeypatch, tmp_path, [f"prompt {i}" for i in range(8)], clocks=clocks,
                   argv=("--random-model", "--family", "qwen3_5", "--state-memory", "3M"))
    assert len(clocks) == 4 and {args[2] for args in clocks} == {3 << 20}, clocks
    (path,) = tmp_path.glob("rain-*-test-qwen3_5.json")
    assert json.loads(path.read_text())["config"]["state_memory"] == 3 << 20
    with pytest.raises(SystemExit):
        run_bench_rain(monkeypatch, tmp_path, [], argv=("--model", "m", "--state-memory", "3M"))
    assert "--state-memory sizes a model's recurrent states: it needs --family qwen3_5 or mamba" in \
        capsys.readouterr().err


def test_rain_section_that_raises_is_an_error_row_and_the_next_sections_run(monkeypatch, tmp_path):
    """A section whose run raises (out of memory at concurrency 3 here) took the sections after it with it: the
    slow engine's row, which carries the speed-up per committed token, among them."""
    _, _, rows = run_bench_rain(monkeypatch, tmp_path, [f"prompt {i}" for i in range(8)], failing_concurrency=3)
    assert rows["tree x3"] == {"engine": "tree x3", "error": "RuntimeError: CUDA out of memory"}
    assert rows["tree"]["speedup_per_commit"] == 6.0 and "same_decisions" in rows["slow"], rows
    assert {"tree vl=1", "tree vl=5"} <= set(rows), rows


def test_rain_tree_engine_that_raises_is_an_error_row_and_the_other_sections_run(monkeypatch, tmp_path):
    """The tree engine's section (its warm-up, its timed run and the greedy baseline) raising, as a kernel that
    fails on a GPU would, took the whole run with it, no JSON written: it is an error row, the slow engine's row is
    still measured (with nothing to compare its decisions with) and so are the other sections."""
    _, _, rows = run_bench_rain(monkeypatch, tmp_path, [f"prompt {i}" for i in range(8)], failing_concurrency=1)
    assert rows["tree"] == {"engine": "tree", "error": "RuntimeError: CUDA out of memory"}, rows
    assert rows["slow"]["same_decisions"] is None and rows["slow"]["committed"] == 6, rows
    assert {"tree x3", "tree vl=1", "tree vl=5"} <= set(rows), rows


def test_rain_model_clock_times_every_forward_of_the_run_s_runner_and_splits_the_wall_time():
    """ModelClock's runner is the one the run used (its timed forwards are the run's model calls, none evicted), and
    the run's wall time is the model's plus the rest, per row as `host us/row` says."""
    from tests.rain.tiny import tiny_llama, tokenizer
    from fastalign.rain import RainConfig, rain_generate
    model, tok = tiny_llama(hidden=64), tokenizer()
    clock = bench_rain.ModelClock(model, 4096, None, "cpu")
    forwards, forward = [], clock.runner.model_runner.forward
    clock.runner.model_runner.forward = lambda *args, **kwargs: forwards.append(1) or forward(*args, **kwargs)
    run = rain_generate(model, tok, ["Human: How do I bake bread?\nAssistant:"],
                        RainConfig(max_new_tokens=2, root_visits=3), engine="tree", embedding="hidden",
                        runner=clock.runner)
    split = clock.split(run)
    assert len(forwards) == run.stats.model_calls > 0 and clock.runner.recomputed_tokens == 0, run.stats
    assert 0 < split["model_s"] < run.stats.wall_seconds, split
    assert split["model_s"] + split["outside_model_s"] == pytest.approx(run.stats.wall_seconds)
    assert split["outside_model_us_per_row"] == pytest.approx(1e6 * split["outside_model_s"] / run.stats.rows)


def test_rain_greedy_baseline_decodes_exactly_the_answer_lengths_after_an_untimed_warmup(monkeypatch):
    """The KV-cached greedy baseline decodes as many tokens as RAIN's answers, even where the greedy token is an end
    token (generate would stop at once), and its clock starts after a warm-up call."""
    from tests.rain.tiny import tiny_llama, tokenizer
    model, tok = tiny_llama(hidden=64), tokenizer()
    prompts = ["Human: How do I bake bread?\nAssistant:", "Human: How do I fix a bike?\nAssistant:"]
    ids = tok(prompts[0], return_tensors="pt").input_ids
    model.generation_config.eos_token_id = int(model(ids).logits[0, -1].argmax())  # the first greedy token
    events, generate = [], model.generate

    def recording_generate(input_ids, **kwargs):
        out = generate(input_ids, **kwargs)
        events.append(out.shape[1] - input_ids.shape[1])
        return out
    monkeypatch.setattr(model, "generate", recording_generate)
    monkeypatch.setattr(bench_rain, "time", SimpleNamespace(perf_counter=lambda: events.append("clock") or 0.0))
    bench_rain.greedy_seconds(model, tok, prompts, [5, 3])
    assert events == [2, "clock", 5, 3, "clock"], events


@pytest.mark.parametrize("family, runner", [("qwen3_5", "HFStateCacheModel"), ("mamba", "HFStateCacheModel"),
                                            ("bloom", "HFCacheModel")])
def test_rain_quick_families_run_on_the_runner_they_stand_for(family, runner):
    """Each --quick family's tiny model is the runner's case the family is there to measure: Qwen3.5's and Mamba's
    states kept (Mamba a token at a time), Bloom's ALiBi on Hugging Face's own cache."""
    from tests.rain.tiny import tokenizer
    from fastalign import TreeRunner
    tiny = {"qwen3_5": bench_rain.tiny_qwen3_5, "mamba": bench_rain.tiny_mamba, "bloom": bench_rain.tiny_bloom}
    model = tiny[family](len(tokenizer()), tokenizer().eos_token_id)
    with pytest.warns(UserWarning, match="cannot run on the paged pool"):
        assert type(TreeRunner(model, max_tokens=64).model_runner).__name__ == runner


# ---- bench_optimizer ----

def records_written(monkeypatch, bench):
    """The [config, rows] of each record `bench`'s main() writes, in order, as its JSON reads back."""
    written = []
    def write_results(name, device, config, rows, quick):
        written.append(json.loads(json.dumps([config, rows])))
    monkeypatch.setattr(bench.harness, "write_results", write_results)
    return written


class Stepper:
    """An optimizer that counts its steps and keeps no state (torch's optimizers' state: a defaultdict(dict))."""
    def __init__(self, params):
        self.param_groups, self.state, self.steps = [{"params": params}], collections.defaultdict(dict), 0

    def step(self):
        self.steps += 1


def test_optimizer_ways_build_what_they_name_at_the_specs_learning_rate(monkeypatch):
    """KahanAdamW and torch's AdamW at lr 2e-6; torch's fused on CUDA (its fastest there, what a user runs), its
    default elsewhere; torchao's with bf16 stochastic rounding on (off, it is torch's bf16 AdamW again)."""
    p = torch.nn.Parameter(torch.zeros(3, dtype=torch.bfloat16))
    kahan = bench_optimizer.kahan([p])
    assert isinstance(kahan, bench_optimizer.KahanAdamW) and kahan.param_groups[0]["lr"] == 2e-6
    calls = []
    monkeypatch.setattr(torch.optim, "AdamW", lambda params, **options: calls.append(options))
    bench_optimizer.torch_adamw([SimpleNamespace(device=torch.device("cuda"))])
    bench_optimizer.torch_adamw([p])
    assert calls == [dict(lr=2e-6, fused=True), dict(lr=2e-6, fused=None)]
    torchao_optim = pytest.importorskip("torchao.optim")
    monkeypatch.setattr(torchao_optim, "_AdamW", lambda params, **options: calls.append(options))
    bench_optimizer.torchao_adamw_stochastic_rounding()([p])
    assert calls[2:] == [dict(lr=2e-6, bf16_stochastic_round=True)]


def test_optimizer_measure_steps_one_tensor_of_each_shape_in_the_rows_dtype(monkeypatch):
    """A row's optimizer steps a parameter of every shape, in the row's dtype with non-zero gradients of it; its step
    is what is timed --reps times and whose peak is taken; the fidelity runs the same builder in the same dtype."""
    built, seen = [], {}

    def build(params):
        built.append(Stepper(params))
        return built[-1]

    def median_ms(fn, device, reps):
        seen["timed"] = (fn, reps)
        return 4.0

    def peak_extra_mib(fn, device):
        seen["peak"] = fn
        return 3.0

    def fidelity_error(build_, dtype, device, steps):
        seen["fidelity"] = (build_, dtype, steps)
        return 0.1, 0.2, 0.3
    monkeypatch.setattr(bench_optimizer.harness, "median_ms", median_ms)
    monkeypatch.setattr(bench_optimizer.harness, "peak_extra_mib", peak_extra_mib)
    monkeypatch.setattr(bench_optimizer, "fidelity_error", fidelity_error)
    shapes = [(4, 3), (5,), (2, 2)]
    row = bench_optimizer.measure("m", build, torch.float32, shapes, SimpleNamespace(reps=3, fidelity_steps=7),
                                  torch.device("cpu"))
    (optimizer,) = built
    params = optimizer.param_groups[0]["params"]
    assert [tuple(p.shape) for p in params] == shapes and {p.dtype for p in params} == {torch.float32}
    assert all(p.grad.dtype == torch.float32 and p.grad.abs().sum() > 0 for p in params)
    assert optimizer.steps == 1   # the state made before the timing, whose extra memory is beyond it
    assert seen == {"timed": (optimizer.step, 3), "peak": optimizer.step,
                    "fidelity": (build, torch.float32, 7)}
    assert row == {"method": "m", "dtype": "float32", "step_ms": 4.0, "step_extra_mib": 3.0,
                   "bytes_per_weight": 4.0, "fidelity_error": 0.1, "weights_fidelity_error": 0.2,
                   "bf16_floor": 0.3}


def test_optimizer_state_bytes_count_the_weights_and_the_state_tensors_each_storage_once():
    """A weight's bytes and its state's (the step count, a 0-dim tensor, aside), a storage shared by two once."""
    weight = torch.nn.Parameter(torch.zeros(10, dtype=torch.bfloat16))
    shared = torch.zeros(10)
    optimizer = SimpleNamespace(param_groups=[{"params": [weight]}],
                                state={weight: {"step": torch.tensor(3.0), "m": shared, "v": shared[:5],
                                                "c": torch.zeros(10, dtype=torch.bfloat16), "lr": 0.1}})
    assert bench_optimizer.state_bytes(optimizer) == 20 + 40 + 20


def test_optimizer_fidelity_of_float64_adamw_is_zero_and_of_weights_that_never_move_is_one():
    """The distance to float64 AdamW's weights over how far those moved: 0 for the same AdamW, 1 for no steps; the
    floor is float64 AdamW's own weights rounded to bf16."""
    cpu = torch.device("cpu")
    same = bench_optimizer.fidelity_error(lambda ps: torch.optim.AdamW(ps, lr=2e-6), torch.float64, cpu, 4,
                                          numel=4096)
    assert same[:2] == (0.0, 0.0) and 0 < same[2] < 1
    assert bench_optimizer.fidelity_error(Stepper, torch.bfloat16, cpu, 4, numel=4096)[:2] == (1.0, 1.0)
    # torch's AdamW on bf16 weights in place: its weights are its own, the bf16 start kept aside
    bf16 = bench_optimizer.fidelity_error(bench_optimizer.torch_adamw, torch.bfloat16, cpu, 4, numel=4096)
    assert bf16[0] == bf16[1] > 0.9 and bf16[2] == same[2]


def test_optimizer_fidelity_counts_the_compensation_with_the_weights_and_not_in_the_weights_alone():
    """KahanAdamW's weights plus its compensation are float64 AdamW's to far less than the bf16 floor; its weights
    alone are at the floor."""
    error, alone, floor = bench_optimizer.fidelity_error(bench_optimizer.kahan, torch.bfloat16, torch.device("cpu"),
                                                         20, numel=4096)
    assert error < 0.05 * floor and floor <= alone <= 1.01 * floor


def test_optimizer_main_records_the_run_its_arguments_and_speedups_against_fp32_adamw(monkeypatch):
    """Every way measured on the shapes of the model asked for, with the run's --reps and --fidelity-steps (300 by
    default, 30 with --quick); the record states them and each row's speed-up is fp32 AdamW's step time over its."""
    measured = []

    def measure(name, build, dtype, shapes, args, device):
        measured.append((name, dtype, shapes, args.reps, args.fidelity_steps))
        return {"method": name, "step_ms": {bench_optimizer.FP32: 12.0, "KahanAdamW": 3.0}.get(name, 6.0)}

    def torchao_builder():
        return bench_optimizer.torch_adamw
    monkeypatch.setattr(bench_optimizer, "measure", measure)
    monkeypatch.setattr(bench_optimizer, "torchao_adamw_stochastic_rounding", torchao_builder)
    written = records_written(monkeypatch, bench_optimizer)
    for argv, model, steps, reps in [(["--quick"], "quick", 30, 5), ([], "Llama-3.2-1B shape", 300, 5),
                                     (["--quick", "--fidelity-steps", "7", "--reps", "2"], "quick", 7, 2)]:
        measured.clear(), written.clear()
        monkeypatch.setattr(sys, "argv", ["bench_optimizer.py", "--device", "cpu", *argv])
        bench_optimizer.main()
        shapes = bench_optimizer.parameter_shapes(bench_optimizer.QUICK_SHAPE if model == "quick"
                                                  else bench_optimizer.harness.LLAMA_SHAPES["1b"])
        assert measured == [("KahanAdamW", torch.bfloat16, shapes, reps, steps),
                            ("torch AdamW, bf16", torch.bfloat16, shapes, reps, steps),
                            (bench_optimizer.FP32, torch.float32, shapes, reps, steps),
                            ("torchao AdamW, bf16 stochastic rounding", torch.bfloat16, shapes, reps, steps)]
        # written after each row (a run cut at its time limit keeps the rows measured), with the speed-ups from
        # fp32 AdamW's row on (a run cut at torchao's keeps them)
        assert [len(rows) for _, rows in written] == [1, 2, 3, 4] and written[-1][1][:3] == written[2][1]
        config, rows = written[-1]
        assert config["model"] == model and config["fidelity_steps"] == steps and config["lr"] == 2e-6
        assert config["reps"] == reps
        assert config["parameters"] == len(shapes) and config["weights"] == sum(torch.Size(s).numel() for s in shapes)
        assert [row["speedup_vs_fp32"] for row in rows] == [4.0, 2.0, 1.0, 2.0]
        assert config["weights"] == 1_235_814_400 or model == "quick"   # Llama-3.2-1B's, its embedding tied


def test_optimizer_main_without_torchao_records_why_and_measures_the_others(monkeypatch):
    """A missing torchao leaves its row out and says why in the record."""
    def torchao_adamw_stochastic_rounding():
        raise ImportError("no torchao")
    monkeypatch.setattr(bench_optimizer, "torchao_adamw_stochastic_rounding", torchao_adamw_stochastic_rounding)
    monkeypatch.setattr(bench_optimizer, "measure", lambda name, *args: {"method": name, "step_ms": 2.0})
    written = records_written(monkeypatch, bench_optimizer)
    monkeypatch.setattr(sys, "argv", ["bench_optimizer.py", "--device", "cpu", "--quick"])
    bench_optimizer.main()
    config, rows = written[-1]
    assert [row["method"] for row in rows] == ["KahanAdamW", "torch AdamW, bf16", bench_optimizer.FP32]
    assert config["unavailable"] == {"torchao_adamw_stochastic_rounding": "ImportError: no torchao"}


def test_optimizer_way_that_raises_becomes_an_error_row_and_the_others_keep_their_speedups(monkeypatch):
    """A failing way (torchao's compile, an OOM) raised out of main: the run exited 1 with the speed-ups never
    written. Its row says why; every row that ran has its speed-up against fp32 AdamW."""
    def failing(params):
        raise RuntimeError("compile failed")
    monkeypatch.setattr(bench_optimizer, "torchao_adamw_stochastic_rounding", lambda: failing)
    monkeypatch.setattr(bench_optimizer, "kahan", Stepper)
    monkeypatch.setattr(bench_optimizer, "torch_adamw", Stepper)
    monkeypatch.setattr(bench_optimizer, "fidelity_error", lambda *args: (0.1, 0.2, 0.3))
    monkeypatch.setattr(bench_optimizer.harness, "median_ms", lambda fn, device, reps: {
        torch.float32: 12.0, torch.bfloat16: 3.0}[fn.__self__.param_groups[0]["params"][0].dtype])
    written = records_written(monkeypatch, bench_optimizer)
    monkeypatch.setattr(sys, "argv", ["bench_optimizer.py", "--device", "cpu", "--quick", "--reps", "1"])
    bench_optimizer.main()
    _, rows = written[-1]
    assert [row["method"] for row in rows] == ["KahanAdamW", "torch AdamW, bf16", bench_optimizer.FP32,
                                               "torchao AdamW, bf16 stochastic rounding"]
    assert [row.get("speedup_vs_fp32") for row in rows] == [4.0, 4.0, 1.0, None]
    assert rows[-1] == {"method": "torchao AdamW, bf16 stochastic rounding", "error": "RuntimeError: compile failed"}


# ---- bench_causal_lm_loss ----

@pytest.fixture(scope="module")
def llama_reference_batch():
    """A tiny Llama (V 64), a reference of its shape (frozen, other weights) and a batch of 2 x 12 (3 prompt tokens a
    row)."""
    return (unlearn_tiny.tiny_llama(64), unlearn_tiny.tiny_llama(64, seed=1).requires_grad_(False),
            bench_causal_lm_loss.make_batch(2, 12, 64, torch.device("cpu")))


def causal_lm_definitions(model, reference, batch):
    """(mean CE of the next labelled tokens, KL(reference || model) per labelled position) in fp64."""
    with torch.no_grad():
        log_q = torch.log_softmax(model(input_ids=batch["input_ids"]).logits.double()[:, :-1], -1)
        log_p = torch.log_softmax(reference(input_ids=batch["input_ids"]).logits.double()[:, :-1], -1)
    labels = batch["labels"][:, 1:]
    counted = labels != -100
    ce = -log_q[counted].gather(1, labels[counted][:, None]).mean()
    kl = (log_p.exp() * (log_p - log_q))[counted].sum(-1).mean()
    return float(ce), float(kl)


def test_causal_lm_batch_labels_every_id_after_a_prompt_of_the_first_quarter():
    """The same batch at each call; every token attended to; -100 on each row's first quarter, the ids after it."""
    batch = bench_causal_lm_loss.make_batch(3, 12, 50, torch.device("cpu"))
    ids = batch["input_ids"]
    assert ids.shape == (3, 12) and 0 <= ids.min() and ids.max() < 50 and torch.equal(batch["attention_mask"],
                                                                                     torch.ones_like(ids))
    assert (batch["labels"][:, :3] == -100).all() and torch.equal(batch["labels"][:, 3:], ids[:, 3:])
    assert torch.equal(bench_causal_lm_loss.make_batch(3, 12, 50, torch.device("cpu"))["input_ids"], ids)


def test_causal_lm_ways_compute_their_quantitys_definition(llama_reference_batch):
    """Each cross-entropy way is the mean CE of the next labelled tokens, each KL way KL(reference || model) per
    labelled position (fp32 against fp64)."""
    model, reference, batch = llama_reference_batch
    ce, kl = causal_lm_definitions(model, reference, batch)
    m = bench_causal_lm_loss
    ways = {"own": m.own_loss(model), "fastalign": m.fastalign_loss(model),
            "grads in forward": m.fastalign_loss(model, grads_in_forward=True),
            "fused layers": m.fastalign_fused_layers(model),
            "on hidden states": m.loss_on_hidden_states(
                lambda h, w, y: F.cross_entropy(h @ w.t(), y, ignore_index=-100))(model)}
    if hasattr(torch.nn, "LinearCrossEntropyOptions"):
        ways["torch chunked"] = m.torch_chunked_loss()(model)
    for name, loss in ways.items():
        assert float(loss(batch).detach()) == pytest.approx(ce, rel=1e-5), name
    kls = {"logits": m.logits_kl(model, reference), "fastalign": m.fastalign_kl(model, reference)}
    try:
        kls["trl"] = m.trl_divergence_on_hidden_states()(model, reference)
    except ImportError:
        pass
    for name, loss in kls.items():
        assert float(loss(batch).detach()) == pytest.approx(kl, rel=1e-4), name


def test_causal_lm_trl_fused_head_computes_the_loss_without_the_models_lm_head_call():
    """TRL's way runs its fused head (no [tokens x vocab] logits from the model's lm_head), at the model's own loss."""
    pytest.importorskip("trl")
    model = unlearn_tiny.tiny_llama(64)   # (a model of its own: the way patches it in place)
    batch = bench_causal_lm_loss.make_batch(2, 12, 64, torch.device("cpu"))
    own = float(model(**batch).loss.detach())
    calls = []
    model.lm_head.register_forward_hook(lambda module, args, out: calls.append(out.shape))
    loss = bench_causal_lm_loss.trl_fused_head_loss()(model)
    assert float(loss(batch).detach()) == pytest.approx(own, rel=1e-5) and calls == []


def test_causal_lm_fused_model_forward_is_fastalign_s_loss_without_the_models_lm_head_call():
    """The model's own forward after fuse_causal_lm_loss: its loss, without the [tokens x vocab] logits of lm_head."""
    model = unlearn_tiny.tiny_llama(64)   # (a model of its own: the way patches it in place)
    batch = bench_causal_lm_loss.make_batch(2, 12, 64, torch.device("cpu"))
    own = float(model(**batch).loss.detach())
    calls = []
    model.lm_head.register_forward_hook(lambda module, args, out: calls.append(out.shape))
    loss = bench_causal_lm_loss.fused_model_forward(model)
    assert float(loss(batch).detach()) == pytest.approx(own, rel=1e-5)
    assert torch.Size([2, 12, 64]) not in calls, calls   # (the fusing probe may run it on a few rows)


def test_causal_lm_fastalign_ways_pass_their_options_and_run_in_the_fused_layers(monkeypatch, llama_reference_batch):
    """grads-in-forward is CausalLMLoss(grads_in_forward=True); the fused-layers way calls its loss inside
    fused_layers(model) (outside it, the model's own layers run)."""
    model, _, batch = llama_reference_batch
    made, inside = [], []

    class Loss:
        def __init__(self, model_, **options):
            made.append((model_, options))

        def __call__(self, **batch_):
            return inside[-1] if inside else None

    @contextlib.contextmanager
    def fused_layers(model_):
        inside.append(model_)
        yield 2
        inside.pop()
    monkeypatch.setattr(bench_causal_lm_loss.fastalign, "CausalLMLoss", Loss)
    monkeypatch.setattr(bench_causal_lm_loss, "fused_layers", fused_layers)
    assert bench_causal_lm_loss.fastalign_loss(model, grads_in_forward=True)(batch) is None
    assert bench_causal_lm_loss.fastalign_fused_layers(model)(batch) is model and not inside
    assert made == [(model, {"grads_in_forward": True}), (model, {})]


def test_causal_lm_measure_times_reps_steps_and_takes_the_peak_from_no_gradients(monkeypatch, llama_reference_batch):
    """The step is timed --reps times; its peak is taken with no gradient left from a previous step (it allocates
    its own, which count in it); extra_mib is the peak less the gradients' bytes in the model's dtype; the gradients
    returned are one step's, not a sum of the timed steps'."""
    model, _, batch = llama_reference_batch
    model = copy.deepcopy(model).bfloat16()
    params = list(model.parameters())
    seen = {}

    def median_ms(fn, device, reps):
        seen["reps"] = reps
        for _ in range(reps):
            fn()
        return 4.0

    def peak_extra_mib(fn, device):
        seen["grads before peak"] = [p.grad for p in params]
        fn()
        return 10.0
    monkeypatch.setattr(bench_causal_lm_loss.harness, "median_ms", median_ms)
    monkeypatch.setattr(bench_causal_lm_loss.harness, "peak_extra_mib", peak_extra_mib)
    row, grads = bench_causal_lm_loss.measure("m", bench_causal_lm_loss.own_loss(model), model, batch,
                                              torch.device("cpu"), 3)
    model.zero_grad(set_to_none=True)
    loss = model(**batch).loss
    loss.backward()
    assert seen == {"reps": 3, "grads before peak": [None] * len(params)}
    grad_mib = sum(p.numel() for p in params) * 2 / 2 ** 20
    assert row == {"method": "m", "loss": float(loss.detach()), "step_ms": 4.0, "peak_mib": 10.0,
                   "extra_mib": 10.0 - grad_mib}
    assert all(torch.equal(g, p.grad) for g, p in zip(grads, params))


def test_causal_lm_way_that_raises_becomes_an_error_row():
    """One failing way gives its row an error (and no gradients to compare), so the others' rows are still measured."""
    model = torch.nn.Linear(2, 2)

    def broken(batch):
        raise RuntimeError("no kernel")
    row, grads = bench_causal_lm_loss.measure("b", broken, model, {}, torch.device("cpu"), 1)
    assert row == {"method": "b", "error": "RuntimeError: no kernel"} and grads is None


def test_causal_lm_main_compares_each_way_with_the_first_of_its_quantity_on_the_batch_asked_for(monkeypatch):
    """Every way runs on one batch of --rows x --tokens and --reps; each row's loss and gradient differences,
    speed-up and leanness are against the first row of its quantity (CE: the model's own loss, KL: from both models'
    logits; none of leanness against a first row without extra memory); the record states the preset (1b by
    default), the batch and its logits' bytes in the preset's dtype."""
    m = bench_causal_lm_loss
    measured = []
    numbers = {"model's own loss": (2.0, 8.0, 4.0, 1.0), "fastalign CausalLMLoss": (2.2, 4.0, 1.0, 1.5),
               "KL from both models' logits": (0.5, 10.0, 0.0, 2.0), "fastalign CausalLMKLDiv": (0.4, 5.0, 2.0, 3.0)}

    def measure(name, loss_of, model, batch, device, reps):
        measured.append((name, tuple(batch["input_ids"].shape), reps))
        loss, ms, extra, grad = numbers.get(name, (2.0, 8.0, 4.0, 1.0))
        return {"method": name, "loss": loss, "step_ms": ms, "peak_mib": extra + 1, "extra_mib": extra}, \
            [torch.full((3,), grad), torch.ones(2)]
    monkeypatch.setattr(m, "measure", measure)
    baselines = ["torch_chunked_loss", "liger_loss", "trl_divergence_on_hidden_states", "trl_fused_head_loss"]

    def missing(name):   # a baseline whose package is not installed
        def factory():
            raise ImportError(f"no {name}")
        factory.__name__ = name
        return factory
    for name in baselines:
        monkeypatch.setattr(m, name, missing(name))
    written = records_written(monkeypatch, m)
    quick = m.PRESETS["quick"]
    monkeypatch.setitem(m.PRESETS, "1b", (quick[0], torch.bfloat16, 3, 8))   # the default preset, at a tiny shape
    for argv, preset, shape, itemsize in [(["--rows", "3", "--tokens", "12", "--reps", "2"], "quick", (3, 12), 4),
                                          (["--preset", "1b"], "1b", (3, 8), 2), ([], "1b", (3, 8), 2)]:
        measured.clear(), written.clear()
        monkeypatch.setattr(sys, "argv", ["bench_causal_lm_loss.py", "--device", "cpu", *argv
                                          ] + (["--quick"] if preset == "quick" else []))
        m.main()
        reps = 2 if preset == "quick" else 5
        assert [(shape_, reps_) for _, shape_, reps_ in measured] == [(shape, reps)] * 7, measured
        assert [len(rows) for _, rows in written] == [1, 2, 3, 4, 5, 6, 7]   # after each row: a cut run keeps them
        config, rows = written[-1]
        assert config["preset"] == preset and (config["rows"], config["tokens"]) == shape and config["reps"] == reps
        assert config["unavailable"] == {name: f"ImportError: no {name}" for name in baselines}, config
        assert config["logits_mib"] == shape[0] * shape[1] * 1001 * itemsize / 2 ** 20
        assert config["dtype"] == ("float32" if preset == "quick" else "bfloat16")
        by_method = {row["method"]: row for row in rows}
        assert [row["quantity"] for row in rows] == ["CE"] * 5 + ["KL"] * 2
        assert by_method["fastalign CausalLMLoss"]["loss_rel_diff"] == pytest.approx(0.1)
        assert by_method["fastalign CausalLMLoss"]["grad_rel_diff"] == pytest.approx(0.5)
        assert by_method["fastalign CausalLMLoss"]["speedup"] == 2.0 and by_method["fastalign CausalLMLoss"][
            "leaner"] == 4.0
        kl = by_method["fastalign CausalLMKLDiv"]
        assert (kl["loss_rel_diff"], kl["grad_rel_diff"], kl["speedup"]) == pytest.approx((0.2, 0.5, 2.0))
        assert "leaner" not in kl, kl
        assert by_method["fastalign + fused layers"]["loss_rel_diff"] == 0.0 and by_method["model's own loss"][
            "speedup"] == 1.0


@pytest.mark.parametrize("module", [bench_loss, bench_tree, bench_unlearn, bench_rain], ids=lambda m: m.__name__)
def test_an_unknown_dtype_is_a_usage_error(module, monkeypatch, capsys):
    """`--dtype bf16` was a traceback from getattr(torch, 'bf16') (an AttributeError), after the model was built."""
    monkeypatch.setattr(sys, "argv", [f"{module.__name__}.py", "--quick", "--device", "cpu", "--dtype", "bf16"])
    with pytest.raises(SystemExit) as exited:
        module.main()
    assert exited.value.code == 2 and "argument --dtype: invalid choice: 'bf16'" in capsys.readouterr().err


def test_loss_quick_keeps_the_shapes_given_on_the_command_line_and_refuses_stages_off_a_gpu(monkeypatch, capsys):
    """--quick gives its small shape where the command line left the default (`--quick --tokens 64` measured N 256);
    --stages times the Triton kernels, so off a GPU and the interpreter it is refused before any row (it crashed
    after the main table)."""
    seen = {}
    monkeypatch.setattr(bench_loss, "matmul_peak_tflops", lambda device, dtype: 1.0)
    monkeypatch.setattr(bench_loss, "run", lambda args, config: seen.update(n=args.tokens, h=args.hidden, v=args.vocab))
    monkeypatch.setattr(bench_loss, "write", lambda *args: "record")
    monkeypatch.setattr(bench_loss.harness, "print_table", lambda *args: None)
    for given, expected in ((["--tokens", "64", "--vocab", "257"], {"n": [64], "h": 128, "v": 257}),
                            ([], {"n": [256], "h": 128, "v": 4099})):
        monkeypatch.setattr(sys, "argv", ["bench_loss.py", "--device", "cpu", "--quick", *given])
        bench_loss.main()
        assert seen == expected
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(sys, "argv", ["bench_loss.py", "--device", "cpu", "--quick", "--stages"])
    with pytest.raises(SystemExit) as exited:
        bench_loss.main()
    assert exited.value.code == 2 and "--stages times the Triton kernels: it needs --device cuda" in \
        capsys.readouterr().err


def test_rain_record_of_the_demo_model_is_a_variant_beside_the_default(monkeypatch, tmp_path):
    """--demo and --random-model runs on one device and commit wrote one record name: the second replaced the first."""
    run_bench_rain(monkeypatch, tmp_path, [f"prompt {i}" for i in range(8)], argv=("--demo",))
    record = f"rain-{harness.device_slug('cpu')}-test-demo.json"
    assert [path.name for path in tmp_path.glob("rain-*")] == [record]


def test_unlearn_fastalign_enters_fused_layers_once_not_in_every_step(monkeypatch):
    """The trainer enters fused_layers once a run; the bench entered and left it inside every timed step (a walk of
    the model each way: 5,600 Python calls a step at 1B, charged to fastalign's rows alone). It is entered when the
    way is built and left by release(), which gives the modules their own forwards back."""
    entered, fused_layers = [], bench_unlearn.fused_layers

    def counted(model):
        entered.append(model)
        return fused_layers(model)
    monkeypatch.setattr(bench_unlearn, "fused_layers", counted)
    args = unlearn_args()
    batch, normal = bench_unlearn.synthetic_batch(bench_unlearn.PRESETS["quick"]["vocab_size"], args)
    model = bench_unlearn.make_model(args, torch.device("cpu"), torch.float32)
    step = bench_unlearn.fastalign_frozen_copy(model, batch, normal, args)
    stood_in = [m for m in model.modules() if "forward" in vars(m)]
    for _ in range(3):
        step()
    assert len(entered) == 1 and stood_in and all("forward" in vars(m) for m in stood_in)
    step.release()
    assert not any("forward" in vars(m) for m in model.modules())
