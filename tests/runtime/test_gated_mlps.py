"""fastalign.runtime.gated_mlps: on the Triton backend every dense MLP of the paged Llama path (SwiGLU and the Gemmas'
GeGLU) runs its activation and product as one kernel, held here to the module's outputs in bf16; the sparse mixtures
of experts, the torch backend, and MLPs the kernel cannot stand for call the module."""
import functools

import pytest
import torch
from transformers.activations import ACT2FN

from fastalign.runtime.gated_mlps import FusedGatedMLP, fused_gated_mlp, kernel_activation
from fastalign.runtime.llama import PagedLlama
from tests.conftest import TRITON_DEVICE
from tests.runtime.tiny_models import CONFIGS, runner_kind, tiny_model

PAGED_LLAMA = [name for name in CONFIGS if runner_kind(name) == "PagedLlama"]


@pytest.mark.parametrize("name", PAGED_LLAMA)
def test_every_dense_mlp_is_fused_and_computes_as_its_module(name):
    """Dense layers are fused, sparse mixtures of experts (Qwen3-MoE's layers past its dense first one) are not."""
    model = tiny_model(name, dtype=torch.bfloat16, device=TRITON_DEVICE)
    mlps = PagedLlama(model, "triton", torch.device(TRITON_DEVICE)).mlps
    dense = [type(layer.mlp).__name__.endswith("MLP") for layer in model.model.layers]
    assert [isinstance(mlp, FusedGatedMLP) for mlp in mlps] == dense
    assert [mlp is None for mlp in mlps] == [not d for d in dense]
    mlps = [mlp for mlp in mlps if mlp is not None]
    torch.manual_seed(0)
    with torch.no_grad():
        for mlp in mlps:
            x = torch.randn(9, model.config.hidden_size).to(TRITON_DEVICE, torch.bfloat16)
            out, ref = mlp(x), mlp.module(x)
            assert out.dtype == ref.dtype and out.shape == ref.shape
            # the projections are the module's; the activation may differ by a unit in the last place, which the
            # down projection spreads
            torch.testing.assert_close(out, ref, rtol=2e-2, atol=2e-2)


def test_the_torch_backend_calls_the_modules():
    model = tiny_model("llama-gqa-untied")
    assert PagedLlama(model, "torch", torch.device("cpu")).mlps == [None] * len(model.model.layers)


@pytest.mark.parametrize("act, expected", [
    (ACT2FN["silu"], "silu"), (torch.nn.SiLU(), "silu"), (ACT2FN["gelu_pytorch_tanh"], "gelu_tanh"),
    (torch.nn.GELU(approximate="tanh"), "gelu_tanh"), (torch.nn.GELU(), None), (ACT2FN["relu"], None),
    (ACT2FN["gelu_new"], None), (None, None)])
def test_the_activations_the_kernel_computes(act, expected):
    assert kernel_activation(act) == expected


def test_activations_that_only_look_alike_are_kept():
    """Hugging Face's GELUTanh in its python variant rounds each of its 16-bit ops, or with its function replaced
    computes another; a hooked SiLU would be skipped; a module of a model's own named as Hugging Face's SiLU is not
    it."""
    python_gelu = type(ACT2FN["gelu_pytorch_tanh"])(use_gelu_tanh_python=True)
    assert kernel_activation(python_gelu) is None
    exact_gelu = ACT2FN["gelu_pytorch_tanh"]
    exact_gelu.act = functools.partial(torch.nn.functional.gelu, approximate="none")   # GELUTanh by name alone
    assert kernel_activation(exact_gelu) is None

    class SiLUActivation(torch.nn.Module):   # Hugging Face's name, a model's own module and function
        def forward(self, x):
            return torch.relu(x)

    assert kernel_activation(SiLUActivation()) is None
    silu = torch.nn.SiLU()
    silu.register_forward_hook(lambda module, args, out: out)
    assert kernel_activation(silu) is None


def test_mlps_the_kernel_cannot_stand_for_are_kept():
    model = tiny_model("llama-gqa-untied")
    mlp = model.model.layers[0].mlp
    assert isinstance(fused_gated_mlp(mlp, "triton"), FusedGatedMLP)
    assert fused_gated_mlp(mlp, "torch") is None
    handle = mlp.register_forward_pre_hook(lambda module, args: None)
    assert fused_gated_mlp(mlp, "triton") is None     # a hook would be skipped
    handle.remove()
    mlp.act_fn = ACT2FN["relu"]
    assert fused_gated_mlp(mlp, "triton") is None
    assert fused_gated_mlp(torch.nn.Linear(4, 4), "triton") is None


@pytest.mark.parametrize("up", [lambda out: out.bfloat16(), lambda out: out[..., :1]])
def test_a_call_the_kernel_does_not_take_goes_to_torch(up):
    """An up projection that returns another dtype than the gate's (a hook here; an adapter kept in another dtype,
    say), or another shape (one column, broadcast): torch's product promotes and broadcasts, as in the module (the
    kernel would read up as gate's dtype and shape)."""
    model = tiny_model("llama-gqa-untied")
    mlp = model.model.layers[0].mlp
    mlp.up_proj.register_forward_hook(lambda module, args, out: up(out))
    x = torch.randn(3, model.config.hidden_size)
    with torch.no_grad():
        assert torch.equal(FusedGatedMLP(mlp, "silu")(x), mlp(x))
