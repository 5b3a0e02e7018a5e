"""to_host gives each tensor back with its own dtype, shape and values, whatever the dtypes before it (a byte
offset a wider dtype could not be viewed at); index_on gives an int64 index on the device asked for."""
import pytest
import torch

from fastalign.transfers import index_on, to_host
from tests.conftest import TRITON_DEVICE


def test_to_host_gives_each_tensor_back_as_it_was():
    """Odd byte counts first (bool, uint8, one float16), so that every later tensor starts at an offset its dtype
    cannot be viewed at; a 0-d, an empty and a non-contiguous tensor among them."""
    g = torch.Generator().manual_seed(0)
    tensors = [torch.rand(3, generator=g) > 0.5, torch.randint(0, 255, (5,), dtype=torch.uint8, generator=g),
               torch.randn(1, dtype=torch.float16, generator=g), torch.randn(3, 5, generator=g, dtype=torch.float64),
               torch.tensor(7), torch.empty(0, 4, dtype=torch.int32), torch.randn(4, 6, generator=g).t(),
               torch.randn(2, 3, generator=g).to(torch.bfloat16), torch.randint(-9, 9, (2, 2), generator=g)]
    out = to_host([t.to(TRITON_DEVICE) for t in tensors])
    assert len(out) == len(tensors)
    for before, after in zip(tensors, out):
        assert after.device.type == "cpu" and after.dtype == before.dtype and after.shape == before.shape
        assert torch.equal(after, before)


def test_to_host_copies_are_the_callers_own():
    """Writing into one copy changes neither the tensor copied nor another copy."""
    a, b = torch.zeros(3), torch.ones(2)
    out = to_host([a, b])
    out[0] += 5
    assert torch.equal(a, torch.zeros(3)) and torch.equal(out[1], torch.ones(2))


def test_to_host_of_nothing_is_nothing():
    assert to_host([]) == []


@pytest.mark.parametrize("index", [[0, 3, 2], torch.tensor([1, 0], dtype=torch.int32), []])
def test_index_on_is_int64_on_the_device(index):
    on = index_on(index, TRITON_DEVICE)
    assert on.dtype == torch.int64 and on.device.type == TRITON_DEVICE
    assert on.tolist() == torch.as_tensor(index).tolist()


def test_to_host_makes_one_copy_for_all_tensors():
    """One cat (the one copy to the host) and no copy per tensor, whatever the byte offsets the dtypes give: each
    tensor was cloned out of the host buffer before (1 clone per tensor, 7 per RAIN model call)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Copies(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket in (torch.ops.aten.clone, torch.ops.aten.copy_, torch.ops.aten.cat,
                                       torch.ops.aten._to_copy):
                self.ops.append(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    g = torch.Generator().manual_seed(1)
    tensors = [torch.rand(5, generator=g) > 0.5, torch.randn(3, 4, generator=g, dtype=torch.float64),
               torch.randn(3, dtype=torch.float16, generator=g), torch.randint(-9, 9, (7,), generator=g),
               torch.randn(2, 3, generator=g)]
    with Copies() as copies:
        out = to_host(tensors)
    assert copies.ops == ["cat"]
    for before, after in zip(tensors, out):
        assert after.data_ptr() % after.element_size() == 0 and torch.equal(after, before)
