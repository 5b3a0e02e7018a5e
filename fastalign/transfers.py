"""Host-device transfers that do not make the host wait for the device more than it must.

Every copy to the host waits for the work queued on the device before it: reading a model call's outputs tensor by
tensor (top-k ids, their probabilities, the greedy column, ranked tokens, each prompt's rollout draws, the judge's
logits) made the host wait once per tensor. `to_host` copies their bytes together and gives each back in its own
dtype and shape, the same values a copy of each would give (each a view of that one host copy, which is all
theirs). The other way, `index_on` puts an index the host built (rows, answer positions) on the device without
waiting for the work queued there.
"""
from typing import List, Sequence

import torch


def to_host(tensors: Sequence[torch.Tensor]) -> List[torch.Tensor]:
    """CPU copies of `tensors` (any dtypes and shapes, on one device), made by one copy from the device."""
    if not tensors:
        return []
    # widest dtypes first: element sizes are powers of 2, so each tensor's bytes then start at a multiple of its
    # own element size, and its slice of the one host copy can be viewed as its dtype with no copy of its own
    order = sorted(range(len(tensors)), key=lambda i: -tensors[i].element_size())
    host = torch.cat([tensors[i].detach().contiguous().reshape(-1).view(torch.uint8) for i in order]).cpu()
    out, start = [None] * len(tensors), 0   # (cat copies even one tensor on the host: the buffer is the caller's)
    for i in order:
        t = tensors[i]
        out[i] = host[start:start + t.numel() * t.element_size()].view(t.dtype).reshape(t.shape)
        start += t.numel() * t.element_size()
    return out


def index_on(index, device) -> torch.Tensor:
    """An int64 index built on the host (a tensor or a list), on `device` by a non-blocking copy: it need not wait
    for the device's queued work (safe from pageable memory, which is staged before the copy returns)."""
    return torch.as_tensor(index, dtype=torch.int64).to(device, non_blocking=True)
