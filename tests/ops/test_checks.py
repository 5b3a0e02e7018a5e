"""The argument checks of the fused linear losses (fastalign/ops/checks.py), through the ops that call them."""
import pytest
import torch
import torch.distributed as dist

import fastalign


@pytest.fixture(scope="module")
def mesh():
    """A device mesh over a gloo group of one process, to make DTensors on the CPU."""
    from torch.distributed.device_mesh import init_device_mesh
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield init_device_mesh("cpu", (1,))
    dist.destroy_process_group()


@pytest.mark.parametrize("placement", ["Shard", "Replicate"])
def test_a_dtensor_weight_is_refused_by_name_with_the_way_to_gather_it(mesh, placement):
    """FSDP2 leaves model.lm_head.weight a DTensor outside its unit's forward, which the ops accepted and then failed
    on deep inside the chunked matmul (torch's "aten.mm.default got mixed torch.Tensor and DTensor")."""
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor
    hidden, weight = torch.randn(7, 16, requires_grad=True), torch.randn(29, 16, requires_grad=True)
    target = torch.randint(0, 29, (7,))
    sharded = distribute_tensor(weight, mesh, [Shard(0) if placement == "Shard" else Replicate()])
    calls = {"weight": lambda: fastalign.linear_cross_entropy(hidden, sharded, target),
             "ref_weight": lambda: fastalign.linear_kl_div(hidden, weight, hidden.detach(), sharded.detach())}
    for name, call in calls.items():
        with pytest.raises(ValueError, match=f"^{name} must be a plain tensor, got a DTensor") as error:
            call()
        for phrase in [f"{name}.full_tensor()", "CausalLMLoss", placement]:
            assert phrase in str(error.value), phrase
    loss = fastalign.linear_cross_entropy(hidden, sharded.full_tensor(), target)   # what the error advises
    torch.testing.assert_close(loss, fastalign.linear_cross_entropy(hidden, weight, target))


@pytest.mark.parametrize("layout", [torch.strided, torch.jagged])
def test_a_nested_tensor_is_refused_by_name(layout):
    """A nested tensor of torch's default layout (torch.strided) passed the dense check, then failed in torch with
    "Internal error: NestedTensorImpl doesn't support sizes. Please file an issue"."""
    def nested(*rows):
        return torch.nested.nested_tensor(list(rows), layout=layout)
    hidden, weight = nested(torch.randn(3, 8), torch.randn(2, 8)), torch.randn(16, 8)
    calls = {"hidden": lambda: fastalign.linear_cross_entropy(hidden, weight, nested(torch.arange(3), torch.arange(2))),
             "x": lambda: fastalign.rms_norm(hidden, torch.ones(8)),
             "gate": lambda: fastalign.gated_linear(hidden, hidden, torch.randn(4, 8))}
    for name, call in calls.items():
        with pytest.raises(TypeError, match=f"^{name} must be a dense tensor, got a nested tensor .* pad it"):
            call()
    with pytest.raises(TypeError, match="^hidden must be a dense tensor, got a nested tensor"):
        fastalign.linear_kl_div(hidden, weight, hidden, weight)
