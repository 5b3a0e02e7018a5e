"""How many token ids a Hugging Face model embeds, read the same way by the runtime and the unlearning trainer, and
the id that padding takes among them."""
import torch

from fastalign.base_model import base_causal_lm


def input_vocabulary(model) -> int | None:
    """The rows of the input embeddings' weight of `model` (under a torch.compile or PEFT wrapper: of its base model),
    or None where it has none. The rows, not num_embeddings: PEFT's LoRA layer around the embeddings has no
    num_embeddings, which crashed TreeRunner and silently skipped unlearning's check of the data's token ids."""
    get_embeddings = getattr(base_causal_lm(model), "get_input_embeddings", None)
    weight = getattr(get_embeddings() if get_embeddings is not None else None, "weight", None)
    return weight.shape[0] if isinstance(weight, torch.Tensor) else None


def pad_id(tokenizer, vocab_size: int | None = None) -> int:
    """The id that fills padded positions (masked out: generation's, unlearning's batches): the pad token, else
    end-of-sequence, else 0, passing over one past the model's `vocab_size` input embeddings (a pad token added to the
    tokenizer without resizing them: the embedding looks up masked positions too)."""
    for token_id in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if token_id is not None and (vocab_size is None or token_id < vocab_size):
            return int(token_id)
    return 0


def probe_ids(model, ids: list[int]) -> list[int]:
    """The token ids `ids` (small ones, which a check runs the model on) modulo the input vocabulary of `model`, so
    that a model of fewer words embeds them (one of 3 words takes ids 0-2); as given where it is not known (None:
    embeddings wrapped in a module without a weight, for which `id % None` raised TypeError)."""
    vocabulary = input_vocabulary(model)
    return list(ids) if vocabulary is None else [t % vocabulary for t in ids]


def check_embedded(ids, vocab_size: int | None, source: str, error: type = ValueError) -> None:
    """Raises `error` naming `source` when a token id of `ids` is negative (-100, the ignore_index of Hugging Face
    labels, copied into the ids) or past the model's `vocab_size` input embeddings (None: not known, not checked):
    a tokenizer that does not match the model (a token added to it without resizing the model's embeddings) fails
    deep inside the forward with an IndexError, on CUDA a device assert."""
    if len(ids) and min(ids) < 0:
        raise error(f"{source}: token id {min(ids)} is negative, not a token the model embeds (the ignore_index of "
                    "labels, -100, copied into the ids?)")
    if vocab_size is not None and len(ids) and max(ids) >= vocab_size:
        raise error(f"{source}: token id {max(ids)} is past the model's {vocab_size} input embeddings: the tokenizer "
                    "does not match the model (a token added without resizing the embeddings?)")
