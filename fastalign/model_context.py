"""The longest sequence a Hugging Face model's config allows, read the same way by the runtime, unlearning's data
checks and generation."""


def config_positions(config) -> int | None:
    """max_position_embeddings (MPT's max_seq_len, which its ALiBi covers no further) of `config`, or of its text
    decoder's config where it names none itself (a composite model's, Gemma 3's image-text model: its top-level config
    has none, which read as no limit); None where neither names one."""
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    for c in (text, config):
        value = getattr(c, "max_position_embeddings", None) or getattr(c, "max_seq_len", None)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None
