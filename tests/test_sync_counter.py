"""The sync counter the regression tests of host-device round trips rely on: it counts what a GPU run would wait
for on tensors that would live on the device, and nothing done with host tensors."""
import torch

from tests.sync_counter import SyncCounter


def test_counts_each_kind_of_round_trip_on_device_tensors_once():
    layer = torch.nn.Linear(4, 3)
    with SyncCounter(layer) as counter:
        out = layer(torch.randn(5, 4))                   # a result of a device parameter: on the device
        out.sum().item()
        int(out[0, 0] > 0)
        out[out > 0]                                     # a bool mask: nonzero inside
        torch.repeat_interleave(torch.arange(3, device=torch.device("cpu")), torch.ones(3, dtype=torch.long,
                                                                                           device=torch.device("cpu")))
        out.cpu().tolist()                               # one copy; the host copy's tolist is free
        out.detach().numpy()
        out.to("cpu")
        torch.unique(out)
    kinds = sorted(key.split(" @ ")[0] for key in counter.syncs.elements())
    assert kinds == sorted(["_local_scalar_dense.default"] * 2 + ["index.Tensor", "repeat_interleave.Tensor", "cpu",
                                                                 "numpy", "to('cpu')", "_unique2.default"])
    assert {key.split(" @ ")[1] for key in counter.by_file()} == {"tests/test_sync_counter.py"}


def test_host_tensors_and_round_trip_free_ops_are_not_counted():
    counter = SyncCounter()
    with counter:
        host = torch.tensor([3, 1, 2])
        host.tolist(), int(host.sum()), host[host > 1], host.nonzero()
        moved = host.to(torch.device("cpu"))             # a GPU run copies it to the device
        moved.index_select(0, torch.tensor([0, 2]).to(torch.device("cpu"), non_blocking=True))
        torch.repeat_interleave(moved, moved, output_size=6)
        torch.nonzero_static(moved > 1, size=2)
        host.tolist()                                    # the host tensor stays apart from its device copy
    assert counter.total == 0, counter.syncs
    with counter:
        moved.tolist()
    assert counter.total == 1
