"""Fixtures of the unlearning tests.

The tests run tiny models whose matmuls are far too small to gain from threads; on a shared 2-core machine
two OpenMP threads mostly wait for each other, so these tests use one (restored after). accelerate keeps
one process-wide state that fixes the mixed precision of the first Accelerator; it is reset after each
test so that tests may choose different precisions.
"""
import pytest
import torch


@pytest.fixture(autouse=True, scope="package")
def _one_torch_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    yield
    try:
        from accelerate.state import AcceleratorState
    except ImportError:
        return
    AcceleratorState._reset_state(True)
