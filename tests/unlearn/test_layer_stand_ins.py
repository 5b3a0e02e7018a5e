"""fused_layers: a Hugging Face model trained within it gives the modules' losses and gradients while its norms and
MLPs keep less for the backward; its forwards are the class's again on leaving, and what it cannot stand in for (no
grad, hooks, an input in another dtype than the norm's weight) runs as it is; a down projection that is a LoRA layer
is called on the recomputed product.
(tests/unlearn/test_trainer.py: the trainer trains the same run with it as without.)"""
import pytest
import torch
from transformers import Gemma3TextConfig, Gemma3ForCausalLM

import fastalign.unlearn.layer_stand_ins as layer_stand_ins
from fastalign.unlearn import fused_layers
from tests.compare import REL_TOL, rel_error
from tests.conftest import device_for
from tests.saved_tensors import saved_bytes
from tests.unlearn.tiny import tiny_llama

VOCAB = 97


def tiny_gemma3():
    """Gemma 3's GeGLU (the tanh GELU), 2 layers, random weights."""
    torch.manual_seed(0)
    return Gemma3ForCausalLM(Gemma3TextConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, max_position_embeddings=128, sliding_window=16)).eval()


def tiny_olmo2():
    """OLMo 2's norms: after each sublayer, and q/k norms over the whole projection ("fp32" rule), 2 layers."""
    from transformers import Olmo2Config, Olmo2ForCausalLM
    torch.manual_seed(0)
    return Olmo2ForCausalLM(Olmo2Config(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128)).eval()


def tiny_llama_mlp_bias():
    """Llama with biases on its MLP's projections (mlp_bias), the down projection's drawn nonzero (std 0.1)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, mlp_bias=True))
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.down_proj.bias.normal_(std=0.1)
    return model.eval()


MODELS = {"llama": lambda: tiny_llama(VOCAB), "gemma3": tiny_gemma3, "olmo2": tiny_olmo2,
          "llama-mlp-bias": tiny_llama_mlp_bias}
# Gemma 3's and OLMo 2's with their q and k norms
NORMS_PER_LAYER = {"llama": 2, "gemma3": 6, "olmo2": 4, "llama-mlp-bias": 2}


def loss_grads_and_saved_bytes(model, ids):
    """The LM loss, every parameter's gradient and the bytes autograd held for the backward (parameters aside)."""
    model.zero_grad(set_to_none=True)
    loss, held = saved_bytes(lambda: model(input_ids=ids, labels=ids).loss, excluded=list(model.parameters()))
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}, held


@pytest.mark.parametrize("family", MODELS)
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_the_model_trains_as_without_it(family, backend):
    """The loss (bit for bit on the torch backend, whose forwards are the modules' own operators) and every gradient
    (the norms' backward sums in another order)."""
    device = device_for(backend)
    model = MODELS[family]().to(device)
    ids = torch.randint(0, VOCAB, (2, 19), device=device)
    loss, grads, _ = loss_grads_and_saved_bytes(model, ids)
    with fused_layers(model, backend) as found:
        layers = model.config.num_hidden_layers
        assert found == layers * (1 + NORMS_PER_LAYER[family]) + 1   # the MLPs, the layers' norms, the final norm
        fused_loss, fused_grads, _ = loss_grads_and_saved_bytes(model, ids)
    if backend == "torch":
        assert torch.equal(fused_loss, loss)
    assert rel_error(fused_loss, loss) <= REL_TOL[torch.float32]
    for name, grad in grads.items():
        assert rel_error(fused_grads[name], grad) <= REL_TOL[torch.float32], name
    assert not any("forward" in vars(m) for m in model.modules())   # the class's forwards again


def test_a_model_compiled_with_fullgraph_trains_as_without_it():
    """The torch backend's stand-ins broke a compiled model's graph at every norm and MLP (an import, the Functions'
    jvp), so fullgraph=True refused the model: one graph now, with the uncompiled model's loss and gradients."""
    model = MODELS["llama"]()
    ids = torch.randint(0, VOCAB, (2, 19))
    loss, grads, _ = loss_grads_and_saved_bytes(model, ids)
    torch._dynamo.reset()
    with fused_layers(model, "torch"):
        compiled_loss, compiled_grads, _ = loss_grads_and_saved_bytes(
            torch.compile(model, backend="eager", fullgraph=True), ids)
    assert torch.equal(compiled_loss, loss)
    for name, grad in grads.items():
        assert rel_error(compiled_grads[f"_orig_mod.{name}"], grad) <= REL_TOL[torch.float32], name


@pytest.mark.parametrize("family", MODELS)
def test_what_the_layers_keep_for_the_backward(family):
    """Each MLP no longer keeps act(gate) and the product, and each of Llama's norms no longer keeps its normalised
    rows and their rsqrt (fp32 here: the input's fp32 copy is the input itself)."""
    model = MODELS[family]()
    ids = torch.randint(0, VOCAB, (2, 19))
    _, _, held = loss_grads_and_saved_bytes(model, ids)
    with fused_layers(model, "torch"):
        _, _, fused_held = loss_grads_and_saved_bytes(model, ids)
    config, tokens = model.config, ids.numel()
    mlps = config.num_hidden_layers * 2 * tokens * config.intermediate_size * 4
    if family == "llama":
        assert held - fused_held == mlps + (2 * config.num_hidden_layers + 1) * tokens * (config.hidden_size + 1) * 4
    else:
        assert held - fused_held > mlps


def test_a_model_whose_accelerate_hooks_were_removed_is_stood_in_for_as_any_model():
    """accelerate's remove_hook_from_module sets each module's `forward` back as the bound method of its class's
    forward, an instance attribute: read as a forward set by a user, its norms and MLPs were passed over (2 modules
    stood in for, not 7)."""
    accelerate = pytest.importorskip("accelerate")
    model = tiny_llama(VOCAB)
    accelerate.cpu_offload(model, execution_device=torch.device("cpu"))
    accelerate.hooks.remove_hook_from_module(model, recurse=True)
    with fused_layers(tiny_llama(VOCAB), "torch") as expected, fused_layers(model, "torch") as stood_in:
        assert stood_in == expected == 7


def test_forwards_are_restored_when_the_block_raises():
    model = tiny_llama(VOCAB)
    with pytest.raises(KeyError), fused_layers(model, "torch"):
        raise KeyError
    assert not any("forward" in vars(m) for m in model.modules())


@pytest.mark.parametrize("backend", ["bogus", None])
def test_a_bad_backend_is_refused_on_entry(backend):
    """A backend the ops do not know was accepted by fused_layers, which stood in for the modules; the ValueError came
    only at the first forward of a stand-in, deep in training."""
    model = tiny_llama(VOCAB)
    with pytest.raises(ValueError, match=f"^backend must be one of \\('auto', 'triton', 'torch'\\), got {backend!r}"):
        with fused_layers(model, backend):
            pass
    assert not any("forward" in vars(m) for m in model.modules())


def count_calls(monkeypatch, name):
    """A list that gets an entry at each call of layer_stand_ins' op `name`."""
    calls, real = [], getattr(layer_stand_ins, name)
    monkeypatch.setattr(layer_stand_ins, name, lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_torch_func_grad_of_a_functional_call(monkeypatch, backend):
    """torch.func.grad of a functional_call's loss gives the modules' gradients: the ops' autograd Functions lacked
    torch.func's form (a setup_context), and failed under it where the modules work."""
    calls = {name: count_calls(monkeypatch, name) for name in ("rms_norm", "gated_linear")}
    device = device_for(backend)
    model = tiny_llama(VOCAB).to(device)
    ids = torch.randint(0, VOCAB, (2, 7), device=device)
    params = {name: p.detach() for name, p in model.named_parameters()}

    def loss(params):
        return torch.func.functional_call(model, params, (), dict(input_ids=ids, labels=ids)).loss

    expected = torch.func.grad(loss)(params)
    with fused_layers(model, backend):
        grads = torch.func.grad(loss)(params)
    assert len(calls["rms_norm"]) == 2 * 2 + 1 and len(calls["gated_linear"]) == 2
    for name, grad in expected.items():
        assert rel_error(grads[name], grad) <= REL_TOL[torch.float32], name


def test_what_it_cannot_stand_in_for_runs_the_module(monkeypatch):
    """Without grad the module's forward runs; a down_proj with hooks is called as it is, on gated_activation's
    product (its hook sees it); modules with hooks of their own are left alone."""
    linear, activation = (count_calls(monkeypatch, name) for name in ("gated_linear", "gated_activation"))
    model = tiny_llama(VOCAB)
    ids = torch.randint(0, VOCAB, (1, 7))
    model.model.layers[0].mlp.register_forward_hook(lambda *args: None)
    model.model.layers[0].input_layernorm.register_forward_hook(lambda *args: None)
    products = []
    model.model.layers[1].mlp.down_proj.register_forward_pre_hook(lambda module, args: products.append(args[0]))
    with fused_layers(model, "torch") as found:
        assert found == 1 + 4   # an MLP, the norms
        with torch.no_grad():
            expected = type(model).forward(model, input_ids=ids).logits
            assert torch.equal(model(input_ids=ids).logits, expected) and linear == activation == []
        products.clear()
        model(input_ids=ids).logits.sum().backward()
        assert linear == [] and activation == [1] and len(products) == 1
        model.model.layers[1].mlp.down_proj._forward_pre_hooks.clear()
        model(input_ids=ids).logits.sum().backward()
        assert linear == [1] and activation == [1]


class DoubledLinear(torch.nn.Linear):
    """A subclass of nn.Linear whose forward computes more than x @ weight.T (as a quantized or scaled layer's may)."""

    def forward(self, x):
        return 2 * super().forward(x)


def test_a_down_projection_of_a_linear_subclass_is_called_on_the_recomputed_product(monkeypatch):
    """gated_linear reads down_proj's weight and computes x @ weight.T itself: only a plain nn.Linear's forward is
    that, so a subclass is called as it is (its forward would otherwise be skipped, and the loss silently changed)."""
    linear = count_calls(monkeypatch, "gated_linear")
    model = tiny_llama(VOCAB)
    for layer in model.model.layers:
        down = layer.mlp.down_proj
        layer.mlp.down_proj = DoubledLinear(down.in_features, down.out_features, bias=False)
        layer.mlp.down_proj.load_state_dict(down.state_dict())
    ids = torch.randint(0, VOCAB, (2, 9))
    loss, grads, _ = loss_grads_and_saved_bytes(model, ids)
    with fused_layers(model, "torch"):
        fused_loss, fused_grads, _ = loss_grads_and_saved_bytes(model, ids)
    assert linear == [] and torch.equal(fused_loss, loss)
    for name, grad in grads.items():
        assert rel_error(fused_grads[name], grad) <= REL_TOL[torch.float32], name


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_a_lora_down_projection_is_called_on_the_recomputed_product(monkeypatch, backend):
    """A LoRA layer on down_proj (target "all-linear") keeps the product it is given, and the MLP gate and up besides,
    not act(gate); the model trains as without the layers."""
    peft = pytest.importorskip("peft")
    calls = count_calls(monkeypatch, "gated_activation")
    device = device_for(backend)
    model = peft.get_peft_model(tiny_llama(VOCAB), peft.LoraConfig(r=4, target_modules=["down_proj"])).to(device)
    ids = torch.randint(0, VOCAB, (1, 7), device=device)
    loss, grads, held = loss_grads_and_saved_bytes(model, ids)
    with fused_layers(model, backend) as found:
        assert found == 2 + 2 * 2 + 1   # the MLPs, two norms a layer, the final norm
        fused_loss, fused_grads, fused_held = loss_grads_and_saved_bytes(model, ids)
    assert len(calls) == 2
    if backend == "torch":
        assert torch.equal(fused_loss, loss)
    assert rel_error(fused_loss, loss) <= REL_TOL[torch.float32]
    for name, grad in grads.items():
        assert rel_error(fused_grads[name], grad) <= REL_TOL[torch.float32], name
    # (with frozen base weights, what autograd keeps depends on where gradients flow: less, not a formula)
    assert fused_held < held


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_a_norm_of_an_input_in_another_dtype_than_its_weight_runs_the_module(monkeypatch, backend):
    """A "rounded" norm's output takes the promoted dtype of its weight and input (Qwen3's q_norm under a bf16
    autocast gets bf16 heads and has fp32 weights): the module computes it, and the op where both match."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm
    calls = count_calls(monkeypatch, "rms_norm")
    norm = LlamaRMSNorm(16).to(device_for(backend))
    stand_in = layer_stand_ins.TrainingRMSNorm(norm, norm.variance_epsilon, "rounded", backend)
    x = torch.randn(3, 16, device=norm.weight.device, requires_grad=True)
    assert torch.equal(stand_in(x.bfloat16()), norm(x.bfloat16())) and calls == []
    assert stand_in(x.bfloat16()).dtype == torch.float32
    assert rel_error(stand_in(x), norm(x)) <= REL_TOL[torch.float32] and calls == [1]


@pytest.mark.parametrize("family", ["llama", "llama-mlp-bias"])
def test_under_autocast_the_down_projection_computes_in_its_dtype(family):
    """As the module under autocast: the product and the down projection (its fp32 bias too) in bf16 from fp32
    weights, whose gradients come back in fp32."""
    model = MODELS[family]()
    ids = torch.randint(0, VOCAB, (2, 9))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, grads, _ = loss_grads_and_saved_bytes(model, ids)
        with fused_layers(model, "torch"):
            fused_loss, fused_grads, _ = loss_grads_and_saved_bytes(model, ids)
    assert torch.equal(fused_loss, loss)
    for name, grad in grads.items():
        assert fused_grads[name].dtype == torch.float32
        assert rel_error(fused_grads[name], grad) <= REL_TOL[torch.bfloat16], name


def test_a_family_fastalign_does_not_know_is_left_as_it_is():
    """A module named *MLP or *RMSNorm of another family may compute more than its name says (Gemma 3n's MLPs
    sparsify their gate): nothing is stood in for."""
    model = tiny_llama(VOCAB)
    model.config.model_type = "gemma3n_text"
    with fused_layers(model, "torch") as found:
        assert found == 0
    model.config.model_type = "llama"
    with fused_layers(model, "torch") as found:
        assert found == 2 + 2 * 2 + 1


def test_a_float64_model_trains_through_its_modules(monkeypatch):
    calls = [count_calls(monkeypatch, name) for name in ("gated_linear", "rms_norm")]
    model = tiny_llama(VOCAB).double()
    ids = torch.randint(0, VOCAB, (1, 7))
    loss, grads, _ = loss_grads_and_saved_bytes(model, ids)
    with fused_layers(model, "torch"):
        fused_loss, fused_grads, _ = loss_grads_and_saved_bytes(model, ids)
    assert calls == [[], []]
    assert torch.equal(fused_loss, loss) and all(torch.equal(fused_grads[k], g) for k, g in grads.items())


def test_a_one_dimensional_input_runs_through_the_modules():
    """A norm or MLP called on one vector [H] (the ops take [..., H] with a token dimension): the module's forward, as
    without fused_layers, not an error."""
    model = tiny_llama(VOCAB)
    layer = model.model.layers[0]
    x = torch.randn(model.config.hidden_size, requires_grad=True)
    expected = (layer.input_layernorm(x), layer.mlp(x))
    with fused_layers(model, "torch"):
        got = (layer.input_layernorm(x), layer.mlp(x))
    assert all(torch.equal(g, e) for g, e in zip(got, expected))


def test_a_model_on_the_meta_device_runs_through_its_modules():
    """A model built under torch.device("meta") to trace shapes: its modules run on meta tensors, the stand-ins failed
    with torch's "unsupported scalarType" (autocast on the meta device)."""
    with torch.device("meta"):
        model = tiny_llama(VOCAB)
    ids = torch.zeros(2, 5, dtype=torch.long, device="meta")
    expected = model(input_ids=ids).logits
    with fused_layers(model, "torch"):
        got = model(input_ids=ids).logits
    assert got.is_meta and got.shape == expected.shape and got.dtype == expected.dtype


def test_an_mlp_whose_weights_are_not_loaded_is_refused_naming_it():
    """An MLP moved to the meta device (no accelerate hook to load it) in a model run on CPU inputs: the stand-in
    failed in gated_linear with "weight must be on gate's device (cpu), got meta", naming an argument of fastalign's op
    and not the module."""
    model = tiny_llama(VOCAB)
    model.model.layers[1].mlp.to("meta")
    with fused_layers(model, "torch"), pytest.raises(ValueError, match=r"^model.layers.1.mlp: its weights are not "
                                                                       r"loaded \(on the meta device"):
        model(input_ids=torch.zeros(2, 5, dtype=torch.long))


@pytest.mark.parametrize("where", ["down_proj", "act_fn"])
@pytest.mark.parametrize("kind", ["register_full_backward_hook", "register_full_backward_pre_hook"])
def test_a_backward_hook_on_a_module_the_mlp_folds_fires_inside_fused_layers(where, kind):
    """K-FAC or gradient capture puts backward hooks on a projection: only forward hooks were looked at, so down_proj
    was folded into gated_linear (never called) and its hook never fired; likewise act_fn's."""
    model = tiny_llama(VOCAB).train()
    ids = torch.arange(1, 10).view(1, 9)
    calls = []
    getattr(getattr(model.model.layers[0].mlp, where), kind)(lambda *args: calls.append(1))
    with fused_layers(model):
        model(input_ids=ids, labels=ids).loss.backward()
    assert calls == [1]


def test_a_hook_put_on_the_activation_inside_fused_layers_fires():
    """act_fn was looked at on entering only (down_proj at each call): a hook put on it within the context, which the
    trainer enters for the whole run, never fired."""
    model = tiny_llama(VOCAB).train()
    ids = torch.arange(1, 10).view(1, 9)
    calls = []
    with fused_layers(model):
        model.model.layers[0].mlp.act_fn.register_forward_hook(lambda *args: calls.append(1))
        model(input_ids=ids, labels=ids).loss.backward()
    assert calls == [1]


def test_a_hook_on_every_module_sees_the_down_projection_inside_fused_layers():
    """torch.nn.modules.module.register_module_forward_hook (profilers, activation loggers) fires for every module
    called; down_proj was not called."""
    model = tiny_llama(VOCAB).train()
    ids = torch.arange(1, 10).view(1, 9)
    down, calls = model.model.layers[0].mlp.down_proj, []
    handle = torch.nn.modules.module.register_module_forward_hook(
        lambda module, args, out: calls.append(1) if module is down else None)
    try:
        with fused_layers(model):
            model(input_ids=ids, labels=ids).loss.backward()
    finally:
        handle.remove()
    assert calls == [1]


def test_an_image_text_models_language_model_is_stood_in_for_and_its_vision_tower_is_not():
    """Gemma 3's 4B-27B checkpoints are Gemma3ForConditionalGeneration, whose top config is 'gemma3', not the text
    model's 'gemma3_text': fused_layers stood in for nothing."""
    from tests.runtime.tiny_models import tiny_model
    model = tiny_model("gemma3-image-text").train()
    language_model = model.model.language_model
    ids = torch.randint(1, 50, (2, 9))
    expected = model(input_ids=ids).logits
    with fused_layers(model) as stood_in:
        stood_for = [m for m in model.modules() if "forward" in vars(m)]
        got = model(input_ids=ids).logits
    assert stood_in == len(stood_for) > 0
    assert all(any(m is n for n in language_model.modules()) for m in stood_for)
    torch.testing.assert_close(got, expected)
