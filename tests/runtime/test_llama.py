"""Which models PagedLlama takes, and what it reads from their configs (fastalign.runtime.llama)."""
import pytest
import torch
from transformers import Gemma3Config, Gemma3ForCausalLM, Gemma3TextConfig, LlamaForCausalLM

from fastalign import TreeRunner
from fastalign.runtime.llama import context_limit, llama_family_problem
from tests.runtime.tiny_models import CONFIGS, MAX_POSITIONS, VOCAB, assert_matches, tiny_model


@pytest.mark.parametrize("part", ["model.rotary_emb", "model.embed_tokens", "model.norm", "lm_head"])
def test_a_model_missing_a_module_outside_its_layers_is_not_run_on_the_paged_llama_path(part):
    """A Llama-family model without its shared rotary embedding (older layouts rotate in each layer), embeddings, final
    norm or head would fail deep in the paged forward: the check names the missing module."""
    model = tiny_model("llama-gqa-untied")
    parent, child = part.rsplit(".", 1) if "." in part else ("", part)
    delattr(model.get_submodule(parent), child)
    assert llama_family_problem(model) == f"its modules do not follow the Llama layout (missing {child})"


def test_a_bidirectional_model_of_a_paged_family_is_not_run_causally():
    """Gemma 3 with use_bidirectional_attention (EmbeddingGemma's) attends to later tokens too: the causal paged
    forward would give it silently wrong outputs, so PagedLlama refuses it."""
    torch.manual_seed(0)
    model = Gemma3ForCausalLM(Gemma3TextConfig(
        vocab_size=VOCAB, max_position_embeddings=MAX_POSITIONS, hidden_size=32, intermediate_size=64,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
        use_bidirectional_attention=True, attn_implementation="eager")).eval()
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


def test_longrope_on_one_layer_type_or_in_a_text_config_caps_the_context():
    """LongRoPE's original_max_position_embeddings caps the context (past it every position rotates anew) where the
    config gives one rope dict per layer type, and where it sits in a multimodal config's text_config."""
    longrope = {"rope_type": "longrope", "rope_theta": 10000.0, "original_max_position_embeddings": 32,
                "short_factor": [1.0] * 4, "long_factor": [4.0] * 4}
    text = dict(vocab_size=VOCAB, max_position_embeddings=MAX_POSITIONS, hidden_size=32, intermediate_size=64,
                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                layer_types=["sliding_attention", "full_attention"],
                rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                                 "full_attention": longrope})
    assert context_limit(Gemma3TextConfig(**text)) == 32
    assert context_limit(Gemma3Config(text_config=text)) == 32
