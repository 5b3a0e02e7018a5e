"""TokenRows, seen through the fused losses that use it: the token weights their backward applies."""
import pytest
import torch

import fastalign
from fastalign.reference.linear_losses import linear_cross_entropy_reference, linear_kl_div_reference
from tests.compare import REL_TOL, assert_grads_close
from tests.conftest import device_for


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("loss", ["cross_entropy", "kl_div"])
def test_token_weight_refilled_after_forward_leaves_gradients_unchanged(backend, loss):
    """A caller may refill its token_weight buffer (the next micro-batch) before backpropagating the loss: the
    gradients are those of the weights the forward saw. Every token is live here, the case where the weights
    were kept by reference and the backward silently used the new ones."""
    device = device_for(backend)
    hidden = torch.randn(9, 16, device=device, requires_grad=True)
    weight = (torch.randn(37, 16, device=device) / 4).requires_grad_()
    token_weight = torch.rand(9, device=device) + 0.5
    if loss == "cross_entropy":
        target = torch.randint(0, 37, (9,), device=device)
        want = linear_cross_entropy_reference(hidden, weight, target, token_weight=token_weight, reduction="none")
        got = fastalign.linear_cross_entropy(hidden, weight, target, token_weight=token_weight, reduction="none",
                                             backend=backend)
    else:
        ref_hidden, ref_weight = torch.randn(9, 16, device=device), torch.randn(37, 16, device=device) / 4
        want = linear_kl_div_reference(hidden, weight, ref_hidden, ref_weight, token_weight=token_weight,
                                       reduction="none")
        got = fastalign.linear_kl_div(hidden, weight, ref_hidden, ref_weight, token_weight=token_weight,
                                      reduction="none", backend=backend)
    token_weight.neg_()  # the reference's graph holds its own float64 copy of the weights
    assert_grads_close(["d_hidden", "d_weight"], got, want, [hidden, weight], REL_TOL[torch.float32])
