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
