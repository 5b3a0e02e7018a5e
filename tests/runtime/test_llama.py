"""Which models PagedLlama takes, and what it reads from their configs (fastalign.runtime.llama)."""
import copy
import warnings

import numpy as np
import pytest
import torch
from transformers import (Gemma3ForCausalLM, Gemma3TextConfig, LlamaConfig, LlamaForCausalLM, MistralConfig,
                          MistralForCausalLM, MixtralConfig, MixtralForCausalLM, Qwen2Config, Qwen2ForCausalLM,
                          Qwen2MoeConfig, Qwen2MoeForCausalLM, Qwen3Config, Qwen3ForCausalLM, Qwen3MoeConfig,
                          Qwen3MoeForCausalLM)

from fastalign import TreeRunner
from fastalign.runtime.llama import llama_family_problem
from tests.conftest import device_for
from tests.runtime.tiny_models import CONFIGS, MAX_POSITIONS, VOCAB, assert_matches, tiny_model

# a tiny model of two layers, and of four experts for the mixtures
_TINY = dict(vocab_size=VOCAB, max_position_embeddings=MAX_POSITIONS, hidden_size=32, intermediate_size=64,
             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, attn_implementation="eager")
_MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16)


@pytest.mark.parametrize("part", ["model.rotary_emb", "model.embed_tokens", "model.norm", "lm_head"])
def test_a_model_missing_a_module_outside_its_layers_is_not_run_on_the_paged_llama_path(part):
    """A Llama-family model without its shared rotary embedding (older layouts rotate in each layer), embeddings, final
    norm or head would fail deep in the paged forward: the check names the missing module."""
    model = tiny_model("llama-gqa-untied")
    parent, child = part.rsplit(".", 1) if "." in part else ("", part)
    delattr(model.get_submodule(parent), child)
    assert llama_family_problem(model) == f"its modules do not follow the Llama layout (missing {child})"


@pytest.mark.parametrize("part", ["mlp", "self_attn.v_proj", "input_layernorm"])
def test_a_model_missing_a_module_inside_a_layer_is_not_run_on_the_paged_llama_path(part):
    """A layer without a module the paged forward calls (a fused projection, an MLP under another name) would fail
    deep in the forward instead of going to PagedHF: the check names the missing module of its layer."""
    model = tiny_model("llama-gqa-untied")
    parent, child = part.rsplit(".", 1) if "." in part else ("", part)
    delattr(model.model.layers[1].get_submodule(parent), child)
    assert llama_family_problem(model) == f"its modules do not follow the Llama layout (missing layers[1].{part})"


def test_a_bidirectional_model_of_a_paged_family_is_not_run_causally():
    """Gemma 3 with use_bidirectional_attention (EmbeddingGemma's) attends to later tokens too: the causal paged
    forward would give it silently wrong outputs, so PagedLlama refuses it."""
    torch.manual_seed(0)
    model = Gemma3ForCausalLM(Gemma3TextConfig(**_TINY, head_dim=8, use_bidirectional_attention=True)).eval()
    assert llama_family_problem(model) == "it attends bidirectionally (use_bidirectional_attention), not causally"
    with pytest.raises(ValueError, match=r"it attends bidirectionally \(use_bidirectional_attention\), not causally"):
        TreeRunner(model, max_tokens=64, block_size=4, attention_backend="torch", fallback=False)


@pytest.mark.parametrize("name, cls, cap", [("gemma3-sliding-softcap", Gemma3ForCausalLM, "attn_logit_softcapping"),
                                           ("llama-gqa-untied", LlamaForCausalLM, "final_logit_softcapping")])
def test_a_soft_cap_in_a_config_that_the_familys_forward_ignores_caps_nothing(name, cls, cap):
    """Gemma 3's attention keeps config.attn_logit_softcapping but never applies it (Gemma 2's does), and Llama's head
    never reads a final_logit_softcapping (a key of a config converted from another family): a config that names one
    gets the model's own uncapped scores and logits."""
    config = CONFIGS[name][1]()
    setattr(config, cap, 0.5)
    torch.manual_seed(0)
    model = cls(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, p.shape[-1] ** -0.5)
    runner = TreeRunner(model, max_tokens=64, block_size=4, attention_backend="torch")
    seq = [5, 9, 14, 3, 7, 11, 2, 8]
    (child,), logits = runner.extend([runner.prefill(seq[:3])], [seq[3:]], logits="all")
    assert_matches(model, [child], logits)


def _attention_softcaps(model, cap):
    for layer in model.model.layers:
        layer.self_attn.attn_logit_softcapping = cap


@pytest.mark.parametrize("name, change", [
    ("gemma2-sliding-softcaps", lambda model: setattr(model.config, "final_logit_softcapping", 12.0)),
    ("gemma2-sliding-softcaps", lambda model: _attention_softcaps(model, 0.5)),
    ("gemma2-sliding-softcaps", lambda model: setattr(model.config, "sliding_window", 3)),
    ("olmo3-sliding-tied", lambda model: setattr(model.config, "layer_types", model.config.layer_types[::-1]))])
def test_what_the_familys_forward_reads_at_each_call_is_read_at_each_call(name, change):
    """Hugging Face's forward reads the config's final_logit_softcapping, sliding_window and layer_types, and each
    attention's attn_logit_softcapping, at each call; PagedLlama copied them when made and went on computing with the
    old values after a change (logits off by 2.7 after a new final_logit_softcapping)."""
    model = tiny_model(name)
    runner = TreeRunner(model, max_tokens=64, block_size=4, attention_backend="torch")
    runner.prefill([5, 9, 14])
    change(model)
    (child,), logits = runner.extend([None], [[5, 9, 14, 3, 7, 11, 2, 8, 13, 4, 6, 10, 1, 12]], logits="all")
    assert_matches(model, [child], logits)


def _replace(model, name):
    """The submodule `name` of `model` replaced by a copy with other weights (the layers: by themselves reordered)."""
    parent, child = name.rsplit(".", 1)
    module = copy.deepcopy(model.get_submodule(name))
    if isinstance(module, torch.nn.ModuleList):
        module = torch.nn.ModuleList(list(model.get_submodule(name))[::-1])
    with torch.no_grad():
        for param in module.parameters():
            param.mul_(1.5)
    setattr(model.get_submodule(parent), child, module)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("name, part", [
    ("llama-gqa-untied", "model.norm"), ("llama-gqa-untied", "model.layers.1.input_layernorm"),
    ("llama-gqa-untied", "model.layers.0.mlp"), ("llama-gqa-untied", "model.layers"),
    ("qwen3-head-dim-untied", "model.layers.0.self_attn.q_norm"),
    ("gemma2-sliding-softcaps", "model.layers.1.post_feedforward_layernorm")])
def test_a_module_replaced_after_the_runner_is_made_runs(name, part, backend):
    """Hugging Face's forward calls the decoder's layers and norms as they are at each call; PagedLlama held the
    layers, norms and MLPs (their fused stand-ins on the Triton backend) it found when made, and went on running the
    old ones after one was replaced (logits off by 2-3)."""
    model = tiny_model(name, device=device_for(backend))
    runner = TreeRunner(model, max_tokens=64, block_size=4, attention_backend=backend)
    runner.prefill([5, 9, 14])
    _replace(model, part)
    (child,), logits = runner.extend([None], [[5, 9, 14, 3, 7, 11, 2, 8]], logits="all")
    assert_matches(model, [child], logits)


def test_a_model_pruned_to_fewer_layers_than_the_pool_holds_is_refused():
    """A pool made for N layers' K/V would run the first N - 1 of them against the pruned model's layers: a call
    after the decoder lost a layer is refused, naming the model and what to do."""
    model = tiny_model("llama-gqa-untied")
    runner = TreeRunner(model, max_tokens=64, block_size=4, attention_backend="torch")
    model.model.layers = model.model.layers[:1]
    with pytest.raises(ValueError, match=r"model: it has 1 decoder layers now.* made for 2; make a new TreeRunner"):
        runner.extend([None], [[5, 9, 14]])


def test_an_lm_head_with_integer_weights_takes_the_hidden_states_as_they_are():
    """A quantized head (int8 weights and a scale, as bitsandbytes' or a hand-rolled one) dequantizes in its forward:
    the hidden states go in unchanged, not cast to its weights' integer dtype."""
    class Int8Head(torch.nn.Module):
        def __init__(self, linear):
            super().__init__()
            self.scale = linear.weight.abs().max() / 127
            self.register_buffer("weight", torch.round(linear.weight / self.scale).to(torch.int8))

        def forward(self, x):
            return x @ (self.weight.to(x.dtype) * self.scale).T

    model = tiny_model("llama-gqa-untied")
    model.lm_head = Int8Head(model.lm_head)
    runner = TreeRunner(model, max_tokens=64, block_size=4, attention_backend="torch")
    seq = [5, 9, 14, 3, 7, 11]
    (child,), logits = runner.extend([runner.prefill(seq[:3])], [seq[3:]], logits="all")
    assert_matches(model, [child], logits)


class StoredLinear(torch.nn.Linear):
    """A Linear (without bias) whose weight is stored in `dtype` divided by a scale, and computed with in its input's
    dtype: float8 weights upcast in the forward, as Hugging Face's FP8 integrations store them."""

    def __init__(self, linear, dtype, scale=1.5):
        super().__init__(linear.in_features, linear.out_features, bias=False)
        self.weight = torch.nn.Parameter((linear.weight.detach() / scale).to(dtype), requires_grad=False)
        self.scale = scale

    def forward(self, x):
        return torch.nn.functional.linear(x, self.weight.to(x.dtype) * self.scale)


@pytest.mark.parametrize("name", ["llama-gqa-untied", "gemma2-sliding-softcaps", "qwen3-moe-tied"])
@pytest.mark.parametrize("stored", [torch.float8_e4m3fn, torch.bfloat16])
def test_an_lm_head_that_computes_in_its_inputs_dtype_takes_the_hidden_states_as_they_are(name, stored):
    """A head that stores its weight in float8 with a scale and upcasts it in its forward (as Hugging Face's FP8
    integrations do), or stores it in bf16 and computes in its input's dtype, on an fp32 model: the runner cast the
    final hidden states to the weight's dtype, which failed in float8 ("mul_cpu_reduced_float" not implemented for
    'Float8_e4m3fn') and rounded them to bf16 (logits 1e-2 off). It feeds the head what the model's forward does."""
    model = tiny_model(name)
    model.lm_head = StoredLinear(model.lm_head, stored)
    runner = TreeRunner(model, max_tokens=64, block_size=4, attention_backend="torch")
    seq = [5, 9, 14, 3, 7, 11]
    (child,), logits = runner.extend([runner.prefill(seq[:3])], [seq[3:]], logits="all")
    assert_matches(model, [child], logits)


def test_a_peft_lora_on_an_lm_head_in_another_dtype_than_the_layers_takes_the_hidden_states_in_its_own():
    """PEFT's LoRA layer calls the Linear it wraps on its input: an fp32 head of a bf16 model, wrapped, gets the final
    hidden states in fp32, as a plain one does (its Linear takes no other dtype)."""
    peft = pytest.importorskip("peft")
    model = tiny_model("llama-gqa-untied", dtype=torch.bfloat16)
    model.lm_head.to(torch.float32)
    model = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["lm_head"], init_lora_weights=False))
    runner = TreeRunner(model, max_tokens=64, block_size=4, attention_backend="torch")
    _, (logits,), (hidden,) = runner.extend([None], [[5, 9, 14, 3]], logits="all", hidden="all")
    with torch.no_grad():
        torch.testing.assert_close(logits, model.base_model.model.lm_head(hidden.float()), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_a_model_with_bf16_embeddings_and_fp32_layers_gives_its_own_logits(backend):
    """bf16 input embeddings before fp32 layers: the model's forward runs (the first RMSNorm's fp32 weight promotes
    the embeddings to fp32), but the runner made its pool in the embeddings' dtype and failed deep in paged attention
    ("k: expected dtype torch.bfloat16 (that of k_cache), got torch.float32"), naming neither. The pool takes the
    dtype of the K/V the layers compute; on the Triton backend the first norm (whose kernel returns its input's
    dtype) is the module's on the bf16 embeddings."""
    model = tiny_model("llama-gqa-untied", device=device_for(backend))
    model.model.embed_tokens.to(torch.bfloat16)
    runner = TreeRunner(model, max_tokens=64, block_size=4, attention_backend=backend)
    seq = [5, 9, 14, 3, 7, 11]
    (child,), logits = runner.extend([runner.prefill(seq[:3])], [seq[3:]], logits="all")
    assert_matches(model, [child], logits)
    model.model.layers.to(torch.bfloat16)   # the pool's dtype changed under the runner: refused by name
    with pytest.raises(ValueError, match="since this TreeRunner was made for them; make a new TreeRunner"):
        runner.extend([child], [[2]])


def test_a_model_whose_k_projections_store_float8_weights_keeps_its_kv_in_the_embeddings_dtype():
    """A k_proj that upcasts float8 weights in its forward returns its input's dtype, the embeddings' (the pool's),
    not its weight's."""
    model = tiny_model("llama-gqa-untied")
    for layer in model.model.layers:
        layer.self_attn.k_proj = StoredLinear(layer.self_attn.k_proj, torch.float8_e4m3fn)
    runner = TreeRunner(model, max_tokens=64, block_size=4, attention_backend="torch")
    assert runner.pool.tensors[0].dtype == torch.float32
    (child,), logits = runner.extend([None], [[5, 9, 14, 3, 7, 11]], logits="all")
    assert_matches(model, [child], logits)


@pytest.mark.parametrize("cls, config, windows", [
    (MixtralForCausalLM, lambda: MixtralConfig(**_TINY, sliding_window=4, num_local_experts=4), [4, 4]),
    (Qwen2ForCausalLM, lambda: Qwen2Config(**_TINY, use_sliding_window=True, sliding_window=4,
                                           max_window_layers=1), [None, 4]),
    (Qwen2MoeForCausalLM, lambda: Qwen2MoeConfig(**_TINY, **_MOE, use_sliding_window=True, sliding_window=4,
                                                 max_window_layers=1, shared_expert_intermediate_size=16),
     [4, None]),
    (Qwen3ForCausalLM, lambda: Qwen3Config(**_TINY, head_dim=8, use_sliding_window=True, sliding_window=4,
                                           max_window_layers=1), [None, 4]),
    (Qwen3MoeForCausalLM, lambda: Qwen3MoeConfig(**_TINY, **_MOE, head_dim=8, use_sliding_window=True,
                                                 sliding_window=4), [4, 4]),
    (LlamaForCausalLM, lambda: LlamaConfig(**_TINY, sliding_window=4), [None, None])])
def test_each_family_attends_to_the_sliding_window_where_its_own_forward_masks_one(cls, config, windows):
    """A family's layout names where config.sliding_window applies (every layer, the layers config.layer_types calls
    sliding, or none: Llama's ignores one): a layer given the wrong window reads keys its model masks, or misses keys
    it reads, silently, once a sequence outgrows the window."""
    torch.manual_seed(0)
    model = cls(config()).eval()
    runner = TreeRunner(model, max_tokens=64, block_size=4, attention_backend="torch")
    assert runner.model_runner.windows == windows
    seq = [5, 9, 14, 3, 7, 11, 2, 8, 13, 4, 6, 10]
    (child,), logits = runner.extend([runner.prefill(seq[:5])], [seq[5:]], logits="all")
    assert_matches(model, [child], logits)


def test_a_numpy_integer_sliding_window_slides():
    """A config's sliding_window given as a NumPy integer (which Hugging Face's forward masks with) was refused by an
    int check; it is taken, and rows past it match the model's own forward."""
    window = int(np.random.default_rng().integers(2, 6))
    config = MistralConfig(**_TINY)
    object.__setattr__(config, "sliding_window", np.int64(window))   # past transformers' type check of fields
    model = MistralForCausalLM(config).eval()
    runner = TreeRunner(model, max_tokens=64, block_size=4, attention_backend="torch")
    assert runner.model_runner.windows == [window, window]
    seq = torch.randint(VOCAB, (12,)).tolist()
    (child,), logits = runner.extend([runner.prefill(seq[:5])], [seq[5:]], logits="all")
    assert_matches(model, [child], logits)


def _steered(module, args, out):
    """A forward hook moving a module's output (a layer's, an attention's, the decoder's or the model's): activation
    steering."""
    if isinstance(out, torch.Tensor):
        return out + 0.5
    if isinstance(out, tuple):
        return (out[0] + 0.5,) + out[1:]
    key = "logits" if "logits" in out else "last_hidden_state"
    out[key] = out[key] + 0.5
    return out


@pytest.mark.parametrize("where, hook", [
    ("", "forward"), ("model", "forward"), ("model.layers.0", "forward"), ("model.layers.1.self_attn", "forward"),
    ("model.layers.1", "pre"), ("model.layers.0.self_attn", "instance forward")])
def test_a_model_whose_decoder_layers_or_attentions_run_hooks_runs_its_own_forward(where, hook):
    """The paged Llama forward calls the embeddings, norms, projections and MLPs, passing over the model, its decoder,
    its layers and their attentions: hooks there (a steering vector, a probe editing the residual stream) were
    skipped, and the runner's logits were the unhooked model's (off by up to 1.85), silently. Such a model runs on its
    own forward (PagedHF, or a fallback where its probe refuses the model), with a warning naming the hooked module."""
    model = tiny_model("llama-gqa-untied")
    module = model.get_submodule(where)
    if hook == "forward":
        module.register_forward_hook(_steered)
    elif hook == "pre":
        module.register_forward_pre_hook(lambda module, args: (args[0] * 1.5,) + args[1:])
    else:
        module.forward = lambda *args, **kwargs: _steered(module, args, type(module).forward(module, *args, **kwargs))
    with pytest.warns(UserWarning, match=f"cannot run on the paged Llama path: {where or 'LlamaForCausalLM'} runs "
                                         "hooks .*; it runs on"):
        runner = TreeRunner(model, max_tokens=64, block_size=4, attention_backend="torch")
    seq = [3, 5, 7, 9, 11, 13]
    (child,), logits = runner.extend([runner.prefill(seq[:4])], [seq[4:]], logits="all")
    assert_matches(model, [child], logits)


def test_a_model_whose_accelerate_hooks_were_removed_runs_on_the_paged_llama_path():
    """accelerate's remove_hook_from_module sets each module's `forward` back as the bound method of its class's
    forward, an instance attribute: read as a forward set by a user, the model "runs hooks" and ran, with a warning,
    on Hugging Face's cache, the slowest fallback."""
    accelerate = pytest.importorskip("accelerate")
    model = tiny_model("llama-gqa-untied")
    accelerate.cpu_offload(model, execution_device=torch.device("cpu"))
    accelerate.hooks.remove_hook_from_module(model, recurse=True)
    assert "forward" in vars(model) and "forward" in vars(model.model.norm)
    assert llama_family_problem(model) is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        runner = TreeRunner(model, max_tokens=64, block_size=4, attention_backend="torch")
    assert type(runner.model_runner).__name__ == "PagedLlama"
    seq = [3, 5, 7, 9, 11, 13]
    (child,), logits = runner.extend([runner.prefill(seq[:4])], [seq[4:]], logits="all")
    assert_matches(model, [child], logits)


def test_transformers_output_capturing_hooks_keep_a_model_on_the_paged_llama_path():
    """A forward with output_hidden_states or output_attentions installs transformers' own hooks on every layer and
    attention for good; they only record the outputs of such a forward, so the model still runs on PagedLlama."""
    model = tiny_model("llama-gqa-untied")
    with torch.no_grad():
        model(torch.tensor([[3, 5, 7]]), output_hidden_states=True, output_attentions=True)
    assert model.model.layers[0]._forward_hooks and model.model.layers[0].self_attn._forward_hooks
    assert llama_family_problem(model) is None
    assert type(TreeRunner(model, max_tokens=64, block_size=4).model_runner).__name__ == "PagedLlama"
