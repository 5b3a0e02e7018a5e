"""model_context: the context of a plain, an MPT and a composite (image-text) config, of a wrapped model, and the
runners' cap at LongRoPE's original length."""
import numpy as np
import torch
from transformers import Gemma3Config, Gemma3TextConfig, LlamaConfig, LlamaForCausalLM, MambaConfig, MptConfig

from fastalign.model_context import config_positions, model_positions, runner_context


def test_a_plain_config_gives_its_max_position_embeddings_and_mpt_its_max_seq_len():
    assert config_positions(LlamaConfig(max_position_embeddings=77)) == 77
    assert config_positions(MptConfig(max_seq_len=33)) == 33


def test_a_composite_config_gives_its_text_decoders():
    """Gemma 3's image-text config names no context itself: its text config's, not no limit (which let the runtime,
    unlearning's data check and eval's prompt check accept any length)."""
    config = Gemma3Config(text_config={"max_position_embeddings": 40})
    assert getattr(config, "max_position_embeddings", None) is None
    assert config_positions(config) == 40

    class Composite:
        pass
    model = Composite()
    model.config = config
    assert model_positions(model) == 40


def test_a_config_that_names_no_context_gives_none():
    config = MambaConfig()
    for name in ("max_position_embeddings", "max_seq_len"):
        assert getattr(config, name, None) is None
    assert config_positions(config) is None


def test_a_numpy_integer_context_is_one_and_a_bool_none():
    positions = int(np.random.default_rng().integers(16, 4096))
    config = LlamaConfig()
    object.__setattr__(config, "max_position_embeddings", np.int64(positions))   # past transformers' type check
    assert config_positions(config) == positions
    object.__setattr__(config, "max_position_embeddings", True)
    assert config_positions(config) is None


def test_a_compiled_model_gives_its_models_context_and_a_model_without_a_config_none():
    model = LlamaForCausalLM(LlamaConfig(vocab_size=16, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                                         num_attention_heads=2, max_position_embeddings=52))
    assert model_positions(torch.compile(model)) == 52
    assert model_positions(torch.nn.Linear(2, 2)) is None


def test_longrope_on_one_layer_type_or_in_a_text_config_caps_the_runners_context_alone():
    """LongRoPE's original_max_position_embeddings caps the runners' context (past it every position rotates anew)
    where the config gives one rope dict per layer type, and where it sits in a multimodal config's text_config;
    the model's own context (Hugging Face's generate handles LongRoPE) stays its max_position_embeddings."""
    longrope = {"rope_type": "longrope", "rope_theta": 10000.0, "original_max_position_embeddings": 32,
                "short_factor": [1.0] * 4, "long_factor": [4.0] * 4}
    text = dict(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=96,
                layer_types=["sliding_attention", "full_attention"], num_hidden_layers=2,
                rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                                 "full_attention": longrope})
    for config in (Gemma3TextConfig(**text), Gemma3Config(text_config=text)):
        assert runner_context(config) == 32
        assert config_positions(config) == 96
