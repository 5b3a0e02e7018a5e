"""Every kernel launch runs with its inputs' CUDA device current: Triton launches on the current device, so a
tensor on cuda:1 while cuda:0 is current would fail to launch or be read on the wrong device."""
import contextlib

import pytest
import torch

import fastalign
from fastalign.kernels import device_guard
from fastalign.ops.paged_attention import paged_attention
from tests.kernels.test_launch_options import KERNELS, launch_every_kernel, record_launches
from tests.ops.test_paged_attention import make_paged_batch


def test_a_cpu_tensor_needs_no_device():
    assert isinstance(device_guard.device_of(torch.zeros(1)), contextlib.nullcontext)


def test_a_cuda_tensor_makes_its_own_device_current():
    class OnSecondGpu:   # a stand-in: building the guard needs no CUDA device, only entering it does
        device = torch.device("cuda", 1)

    guard = device_guard.device_of(OnSecondGpu())
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1


def test_the_guard_is_the_first_parameters_device_by_position_or_by_name(monkeypatch):
    """The launchers are called with their first tensor by position (the ops) or by name (paged attention's
    arguments as keywords): the guard makes that tensor's device current, not another argument's."""
    entered = []

    def recording_device(device):
        entered.append(device)
        return contextlib.nullcontext()

    @device_guard.on_device_of_first_input
    def launcher(first, second, third=None):
        return entered[:]

    class OnGpu:   # stand-ins: no CUDA device is entered
        def __init__(self, index):
            self.device = torch.device("cuda", index)

    monkeypatch.setattr(torch.cuda, "device", recording_device)
    first, second, third = OnGpu(1), OnGpu(2), OnGpu(3)
    calls = [lambda: launcher(first, second, third), lambda: launcher(first, second=second, third=third),
             lambda: launcher(third=third, second=second, first=first)]
    for call in calls:
        entered.clear()
        assert call() == [torch.device("cuda", 1)]


def test_every_launch_runs_under_the_guard_of_its_inputs(monkeypatch):
    active = []

    @contextlib.contextmanager
    def recording_guard(tensor):
        active.append(tensor.device)
        yield
        active.pop()

    monkeypatch.setattr(device_guard, "device_of", recording_guard)
    launches = record_launches(monkeypatch, lambda name, kwargs: (name, tuple(active)))
    launch_every_kernel()
    assert {name for name, _ in launches} == KERNELS
    devices = {guards for _, guards in launches}
    assert len(devices) == 1 and len(next(iter(devices))) == 1, launches


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_kernels_run_on_a_device_that_is_not_current():
    device = torch.device("cuda", 1)
    hidden = torch.randn(9, 64, device=device, dtype=torch.bfloat16, requires_grad=True)
    weight = torch.randn(300, 64, device=device, dtype=torch.bfloat16, requires_grad=True)
    target = torch.randint(0, 300, (9,), device=device)
    with torch.cuda.device(0):
        results = {}
        for backend in ("triton", "torch"):
            hidden.grad = weight.grad = None
            loss = fastalign.linear_cross_entropy(hidden, weight, target, backend=backend)
            loss = loss + fastalign.linear_kl_div(hidden, weight, hidden.detach().flip(0), weight.detach(),
                                                  backend=backend)
            loss.backward()
            results[backend] = [loss.detach().float(), hidden.grad.float(), weight.grad.float()]
        batch = make_paged_batch([(40, 1), (9, 2)], 16, 4, 2, 16, device=device)
        attention = {backend: paged_attention(**batch, scale=0.25, backend=backend)
                     for backend in ("triton", "torch")}
    for fast, slow in zip(results["triton"], results["torch"]):
        torch.testing.assert_close(fast, slow, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(attention["triton"].float(), attention["torch"].float(), rtol=2e-3, atol=2e-3)
