"""The fused losses' vmap rule at its edge: an empty batch, where a loop over the samples has nothing to stack.

torch.func itself (grad, vjp, jacrev, vmap, second derivatives) is tested with each op, in test_linear_*.py."""
import pytest
import torch

import fastalign


@pytest.mark.parametrize("op", ["linear_cross_entropy", "linear_kl_div"])
def test_vmap_over_an_empty_batch_is_refused_by_name(op):
    weight, target = torch.randn(37, 16), torch.randint(0, 37, (0, 5))
    states = torch.randn(0, 5, 16)
    if op == "linear_cross_entropy":
        run = torch.func.vmap(lambda h, y: fastalign.linear_cross_entropy(h, weight, y, backend="torch"))
    else:
        run = torch.func.vmap(lambda h, r: fastalign.linear_kl_div(h, weight, r, weight, backend="torch"))
    with pytest.raises(ValueError, match=f"{op} under torch.func.vmap needs at least one sample, got a batch of 0"):
        run(states, target if op == "linear_cross_entropy" else states)
