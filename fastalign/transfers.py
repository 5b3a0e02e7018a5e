"""Host-device transfers that do not make the host wait for the device more than it must.

Every copy to the host waits for the work queued on the device before it: reading a model call's outputs tensor by
tensor (top-k ids, their probabilities, the greedy column, ranked tokens, each prompt's rollout draws, the judge's
logits) made the host wait once per tensor. `to_host` copies their bytes together and gives each back in its own
dtype and shape, the same values a copy of each would give. The other way, `index_on` puts an index the host
built (rows, answer positions) on the device without waiting for the work queued there.
"""
from typing import List, Sequence

import torch


def to_host(tensors: Sequence[torch.Tensor]) -> List[torch.Tensor]:
    """CPU copies of `tensors` (any dtypes and shapes, on one device), made by one copy from the device."""
    if not tensors:
        return []
    flat = [t.detach().contiguous().reshape(-1).view(torch.uint8) for t in tensors]
    host = torch.cat(flat).cpu()
    out, start = [], 0
    for t, bytes_ in zip(tensors, flat):
        # a copy of its own bytes: a view at any byte offset could not be viewed as a wider dtype
        out.append(host[start:start + bytes_.numel()].clone().view(t.dtype).reshape(t.shape))
        start += bytes_.numel()
    return out


def index_on(index, device) -> torch.Tensor:
    """An int64 index built on the host (a tensor or a list), on `device` by a non-blocking copy: it need not wait
    for the device's queued work (safe from pageable memory, which is staged before the copy returns)."""
    return torch.as_tensor(index, dtype=torch.int64).to(device, non_blocking=True)
