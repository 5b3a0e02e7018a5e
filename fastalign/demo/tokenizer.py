"""The word-level tokenizer of the demo world, built offline with the `tokenizers` library.

Every text of the world splits (GPT-2 byte-level pre-tokenisation: a word keeps its leading space) into
pieces that are each one token, so the vocabulary is a few hundred entries and the model stays tiny;
decoding reverses the byte-level mapping exactly. Unknown pieces map to `<unk>`. Like Llama's tokenizer it
prepends `<s>` and leaves `</s>` to the caller; it is a `PreTrainedTokenizerFast`, so it returns offsets.
"""
from typing import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"


def build_tokenizer(texts: Iterable[str]) -> PreTrainedTokenizerFast:
    """A tokenizer whose vocabulary is exactly the special tokens plus every piece of `texts` (sorted)."""
    pre = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    pieces = sorted({piece for text in texts for piece, _ in pre.pre_tokenize_str(text)})
    vocab = {token: i for i, token in enumerate([PAD, BOS, EOS, UNK] + pieces)}
    core = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    core.pre_tokenizer = pre
    core.decoder = decoders.ByteLevel()
    core.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, vocab[BOS])])
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token=BOS, eos_token=EOS, unk_token=UNK,
                                   pad_token=PAD, padding_side="left")
