"""The byte-level BPE of the tests' tiny models, trained offline on a few strings (nothing downloaded).

GPT-2 style: spaces glued to the following word, every byte in the alphabet; special tokens <s>, </s>, <pad>
(ids 0, 1, 2), and <s> prepended to every encoded text, as Llama's tokenizer does.
"""
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers


# Llama-3's pre-tokenizer split (the published pattern of its tokenizer): a letter takes the space before it,
# a digit never does, punctuation takes a newline after it
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def train_byte_bpe(corpus, vocab_size: int, split: str | None = None) -> Tokenizer:
    """GPT-2's split by default; `split`: a pre-tokenizer pattern of another model's (LLAMA3_SPLIT)."""
    tok = Tokenizer(models.BPE())
    if split is None:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(split), behavior="isolated"),
                                                     pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<s>", "</s>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(list(corpus) * 4, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    return tok
