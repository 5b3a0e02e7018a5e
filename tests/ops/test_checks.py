"""The argument checks of the fused linear losses (fastalign/ops/checks.py), through the ops that call them, and
int_ids, which TreeRunner's integer arguments share."""
import numpy as np
import pytest
import torch
import torch.distributed as dist

import fastalign
from fastalign.ops.checks import int_ids, is_finite_real, real_as_float


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


def test_is_finite_real_is_false_for_an_int_too_big_for_a_float():
    """YAML and JSON read 400 digits as an int, on which math.isfinite raised OverflowError: the settings it checked
    crashed with a traceback where inf got an error naming the setting."""
    finite = [0, -3, 1.5, 10 ** 308, np.float32(2.5), np.int64(7), np.float64(-1e308)]
    other = [10 ** 400, -10 ** 400, float("inf"), float("-inf"), float("nan"), np.float32("inf"), True, "1", None, 1j]
    assert [is_finite_real(value) for value in finite] == [True] * len(finite)
    assert [is_finite_real(value) for value in other] == [False] * len(other)
    # (RAIN's settings that may be infinite take any number a float holds: inf, and no int beyond one)
    assert real_as_float(float("inf")) == float("inf") and real_as_float(np.int64(3)) == 3.0
    assert real_as_float(10 ** 400) is None and real_as_float(True) is None and real_as_float("1") is None


def test_int_ids_take_ints_of_any_container_and_refuse_bools_among_them():
    """One check of "a 1-D sequence of int ids" for every integer list TreeRunner takes: its four copies disagreed on
    a bool among ints (numpy reads True as 1), two of them taking it as 1."""
    ids = torch.randint(0, 50, (6,))
    for values in (ids.tolist(), tuple(ids.tolist()), ids.numpy(), ids, [np.int64(i) for i in ids.tolist()]):
        assert int_ids(values, "ids", "token ids").tolist() == ids.tolist()
    assert int_ids([], "cuts", "offsets", empty=True).dtype == np.int64
    with pytest.raises(ValueError, match=r"^ids: expected int token ids, got a bool among them \(numpy reads True"):
        int_ids([*ids.tolist(), True], "ids", "token ids")
    with pytest.raises(ValueError, match="^ids: expected int token ids, got a bool among them"):
        int_ids([np.bool_(False), 3], "ids", "token ids")
    with pytest.raises(ValueError, match="^ids: expected a non-empty 1-D sequence of int token ids, got an empty one$"):
        int_ids([], "ids", "token ids")   # (numpy reads [] as float64, nothing the caller gave)
    refused = [([True, False], r"\[2\] of bool"), ([1.0], r"\[1\] of float64"),
               (torch.tensor([True]), r"\[1\] of bool"), ([[1, 2]], r"\[1, 2\] of int64"),
               ([[1], [2, 3]], r"\[2\] of object"), (5, r"\[\] of int64")]
    for values, shape in refused:
        with pytest.raises(ValueError, match=f"^ids: expected a non-empty 1-D sequence of int token ids, got shape "
                                             f"{shape}$"):
            int_ids(values, "ids", "token ids")
    with pytest.raises(ValueError, match=r"^cuts: expected a 1-D sequence of int offsets, got shape \[1, 0\]"):
        int_ids([[]], "cuts", "offsets", empty=True)
