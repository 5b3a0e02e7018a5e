"""Variants of the tests' fast tokenizers as real models' configurations have them (nothing downloaded): one that
appends EOS to every text it encodes (Llama's `add_eos_token=True`, a '$A </s>' post-processor), and a slow one
(a pure-Python `PreTrainedTokenizer`, as models with custom tokenizer code ship: no character offsets) giving
the same ids."""
import copy

from tokenizers import processors
from transformers import PreTrainedTokenizer


def appending_eos(tokenizer):
    """A copy of the fast `tokenizer` whose encodings with special tokens also end with its EOS."""
    bos = [(tokenizer.bos_token, tokenizer.bos_token_id)]
    if tokenizer("x")["input_ids"][:1] != [tokenizer.bos_token_id]:   # a tokenizer that adds no BOS (Qwen2's)
        bos = []
    out = copy.deepcopy(tokenizer)
    out.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=" ".join([token for token, _ in bos] + ["$A", tokenizer.eos_token]),
        special_tokens=bos + [(tokenizer.eos_token, tokenizer.eos_token_id)])
    return out


class SlowTokenizer(PreTrainedTokenizer):
    """A pure-Python tokenizer (is_fast False, no offsets) over a `tokenizers.Tokenizer` core's vocabulary and
    pieces, BOS prepended: the ids of that core's fast tokenizer, read the slow way."""

    def __init__(self, core, **kwargs):
        self._core = core
        self._vocab = core.get_vocab(with_added_tokens=False)
        self._pieces = {i: piece for piece, i in self._vocab.items()}
        super().__init__(special_tokens_pattern="bos", **kwargs)

    @property
    def vocab_size(self):
        return len(self._vocab)

    def get_vocab(self):
        return dict(self._vocab, **self.added_tokens_encoder)

    def _tokenize(self, text, **kwargs):
        return self._core.encode(text, add_special_tokens=False).tokens

    def _convert_token_to_id(self, token):
        return self._vocab[token]

    def _convert_id_to_token(self, index):
        return self._pieces[index]

    def convert_tokens_to_string(self, tokens):
        return self._core.decoder.decode(tokens)
