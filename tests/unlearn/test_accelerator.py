"""The trainer's accelerate set-up (fastalign/unlearn/accelerator.py)."""
import datetime
import types

import pytest

from fastalign.unlearn import accelerator as accelerator_module
from fastalign.unlearn.accelerator import bucket_per_tensor, new_accelerator

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
