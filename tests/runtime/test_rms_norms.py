"""fastalign.runtime.rms_norms: on the Triton backend every RMSNorm of every family on the paged Llama path is one
fused kernel that rounds as the family's module does (the layout's rule, held to the module's outputs here, in bf16,
where the rules differ), the residual add before it too; the module itself on the torch backend and wherever the
kernel cannot stand for it."""
import pytest
import torch

from fastalign import TreeRunner
from fastalign.runtime.llama import PagedLlama
from fastalign.runtime.rms_norms import FusedRMSNorm, add_then_norm, fused_rms_norm
from tests.conftest import TRITON_DEVICE
from tests.kernels.test_rms_norm import assert_as_module
from tests.runtime.tiny_models import CONFIGS, runner_kind, tiny_model

PAGED_LLAMA = [name for name in CONFIGS if runner_kind(name) == "PagedLlama"]


def all_norms(paged):
    return [norm for layer in paged.norms for norm in layer.values()] + [paged.final_norm]


@pytest.mark.parametrize("name", PAGED_LLAMA)
def test_every_norm_is_fused_and_rounds_as_its_module(name):
    model = tiny_model(name, dtype=torch.bfloat16, device=TRITON_DEVICE)
    norms = all_norms(PagedLlama(model, "triton", torch.device(TRITON_DEVICE)))
    assert norms and all(isinstance(norm, FusedRMSNorm) for norm in norms), norms
    torch.manual_seed(0)
    with torch.no_grad():
        for norm in norms:
            x, y = (3 * torch.randn(2, 9, norm.module.weight.shape[0])).to(TRITON_DEVICE, torch.bfloat16)
            assert_as_module(norm(x), norm.module(x))
            total, out = add_then_norm(norm, x, y)
            assert torch.equal(total, x + y)
            assert_as_module(out, norm.module(x + y))


def test_the_torch_backend_calls_the_modules():
    model = tiny_model("gemma2-sliding-softcaps")
    paged = PagedLlama(model, "torch", torch.device("cpu"))
    assert all(isinstance(norm, torch.nn.Module) for norm in all_norms(paged))


def test_modules_the_kernel_cannot_stand_for_are_kept():
    model = tiny_model("llama-gqa-untied", dtype=torch.bfloat16)
    norm = model.model.norm
    assert isinstance(fused_rms_norm(norm, "rounded", torch.bfloat16), FusedRMSNorm)
    assert fused_rms_norm(norm, None, torch.bfloat16) is norm                   # the torch backend
    assert fused_rms_norm(norm, "rounded", torch.float32) is norm               # Llama's output in the weight's dtype
    assert isinstance(fused_rms_norm(norm, "fp32", torch.float32), FusedRMSNorm)   # OLMo's: in the input's
    layer_norm = torch.nn.LayerNorm(48)
    assert fused_rms_norm(layer_norm, "rounded", torch.float32) is layer_norm
    handle = norm.register_forward_hook(lambda module, args, out: out)
    assert fused_rms_norm(norm, "rounded", torch.bfloat16) is norm              # a hook would be skipped
    handle.remove()
    assert fused_rms_norm(None, "rounded", torch.bfloat16) is None


def test_the_kernel_takes_the_modules_own_eps():
    """Llama 2's norms take eps 1e-5, others 1e-6 (the tiny models' default): the kernel divides by the module's, on
    its own and in an add after a sublayer output's norm (each its own eps)."""
    model = tiny_model("llama-gqa-untied")
    norm, y_norm = model.model.norm, model.model.layers[0].input_layernorm
    norm.variance_epsilon, y_norm.variance_epsilon = 0.5, 0.25
    fused, fused_y = (fused_rms_norm(module, "rounded", torch.float32) for module in (norm, y_norm))
    assert isinstance(fused, FusedRMSNorm) and fused.eps == 0.5
    torch.manual_seed(0)
    x, y = 0.1 * torch.randn(2, 4, 48)
    with torch.no_grad():
        assert_as_module(fused(x), norm(x))
        total, out = add_then_norm(fused, x, y, fused_y)
        assert_as_module(total, x + y_norm(y))
        assert_as_module(out, norm(x + y_norm(y)))


def test_calls_the_kernel_does_not_fit_go_to_the_module():
    """Another device's input (accelerate's offloading leaves weights elsewhere) or a strided last dimension; in an
    add, also operands of two dtypes (torch promotes their sum)."""
    model = tiny_model("llama-gqa-untied")
    norm = model.model.norm
    fused = FusedRMSNorm(norm, norm.variance_epsilon, "rounded")
    x = torch.randn(6, 96)[:, ::2]
    with torch.no_grad():
        assert torch.equal(fused(x), norm(x))
        y = torch.randn(6, 48, dtype=torch.float64)
        total, out = add_then_norm(fused, x, y)
        assert total.dtype == torch.float64 and torch.equal(out, norm(x + y))


def test_an_input_of_another_dtype_than_a_rounded_norms_weight_goes_to_the_module():
    """Llama's norm returns weight * normalised.to(x's dtype), in the wider of the two dtypes (bf16 embeddings into
    an fp32 norm: fp32); the kernel returned x's, which the next fp32 projection refused."""
    model = tiny_model("llama-gqa-untied")
    norm = model.model.norm
    fused = FusedRMSNorm(norm, norm.variance_epsilon, "rounded")
    x = torch.randn(6, 48, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    with torch.no_grad():
        out = fused(x)
        assert out.dtype == torch.float32 and torch.equal(out, norm(x))


def test_rms_norms_the_kernel_cannot_read_are_kept():
    """A module named as an RMSNorm whose weight is not one row (the kernel reads weight[i] for column i), or whose
    eps is no float (a tensor, which the kernel takes for a pointer), computes as its own forward says."""
    class WideRMSNorm(torch.nn.Module):
        def __init__(self, weight, eps):
            super().__init__()
            self.weight, self.eps = torch.nn.Parameter(weight), eps

        def forward(self, x):
            return x * self.weight

    for norm in (WideRMSNorm(torch.ones(1, 48), 1e-6), WideRMSNorm(torch.ones(48), torch.tensor(1e-6))):
        assert fused_rms_norm(norm, "rounded", torch.float32) is norm


def test_calls_of_another_width_or_shape_or_dtype_than_the_kernel_takes_go_to_torch():
    """An input of another width than the weight's fails as in the module (the kernel would read past the weight); an
    add of a broadcast row, or of operands in two dtypes, is torch's (the kernel would read y as h's shape and
    dtype, and round the sum to h's dtype where torch promotes it)."""
    model = tiny_model("llama-gqa-untied")
    norm = model.model.norm
    fused = FusedRMSNorm(norm, norm.variance_epsilon, "rounded")
    torch.manual_seed(0)
    with torch.no_grad():
        with pytest.raises(RuntimeError, match="must match the size"):
            fused(torch.randn(6, 24))
        x, row = torch.randn(6, 48), torch.randn(1, 48)
        total, out = add_then_norm(fused, x, row)
        assert torch.equal(total, x + row)
        torch.testing.assert_close(out, norm(x + row))
        x, y = torch.randn(6, 48, dtype=torch.bfloat16), torch.randn(6, 48)
        total, out = add_then_norm(fused, x, y)
        assert total.dtype == torch.float32 and torch.equal(total, x + y)


def test_add_then_norm_without_a_norm_gives_the_stream_itself():
    """OLMo's layers have no norm before their sublayers: the sublayer reads the residual stream."""
    h, y = torch.randn(3, 8), torch.randn(3, 8)
    total, x = add_then_norm(None, h, y)
    assert torch.equal(total, h + y) and x is total


@pytest.mark.parametrize("name", ["qwen3-head-dim-untied", "gemma3-sliding-softcap", "olmo2-post-norms",
                                  "olmo3-sliding-tied"])
def test_head_norms_run_inside_the_rotation_kernel(monkeypatch, name):
    """Qwen3's, Gemma 3's (per head) and OLMo's (over the projection) q_norm and k_norm launch no kernel of their own
    on the Triton backend: the rotation's kernel normalises q and k. A norm run on its own is a FusedRMSNorm call
    (in the rotation's fallback too), which the test records, as a direct call shows."""
    model = tiny_model(name, device=TRITON_DEVICE)
    paged = PagedLlama(model, "triton", torch.device(TRITON_DEVICE))
    runner = TreeRunner(model, max_tokens=64, block_size=4, attention_backend="triton")
    called = []
    original = FusedRMSNorm.__call__
    monkeypatch.setattr(FusedRMSNorm, "__call__", lambda self, x: called.append(self.module) or original(self, x))
    runner.extend([None], [[1, 2, 3]])
    head_norms = [layer.self_attn.q_norm for layer in model.model.layers] + [
        layer.self_attn.k_norm for layer in model.model.layers]
    assert not any(module is norm for module in called for norm in head_norms), called
    q_norm = paged.norms[0]["self_attn.q_norm"]
    q_norm(torch.randn(2, q_norm.module.weight.shape[0], device=TRITON_DEVICE))
    assert called[-1] is head_norms[0]


@pytest.mark.parametrize("name", ["gemma2-sliding-softcaps", "gemma3-sliding-softcap", "olmo2-post-norms",
                                  "olmo3-sliding-tied"])
def test_sublayer_output_norms_join_the_kernel_of_the_add_after_them(monkeypatch, name):
    """The Gemmas' and OLMo's norms of a sublayer's output run in the kernel of the residual add after them, with the
    next sublayer's norm where the family has one (OLMo's read the stream itself), as the modules compute them (in
    bf16); no norm is called on its own."""
    model = tiny_model(name, dtype=torch.bfloat16, device=TRITON_DEVICE)
    paged = PagedLlama(model, "triton", torch.device(TRITON_DEVICE))
    layout, width = paged.layout, model.config.hidden_size
    monkeypatch.setattr(FusedRMSNorm, "__call__", lambda self, x: pytest.fail("a norm ran on its own"))
    torch.manual_seed(0)
    with torch.no_grad():
        for norms in paged.norms:
            for then, before in ((layout.mlp_in_norm, layout.attention_out_norm),
                                 (layout.input_norm, layout.mlp_out_norm)):
                h, y = (3 * torch.randn(2, 9, width)).to(TRITON_DEVICE, torch.bfloat16)
                then_norm, y_norm = norms.get(then), norms[before]
                total, out = add_then_norm(then_norm, h, y, y_norm)
                ref_total = h + y_norm.module(y)
                assert_as_module(total, ref_total)
                assert_as_module(out, ref_total if then_norm is None else then_norm.module(total))
