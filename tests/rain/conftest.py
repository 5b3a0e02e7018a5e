"""RAIN tests run many tiny tensor ops: one intra-op thread avoids the thread wake-ups that dominate them
on a shared CPU (restored after each test)."""
import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
