"""One of two (or three) gloo processes on the CPU that run the multi-process trainer scenarios of
test_distributed.py, one after another in one process group (starting the processes costs more than all
the training): argv = output root, then scenario names. Each scenario trains the tiny model for two steps
in <root>/<scenario> and writes outcome-rank<r>.txt: "ok", or the type and message of what it raised, and
units.json: the names of the modules that are FSDP units (checked by the test: the premise of a scenario).

accelerate chooses FSDP only on accelerator devices and DDP on the CPU; the FSDP scenarios build its
FSDP plugin and select DistributedType.FSDP themselves, after which accelerate's own FSDP code (prepare
with fully_shard / FullyShardedDataParallel, no_sync, backward, reduce) runs as it would on GPUs.
"""
import dataclasses
import json
import os
import shutil
import sys

import torch
from accelerate import Accelerator, FullyShardedDataParallelPlugin
from accelerate.state import AcceleratorState
from accelerate.utils import DistributedType
from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel

from fastalign.unlearn.config import UnlearnConfig
from fastalign.unlearn.objective import UnlearningObjective
from fastalign.unlearn.trainer import UnlearningTrainer
from tests.unlearn.tiny import byte_bpe_tokenizer, tiny_llama, tiny_streams

# Shared with test_distributed.py: what every scenario trains, with a checkpoint after step 1, on streams
# with one normal row per batch (the two processes then hold different numbers of normal tokens, so a
# per-process KL mean would differ from the global one).
SETTINGS = {"max_steps": 2, "lr": 1e-3, "progress": False, "save_every": 1}


def streams():
    return tiny_streams(byte_bpe_tokenizer(), normal_batch_size=1)


# fsdp2, fsdp1: decoder layers get a unit each (the objective passes on the model's _no_split_modules), the
# rest, lm_head included, is the root unit. fsdp2_head_unit: every Linear, lm_head included, a unit of its own.
# fsdp1_flat: FSDP1 as its plugin and `accelerate launch --fsdp_use_orig_params false` configure it, each unit's
# weights flattened into one parameter; fsdp1_flat_root: so, without auto wrap (one unit: the model keeps no
# parameter of its own).
FSDP_PLUGINS = {
    "fsdp2": dict(fsdp_version=2, auto_wrap_policy="transformer_based_wrap"),
    "fsdp2_head_unit": dict(fsdp_version=2, auto_wrap_policy="transformer_based_wrap",
                            transformer_cls_names_to_wrap=["LlamaDecoderLayer", "Linear"]),
    "fsdp1": dict(fsdp_version=1, auto_wrap_policy="transformer_based_wrap", use_orig_params=True),
    "fsdp1_flat": dict(fsdp_version=1, auto_wrap_policy="transformer_based_wrap", use_orig_params=False),
    "fsdp1_flat_root": dict(fsdp_version=1, use_orig_params=False),
}


def accelerator(kind: str, mixed_precision: str = "no") -> Accelerator:
    AcceleratorState._reset_state()  # a fresh accelerate configuration; the process group stays
    acc = Accelerator(mixed_precision=mixed_precision)
    if kind != "ddp":
        acc.state.distributed_type = DistributedType.FSDP
        acc.state.fsdp_plugin = FullyShardedDataParallelPlugin(**FSDP_PLUGINS[kind])
        if mixed_precision != "no":
            acc.state.fsdp_plugin.set_mixed_precision(mixed_precision)  # as accelerate does when it picks FSDP
        # accelerate's CPU device is cpu:0, which FSDP1 rejects as inconsistent with its compute device "cpu".
        acc.state.device = torch.device("cpu")
    return acc


def train(root, name, kind, model=None, **settings):
    tokenizer = byte_bpe_tokenizer()
    config = UnlearnConfig(output_dir=os.path.join(root, name), **{**SETTINGS, **settings})
    acc = accelerator(kind, "bf16" if config.precision == "bf16-mixed" else "no")
    trainer = UnlearningTrainer(model or tiny_llama(len(tokenizer)), streams(), config, accelerator=acc)
    try:
        trainer.train()
    finally:
        record_units(os.path.join(root, name), trainer.model, acc)
    return acc


def record_units(path, model, acc):
    units = [name for name, m in model.named_modules() if isinstance(m, (FSDPModule, FullyShardedDataParallel))]
    if acc.is_main_process:
        with open(os.path.join(path, "units.json"), "w") as f:
            json.dump(units, f)


def resumed(root, name, kind, **settings):
    """Trains (accumulating 2 micro-batches) with a checkpoint after step 1, keeps the model, then resumes
    from that checkpoint and trains step 2 again."""
    acc = train(root, name, kind, grad_accum=2, **settings)
    if acc.is_main_process:
        shutil.move(os.path.join(root, name, "model"), os.path.join(root, name, "model-uninterrupted"))
    acc.wait_for_everyone()
    train(root, name, kind, grad_accum=2, resume=True, **settings)


def scale_head_shard_after_step_1(model):
    """Changes process 0's shard of the lm_head weight in place (the other process's shard is untouched)."""
    def callback(record):
        if record.step == 1:
            with torch.no_grad():
                model.lm_head.weight.to_local().mul_(1.01)
    return callback


def poison_process_1_at_step_2():
    """Makes process 1's loss NaN from the second step on; process 0's stays finite."""
    forward, calls = UnlearningObjective.forward, []

    def poisoned(self, batch, normal_denominator=None):
        terms = forward(self, batch, normal_denominator)
        calls.append(1)
        if torch.distributed.get_rank() == 1 and len(calls) >= 2:
            terms = terms._replace(total=terms.total * float("nan"))
        return terms
    UnlearningObjective.forward = poisoned
    return lambda: setattr(UnlearningObjective, "forward", forward)


def run(root, scenario):
    if scenario in ("ddp", "fsdp2", "fsdp1", "fsdp1_flat_root"):
        train(root, scenario, scenario)
    elif scenario == "fsdp2_head_unit":
        resumed(root, scenario, scenario)
    elif scenario in ("ddp_resume", "fsdp2_resume"):
        resumed(root, scenario, scenario.removesuffix("_resume"))
    elif scenario == "fsdp2_bf16":   # bf16 weights, sharded: KahanAdamW steps each process's shards
        resumed(root, scenario, "fsdp2_head_unit", precision="bf16", lr=2e-5)
    elif scenario in ("fsdp1_bf16", "fsdp1_flat_bf16"):   # FSDP1's shards of each weight, or of its flat parameters
        train(root, scenario, scenario.removesuffix("_bf16"), precision="bf16", lr=2e-5)
    elif scenario == "fsdp2_head_unit_grads_in_forward":
        train(root, scenario, "fsdp2_head_unit", grads_in_forward=True)
    elif scenario == "fsdp2_cached":
        train(root, scenario, "fsdp2", reference="cached")
    elif scenario == "fsdp1_flat_cached":
        train(root, scenario, "fsdp1_flat", reference="cached")
    elif scenario == "fsdp1_cached":
        train(root, scenario, "fsdp1", reference="cached")
    elif scenario == "fsdp2_train_again":   # a second train() on the trainer whose first one sharded the model
        config = UnlearnConfig(output_dir=os.path.join(root, scenario), **SETTINGS)
        trainer = UnlearningTrainer(tiny_llama(len(byte_bpe_tokenizer())), streams(), config,
                                    accelerator=accelerator("fsdp2"))
        trainer.train()
        trainer.config = dataclasses.replace(config, resume=True)
        trainer.train()
    elif scenario == "fsdp2_cached_bf16":
        train(root, scenario, "fsdp2", reference="cached", precision="bf16-mixed")
    elif scenario == "fsdp2_bf16_reference_kl":   # step 1's KL, before any update, with each reference
        for mode in ("copy", "cached"):
            model = tiny_llama(len(byte_bpe_tokenizer()))
            with torch.no_grad():   # peaked next-token distributions, as a trained model's, make P's errors show
                for p in model.parameters():
                    p.mul_(8.0 if p.dim() == 2 else 1.0)
            train(root, os.path.join(scenario, mode), "fsdp2", model=model, reference=mode, precision="bf16-mixed",
                  max_steps=1, lr=0.0)
    elif scenario == "fsdp2_cached_head_changed":
        tokenizer = byte_bpe_tokenizer()
        config = UnlearnConfig(output_dir=os.path.join(root, scenario), reference="cached", **SETTINGS)
        trainer = UnlearningTrainer(tiny_llama(len(tokenizer)), streams(), config, accelerator=accelerator("fsdp2"))
        trainer.step_callback = scale_head_shard_after_step_1(trainer.model)
        trainer.train()
    elif scenario == "ddp_lora_bf16":  # every process reports what the merge lost, the main one saves
        config = UnlearnConfig(output_dir=os.path.join(root, scenario), lora=True, lora_rank=4, precision="bf16",
                               **{**SETTINGS, "lr": 1e-5})
        summary = UnlearningTrainer(tiny_llama(len(byte_bpe_tokenizer())), streams(), config,
                                    accelerator=accelerator("ddp")).train()
        with open(os.path.join(root, scenario, f"merge-rank{torch.distributed.get_rank()}.json"), "w") as f:
            json.dump(summary.merge_rounding_error, f)
    elif scenario == "nonfinite":
        restore = poison_process_1_at_step_2()
        try:
            train(root, scenario, "ddp")
        finally:
            restore()
    else:
        raise ValueError(f"unknown scenario {scenario}")


if __name__ == "__main__":
    torch.set_num_threads(1)
    root, scenarios = sys.argv[1], sys.argv[2:]
    rank = int(os.environ["RANK"])
    for scenario in scenarios:
        try:
            run(root, scenario)
            outcome = "ok"
        except Exception as e:  # recorded for the test, which checks every process raised the same
            outcome = f"{type(e).__name__}: {e}"
        os.makedirs(os.path.join(root, scenario), exist_ok=True)
        with open(os.path.join(root, scenario, f"outcome-rank{rank}.txt"), "w") as f:
            f.write(outcome)
    # a process group left to the interpreter's exit can abort it ("terminate called without an active exception")
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    # and so, rarely, can the interpreter's own teardown after that (seen once in CI, every outcome written):
    # nothing is left to do, so the process ends without it
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
