"""The trainer's AdamW: KahanAdamW where weights train in bf16; otherwise torch's, fused on CUDA parameters that FSDP
does not shard, torch's default elsewhere; fused, it updates as the default does (to the rounding of its fp32
arithmetic)."""
from types import SimpleNamespace

import pytest
import torch

from fastalign.optim import KahanAdamW
from fastalign.unlearn.optimizer import adamw, uses_fused_adamw
from tests.conftest import requires_cuda


def on(device):
    return SimpleNamespace(device=torch.device(device))


@pytest.mark.parametrize("params, sharded, fused", [
    ([on("cuda"), on("cuda:1")], False, True), ([on("cuda"), on("cpu")], False, False), ([on("cpu")], False, False),
    ([on("cuda")], True, False), ([], False, False)])
def test_fused_only_on_cuda_parameters_that_fsdp_does_not_shard(params, sharded, fused):
    assert uses_fused_adamw(params, sharded) is fused


def test_cpu_parameters_get_torchs_default():
    optimizer = adamw([torch.nn.Parameter(torch.ones(3))], lr=1e-3, weight_decay=0.1)
    assert optimizer.defaults["fused"] is None and optimizer.defaults["weight_decay"] == 0.1


@pytest.mark.parametrize("dtypes, kahan", [([torch.bfloat16], True), ([torch.float32, torch.bfloat16], True),
                                           ([torch.float32], False)])
def test_bf16_weights_get_kahan_adamw(dtypes, kahan):
    optimizer = adamw([torch.nn.Parameter(torch.ones(3, dtype=dtype)) for dtype in dtypes], lr=1e-3, weight_decay=0.1)
    assert isinstance(optimizer, KahanAdamW) is kahan and optimizer.defaults["weight_decay"] == 0.1


@requires_cuda
def test_the_fused_step_updates_as_the_default_does(dtype=torch.float32):
    torch.manual_seed(0)
    start = torch.randn(1000, device="cuda", dtype=dtype)
    weights = [torch.nn.Parameter(start.clone()) for _ in range(2)]
    fused, default = adamw([weights[0]], lr=1e-2), torch.optim.AdamW([weights[1]], lr=1e-2)
    assert fused.defaults["fused"] is True
    for _ in range(3):
        gradient = torch.randn(1000, device="cuda", dtype=dtype)
        for weight, optimizer in zip(weights, (fused, default)):
            weight.grad = gradient.clone()
            optimizer.step()
    assert not torch.equal(weights[0], start)
    torch.testing.assert_close(weights[0], weights[1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_adamw_steps_at_the_learning_rate_it_is_given(dtype):
    """An lr other than torch's and KahanAdamW's default (1e-3), so that one dropped shows: the group's lr, and the
    first step, which moves every weight by about lr (no weight decay)."""
    weight = torch.nn.Parameter(torch.ones(64, dtype=dtype))
    optimizer = adamw([weight], lr=0.25, weight_decay=0.0)
    assert optimizer.param_groups[0]["lr"] == 0.25
    weight.grad = torch.ones(64, dtype=dtype)
    optimizer.step()
    torch.testing.assert_close(weight.detach().float(), torch.full((64,), 0.75), rtol=0, atol=1e-2)
