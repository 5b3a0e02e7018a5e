"""The longest sequence a Hugging Face model allows, read the same way by the runtime's runners, RAIN, unlearning's
data checks and evaluation; and where a composite model's config keeps its text decoder's settings."""
from fastalign.base_model import base_causal_lm
from fastalign.ops.checks import is_integer


def text_config(config):
    """The config of `config`'s text decoder: a composite model's (Gemma 3's image-text model, a vision-language
    model) keeps the decoder's settings there; any other config is its own (and a plain namespace has no other)."""
    return config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config


def config_positions(config) -> int | None:
    """max_position_embeddings (MPT's max_seq_len, which its ALiBi covers no further) of `config`, or of its text
    decoder's config where it names none itself (a composite model's, Gemma 3's image-text model: its top-level config
    has none, which read as no limit); None where neither names one."""
    for c in (text_config(config), config):
        value = getattr(c, "max_position_embeddings", None) or getattr(c, "max_seq_len", None)
        if is_integer(value):
            return value
    return None


def model_positions(model) -> int | None:
    """config_positions of `model`'s config (under a torch.compile or PEFT wrapper: its base model's), or None where
    it has no config or its config names no context. Every reader of a loaded model's context calls this one: RAIN's
    copies read max_position_embeddings alone, so an MPT ran past its max_seq_len."""
    config = getattr(base_causal_lm(model), "config", None)
    return None if config is None else config_positions(config)


def _longrope_limit(config, limit):
    """`limit` (None: none) capped at LongRoPE's original_max_position_embeddings. Past that length
    Hugging Face rotates EVERY position of the sequence with the long factors (its generate drops the cache
    there), so KV cached while a sequence was shorter, or next to a longer row of the same forward, would
    no longer match the model run on the full sequence."""
    params = getattr(config, "rope_parameters", None) or {}
    for rope in [params] if "rope_type" in params else params.values():  # or one dict per layer type
        if isinstance(rope, dict) and rope.get("rope_type") == "longrope":
            original = rope["original_max_position_embeddings"]
            limit = original if limit is None else min(limit, original)
    return limit


def runner_context(config):
    """The longest sequence the TreeRunner's model runners run for `config`'s model (None: no limit): its
    config_positions, capped where LongRoPE would rotate positions run earlier anew. The runners alone take the cap:
    Hugging Face's generate (evaluation's, RAIN's vanilla answer) handles LongRoPE itself."""
    return _longrope_limit(text_config(config), config_positions(config))
