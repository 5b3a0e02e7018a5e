"""TokenRows, seen through the fused losses that use it: the token weights their backward applies."""
import pytest
import torch

import fastalign
from fastalign.reference.linear_losses import linear_cross_entropy_reference, linear_kl_div_reference
from tests.compare import REL_TOL, assert_grads_close, assert_rel_close, grads_of
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


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("loss", ["cross_entropy", "kl_div"])
def test_a_nan_token_weight_gives_a_nan_loss(backend, loss):
    """A NaN weight (a bad advantage, say) is a live token, not a zero-weight one dropped before the matmul: its NaN
    shows in the loss, in its own row of "none" alone."""
    device = device_for(backend)
    hidden, weight = torch.randn(7, 16, device=device), torch.randn(37, 16, device=device) / 4
    token_weight = torch.rand(7, device=device) + 0.5
    token_weight[3] = float("nan")
    for reduction in ("sum", "none"):
        if loss == "cross_entropy":
            out = fastalign.linear_cross_entropy(hidden, weight, torch.randint(0, 37, (7,), device=device),
                                                 token_weight=token_weight, reduction=reduction, backend=backend)
        else:
            out = fastalign.linear_kl_div(hidden, weight, torch.randn(7, 16, device=device), weight / 2,
                                          token_weight=token_weight, reduction=reduction, backend=backend)
        assert out.isnan().tolist() == ([i == 3 for i in range(7)] if reduction == "none" else True)


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("loss", ["cross_entropy", "kl_div"])
def test_float64_losses_weigh_and_scale_in_float64(loss, reduction, weighted):
    """float64 inputs, token weights and upstream gradients, 7 tokens counted: the rows' weights and the backward's
    scales stay float64, so the loss and gradients match the float64 reference to 1e-10 (a float32 step there, in
    the weights, the upstream gradient or its division by 7, is off by ~1e-8)."""
    hidden = torch.randn(9, 16, dtype=torch.float64, requires_grad=True)
    weight = (torch.randn(37, 16, dtype=torch.float64) / 4).requires_grad_()
    extra = {"token_weight": torch.randn(9, dtype=torch.float64)} if weighted else {}
    if loss == "cross_entropy":
        target = torch.randint(0, 37, (9,))
        target[2:4] = -100
        want = linear_cross_entropy_reference(hidden, weight, target, reduction=reduction, **extra)
        got = fastalign.linear_cross_entropy(hidden, weight, target, reduction=reduction, backend="torch", **extra)
    else:
        ref_hidden, ref_weight = torch.randn(9, 16, dtype=torch.float64), torch.randn(37, 16, dtype=torch.float64) / 4
        extra["mask"] = (torch.arange(9) < 2) | (torch.arange(9) >= 4)
        want = linear_kl_div_reference(hidden, weight, ref_hidden, ref_weight, reduction=reduction, **extra)
        got = fastalign.linear_kl_div(hidden, weight, ref_hidden, ref_weight, reduction=reduction, backend="torch",
                                      **extra)
    assert got.dtype == torch.float64
    assert_rel_close("loss", got, want, REL_TOL[torch.float64])
    seed = torch.randn(got.shape, dtype=torch.float64)
    for name, g, w in zip(["d_hidden", "d_weight"], grads_of(got, [hidden, weight], seed),
                          grads_of(want, [hidden, weight], seed)):
        assert_rel_close(name, g, w, REL_TOL[torch.float64])


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("live", [0, 1, 7])
def test_a_target_outside_the_vocabulary_is_refused_whatever_rows_live(backend, live):
    """The refused target is found in the same wait as the live rows: it is refused even where no row lives (every
    token weight 0, its own included), where a count of the live rows alone could not tell it apart."""
    device = device_for(backend)
    hidden, weight = torch.randn(7, 16, device=device), torch.randn(37, 16, device=device) / 4
    target = torch.randint(0, 37, (7,), device=device)
    target[5] = 40
    token_weight = (torch.arange(7, device=device) < live).float()
    with pytest.raises(ValueError, match=r"target values must lie in \[0, 37\) .*; found 40"):
        fastalign.linear_cross_entropy(hidden, weight, target, token_weight=token_weight, backend=backend)


@pytest.mark.parametrize("loss", ["cross_entropy", "kl_div"])
def test_the_default_device_leaves_the_live_row_count_on_the_host(loss):
    """torch.set_default_device put num_live, which the backward reads without waiting for the device, where the
    default device was: on a GPU a wait at every backward; with 'meta' (tensors passed on the CPU), the loss failed
    with torch's 'Tensor.item() cannot be called on meta tensors', naming neither."""
    hidden = torch.randn(9, 16, requires_grad=True)
    weight = (torch.randn(37, 16) / 4).requires_grad_()
    target = torch.randint(0, 37, (9,))
    want = grads_of(linear_cross_entropy_reference(hidden, weight, target) if loss == "cross_entropy"
                    else linear_kl_div_reference(hidden, weight, hidden.detach().flip(0), weight.detach()),
                    [hidden, weight], torch.ones(()))
    torch.set_default_device("meta")
    try:
        got = (fastalign.linear_cross_entropy(hidden, weight, target) if loss == "cross_entropy"
               else fastalign.linear_kl_div(hidden, weight, hidden.detach().flip(0), weight.detach()))
        got_grads = torch.autograd.grad(got, [hidden, weight])
    finally:
        torch.set_default_device(None)
    for name, g, w in zip(["d_hidden", "d_weight"], got_grads, want):
        assert_rel_close(name, g, w, REL_TOL[torch.float32])
