"""The byte-level BPE of the tests' tiny models, trained offline on a few strings (nothing downloaded).

GPT-2 style: spaces glued to the following word, every byte in the alphabet; special tokens <s>, </s>, <pad>
(ids 0, 1, 2), and <s> prepended to every encoded text, as Llama's tokenizer does.
"""
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers


def train_byte_bpe(corpus, vocab_size: int) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<s>", "</s>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(list(corpus) * 4, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    return tok
