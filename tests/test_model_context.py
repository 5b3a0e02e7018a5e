"""model_context.config_positions: the context of a plain, an MPT and a composite (image-text) config."""
from transformers import Gemma3Config, LlamaConfig, MambaConfig, MptConfig

from fastalign.evaluation.generation import context_length
from fastalign.model_context import config_positions


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
    assert context_length(model) == 40


def test_a_config_that_names_no_context_gives_none():
    config = MambaConfig()
    for name in ("max_position_embeddings", "max_seq_len"):
        assert getattr(config, name, None) is None
    assert config_positions(config) is None
