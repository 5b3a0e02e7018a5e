"""kernels/gated_activation.py against the torch ops it stands for in a gated MLP, act(gate) * up with torch's silu
or gelu(approximate="tanh"), each op rounded to the dtype, and against their autograd: close in every dtype at odd
widths (a partial last block, several blocks a row), one row, no row, 3-D inputs and strided rows. In 16-bit dtypes
the outputs equal torch's but for one-unit differences in few entries, and in the GELU's far negative tail, where
torch's 1 + tanh(u) cancels to few bits (down to 0) and the kernel's x * sigmoid(2u) keeps them."""
import pytest
import torch
import torch.nn.functional as F

from fastalign.kernels import gated_activation
from tests.compare import REL_TOL, assert_rel_close
from tests.conftest import TRITON_DEVICE

# exp(-x) overflows to inf far below 0, where x / (1 + inf) is the -0 that the GPU gives too: numpy warns of it
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")
TOLERANCES = {torch.float32: dict(rtol=1e-5, atol=1e-6), torch.float16: dict(rtol=1e-3, atol=1e-3),
              torch.bfloat16: dict(rtol=1e-2, atol=1e-2)}
ACTIVATIONS = {False: F.silu, True: lambda x: F.gelu(x, approximate="tanh")}


def gate_and_up(shape, dtype, seed=0):
    torch.manual_seed(seed)
    return [(3 * torch.randn(shape)).to(TRITON_DEVICE, dtype) for _ in range(2)]


def assert_as_torch(out, gate, up, tanh_gelu):
    activated = ACTIVATIONS[tanh_gelu](gate)
    ref = activated * up
    assert out.dtype == ref.dtype and out.shape == ref.shape
    torch.testing.assert_close(out, ref, **TOLERANCES[ref.dtype])
    if ref.dtype != torch.float32:
        outside_the_tail = activated.float().abs() >= 1e-2
        differ = (out != ref)[outside_the_tail]
        assert differ.sum() <= 2e-3 * differ.numel(), "more than the exponential's 1-unit differences"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("tanh_gelu", [False, True])
@pytest.mark.parametrize("shape", [(7, 1500), (1, 1), (3, 4, 37), (0, 8)])
def test_equals_the_torch_ops(shape, dtype, tanh_gelu):
    gate, up = gate_and_up(shape, dtype)
    assert_as_torch(gated_activation.forward(gate, up, tanh_gelu=tanh_gelu), gate, up, tanh_gelu)


def test_strided_rows():
    """gate and up as the two halves of one fused projection's rows [T, 2 * I]."""
    fused, _ = gate_and_up((5, 2 * 300), torch.bfloat16)
    gate, up = fused[:, :300], fused[:, 300:]
    assert_as_torch(gated_activation.forward(gate, up), gate, up, False)


def test_rounding_the_activation_is_needed():
    """The product of the fp32 activation, rounded once, is told apart from torch's two roundings: the test can
    fail."""
    gate, up = gate_and_up((16, 512), torch.bfloat16)
    once = (F.silu(gate.float()) * up.float()).to(torch.bfloat16)
    assert (once != F.silu(gate) * up).float().mean() > 0.05
    assert (gated_activation.forward(gate, up) != once).float().mean() > 0.05


def test_the_activations_are_told_apart():
    gate, up = gate_and_up((4, 64), torch.float32)
    with pytest.raises(AssertionError):
        assert_as_torch(gated_activation.forward(gate, up, tanh_gelu=True), gate, up, False)


def torch_backward(gate, up, grad_out, tanh_gelu):
    """(out, grad_gate, grad_up) of torch's two ops and their autograd."""
    gate, up = gate.detach().requires_grad_(), up.detach().requires_grad_()
    out = ACTIVATIONS[tanh_gelu](gate) * up
    return (out.detach(), *torch.autograd.grad(out, (gate, up), grad_out))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("tanh_gelu", [False, True])
@pytest.mark.parametrize("shape", [(7, 1500), (1, 1), (3, 4, 37), (0, 8)])
def test_backward_equals_torch_autograd(shape, dtype, tanh_gelu):
    """The recomputed product and both gradients, against torch's autograd of the two ops, in each dtype; in 16-bit
    ones, equal but for one-unit differences in few entries (the exponential, and the GELU's far tail)."""
    gate, up = gate_and_up(shape, dtype)
    grad_out = gate_and_up(shape, dtype, seed=1)[0]
    got = gated_activation.backward(gate, up, grad_out, tanh_gelu=tanh_gelu)
    for name, actual, expected in zip(("out", "grad_gate", "grad_up"), got, torch_backward(gate, up, grad_out,
                                                                                        tanh_gelu)):
        assert actual.dtype == dtype and actual.shape == expected.shape, name
        if dtype == torch.float32:   # norm-wise: the formulas differ in rounding where act' (x) cancels near 0
            assert_rel_close(name, actual, expected, REL_TOL[dtype])
            continue
        torch.testing.assert_close(actual, expected, **TOLERANCES[dtype], msg=name)
        if expected.numel():
            differ = (actual != expected) & (expected.float().abs() >= 1e-2)
            assert differ.sum() <= 5e-3 * differ.numel() + 1, f"{name}: more than 1-unit differences in few entries"


def test_backward_without_the_product():
    gate, up = gate_and_up((3, 40), torch.float32)
    out, grad_gate, grad_up = gated_activation.backward(gate, up, up, need_out=False)
    assert out is None
    expected = torch_backward(gate, up, up, False)
    assert_rel_close("grad_gate", grad_gate, expected[1], REL_TOL[torch.float32])
    assert_rel_close("grad_up", grad_up, expected[2], REL_TOL[torch.float32])


def test_backward_tells_the_activations_apart():
    gate, up = gate_and_up((4, 64), torch.float32)
    with pytest.raises(AssertionError):
        assert_rel_close("grad_gate", gated_activation.backward(gate, up, up, tanh_gelu=True)[1],
                         torch_backward(gate, up, up, False)[1], REL_TOL[torch.float32])



@pytest.mark.filterwarnings("ignore:overflow encountered in multiply:RuntimeWarning",
                            "ignore:invalid value encountered in multiply:RuntimeWarning")  # the formula not taken
def test_gelu_gradient_of_a_hugely_negative_gate_is_torchs():
    """The tanh GELU's derivative sigmoid(2u) (1 + x (1 - sigmoid(2u)) s'(x)): below a gate of ~-1.3e13, x s'(x)
    overflows to -inf while sigmoid(2u) is 0, and 0 * -inf gave a NaN gradient where torch's is 0."""
    gate = torch.tensor([[-1e18, -1e15, -1e14, -1e13, -50.0, 0.0, 3.0, 1e14]], device=TRITON_DEVICE)
    up = torch.ones_like(gate)
    grad_gate = gated_activation.backward(gate, up, up, tanh_gelu=True)[1]
    torch.testing.assert_close(grad_gate, torch_backward(gate, up, up, True)[1], rtol=1e-5, atol=1e-6)

COMPILE_FOR_SM90 = """
from fastalign.kernels.gated_activation import _gated_activation_backward_kernel, _gated_activation_kernel
from tests.kernels.gpu_build import build_for_gpu, check_build, stack_bytes

for dtype in ("bf16", "fp16", "fp32"):
    for tanh_gelu in (False, True):
        compiled = build_for_gpu(_gated_activation_kernel, dict(Gate="*" + dtype, Up="*" + dtype, Out="*" + dtype),
                                 dict(TANH_GELU=tanh_gelu, BLOCK=1024), 4, 1)
        check_build(compiled, ("gated activation", dtype, tanh_gelu), tuned=False)
        assert stack_bytes(compiled) == 0, (dtype, tanh_gelu, "spills registers")
        for store_out in (False, True):
            pointers = dict.fromkeys(("Gate", "Up", "GradOut", "Out", "GradGate", "GradUp"), "*" + dtype)
            compiled = build_for_gpu(_gated_activation_backward_kernel, pointers,
                                     dict(STORE_OUT=store_out, TANH_GELU=tanh_gelu, BLOCK=1024), 4, 1)
            check_build(compiled, ("gated activation backward", dtype, tanh_gelu, store_out), tuned=False)
            assert stack_bytes(compiled) == 0, (dtype, tanh_gelu, store_out, "spills registers")
"""


def test_kernel_compiles_for_sm90_without_a_gpu():
    """What the interpreter never does: the builds, at the block the launches of a 1B or larger model use."""
    from tests.kernels.gpu_build import assert_builds
    assert_builds(COMPILE_FOR_SM90)


def test_gate_and_up_of_different_row_strides():
    """gate a tensor of its own and up a half of a fused projection's rows (rows 600 apart): each is read by its own
    row stride, and the output is contiguous."""
    gate, _ = gate_and_up((5, 300), torch.bfloat16)
    fused, _ = gate_and_up((5, 2 * 300), torch.bfloat16, seed=1)
    up = fused[:, 300:]
    assert gate.stride(0) != up.stride(0)
    for tanh_gelu in (False, True):
        assert_as_torch(gated_activation.forward(gate, up, tanh_gelu=tanh_gelu), gate, up, tanh_gelu)
        assert_as_torch(gated_activation.forward(up, gate, tanh_gelu=tanh_gelu), up, gate, tanh_gelu)


@pytest.mark.parametrize("tanh_gelu", [False, True])
def test_a_nan_gate_gives_a_nan_gradient_as_torchs(tanh_gelu):
    """The guard for a sigmoid of 0, tl.where(sigmoid > 0, ..., 0), also took a NaN gate (its sigmoid NaN, not > 0):
    its gradient came out 0, hiding the NaN from the caller's checks, where torch's autograd gives NaN."""
    gate = torch.tensor([[float("nan"), 1.0, -3.0]], device=TRITON_DEVICE)
    up = torch.ones_like(gate)
    grad_gate = gated_activation.backward(gate, up, up, tanh_gelu=tanh_gelu)[1]
    torch.testing.assert_close(grad_gate, torch_backward(gate, up, up, tanh_gelu)[1], equal_nan=True)


@pytest.mark.parametrize("tanh_gelu", [False, True])
def test_a_gate_of_minus_infinity_gives_a_nan_gradient_as_torchs(tanh_gelu):
    """A gate of -inf has a sigmoid of 0, which the guard for a sigmoid of 0 took as a gradient of 0, where torch's
    autograd gives 0 * -inf = NaN (its forward, -inf * 0, is NaN in both): the NaN hidden from the caller's checks."""
    gate = torch.tensor([[float("-inf"), -1e4, 0.5, float("inf")]], device=TRITON_DEVICE)
    up = torch.ones_like(gate)
    grad_gate = gated_activation.backward(gate, up, up, tanh_gelu=tanh_gelu)[1]
    torch.testing.assert_close(grad_gate, torch_backward(gate, up, up, tanh_gelu)[1], equal_nan=True)
    assert grad_gate[0, 0].isnan()


def test_silu_gradient_far_in_its_tail_is_torchs_not_zero():
    """SiLU's derivative at gates of -70 and -80 is ~1e-29 and ~1e-33, not 0: only a sigmoid of exactly 0 is zeroed
    (a threshold above that passes the hugely negative gates' test, whose atol swallows such values)."""
    gate = torch.tensor([[-70.0, -80.0, -20.0]], device=TRITON_DEVICE)
    up = torch.ones_like(gate)
    expected = torch_backward(gate, up, up, False)[1]
    assert (expected != 0).all()
    torch.testing.assert_close(gated_activation.backward(gate, up, up, tanh_gelu=False)[1], expected, rtol=1e-5,
                               atol=0.0)
