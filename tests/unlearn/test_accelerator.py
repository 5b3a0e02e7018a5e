"""The trainer's accelerate set-up (fastalign/unlearn/accelerator.py)."""
import datetime
import threading
import types

import pytest

from fastalign.unlearn import accelerator as accelerator_module
from fastalign.unlearn.accelerator import bucket_per_tensor, new_accelerator
from fastalign.unlearn.config import UnlearnConfig
from fastalign.unlearn.trainer import UnlearningTrainer
from tests.unlearn.tiny import byte_bpe_tokenizer, tiny_llama, tiny_streams

pytest.importorskip("accelerate")


def test_the_trainers_process_group_waits_hours_for_a_checkpoints_write(monkeypatch):
    """The processes wait at a checkpoint's barriers while rank 0 writes state.pt (an 8B model's weights and AdamW
    state: ~100 GB): with NCCL's default timeout its watchdog killed every process of a run whose write took more
    than 10 minutes."""
    import accelerate

    made = []
    monkeypatch.setattr(accelerate, "Accelerator", lambda **options: made.append(options))
    new_accelerator("fp32")
    (handler,) = made[0]["kwargs_handlers"]
    assert handler.to_kwargs() == {"timeout": datetime.timedelta(hours=2)}


def test_ddp_buckets_a_tensor_alone_unless_the_callers_handler_sizes_them(monkeypatch):
    """(The gradients' bits: test_distributed's three-process resume.) A handler of the caller's keeps its settings and
    its comm hook; one that sizes the buckets itself is left as it is; the accelerator gets its handler back."""
    from accelerate.utils import DistributedDataParallelKwargs

    monkeypatch.setattr(accelerator_module, "_BUCKET_CAPS", True)
    hooked = []
    monkeypatch.setattr(DistributedDataParallelKwargs, "register_comm_hook", lambda self, model: hooked.append(model))
    for handler, expected in [(None, {"bucket_cap_mb_list": [0]}),
                              (DistributedDataParallelKwargs(static_graph=True),
                               {"static_graph": True, "bucket_cap_mb_list": [0]}),
                              (DistributedDataParallelKwargs(bucket_cap_mb=50), {"bucket_cap_mb": 50})]:
        acc = types.SimpleNamespace(ddp_handler=handler)
        with bucket_per_tensor(acc):
            assert acc.ddp_handler.to_kwargs() == expected
            acc.ddp_handler.register_comm_hook("model")
        assert acc.ddp_handler is handler
    assert hooked == ["model", "model"]


def trainer(tmp_path, name, precision, step_callback=None):
    """A tiny trainer of two steps computing in `precision`, with its own Accelerator."""
    tokenizer = byte_bpe_tokenizer()
    config = UnlearnConfig(output_dir=str(tmp_path / name), max_steps=2, grad_accum=1, lr=1e-3, progress=False,
                           precision=precision)
    return UnlearningTrainer(tiny_llama(len(tokenizer)), tiny_streams(tokenizer), config, step_callback=step_callback)


# the refusal of a trainer of precision 'bf16-mixed' while an fp32 run computes
ANOTHER_RUN = (r"precision='bf16-mixed' trains with accelerate's mixed_precision='bf16', but another unlearning run of "
               r"this process .* computes in mixed_precision='no'.*run them one after the other, or both in a "
               r"precision computing in 'no' \('fp32' or 'bf16'\)")


def test_a_trainer_of_another_precision_is_refused_inside_a_runs_step_callback(tmp_path):
    """A bf16-mixed trainer built or trained from an fp32 run's step_callback reset accelerate's state, which the
    process shares, under the fp32 run: that run died at its next step ("'AcceleratorState' object has no attribute
    'device'"). It is refused before it resets anything; one of the run's mixed precision ('bf16': 'no') still runs
    inside it, and the refused trainer trains once the run has returned."""
    from accelerate.state import AcceleratorState

    mixed, inner = trainer(tmp_path, "mixed", "bf16-mixed"), []

    def callback(record):
        if record.step == 1:
            with pytest.raises(RuntimeError, match=ANOTHER_RUN):
                trainer(tmp_path, "built inside", "bf16-mixed")
            with pytest.raises(RuntimeError, match=ANOTHER_RUN):
                mixed.train()
            inner.append(trainer(tmp_path, "bf16", "bf16").train().steps)

    assert trainer(tmp_path, "fp32", "fp32", callback).train().steps == 2 and inner == [2]
    assert not AcceleratorState._shared_state   # reset by the run, the last block using it
    assert mixed.train().steps == 2


def test_a_trainer_of_another_precision_is_refused_while_another_thread_runs(tmp_path):
    """The same overlap from two threads: the fp32 run waits in its step_callback while the other thread builds a
    bf16-mixed trainer, which is refused, and then trains a bf16 one (mixed precision 'no', as the run's)."""
    running, tried, inner = threading.Event(), threading.Event(), []

    def callback(record):
        if record.step == 1:
            running.set()
            assert tried.wait(600)

    def other_thread():
        assert running.wait(600)
        try:
            with pytest.raises(RuntimeError, match=ANOTHER_RUN):
                trainer(tmp_path, "mixed", "bf16-mixed")
            inner.append(trainer(tmp_path, "bf16", "bf16").train().steps)
        finally:
            tried.set()

    thread = threading.Thread(target=other_thread)
    thread.start()
    try:
        assert trainer(tmp_path, "fp32", "fp32", callback).train().steps == 2
    finally:
        running.set()
        thread.join()
    assert inner == [2]
