"""The dtype in which a matmul on a device computes: autocast's where autocast is on for that device type, else the
operands' own. The fused ops run outside autocast (it does not cast a custom op's inputs), so their callers cast to
this dtype themselves, as a torch matmul under autocast would."""
import torch


def compute_dtype(device_type: str, dtype: torch.dtype) -> torch.dtype:
    """torch.get_autocast_dtype(device_type) under autocast on `device_type` ("cuda", "cpu"), else `dtype`; float64
    stays float64, which autocast never casts (a float64 model's lm_head runs in float64 under it), and so does any
    dtype on a device type autocast does not serve ("meta": torch.is_autocast_enabled raises for it)."""
    if (dtype is torch.float64 or not torch.amp.is_autocast_available(device_type)
            or not torch.is_autocast_enabled(device_type)):
        return dtype
    return torch.get_autocast_dtype(device_type)
