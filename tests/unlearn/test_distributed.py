"""The trainer under two gloo processes on the CPU, through accelerate: DDP, FSDP2 (lm_head in the root unit
or in a unit of its own, there also with the losses' gradients taken in the forward, and with bf16 weights), FSDP1
(also with its weights flattened, use_orig_params off; both also with bf16 weights), the cached reference under
FSDP2, LoRA under DDP, and errors raised on every process.

Process r of 2 draws batch 2*step + r, as micro-batch r of one process that accumulates two micro-batches
does, so each distributed run must end where that single-process run ends (fp32: to rounding). All
scenarios run in one launch of distributed_worker.py (see there for how FSDP is selected on the CPU).
"""
import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from transformers import LlamaForCausalLM

from fastalign.unlearn import accelerator as accelerator_module
from fastalign.unlearn.config import UnlearnConfig
from fastalign.unlearn.trainer import UnlearningTrainer
from tests.unlearn.tiny import byte_bpe_tokenizer, tiny_llama

pytest.importorskip("accelerate")
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCENARIOS = ["ddp", "fsdp2", "fsdp2_head_unit", "fsdp2_bf16", "fsdp1_bf16", "fsdp1_flat_bf16",
             "fsdp2_head_unit_grads_in_forward", "fsdp1", "fsdp2_cached", "fsdp2_cached_bf16",
             "fsdp2_bf16_reference_kl", "fsdp2_cached_head_changed", "ddp_lora_bf16", "nonfinite", "fsdp1_flat_root",
             "fsdp1_flat_cached", "fsdp1_cached", "fsdp2_train_again"]
TERMS = ("loss", "forget_nll", "mismatch_nll", "normal_kl")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(root, processes, scenarios):
    """Runs the scenarios in one launch of distributed_worker.py on `processes` gloo processes, under `root`."""
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={processes}",
               f"--master_port={free_port()}", os.path.join(ROOT, "tests", "unlearn", "distributed_worker.py"),
               str(root), *scenarios]
    done = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return root


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Output root of the two-process runs of every scenario."""
    return launch(tmp_path_factory.mktemp("distributed"), 2, SCENARIOS)


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """One-process runs with the worker's settings, accumulating 2 (or 4) micro-batches: name -> (trainer, dir)."""
    from tests.unlearn.distributed_worker import SETTINGS, streams

    root, out = tmp_path_factory.mktemp("single"), {}
    tokenizer = byte_bpe_tokenizer()
    for name, settings in {"copy": {"grad_accum": 2}, "copy_accum4": {"grad_accum": 4},
                           "cached": {"grad_accum": 2, "reference": "cached"}}.items():
        config = UnlearnConfig(output_dir=str(root / name), **{**SETTINGS, **settings})
        trainer = UnlearningTrainer(tiny_llama(len(tokenizer)), streams(), config)
        trainer.train()
        out[name] = trainer, root / name
    return out


def outcomes(path, processes=2):
    return [(path / f"outcome-rank{r}.txt").read_text() for r in range(processes)]


def log(path):
    return [json.loads(line) for line in (path / "log.jsonl").read_text().splitlines()]


def assert_same_run(path, model_dir, single_run, kl_abs=1e-7):
    """Saved weights and logged terms of a distributed run equal those of the single-process run (a term near 0, the
    KL, to kl_abs)."""
    trainer, single_dir = single_run
    saved = LlamaForCausalLM.from_pretrained(path / model_dir)
    for (name, a), (_, b) in zip(trainer.model.named_parameters(), saved.named_parameters()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=name)
    ours, theirs = log(path), log(single_dir)
    assert [r["step"] for r in ours] == [1, 2]
    for a, b in zip(theirs, ours):
        for key in TERMS:
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=kl_abs if key == "normal_kl" else 1e-7), key
        assert a["tokens"] == b["tokens"]


def units(path):
    return json.loads((path / "units.json").read_text())


DECODER_UNITS = ["model.layers.0", "model.layers.1"]


@pytest.mark.parametrize("scenario", ["ddp", "fsdp2", "fsdp1"])
def test_two_processes_match_one_process_with_accumulation(runs, single, scenario):
    """Also the KL term: the processes hold different numbers of normal tokens, and the KL must be their
    global token mean (as test_trainer checks for one process), not a mean of per-process means."""
    path = runs / scenario
    assert outcomes(path) == ["ok", "ok"]
    assert units(path) == ([] if scenario == "ddp" else DECODER_UNITS)
    assert_same_run(path, "model", single["copy"])
    run = json.loads((path / "run.json").read_text())
    assert run["num_processes"] == 2 and run["steps"] == 2
    assert log(path)[1]["normal_kl"] > 1e-5  # the KL term is not trivially 0 in the comparison
    assert_full_checkpoint(path)


def assert_full_checkpoint(path):
    """The step-1 checkpoint holds every trainable weight unsharded, and AdamW's state for each."""
    state = torch.load(path / "checkpoints" / "step-000001" / "state.pt", weights_only=False)
    original = dict(tiny_llama(len(byte_bpe_tokenizer())).named_parameters())
    assert {k.removeprefix("model.") for k in state["trainable"]} == set(original)
    for name, tensor in state["trainable"].items():
        assert tensor.shape == original[name.removeprefix("model.")].shape, name
        assert state["optimizer"]["state"][name]["exp_avg"].shape == tensor.shape, name


def test_fsdp1_flattening_the_whole_model_into_its_root_unit_trains_and_saves_it(runs, single):
    """FSDP1 without use_orig_params and without auto wrap leaves the model no parameter of its own (its root unit
    holds them all, flattened); the run trained, then crashed saving model/ (StopIteration: save_pretrained reads
    the model's dtype from its parameters)."""
    path = runs / "fsdp1_flat_root"
    assert outcomes(path) == ["ok", "ok"]
    assert_same_run(path, "model", single["copy"])
    assert_full_checkpoint(path)


def test_cached_reference_under_fsdp1_without_orig_params_is_an_error_naming_the_setting(runs):
    """The cached reference freezes the lm_head, which FSDP1 cannot flatten into one parameter with the trainable
    embeddings of its unit: FSDP's own error ("Must flatten tensors with uniform `requires_grad`") named no setting."""
    first, second = outcomes(runs / "fsdp1_flat_cached")
    assert first == second and first.startswith("ValueError: FSDP version 1 without use_orig_params")
    for phrase in ["lm_head.weight", "reference='cached'", "--fsdp_use_orig_params true", "FSDP version 2"]:
        assert phrase in first, phrase


def test_cached_reference_under_fsdp1_with_orig_params_trains_as_one_process(runs, single):
    """What that error advises: with use_orig_params, FSDP1's forward gives the frozen lm_head as a view of its unit's
    flat parameter, which requires grad (the embeddings and final norm beside it train). The cached reference refused
    it as a trained head at step 1; the objective now reads the head's own parameters, frozen."""
    path = runs / "fsdp1_cached"
    assert outcomes(path) == ["ok", "ok"]
    assert_same_run(path, "model", single["cached"])


def test_a_second_train_on_a_trainer_whose_model_fsdp_sharded_is_refused(runs):
    """FSDP sharded the model in place in the first train(); a second one prepared it again and failed inside the
    model's forward (mixed Tensor and DTensor). Refused on every process, naming the way to resume."""
    first, second = outcomes(runs / "fsdp2_train_again")
    assert first == second and first.startswith("RuntimeError: under FSDP a trainer trains once")
    assert "resume with a new UnlearningTrainer" in first


def test_fsdp2_lm_head_in_its_own_unit_trains_checkpoints_and_resumes(runs, single):
    """The fused losses gather an lm_head that FSDP sharded in a unit of its own, its gradient is reduced
    (the head trains as in one process), accumulation works, and a resumed FSDP run ends bit-identical."""
    path = runs / "fsdp2_head_unit"
    assert outcomes(path) == ["ok", "ok"]
    assert "lm_head" in units(path)
    # 2 processes x 2 micro-batches sum the gradients in another order than 1 x 4: fp32 rounding, which AdamW's
    # normalised step enlarges where a weight's gradient is rounding alone (the KL's at the first step). Its KL after
    # one step: 1.1e-7 apart from the single run's 2.3e-4 (the other scenarios, each 1 x 2 against 2 x 1: the same
    # bits)
    assert_same_run(path, "model", single["copy_accum4"], kl_abs=5e-7)
    original = tiny_llama(len(byte_bpe_tokenizer()))
    saved = LlamaForCausalLM.from_pretrained(path / "model")
    assert not torch.allclose(saved.lm_head.weight, original.lm_head.weight, atol=1e-4)
    assert_resumed_bit_identical(path)
    assert_full_checkpoint(path)


def assert_resumed_bit_identical(path):
    """The model of the run resumed from its step-1 checkpoint equals the uninterrupted run's bit for bit."""
    saved = LlamaForCausalLM.from_pretrained(path / "model")
    uninterrupted = LlamaForCausalLM.from_pretrained(path / "model-uninterrupted")
    for (name, a), (_, b) in zip(saved.named_parameters(), uninterrupted.named_parameters()):
        assert torch.equal(a, b), name


def test_three_processes_resume_bit_identical_under_ddp_and_fsdp2(tmp_path):
    """With 2 processes any order of the gradients' sum gives the same bits (a + b == b + a); with 3 it does not.
    DDP's first iteration (a resumed run's first step) laid its buckets out otherwise than its later ones (the
    uninterrupted run's same step), so the ring all-reduce rounded that step otherwise and the resumed weights
    differed (3.7e-9 at most). FSDP2's reduce-scatter has one layout."""
    if not accelerator_module._BUCKET_CAPS:
        pytest.skip("DDP's per-bucket caps (bucket_cap_mb_list) need torch 2.13")
    root = launch(tmp_path, 3, ["ddp_resume", "fsdp2_resume"])
    for scenario in ("ddp_resume", "fsdp2_resume"):
        assert outcomes(root / scenario, 3) == ["ok"] * 3
        assert_resumed_bit_identical(root / scenario)


def test_fsdp2_bf16_weights_train_with_kahan_adamw_on_their_shards_and_resume(runs):
    """Weights sharded in bf16 (DTensors) step with KahanAdamW shard by shard; the checkpoint holds each weight's
    compensation whole, and a resumed run ends bit-identical."""
    path = runs / "fsdp2_bf16"
    assert outcomes(path) == ["ok", "ok"]
    assert json.loads((path / "run.json").read_text())["optimizer"] == "KahanAdamW"
    saved = LlamaForCausalLM.from_pretrained(path / "model")
    original = tiny_llama(len(byte_bpe_tokenizer())).bfloat16()
    assert saved.lm_head.weight.dtype == torch.bfloat16
    assert not torch.equal(saved.lm_head.weight, original.lm_head.weight)
    assert_resumed_bit_identical(path)
    assert_full_checkpoint(path)
    state = torch.load(path / "checkpoints" / "step-000001" / "state.pt", weights_only=False)
    for name, tensor in state["trainable"].items():
        compensation = state["optimizer"]["state"][name]["compensation"]
        assert compensation.shape == tensor.shape and compensation.dtype == torch.bfloat16, name
    assert any(s["compensation"].any() for s in state["optimizer"]["state"].values())


@pytest.mark.parametrize("scenario", ["fsdp1_bf16", "fsdp1_flat_bf16"])
def test_fsdp1_bf16_weights_train_with_kahan_adamw(runs, scenario):
    """FSDP1 hands the optimizer each weight's shard (use_orig_params) or each unit's flat parameter: KahanAdamW steps
    them, and the saved weights moved."""
    path = runs / scenario
    assert outcomes(path) == ["ok", "ok"]
    assert json.loads((path / "run.json").read_text())["optimizer"] == "KahanAdamW"
    saved = LlamaForCausalLM.from_pretrained(path / "model")
    original = tiny_llama(len(byte_bpe_tokenizer())).bfloat16()
    assert not torch.equal(saved.model.layers[0].mlp.down_proj.weight, original.model.layers[0].mlp.down_proj.weight)


def test_fsdp2_gradients_taken_in_the_forward_of_a_sharded_lm_head(runs, single):
    """grads_in_forward under FSDP2 with the lm_head in a unit of its own: the gradients the fused losses take in the
    forward, from the gathered head, reach its shards as the backward's would (the run of one process)."""
    path = runs / "fsdp2_head_unit_grads_in_forward"
    assert outcomes(path) == ["ok", "ok"]
    assert "lm_head" in units(path)
    assert_same_run(path, "model", single["copy"])


def test_fsdp2_cached_reference(runs, single):
    """Under FSDP the cached reference accepts the gathered, unchanged lm_head every step, and rejects it
    on both processes once one process's shard has been changed."""
    path = runs / "fsdp2_cached"
    assert outcomes(path) == ["ok", "ok"]
    assert units(path) == DECODER_UNITS
    assert_same_run(path, "model", single["cached"])
    from tests.unlearn.distributed_worker import streams
    compute = json.loads((path / "run.json").read_text())["compute"]
    assert compute["reference_tokens"] == 2 * sum(len(e.input_ids) for e in streams().normal)  # a cache per process
    saved = LlamaForCausalLM.from_pretrained(path / "model")
    assert torch.equal(saved.lm_head.weight, tiny_llama(len(byte_bpe_tokenizer())).lm_head.weight)

    # bf16 compute: FSDP gathers a bf16 lm_head for the forward, which the cache accepts (its values are
    # the bf16 rounding of the frozen fp32 head); the terms stay within bf16 rounding of the fp32 run's.
    bf16 = runs / "fsdp2_cached_bf16"
    assert outcomes(bf16) == ["ok", "ok"]
    for a, b in zip(log(single["cached"][1]), log(bf16)):
        for key in ("forget_nll", "mismatch_nll"):
            assert b[key] == pytest.approx(a[key], rel=2e-2), key
    saved = LlamaForCausalLM.from_pretrained(bf16 / "model")
    assert torch.equal(saved.lm_head.weight, tiny_llama(len(byte_bpe_tokenizer())).lm_head.weight)

    changed = runs / "fsdp2_cached_head_changed"
    assert outcomes(changed) == ["RuntimeError: reference='cached': the lm_head weight was modified after the "
                                 "reference was cached"] * 2
    assert [r["step"] for r in log(changed)] == [1] and not (changed / "model").exists()


def test_fsdp2_bf16_reference_modes_give_the_same_p(runs):
    """FSDP's mixed precision computes the policy with every weight gathered in bf16: the cache must be computed
    so too (it was computed under autocast only, with fp32 norms and embeddings: a KL of ~6e-5 before any update,
    a gradient toward another model). Before any update the policy is the reference, so each mode's KL is bf16
    rounding noise: 0 to ~2e-7 on the CPUs of earlier sessions, 3.6e-6 on one with AMX bf16 matmuls (accelerate
    1.15 and 1.16 alike); the cache may give exactly the policy's P, the copy its rounding."""
    path = runs / "fsdp2_bf16_reference_kl"
    assert outcomes(path) == ["ok", "ok"]
    kls = {mode: log(path / mode)[0]["normal_kl"] for mode in ("copy", "cached")}
    assert all(abs(kl) < 1e-5 for kl in kls.values()), kls  # rounding may make a KL of P with itself negative


def test_bf16_lora_under_ddp_saves_its_adapter_and_every_process_reports_what_the_merge_lost(runs):
    peft = pytest.importorskip("peft")
    path = runs / "ddp_lora_bf16"
    assert outcomes(path) == ["ok", "ok"]
    error = json.loads((path / "run.json").read_text())["merge_rounding_error"]
    assert error > 0.5 and [json.loads((path / f"merge-rank{r}.json").read_text()) for r in range(2)] == [error] * 2
    adapted = peft.PeftModel.from_pretrained(tiny_llama(len(byte_bpe_tokenizer())), path / "adapter")
    assert adapted.base_model.model.model.layers[0].self_attn.q_proj.lora_B["default"].weight.abs().max() > 0


def test_non_finite_loss_on_one_process_stops_both(runs):
    path = runs / "nonfinite"
    first, second = outcomes(path)
    assert first == "FloatingPointError: step 2: the loss is not finite on process(es) [1] of 2"
    assert second.startswith(first + "; here LossTerms(total=tensor(nan") and "rows ['forget:row" in second
    assert [r["step"] for r in log(path)] == [1] and not (path / "model").exists()
