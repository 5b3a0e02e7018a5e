"""Token ids of texts as a model reads them (fastalign/prompt_tokens.py)."""
from fastalign.prompt_tokens import appended_ids, tokenize_prompts
from tests.unlearn.tiny import byte_bpe_tokenizer


def test_prompts_keep_an_eos_their_text_writes():
    """tokenize_prompts drops only the EOS a tokenizer appends to every text: a tokenizer that appends none, or one
    that does but reads the text without special tokens, keeps the EOS the prompt's text writes itself."""
    from tests.tokenizer_variants import appending_eos

    tokenizer = byte_bpe_tokenizer()
    appending, text = appending_eos(tokenizer), "Hi" + tokenizer.eos_token
    assert appended_ids(tokenizer) == [] and appended_ids(appending) == [tokenizer.eos_token_id]
    written = tokenizer(text)["input_ids"]
    assert written[-1] == tokenizer.eos_token_id
    assert tokenize_prompts(tokenizer, [text]) == tokenize_prompts(appending, [text]) == [written]
    bare = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenize_prompts(appending, [text], add_special_tokens=False) == [bare] and bare[-1:] == written[-1:]


def wordpiece_tokenizer():
    """A BERT-style WordPiece tokenizer: lower-cased words and ##pieces, '[CLS] $A [SEP]' and no eos_token (as the
    causal LMs that ship a BertTokenizer have, uer/gpt2-chinese-*)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]
    words = ["question", "answer", "is", "it", "safe", "the", "sea", "#", ":", "?", "##s", "##ing"]
    core = Tokenizer(models.WordPiece({t: i for i, t in enumerate(specials + words)}, unk_token="[UNK]"))
    core.normalizer = normalizers.BertNormalizer(lowercase=True)
    core.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    core.decoder = decoders.WordPiece()
    core.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2),
                                                                                                 ("[SEP]", 3)])
    return PreTrainedTokenizerFast(tokenizer_object=core, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                   sep_token="[SEP]")


def test_a_prompt_ends_without_the_sep_a_wordpiece_tokenizer_appends_to_every_text():
    """A BERT-style tokenizer ends every text with [SEP], which no eos_token names: prompts ended with it, and the
    model was asked to go on after its end-of-text marker. The leading [CLS] stays, as a BOS does; a [SEP] the
    prompt's text writes stays too."""
    import random

    tokenizer = wordpiece_tokenizer()
    cls, sep = tokenizer.cls_token_id, tokenizer.sep_token_id
    assert tokenizer.eos_token_id is None and appended_ids(tokenizer) == [sep]
    assert appended_ids(byte_bpe_tokenizer()) == []
    rng = random.Random(2)
    words = ["question", "answers", "is", "it", "safe", "the", "seas", "seaing", "#", ":", "?"]
    texts = [" ".join(rng.choice(words) for _ in range(rng.randint(1, 8))) for _ in range(5)]
    texts += [texts[0] + " [SEP]"]
    plain = tokenizer(texts, add_special_tokens=False)["input_ids"]
    assert tokenize_prompts(tokenizer, texts) == [[cls] + ids for ids in plain]
    assert plain[-1][-1] == sep
    assert tokenize_prompts(tokenizer, texts, add_special_tokens=False) == plain


CYRILLIC = ["привет мир как дела", "хорошо спасибо"]


def cyrillic_bpe_tokenizer(appends_eos: bool):
    """A BPE tokenizer trained on Cyrillic text alone, without an unknown token (it drops what it cannot encode:
    "a" encodes to no ids), that starts every text with <s> and, where `appends_eos`, ends it with </s>."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.train_from_iterator(CYRILLIC, trainers.BpeTrainer(vocab_size=60, special_tokens=["<s>", "</s>"]))
    core.post_processor = processors.TemplateProcessing(single="<s> $A </s>" if appends_eos else "<s> $A",
                                                        special_tokens=[("<s>", 0), ("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>")


def test_a_prompt_ends_without_the_eos_of_a_tokenizer_that_has_no_ids_for_a():
    """appended_ids read what a tokenizer appends off the encoding of "a": a tokenizer without ids for it appended
    nothing after them, so prompts kept the EOS it appends to every text. It is read off a text of the vocabulary."""
    import random

    appending, plain_end = cyrillic_bpe_tokenizer(True), cyrillic_bpe_tokenizer(False)
    assert appending("a", add_special_tokens=False)["input_ids"] == []
    assert appended_ids(appending) == [appending.eos_token_id] and appended_ids(plain_end) == []
    rng = random.Random(3)
    words = " ".join(CYRILLIC).split()
    texts = [" ".join(rng.choice(words) for _ in range(rng.randint(1, 6))) for _ in range(5)]
    expected = [[appending.bos_token_id] + ids for ids in appending(texts, add_special_tokens=False)["input_ids"]]
    assert tokenize_prompts(appending, texts) == tokenize_prompts(plain_end, texts) == expected
