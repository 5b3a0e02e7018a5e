"""compute_dtype: the dtype a matmul computes in, autocast's on its own device type only."""
import torch

from fastalign.compute_dtype import compute_dtype


def test_autocast_gives_its_dtype_for_its_device_type_only():
    assert compute_dtype("cpu", torch.float32) is torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert compute_dtype("cpu", torch.float32) is torch.bfloat16
        assert compute_dtype("cuda", torch.float32) is torch.float32   # autocast on the CPU leaves CUDA alone
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype is compute_dtype("cpu", torch.float32)
    assert compute_dtype("cpu", torch.float16) is torch.float16


def test_cuda_autocast_gives_cudas_dtype_not_the_cpus():
    """Autocast's state per device type (no CUDA device needed to set it): CUDA's float16 beside the CPU's bfloat16."""
    enabled, dtype = torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda")
    torch.set_autocast_enabled("cuda", True)
    torch.set_autocast_dtype("cuda", torch.float16)
    try:
        assert torch.get_autocast_dtype("cpu") is torch.bfloat16
        assert compute_dtype("cuda", torch.float32) is torch.float16
        assert compute_dtype("cpu", torch.float32) is torch.float32
    finally:
        torch.set_autocast_enabled("cuda", enabled)
        torch.set_autocast_dtype("cuda", dtype)


def test_a_device_type_without_autocast_keeps_the_dtype():
    """torch.is_autocast_enabled raises for the meta device ("unknown device type for autocast"), which a model moved
    there to trace shapes gives the fused losses: they failed there, before their own check of the meta device."""
    assert compute_dtype("meta", torch.bfloat16) is torch.bfloat16


def test_float64_stays_float64_under_autocast_as_a_matmul_does():
    """Autocast casts no float64 operand: a float64 model's lm_head runs in float64 under it, and the fused losses,
    which rounded such a head's operands to bf16, must not either."""
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert compute_dtype("cpu", torch.float64) is torch.float64
        assert (torch.ones(2, 2, dtype=torch.float64) @ torch.ones(2, 2, dtype=torch.float64)).dtype is torch.float64
        assert compute_dtype("cpu", torch.float16) is torch.bfloat16
        assert (torch.ones(2, 2, dtype=torch.float16) @ torch.ones(2, 2, dtype=torch.float16)).dtype is torch.bfloat16
