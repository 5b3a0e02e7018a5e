"""The unlearning training loop: AdamW (optimizer.py) with a linear schedule, gradient accumulation, early stop on the
forget NLL, optional LoRA, bf16, gradient checkpointing, atomic checkpoints and an exact resume; in one process
without accumulation, AdamW stepping each weight inside the backward (optimizer_in_backward, backward_step.py).

The same code runs in one process or under `accelerate launch` (DDP, FSDP 1 or 2): the objective module
(policy + fused losses) is what accelerate wraps, and each process draws its own rows of every step (see
streams.py). A step is one global batch: its forget and mismatch terms are means over all its sequences and
its KL term the mean over all its normal answer tokens, across micro-batches and processes alike (the
token count is all-reduced before the forward). A non-finite loss on any process stops every process with
the same error before the optimizer step, so none is left waiting at the next collective; so do weights that a
gradient not finite with a finite loss left NaN or inf, found at the next step's non-finite loss or before the
last step's model/ is written. The loop itself reads
the device once a step, for its values (_step_values). Checkpoints and the saved model hold full
(unsharded) tensors whatever the wrapping. A resumed run restores the trainable weights, optimizer,
scheduler, step counter and torch's generators, and draws the same batches, so it ends bit-identical to a run that
was never interrupted; a resume with other settings, with other data (checkpoints record a digest of the
examples' token ids), with streams that draw otherwise (their seed, batch sizes, K, max_length), or with another
model put at the config's model path (a digest of its files), is refused.
"""
from __future__ import annotations

import contextlib
import itertools
import json
import os
import threading
import time
import warnings
from dataclasses import asdict, dataclass
from typing import Callable

import torch

from fastalign.base_model import base_causal_lm
from fastalign.model_context import model_positions
from fastalign.model_devices import ON_META, check_not_dispatched, warn_if_moved
from fastalign.model_files import model_files_digest
from fastalign.model_vocabulary import input_vocabulary
from fastalign.one_call import one_call_at_a_time
from fastalign.ops.backend import select_backend
from fastalign.unlearn.accelerator import (MIXED_PRECISION, accelerator_of_a_run, bucket_per_tensor, check_launch,
                                          released_when_done)
from fastalign.unlearn.backward_step import step_in_backward
from fastalign.unlearn.checkpoint import (atomic_directory, read_checkpoint, remove_stale_temporaries, resume_point,
                                          set_rng_state, torch_rng_state, truncate_log, write_checkpoint,
                                          write_text_atomic)
from fastalign.unlearn.compute import (ComputeTotals, ModelShape, batch_compute, cache_compute,
                                       decoder_matmul_weights)
from fastalign.unlearn.config import UnlearnConfig
from fastalign.unlearn.extras import require
from fastalign.unlearn.layer_stand_ins import fused_layers
from fastalign.unlearn.lora_merge import merge_rounding_error, warn_of_a_lossy_merge
from fastalign.unlearn.models import (activation_checkpointing_settings, cast_weights, causal_lm_parts,
                                      check_activation_checkpointing, check_fused_logits, check_mergeable_adapter,
                                      check_no_stray_adapter, check_trainable_dtypes, enable_activation_checkpointing,
                                      finite, restore_activation_checkpointing)
from fastalign.unlearn.objective import UnlearningObjective
from fastalign.unlearn.optimizer import adamw
from fastalign.unlearn.packing import packing_unavailable
from fastalign.unlearn.reference import AdapterDisabledReference, CachedReference, FrozenCopyReference
from fastalign.unlearn.saving import save_adapter, save_model
from fastalign.unlearn.sharding import (check_flat_units, check_trainable_names, full_model_state, load_optimizer_state,
                                        load_trainable_state, optimizer_state, trainable_state)
from fastalign.unlearn.streams import UnlearningBatch, UnlearningStreams
from fastalign.writable import naming_a_full_disk

# Settings that may change between a run and its resumption; any other change would alter the result.
# output_dir is where the checkpoint was found, whatever it is called now (moved, or given another way).
_RESUMABLE_CHANGES = {"max_steps", "save_every", "keep_checkpoints", "progress", "log_every", "resume", "output_dir",
                      "optimizer_in_backward"}   # (the same updates either way)
# what every checkpoint's state.pt holds that a resume reads; num_processes, model_files and last, recorded since but
# before the fused_layers setting, are read once its config holds every setting, the others where present
_STATE_KEYS = ("step", "config", "compute", "trainable", "optimizer", "scheduler")
# Settings that name files: the same file spelled otherwise (relative or absolute, ./, a trailing /) resumes, as the
# checkpoint's digests of the model files and the data tell whether the files themselves changed
_PATH_SETTINGS = {"model", "forget", "normal", "mismatch_pool"}


@dataclass
class StepRecord:
    """What one optimizer step did (terms averaged over micro-batches and processes); one line of log.jsonl. A term
    whose rows the streams do not draw (no normal rows or normal_batch_size=0; no mismatch pool or
    mismatch_per_prompt=0; load_streams leaves out the rows of a term of weight 0) is not computed: None (null in the
    log); a term the streams draw rows for is a number, its weight 0 or not (0.0 is a term computed as zero)."""

    step: int
    loss: float
    forget_nll: float
    mismatch_nll: float | None
    normal_kl: float | None
    lr: float
    tokens: int
    flops: float
    seconds: float


@dataclass
class RunSummary:
    """The outcome of a run, also written to <output_dir>/run.json."""

    steps: int
    stop_reason: str
    last: StepRecord | None
    compute: dict
    num_processes: int
    device: str
    model_dir: str | None
    skipped_examples: dict
    answers_cut: dict  # forget and normal examples whose answer max_length cut short (UnlearningStreams.answers_cut)
    adapter_dir: str | None = None  # LoRA: the unmerged adapter, the update exactly as trained
    merge_rounding_error: float | None = None  # LoRA: the share of the update the merge into model/ lost
    # reference='cached': the bytes its hidden states held through the run, on the device or (reference_cache='host')
    # in host memory (they grow with the normal set's answer tokens x hidden size, and no step's memory shows them)
    reference_cache_bytes: int | None = None
    # why the policy's forward could not run packed rows for this model (packing='auto' then ran padded ones), or None
    packing_unavailable: str | None = None
    # whether AdamW stepped each weight inside the backward (the config's optimizer_in_backward, or where it left it
    # unset, whether the run could: one process, no FSDP, grad_accum=1)
    optimizer_in_backward: bool = False
    # the optimizer's class: KahanAdamW where weights train in bf16 (their updates compensated), else AdamW
    optimizer: str = "AdamW"
    # how the streams drew the batches (UnlearningStreams.draw_settings: batch sizes, K, max_length, seed), which
    # config.json's settings of those names need not be: a trainer given streams built otherwise draws as they do
    draws: dict | None = None


def _same_setting(name: str, recorded, value, recorded_in: str) -> bool:
    """Whether a resume's setting `name` is the interrupted run's `recorded` one: equal, or for a path setting the
    same normalised absolute path(s), the recorded ones resolved against `recorded_in` (the interrupted run's working
    directory, where it read them), `value`'s against this process's. (A path spelled the same is the same setting,
    as a Hub model id is: the checkpoint's digests of the data and the model files tell whether the files differ.)"""
    if recorded == value or name not in _PATH_SETTINGS or not recorded or not value:
        return recorded == value

    def absolute(paths, directory):
        def resolve(path):   # (an absolute path stays as it is)
            return os.path.normpath(os.path.join(directory, path))
        return [resolve(p) for p in paths] if isinstance(paths, list) else resolve(paths)
    return absolute(recorded, recorded_in) == absolute(value, os.getcwd())


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type


class UnlearningTrainer:
    """Trains `model` (a transformers causal LM) on `streams` with the settings of `config`.

    config.output_dir receives checkpoints/, log.jsonl, run.json and, at the end, model/ (LoRA merged in) and,
    with LoRA, adapter/ (PEFT's save_pretrained before the merge, naming the base model by a Hub id only:
    saving.save_adapter; PeftModel.from_pretrained(base, adapter/) is the trained model, where model/ lost the part
    of the update its weights' precision rounds away; the share lost is run.json's merge_rounding_error, and a
    warning names it above lora_merge.MERGE_ERROR_WARNING).
    step_callback(record) runs on the main process after every step.
    `accelerator` must compute in the mixed precision config.precision names; without one the trainer makes its own,
    which shares the process's accelerate state with an Accelerator of the caller's in that precision and refuses one
    of another precision (see accelerator.new_accelerator): it does not switch the caller's training to its own. While
    a trainer's constructor or run of this process computes in its own state (a trainer built or trained from a
    step_callback, or in another thread), one of another mixed precision is refused with a RuntimeError: run them one
    after the other (one of the same mixed precision shares the state). The constructor makes it for its checks, and
    each train() its own again; when either ends (refused, finished or failed) it resets the accelerate state it made
    (not one it shared) unless another block still computes in it, so that an Accelerator the caller makes afterwards
    may compute in another precision; trainer.accelerator (and an Accelerator made while the trainer's state was the
    process's, sharing it) is unusable from then on, outside train(). A run takes what it prepared out of
    the accelerator when it ends, finished or failed, and leaves the rest (the objects the caller prepared on it, its
    step) as it was.
    The constructor checks the model as train() prepares it (cast for precision 'bf16', wrapped for LoRA, its weights
    frozen but the adapter's, the lm_head frozen for the cached reference, moved to the accelerator's device), then
    gives it back: the caller's model, trainer.model until train(), holds no LoRA layer and each weight keeps its
    requires_grad flag (a trainer never trained leaves none of its changes), but stays cast and moved (the bf16 cast
    rounds its weights for good). A model it refuses is left as given, but at precision 'bf16' for lora_targets that
    PEFT finds in no module and for a LoRA adapter on input embeddings tied to the lm_head (whose merge would change
    the lm_head too), refused after the cast. Each train() prepares the model (trainer.model is then LoRA's PeftModel).
    A finished run gives the model (trained in place, LoRA merged in) its requires_grad flags back (a LoRA run, once it
    merged its adapter in, even where writing model/ then fails); a train() that ends with an exception (a refusal
    included) before any weight stepped gives the model back as the constructor left it (the LoRA layers taken out,
    the flags given back), and the next train() on the trainer prepares it again. A trainer with lora=False refuses a
    model holding PEFT adapter layers outside a PeftModel, naming them, as it would train those alone. Each train()
    runs its steps in train mode, with activation checkpointing where config.gradient_checkpointing asks for it, and
    when it ends, finished or failed, gives each module of the caller's model its mode (train or eval) back, its
    checkpointing as found (each module's flag and function: off, or on with the model's own options, such as
    use_reentrant=True), and turns the input-grads hook transformers registers with checkpointing off again where the
    model was given without it.
    One train() runs at a time on a trainer: one called while another runs, from another thread or from the
    step_callback, is refused with a RuntimeError (the two would train one model with one optimizer into one
    output_dir); one called after the last returned runs (after an exception, a resume: see resume_point), but it is
    refused with a RuntimeError (retry with a new trainer over the model loaded again) under FSDP, whose first train()
    sharded the model in place; after a LoRA run that merged its adapter into the weights in place to write model/,
    even where that write then failed; and after an exception that stopped a run whose steps had already changed the
    weights where output_dir holds no checkpoint to resume from (save_every=0, or before the first one): the weights
    the run started from are gone (keeping a copy would cost a model's memory), so train with save_every to make such
    a failure resumable on the same trainer.
    Torch's global generator is seeded with config.seed when the trainer is constructed (LoRA's initialisation draws
    from it), and train() starts dropout where that left it, whatever was drawn in between; a step_callback that draws
    from it changes the dropout of the steps after it (a resume restores the generator as its checkpoint found it).
    The generators are the process's: run one trainer at a time per process, not one per thread.
    """

    def __init__(self, model, streams: UnlearningStreams, config: UnlearnConfig, *, tokenizer=None,
                 accelerator=None, step_callback: Callable[[StepRecord], None] | None = None):
        if not config.output_dir:
            raise ValueError("config.output_dir must name the directory for checkpoints, logs and the model")
        lm_head = causal_lm_parts(model)[1]
        streams.check_context(model_positions(model))
        streams.check_vocabulary(input_vocabulary(model), lm_head.weight.shape[0])
        for name, p in model.named_parameters():
            if p.is_meta:   # else "Tensor.item() cannot be called on meta tensors" below, or model.to()'s error
                raise ValueError(f"model parameter {name} is {ON_META}: the trainer trains every weight on the "
                                 "accelerator's device; load the whole model without offloading")
            if not bool(finite(p)):
                raise ValueError(f"model parameter {name} holds NaN or infinite values")
        self.config, self.streams, self.tokenizer, self.step_callback = config, streams, tokenizer, step_callback
        self._own_accelerator = accelerator is None   # made again by each train(), whose end resets its state
        self.accelerator = accelerator
        # the checks' accelerator: the trainer's own, made for them, resets the accelerate state it made when they
        # end, refused or not: a trainer refused, or built and not trained (--check), left it to refuse an
        # Accelerator of the caller's in another precision (train() makes its own again)
        with self._accelerator_of_a_block() as self.accelerator:
            check_launch(self.accelerator, config.precision)
            # the losses' backend on the accelerator's device (backend='triton' needs CUDA): refused now, not at the
            # first step, once train() has written config.json
            select_backend("linear_cross_entropy", config.backend, self.accelerator.device)
            check_not_dispatched(model, self.accelerator.device)
            warn_if_moved({p.device for p in model.parameters()}, self.accelerator.device)
            self.sharded = self.accelerator.distributed_type == "FSDP"  # accelerate's DistributedType is a str enum
            if self.sharded and config.lora:
                raise NotImplementedError("lora=True under FSDP is not supported (the adapter could not be merged "
                                          "into sharded weights); LoRA's trainable weights are small: use DDP")
            if config.optimizer_in_backward is True and (self.accelerator.num_processes != 1 or self.sharded):
                raise ValueError(f"optimizer_in_backward (--optimizer-in-backward) needs one process without FSDP: "
                                 f"under {self.accelerator.num_processes} the gradients are reduced across them after "
                                 "the backward, where it would already have stepped on each process's own")
            # AdamW inside the backward (backward_step.py) where nothing reads several gradients together: it steps
            # the same weights, and the model's gradients never all exist at once
            self.optimizer_in_backward = (config.optimizer_in_backward if config.optimizer_in_backward is not None
                                          else self.accelerator.num_processes == 1 and not self.sharded
                                          and config.grad_accum == 1)
            # the model prepared as train() will prepare it, for the checks only that refuse it now (the LoRA targets,
            # the adapter's merge): given back at once, so that a trainer never trained leaves no LoRA layer or frozen
            # weight in the caller's model (train() prepares it again, and gives it back as a finished run's end does)
            prepared = self._prepare_model(model)
            # where a fresh run's dropout starts drawing, LoRA's initialisation drawn (train() goes back to it: a
            # caller's own draws in between must not change the run)
            self._fresh_rng = torch_rng_state(self.accelerator.device)
        self.shape = ModelShape.of(prepared)   # (LoRA's matrices count)
        self.model = self._given_back_model(prepared)
        self.setup_compute = ComputeTotals()  # what building the reference cost (the cached one: a forward)
        self.reference_cache_bytes = None  # what the cached reference holds (RunSummary.reference_cache_bytes)
        self._digest = None   # of the streams' data, recorded in checkpoints (_data_digest)
        # of the files at config.model (None for a model not loaded from a directory), recorded in checkpoints
        self._model_files = model_files_digest(config.model) if config.model else None
        # (the reference,) once built: a train() run again after an exception (a resume in this process) compares
        # with the policy the first one started from, not with the weights that one left behind
        self._built_reference = None
        self.packer = None    # the objective's RowPacker, once train() built it: how each batch's forward ran
        self._prepared = False   # whether a train() gave the model to accelerate's prepare (FSDP shards it in place)
        self._merged = False   # whether a LoRA run merged its adapter into the weights in place (_finish)
        # whether the model is as given (the constructor, or a train() that stepped no weight, gave it back): the next
        # train() prepares it
        self._given_back = True
        # whether a train() that did not finish stepped the weights: a later one can restore them from a checkpoint only
        self._stepped = False
        self._busy = threading.Lock()   # held by the running train() (see one_call_at_a_time)

    def _prepare_model(self, model):
        """`model` made ready to train as the config says, the checks of what it will train done first: a refusal
        leaves the caller's model as it was given (the bf16 cast rounds its weights for good)."""
        check_fused_logits(model)  # (before train() writes anything)
        config, head = self.config, causal_lm_parts(model)[1]
        if not config.lora:
            check_no_stray_adapter(model)
        if config.packing == "on":   # (the one mode refused; train()'s RowPacker probes the model it runs again)
            packing_unavailable(model, "on")
        new_adapter = self._new_adapter = config.lora and not hasattr(model, "disable_adapter")
        # (LoRA freezes the base weights, the cached reference the lm_head: _finish gives the model its flags back, and
        # _given_back_model where a run stepped no weight)
        self._given_requires_grad = [(p, p.requires_grad) for p in model.parameters()]
        self._given_modules = list(model.modules())   # (the caller's, not LoRA's: _train_mode gives their modes back)
        try:   # a refusal gives the flags back (the cached reference's frozen head, below)
            if config.reference_mode == "cached":
                head.requires_grad_(False)  # the cache is valid only for this head (weight, bias)
            if config.precision != "bf16" and not new_adapter:  # (bf16 trains bfloat16 weights, LoRA float32 ones)
                check_trainable_dtypes(model)
            if self.sharded:   # (under FSDP there is no LoRA to freeze the base weights)
                check_flat_units(model, self.accelerator.state.fsdp_plugin)
            torch.manual_seed(config.seed)  # LoRA initialisation draws from it
            if config.precision == "bf16":
                model = cast_weights(model, torch.bfloat16)
            if new_adapter:
                peft = require("peft")
                # PEFT takes its shorthand ("all-linear") as a string only
                targets = config.lora_targets[0] if config.lora_targets == ["all-linear"] else list(config.lora_targets)
                try:
                    with warnings.catch_warnings():   # PEFT reads transformers' deprecated name: not the user's code
                        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated",
                                                category=FutureWarning)
                        model = peft.get_peft_model(model, peft.LoraConfig(
                            r=config.lora_rank, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                            target_modules=targets))
                except ValueError as e:   # e.g. GPT-2 has no q_proj: name the setting that chose them
                    raise ValueError(f"lora_targets (--lora-targets) {config.lora_targets}: {e}") from None
            check_mergeable_adapter(model)   # (_finish merges the adapter into model/)
            if config.gradient_checkpointing:   # (each train() enables it for its run: _train_mode)
                check_activation_checkpointing(model)
        except Exception:
            self._given_back_model(model)
            raise
        return model.to(self.accelerator.device)

    def _given_back_model(self, model):
        """The caller's model as _prepare_model found it (but for precision 'bf16''s cast, which rounded its weights for
        good): the LoRA layers that get_peft_model put into it taken out, each weight's requires_grad flag given back
        (LoRA froze the base weights, the cached reference the lm_head)."""
        if self._new_adapter and hasattr(model, "unload"):
            model = model.unload()
        _set_requires_grad(self._given_requires_grad)
        return model

    def _reference(self):
        mode, model = self.config.reference_mode, self.model
        if not self.streams.normal:
            return None
        if mode == "copy":
            # The copy computes what the policy computes before training. bf16-mixed: the policy computes under
            # bf16 autocast, with its fp32 weights (one process, DDP: bf16 matmul weights suffice, see
            # FrozenCopyReference) or with all its weights gathered in bf16 (FSDP's mixed precision: a bf16 copy).
            # bf16: the policy's own weights are bf16 already.
            if self.config.precision != "bf16-mixed":
                return FrozenCopyReference(model)
            if self.sharded:
                return FrozenCopyReference(model, dtype=torch.bfloat16)
            return FrozenCopyReference(model, matmul_dtype=torch.bfloat16)
        if mode == "adapter":
            return AdapterDisabledReference(model)
        started = time.perf_counter()
        # computed as the policy's forward computes (bf16-mixed: under the bf16 autocast accelerate wraps it in,
        # and under FSDP with every weight gathered in bf16)
        mixed = self.config.precision == "bf16-mixed"
        with torch.autocast(self.accelerator.device.type, dtype=torch.bfloat16, enabled=mixed):
            reference = CachedReference(model, self.streams.normal, filler_id=self.streams.filler_id,
                                        storage=self.config.reference_cache,
                                        compute_dtype=torch.bfloat16 if mixed and self.sharded else None)
        self.setup_compute = cache_compute(self.shape, reference.forward_masks, seconds=time.perf_counter() - started,
                                           num_processes=self.accelerator.num_processes)
        self.reference_cache_bytes = reference.num_bytes
        return reference

    def _accelerator_of_a_block(self):
        """The accelerator for a block (the constructor's checks, a run): the caller's, or the trainer's own made again
        (the last block reset the state it made), whose state is reset when the block ends (accelerator_of_a_run): the
        caller's own Accelerator afterwards may compute in any precision."""
        return (accelerator_of_a_run(self.config.precision) if self._own_accelerator else
                contextlib.nullcontext(self.accelerator))

    @one_call_at_a_time("its step_callback", "wait for the running train() to return")
    def train(self) -> RunSummary:
        try:
            with self._accelerator_of_a_block() as self.accelerator:
                return self._checked_run()
        except BaseException:
            # no weight stepped: the caller may well reuse the model (retry with other settings, train it otherwise),
            # which must then be as given, not hold this run's adapter and frozen weights
            if not self._stepped:
                self.model, self._given_back = self._given_back_model(self.model), True
                if self._new_adapter:   # its reference is the policy with the adapter taken out, or was built from it
                    self._built_reference = None
            raise

    def _checked_run(self) -> RunSummary:
        """train()'s checks of the trainer, the config and the output_dir, then the run."""
        config, acc = self.config, self.accelerator
        if self.sharded and self._prepared:   # FSDP sharded the model in place in the first train()
            raise RuntimeError("under FSDP a trainer trains once: its first train() sharded the model in place, which "
                               "cannot be prepared again; resume with a new UnlearningTrainer over the model loaded "
                               "again (config.resume=True, --resume)")
        if self._merged:   # _finish merged the adapter into the weights
            raise RuntimeError("this trainer's model holds no LoRA adapter to train: its last train() merged it into "
                               "the weights in place to write model/; train (or resume a run whose model/ was not "
                               "written: config.resume=True, --resume) with a new UnlearningTrainer over the model "
                               "loaded again")
        if acc.mixed_precision != MIXED_PRECISION[config.precision]:
            raise RuntimeError(f"this trainer's accelerator now computes in mixed_precision={acc.mixed_precision!r}, "
                               f"not {MIXED_PRECISION[config.precision]!r} as precision={config.precision!r} needs: "
                               "a trainer of another precision constructed since in this process reset accelerate's "
                               "state, which is the process's; construct this trainer again")
        if self._given_back:   # the constructor, or a train() that stepped no weight, gave the model back as given
            self.model, self._given_back = self._prepare_model(self.model), False
        out = config.output_dir
        resume_from = resume_point(config)
        if self._stepped and not resume_from:
            raise RuntimeError(f"the last train() stopped with an exception after its steps had changed the weights, "
                               f"and {out} holds no checkpoint to resume from (save_every={config.save_every}): "
                               "the weights this run would start from are gone; retry with a new "
                               "UnlearningTrainer over the model loaded again, and set save_every (--save-every) to "
                               "make a later failure resumable")
        if acc.is_main_process:
            os.makedirs(out, exist_ok=True)
            remove_stale_temporaries(out)

        set_rng_state(self._fresh_rng, acc.device)  # a resume then restores its checkpoint's
        if config.reference_mode == "cached":   # frozen again: a finished run gave the model its flags back
            causal_lm_parts(self.model)[1].requires_grad_(False)
        # the accelerator holds what the run prepared (the objective, and so the reference: a frozen copy of the
        # decoder, or the cache; AdamW and its moments) for as long as the caller keeps it, finished or not: they go
        # when the run ends, so that a caller retrying after an out-of-memory error trains without the failed run's
        # optimizer state, and one dropping the model after the run gets its memory back
        with released_when_done(acc), self._train_mode():
            return self._run(resume_from)

    @contextlib.contextmanager
    def _train_mode(self):
        """The run's model in train mode, with checkpointing where the config asks for it; the caller's as given when
        the run ends, finished or failed, in all but its weights: a model given in eval mode must not generate with
        dropout after it, nor keep checkpointing and its input-grads hook. What is given back is what train() found
        (a model.eval() between the constructor and train() holds after the run)."""
        model = self.model
        # each of the caller's modules' modes (LoRA's follow the model's), the checkpointing (each module's flag and
        # function: a model given with its own options gets them back), and transformers' input-grads hook (enabling
        # checkpointing registers it; PEFT too, where it is on)
        modes = [(module, module.training) for module in self._given_modules]
        checkpointing = activation_checkpointing_settings(model)
        grads_hook = hasattr(base_causal_lm(model), "_require_grads_hook")
        try:
            model.train()
            if self.config.gradient_checkpointing:
                enable_activation_checkpointing(model)
            yield
        finally:   # (self.model: LoRA's wrapper, or the model _finish merged it into)
            if self.config.gradient_checkpointing:
                restore_activation_checkpointing(checkpointing)
            base = base_causal_lm(self.model)
            if not grads_hook and hasattr(base, "_require_grads_hook"):
                base.disable_input_require_grads()
            _set_modes(self.model, modes)

    def _run(self, resume_from: str | None) -> RunSummary:
        """The run train() checked, from the accelerate-prepared objective to the summary of the run."""
        config, acc, out = self.config, self.accelerator, self.config.output_dir
        objective, optimizer = self._prepare_objective()
        optimizer.zero_grad(set_to_none=True)   # gradients a caller's backward left would add to step 1's
        # linear to 0, no warm-up (SPEC §1); on the torch optimizer, whose step() the step in the backward calls too
        # (on accelerate's wrapper, torch warned at the first step of such a run that the optimizer had not stepped)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            _torch_optimizer(optimizer), lambda s: max(0.0, 1.0 - s / config.max_steps))
        step, totals = 0, ComputeTotals(**self.setup_compute.to_dict())  # building the reference counts too
        record = None  # the last step's; a resume that is already at max_steps keeps the checkpoint's
        if resume_from:  # the checkpoint's totals hold the interrupted run's
            step, totals, record = self._load(resume_from, objective, optimizer, scheduler)
        if acc.is_main_process:  # only now: a refused resume must leave the interrupted run's config.json and log
            write_text_atomic(os.path.join(out, "config.json"), json.dumps(config.to_dict(), indent=1))
            truncate_log(os.path.join(out, "log.jsonl"), step)  # step 0: a run killed before its first checkpoint

        lm_head_trains = causal_lm_parts(self.model)[1].weight.requires_grad
        decoder_trains = all(p.requires_grad for p in decoder_matmul_weights(self.model))
        progress = _progress_bar(config, acc.is_main_process, step)
        stop_reason = "max_steps"
        # the optimizer's step inside the backward (backward_step.py): hooks on the parameters, taken off at the end
        hooks = step_in_backward(_torch_optimizer(optimizer)) if self.optimizer_in_backward else []
        # the model's layers that fastalign's training ops stand in for (layer_stand_ins.py), for this run's steps only
        layers = contextlib.ExitStack()
        # the terms computed: those whose rows the streams draw (every batch holds the same kinds of rows)
        mismatch_on, normal_on = self.streams.mismatch_per_prompt > 0, self.streams.normal_batch_size > 0
        try:
            if config.fused_layers:
                layers.enter_context(fused_layers(self.model, config.backend))
            while step < config.max_steps:
                started = time.perf_counter()
                (total, forget, mismatch, normal), counts = self._step(step, objective, decoder_trains, lm_head_trains)
                lr = optimizer.param_groups[0]["lr"]
                if not hooks:   # (with them, each parameter has stepped in the backward)
                    self._stepped = True
                    optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1

                seconds = time.perf_counter() - started
                step_totals = ComputeTotals(*(int(c) for c in counts[:4]), counts[4], seconds * acc.num_processes)
                totals.add(step_totals)
                record = StepRecord(step, total, -forget, mismatch if mismatch_on else None,
                                    normal if normal_on else None, lr, step_totals.tokens, step_totals.flops, seconds)
                early_stop = config.max_forget_nll is not None and record.forget_nll > config.max_forget_nll
                self._report(record, progress, last=early_stop)
                if early_stop:
                    stop_reason = f"forget NLL {record.forget_nll:.4g} > max_forget_nll {config.max_forget_nll:g}"
                    break
                if config.save_every and step % config.save_every == 0 and step < config.max_steps:
                    self._save_checkpoint(step, totals, record, objective, optimizer, scheduler)
        except BaseException:
            # the failed step's earlier micro-batches' gradients: freed now (a caller that frees memory and retries,
            # after an out-of-memory error, needs them gone), not by the next train()
            optimizer.zero_grad(set_to_none=True)
            raise
        finally:
            for hook in hooks:
                hook.remove()
            layers.close()
        progress.close()
        self._built_reference = None    # the run is over: its reference is not needed again
        summary = self._finish(step, stop_reason, record, totals, objective,
                               type(_torch_optimizer(optimizer)).__name__)
        self._stepped = False   # (a later train() goes on from the weights this run saved)
        return summary

    def _step(self, step, objective, decoder_trains, lm_head_trains):
        """The forwards and backwards of one optimizer step's micro-batches: (its loss terms, its compute counts), as
        _step_values reads them. With optimizer_in_backward they are read (and checked finite) before the backward,
        which steps the weights."""
        config, acc = self.config, self.accelerator
        term_sums = torch.zeros(4, dtype=torch.float64, device=acc.device)
        compute = ComputeTotals()
        batches = [self.streams.batch(step * config.grad_accum + micro, rank=acc.process_index,
                                      world_size=acc.num_processes).to(acc.device)
                   for micro in range(config.grad_accum)]
        normal_denominator = self._normal_denominator(batches)
        micro_terms, values = [], None
        for micro, batch in enumerate(batches):
            last_micro = micro == config.grad_accum - 1
            with contextlib.nullcontext() if last_micro else acc.no_sync(objective):
                terms = objective(batch, normal_denominator)
                micro_terms.append(terms)
                term_sums += torch.stack([t.detach().double() for t in terms]) / config.grad_accum
                packed = self.packer.plan(batch.tokens)
                compute.add(batch_compute(self.shape, batch, decoder_trains=decoder_trains,
                                          lm_head_trains=lm_head_trains, checkpointing=config.gradient_checkpointing,
                                          reference_forward=config.reference_mode != "cached",
                                          packed_shape=None if packed is None else packed.shape,
                                          grads_in_forward=config.grads_in_forward))
                if self.optimizer_in_backward:   # (one micro-batch: the config allows no accumulation with it)
                    values = self._step_values(step, objective, term_sums, compute, micro_terms, batches)
                    self._stepped = True   # (the backward steps the weights)
                acc.backward(terms.total / config.grad_accum)
        if values is None:
            values = self._step_values(step, objective, term_sums, compute, micro_terms, batches)
        return values

    def _prepare_objective(self):
        """The accelerate-prepared objective and AdamW over its trainable parameters.

        FSDP2 needs the model and its optimizer prepared together (it swaps the parameters for sharded
        ones); DDP and FSDP1 need the optimizer built on the wrapped model's parameters.
        """
        acc, config = self.accelerator, self.config
        if self._built_reference is None:
            self._built_reference = (self._reference(),)
        objective = UnlearningObjective(self.model, config.loss_weights, self._built_reference[0],
                                        backend=config.backend, packing=config.packing,
                                        grads_in_forward=config.grads_in_forward)
        self.packer = objective.packer   # the layout of each batch, for its compute (the wrapper hides it)

        def optimizer_over(module):
            params = [p for p in module.parameters() if p.requires_grad]
            if not params:
                raise ValueError("the model has no trainable parameter")
            return adamw(params, lr=config.lr, weight_decay=config.weight_decay, sharded=self.sharded)

        self._prepared = True
        if getattr(acc, "is_fsdp2", False):
            return acc.prepare(objective, optimizer_over(objective))
        with bucket_per_tensor(acc):   # DDP: a resumed run's steps sum the gradients as the uninterrupted run's
            objective = acc.prepare(objective)
        return objective, acc.prepare(optimizer_over(objective))

    def _normal_denominator(self, batches: list[UnlearningBatch]) -> float:
        """The step's normal answer tokens (all micro-batches, all processes) per micro-batch and process. Counted on
        the host; under a launcher the count is all-reduced on the device, and the forward waits for it."""
        acc = self.accelerator
        local = sum(int(b.tokens.on_host.target_mask[b.num_forget + b.num_mismatch:].sum()) for b in batches)
        total = float(local) if acc.num_processes == 1 else float(
            acc.reduce(torch.tensor(float(local), dtype=torch.float64, device=acc.device), reduction="sum"))
        return max(total, 1.0) / (len(batches) * acc.num_processes)

    def _step_values(self, step: int, objective, term_sums: torch.Tensor, compute: ComputeTotals, micro_terms: list,
                     batches: list[UnlearningBatch]) -> tuple[list[float], list[float]]:
        """The step's loss terms (means over processes) and compute counts (sums over processes), read from the
        device in ONE copy with whether each process's loss was finite: the step's one wait for the device (under a
        launcher, beside the normal token count), which the early stop and the log need every step. Raises
        FloatingPointError on every process, before the optimizer step, when the loss of a micro-batch of any of
        them was not finite, naming the step before where that one's update had already made the weights so."""
        acc = self.accelerator
        nonfinite = torch.stack([~torch.isfinite(terms.total.detach()) for terms in micro_terms])
        flags = acc.gather(nonfinite.any().long()[None])
        terms = acc.reduce(term_sums, reduction="mean")
        counts = acc.reduce(torch.tensor([compute.tokens, compute.padded_slots, compute.answer_tokens,
                                          compute.reference_tokens, compute.flops], dtype=torch.float64,
                                         device=acc.device), reduction="sum")
        values = torch.cat([terms, counts, flags.double(), nonfinite.double()]).tolist()
        ends = list(itertools.accumulate((len(terms), len(counts), len(flags))))   # where each part ends in values
        flags, here = values[ends[1]:ends[2]], values[ends[2]:]
        bad = [rank for rank, flag in enumerate(flags) if flag]
        if bad:
            self._check_weights_finite(objective, step)
            micro = next((i for i, flag in enumerate(here) if flag), None)
            here = ("" if micro is None else
                    f"; here {micro_terms[micro]}, rows {[e.source for e in batches[micro].examples]}")
            raise FloatingPointError(f"step {step + 1}: the loss is not finite on process(es) {bad} of "
                                     f"{acc.num_processes}{here}")
        return values[:ends[0]], values[ends[0]:ends[1]]

    def _check_weights_finite(self, objective, step: int) -> None:
        """Raises FloatingPointError on every process (each calls it) where a trainable weight of any of them holds
        NaN or inf after `step` steps: a gradient that was not finite though its loss was, which the loss check
        misses, made it so (a pass over the weights, so not made every step)."""
        acc = self.accelerator
        named = [(name.removeprefix("model."), p.detach())
                 for name, p in objective.named_parameters() if p.requires_grad]
        # on the accelerator's device, which the gather's collective takes (FSDP may keep the weights on the CPU)
        here = torch.stack([~finite(p.to_local() if hasattr(p, "to_local") else p).to(acc.device)
                            for _, p in named])   # (FSDP2: a shard)
        bad = [rank for rank, flag in enumerate(acc.gather(here.any().long()[None]).tolist()) if flag]
        if bad:
            names = [name for (name, _), flag in zip(named, here.tolist()) if flag]
            raise FloatingPointError(f"after step {step} trainable weights are not finite (NaN or inf) on process(es) "
                                     f"{bad} of {acc.num_processes}{f'; here {names[:5]}' if names else ''}: the "
                                     f"gradient of step {step} was not finite though its loss was (an overflow?)")

    def _load(self, path, objective, optimizer, scheduler) -> tuple[int, ComputeTotals, StepRecord]:
        state, rank_state = read_checkpoint(path, self.accelerator.process_index, _STATE_KEYS)
        settings, recorded = self.config.to_dict(), state["config"]
        unrecorded = sorted(k for k in settings if k not in recorded and k not in _RESUMABLE_CHANGES)
        if unrecorded:   # how the run went without them, and so which values continue it, the checkpoint cannot say
            raise ValueError(f"cannot resume {path}: it predates setting(s) {unrecorded}, which the fastalign that "
                             "wrote it did not have: resume it with that version of fastalign, or start the run over")
        written_by = state["num_processes"]
        if written_by != self.accelerator.num_processes:  # fewer processes find their rank files too
            raise ValueError(f"cannot resume {path}: it was written by {written_by} process(es), this run "
                             f"has {self.accelerator.num_processes}; the rows each process draws and the global batch "
                             "depend on it: resume with the number of processes it was written with")
        recorded_in = state.get("cwd", os.getcwd())   # unrecorded before 2026-12-07: read as this process's
        changed = sorted(k for k, v in settings.items()
                         if k not in _RESUMABLE_CHANGES and not _same_setting(k, recorded.get(k), v, recorded_in))
        if changed:
            values = "; ".join(f"{k} {recorded.get(k)!r} then, {settings[k]!r} now" for k in changed)
            raise ValueError(f"cannot resume {path}: setting(s) {changed} differ from the interrupted run: {values}")
        if state.get("data", self._data_digest()) != self._data_digest():   # unrecorded before 2026-12-01
            raise ValueError(f"cannot resume {path}: the data differ from the interrupted run's (same settings, other "
                             "forget, normal or mismatch pool examples: a data file changed since, or a relative path "
                             "now read from another directory); resume it on the data it was started with")
        draws = self.streams.draw_settings()
        changed = sorted(k for k, v in state.get("draws", draws).items() if draws.get(k) != v)   # unrecorded before
        if changed:                                                                               # 2026-12-06
            raise ValueError(f"cannot resume {path}: the streams draw other batches than the interrupted run's "
                             f"(UnlearningStreams' {changed} differ); resume it with streams built as it was")
        recorded = state["model_files"]   # None for a model not from a directory
        if recorded and self._model_files and recorded != self._model_files:
            raise ValueError(f"cannot resume {path}: the model at {self.config.model} is not the one the interrupted "
                             "run started from (its files differ: another model or revision was put there since); "
                             "resume it on the model it was started with")
        if state["step"] > self.config.max_steps:  # the saved model would have more steps than max_steps
            raise ValueError(f"cannot resume {path}: it is at step {state['step']}, past max_steps="
                             f"{self.config.max_steps}; set max_steps to at least {state['step']}")
        check_trainable_names(objective, state["trainable"], f"cannot resume {path}: it")
        load_trainable_state(objective, state["trainable"])
        load_optimizer_state(objective, _torch_optimizer(optimizer), state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        # the checkpoint's lr follows its own max_steps; this run's (a resume may change it) rules from here on
        for group, base_lr, lr_lambda in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
            group["lr"] = base_lr * lr_lambda(scheduler.last_epoch)
        set_rng_state(rank_state, self.accelerator.device)
        return state["step"], ComputeTotals(**state["compute"]), StepRecord(**state["last"])

    def _data_digest(self) -> str:
        """streams.digest(), computed once (it reads every token)."""
        if self._digest is None:
            self._digest = self.streams.digest()
        return self._digest

    def _save_checkpoint(self, step, totals, record, objective, optimizer, scheduler):
        acc = self.accelerator
        # (the working directory, which the config's relative paths were read in: a resume from another resolves them)
        state = {"step": step, "num_processes": acc.num_processes, "config": self.config.to_dict(), "cwd": os.getcwd(),
                 "data": self._data_digest(), "draws": self.streams.draw_settings(), "model_files": self._model_files,
                 "compute": totals.to_dict(), "last": asdict(record),
                 "trainable": trainable_state(objective),
                 "optimizer": optimizer_state(objective, _torch_optimizer(optimizer)),
                 "scheduler": scheduler.state_dict()}
        write_checkpoint(self.config.output_dir, step, state, torch_rng_state(acc.device), rank=acc.process_index,
                         is_main=acc.is_main_process, barrier=acc.wait_for_everyone,
                         keep=self.config.keep_checkpoints)

    def _report(self, record: StepRecord, progress, last: bool) -> None:
        """Progress bar, log line (every log_every steps and at the last step, early stop included), callback."""
        if not self.accelerator.is_main_process:
            return
        progress.update(1)
        terms = {"fgt_nll": (record.forget_nll, ".3f"), "rdn": (record.mismatch_nll, ".3f"),
                 "kl": (record.normal_kl, ".4f")}
        progress.set_postfix(refresh=False, **{name: format(value, spec) for name, (value, spec) in terms.items()
                                               if value is not None})   # (a term not computed is left out)
        if record.step % self.config.log_every == 0 or record.step == self.config.max_steps or last:
            log = os.path.join(self.config.output_dir, "log.jsonl")
            with naming_a_full_disk(log), open(log, "a", encoding="utf-8") as f:
                f.write(json.dumps(asdict(record)) + "\n")
        if self.step_callback is not None:
            self.step_callback(record)

    def _finish(self, step, stop_reason, record, totals, objective, optimizer_name) -> RunSummary:
        acc, out = self.accelerator, self.config.output_dir
        self._check_weights_finite(objective, step)   # (the last step's update: no loss after it shows it)
        acc.wait_for_everyone()
        model_dir = os.path.join(out, "model")
        summary = RunSummary(step, stop_reason, record, totals.to_dict(), acc.num_processes,
                             _device_name(acc.device), model_dir, self.streams.skipped,
                             self.streams.answers_cut, reference_cache_bytes=self.reference_cache_bytes,
                             packing_unavailable=self.packer.unavailable,
                             optimizer_in_backward=self.optimizer_in_backward, optimizer=optimizer_name,
                             draws=self.streams.draw_settings())
        # FSDP: gather full weights (collective); the keys of the objective's "model." submodule are the model's.
        state = ({k.removeprefix("model."): v for k, v in full_model_state(objective).items()}
                 if self.sharded else None)
        lora = hasattr(self.model, "merge_and_unload")
        if lora:  # every process: they hold the same replica (LoRA runs under DDP only), and return one summary
            summary.adapter_dir = os.path.join(out, "adapter")
            summary.merge_rounding_error = merge_rounding_error(self.model)
        if acc.is_main_process:
            if lora:
                with atomic_directory(summary.adapter_dir) as tmp:
                    save_adapter(self.model, tmp)
                warn_of_a_lossy_merge(summary)
                # in place: the weights as they were are gone, and with them the adapter a later train() would train
                # (it is refused), whether model/ is written or not: the model trains as given from now on
                self.model, self._merged = self.model.merge_and_unload(), True
                _set_requires_grad(self._given_requires_grad)
            # before model/, whose presence marks the run finished (resume_point): a run.json that fails to be written
            # leaves a run that a resume finishes, not a finished one without its record
            write_text_atomic(os.path.join(out, "run.json"), json.dumps(asdict(summary), indent=1))
            with atomic_directory(model_dir) as tmp:
                save_model(self.model, tmp, state)
                if self.tokenizer is not None:
                    self.tokenizer.save_pretrained(tmp)
        _set_requires_grad(self._given_requires_grad)   # the caller's model (trained in place) trains as it did
        acc.wait_for_everyone()
        return summary


def _set_requires_grad(flags: list[tuple[torch.nn.Parameter, bool]]) -> None:
    """Gives each parameter its requires_grad flag of `flags` back."""
    for p, requires_grad in flags:
        p.requires_grad_(requires_grad)


def _set_modes(model, modes: list[tuple[torch.nn.Module, bool]]) -> None:
    """Gives each module of `modes` (the caller's model's, its own first) its training flag back: `model` takes the
    first's mode through train(), so that modules a run added (LoRA's) follow it and transformers maps its Hub kernels
    for it, then each module its own flag."""
    model.train(modes[0][1])
    for module, training in modes:
        module.training = training


def _torch_optimizer(optimizer) -> torch.optim.Optimizer:
    """The torch optimizer under accelerate's AcceleratedOptimizer wrapper."""
    return getattr(optimizer, "optimizer", optimizer)


def _progress_bar(config: UnlearnConfig, is_main: bool, step: int):
    from tqdm.auto import tqdm
    return tqdm(total=config.max_steps, initial=step, desc="unlearn", disable=not (config.progress and is_main),
                dynamic_ncols=True)
