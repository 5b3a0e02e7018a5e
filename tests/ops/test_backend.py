"""Which implementation backend="auto" picks: the Triton kernels for CUDA tensors, the chunked torch path elsewhere."""
import pytest
import torch

from fastalign.ops.backend import select_backend


@pytest.mark.parametrize("op", ["linear_cross_entropy", "linear_kl_div"])
def test_auto_picks_triton_on_cuda_and_torch_elsewhere(op):
    """Even where Triton's interpreter could run the kernels on CPU tensors (as in these tests), "auto" keeps them
    on the torch path: the interpreter is for testing the kernels, far too slow to train with."""
    assert select_backend(op, "auto", torch.device("cpu")).__name__ == f"fastalign.ops.torch_chunked.{op}"
    assert select_backend(op, "auto", torch.device("cuda")).__name__ == f"fastalign.kernels.{op}"
