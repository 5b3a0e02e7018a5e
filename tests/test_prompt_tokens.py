"""Token ids of texts as a model reads them (fastalign/prompt_tokens.py)."""
from fastalign.prompt_tokens import appends_eos, tokenize_prompts
from tests.unlearn.tiny import byte_bpe_tokenizer


def test_prompts_keep_an_eos_their_text_writes():
    """tokenize_prompts drops only the EOS a tokenizer appends to every text: a tokenizer that appends none, or one
    that does but reads the text without special tokens, keeps the EOS the prompt's text writes itself."""
    from tests.tokenizer_variants import appending_eos

    tokenizer = byte_bpe_tokenizer()
    appending, text = appending_eos(tokenizer), "Hi" + tokenizer.eos_token
    assert not appends_eos(tokenizer) and appends_eos(appending)
    written = tokenizer(text)["input_ids"]
    assert written[-1] == tokenizer.eos_token_id
    assert tokenize_prompts(tokenizer, [text]) == tokenize_prompts(appending, [text]) == [written]
    bare = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenize_prompts(appending, [text], add_special_tokens=False) == [bare] and bare[-1:] == written[-1:]
