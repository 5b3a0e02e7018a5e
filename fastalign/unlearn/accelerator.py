"""The trainer's accelerate set-up: the Accelerator it makes (sharing or resetting the process's accelerate state,
which it resets again when a run ends), the checks of one given or launched otherwise, the DDP buckets it prepares
with, and the release of what a run prepared on it when the run ends."""
from __future__ import annotations

import contextlib
import datetime
import gc
import inspect
import os
import threading
import traceback

import torch
from torch.nn.parallel import DistributedDataParallel

from fastalign.unlearn.extras import require

# accelerate's mixed_precision of each precision: the policy's forward runs under its autocast, the reference as the
# precision says (the trainer's _reference), so an accelerator given with another one would make P another model's
MIXED_PRECISION = {"fp32": "no", "bf16-mixed": "bf16", "bf16": "no"}
# How long the processes wait for each other (the group's timeout; NCCL's default is 10 minutes): at a checkpoint's
# barriers they wait while rank 0 writes state.pt, ~100 GB for an 8B model's weights and AdamW state, which a network
# file system at 100 MB/s writes in 17 minutes
_PROCESS_GROUP_TIMEOUT = datetime.timedelta(hours=2)
# DDP's per-bucket caps (torch 2.13), which bucket_per_tensor sets: older torch keeps its default buckets
_BUCKET_CAPS = "bucket_cap_mb_list" in inspect.signature(DistributedDataParallel).parameters


def check_launch(accelerator, precision: str) -> None:
    """Raises unless accelerate runs every process the launcher started, leaves accumulation to the trainer and
    computes in `precision`."""
    launched = int(os.environ.get("WORLD_SIZE", accelerator.num_processes))
    if launched != accelerator.num_processes:  # each process would train alone and race the others to output_dir
        raise ValueError(f"launched as {launched} processes (WORLD_SIZE={launched}), but accelerate runs this one "
                         f"alone ({accelerator.num_processes} process): without a GPU it joins them only when told "
                         "to use the CPU: set ACCELERATE_USE_CPU=1 (ACCELERATE_USE_CPU=1 torchrun ...)")
    steps = accelerator.gradient_accumulation_steps
    if steps != 1:  # Accelerator.backward would divide each loss by it, on top of the trainer's own division
        raise ValueError(f"accelerate's gradient_accumulation_steps is {steps} (accelerate launch "
                         "--gradient_accumulation_steps, ACCELERATE_GRADIENT_ACCUMULATION_STEPS): leave it at 1 and "
                         "set grad_accum (--grad-accum), the micro-batches the trainer accumulates per step")
    mixed = MIXED_PRECISION[precision]
    if accelerator.mixed_precision != mixed:
        raise ValueError(f"the accelerator's mixed_precision is {accelerator.mixed_precision!r}, but "
                         f"precision={precision!r} trains with mixed_precision={mixed!r} (the reference is built "
                         f"for it): pass an Accelerator(mixed_precision={mixed!r}), or set precision "
                         "(--precision) to the one the accelerator computes in")


# the key new_accelerator marks accelerate's process-wide state with where it made it (a reset clears it)
_MADE_BY_A_TRAINER = "_fastalign_trainer_made_it"
# the key counting the blocks that use accelerate's process-wide state (accelerator_of_a_run; a reset clears it)
_RUNS = "_fastalign_trainer_runs"
# held while a block makes or shares the state and counts itself in, and while one counts itself out and resets it:
# another thread's block would reset the state between them (its count not yet, or no longer, zero)
_STATE_LOCK = threading.Lock()


def new_accelerator(precision: str):
    """An Accelerator computing in `precision`'s mixed precision, whose process group (where it makes one) waits
    _PROCESS_GROUP_TIMEOUT. accelerate keeps one state per process, which the first Accelerator sets and later ones
    may not change: in a process of its own (no launcher), a trainer of another precision than an earlier one's (a
    sweep in a notebook) resets a state a trainer made that no block uses (its constructor and each train() reset the
    state they made when they end: accelerator_of_a_run), where accelerate refused; one a block of this process still
    computes in (a trainer built or trained from another's step_callback, or in another thread) is refused: the reset
    would end that run at its next step (accelerate's "no attribute 'device'"). A state the caller's own Accelerator
    set is shared where it computes in that precision and refused otherwise: resetting it would switch the caller's
    training to another precision."""
    accelerate = require("accelerate")
    mixed, state = MIXED_PRECISION[precision], accelerate.state.AcceleratorState
    options = dict(mixed_precision=mixed,
                   kwargs_handlers=[accelerate.utils.InitProcessGroupKwargs(timeout=_PROCESS_GROUP_TIMEOUT)])
    made_here = not state._shared_state or state._shared_state.get(_MADE_BY_A_TRAINER, False)
    try:
        accelerator = accelerate.Accelerator(**options)
    except ValueError:   # "AcceleratorState has already been initialized and cannot be changed"
        if int(os.environ.get("WORLD_SIZE", "1")) != 1:
            raise
        if not made_here:
            raise ValueError(f"precision={precision!r} trains with accelerate's mixed_precision={mixed!r}, but this "
                             f"process's Accelerator computes in {state().mixed_precision!r} (accelerate keeps one "
                             "state per process: the trainer's own Accelerator would reset it, switching yours to "
                             "another precision): pass yours as accelerator=, with a precision computing in its "
                             "mixed_precision ('bf16-mixed' for 'bf16', 'fp32' or 'bf16' for 'no')") from None
        if state._shared_state.get(_RUNS, 0):
            running = state().mixed_precision
            alike = " or ".join(repr(name) for name, its in MIXED_PRECISION.items() if its == running)
            raise RuntimeError(f"precision={precision!r} trains with accelerate's mixed_precision={mixed!r}, but "
                               "another unlearning run of this process (a trainer built or trained in a step_callback, "
                               f"or in another thread) computes in mixed_precision={running!r}, and accelerate keeps "
                               "one state per process: run them one after the other, or both in a precision "
                               f"computing in {running!r} ({alike})") from None
        state._reset_state()
        accelerator = accelerate.Accelerator(**options)
    state._shared_state[_MADE_BY_A_TRAINER] = made_here
    return accelerator


@contextlib.contextmanager
def accelerator_of_a_run(precision: str):
    """new_accelerator(precision) for a run (the block: a trainer's train(), or its constructor's checks). When the
    block ends, finished, refused or failed, the accelerate state is reset where new_accelerator made it (not where it
    shared the caller's) and no other run uses it (a trainer trained or built from another's step_callback shares the
    state): left initialised after a run, it made accelerate refuse an Accelerator of the caller's in another precision
    ("restart your runtime"). The process group (accelerate's PartialState) stays; an Accelerator sharing the reset
    state is unusable after it. A block of another precision is refused while this one runs (new_accelerator)."""
    with _STATE_LOCK:
        accelerator = new_accelerator(precision)
        shared = type(accelerator.state)._shared_state
        shared[_RUNS] = shared.get(_RUNS, 0) + 1
    try:
        yield accelerator
    finally:
        with _STATE_LOCK:
            runs = shared.pop(_RUNS, 1) - 1   # (absent where the caller reset accelerate's state meanwhile)
            if runs:
                shared[_RUNS] = runs
            elif shared.get(_MADE_BY_A_TRAINER, False):
                type(accelerator.state)._reset_state()


class _TensorBuckets:
    """Stands in for an accelerator's DDP kwargs handler (or its absence) while it prepares: the handler's settings,
    with a bucket per tensor unless the handler sets a bucket size of its own."""

    def __init__(self, handler):
        self.handler = handler

    def to_kwargs(self) -> dict:
        kwargs = self.handler.to_kwargs() if self.handler is not None else {}
        if _BUCKET_CAPS and "bucket_cap_mb" not in kwargs:
            kwargs["bucket_cap_mb_list"] = [0]   # a cap of 0 bytes: each tensor closes its bucket
        return kwargs

    def register_comm_hook(self, model) -> None:
        if self.handler is not None:
            self.handler.register_comm_hook(model)


@contextlib.contextmanager
def bucket_per_tensor(accelerator):
    """Within the block, the DDP that `accelerator` wraps a module in all-reduces each gradient tensor in a bucket of
    its own. DDP's default buckets (one for every tensor in its first iteration, then rebuilt by the backward's
    order) place a tensor at another offset in the first iteration than in later ones, and the ring all-reduce of
    3+ processes (gloo, NCCL) sums an element in an order set by its offset: a resumed run's first step (the first
    iteration of its DDP) rounded otherwise than that step of the uninterrupted run. In a bucket of its own a tensor
    has one offset, 0, in every iteration. The all-reduces are as many as trainable tensors (for a model of 1B
    parameters or more about as many as 25 MB buckets make), each launched when its gradient is ready."""
    handler = accelerator.ddp_handler
    accelerator.ddp_handler = _TensorBuckets(handler)
    try:
        yield
    finally:
        accelerator.ddp_handler = handler


# where Accelerator.prepare keeps what it prepared (accelerate 1.16), which free_memory empties
_PREPARED_LISTS = ("_models", "_optimizers", "_schedulers", "_dataloaders")


@contextlib.contextmanager
def released_when_done(accelerator):
    """Takes what `accelerator` prepared within the block out of its lists (by identity) when the block ends, finished
    or failed, then runs a full collection and empties the device's cache, as free_memory does. The objects prepared
    before (the caller's, on an accelerator of the caller's) stay in it, and so does its step: free_memory would
    drop them all and reset the step. An interrupt during the collection (it takes a while) ends it only: a finished
    run has written model/ and run.json (and a --resume of it is refused), a failed one raises its own exception.
    torch.distributed.checkpoint's state-dict helpers (torch 2.13) leave a reference cycle holding every module of the
    model, which the collection frees now, not whenever Python next runs one (device memory filling up never does)."""
    before = {name: list(getattr(accelerator, name)) for name in _PREPARED_LISTS}
    try:
        yield
    except BaseException as exc:
        # the frames of the run that the exception's traceback keeps (the step's, the objective's) hold the objective
        # and the optimizer for as long as the exception lives: a caller retrying inside its `except` block would
        # train beside them. Their locals go (a post-mortem debugger sees the frames without them)
        traceback.clear_frames(exc.__traceback__)
        raise
    finally:
        for name in _PREPARED_LISTS:
            prepared = getattr(accelerator, name)
            prepared[:] = [item for item in prepared if any(item is kept for kept in before[name])]
        with contextlib.suppress(KeyboardInterrupt):
            gc.collect()
            if accelerator.device.type == "cuda":
                torch.cuda.empty_cache()
