"""The Kahan AdamW kernel against its torch implementation, to the bit: several steps, at odd sizes (none, one element,
one past a block, a width no block divides), with and without compensation; and its sm_90 build, whose arithmetic must
round as torch's does (no FMA, IEEE square root and division)."""
import pytest
import torch

from fastalign.kernels import kahan_adamw as triton_step
from fastalign.ops.torch_chunked import kahan_adamw as torch_step
from fastalign.optim.kahan_adamw import step_scalars
from tests.conftest import TRITON_DEVICE, triton_cases

SIZES = [(0,), (1,), (1025,), (3, 333)]


def tensors(shape, dtype, compensated, seed):
    """A weight of magnitude 0.02, its moments after a few steps, and a small compensation."""
    torch.manual_seed(seed)
    made = [0.02 * torch.randn(shape), 1e-3 * torch.randn(shape), 1e-6 * torch.rand(shape)]
    made.append(1e-5 * torch.randn(shape) if compensated else None)
    return [None if t is None else t.to(TRITON_DEVICE, dtype) for t in made]


@pytest.mark.parametrize("shape", triton_cases(SIZES))
@pytest.mark.parametrize("dtype, compensated", [(torch.bfloat16, True), (torch.float32, False),
                                                (torch.bfloat16, False), (torch.float32, True)])
def test_the_kernel_steps_as_the_torch_implementation_to_the_bit(shape, dtype, compensated):
    states = [tensors(shape, dtype, compensated, seed=0) for _ in range(2)]
    for t in range(1, 4):
        grad = (1e-3 * torch.randn(shape)).to(TRITON_DEVICE, dtype)
        scalars = step_scalars(lr=1e-3 * t, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1, step=t)
        for launcher, (param, exp_avg, exp_avg_sq, compensation) in zip((torch_step, triton_step), states):
            launcher.step(param, grad, exp_avg, exp_avg_sq, compensation, **scalars)
    for name, ours, theirs in zip(("param", "exp_avg", "exp_avg_sq", "compensation"), *states):
        if ours is not None:
            assert torch.equal(ours, theirs), name
    if shape != (0,):   # the step did something
        assert not torch.equal(states[0][0], tensors(shape, dtype, compensated, seed=0)[0])


def test_a_gradient_whose_square_overflows_steps_on_both_to_the_bit():
    """A gradient of 1e20: v took (g g) (1 - beta2), whose g g overflows fp32 (|g| > 1.8e19), so v was inf and the
    weight did not move; ((1 - beta2) g) g, as torch's AdamW takes it, is finite, in both implementations alike."""
    states = [tensors((5,), torch.float32, False, seed=0) for _ in range(2)]
    grad = torch.full((5,), 1e20, device=TRITON_DEVICE)
    scalars = step_scalars(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, step=1)
    for launcher, (param, exp_avg, exp_avg_sq, compensation) in zip((torch_step, triton_step), states):
        launcher.step(param, grad, exp_avg, exp_avg_sq, compensation, **scalars)
    for name, ours, theirs in zip(("param", "exp_avg", "exp_avg_sq"), *states):
        assert torch.equal(ours, theirs), name
    param, _, exp_avg_sq, _ = states[0]
    assert torch.isfinite(exp_avg_sq).all()
    torch.testing.assert_close(param.cpu(), tensors((5,), torch.float32, False, seed=0)[0].cpu() - 1e-2)

@pytest.mark.parametrize("size", [1, 1025, 2048])
def test_the_kernel_writes_nothing_past_its_tensors(size):
    """Each tensor the last `size` elements of a buffer followed by one more, as a parameter flattened into a larger
    allocation is: the step changes the tensors' elements and leaves the element after each as it was."""
    buffers = [torch.full((size + 1,), 7.0, device=TRITON_DEVICE, dtype=torch.bfloat16) for _ in range(5)]
    param, grad, exp_avg, exp_avg_sq, compensation = (buffer[:size] for buffer in buffers)
    for view, made in zip((param, exp_avg, exp_avg_sq, compensation), tensors((size,), torch.bfloat16, True, seed=2)):
        view.copy_(made)
    grad.copy_(1e-3 * torch.randn(size))
    scalars = step_scalars(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1, step=1)
    before = param.clone()
    triton_step.step(param, grad, exp_avg, exp_avg_sq, compensation, **scalars)
    assert not torch.equal(param, before)
    assert [float(buffer[-1]) for buffer in buffers] == [7.0] * 5


def test_the_torch_implementation_steps_in_chunks(monkeypatch):
    """Chunked (a chunk smaller than the tensor, one that does not divide it), it gives the bits of one chunk."""
    start = [t.cpu() for t in tensors((1000,), torch.bfloat16, True, seed=1)]
    grad = (1e-3 * torch.randn(1000)).bfloat16()
    scalars = step_scalars(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1, step=1)
    whole, chunked = ([t.clone() for t in start] for _ in range(2))
    torch_step.step(whole[0], grad, *whole[1:], **scalars)
    monkeypatch.setattr(torch_step, "CPU_CHUNK", 300)
    torch_step.step(chunked[0], grad, *chunked[1:], **scalars)
    for name, ours, theirs, before in zip(("param", "exp_avg", "exp_avg_sq", "compensation"), chunked, whole, start):
        assert torch.equal(ours, theirs) and not torch.equal(ours, before), name


def test_the_torch_implementation_steps_cpu_tensors_in_chunks_whose_temporaries_the_allocator_reuses(monkeypatch):
    """On the CPU, chunks of 4M elements made each of the step's fp32 temporaries 16 MiB, mapped afresh at each
    step (26500 page faults a step of 2M weights, 4x its CPU time): chunks of 64K elements there, 4M on a GPU
    (where each chunk is ~30 launches)."""
    sizes = []
    monkeypatch.setattr(torch_step, "_step_chunk", lambda param, *args, **scalars: sizes.append(param.numel()))
    scalars = step_scalars(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1, step=1)
    for device, expected in (("cpu", [1 << 16] * 3), ("meta", [3 << 16])):   # (meta: a GPU's chunks, no memory)
        sizes.clear()
        torch_step.step(*[torch.zeros(3 << 16, dtype=torch.bfloat16, device=device)] * 5, **scalars)
        assert sizes == expected, device


COMPILE_FOR_SM90 = """
import itertools

from fastalign.kernels.kahan_adamw import _BLOCK, _kahan_adamw_kernel
from tests.kernels.gpu_build import build_for_gpu, check_build, stack_bytes

scalars = ("beta1", "one_minus_beta1", "beta2", "one_minus_beta2", "eps", "decay", "step_size",
           "bias_correction2_sqrt")
for (dtype, compensate), capability in itertools.product((("bf16", True), ("bf16", False), ("fp32", False)),
                                                         (90, 80, 89)):
    pointers = {name: "*" + dtype for name in ("Param", "Grad", "ExpAvg", "ExpAvgSq", "Compensation")}
    compiled = build_for_gpu(_kahan_adamw_kernel, dict(pointers, **dict.fromkeys(scalars, "fp32")),
                             dict(COMPENSATE=compensate, BLOCK=_BLOCK), 4, 1, capability, enable_fp_fusion=False)
    what = ("kahan adamw", dtype, compensate, capability)
    check_build(compiled, what, tuned=False, capability=capability)
    assert stack_bytes(compiled) == 0, (what, "spills registers")
    ptx = compiled.asm["ptx"]
    assert "fma." not in ptx, (what, "a multiply-add contracted to FMA")
    assert "sqrt.rn.f32" in ptx and "sqrt.approx" not in ptx, (what, "square root not IEEE")
    assert "div.rn.f32" in ptx and "div.full" not in ptx and "div.approx" not in ptx, (what, "division not IEEE")
"""


def test_kernel_compiles_for_sm90_without_a_gpu():
    """What the interpreter never does: the build (for an H100, and an A100 and an L4 too), and the rounding of its
    arithmetic as torch's (the GPU's FMA and approximate square root and division would give other bits than the
    torch implementation)."""
    from tests.kernels.gpu_build import assert_builds
    assert_builds(COMPILE_FOR_SM90)
