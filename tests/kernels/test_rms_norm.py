"""kernels/rms_norm.py against Hugging Face's RMSNorm modules, which it stands for in the paged forward: Llama's
(the normalised row rounded before its weight), Gemma's (times 1 + weight in fp32) and OLMo 2's (times the weight in
fp32), at odd widths, one row, no row, 3-D inputs and strided rows; with the residual added first (against torch's
add, to the bit, then the module), and with the residual itself normalised before that (the Gemmas' and OLMo's
post-sublayer norms). 16-bit outputs may differ from the module's by a
unit in the last place (the sum of squares is reduced in another order), and in few entries: rounding the weight's
product the other family's way moves a third of them."""
import pytest
import torch
from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
from transformers.models.llama.modeling_llama import LlamaRMSNorm
from transformers.models.olmo2.modeling_olmo2 import Olmo2RMSNorm

from fastalign.kernels import rms_norm
from fastalign.kernels.rms_norm import rms_norm_after_add
from fastalign.ops.rms_norm import WEIGHT_RULES
from tests.compare import REL_TOL, assert_rel_close
from tests.conftest import TRITON_DEVICE

MODULES = {"rounded": LlamaRMSNorm, "one plus": GemmaRMSNorm, "fp32": Olmo2RMSNorm}
TOLERANCES = {torch.float32: dict(rtol=1e-5, atol=1e-6), torch.float16: dict(rtol=1e-3, atol=1e-3),
              torch.bfloat16: dict(rtol=1e-2, atol=1e-2)}


def module_and_input(rule, shape, dtype, seed=0, eps=1e-5):
    torch.manual_seed(seed)
    module = MODULES[rule](shape[-1], eps=eps)
    torch.nn.init.normal_(module.weight, 0.5, 0.5)
    module = module.to(device=TRITON_DEVICE, dtype=dtype)
    return module, (3 * torch.randn(shape)).to(device=TRITON_DEVICE, dtype=dtype)


def assert_as_module(out, ref):
    assert out.dtype == ref.dtype and out.shape == ref.shape
    torch.testing.assert_close(out, ref, **TOLERANCES[ref.dtype])
    if ref.dtype != torch.float32:
        assert (out != ref).float().mean() <= 0.02, "more than a reduction order's 1-ulp differences"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("rule", list(WEIGHT_RULES))
@pytest.mark.parametrize("shape", [(7, 40), (1, 257), (5, 3, 16), (2, 1)])
def test_equals_hugging_face_module(rule, dtype, shape):
    module, x = module_and_input(rule, shape, dtype)
    with torch.no_grad():
        assert_as_module(rms_norm.forward(x, module.weight, 1e-5, **WEIGHT_RULES[rule]), module(x))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("rule", list(WEIGHT_RULES))
@pytest.mark.parametrize("shape", [(7, 40), (1, 257), (5, 3, 16)])
def test_after_add_equals_torch_add_then_the_module(rule, dtype, shape):
    module, h = module_and_input(rule, shape, dtype)
    y = (3 * torch.randn(shape)).to(TRITON_DEVICE, dtype)
    with torch.no_grad():
        total, out = rms_norm_after_add(h, y, module.weight, 1e-5, **WEIGHT_RULES[rule])
        assert torch.equal(total, h + y)
        assert_as_module(out, module(h + y))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rule", list(WEIGHT_RULES))
@pytest.mark.parametrize("then_norm", [True, False])
def test_the_sublayer_output_normalised_before_the_add(rule, dtype, then_norm):
    """The Gemmas' (and OLMo's) post-sublayer norm of y before the add, then the next norm (none for OLMo, whose
    sublayers read the stream itself), against the modules and torch's add."""
    module, h = module_and_input(rule, (7, 3, 40), dtype)
    y_module, y = module_and_input(rule, (7, 3, 40), dtype, seed=1)
    with torch.no_grad():
        total, out = rms_norm_after_add(h, y, module.weight if then_norm else None, 1e-5, **WEIGHT_RULES[rule],
                                        y_weight=y_module.weight, y_eps=1e-5)
        ref_total = h + y_module(y)
        assert_as_module(total, ref_total)
        if then_norm:
            assert_as_module(out, module(total))
        else:
            assert out is total


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_the_other_rounding_is_told_apart(dtype):
    """Rounding after the weight where Llama's module rounds before it fails the comparison: the test can fail."""
    module, x = module_and_input("rounded", (16, 64), dtype)
    with torch.no_grad():
        out = rms_norm.forward(x, module.weight, 1e-5, **WEIGHT_RULES["fp32"])
        assert (out != module(x)).float().mean() > 0.1


def test_strided_rows_and_no_rows():
    module, wide = module_and_input("rounded", (6, 64), torch.float32)
    x = wide[:, 8:48]   # rows 64 apart
    module.weight = torch.nn.Parameter(module.weight[:40].clone())
    with torch.no_grad():
        assert_as_module(rms_norm.forward(x, module.weight, 1e-5), module(x))
        empty = torch.empty(0, 40, device=TRITON_DEVICE)
        assert rms_norm.forward(empty, module.weight, 1e-5).shape == (0, 40)


def assert_backward_as_module(module, x, grad_out, eps=1e-5, rule="rounded", rel_tol=REL_TOL[torch.float32]):
    """rms_norm.backward's gradients of x and of the weight against the module's autograd, in dtype, shape and
    norm-wise (both sum in their own order)."""
    x = x.detach().requires_grad_()
    expected = torch.autograd.grad(module(x), (x, module.weight), grad_out)
    got = rms_norm.backward(x.detach(), module.weight.detach(), grad_out, eps, **WEIGHT_RULES[rule])
    for name, actual, want in zip(("grad_x", "grad_weight"), got, expected):
        assert actual.dtype == want.dtype and actual.shape == want.shape, name
        assert_rel_close(name, actual, want, rel_tol)


def test_a_strided_weight_and_rows_of_width_zero():
    """A weight that is a strided view (a slice of a longer one): the kernels read it as one contiguous row, a wrong
    norm and input gradient before it was copied. Rows of no width give empty results (gradients in the inputs'
    dtypes), not a reshape error."""
    module, x = module_and_input("rounded", (5, 40), torch.float32)
    module.weight = torch.nn.Parameter(torch.randn(80, device=TRITON_DEVICE)[::2])
    assert module.weight.stride(-1) == 2
    with torch.no_grad():
        assert_as_module(rms_norm.forward(x, module.weight, 1e-5), module(x))
    assert_backward_as_module(module, x, torch.randn_like(x))
    empty = torch.empty(3, 0, device=TRITON_DEVICE)
    no_weight = torch.empty(0, device=TRITON_DEVICE)
    assert rms_norm.forward(empty, no_weight, 1e-5).shape == (3, 0)
    assert [t.shape for t in rms_norm.backward(empty, no_weight, empty, 1e-5)] == [(3, 0), (0,)]
    empty, no_weight = empty.bfloat16(), no_weight.bfloat16()
    assert [t.dtype for t in rms_norm.backward(empty, no_weight, empty, 1e-5)] == [torch.bfloat16] * 2


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("rule", list(WEIGHT_RULES))
@pytest.mark.parametrize("shape", [(9, 40), (1, 7), (2, 3, 300), (0, 8)])
def test_backward_equals_the_module_autograd(rule, dtype, shape):
    """The input's and the weight's gradients against the module's autograd: rows that the backward's programs share
    unevenly (9 rows: 3, 3, 3 and none on the interpreter's 4 programs; 6 over 4: 2, 2, 2, 0), one row, no row. (A
    width of 1 is left out: there the gradient is the cancellation of two near-equal terms, noise in both.)"""
    module, x = module_and_input(rule, shape, dtype)
    grad_out = module_and_input(rule, shape, dtype, seed=1)[1]
    # twice the tolerance in 16 bits: torch sums the weight's gradient over rows in the 16-bit dtype
    assert_backward_as_module(module, x, grad_out, rule=rule,
                              rel_tol=REL_TOL[dtype] * (1 if dtype == torch.float32 else 2))


def test_the_sublayer_output_norm_before_the_add_takes_its_own_eps():
    """rms_norm_after_add's two norms with eps 1e-6 (the stream's) and 1e-2 (the sublayer output's, y_eps), on an
    output whose mean square (1e-2) each eps moves apart."""
    torch.manual_seed(0)
    norm, y_norm = GemmaRMSNorm(32, eps=1e-6), GemmaRMSNorm(32, eps=1e-2)
    for module in (norm, y_norm):
        torch.nn.init.normal_(module.weight, 0.0, 0.5)
    h = torch.randn(5, 32, device=TRITON_DEVICE)
    y = 0.1 * torch.randn(5, 32, device=TRITON_DEVICE)
    with torch.no_grad():
        total, out = rms_norm_after_add(h, y, norm.weight, 1e-6, **WEIGHT_RULES["one plus"], y_weight=y_norm.weight,
                                        y_eps=1e-2)
        expected = h + y_norm(y)
        torch.testing.assert_close(total, expected, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(out, norm(expected), rtol=1e-5, atol=1e-6)


def test_backward_tells_the_rules_apart():
    module, x = module_and_input("one plus", (4, 32), torch.float32)
    x.requires_grad_()
    expected = torch.autograd.grad(module(x), x, torch.ones_like(x))[0]
    with pytest.raises(AssertionError):
        assert_rel_close("grad_x", rms_norm.backward(x.detach(), module.weight.detach(), torch.ones_like(x), 1e-5,
                                                     **WEIGHT_RULES["fp32"])[0], expected, REL_TOL[torch.float32])


COMPILE_FOR_SM90 = """
from fastalign.kernels.rms_norm import _rms_norm_backward_kernel, _rms_norm_kernel, backward_num_warps
from tests.kernels.gpu_build import build_for_gpu, check_build, stack_bytes

for dtype in ("bf16", "fp16", "fp32"):
    x = "*" + dtype
    for block in (64, 2048, 8192):   # a head's width (Qwen3's q_norm), a 1B model's, a 70B model's
        for round_before_weight in (False, True):
            # a norm; the residual add before it; also the sublayer output's norm before that; that without the norm
            for add, norm_y, norm_out in ((False, False, True), (True, False, True), (True, True, True),
                                          (True, True, False)):
                compiled = build_for_gpu(
                    _rms_norm_kernel, dict(X=x, Y=x, Sum=x, Weight=x, YWeight=x, Out=x, eps="fp32", y_eps="fp32",
                                           weight_offset="fp32"),
                    dict(ADD=add, NORM_Y=norm_y, NORM_OUT=norm_out, ROUND_BEFORE_WEIGHT=round_before_weight,
                         BLOCK=block), min(16, max(1, block // 256)), 1)
                what = ("rms_norm", dtype, block, round_before_weight, add, norm_y, norm_out)
                check_build(compiled, what, tuned=False)
                assert stack_bytes(compiled) == 0, (what, "spills registers")
            compiled = build_for_gpu(
                _rms_norm_backward_kernel, dict(X=x, Weight=x, GradOut=x, GradX=x, GradWeightPartial="*fp32",
                                                eps="fp32", weight_offset="fp32"),
                dict(ROUND_BEFORE_WEIGHT=round_before_weight, BLOCK=block), backward_num_warps(block), 1)
            what = ("rms_norm backward", dtype, block, round_before_weight)
            check_build(compiled, what, tuned=False)
            assert stack_bytes(compiled) == 0, (what, "spills registers")
"""


def test_kernel_compiles_for_sm90_without_a_gpu():
    """What the interpreter never does: the builds, at the launches' widths and warps, without register spills."""
    from tests.kernels.gpu_build import assert_builds
    assert_builds(COMPILE_FOR_SM90)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_after_add_reads_each_input_by_its_own_row_stride(dtype):
    """x contiguous and y a strided view (rows 64 apart), and a y_weight that is a strided view too: the kernel reads
    y's rows by y's own stride (not x's) and copies the strided weight, as torch's add and the modules compute."""
    module, h = module_and_input("one plus", (6, 40), dtype)
    y_module, wide = module_and_input("one plus", (6, 64), dtype, seed=1)
    y = wide[:, 8:48]
    assert h.stride(0) == 40 and y.stride(0) == 64
    y_module.weight = torch.nn.Parameter(torch.randn(80, device=TRITON_DEVICE).to(dtype)[::2])
    with torch.no_grad():
        total, out = rms_norm_after_add(h, y, module.weight, 1e-5, **WEIGHT_RULES["one plus"])
        assert torch.equal(total, h + y)
        assert_as_module(out, module(h + y))
        total, out = rms_norm_after_add(h, y, module.weight, 1e-5, **WEIGHT_RULES["one plus"],
                                        y_weight=y_module.weight, y_eps=1e-5)
        assert_as_module(total, h + y_module(y))
        assert_as_module(out, module(total))


@pytest.mark.parametrize("rule", list(WEIGHT_RULES))
def test_backward_takes_eps_as_the_forward_does(rule):
    """Rows of small values (mean square ~1e-4) with eps 1e-3, which dominates their root: the backward's gradients
    as the module's autograd gives them with that eps (eps dropped or misplaced in the backward's root only, the
    forward's outputs stay right)."""
    module, x = module_and_input(rule, (6, 40), torch.float32, eps=1e-3)
    grad_out = module_and_input(rule, (6, 40), torch.float32, seed=1)[1]
    assert_backward_as_module(module, 1e-2 / 3 * x, grad_out, eps=1e-3, rule=rule)


@pytest.mark.parametrize("then_norm", [True, False])
def test_after_add_of_a_strided_x_writes_the_sum_by_its_own_row_stride(then_norm):
    """x a strided view (rows 64 apart) and y contiguous: the sum, a new contiguous tensor, is written by its own row
    stride (not x's), with and without the norm after it."""
    module, y = module_and_input("rounded", (6, 40), torch.float32)
    h = module_and_input("rounded", (6, 64), torch.float32, seed=1)[1][:, 8:48]
    with torch.no_grad():
        total, out = rms_norm_after_add(h, y, module.weight if then_norm else None, 1e-5)
        assert torch.equal(total, h + y)
        assert_as_module(out, module(h + y) if then_norm else h + y)


def test_backward_of_rows_apart():
    """x a strided view (rows 64 apart, the last dimension contiguous, as the launchers take it): the backward's
    gradients as the module's autograd gives them."""
    module, wide = module_and_input("fp32", (6, 64), torch.float32)
    module.weight = torch.nn.Parameter(module.weight[:40].clone())
    grad_out = module_and_input("fp32", (6, 40), torch.float32, seed=1)[1]
    assert_backward_as_module(module, wide[:, 8:48], grad_out, rule="fp32")


def test_backward_rounds_a_gradient_of_another_dtype_to_the_inputs():
    """An fp32 grad_out for bf16 rows is taken as its bf16 rounding (the gradient autograd would hand the module)."""
    module, x = module_and_input("rounded", (5, 40), torch.bfloat16)
    grad_out = module_and_input("rounded", (5, 40), torch.float32, seed=1)[1]
    got = rms_norm.backward(x, module.weight.detach(), grad_out, 1e-5)
    want = rms_norm.backward(x, module.weight.detach(), grad_out.bfloat16(), 1e-5)
    assert all(torch.equal(a, b) for a, b in zip(got, want))


def test_backward_rounds_the_weight_gradient_once():
    """bf16 rows over the interpreter's 4 programs (2 each): the weight's gradient is summed over all of them in fp32
    and rounded once, as the float64 sum rounds but for a reduction order's few 1-ulp differences; rounding each
    program's partial sum first moves a third of the entries."""
    module, x = module_and_input("fp32", (8, 300), torch.bfloat16)
    grad_out = module_and_input("fp32", (8, 300), torch.bfloat16, seed=1)[1]
    _, got = rms_norm.backward(x, module.weight.detach(), grad_out, 1e-5, **WEIGHT_RULES["fp32"])
    rows = x.double()
    normalised = rows * torch.rsqrt(rows.pow(2).mean(-1, keepdim=True) + 1e-5)
    want = (grad_out.double() * normalised).sum(0).to(torch.bfloat16)
    assert got.dtype == torch.bfloat16
    assert (got != want).float().mean() <= 0.02
