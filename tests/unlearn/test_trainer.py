"""The training loop: exact max steps, early stop, compute accounting, LoRA merged on save, cached reference,
bit-identical resume after a kill, atomic checkpoints, and refusals of bad runs."""
import contextlib
import copy
import gc
import dataclasses
import errno
import json
import os
import random
import re
import threading
import warnings
import weakref

import numpy as np
import pytest
import torch
from transformers import CompileConfig, LlamaConfig, LlamaForCausalLM

from fastalign.reference.unlearning_loss import spec_unlearning_terms
from fastalign.unlearn import checkpoint
from fastalign.unlearn import trainer as trainer_module
from fastalign.unlearn.batching import collate
from fastalign.unlearn.compute import batch_compute
from fastalign.unlearn.config import UnlearnConfig
from fastalign.unlearn.models import cast_weights, check_mergeable_adapter
from fastalign.unlearn.objective import UnlearningObjective
from fastalign.unlearn.reference import CachedReference
from fastalign.unlearn.streams import UnlearningStreams
from fastalign.unlearn.trainer import UnlearningTrainer
from tests.unlearn.test_layer_stand_ins import count_calls
from tests.unlearn.tiny import byte_bpe_tokenizer, tiny_llama, tiny_phi, tiny_streams

pytest.importorskip("accelerate")


class Killed(Exception):
    pass


def kill_after(step):
    """A step callback that kills the run (raises Killed) once step `step` has ended."""
    def callback(record):
        if record.step == step:
            raise Killed
    return callback


def run(tmp_path, name="run", model=None, callback=None, streams=None, **settings):
    tokenizer = byte_bpe_tokenizer()
    settings = {"max_steps": 5, "lr": 1e-3, "grad_accum": 2, "progress": False, **settings}
    config = UnlearnConfig(output_dir=str(tmp_path / name), **settings)
    trainer = UnlearningTrainer(model or tiny_llama(len(tokenizer)), streams or tiny_streams(tokenizer), config,
                                tokenizer=tokenizer, step_callback=callback)
    return trainer, trainer.train()


def fail_train_at_forward(monkeypatch, trainer, nth):
    """trainer.train() with the objective's `nth` forward raising a CUDA out-of-memory error, which it lets through;
    the objective's forward is its own again after."""
    real_forward, calls = UnlearningObjective.forward, [0]

    def failing(self, *args):
        calls[0] += 1
        if calls[0] == nth:
            raise torch.OutOfMemoryError("CUDA out of memory")
        return real_forward(self, *args)

    monkeypatch.setattr(UnlearningObjective, "forward", failing)
    with pytest.raises(torch.OutOfMemoryError):
        trainer.train()
    monkeypatch.undo()


def log_lines(path):
    with open(os.path.join(path, "log.jsonl")) as f:
        return [{k: v for k, v in json.loads(line).items() if k != "seconds"} for line in f]


@pytest.mark.parametrize("settings", [{}, {"lora": True, "lora_rank": 4, "lora_dropout": 0.5, "lr": 1e-2},
                                      {"reference": "cached"}, {"precision": "bf16", "lr": 2e-5}],
                         ids=["full", "lora-dropout", "cached", "bf16"])
def test_killed_and_resumed_run_is_bit_identical(tmp_path, settings):
    """With LoRA dropout the run draws random numbers: the resume must restore the generators' states. The
    cached reference is built again on resume; the compute of the run counts it once. In bf16 the weights train with
    KahanAdamW, whose compensations (most of the update at this learning rate) the checkpoint must keep."""
    if settings.get("lora"):
        pytest.importorskip("peft")
    whole, summary = run(tmp_path, "whole", save_every=2, **settings)

    with pytest.raises(Killed):
        run(tmp_path, "killed", save_every=2, callback=kill_after(3), **settings)
    assert sorted(os.listdir(tmp_path / "killed" / "checkpoints")) == ["latest", "step-000002"]
    with pytest.raises(FileExistsError, match="resume it with resume=True"):
        run(tmp_path, "killed", save_every=2, **settings)
    with pytest.raises(ValueError, match=r"setting\(s\) \['lr'\] differ"):
        run(tmp_path, "killed", save_every=2, resume=True, **{**settings, "lr": 2e-3})
    assert json.loads((tmp_path / "killed" / "config.json").read_text())["lr"] == settings.get("lr", 1e-3)
    resumed, resumed_summary = run(tmp_path, "killed", save_every=2, resume=True, **settings)

    assert summary.steps == resumed_summary.steps == 5
    for (name, a), (_, b) in zip(whole.model.named_parameters(), resumed.model.named_parameters()):
        assert torch.equal(a, b), name
    assert log_lines(tmp_path / "whole") == log_lines(tmp_path / "killed")
    assert [r["step"] for r in log_lines(tmp_path / "killed")] == [1, 2, 3, 4, 5]
    assert summary.compute["flops"] == resumed_summary.compute["flops"]
    for resume in (False, True):  # a finished run keeps its checkpoints: it was sent to --resume, which replayed it
        with pytest.raises(FileExistsError, match="already holds a finished model; choose another output_dir"):
            run(tmp_path, "killed", save_every=2, resume=resume, **settings)


def test_a_resume_leaves_the_callers_python_and_numpy_generators(tmp_path):
    """The trainer draws from neither `random` nor `np.random` (its streams have generators of their own), yet its
    checkpoints saved both and a resume set them back, so a caller's own shuffles after a resume repeated those made
    before the kill. A checkpoint written so (with both states) still resumes, and leaves them alone too."""
    with pytest.raises(Killed):
        run(tmp_path, save_every=1, grad_accum=1, max_steps=3, callback=kill_after(2))
    rank_file = tmp_path / "run" / "checkpoints" / "step-000001" / "rank-0.pt"
    rank_state = torch.load(rank_file, weights_only=False)
    assert set(rank_state) <= {"torch", "cuda"}
    random.seed(0)
    np.random.seed(0)
    torch.save({**rank_state, "python": random.getstate(), "numpy": np.random.get_state()}, rank_file)   # as before
    random.seed(123)
    np.random.seed(123)
    assert run(tmp_path, save_every=1, grad_accum=1, max_steps=3, resume=True)[1].steps == 3
    assert random.random() == random.Random(123).random()
    assert np.random.random() == np.random.RandomState(123).random_sample()


@pytest.mark.parametrize("reference", ["copy", "cached"])
@pytest.mark.parametrize("fail_at", [3, 4], ids=["first-micro-batch", "second-micro-batch"])
def test_a_run_an_exception_stopped_resumes_on_the_same_trainer_as_if_never_stopped(tmp_path, monkeypatch, reference,
                                                                                    fail_at):
    """An out-of-memory error in step 2's forward (2 micro-batches a step, a checkpoint after step 1), then train()
    again on the same trainer with resume=True, as a caller that frees memory and retries does. The second
    micro-batch's failure left the first one's gradients on the weights: the resume failed in loading the optimizer's
    state ("Expected device to be set": torch takes existing gradients for a state already made), and a run starting
    over would have added them to its first step. Either failure rebuilt the reference from the weights step 1 had
    trained, not from the policy the run started from: the resumed run ended elsewhere."""
    whole, _ = run(tmp_path, "whole", max_steps=3, save_every=1, reference=reference)
    tokenizer = byte_bpe_tokenizer()
    config = UnlearnConfig(output_dir=str(tmp_path / "stopped"), max_steps=3, save_every=1, reference=reference,
                           lr=1e-3, grad_accum=2, progress=False)
    trainer = UnlearningTrainer(tiny_llama(len(tokenizer)), tiny_streams(tokenizer), config)
    fail_train_at_forward(monkeypatch, trainer, fail_at)
    trainer.config = dataclasses.replace(config, resume=True)
    assert trainer.train().steps == 3
    for (name, a), (_, b) in zip(whole.model.named_parameters(), trainer.model.named_parameters()):
        assert torch.equal(a, b), name
    assert log_lines(tmp_path / "whole") == log_lines(tmp_path / "stopped")


def test_a_step_that_fails_in_a_later_micro_batch_frees_the_earlier_ones_gradients(tmp_path, monkeypatch):
    """An out-of-memory error in the second micro-batch's forward left the first one's gradients allocated (as much
    memory as the trainable weights) until the next train(), in the way of a caller that frees memory and retries.
    They are freed as the exception goes through train()."""
    tokenizer = byte_bpe_tokenizer()
    config = UnlearnConfig(output_dir=str(tmp_path / "run"), max_steps=3, lr=1e-3, grad_accum=2, progress=False)
    trainer = UnlearningTrainer(tiny_llama(len(tokenizer)), tiny_streams(tokenizer), config, tokenizer=tokenizer)
    fail_train_at_forward(monkeypatch, trainer, 2)
    assert all(p.grad is None for p in trainer.model.parameters())


@pytest.mark.parametrize("grad_accum", [1, 2], ids=["optimizer-in-backward", "accumulating"])
@pytest.mark.parametrize("fail_in_step", [1, 2])
def test_a_retry_without_a_checkpoint_starts_over_only_from_the_weights_as_given(tmp_path, monkeypatch, grad_accum,
                                                                                 fail_in_step):
    """An out-of-memory error in a step's first forward, no checkpoint written (save_every=0), then train() again on
    the same trainer. After step 1 had trained the weights, the retry started over at step 0 from them (the reference
    being the original policy) and silently ended elsewhere than a run that never failed: it must be refused, naming
    save_every, before it touches output_dir. A failure before any step changed a weight still starts over."""
    whole, _ = run(tmp_path, "whole", max_steps=3, grad_accum=grad_accum)
    tokenizer = byte_bpe_tokenizer()
    config = UnlearnConfig(output_dir=str(tmp_path / "stopped"), max_steps=3, lr=1e-3, grad_accum=grad_accum,
                           progress=False)
    trainer = UnlearningTrainer(tiny_llama(len(tokenizer)), tiny_streams(tokenizer), config, tokenizer=tokenizer)
    fail_train_at_forward(monkeypatch, trainer, (fail_in_step - 1) * grad_accum + 1)
    trainer.config = dataclasses.replace(config, resume=True)
    if fail_in_step == 1:
        assert trainer.train().steps == 3
        for (name, a), (_, b) in zip(whole.model.named_parameters(), trainer.model.named_parameters()):
            assert torch.equal(a, b), name
        return
    logged = log_lines(tmp_path / "stopped")
    with pytest.raises(RuntimeError, match="no checkpoint to resume from.*save_every"):
        trainer.train()
    assert log_lines(tmp_path / "stopped") == logged == log_lines(tmp_path / "whole")[:1]

BUSY = "UnlearningTrainer.train: another call is running on this UnlearningTrainer"
# LoRA dropout draws from the global generator, which train() sets when it starts: a refused call that got that far
# would change the running one
DRAWING = {"lora": True, "lora_rank": 4, "lora_dropout": 0.5, "lr": 1e-2, "max_steps": 3}


def test_a_train_called_while_another_runs_on_the_trainer_is_refused_and_changes_nothing(tmp_path):
    """A second thread calls train() on the trainer while the first thread's run stands in its step callback after
    step 1: it ran a run of its own on the same model, optimizer state and output_dir, both silently corrupted. It
    must be refused by name, and the first run end as it ends alone."""
    pytest.importorskip("peft")
    alone, _ = run(tmp_path, "alone", **DRAWING)
    inside, go, outcome = threading.Event(), threading.Event(), {}

    def hold(record):
        if threading.current_thread() is first and record.step == 1:
            inside.set()
            if not go.wait(timeout=60):   # a guard against a hung test, not a synchronisation
                raise TimeoutError("the test never let the first run go")

    tokenizer = byte_bpe_tokenizer()
    config = UnlearnConfig(output_dir=str(tmp_path / "shared"), grad_accum=2, progress=False, **DRAWING)
    trainer = UnlearningTrainer(tiny_llama(len(tokenizer)), tiny_streams(tokenizer), config, step_callback=hold)

    def body():
        try:
            outcome["summary"] = trainer.train()
        except Exception as err:   # the test reports it
            outcome["error"] = err

    first = threading.Thread(target=body, daemon=True)
    try:
        first.start()
        assert inside.wait(timeout=60)
        with pytest.raises(RuntimeError, match=BUSY):
            trainer.train()
    finally:
        go.set()
        first.join(timeout=120)
    assert "error" not in outcome, outcome.get("error")
    assert outcome["summary"].steps == 3
    for (name, a), (_, b) in zip(alone.model.named_parameters(), trainer.model.named_parameters()):
        assert torch.equal(a, b), name
    assert log_lines(tmp_path / "alone") == log_lines(tmp_path / "shared")


def test_a_train_called_from_its_own_step_callback_is_refused_and_changes_nothing(tmp_path):
    """train() again from inside the running one (its step callback) ran a whole run within a step of the other.
    It must be refused by name; the running run, which the callback lets go on, ends as it ends alone."""
    pytest.importorskip("peft")
    alone, _ = run(tmp_path, "alone", **DRAWING)
    refusals = []

    def again(record):
        with pytest.raises(RuntimeError, match=BUSY) as refused:
            trainer.train()
        refusals.append(str(refused.value))

    tokenizer = byte_bpe_tokenizer()
    config = UnlearnConfig(output_dir=str(tmp_path / "nested"), grad_accum=2, progress=False, **DRAWING)
    trainer = UnlearningTrainer(tiny_llama(len(tokenizer)), tiny_streams(tokenizer), config, step_callback=again)
    assert trainer.train().steps == 3 and len(refusals) == 3
    for (name, a), (_, b) in zip(alone.model.named_parameters(), trainer.model.named_parameters()):
        assert torch.equal(a, b), name
    assert log_lines(tmp_path / "alone") == log_lines(tmp_path / "nested")


@pytest.mark.parametrize("resume", [False, True])
def test_a_run_killed_before_its_first_checkpoint_starts_over_with_a_fresh_log(tmp_path, resume):
    """With no checkpoint to resume from the run starts over: the killed attempt's log lines must not stay in
    log.jsonl ahead of the new run's (two step-1 lines, their tokens and FLOPs counted twice by a reader)."""
    with pytest.raises(Killed):
        run(tmp_path, save_every=2, callback=kill_after(1))
    run(tmp_path, "whole", save_every=2)
    run(tmp_path, save_every=2, resume=resume)
    assert log_lines(tmp_path / "run") == log_lines(tmp_path / "whole")
    assert [r["step"] for r in log_lines(tmp_path / "run")] == [1, 2, 3, 4, 5]


def test_a_log_line_a_kill_cut_short_does_not_stop_the_resume(tmp_path):
    """A kill while a step's log line is written leaves a last line without its newline, not JSON: the resume
    drops it with the other lines past its checkpoint (it failed on it with a JSONDecodeError)."""
    def killed_writing_step_4s_line(record):
        if record.step == 3:
            with open(tmp_path / "run" / "log.jsonl", "a", encoding="utf-8") as f:
                f.write('{"step": 4, "lo')
            raise Killed

    with pytest.raises(Killed):
        run(tmp_path, save_every=2, callback=killed_writing_step_4s_line)
    run(tmp_path, "whole", save_every=2)
    run(tmp_path, save_every=2, resume=True)
    assert log_lines(tmp_path / "run") == log_lines(tmp_path / "whole")


def test_a_kill_while_a_resume_rewrites_the_log_loses_none_of_its_lines(tmp_path, monkeypatch):
    """A resume rewrites log.jsonl without the killed run's lines past its checkpoint: killed during that rewrite,
    the log must keep its earlier lines (as the next resume and the finished run's log then need)."""
    with pytest.raises(Killed):
        run(tmp_path, save_every=2, callback=kill_after(3))

    dumps = json.dumps

    def killed_writing_a_log_line(obj, **options):
        if isinstance(obj, dict) and "step" in obj:   # a log line, not config.json
            raise Killed
        return dumps(obj, **options)

    monkeypatch.setattr(json, "dumps", killed_writing_a_log_line)
    with pytest.raises(Killed):
        run(tmp_path, save_every=2, resume=True)
    monkeypatch.undo()
    assert [r["step"] for r in log_lines(tmp_path / "run")] == [1, 2, 3]
    run(tmp_path, save_every=2, resume=True)
    assert [r["step"] for r in log_lines(tmp_path / "run")] == [1, 2, 3, 4, 5]


def test_resume_with_more_max_steps_follows_the_new_schedule_from_the_first_resumed_step(tmp_path):
    """max_steps may change on resume: the linear schedule of the new max_steps applies at once (the optimizer
    held the old schedule's lr for the step it stopped at)."""
    with pytest.raises(Killed):
        run(tmp_path, max_steps=4, save_every=2, callback=kill_after(3))
    run(tmp_path, max_steps=8, save_every=2, resume=True)
    lrs = [r["lr"] for r in log_lines(tmp_path / "run")]
    assert len(lrs) == 8
    assert lrs[:2] == pytest.approx([1e-3, 1e-3 * (1 - 1 / 4)], rel=1e-12)
    assert lrs[2:] == pytest.approx([1e-3 * (1 - s / 8) for s in range(2, 8)], rel=1e-12)


def test_a_resume_may_change_how_the_run_logs_and_checkpoints(tmp_path):
    """log_every, save_every, keep_checkpoints and progress change no result: a resume may change each of them."""
    with pytest.raises(Killed):
        run(tmp_path, save_every=2, callback=kill_after(3))
    _, summary = run(tmp_path, save_every=1, keep_checkpoints=1, log_every=2, progress=True, resume=True)
    assert summary.steps == 5
    assert [r["step"] for r in log_lines(tmp_path / "run")] == [1, 2, 4, 5]


@pytest.mark.parametrize("change", [{"grad_accum": 1}, {"batch_size": 1}, {"seed": 1}, {"mismatch_per_prompt": 2},
                                    {"forget_weight": 0.3}, {"mismatch_weight": 0.5}, {"normal_weight": 0.5},
                                    {"packing": "off"}, {"precision": "bf16"}, {"lr": 1e-2}, {"weight_decay": 0.5},
                                    {"max_forget_nll": 50.0}],
                         ids=lambda change: next(iter(change)))
def test_a_resume_that_changes_a_result_is_refused(tmp_path, change):
    """Each of these settings changes what the rest of the run trains on or how (another batch drawn, another
    objective): a resume that changes one is refused, naming it, and the same settings still resume."""
    with pytest.raises(Killed):
        run(tmp_path, save_every=2, callback=kill_after(3))
    with pytest.raises(ValueError, match=rf"setting\(s\) \['{next(iter(change))}'\] differ"):
        run(tmp_path, save_every=2, resume=True, **change)
    _, summary = run(tmp_path, save_every=2, resume=True)
    assert summary.steps == 5


def test_resume_with_another_number_of_processes_is_refused(tmp_path):
    """Fewer processes than wrote a checkpoint still find their rank files: the count itself must be checked."""
    with pytest.raises(Killed):
        run(tmp_path, save_every=1, callback=kill_after(2))
    state_file = tmp_path / "run" / "checkpoints" / "step-000001" / "state.pt"
    state = torch.load(state_file, weights_only=False)
    assert state["num_processes"] == 1
    torch.save({**state, "num_processes": 2}, state_file)  # as if two processes had written it
    with pytest.raises(ValueError, match=r"written by 2 process\(es\), this run has 1"):
        run(tmp_path, save_every=1, resume=True)


@pytest.mark.parametrize("stream", ["forget", "normal", "pool"])
def test_resume_over_other_data_under_the_same_settings_is_refused(tmp_path, stream):
    """A data file edited in place, or a relative path read from another directory, gives other examples under the
    same settings: the resume must refuse them rather than train the rest of the run on them."""
    with pytest.raises(Killed):
        run(tmp_path, save_every=2, callback=kill_after(3))
    streams = tiny_streams(byte_bpe_tokenizer())
    if stream == "pool":
        streams.pool = streams.pool[::-1]
    else:
        examples = getattr(streams, stream)
        examples[0] = dataclasses.replace(examples[0], input_ids=examples[0].input_ids[:-1] + (5,))
    with pytest.raises(ValueError, match="data differ from the interrupted run's"):
        run(tmp_path, save_every=2, resume=True, streams=streams)
    _, summary = run(tmp_path, save_every=2, resume=True)   # the same data still resumes
    assert summary.steps == 5


@pytest.mark.parametrize("draws", [{"seed": 7}, {"batch_size": 3}, {"mismatch_per_prompt": 1}])
def test_resume_with_streams_that_draw_other_batches_is_refused(tmp_path, draws):
    """From Python, the trainer draws as its UnlearningStreams were built: streams of another seed, batch size or K
    over the same data resumed, training the rest of the run on other batches than the interrupted run's."""
    with pytest.raises(Killed):
        run(tmp_path, save_every=2, callback=kill_after(3))
    with pytest.raises(ValueError, match=rf"the streams draw other batches .*\['{next(iter(draws))}'[],]"):
        run(tmp_path, save_every=2, resume=True, streams=tiny_streams(byte_bpe_tokenizer(), **draws))
    _, summary = run(tmp_path, save_every=2, resume=True)   # streams built as before still resume
    assert summary.steps == 5


def test_resume_on_another_model_put_at_the_model_path_is_refused(tmp_path):
    """A LoRA run resumed after a fine-tune was copied over its base model (same architecture, same sizes) trained its
    adapter on the wrong base; the same files copied in again resume."""
    pytest.importorskip("peft")
    tokenizer, model_dir = byte_bpe_tokenizer(), tmp_path / "base"

    def lora_run(seed, callback=None, **settings):
        """A LoRA run of the model of `seed`, saved at model_dir first (as a user puts a model there)."""
        tiny_llama(len(tokenizer), seed=seed).save_pretrained(model_dir)
        config = UnlearnConfig(model=str(model_dir), output_dir=str(tmp_path / "run"), lora=True, lora_rank=4,
                               max_steps=5, save_every=2, lr=1e-3, progress=False, **settings)
        return UnlearningTrainer(tiny_llama(len(tokenizer), seed=seed), tiny_streams(tokenizer), config,
                                 tokenizer=tokenizer, step_callback=callback).train()

    with pytest.raises(Killed):
        lora_run(0, callback=kill_after(3))
    with pytest.raises(ValueError, match=f"the model at {model_dir} is not the one the interrupted run started from"):
        lora_run(1, resume=True)
    assert lora_run(0, resume=True).steps == 5


def test_a_relative_path_resumes_from_another_directory_as_the_file_it_named(tmp_path, monkeypatch):
    """A run started in data/ with forget ["pku.jsonl"] and resumed from elsewhere with the file's absolute path was
    refused ("forget ['pku.jsonl'] then, ['/.../data/pku.jsonl'] now"): the recorded path was resolved against the
    resuming process's directory. It is resolved against the interrupted run's, where it was read: that file resumes,
    by its absolute path or relative to this directory, and another file is still refused."""
    (tmp_path / "data").mkdir()
    monkeypatch.chdir(tmp_path / "data")
    with pytest.raises(Killed):
        run(tmp_path, save_every=2, callback=kill_after(3), forget=["pku.jsonl"])
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=re.escape("forget ['pku.jsonl'] then, ['pku.jsonl', 'data/pku.jsonl'] now")):
        run(tmp_path, save_every=2, resume=True, forget=["pku.jsonl", "data/pku.jsonl"])
    for spelled in (str(tmp_path / "data" / "pku.jsonl"), "data/pku.jsonl"):
        with pytest.raises(Killed):   # (stopped before its next checkpoint: the next resume is from the first run's)
            run(tmp_path, save_every=2, resume=True, forget=[spelled], callback=kill_after(3))
    _, summary = run(tmp_path, save_every=2, resume=True, forget=["./data/pku.jsonl"])
    assert summary.steps == 5


def test_a_checkpoint_that_predates_the_working_directory_record_resolves_paths_here(tmp_path, monkeypatch):
    """Checkpoints from before 2026-12-07 record no working directory: their relative paths are resolved against the
    resuming process's, as they were."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(Killed):
        run(tmp_path, save_every=2, callback=kill_after(3), forget=["pku.jsonl"])
    state_file = tmp_path / "run" / "checkpoints" / "step-000002" / "state.pt"
    state = torch.load(state_file, weights_only=True)
    assert state.pop("cwd") == str(tmp_path)
    torch.save(state, state_file)
    _, summary = run(tmp_path, save_every=2, resume=True, forget=[str(tmp_path / "pku.jsonl")])
    assert summary.steps == 5


def test_a_checkpoint_written_before_data_digests_were_recorded_resumes(tmp_path):
    """Checkpoints from before 2026-12-01 record no digest of the data: they resume, as they did, not refused."""
    with pytest.raises(Killed):
        run(tmp_path, save_every=2, callback=kill_after(3))
    state_file = tmp_path / "run" / "checkpoints" / "step-000002" / "state.pt"
    state = torch.load(state_file, weights_only=False)
    del state["data"]
    torch.save(state, state_file)
    _, summary = run(tmp_path, save_every=2, resume=True)
    assert summary.steps == 5

def test_a_checkpoint_that_predates_a_setting_is_refused_naming_it_not_as_none_then(tmp_path):
    """A config recorded before fused_layers and packing existed (2026-12-05, 12-04) was refused as "fused_layers None
    then, True now", whatever the flags: the refusal names the settings it predates and the way on; one added since
    that changes no result (optimizer_in_backward) is not named."""
    with pytest.raises(Killed):
        run(tmp_path, save_every=2, callback=kill_after(3))
    state_file = tmp_path / "run" / "checkpoints" / "step-000002" / "state.pt"
    state = torch.load(state_file, weights_only=True)
    for setting in ("fused_layers", "packing", "optimizer_in_backward"):
        del state["config"][setting]
    torch.save(state, state_file)
    for flags in ({}, {"fused_layers": False, "packing": "off"}):
        with pytest.raises(ValueError, match=r"predates setting\(s\) \['fused_layers', 'packing'\], which the "
                                             "fastalign that wrote it did not have: resume it with that version"):
            run(tmp_path, save_every=2, resume=True, **flags)


def test_a_checkpoint_that_predates_a_setting_is_refused_for_it_before_its_number_of_processes(tmp_path):
    """A checkpoint from before fused_layers (2026-12-05) written by 2 processes was refused as "written by 2
    process(es): resume with the number of processes it was written with", which the run then refused again for
    predating fused_layers: the settings it predates are checked first (and every checkpoint that records them all
    records its number of processes, model files and last step, read without fallbacks)."""
    with pytest.raises(Killed):
        run(tmp_path, save_every=2, callback=kill_after(3))
    state_file = tmp_path / "run" / "checkpoints" / "step-000002" / "state.pt"
    state = torch.load(state_file, weights_only=True)
    del state["config"]["fused_layers"]
    torch.save({**state, "num_processes": 2}, state_file)
    with pytest.raises(ValueError, match=r"predates setting\(s\) \['fused_layers'\]"):
        run(tmp_path, save_every=2, resume=True)


def test_a_state_of_another_tool_in_a_checkpoint_is_refused_naming_the_file(tmp_path):
    """A dict that another tool saved as state.pt ended the resume in KeyError: 'config'."""
    with pytest.raises(Killed):
        run(tmp_path, save_every=2, callback=kill_after(3))
    state_file = tmp_path / "run" / "checkpoints" / "step-000002" / "state.pt"
    torch.save({"step": 2, "model": {}}, state_file)
    with pytest.raises(ValueError, match=rf"cannot resume from {state_file}: it holds a dict without \['config', "
                                         r"'compute', 'trainable', 'optimizer', 'scheduler'\], not a fastalign "):
        run(tmp_path, save_every=2, resume=True)


def test_a_moved_run_resumes(tmp_path):
    """The output directory is where the checkpoint is found: a run moved (or named by another path) resumes."""
    whole, _ = run(tmp_path, "whole", max_steps=4, save_every=2, grad_accum=1)
    # the last step writes model/, not a checkpoint as well
    assert sorted(os.listdir(tmp_path / "whole" / "checkpoints")) == ["latest", "step-000002"]

    with pytest.raises(Killed):
        run(tmp_path, "killed", max_steps=4, save_every=2, grad_accum=1, callback=kill_after(3))
    os.rename(tmp_path / "killed", tmp_path / "moved")
    resumed, summary = run(tmp_path, "moved", max_steps=4, save_every=2, grad_accum=1, resume=True)
    assert summary.steps == 4
    for (name, a), (_, b) in zip(whole.model.named_parameters(), resumed.model.named_parameters()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("name, text", [("config.json", '{"architectures": ["LlamaForCausalLM"]}'),
                                        ("config.json", "architectures: [Llama]\n"),
                                        ("log.jsonl", '{"epoch": 1, "loss": 2.0}\n'), ("log.jsonl", "epoch 1\n"),
                                        ("log.jsonl", '{"step": 1}\n{"step": "1/10", "loss": 2.0}\n')])
def test_an_output_dir_holding_files_of_something_else_is_refused_and_left_as_it_is(tmp_path, name, text):
    """The run writes config.json and rewrites log.jsonl in output_dir: over a model's own directory (output_dir
    given as the model's) or another tool's log they must be refused, not replaced (nor a KeyError traceback)."""
    out = tmp_path / "run"
    out.mkdir()
    (out / name).write_text(text)
    with pytest.raises(FileExistsError, match=f"{name} that is not a fastalign unlearn run's"):
        run(tmp_path, max_steps=1, grad_accum=1)
    assert (out / name).read_text() == text and sorted(os.listdir(out)) == [name]


def test_a_run_removes_the_temporaries_an_interrupted_write_left(tmp_path):
    """A process killed inside a write leaves a hidden temporary next to its target, which no later write of that
    target replaces when the run never gets there again (a checkpoint step past the one it resumes from, an
    adapter/ of a LoRA run resumed without it): the next run deletes them, as they may hold a whole model."""
    out = tmp_path / "run"
    (out / "checkpoints" / ".tmp-step-000004").mkdir(parents=True)
    (out / ".tmp-adapter").mkdir()
    run(tmp_path, max_steps=1, grad_accum=1)
    assert sorted(os.listdir(out / "checkpoints")) == [] and ".tmp-adapter" not in os.listdir(out)


def test_resume_with_max_steps_below_the_checkpoint_step_is_refused(tmp_path):
    """Resuming a step-4 checkpoint with max_steps=2 would save a 4-step model as a max_steps=2 run."""
    with pytest.raises(Killed):
        run(tmp_path, max_steps=6, save_every=2, grad_accum=1, callback=kill_after(5))
    with pytest.raises(ValueError, match=r"at step 4, past max_steps=2"):
        run(tmp_path, max_steps=2, save_every=2, grad_accum=1, resume=True)
    assert not (tmp_path / "run" / "model").exists()
    _, summary = run(tmp_path, max_steps=4, save_every=2, grad_accum=1, resume=True)  # exactly there: done
    assert summary.steps == 4
    last = json.loads((tmp_path / "run" / "run.json").read_text())["last"]  # step 4's, though no step ran here
    assert summary.last.step == 4
    assert {k: v for k, v in last.items() if k != "seconds"} == log_lines(tmp_path / "run")[-1]


def test_a_lora_runs_adapter_names_no_local_path_of_its_base_model(tmp_path, monkeypatch):
    """adapter/adapter_config.json named the base model by the path the model was loaded from (--model as typed), a
    path of the training machine (saving.save_adapter)."""
    monkeypatch.chdir(tmp_path)
    tiny_llama(len(byte_bpe_tokenizer())).save_pretrained(tmp_path / "base")
    run(tmp_path, model=LlamaForCausalLM.from_pretrained("base"), max_steps=1, grad_accum=1, lora=True, lora_rank=4)
    assert json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())[
        "base_model_name_or_path"] is None


def test_max_steps_schedule_compute_and_outputs(tmp_path):
    tokenizer = byte_bpe_tokenizer()
    trainer, summary = run(tmp_path, max_steps=3, grad_accum=1)
    lines = log_lines(tmp_path / "run")
    assert [r["step"] for r in lines] == [1, 2, 3] and summary.stop_reason == "max_steps"
    assert [r["lr"] for r in lines] == pytest.approx([1e-3, 1e-3 * 2 / 3, 1e-3 / 3])
    streams = tiny_streams(tokenizer)
    assert summary.compute["tokens"] == sum(streams.batch(i).tokens.num_tokens for i in range(3))
    assert summary.compute["flops"] > 0 and summary.compute["device_seconds"] > 0
    saved = json.loads((tmp_path / "run" / "run.json").read_text())
    assert saved["steps"] == 3 and saved["last"]["step"] == 3
    assert saved["adapter_dir"] is None and saved["merge_rounding_error"] is None  # no LoRA, no merge
    assert not (tmp_path / "run" / "adapter").exists()
    reloaded = type(trainer.model).from_pretrained(tmp_path / "run" / "model")
    for (name, a), (_, b) in zip(trainer.model.named_parameters(), reloaded.named_parameters()):
        assert torch.equal(a, b), name
    with pytest.raises(FileExistsError, match="already holds a finished model"):
        run(tmp_path, max_steps=3)


def test_a_run_without_normal_rows_trains_on_the_forget_and_mismatch_terms(tmp_path, monkeypatch):
    """normal_weight=0 gives streams without normal rows: no reference is built (a frozen copy of the model for a term
    that is off), each step's normal token count is 0, which must not reach the objective as the KL term's
    denominator (it refuses one <= 0), and the KL term is not computed (None)."""
    def no_reference(*args, **kwargs):
        raise AssertionError("a reference was built for a run without normal rows")

    monkeypatch.setattr("fastalign.unlearn.trainer.FrozenCopyReference", no_reference)
    tokenizer = byte_bpe_tokenizer()
    full = tiny_streams(tokenizer)
    streams = UnlearningStreams(full.forget, mismatch_pool=full.pool, batch_size=2, mismatch_per_prompt=2,
                                max_length=64, filler_id=full.filler_id)
    config = UnlearnConfig(output_dir=str(tmp_path / "run"), max_steps=2, lr=1e-3, grad_accum=2, progress=False)
    summary = UnlearningTrainer(tiny_llama(len(tokenizer)), streams, config).train()
    assert summary.steps == 2 and summary.last.normal_kl is None


@pytest.mark.parametrize("off", [None, "mismatch", "normal"])
def test_a_term_turned_off_is_logged_as_null_and_the_terms_computed_as_numbers(tmp_path, capsys, off):
    """log.jsonl wrote 0.0 for a term the run does not compute (mismatch_weight=0 or normal_weight=0: the streams hold
    no rows of its kind), which a plot of the log reads as computed and zero. It is null there and in run.json's last
    step, and the progress bar leaves it out; a run with every term on still logs every term as a number."""
    tokenizer = byte_bpe_tokenizer()
    full = tiny_streams(tokenizer)
    streams = UnlearningStreams(full.forget, normal=None if off == "normal" else full.normal,
                                mismatch_pool=None if off == "mismatch" else full.pool, batch_size=2,
                                mismatch_per_prompt=2, max_length=64, filler_id=full.filler_id)
    weights = {} if off is None else {f"{off}_weight": 0.0}
    _, summary = run(tmp_path, streams=streams, max_steps=2, progress=True, **weights)
    term = {None: None, "mismatch": "mismatch_nll", "normal": "normal_kl"}[off]
    shown = capsys.readouterr().err.rpartition("unlearn:")[2].splitlines()[0]   # the progress bar as it ended
    assert [f" {name}=" in shown for name in ("fgt_nll", "rdn", "kl")] == [True, off != "mismatch", off != "normal"]
    computed = [name for name in ("loss", "forget_nll", "mismatch_nll", "normal_kl") if name != term]
    lines = log_lines(tmp_path / "run")
    assert [line["step"] for line in lines] == [1, 2]
    assert all(isinstance(line[name], float) for line in lines for name in computed)
    if term:
        assert [line[term] for line in lines] == [None, None] and getattr(summary.last, term) is None
        assert json.loads((tmp_path / "run" / "run.json").read_text())["last"][term] is None


def test_a_generation_config_that_sets_sampling_flags_without_do_sample_is_saved_as_loaded(tmp_path):
    """Published generation configs often set temperature or top_p without do_sample=True (Vicuna's); transformers
    5.17 refused to save one, so the run failed at its end with no model saved."""
    tiny_llama(len(byte_bpe_tokenizer())).save_pretrained(tmp_path / "published")
    flags = {"temperature": 0.6, "top_p": 0.9}
    (tmp_path / "published" / "generation_config.json").write_text(json.dumps(flags))
    trainer, _ = run(tmp_path, model=LlamaForCausalLM.from_pretrained(tmp_path / "published"), max_steps=1,
                     grad_accum=1)
    saved = json.loads((tmp_path / "run" / "model" / "generation_config.json").read_text())
    assert {name: saved.get(name) for name in flags} == flags
    assert trainer.model.generation_config.temperature == 0.6  # the model in memory keeps its own too


def test_a_generation_config_set_in_memory_is_saved_as_it_is(tmp_path):
    """transformers (5.24 too) refuses to save a generation config changed since it was loaded that fails its strict
    checks, here a temperature without do_sample=True set on the model passed in: the run failed at its end."""
    model = tiny_llama(len(byte_bpe_tokenizer()))
    model.generation_config.temperature = 0.6
    model.generation_config.compile_config = CompileConfig(fullgraph=False)  # which transformers never saves
    run(tmp_path, model=model, max_steps=1, grad_accum=1)
    saved = json.loads((tmp_path / "run" / "model" / "generation_config.json").read_text())
    assert saved["temperature"] == 0.6 and "compile_config" not in saved


@pytest.mark.parametrize("micro", [0, 1])
def test_a_non_finite_loss_in_any_micro_batch_stops_the_step_before_it_trains(tmp_path, monkeypatch, micro):
    """Step 2's loss is NaN in one of its 2 micro-batches: the run stops with an error naming that micro-batch's
    terms and rows, before the optimizer step, so the weights are those step 1 left (checkpointed)."""
    real_forward, steps, rows = UnlearningObjective.forward, [], []   # rows: of step 2's micro-batches

    def forward(self, batch, *args):
        terms = real_forward(self, batch, *args)
        if steps != [1]:
            return terms
        rows.append([e.source for e in batch.examples])
        return terms._replace(total=terms.total * float("nan")) if len(rows) == micro + 1 else terms

    monkeypatch.setattr(UnlearningObjective, "forward", forward)
    with pytest.raises(FloatingPointError) as error:
        run(tmp_path, max_steps=3, callback=lambda record: steps.append(record.step))
    message = str(error.value)
    assert message.startswith("step 2: the loss is not finite on process(es) [0] of 1; here LossTerms(total=tensor(nan")
    assert len(rows) == 2 and rows[0] != rows[1] and message.endswith(f", rows {rows[micro]}")
    assert steps == [1] and not (tmp_path / "run" / "model").exists()


@pytest.mark.parametrize("grad_accum", [1, 2], ids=["optimizer-in-backward", "accumulating"])
@pytest.mark.parametrize("nan_in_step", [1, 2])
def test_a_nan_gradient_with_a_finite_loss_is_named_by_its_step(tmp_path, grad_accum, nan_in_step):
    """One weight's gradient NaN while the loss is finite: at the last step the NaN weights were written to model/
    under a run.json saying stop_reason 'max_steps'; at an earlier one the next step's loss failed, naming that
    step's rows, which did nothing wrong. Either must name the step whose update made the weights NaN, and write
    no model."""
    model, calls = tiny_llama(len(byte_bpe_tokenizer())), [0]

    def nan_gradient(grad):
        calls[0] += 1
        return grad * float("nan") if calls[0] == (nan_in_step - 1) * grad_accum + 1 else grad

    model.model.layers[0].mlp.up_proj.weight.register_hook(nan_gradient)
    with pytest.raises(FloatingPointError, match=rf"^after step {nan_in_step} trainable weights are not finite .*"
                       r"\['model.layers.0.mlp.up_proj.weight'\]: the gradient of step"):
        run(tmp_path, model=model, max_steps=2, grad_accum=grad_accum)
    assert sorted(os.listdir(tmp_path / "run")) == ["config.json", "log.jsonl"]


@pytest.mark.parametrize("settings", [{}, {"lora": True, "lora_rank": 4}, {"gradient_checkpointing": True}],
                         ids=["full", "lora", "checkpointing"])
def test_the_optimizer_in_backward_trains_the_same_run(tmp_path, settings):
    """optimizer_in_backward (the default in one process without accumulation): each weight steps as its gradient
    completes, and the run is the one stepped after the backward: the same log and bit for bit the same weights."""
    if settings.get("lora"):
        pytest.importorskip("peft")
    after, after_summary = run(tmp_path, "after", max_steps=3, grad_accum=1, optimizer_in_backward=False, **settings)
    with warnings.catch_warnings():   # torch's "lr_scheduler.step() before optimizer.step()" would be a false alarm
        warnings.filterwarnings("error", message=r".*lr_scheduler\.step\(\)")
        inside, summary = run(tmp_path, "inside", max_steps=3, grad_accum=1, **settings)
    assert (summary.optimizer_in_backward, after_summary.optimizer_in_backward) == (True, False)
    assert json.loads((tmp_path / "inside" / "run.json").read_text())["optimizer_in_backward"] is True
    assert log_lines(tmp_path / "inside") == log_lines(tmp_path / "after")
    state = inside.model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in after.model.state_dict().items())
    assert not any(p._post_accumulate_grad_hooks for p in inside.model.parameters())  # taken off at the end


@pytest.mark.parametrize("settings", [{}, {"lora": True, "lora_rank": 4}, {"optimizer_in_backward": True,
                                                                           "grad_accum": 1}],
                         ids=["full", "lora", "optimizer-in-backward"])
def test_gradients_taken_in_the_forward_train_the_same_run(tmp_path, settings):
    """grads_in_forward: the fused losses' gradients taken in the forward pass, scaled by the backward (under gradient
    accumulation, with a trained lm_head, a LoRA adapter, AdamW inside the backward): the same run, the same log and
    the same weights up to the rounding of the other order of the sums (fp32). The FLOPs counted are fewer by the
    head's products the backward no longer computes again (compute.py)."""
    if settings.get("lora"):
        pytest.importorskip("peft")
    after, _ = run(tmp_path, "backward", max_steps=3, **settings)
    inside, summary = run(tmp_path, "forward", max_steps=3, grads_in_forward=True, **settings)
    assert_same_run_to_rounding(tmp_path / "forward", inside, tmp_path / "backward", after, but=("flops",))
    flags = dict(decoder_trains=not settings.get("lora"), lm_head_trains=not settings.get("lora"),
                 checkpointing=False, reference_forward=True, grads_in_forward=True)
    streams = tiny_streams(byte_bpe_tokenizer())
    grad_accum = settings.get("grad_accum", 2)   # run()'s default
    steps = [compute_as_run(inside, streams.batch(i), **flags) for i in range(3 * grad_accum)]
    assert summary.compute["flops"] == pytest.approx(sum(s.flops for s in steps) + inside.setup_compute.flops)


def assert_same_run_to_rounding(path, trainer, expected_path, expected_trainer, but=()):
    """The run logged in `path` by `trainer` is the expected one up to fp32 rounding: log (but the keys `but`) and
    weights."""
    for got, want in zip(log_lines(path), log_lines(expected_path), strict=True):
        assert got.keys() == want.keys()
        for key, value in want.items():
            if key in but:
                continue
            assert got[key] == (pytest.approx(value, rel=1e-5, abs=1e-7) if isinstance(value, float) else value), key
    state = trainer.model.state_dict()
    for name, weight in expected_trainer.model.state_dict().items():
        torch.testing.assert_close(state[name], weight, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("settings", [{}, {"gradient_checkpointing": True}], ids=["plain", "checkpointing"])
def test_the_trainer_trains_the_same_run_with_it(tmp_path, monkeypatch, settings):
    """fused_layers (on by default) against off: the same log and weights up to the rounding of the norms' sums in
    another order (fp32, torch backend); the ops ran in each micro-batch's forward (and again in the backward's
    recomputation of checkpointed layers), and the model's forwards are the class's after the run."""
    mlps, norms = (count_calls(monkeypatch, name) for name in ("gated_linear", "rms_norm"))
    off, _ = run(tmp_path, "off", max_steps=2, fused_layers=False, **settings)
    assert mlps == norms == []
    on, _ = run(tmp_path, "on", max_steps=2, **settings)
    forwards = 2 * 2   # steps x micro-batches
    layer_runs = forwards * (2 if settings else 1)   # a checkpointed layer's forward runs again in the backward
    assert (len(mlps), len(norms)) == (layer_runs * 2, layer_runs * 2 * 2 + forwards)   # 2 layers, 2 norms each
    assert_same_run_to_rounding(tmp_path / "on", on, tmp_path / "off", off)
    assert not any("forward" in vars(m) for m in on.model.modules())


def test_the_optimizer_steps_after_the_backward_where_gradients_are_read_together(tmp_path, monkeypatch):
    """optimizer_in_backward unset: off under gradient accumulation, and under several processes (their gradients are
    reduced after the backward), where the model's gradients must all exist before the step."""
    _, summary = run(tmp_path, "accumulated", max_steps=1, grad_accum=2)
    assert summary.optimizer_in_backward is False
    import accelerate
    monkeypatch.setattr(accelerate.Accelerator, "num_processes", property(lambda self: 2))
    monkeypatch.setenv("WORLD_SIZE", "2")
    tokenizer = byte_bpe_tokenizer()
    config = UnlearnConfig(output_dir=str(tmp_path / "two"), grad_accum=1, progress=False)
    trainer = UnlearningTrainer(tiny_llama(len(tokenizer)), tiny_streams(tokenizer), config, tokenizer=tokenizer)
    assert trainer.optimizer_in_backward is False


def test_a_run_resumes_with_the_optimizer_stepping_after_the_backward_instead(tmp_path):
    """optimizer_in_backward may change on resume (the same updates either way): a run killed with it on, resumed with
    it off, ends bit for bit where the run without a stop ends."""
    whole, _ = run(tmp_path, "whole", max_steps=4, grad_accum=1, save_every=2)
    with pytest.raises(Killed):
        run(tmp_path, "killed", max_steps=4, grad_accum=1, save_every=2, callback=kill_after(3))
    resumed, summary = run(tmp_path, "killed", max_steps=4, grad_accum=1, save_every=2, resume=True,
                           optimizer_in_backward=False)
    assert summary.optimizer_in_backward is False and log_lines(tmp_path / "killed") == log_lines(tmp_path / "whole")
    assert all(torch.equal(a, b) for a, b in zip(whole.model.parameters(), resumed.model.parameters()))


def test_the_optimizer_in_backward_steps_nothing_on_a_non_finite_loss(tmp_path, monkeypatch):
    """The loss is read, and found not finite, before the backward that would step the weights with it."""
    real_forward, steps = UnlearningObjective.forward, []

    def forward(self, batch, *args):
        terms = real_forward(self, batch, *args)
        return terms._replace(total=terms.total * float("nan")) if steps == [1] else terms
    monkeypatch.setattr(UnlearningObjective, "forward", forward)
    model, after_step_1 = tiny_llama(len(byte_bpe_tokenizer())), {}

    def callback(record):
        steps.append(record.step)
        after_step_1.update({k: v.clone() for k, v in model.state_dict().items()})
    with pytest.raises(FloatingPointError, match="step 2: the loss is not finite"):
        run(tmp_path, model=model, max_steps=3, grad_accum=1, optimizer_in_backward=True, callback=callback)
    assert steps == [1] and after_step_1
    assert all(torch.equal(v, after_step_1[k]) for k, v in model.state_dict().items())


def test_the_optimizer_in_backward_needs_one_process_and_no_accumulation(tmp_path, monkeypatch):
    import accelerate
    with pytest.raises(ValueError, match=r"optimizer_in_backward \(--optimizer-in-backward\) steps each weight as "
                                         r"the backward completes its gradient: it needs grad_accum=1, got 2"):
        UnlearnConfig(output_dir=str(tmp_path), optimizer_in_backward=True, grad_accum=2)
    monkeypatch.setattr(accelerate.Accelerator, "num_processes", property(lambda self: 2))
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match=r"optimizer_in_backward \(--optimizer-in-backward\) needs one process "
                                         r"without FSDP: under 2 the gradients are reduced"):
        run(tmp_path, max_steps=1, grad_accum=1, optimizer_in_backward=True)


def test_early_stop_once_forget_nll_passes_threshold(tmp_path):
    _, summary = run(tmp_path, max_steps=50, max_forget_nll=6.5, forget_weight=20.0, lr=1e-2, grad_accum=1)
    lines = log_lines(tmp_path / "run")
    assert 2 <= summary.steps == len(lines) < 50
    assert lines[-1]["forget_nll"] > 6.5 and all(r["forget_nll"] <= 6.5 for r in lines[:-1])
    assert summary.stop_reason.startswith("forget NLL")


def test_early_stop_step_is_logged_whatever_log_every(tmp_path):
    _, summary = run(tmp_path, max_steps=50, max_forget_nll=6.5, forget_weight=20.0, lr=1e-2, grad_accum=1,
                     log_every=100)
    assert summary.stop_reason.startswith("forget NLL")
    assert [r["step"] for r in log_lines(tmp_path / "run")] == [summary.steps]


def test_early_stop_needs_the_forget_nll_to_exceed_the_threshold(tmp_path):
    _, first = run(tmp_path, "probe", max_steps=1, grad_accum=1, max_forget_nll=None)
    _, summary = run(tmp_path, max_steps=2, grad_accum=1, max_forget_nll=first.last.forget_nll)  # equal: go on
    assert summary.steps == 2, summary.stop_reason


def test_lora_is_merged_on_save(tmp_path):
    pytest.importorskip("peft")
    trainer, _ = run(tmp_path, max_steps=2, lora=True, lora_rank=4, lora_targets=["q_proj", "v_proj"], lr=1e-2)
    merged = LlamaForCausalLM.from_pretrained(tmp_path / "run" / "model")
    assert type(trainer.model) is LlamaForCausalLM  # merged in place
    assert not any("lora" in name for name, _ in merged.named_parameters())
    original = tiny_llama(len(byte_bpe_tokenizer()))
    q_changed = not torch.equal(merged.model.layers[0].self_attn.q_proj.weight,
                                original.model.layers[0].self_attn.q_proj.weight)
    k_same = torch.equal(merged.model.layers[0].self_attn.k_proj.weight,
                         original.model.layers[0].self_attn.k_proj.weight)
    assert q_changed and k_same


def test_a_lora_run_gives_no_future_warning(tmp_path):
    """peft's get_peft_model reads transformers' deprecated is_gradient_checkpointing: every LoRA run printed a
    FutureWarning from transformers' file, about code that is not the user's."""
    pytest.importorskip("peft")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run(tmp_path, max_steps=1, grad_accum=1, lora=True, lora_rank=4)
    future = [f"{w.filename}:{w.lineno}: {w.message}" for w in caught if issubclass(w.category, FutureWarning)]
    assert not future, future


def test_lora_initialisation_draws_from_the_seed(tmp_path):
    """The adapter's random initialisation follows config.seed, whatever state the global RNG was left in."""
    pytest.importorskip("peft")
    tokenizer = byte_bpe_tokenizer()

    def lora_a(seed, draws):
        model = tiny_llama(len(tokenizer))
        torch.rand(draws)  # the global RNG in another state
        config = UnlearnConfig(output_dir=str(tmp_path / f"{seed}-{draws}"), lora=True, lora_rank=4, seed=seed,
                               max_steps=1, grad_accum=1, lr=0.0, progress=False)
        trainer, seen = UnlearningTrainer(model, tiny_streams(tokenizer), config), []
        # (read in the run: the constructor gives the model back without the adapter, train() puts it in)
        trainer.step_callback = lambda record: seen.append(
            trainer.model.base_model.model.model.layers[0].self_attn.q_proj.lora_A["default"].weight.detach().clone())
        trainer.train()
        return seen[0]

    drawn = lora_a(0, 1)
    assert torch.equal(drawn, lora_a(0, 2))
    assert not torch.equal(drawn, lora_a(1, 1))


def test_dropout_follows_the_seed_whatever_the_caller_draws_before_training(tmp_path):
    """Dropout draws from config.seed's generator where LoRA's initialisation left it: a caller's own draws between
    constructing the trainer and train() changed a run with dropout (the generator was seeded only when the trainer
    was constructed). Dropout does change the run: without it, it ends elsewhere."""
    pytest.importorskip("peft")
    tokenizer = byte_bpe_tokenizer()

    def trained(name, draws, dropout=0.5):
        config = UnlearnConfig(output_dir=str(tmp_path / name), lora=True, lora_rank=4, lora_dropout=dropout,
                               lr=1e-2, max_steps=2, progress=False)
        trainer = UnlearningTrainer(tiny_llama(len(tokenizer)), tiny_streams(tokenizer), config)
        torch.rand(draws)
        trainer.train()
        return [p.detach().clone() for p in trainer.model.parameters()]

    undisturbed = trained("undisturbed", 0)
    assert all(torch.equal(a, b) for a, b in zip(undisturbed, trained("disturbed", 3)))
    assert not all(torch.equal(a, b) for a, b in zip(undisturbed, trained("no-dropout", 0, dropout=0.0)))


def test_cached_reference_freezes_the_head(tmp_path):
    original = tiny_llama(len(byte_bpe_tokenizer()))
    trainer, summary = run(tmp_path, max_steps=2, reference="cached")
    assert torch.equal(trainer.model.lm_head.weight, original.lm_head.weight)
    up_proj = trainer.model.model.layers[0].mlp.up_proj.weight
    assert not torch.equal(up_proj, original.model.layers[0].mlp.up_proj.weight)
    assert summary.last.normal_kl > 0
    # the device memory the cache holds, in run.json: the normal set's answer targets x hidden size, fp32 here
    normal = tiny_streams(byte_bpe_tokenizer()).normal
    cache_bytes = sum(e.answer_end - e.answer_start for e in normal) * original.config.hidden_size * 4
    assert summary.reference_cache_bytes == cache_bytes
    assert json.loads((tmp_path / "run" / "run.json").read_text())["reference_cache_bytes"] == cache_bytes


def test_run_json_says_why_a_model_ran_padded_rows(monkeypatch, tmp_path):
    """packing='auto' on a model that cannot run packed rows trains on padded ones and says why in run.json (None for
    one that can); its compute counts the padded rows' slots."""
    from fastalign.unlearn import packing
    _, summary = run(tmp_path, "packed", max_steps=1, grad_accum=1)
    assert summary.packing_unavailable is None
    assert summary.compute["padded_slots"] < tiny_streams(byte_bpe_tokenizer()).batch(0).tokens.input_ids.numel()
    monkeypatch.setattr(packing, "_probe", lambda model, window: "a reason of the model's")
    _, summary = run(tmp_path, "padded", max_steps=1, grad_accum=1)
    reason = "a reason of the model's"
    assert summary.packing_unavailable == reason
    assert json.loads((tmp_path / "padded" / "run.json").read_text())["packing_unavailable"] == reason
    assert summary.compute["padded_slots"] == tiny_streams(byte_bpe_tokenizer()).batch(0).tokens.input_ids.numel()


def test_run_json_records_how_the_streams_drew_the_batches(tmp_path):
    """A trainer given streams built with other settings than its config's draws as the streams do: run.json
    recorded only config.json's batch size and seed (here 5 and 0 for a run that drew 3 rows a batch, seed 7)."""
    streams = tiny_streams(byte_bpe_tokenizer(), batch_size=3, seed=7)
    _, summary = run(tmp_path, streams=streams, max_steps=1, grad_accum=1, batch_size=5)
    draws = json.loads((tmp_path / "run" / "run.json").read_text())["draws"]
    assert draws == summary.draws == streams.draw_settings() and (draws["batch_size"], draws["seed"]) == (3, 7)


def test_trainers_of_two_precisions_run_one_after_the_other_in_one_process(tmp_path):
    """accelerate's process-wide state refused a bf16-mixed trainer after an fp32 one (a sweep in a notebook); a trainer
    constructed before one of another precision trains in its own precision after it (it was refused by name)."""
    from accelerate.state import AcceleratorState

    tokenizer, seen = byte_bpe_tokenizer(), []
    config = UnlearnConfig(output_dir=str(tmp_path / "fp32"), max_steps=1, grad_accum=1, progress=False)
    fp32 = UnlearningTrainer(tiny_llama(len(tokenizer)), tiny_streams(tokenizer), config,
                             step_callback=lambda record: seen.append(AcceleratorState().mixed_precision))
    _, summary = run(tmp_path, "mixed", max_steps=1, grad_accum=1, precision="bf16-mixed",
                     callback=lambda record: seen.append(AcceleratorState().mixed_precision))
    assert summary.steps == 1 and fp32.train().steps == 1
    assert seen == ["bf16", "no"]


@pytest.mark.parametrize("ending", ["finished", "failed", "built", "refused"])
def test_an_accelerator_of_the_callers_in_another_precision_is_taken_after_a_run(tmp_path, monkeypatch, ending):
    """The trainer's own Accelerator left accelerate's process-wide state initialised after train(), and after a
    constructor that refused the model or was never followed by train() (--check): the caller's
    Accelerator(mixed_precision='bf16') after an fp32 trainer was refused ("restart your runtime"), where a fresh
    process took it. The constructor and each run reset the state the trainer made when they end."""
    from accelerate import Accelerator

    tokenizer = byte_bpe_tokenizer()
    config = UnlearnConfig(output_dir=str(tmp_path / "run"), progress=False)
    if ending == "finished":
        run(tmp_path, max_steps=1, grad_accum=1)
    elif ending == "failed":
        fail_train_at_forward(monkeypatch, UnlearningTrainer(tiny_llama(len(tokenizer)), tiny_streams(tokenizer),
                                                             config), 1)
    elif ending == "built":
        UnlearningTrainer(tiny_llama(len(tokenizer)), tiny_streams(tokenizer), config)
    else:   # float16 weights to train, refused once the trainer made its Accelerator
        with pytest.raises(ValueError, match="float16 and trains"):
            UnlearningTrainer(tiny_llama(len(tokenizer)).half(), tiny_streams(tokenizer), config)
    assert Accelerator(mixed_precision="bf16", cpu=True).mixed_precision == "bf16"


def test_a_trainer_without_an_accelerator_leaves_the_callers_own_as_it_computes(tmp_path):
    """To follow an earlier trainer of another precision, a trainer resets accelerate's process-wide state; but the
    state may be the caller's own Accelerator's, which then computed in fp32 instead of bf16 without a word. A trainer
    refuses it by name where it computes in another precision, and shares it where it computes in the run's."""
    from accelerate import Accelerator

    mine = Accelerator(mixed_precision="bf16", cpu=True)
    with pytest.raises(ValueError, match=r"precision='fp32' trains with accelerate's mixed_precision='no', but this "
                                         r"process's Accelerator computes in 'bf16' .*pass yours as accelerator="):
        run(tmp_path, max_steps=1)
    assert mine.mixed_precision == "bf16" and not os.path.exists(tmp_path / "run")
    trainer, summary = run(tmp_path, max_steps=1, grad_accum=1, precision="bf16-mixed")
    assert summary.steps == 1 and mine.mixed_precision == trainer.accelerator.mixed_precision == "bf16"
    with pytest.raises(ValueError, match="pass yours as accelerator="):   # shared, it is still the caller's
        run(tmp_path, "fp32", max_steps=1)


def test_a_finished_run_lets_its_model_go(tmp_path):
    """A sweep of runs in one process (a learning rate search) frees each run's model when the caller drops it. The
    state-dict helpers of torch.distributed.checkpoint (torch 2.13) that checkpointing calls leave a reference cycle
    holding every module of the model, which only Python's next full collection freed: device memory filling up
    never triggers one, so the next run of a large model ran out of memory."""
    tokenizer = byte_bpe_tokenizer()
    model = tiny_llama(len(tokenizer))
    alive = weakref.ref(model)
    gc.collect()
    gc.disable()
    try:
        trainer, _ = run(tmp_path, model=model, max_steps=3, save_every=1)
        del trainer, model
        assert alive() is None, "the model outlived its run"
    finally:
        gc.enable()


def live(kind) -> int:
    """How many objects of exactly the class `kind` are alive, after a full collection."""
    gc.collect()
    return sum(type(o) is kind for o in gc.get_objects())


def objectives_and_optimizers_counter():
    """A function giving how many UnlearningObjective and AdamW objects are alive beyond those alive now (an earlier
    test in the process may keep some)."""
    before = live(UnlearningObjective), live(torch.optim.AdamW)
    return lambda: (live(UnlearningObjective) - before[0], live(torch.optim.AdamW) - before[1])


def test_a_retry_after_failed_runs_trains_without_their_objectives_and_optimizers(tmp_path, monkeypatch):
    """A train() an exception stopped (an out-of-memory error) left its prepared objective (with its reference) and
    its AdamW (with its moments) in the accelerator, which only a finished run emptied: a caller retrying on the same
    trainer, as after an out-of-memory error, trained beside every failed attempt's optimizer state, one more
    model-sized AdamW state on the device per failure."""
    tokenizer = byte_bpe_tokenizer()
    alive, counted = [], objectives_and_optimizers_counter()
    config = UnlearnConfig(output_dir=str(tmp_path / "run"), max_steps=3, save_every=1, lr=1e-3, progress=False)
    trainer = UnlearningTrainer(tiny_llama(len(tokenizer)), tiny_streams(tokenizer), config, tokenizer=tokenizer,
                                step_callback=lambda record: alive.append(counted()))
    for _ in range(2):   # each stopped at its second step, after the checkpoint of its first
        fail_train_at_forward(monkeypatch, trainer, 2)
        trainer.config = dataclasses.replace(config, resume=True)
    assert trainer.train().steps == 3
    assert alive == [(1, 1)] * 3, alive   # each run's own objective and AdamW, none of a failed run's


def test_a_retry_inside_the_except_block_trains_without_the_failed_runs_objective_and_optimizer(tmp_path):
    """`except torch.OutOfMemoryError: trainer.train()`: while the exception lives, its traceback keeps the failed
    run's frames, whose locals held its objective and AdamW, so the retry trained beside them."""
    tokenizer = byte_bpe_tokenizer()
    alive, calls = [], [0]
    real_forward = UnlearningObjective.forward

    def failing_once(self, *args):
        calls[0] += 1
        if calls[0] == 2:
            raise torch.OutOfMemoryError("CUDA out of memory")
        return real_forward(self, *args)

    config = UnlearnConfig(output_dir=str(tmp_path / "run"), max_steps=2, save_every=1, lr=1e-3, progress=False)
    counted = objectives_and_optimizers_counter()
    trainer = UnlearningTrainer(tiny_llama(len(tokenizer)), tiny_streams(tokenizer), config, tokenizer=tokenizer,
                                step_callback=lambda record: alive.append(counted()))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(UnlearningObjective, "forward", failing_once)
        try:
            trainer.train()
        except torch.OutOfMemoryError:
            trainer.config = dataclasses.replace(config, resume=True)
            assert trainer.train().steps == 2
    assert alive == [(1, 1)] * 2, alive


@pytest.mark.parametrize("stopped", [False, True], ids=["finished", "stopped"])
def test_a_run_on_the_callers_accelerator_takes_out_only_what_it_prepared(tmp_path, stopped):
    """A trainer given the caller's Accelerator prepares its objective and AdamW on it. A run an exception stopped
    left them there for the accelerator's life (a trainer dropped kept its model alive), and a finished one called
    free_memory, which dropped the caller's own prepared model and optimizer too (its save_state then saved neither)
    and reset its step: the trainer is not to switch the caller's training to its own."""
    from accelerate import Accelerator

    def stop(record):
        raise Killed

    acc = Accelerator(mixed_precision="no")
    mine = acc.prepare(torch.nn.Linear(3, 3))
    my_optimizer = acc.prepare(torch.optim.SGD(mine.parameters(), lr=0.1))
    acc.step = 7
    tokenizer = byte_bpe_tokenizer()
    model = tiny_llama(len(tokenizer))
    config = UnlearnConfig(output_dir=str(tmp_path / "run"), max_steps=2, lr=1e-3, progress=False)
    trainer = UnlearningTrainer(model, tiny_streams(tokenizer), config, tokenizer=tokenizer, accelerator=acc,
                                step_callback=stop if stopped else None)
    with pytest.raises(Killed) if stopped else contextlib.nullcontext():
        trainer.train()
    assert acc._models == [mine] and acc._optimizers == [my_optimizer] and acc.step == 7
    alive = weakref.ref(model)
    del trainer, model
    gc.collect()
    assert alive() is None, "the caller's accelerator kept the run's model"


def test_a_finished_run_lets_its_cached_reference_go(tmp_path, monkeypatch):
    """The cache (answer tokens x hidden size, on the device) is freed when the run ends, while the caller still
    holds the trainer (to read its model); a resume after an exception keeps it, as it must compare with the policy
    the run started from."""
    made = []

    class Recorded(CachedReference):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(weakref.ref(self))

    monkeypatch.setattr(trainer_module, "CachedReference", Recorded)
    trainer, _ = run(tmp_path, max_steps=1, reference="cached")
    gc.collect()
    assert len(made) == 1 and made[0]() is None, "the finished run kept its cached reference"


@pytest.mark.parametrize("storage", ["device", "host"])
def test_the_cached_reference_is_stored_where_the_config_says(tmp_path, monkeypatch, storage):
    made = []

    class Recorded(CachedReference):
        def __init__(self, *args, storage, **kwargs):
            made.append(storage)
            super().__init__(*args, storage=storage, **kwargs)

    monkeypatch.setattr(trainer_module, "CachedReference", Recorded)
    run(tmp_path, max_steps=1, reference="cached", reference_cache=storage)
    assert made == [storage]


def test_cached_reference_freezes_the_heads_bias_too(tmp_path):
    """Phi's lm_head has a bias, which the cache is paired with as with the weight: it is frozen, not trained."""
    original = tiny_phi(len(byte_bpe_tokenizer()))
    trainer, summary = run(tmp_path, model=tiny_phi(len(byte_bpe_tokenizer())), max_steps=2, reference="cached")
    assert torch.equal(trainer.model.lm_head.bias, original.lm_head.bias)
    assert torch.equal(trainer.model.lm_head.weight, original.lm_head.weight)
    assert summary.last.normal_kl > 0


def compute_as_run(trainer, batch, **flags):
    """batch_compute of `batch` on the layout the trainer's objective ran it on (packed where it packed it)."""
    packed = trainer.packer.plan(batch.tokens)
    return batch_compute(trainer.shape, batch, packed_shape=None if packed is None else packed.shape, **flags)


def test_cached_reference_counts_the_forward_that_built_the_cache(tmp_path):
    """No reference forward per step, but one over the whole normal set up front: compute spent by the run."""
    tokenizer = byte_bpe_tokenizer()
    trainer, summary = run(tmp_path, max_steps=2, grad_accum=1, reference="cached")
    streams = tiny_streams(tokenizer)
    steps = [compute_as_run(trainer, streams.batch(i), decoder_trains=True, lm_head_trains=False,
                           checkpointing=False, reference_forward=False) for i in range(2)]
    normal_set = collate(streams.normal, streams.filler_id)  # one cache chunk holds the tiny normal set
    assert summary.compute["reference_tokens"] == normal_set.num_tokens > 0
    assert summary.compute["flops"] == pytest.approx(sum(s.flops for s in steps) +
                                                     trainer.shape.decoder_forward(normal_set.attention_mask))


def test_adapter_reference_counts_its_forward_at_every_step(tmp_path):
    """reference='adapter' runs the base model (adapter off) over each step's normal rows, as the frozen copy does: a
    forward per step that the run's compute counts (only the cached reference has none). The adapters leave the
    decoder's matmul weights frozen: the backward computes the activations' gradients alone, not the weights'."""
    pytest.importorskip("peft")
    tokenizer = byte_bpe_tokenizer()
    trainer, summary = run(tmp_path, max_steps=2, grad_accum=1, lora=True, lora_rank=4, reference="adapter")
    streams = tiny_streams(tokenizer)
    batches = [streams.batch(i) for i in range(2)]
    expected = sum(b.tokens.rows(b.num_forget + b.num_mismatch, len(b.tokens.input_ids)).num_tokens for b in batches)
    assert summary.compute["reference_tokens"] == expected > 0
    steps = [compute_as_run(trainer, b, decoder_trains=False, lm_head_trains=False, checkpointing=False,
                            reference_forward=True) for b in batches]
    assert summary.compute["flops"] == pytest.approx(sum(s.flops for s in steps) + trainer.setup_compute.flops)


def test_cached_reference_with_tied_embeddings_counts_the_full_backward(tmp_path):
    """A tied lm_head freezes the input embeddings with it, yet every decoder matmul weight still trains."""
    tokenizer = byte_bpe_tokenizer()
    config = tiny_llama(len(tokenizer)).config
    config.tie_word_embeddings = True
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    embeddings = model.model.embed_tokens.weight.detach().clone()
    trainer, summary = run(tmp_path, model=model, max_steps=1, grad_accum=1, reference="cached")
    assert torch.equal(model.model.embed_tokens.weight, embeddings)
    expected = compute_as_run(trainer, tiny_streams(tokenizer).batch(0), decoder_trains=True,
                             lm_head_trains=False, checkpointing=False, reference_forward=False)
    assert summary.compute["flops"] == expected.flops + trainer.setup_compute.flops


@pytest.mark.parametrize("settings", [{"precision": "bf16-mixed"}, {"precision": "bf16"},
                                      {"gradient_checkpointing": True}])
def test_precisions_and_checkpointing_run(tmp_path, settings):
    _, summary = run(tmp_path, max_steps=1, grad_accum=1, **settings)
    assert summary.steps == 1 and torch.isfinite(torch.tensor(summary.last.loss))
    assert summary.optimizer == ("KahanAdamW" if settings.get("precision") == "bf16" else "AdamW")


def test_gradient_checkpointing_counts_the_forward_it_repeats(tmp_path):
    """Checkpointed layers run their forward again in the backward: the run's FLOPs count it."""
    trainer, summary = run(tmp_path, max_steps=1, grad_accum=1, gradient_checkpointing=True)
    expected = compute_as_run(trainer, tiny_streams(byte_bpe_tokenizer()).batch(0), decoder_trains=True,
                             lm_head_trains=True, checkpointing=True, reference_forward=True)
    assert summary.compute["flops"] == expected.flops


@pytest.mark.parametrize("tied", [False, True])
def test_reference_modes_give_the_same_p_under_bf16_mixed(tmp_path, tied):
    """precision='bf16-mixed' trains fp32 weights under bf16 autocast; every reference mode must give the P the
    policy computes before training. With lr 0 the first step's KL is then the same in the three modes (not 0 only
    by the bf16 rounding of two forwards over differently padded batches). A frozen copy cast whole to bf16 (bf16
    residual stream and norms) gave 16x that KL, and a cache computed without autocast 10x: P was another model."""
    pytest.importorskip("peft")
    vocab = len(byte_bpe_tokenizer())
    kl = {}
    for mode, extra in (("adapter", {"lora": True, "lora_rank": 4}), ("copy", {}), ("cached", {})):
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128,
                                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                             max_position_embeddings=256, tie_word_embeddings=tied))
        with torch.no_grad():  # peaked next-token distributions, as a trained model has
            for p in model.parameters():
                if p.dim() == 2:
                    p.mul_(8.0)
        records = []
        run(tmp_path, mode, model=model, callback=records.append, max_steps=1, grad_accum=1, lr=0.0,
            precision="bf16-mixed", reference=mode, max_forget_nll=None, **extra)
        kl[mode] = records[0].normal_kl
    assert kl["copy"] == pytest.approx(kl["adapter"], rel=1e-3)
    assert kl["cached"] == pytest.approx(kl["adapter"], rel=1e-3)


def test_the_bf16_mixed_frozen_copy_holds_its_linear_weights_in_bf16(tmp_path):
    """Under the policy's autocast the copy computes the same with its linear layers' weights in bf16, in about half
    the memory; fp32 weights would give the same KL, so only their dtype shows that the trainer asked for it."""
    tokenizer = byte_bpe_tokenizer()
    config = UnlearnConfig(output_dir=str(tmp_path / "run"), precision="bf16-mixed", progress=False)
    reference = UnlearningTrainer(tiny_llama(len(tokenizer)), tiny_streams(tokenizer), config)._reference()
    assert reference.model.model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16
    assert reference.model.model.embed_tokens.weight.dtype == torch.float32


def test_adamw_takes_the_configured_weight_decay(tmp_path, monkeypatch):
    """The default 0.01 is torch's AdamW default too: only another value shows that the setting reaches AdamW."""
    optimizers, made = [], trainer_module.adamw

    def recorded(*args, **kwargs):   # (read in the run: the constructor's accelerator is reset when it returns)
        optimizers.append(made(*args, **kwargs))
        return optimizers[-1]

    monkeypatch.setattr(trainer_module, "adamw", recorded)
    run(tmp_path, max_steps=1, grad_accum=1, weight_decay=0.3)
    assert [group["weight_decay"] for optimizer in optimizers for group in optimizer.param_groups] == [0.3]


def test_bf16_run_trains_the_model_it_saves(tmp_path):
    """precision='bf16' casts the weights as from_pretrained(dtype=bfloat16) loads them: RoPE's inv_freq, a buffer
    computed at construction, stays fp32 (rounded to bf16 it would shift the rotary angles of every position),
    so the saved model reloads with exactly the trained model's logits."""
    trainer, _ = run(tmp_path, max_steps=1, grad_accum=1, precision="bf16")
    assert trainer.model.model.rotary_emb.inv_freq.dtype == torch.float32
    reloaded = LlamaForCausalLM.from_pretrained(tmp_path / "run" / "model", dtype=torch.bfloat16)
    ids = tiny_streams(byte_bpe_tokenizer()).batch(0).tokens.input_ids
    with torch.no_grad():
        assert torch.equal(trainer.model.eval()(ids).logits, reloaded(ids).logits)


def test_bf16_weights_unlearn_as_fp32_weights_do_where_torchs_adamw_would_not(tmp_path, monkeypatch):
    """At a fine-tuning learning rate the updates are far below a bf16 weight's last place. Trained with KahanAdamW
    (precision='bf16'), the harmful answers' NLL rises over 40 steps as the fp32 run's does (0.0109 and 0.0109);
    with torch's AdamW on the same bf16 weights it barely moves (0.0020)."""
    def rise(name, **settings):
        run(tmp_path, name, max_steps=40, grad_accum=1, lr=2e-5, **settings)
        lines = log_lines(tmp_path / name)
        return lines[-1]["forget_nll"] - lines[0]["forget_nll"]

    fp32, kahan = rise("fp32"), rise("bf16", precision="bf16")
    monkeypatch.setattr(trainer_module, "adamw", lambda params, *, lr, weight_decay, sharded: torch.optim.AdamW(
        params, lr=lr, weight_decay=weight_decay))
    plain = rise("plain", precision="bf16")
    assert fp32 > 0.005 and abs(kahan - fp32) < 0.05 * fp32 and plain < 0.5 * fp32, (fp32, kahan, plain)


def test_a_bf16_run_checkpointed_with_torchs_adamw_resumes_with_kahan_adamw(tmp_path, monkeypatch):
    """A bf16 run that an earlier fastalign checkpointed (torch's AdamW on the bf16 weights) resumes: its moments load,
    its weights' compensations start at zero, and its steps then change the weights as the resumed steps of a run
    that started with KahanAdamW but lost its compensations would."""
    with monkeypatch.context() as patched:
        patched.setattr(trainer_module, "adamw", lambda params, *, lr, weight_decay, sharded: torch.optim.AdamW(
            params, lr=lr, weight_decay=weight_decay))
        with pytest.raises(Killed):
            run(tmp_path, "killed", save_every=2, callback=kill_after(3), precision="bf16")
    state = torch.load(tmp_path / "killed" / "checkpoints" / "step-000002" / "state.pt", weights_only=False)
    assert all("compensation" not in s for s in state["optimizer"]["state"].values())
    _, summary = run(tmp_path, "killed", save_every=2, resume=True, precision="bf16")
    assert summary.steps == 5 and summary.optimizer == "KahanAdamW"
    state = torch.load(tmp_path / "killed" / "checkpoints" / "step-000004" / "state.pt", weights_only=False)
    assert all(s["compensation"].dtype == torch.bfloat16 for s in state["optimizer"]["state"].values())


def test_failed_checkpoint_write_leaves_no_checkpoint(tmp_path, monkeypatch):
    real_save = checkpoint.save_file

    def fail_on_state(obj, path):
        if path.endswith("state.pt"):
            raise OSError("disk full")
        real_save(obj, path)

    monkeypatch.setattr(checkpoint, "save_file", fail_on_state)
    with pytest.raises(OSError, match="disk full"):
        run(tmp_path, save_every=1)
    assert os.listdir(tmp_path / "run" / "checkpoints") == []
    assert checkpoint.latest_checkpoint(str(tmp_path / "run")) is None


def test_bad_models_and_settings(tmp_path):
    model = tiny_llama(len(byte_bpe_tokenizer()))
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"model.layers.1.mlp.down_proj.weight holds NaN"):
        run(tmp_path, model=model)
    with pytest.raises(TypeError, match="LlamaModel has no lm_head"):
        run(tmp_path, model=tiny_llama(len(byte_bpe_tokenizer())).model)
    for bad, message in [({"forget_weight": float("inf")}, "loss weight forget must be a finite number"),
                         ({"max_steps": 0}, "max_steps must be an integer >= 1"),
                         ({"batch_size": True}, "batch_size must be an integer >= 1"),
                         ({"normal_batch_size": 0}, "normal_batch_size must be an integer >= 1"),
                         ({"seed": -1}, r"seed \(--seed\) must be an integer in \[0, 2\*\*64\)"),
                         ({"reference": "adapter"}, "reference='adapter' needs lora=True"),
                         ({"precision": "fp8"}, "precision must be one of")]:
        with pytest.raises(ValueError, match=message):
            UnlearnConfig(output_dir=str(tmp_path), **bad)
    assert not os.path.exists(tmp_path / "run")
    counts = UnlearnConfig(output_dir=str(tmp_path), max_steps=np.int64(3), normal_batch_size=np.int32(2))
    assert (counts.max_steps, counts.normal_batch_size) == (3, 2) and type(counts.max_steps) is int


@pytest.mark.parametrize("how", ["offloaded", "not loaded"])
def test_a_model_with_weights_on_the_meta_device_is_refused_before_any_output(tmp_path, how):
    """Weights that accelerate offloads (its hook brings them in at each forward) or that were never loaded: the
    trainer, which trains every weight on the accelerator's device, failed in its check of the weights with
    "Tensor.item() cannot be called on meta tensors"."""
    accelerate = pytest.importorskip("accelerate")
    model = tiny_llama(len(byte_bpe_tokenizer()))
    if how == "offloaded":
        accelerate.cpu_offload(model.model.layers[1], execution_device=torch.device("cpu"))
    else:
        model.model.layers[1].to("meta")
    with pytest.raises(ValueError, match=r"^model parameter model.layers.1.self_attn.q_proj.weight is on the meta "
                                         r"device \(offloaded by accelerate.* or not loaded\)"):
        run(tmp_path, model=model)
    assert not os.path.exists(tmp_path / "run")


def test_a_model_dispatched_over_two_devices_is_refused_before_any_output(tmp_path):
    """A device_map over two GPUs gives each block a hook moving its inputs to its device; the trainer moved the
    weights to the accelerator's device, and the first forward failed deep inside torch ("Expected all tensors to be
    on the same device"; here, on a CPU, "Torch not compiled with CUDA enabled")."""
    pytest.importorskip("accelerate")
    from tests.test_model_devices import dispatched_to
    model = tiny_llama(len(byte_bpe_tokenizer()))
    dispatched_to(model.model.layers[1], "cuda:1")
    with pytest.raises(ValueError, match=r"^model: accelerate dispatched it to run on cuda:1 \(model.layers.1\) .*: "
                                         r"the trainer trains the whole model on the accelerator's device, cpu"):
        run(tmp_path, model=model)
    assert not os.path.exists(tmp_path / "run")
    on_its_device = dispatched_to(tiny_llama(len(byte_bpe_tokenizer())), "cpu")   # hooks on the trainer's device
    assert run(tmp_path, model=on_its_device, max_steps=1)[1].steps == 1


def test_a_train_of_another_trainer_from_a_step_callback_runs(tmp_path):
    """One call at a time is per trainer: a trainer of its own trains from inside another's run."""
    inner = []
    _, summary = run(tmp_path, "outer", max_steps=2,
                     callback=lambda record: inner.append(run(tmp_path, f"inner-{record.step}", max_steps=1)[1]))
    assert summary.steps == 2 and [s.steps for s in inner] == [1, 1]


@pytest.mark.parametrize("targets", [["q_proj", "lm_head"], ["lm_head"]])
def test_lora_on_the_lm_head_is_refused_before_any_output(tmp_path, targets):
    """The fused losses read lm_head.weight: an adapter there would silently never act nor train."""
    pytest.importorskip("peft")
    with pytest.raises(ValueError, match="the lm_head carries a PEFT adapter.*leave the lm_head out of lora_targets"):
        run(tmp_path, lora=True, lora_rank=4, lora_targets=targets)
    assert not os.path.exists(tmp_path / "run")


def test_lora_on_input_embeddings_tied_to_the_lm_head_is_refused_before_any_output(tmp_path):
    """Merged, such an adapter would change the tied lm_head too, which it never did while training: the saved
    model would not be the trained one. Untied, the input embeddings may carry one. The refused model is left as
    given: the check runs once PEFT put its layers in, and they stayed in the caller's model."""
    pytest.importorskip("peft")
    config = tiny_llama(len(byte_bpe_tokenizer())).config
    config.tie_word_embeddings = True
    model = LlamaForCausalLM(config)
    modules = [name for name, _ in model.named_modules()]
    with pytest.raises(ValueError, match="input embeddings carry a PEFT adapter and are tied to the lm_head"):
        run(tmp_path, model=model, lora=True, lora_rank=4, lora_targets=["q_proj", "embed_tokens"])
    assert not os.path.exists(tmp_path / "run")
    assert [name for name, _ in model.named_modules()] == modules
    run(tmp_path, max_steps=1, grad_accum=1, lora=True, lora_rank=4, lora_targets=["q_proj", "embed_tokens"])


def test_rows_longer_than_the_model_context_are_refused_up_front(tmp_path):
    """OPT's learned positions would fail with an IndexError at the first long batch, naming nothing."""
    from transformers import OPTConfig, OPTForCausalLM

    from fastalign.data_files import DataError

    model = OPTForCausalLM(OPTConfig(vocab_size=len(byte_bpe_tokenizer()), hidden_size=32, ffn_dim=64,
                                     num_hidden_layers=2, num_attention_heads=4, word_embed_proj_dim=32,
                                     max_position_embeddings=16))
    with pytest.raises(DataError, match=r"forget:row \d.*more than the model's context \(max_position_embeddings=16\); "
                                        r"set max_length \(--max-length\) to at most 16"):
        run(tmp_path, model=model)
    assert not os.path.exists(tmp_path / "run")


def test_answer_ids_past_the_lm_heads_rows_are_refused_up_front(tmp_path):
    """Mllama's text model embeds 8 image tokens more than its lm_head predicts: an answer id the input embeddings
    hold but the lm_head has no row for passed the check of the data's ids and failed mid-run, at the first batch
    holding it, with a ValueError naming no example. The trainer checks the answers against the lm_head's rows too,
    naming the example."""
    from transformers import MllamaForCausalLM, MllamaTextConfig

    from fastalign.data_files import DataError

    streams = tiny_streams(byte_bpe_tokenizer())
    largest = max(max(e.input_ids[e.answer_start:e.answer_end]) for e in streams.forget)
    model = MllamaForCausalLM(MllamaTextConfig(vocab_size=largest, hidden_size=32, intermediate_size=64,
                                               num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                                               cross_attention_layers=[], bos_token_id=0, eos_token_id=0,
                                               pad_token_id=0))
    assert model.get_input_embeddings().weight.shape[0] > largest == model.lm_head.weight.shape[0]
    with pytest.raises(DataError, match=rf"^forget:row \d+: answer token id {largest} is past the model's {largest} "
                                        "lm_head rows"):
        UnlearningTrainer(model, streams, UnlearnConfig(output_dir=str(tmp_path / "run"), progress=False))
    assert not os.path.exists(tmp_path / "run")

def test_a_launch_whose_processes_accelerate_runs_alone_is_refused(tmp_path, monkeypatch):
    """torchrun on a machine without a GPU: unless told to use the CPU (ACCELERATE_USE_CPU=1), accelerate joins the
    launch's process group yet runs each process as a run of its own (num_processes 1, every process the main one).
    Both then trained alone, on half the data, and raced to write one output_dir (one crashed renaming the other's
    config.json; log lines came twice). The Accelerator is built here as accelerate builds it there, but before
    WORLD_SIZE is set (with it set, it would wait for a process 1 to join)."""
    from accelerate import Accelerator

    acc = Accelerator()
    monkeypatch.setenv("WORLD_SIZE", "2")
    config = UnlearnConfig(output_dir=str(tmp_path / "run"), progress=False)
    with pytest.raises(ValueError, match=r"launched as 2 processes \(WORLD_SIZE=2\), but accelerate runs this one "
                                         r"alone.*ACCELERATE_USE_CPU=1"):
        UnlearningTrainer(tiny_llama(len(byte_bpe_tokenizer())), tiny_streams(byte_bpe_tokenizer()), config,
                          accelerator=acc)


def test_accelerate_gradient_accumulation_is_refused(tmp_path, monkeypatch):
    """`accelerate launch --gradient_accumulation_steps N` makes Accelerator.backward divide every loss by N on top of
    the trainer's own division by grad_accum: each step's gradient was N times too small (AdamW hides most of a
    constant factor on the gradient, not its eps)."""
    monkeypatch.setenv("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "2")
    with pytest.raises(ValueError, match=r"accelerate's gradient_accumulation_steps is 2.*grad_accum \(--grad-accum\)"):
        run(tmp_path)
    assert not os.path.exists(tmp_path / "run")


@pytest.mark.parametrize("precision, mixed_precision", [("fp32", "bf16"), ("bf16-mixed", "no"), ("bf16", "bf16")])
def test_an_accelerator_of_another_precision_is_refused(tmp_path, precision, mixed_precision):
    """The reference follows `precision`, the policy's forward the accelerator's autocast: an accelerator given with
    mixed_precision='bf16' to a precision='fp32' run gave a cached reference computed without autocast, 140x the
    step-0 KL of a matching run (P another model), and with 'no' to a 'bf16-mixed' run the frozen copy's bf16 linear
    weights met fp32 inputs (a dtype error deep in torch's linear)."""
    from accelerate import Accelerator

    config = UnlearnConfig(output_dir=str(tmp_path / "run"), precision=precision, progress=False)
    with pytest.raises(ValueError, match=rf"the accelerator's mixed_precision is '{mixed_precision}', but "
                                         rf"precision='{precision}' trains with mixed_precision="):
        UnlearningTrainer(tiny_llama(len(byte_bpe_tokenizer())), tiny_streams(byte_bpe_tokenizer()), config,
                          accelerator=Accelerator(mixed_precision=mixed_precision))


def test_float16_weights_to_train_are_refused_by_name(tmp_path):
    """AdamW on float16 weights rounds its eps (1e-8) to 0 and underflows its second moments: the first step made
    21 of the tiny model's weights inf or NaN, and the run died at step 2 with 'the loss is not finite', naming
    data rows. A LoRA adapter on a float16 base trains (PEFT keeps its weights in float32)."""
    pytest.importorskip("peft")
    tokenizer = byte_bpe_tokenizer()
    with pytest.raises(ValueError, match=r"model parameter model\.embed_tokens\.weight is torch\.float16 and trains"):
        run(tmp_path, model=cast_weights(tiny_llama(len(tokenizer)), torch.float16), max_steps=2, grad_accum=1)
    assert not os.path.exists(tmp_path / "run")
    records = []
    run(tmp_path, "lora", model=cast_weights(tiny_llama(len(tokenizer)), torch.float16), callback=records.append,
        max_steps=2, grad_accum=1, lora=True, lora_rank=4, max_forget_nll=None)
    assert len(records) == 2 and all(np.isfinite(r.loss) for r in records)


def test_lora_under_fsdp_is_refused(tmp_path):
    from accelerate import Accelerator
    from accelerate.utils import DistributedType

    acc = Accelerator()
    acc.state.distributed_type = DistributedType.FSDP  # as `accelerate launch` with FSDP would set it
    config = UnlearnConfig(output_dir=str(tmp_path / "run"), lora=True, progress=False)
    with pytest.raises(NotImplementedError, match="lora=True under FSDP is not supported"):
        UnlearningTrainer(tiny_llama(len(byte_bpe_tokenizer())), tiny_streams(byte_bpe_tokenizer()), config,
                          accelerator=acc)


def test_kl_term_is_the_token_mean_over_all_micro_batches_of_a_step(tmp_path):
    """SPEC §1's L_nor is a mean over the step's normal tokens: with micro-batches holding different numbers
    of normal tokens, that is not the mean of each micro-batch's token mean."""
    tokenizer = byte_bpe_tokenizer()
    streams = tiny_streams(tokenizer, normal_batch_size=1)
    config = UnlearnConfig(output_dir=str(tmp_path / "run"), max_steps=2, lr=1e-3, grad_accum=2, progress=False)
    trainer = UnlearningTrainer(tiny_llama(len(tokenizer)), streams, config)
    after_step_1 = []
    trainer.step_callback = lambda record: after_step_1.append(copy.deepcopy(trainer.model))
    trainer.train()

    original = tiny_llama(len(tokenizer))
    normal = [b.examples[b.num_forget + b.num_mismatch:] for b in (streams.batch(2), streams.batch(3))]  # step 2
    assert len({sum(e.num_answer_targets for e in rows) for rows in normal}) == 2  # different token counts

    @torch.no_grad()
    def kl(rows):
        return float(spec_unlearning_terms(lambda ids: after_step_1[0](ids).logits, lambda ids: original(ids).logits,
                                           [], [], rows)["normal"])
    logged = log_lines(tmp_path / "run")[1]["normal_kl"]
    # fp32 log-probabilities of size ~6 carry ~5e-7 of rounding into a KL of ~2e-4; the two means differ by ~3e-5.
    assert logged == pytest.approx(kl(normal[0] + normal[1]), abs=5e-7)
    assert logged != pytest.approx((kl(normal[0]) + kl(normal[1])) / 2, abs=5e-6)


def test_accumulated_gradient_is_that_of_the_whole_step(tmp_path, monkeypatch):
    """With grad_accum micro-batches of equal size, the gradient the optimizer sees is that of SPEC §1's
    objective over all the step's rows (each micro-batch's loss divided by grad_accum). AdamW alone hides a
    constant factor on the gradient, so the gradient is read where the optimizer steps: at the second step, where
    the policy has left the reference and the KL term has a gradient of its own. The three terms' weights are all
    other than their defaults and each other, so that a weight given to the wrong term changes the gradient."""
    tokenizer = byte_bpe_tokenizer()
    streams = tiny_streams(tokenizer)
    seen = []
    real_step = torch.optim.AdamW.step

    def recording_step(optimizer, *args, **kwargs):
        params = [p for group in optimizer.param_groups for p in group["params"]]
        seen.append(({id(p): p.grad.clone() for p in params}, {id(p): p.detach().clone() for p in params}))
        return real_step(optimizer, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", recording_step)
    config = UnlearnConfig(output_dir=str(tmp_path / "run"), max_steps=2, lr=1e-3, grad_accum=2, progress=False,
                           forget_weight=0.7, mismatch_weight=0.3, normal_weight=2.0)
    trainer = UnlearningTrainer(tiny_llama(len(tokenizer)), streams, config)
    names = {id(p): name for name, p in trainer.model.named_parameters()}
    trainer.train()
    grads, params = seen[1]

    model, original = tiny_llama(len(tokenizer)), tiny_llama(len(tokenizer))
    model.load_state_dict({names[key]: value for key, value in params.items()})
    batches = [streams.batch(2), streams.batch(3)]
    rows = {"forget": [], "mismatch": [], "normal": []}
    for b in batches:
        ends = {"forget": (0, b.num_forget), "mismatch": (b.num_forget, b.num_forget + b.num_mismatch),
                "normal": (b.num_forget + b.num_mismatch, len(b.examples))}
        for term, (start, end) in ends.items():
            rows[term] += b.examples[start:end]
    terms = spec_unlearning_terms(lambda ids: model(ids).logits, lambda ids: original(ids).logits,
                                  rows["forget"], rows["mismatch"], rows["normal"])
    assert terms["normal"] > 1e-6, terms   # the policy has moved
    total = 0.7 * terms["forget"] + 0.3 * terms["mismatch"] + 2.0 * terms["normal"]
    total.backward()

    expected = dict(model.named_parameters())
    assert len(grads) == len(expected)
    for key, grad in grads.items():
        name = names[key]
        torch.testing.assert_close(grad, expected[name].grad, rtol=1e-5, atol=1e-7, msg=lambda m: f"{name}: {m}")


def test_a_model_whose_logits_the_fused_losses_do_not_reproduce_is_refused_before_any_output(tmp_path):
    """The trainer refuses it when built, so that no output directory is left behind (see test_objective)."""
    from tests.unlearn.test_objective import ScaledInputHead

    model = tiny_llama(len(byte_bpe_tokenizer()))
    head = ScaledInputHead(32, model.config.vocab_size, bias=False)
    head.weight = model.lm_head.weight
    model.lm_head = head
    with pytest.raises(NotImplementedError, match="LlamaForCausalLM: its logits are not"):
        run(tmp_path, model=model)
    assert not os.path.exists(tmp_path / "run")


@pytest.mark.parametrize("refusal, settings", [
    ("logits", {"precision": "bf16"}), ("logits", {"lora": True, "lora_rank": 4}),
    ("logits", {"gradient_checkpointing": True}), ("float16", {"reference": "cached", "gradient_checkpointing": True}),
    ("targets", {"reference": "cached", "lora": True, "lora_rank": 4, "lora_targets": ["no_such_proj"]}),
    ("checkpointing", {"lora": True, "lora_rank": 4, "gradient_checkpointing": True})],
    ids=["bf16", "lora", "checkpointing", "float16-cached", "lora-targets-cached", "no-checkpointing-lora"])
def test_a_refused_model_is_left_as_it_was_given(tmp_path, refusal, settings):
    """The constructor cast the model to bf16, injected LoRA layers, froze the lm_head (reference='cached'), turned
    activation checkpointing on and put it in train mode before the checks that then refused it: the caller's
    weights were left rounded to bf16 for good, or LoRA modules in its forward. A refusal must change nothing."""
    from tests.unlearn.test_objective import ScaledInputHead

    if settings.get("lora"):
        pytest.importorskip("peft")
    model = tiny_llama(len(byte_bpe_tokenizer()))
    if refusal == "logits":
        head = ScaledInputHead(32, model.config.vocab_size, bias=False)
        head.weight = model.lm_head.weight
        model.lm_head = head
    elif refusal == "float16":
        cast_weights(model, torch.float16)
    elif refusal == "checkpointing":   # (refused by the constructor, not by the first train() after it changed modes)
        model.supports_gradient_checkpointing = False
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    modules = [n for n, _ in model.named_modules()]
    error, match = {"logits": (NotImplementedError, "its logits are not"),
                    "float16": (ValueError, "is torch.float16 and trains"),
                    "targets": (ValueError, "lora_targets"),   # (after the lm_head was frozen)
                    "checkpointing": (ValueError, "does not support activation checkpointing")}[refusal]
    with pytest.raises(error, match=match):
        run(tmp_path, model=model, max_steps=1, **settings)
    assert [n for n, _ in model.named_modules()] == modules
    assert not model.training and not model.get_input_embeddings()._forward_hooks   # (checkpointing's input grads)
    assert not any(getattr(module, "gradient_checkpointing", False) for module in model.modules())
    for name, p in model.named_parameters():
        assert p.dtype == weights[name].dtype and p.requires_grad and torch.equal(p, weights[name]), name


def local_gpt_neo(vocab_size: int):
    """A 2-layer random fp32 GPT-Neo whose second layer is local (window_size 8): packed rows are not exact for it."""
    from transformers import GPTNeoConfig, GPTNeoForCausalLM
    torch.manual_seed(0)
    return GPTNeoForCausalLM(GPTNeoConfig(vocab_size=vocab_size, hidden_size=32, num_layers=2, num_heads=4,
                                          attention_types=[[["global", "local"], 1]], window_size=8,
                                          max_position_embeddings=256, bos_token_id=0, eos_token_id=0)).eval()


def flex_llama(vocab_size: int):
    """tiny_llama with flex attention, which takes no 4-D mask: packed rows are not exact for it."""
    model = tiny_llama(vocab_size)
    model.set_attn_implementation("flex_attention")
    return model


@pytest.mark.parametrize("make", [local_gpt_neo, flex_llama], ids=["gpt-neo-local", "llama-flex"])
def test_a_run_refused_for_packing_on_leaves_the_model_as_given(tmp_path, make):
    """packing='on' for a model packed rows are not exact for was refused only by train()'s RowPacker, after the
    constructor had cast the caller's fp32 weights to bf16 and put LoRA layers into the model, for good, and train()
    had made output_dir: the constructor refuses it, before it changes the model (the check needs nothing more)."""
    pytest.importorskip("peft")
    model = make(len(byte_bpe_tokenizer()))
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    modules = [n for n, _ in model.named_modules()]
    with pytest.raises(ValueError, match="packing='on': "):
        run(tmp_path, model=model, max_steps=1, precision="bf16", packing="on", lora=True, lora_rank=4)
    assert [n for n, _ in model.named_modules()] == modules
    assert not os.path.exists(tmp_path / "run")
    for name, p in model.named_parameters():
        assert p.dtype == torch.float32 and p.requires_grad and torch.equal(p, weights[name]), name


@pytest.mark.parametrize("settings", [{"lora": True, "lora_rank": 4}, {"reference": "cached"}], ids=["lora", "cached"])
def test_a_finished_run_gives_the_model_its_requires_grad_flags_back(tmp_path, settings):
    """PEFT froze every base weight and the cached reference the lm_head; the caller's model, trained in place, kept
    them frozen after the run: a second run on it (a sweep in a notebook, full weights after LoRA) failed with 'the
    model has no trainable parameter', or silently left the lm_head untrained, as would the caller's own loop."""
    if settings.get("lora"):
        pytest.importorskip("peft")
    model = tiny_llama(len(byte_bpe_tokenizer()))
    model.model.embed_tokens.weight.requires_grad_(False)   # the caller's own choice, kept as well
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    run(tmp_path, model=model, max_steps=1, **settings)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert run(tmp_path, "again", model=model, max_steps=1)[1].steps == 1


def test_a_finished_cached_reference_run_trains_again_on_its_trainer(tmp_path):
    """A finished run gives the model its lm_head's flag back, which the cached reference froze when the trainer was
    made: train() again on that trainer (into another output_dir) failed with "reference='cached' needs a frozen
    lm_head". Each train() freezes it."""
    trainer, _ = run(tmp_path, "first", max_steps=1, reference="cached")
    trainer.config = dataclasses.replace(trainer.config, output_dir=str(tmp_path / "again"))
    assert trainer.train().steps == 1
    assert trainer.model.lm_head.weight.requires_grad   # (given back again)


def test_a_lora_run_that_stepped_no_weight_gives_the_model_back_as_given(tmp_path, monkeypatch):
    """The constructor put PEFT's LoRA layers into the caller's model and froze its weights, which only a finished run
    undid: after a train() that failed before its first step (an out-of-memory error), the caller's untouched model
    held the layers (q_proj.base_layer.weight where q_proj.weight was) with only the adapters trainable, and a full run
    on it trained those alone and wrote a model/ whose q_proj and v_proj reloaded at random. A retry on the same
    trainer puts the adapter in again and trains as a run that never failed."""
    pytest.importorskip("peft")
    tokenizer, model = byte_bpe_tokenizer(), tiny_llama(len(byte_bpe_tokenizer()))
    model.model.embed_tokens.weight.requires_grad_(False)   # the caller's own choice, kept as well
    keys, modules = list(model.state_dict()), [name for name, _ in model.named_modules()]
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    count = sum(p.numel() for p in model.parameters())
    settings = dict(max_steps=2, grad_accum=1, lr=1e-2, lora=True, lora_rank=4, lora_dropout=0.5,
                    reference="cached", progress=False)
    config = UnlearnConfig(output_dir=str(tmp_path / "retried"), **settings)
    trainer = UnlearningTrainer(model, tiny_streams(tokenizer), config, tokenizer=tokenizer)
    fail_train_at_forward(monkeypatch, trainer, 1)
    assert list(model.state_dict()) == keys and [name for name, _ in model.named_modules()] == modules
    assert {name: p.requires_grad for name, p in model.named_parameters()} == flags
    assert sum(p.numel() for p in model.parameters()) == count
    assert trainer.train().steps == 2
    _, summary = run(tmp_path, "whole", **settings)
    for name in ("model", "adapter"):
        for file in sorted(os.listdir(os.path.join(summary.model_dir, "..", name))):
            expected = os.path.join(summary.model_dir, "..", name, file)
            assert open(os.path.join(tmp_path, "retried", name, file), "rb").read() == open(expected, "rb").read(), file


def test_a_full_run_on_a_model_holding_stray_adapter_layers_is_refused_naming_them(tmp_path):
    """A model holding LoRA layers outside a PeftModel (the caller's own inject_adapter_in_model) trained with
    lora=False trained the adapters alone, PEFT having frozen the weights they wrap, and wrote a model/ whose wrapped
    weights transformers reloaded at random."""
    peft = pytest.importorskip("peft")
    model = tiny_llama(len(byte_bpe_tokenizer()))
    peft.inject_adapter_in_model(peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]), model)
    with pytest.raises(ValueError, match=r"lora=False trains the model's own weights, but the model holds 4 PEFT "
                                         r"adapter layer\(s\) outside a PeftModel \(model.layers.0.self_attn.q_proj, "
                                         r"model.layers.0.self_attn.v_proj, model.layers.1.self_attn.q_proj, ...\)"):
        run(tmp_path, model=model, max_steps=1)
    assert not os.path.exists(tmp_path / "run")


def test_a_cached_reference_run_that_stepped_no_weight_gives_the_lm_head_its_flag_back(tmp_path, monkeypatch):
    """reference='cached' froze the caller's lm_head in the constructor, which only a finished run undid: after a
    train() that failed before its first step, a retry with reference='copy' on the untouched model took the frozen
    head for the caller's own choice, left it untrained (it moved by 0.0) and frozen for good."""
    tokenizer, model = byte_bpe_tokenizer(), tiny_llama(len(byte_bpe_tokenizer()))
    head = model.lm_head.weight.detach().clone()
    config = UnlearnConfig(output_dir=str(tmp_path / "failed"), reference="cached", progress=False)
    fail_train_at_forward(monkeypatch, UnlearningTrainer(model, tiny_streams(tokenizer), config), 1)
    assert model.lm_head.weight.requires_grad
    run(tmp_path, model=model, max_steps=1, grad_accum=1, reference="copy")
    assert not torch.equal(model.lm_head.weight, head) and model.lm_head.weight.requires_grad


@pytest.mark.parametrize("settings", [{"lora": True, "lora_rank": 4}, {"reference": "cached"}], ids=["lora", "cached"])
def test_a_trainer_never_trained_leaves_the_model_as_given(tmp_path, settings):
    """The constructor put PEFT's LoRA layers into the caller's model and froze its base weights, or froze its lm_head
    (the cached reference), which only train() undid: a trainer built and never trained (a notebook cell run, then
    other settings chosen) left them for good, and a full run on the model was refused (its stray LoRA layers) or
    never trained the lm_head. The model trains after it as a fresh one does."""
    if settings.get("lora"):
        pytest.importorskip("peft")
    tokenizer, seed = byte_bpe_tokenizer(), random.randrange(1 << 16)
    model = tiny_llama(len(tokenizer), seed=seed)
    keys, modules = list(model.state_dict()), [name for name, _ in model.named_modules()]
    config = UnlearnConfig(output_dir=str(tmp_path / "never"), progress=False, **settings)
    trainer = UnlearningTrainer(model, tiny_streams(tokenizer), config)
    assert trainer.model is model and list(model.state_dict()) == keys
    assert [name for name, _ in model.named_modules()] == modules
    assert all(p.requires_grad for p in model.parameters())
    trained, _ = run(tmp_path, "after", model=model, max_steps=1, grad_accum=1)
    fresh, _ = run(tmp_path, "fresh", model=tiny_llama(len(tokenizer), seed=seed), max_steps=1, grad_accum=1)
    for (name, a), (_, b) in zip(trained.model.named_parameters(), fresh.model.named_parameters()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("settings", [{}, {"gradient_checkpointing": True},
                                      {"lora": True, "lora_rank": 4, "gradient_checkpointing": True}],
                         ids=["plain", "checkpointing", "lora"])
@pytest.mark.parametrize("ending", ["finished", "failed"])
def test_a_run_gives_the_model_its_modes_and_checkpointing_back(tmp_path, ending, settings):
    """The constructor put the caller's model in train mode and turned checkpointing on (with transformers' input-grads
    hook) for good: after train() a model given in eval mode generated with dropout on. Each run trains in train mode,
    with checkpointing as the config says, and gives every module its own mode back, finished or failed; a resume on
    the same trainer trains in train mode again. The frozen copy of the reference stays in eval mode throughout."""
    if settings.get("lora"):
        pytest.importorskip("peft")
    tokenizer, model = byte_bpe_tokenizer(), tiny_llama(len(byte_bpe_tokenizer()))
    model.model.layers[1].mlp.train()   # the caller's own choice: one submodule in train mode, kept as well
    given = [(module, module.training) for module in model.modules()]
    checkpointing = settings.get("gradient_checkpointing", False)
    config = UnlearnConfig(output_dir=str(tmp_path / "run"), max_steps=3, save_every=1, resume=True, lr=1e-3,
                           grad_accum=2, progress=False, **settings)
    seen = []

    def callback(record):
        reference = trainer._built_reference[0]
        seen.append((all(module.training for module in trainer.model.modules()),
                     any(getattr(module, "gradient_checkpointing", False) for module in model.modules()),
                     not any(module.training for module in getattr(reference, "model", model).modules())
                     or settings.get("lora")))   # (LoRA's reference is the policy, in eval mode at its call)
        if ending == "failed" and len(seen) == 2:   # (after step 2: a resume from step 1's checkpoint)
            raise Killed

    trainer = UnlearningTrainer(model, tiny_streams(tokenizer), config, tokenizer=tokenizer, step_callback=callback)
    assert not model.training   # (the constructor changes no mode)

    def assert_given_back():
        assert [training for _, training in given] == [module.training for module, _ in given]
        assert not any(module.training for module in model.modules() if all(module is not m for m, _ in given))
        assert not any(getattr(module, "gradient_checkpointing", False) for module in model.modules())
        assert not model.get_input_embeddings()._forward_hooks and not hasattr(model, "_require_grads_hook")

    if ending == "failed":
        with pytest.raises(Killed):
            trainer.train()
        assert_given_back()
    assert trainer.train().steps == 3
    assert_given_back()
    assert seen == [(True, checkpointing, True)] * (4 if ending == "failed" else 3)


def test_a_run_gives_back_the_modes_it_found_not_those_the_constructor_saw(tmp_path):
    """The modes given back are those train() found: a model put in eval mode between the constructor and train()
    stays in eval mode after the run (the constructor's were given back)."""
    tokenizer, model = byte_bpe_tokenizer(), tiny_llama(len(byte_bpe_tokenizer()))
    model.train()
    config = UnlearnConfig(output_dir=str(tmp_path / "run"), max_steps=1, progress=False)
    trainer = UnlearningTrainer(model, tiny_streams(tokenizer), config, tokenizer=tokenizer)
    model.eval()
    assert trainer.train().steps == 1
    assert not any(module.training for module in model.modules())


@pytest.mark.parametrize("given", ["reentrant every 2nd layer", "own function"])
def test_a_model_given_with_checkpointing_of_its_own_gets_it_back(tmp_path, given):
    """A model given with checkpointing on with options of its own (use_reentrant=True, every_n_layers=2, a function
    of the caller's) came back from a run with gradient_checkpointing=True with the trainer's: every layer
    checkpointed, non-reentrant. transformers keeps them in each module's gradient_checkpointing flag and
    _gradient_checkpointing_func: each module gets its own back, while the run checkpoints every layer,
    non-reentrant, as before."""
    tokenizer, model = byte_bpe_tokenizer(), tiny_llama(len(byte_bpe_tokenizer()))
    options = {"use_reentrant": True}
    if hasattr(model, "activation_checkpointing_enable"):   # (transformers 5.17 has the older name alone)
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=options, every_n_layers=2)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=options, every_n_layers=2)
    checkpointed = [module for module in model.modules() if hasattr(module, "gradient_checkpointing")]
    if given == "own function":
        def own(function, *args, **kwargs):
            return torch.utils.checkpoint.checkpoint(function, *args, use_reentrant=False, **kwargs)
        for module in checkpointed:
            module._gradient_checkpointing_func = own
    found = [(module.gradient_checkpointing, module._gradient_checkpointing_func) for module in checkpointed]
    assert [flag for flag, _ in found].count(False) == 1   # (the 2nd of the 2 layers)
    during = []

    def callback(record):
        during.extend((module.gradient_checkpointing, module._gradient_checkpointing_func.keywords)
                      for module in checkpointed)

    config = UnlearnConfig(output_dir=str(tmp_path / "run"), max_steps=1, progress=False, gradient_checkpointing=True)
    UnlearningTrainer(model, tiny_streams(tokenizer), config, tokenizer=tokenizer, step_callback=callback).train()
    assert during == [(True, {"use_reentrant": False})] * len(checkpointed)
    assert [(module.gradient_checkpointing, module._gradient_checkpointing_func) for module in checkpointed] == found
    assert hasattr(model, "_require_grads_hook")   # (registered when the caller enabled checkpointing)


@pytest.mark.parametrize("reference", ["adapter", "copy"])
def test_a_lora_run_whose_model_write_failed_is_refused_on_its_trainer_and_resumes_on_a_new_one(tmp_path, monkeypatch,
                                                                                              reference):
    """A LoRA run whose last write, model/, fails (a full disk): _finish had merged the adapter into the trainer's
    model in place, and train() again on the same trainer with resume=True crashed deep inside ("reference='adapter'
    needs a PEFT model", with reference='copy' "the model has no trainable parameter"). It must be refused by name,
    the caller's model get its requires_grad flags back (the merge ended its training), and a new trainer over the
    model loaded again resume the run to the model a run that never failed writes."""
    pytest.importorskip("peft")
    settings = dict(max_steps=2, save_every=1, lora=True, lora_rank=4, reference=reference)
    whole, _ = run(tmp_path, "whole", **settings)

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    tokenizer, model = byte_bpe_tokenizer(), tiny_llama(len(byte_bpe_tokenizer()))
    config = UnlearnConfig(output_dir=str(tmp_path / "stopped"), lr=1e-3, grad_accum=2, progress=False, **settings)
    trainer = UnlearningTrainer(model, tiny_streams(tokenizer), config, tokenizer=tokenizer)
    monkeypatch.setattr(trainer_module, "save_model", disk_full)
    with pytest.raises(OSError, match="No space left"):
        trainer.train()
    monkeypatch.undo()
    assert all(p.requires_grad for p in model.parameters())
    trainer.config = dataclasses.replace(config, resume=True)
    with pytest.raises(RuntimeError, match="holds no LoRA adapter to train.*new UnlearningTrainer"):
        trainer.train()
    resumed, summary = run(tmp_path, "stopped", resume=True, **settings)
    assert summary.steps == 2 and (tmp_path / "stopped" / "model").is_dir()
    for (name, a), (_, b) in zip(whole.model.named_parameters(), resumed.model.named_parameters()):
        assert torch.equal(a, b), name


def test_a_run_whose_run_json_write_failed_is_not_finished_and_a_resume_writes_it(tmp_path, monkeypatch):
    """The run's record, run.json, was written after model/, whose presence marks a run finished: where it failed (a
    full disk) the directory held a model without its record (tokens, FLOPs, skipped examples) and its half-written
    .tmp-run.json for good, as a resume was refused ("already holds a finished model"). run.json is now written first,
    so such a run is not finished, and its resume writes both and removes the temporary."""
    real = trainer_module.write_text_atomic

    def disk_full_at_run_json(path, text):
        if os.path.basename(path) != "run.json":
            return real(path, text)
        with open(os.path.join(os.path.dirname(path), ".tmp-run.json"), "w") as f:
            f.write(text[:10])   # what the write got onto the disk before it filled up
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(trainer_module, "write_text_atomic", disk_full_at_run_json)
    with pytest.raises(OSError, match="No space left"):
        run(tmp_path, max_steps=2, save_every=1)
    monkeypatch.undo()
    assert not (tmp_path / "run" / "model").exists()
    assert run(tmp_path, max_steps=2, save_every=1, resume=True)[1].steps == 2
    assert json.loads((tmp_path / "run" / "run.json").read_text())["steps"] == 2
    assert (tmp_path / "run" / "model").is_dir() and not (tmp_path / "run" / ".tmp-run.json").exists()


def test_lora_targets_the_model_lacks_are_named_and_all_linear_is_taken(tmp_path):
    """GPT-2, NeoX, Falcon and Phi-3 have no q_proj: PEFT's error did not say which setting chose the modules; and
    PEFT takes its "all-linear" shorthand only as a string, not in the list the config holds."""
    pytest.importorskip("peft")
    with pytest.raises(ValueError, match=r"lora_targets \(--lora-targets\) \['c_attn'\]: .*c_attn"):
        run(tmp_path, "missing", lora=True, lora_targets=["c_attn"], max_steps=1)
    trainer, summary = run(tmp_path, "all", lora=True, lora_targets="all-linear", lora_rank=4, max_steps=1)
    adapter = json.loads((tmp_path / "all" / "adapter" / "adapter_config.json").read_text())
    adapted = {name.rsplit(".", 1)[-1] for name in adapter["target_modules"]}
    assert summary.steps == 1 and {"q_proj", "up_proj", "down_proj"} <= adapted, adapter["target_modules"]


# What a step waits for on a GPU (grad_accum=2, counted by tests/sync_counter.py), and why each remains:
# - the step's ONE read of its values (the early stop and the log need the loss terms on the host every step; the
#   finite check and the compute counts ride in the same copy);
# - per op call, the fused losses' forward finds its live rows (nonzero: their number sizes the matmuls; the cross
#   entropy's target check rides in it); the backward knows their number from the forward, without a wait;
# - per decoder forward on rows with padding (here the reference's: the policy's rows run packed, on a 4-D mask that
#   transformers takes as it is), transformers' causal mask looks at the attention mask twice (masking_utils);
# - reference='cached': none for the check that the frozen lm_head still holds the cache's values, which fingerprints
#   it (a read and a wait) only at its first call or where the weight was written since (reference.py).
# Counted on the host instead: lengths, answer positions (no boolean masks on the device) and token counts.
_STEP_SYNCS = {
    "copy": {"nonzero.default @ fastalign/ops/token_rows.py": 4,
             "_local_scalar_dense.default @ fastalign/unlearn/models.py": 4,
             "tolist @ fastalign/unlearn/trainer.py": 1},
    "cached": {"nonzero.default @ fastalign/ops/token_rows.py": 4,
               "tolist @ fastalign/unlearn/trainer.py": 1},
}
_STEP_SYNCS["adapter"] = _STEP_SYNCS["copy"]


@pytest.mark.parametrize("settings", [{}, {"reference": "cached"}, {"lora": True, "lora_rank": 4}],
                         ids=["copy", "cached", "adapter"])
def test_a_step_waits_for_the_device_only_where_the_host_needs_a_value(tmp_path, settings):
    from tests.sync_counter import SyncCounter
    tokenizer, steps = byte_bpe_tokenizer(), []
    config = UnlearnConfig(output_dir=str(tmp_path / "run"), max_steps=3, lr=1e-3, grad_accum=2, progress=False,
                           **settings)
    trainer = UnlearningTrainer(tiny_llama(len(tokenizer)), tiny_streams(tokenizer), config)
    counter = SyncCounter(trainer.model)
    trainer.step_callback = lambda record: (steps.append(counter.by_file()), counter.reset())
    with counter:
        trainer.train()
    # the first step also checks that the fused losses reproduce the model's logits (once per run)
    assert steps[1:] == [_STEP_SYNCS[config.reference_mode]] * 2


def test_a_model_given_in_eval_mode_trains_with_its_dropout(tmp_path):
    """from_pretrained returns a model in eval mode: the trainer puts it in train mode, else the model's dropout
    would silently never draw, and the run would be the one without dropout."""
    tokenizer = byte_bpe_tokenizer()

    def trained(name, eval_mode, dropout=0.5):
        model = tiny_llama(len(tokenizer))
        for layer in model.model.layers:
            layer.self_attn.attention_dropout = dropout
        config = UnlearnConfig(output_dir=str(tmp_path / name), lr=1e-2, max_steps=2, progress=False)
        trainer = UnlearningTrainer(model.eval() if eval_mode else model, tiny_streams(tokenizer), config)
        trainer.train()
        return [p.detach().clone() for p in trainer.model.parameters()]

    in_train_mode = trained("train", False)
    assert all(torch.equal(a, b) for a, b in zip(in_train_mode, trained("eval", True)))
    assert not all(torch.equal(a, b) for a, b in zip(in_train_mode, trained("no-dropout", False, dropout=0.0)))


def test_an_infinite_loss_stops_the_step_before_it_trains(tmp_path, monkeypatch):
    """An infinite loss (not only NaN) is not finite: the run stops before the optimizer steps with it."""
    real_forward, steps = UnlearningObjective.forward, []

    def forward(self, batch, *args):
        terms = real_forward(self, batch, *args)
        return terms._replace(total=terms.total + float("inf")) if steps == [1] else terms
    monkeypatch.setattr(UnlearningObjective, "forward", forward)
    with pytest.raises(FloatingPointError, match=r"step 2: the loss is not finite .*total=tensor\(inf"):
        run(tmp_path, max_steps=3, grad_accum=1, callback=lambda record: steps.append(record.step))
    assert steps == [1] and not (tmp_path / "run" / "model").exists()


@pytest.mark.parametrize("reference", ["copy", "cached"])
def test_the_first_steps_kl_is_zero_in_fp32(tmp_path, reference):
    """Before the first update the policy is the reference: in fp32 the first step's KL is 0 to rounding. A frozen
    copy (or cache) in another dtype than the policy's would make P another model (KL > 0 from the start)."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(byte_bpe_tokenizer()), hidden_size=64, intermediate_size=128,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                         max_position_embeddings=256))
    with torch.no_grad():  # peaked next-token distributions, as a trained model has
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(8.0)
    records = []
    run(tmp_path, model=model, callback=records.append, max_steps=1, grad_accum=1, lr=0.0, reference=reference,
        max_forget_nll=None)
    assert abs(records[0].normal_kl) < 1e-5


def test_a_run_keeps_the_checkpoints_its_config_says(tmp_path):
    """keep_checkpoints reaches the checkpoint writer: 1 keeps only the last checkpoint, 3 keeps three."""
    for keep in (1, 3):
        run(tmp_path, f"keep{keep}", max_steps=5, grad_accum=1, save_every=1, keep_checkpoints=keep)
        names = os.listdir(tmp_path / f"keep{keep}" / "checkpoints")
        assert sorted(n for n in names if n.startswith("step-"))[-1:] == ["step-000004"]
        assert len([n for n in names if n.startswith("step-")]) == keep, names


def test_each_log_line_counts_the_tokens_of_its_step(tmp_path):
    """A step's tokens (the log's and the step callback's) are the tokens its batch ran, whose sum is the run's."""
    tokenizer = byte_bpe_tokenizer()
    records = []
    _, summary = run(tmp_path, max_steps=3, grad_accum=1, callback=records.append)
    streams = tiny_streams(tokenizer)
    expected = [streams.batch(i).tokens.num_tokens for i in range(3)]
    assert [r.tokens for r in records] == [r["tokens"] for r in log_lines(tmp_path / "run")] == expected
    assert sum(expected) == summary.compute["tokens"]


def test_a_resume_from_a_checkpoint_lacking_a_trainable_weight_is_refused(tmp_path, monkeypatch):
    """A checkpoint without some trainable weight (loaded non-strictly) would resume with that weight as it was
    before training, silently: the resume is refused, naming it."""
    with pytest.raises(Killed):
        run(tmp_path, save_every=2, callback=kill_after(3))
    real_read = trainer_module.read_checkpoint

    def read_without_a_weight(*args, **kwargs):
        state, rank_state = real_read(*args, **kwargs)
        state["trainable"].pop("model.model.norm.weight")
        return state, rank_state
    monkeypatch.setattr(trainer_module, "read_checkpoint", read_without_a_weight)
    with pytest.raises(ValueError, match=r"lacks trainable parameter\(s\) \['model\.model\.norm\.weight'\]"):
        run(tmp_path, save_every=2, resume=True)


def test_a_resume_freezing_a_weight_its_checkpoint_trained_is_refused_naming_it(tmp_path):
    """A resume whose model freezes a weight the checkpoint trained (as a Ctrl-C that left LoRA layers disabled and
    frozen did: the retried run's optimizer got 12 of its 16 weights) loaded the others' optimizer state alone and
    trained on partly, silently: refused, naming the weight."""
    with pytest.raises(Killed):
        run(tmp_path, save_every=2, callback=kill_after(3))
    model = tiny_llama(len(byte_bpe_tokenizer()))
    model.model.norm.weight.requires_grad_(False)
    with pytest.raises(ValueError, match=r"holds parameter\(s\) \['model\.model\.norm\.weight'\] that the model does "
                                         "not train"):
        run(tmp_path, model=model, save_every=2, resume=True)


class QuantizedLinear(torch.nn.Linear):
    """A Linear storing its weight as `dtype` (int8 as bitsandbytes' Linear8bitLt, float8 as Hugging Face's FP8
    integrations) divided by a scale, which its forward multiplies back."""

    def __init__(self, linear, dtype):
        super().__init__(linear.in_features, linear.out_features, bias=False)
        scale = linear.weight.detach().abs().max() / 100
        self.weight = torch.nn.Parameter((linear.weight.detach() / scale).round().to(dtype), requires_grad=False)
        self.register_buffer("weight_scale", scale)

    def forward(self, x):
        return torch.nn.functional.linear(x, self.weight.to(x.dtype) * self.weight_scale.to(x.dtype))


def quantized_q_proj(dtype):
    """tiny_llama with each layer's q_proj a QuantizedLinear of `dtype`."""
    model = tiny_llama(len(byte_bpe_tokenizer()))
    for layer in model.model.layers:
        layer.self_attn.q_proj = QuantizedLinear(layer.self_attn.q_proj, dtype)
    return model


def test_a_float8_base_weight_trains_under_lora_and_a_nan_in_it_is_named(tmp_path):
    """A QLoRA-like base with float8 q_proj weights: the trainer's check that every weight is finite called
    torch.isfinite, which torch does not implement for float8, and failed naming no parameter. It trains (LoRA on
    v_proj), and a NaN in a float8 weight is named."""
    pytest.importorskip("peft")
    lora = {"lora": True, "lora_rank": 4, "lora_targets": ["v_proj"], "max_steps": 1, "grad_accum": 1}
    assert run(tmp_path, model=quantized_q_proj(torch.float8_e4m3fn), **lora)[1].steps == 1
    model = quantized_q_proj(torch.float8_e4m3fn)
    model.model.layers[1].self_attn.q_proj.weight.data[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"model parameter model.layers.1.self_attn.q_proj.weight holds NaN"):
        run(tmp_path, name="nan", model=model, **lora)


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.int8])
def test_a_lora_target_the_adapter_cannot_be_merged_into_is_refused_naming_it(tmp_path, dtype):
    """A LoRA target whose weight is int8 (bitsandbytes-like) or float8: the run trained to the end, then failed in
    PEFT's merge_and_unload ("result type Float can't be cast to ... Char"), which writes model/. Refused when the
    trainer is made, naming the layer and its dtype."""
    pytest.importorskip("peft")
    with pytest.raises(ValueError, match=rf"the LoRA layer model.layers.0.self_attn.q_proj wraps a {dtype} weight"):
        run(tmp_path, model=quantized_q_proj(dtype), lora=True, lora_rank=4, lora_targets=["q_proj"], max_steps=1,
            grad_accum=1)
    assert not os.path.exists(tmp_path / "run")


def test_a_lora_layer_of_peft_for_quantized_weights_is_left_to_its_own_merge():
    """Only PEFT's generic LoRA layers (peft.tuners.lora.layer) add the adapter into the weight as stored; its layers
    for bitsandbytes, HQQ or torchao weights (peft.tuners.lora.bnb, ...) dequantize, merge and quantize again, so an
    int8 weight under one of them is mergeable and must not be refused."""
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(quantized_q_proj(torch.int8), peft.LoraConfig(r=4, target_modules=["v_proj"]))
    check_mergeable_adapter(model)
    layer = model.base_model.model.model.layers[0].self_attn.v_proj
    # a LoRA layer of PEFT's bitsandbytes module, stood in for (bitsandbytes needs CUDA): its base weight is int8
    layer.base_layer.weight = torch.nn.Parameter(layer.base_layer.weight.detach().to(torch.int8), requires_grad=False)
    layer.__class__ = type("Linear8bitLt", (type(layer),), {"__module__": "peft.tuners.lora.bnb"})
    check_mergeable_adapter(model)
    type(layer).__module__ = "peft.tuners.lora.layer"   # the generic layer's: refused
    with pytest.raises(ValueError, match=r"the LoRA layer model.layers.0.self_attn.v_proj wraps a torch.int8 weight"):
        check_mergeable_adapter(model)
