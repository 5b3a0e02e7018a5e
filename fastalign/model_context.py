"""The longest sequence a Hugging Face model's config allows, read the same way by the runtime, unlearning's data
checks and generation; and where a composite model's config keeps its text decoder's settings."""


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
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None
