"""The unlearning tests run tiny models whose matmuls are far too small to gain from threads; on a shared
2-core machine two OpenMP threads mostly wait for each other, so these tests use one (restored after)."""
import pytest
import torch


@pytest.fixture(autouse=True, scope="package")
def _one_torch_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
