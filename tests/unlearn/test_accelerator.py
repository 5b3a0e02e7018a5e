"""The trainer's accelerate set-up (fastalign/unlearn/accelerator.py)."""
import datetime

import pytest

from fastalign.unlearn.accelerator import new_accelerator

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
