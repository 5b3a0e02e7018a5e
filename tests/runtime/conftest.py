"""The runtime tests run tiny models, for which one CPU thread is faster than several and is not slowed
down by whatever else the machine runs; the previous setting is restored afterwards."""
import pytest
import torch


@pytest.fixture(autouse=True)
def _one_cpu_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
