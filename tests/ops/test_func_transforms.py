"""The fused losses' vmap rule at its edge: an empty batch, where a loop over the samples has nothing to stack; and
torch.autograd's own batched backward (legacy vmap), which no vmap rule reaches.

torch.func itself (grad, vjp, jacrev, vmap, second derivatives) is tested with each op, in test_linear_*.py."""
import pytest
import torch

import fastalign
from tests.conftest import device_for


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


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("op", ["linear_cross_entropy", "linear_kl_div"])
@pytest.mark.parametrize("batched_backward", [
    lambda f, h: torch.autograd.grad(f(h), h, torch.eye(5, device=h.device), is_grads_batched=True),
    lambda f, h: torch.autograd.functional.jacobian(f, h, vectorize=True)], ids=["is_grads_batched", "jacobian"])
def test_a_backward_batched_by_torch_autograd_is_refused_by_name(backend, op, batched_backward):
    """torch.autograd.grad(is_grads_batched=True) and torch.autograd.functional's vectorize=True batch the backward
    by torch's legacy vmap, which no vmap rule reaches: the launchers crashed deep inside (an in-place op on
    batched tensors; the Triton kernels' .item())."""
    device = device_for(backend)
    weight, target, states = torch.randn(37, 16, device=device), torch.randint(0, 37, (5,), device=device), \
        torch.randn(2, 5, 16, device=device)
    if op == "linear_cross_entropy":
        def per_token(h):
            return fastalign.linear_cross_entropy(h, weight, target, reduction="none", backend=backend)
    else:
        def per_token(h):
            return fastalign.linear_kl_div(h, weight, states[1], weight / 2, reduction="none", backend=backend)
    with pytest.raises(RuntimeError, match=f"{op}'s backward cannot run batched by torch.autograd's legacy vmap"):
        batched_backward(per_token, states[0].clone().requires_grad_())
