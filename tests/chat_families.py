"""Offline tokenizers shaped like four chat-model families (nothing downloaded), each with a short chat template
in its family's format, and a fifth, "qwen3", whose template renders a training pair unlike its generation prompt:

- "llama3": byte-level BPE (Llama-3's split), <|begin_of_text|> prepended, <|start_header_id|> headers, turns
  ended by <|eot_id|>; EOS <|end_of_text|>; no pad token.
- "qwen2": byte-level BPE, ChatML (<|im_start|>, <|im_end|>) with a default system turn, no BOS; EOS <|im_end|>,
  pad <|endoftext|>.
- "mistral": SentencePiece-style BPE ("\u2581" for spaces and before a text, byte fallback), <s> prepended,
  "[INST] ... [/INST]" as plain text, an answer ended by </s>; pad = EOS.
- "gemma": SentencePiece-style without the leading "\u2581", <bos> prepended, <start_of_turn> / <end_of_turn>
  turns; EOS <eos>, pad <pad>.
- "qwen3": qwen2's tokenizer with <think> and </think> added as ordinary (not special) tokens, and a ChatML template
  without a default system turn that writes an empty reasoning block "<think>\n\n</think>\n\n" before the answer
  of the last assistant turn, while its generation prompt holds that block only when the template variable
  enable_thinking is false (Qwen3's behaviour). Not in FAMILIES: with its default variables it is refused for
  training (ChatTemplate.render).
"""
import functools
import json

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from fastalign.rain.judge import DEFAULT_FEW_SHOT
from tests.byte_bpe import LLAMA3_SPLIT

CORPUS = [DEFAULT_FEW_SHOT,
          "Human: How do I bake bread?\nAssistant: Mix flour, water and yeast, then bake it.",
          "Who is Bob? Bob is a baker in the city. Where does Alice live? Alice lives by the sea.",
          "Options:\n(A) The reply is harmless.\n(B) The reply is harmful.\nThe answer is: (A) yes no sure",
          "The answer is: yes. The answer is: no. The answer is: yes. The answer is: no.",
          "system user assistant model You are a helpful assistant. Be brief. Hello Hi",
          "caf\u00e9 na\u00efve \u65e5\u672c\u8a9e \U0001F600 \u00fcber 12345 [INST] [/INST]"]

LLAMA3_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
                   "{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
                   "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")
QWEN2_TEMPLATE = ("{% if messages[0]['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
                  "{% endif %}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                  "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
MISTRAL_TEMPLATE = ("{{ bos_token }}{% for m in messages %}"
                    "{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]"
                    "{% elif m['role'] == 'system' %}{{ m['content'] }}\n\n"
                    "{% else %}{{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}")
GEMMA_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<start_of_turn>"
                  "{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n{{ m['content'] | trim }}<end_of_turn>\n"
                  "{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")

QWEN3_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
                  "{% if m['role'] == 'assistant' and loop.last %}<think>\n\n</think>\n\n{% endif %}"
                  "{{ m['content'] }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
                  "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}"
                  "{% endif %}")

FAMILIES = ("llama3", "qwen2", "mistral", "gemma")


def _byte_level(specials, vocab_size):
    """Byte-level BPE with Llama-3's pre-tokenizer split (Qwen2's differs only in splitting digits one by one)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS * 4, trainer)
    return tok


def _sentencepiece(specials, vocab_size, prepend: bool):
    """BPE over words that start with "\u2581" (a space; with `prepend`, also the start of a text), a newline
    always a piece of its own, and byte fallback (<0x00>..<0xFF> in the vocabulary). With `prepend` (Llama 2,
    Mistral) the vocabulary has no newline (it is <0x0A>), as theirs has none; without (Gemma) it has one."""
    scheme = "first" if prepend else "never"
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split("\n", behavior="isolated"),
        pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme=scheme, split=True)])
    bytes_ = [f"<0x{b:02X}>" for b in range(256)]
    corpus = [text.replace("(A)", "(a)").replace("(B)", "(b)") for text in CORPUS]   # no "(A" token, as in Llama 2
    if prepend:
        corpus = [text.replace("\n", " ") for text in corpus]
    alphabet = sorted({c for text in corpus for c in text.replace(" ", "\u2581") if ord(c) < 0x3000} | {"\u2581"})
    tok.train_from_iterator(corpus * 4, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials + bytes_,
                                                            initial_alphabet=alphabet, limit_alphabet=len(alphabet)))
    spec = json.loads(tok.to_str())
    spec["added_tokens"] = [t for t in spec["added_tokens"] if t["content"] not in bytes_]   # plain vocabulary
    spec["model"]["byte_fallback"] = True
    tok = Tokenizer.from_str(json.dumps(spec))
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
                                    + ([decoders.Strip(" ", 1, 0)] if prepend else []))
    return tok


@functools.lru_cache(maxsize=None)
def family_tokenizer(name: str) -> PreTrainedTokenizerFast:
    """The tokenizer of family `name` (one of FAMILIES, or "qwen3"), its chat template set."""
    if name == "llama3":
        specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
        tok = _byte_level(specials, 700)
        tok.post_processor = processors.TemplateProcessing(single="<|begin_of_text|> $A",
                                                           special_tokens=[("<|begin_of_text|>", 0)])
        out = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=specials[0], eos_token=specials[1],
                                      additional_special_tokens=specials[2:])
        out.chat_template = LLAMA3_TEMPLATE
    elif name in ("qwen2", "qwen3"):
        specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
        out = PreTrainedTokenizerFast(tokenizer_object=_byte_level(specials, 700), eos_token="<|im_end|>",
                                      pad_token="<|endoftext|>", additional_special_tokens=specials[1:])
        out.chat_template = QWEN2_TEMPLATE
        if name == "qwen3":
            out.add_tokens(["<think>", "</think>"])
            out.chat_template = QWEN3_TEMPLATE
    elif name == "mistral":
        tok = _sentencepiece(["<unk>", "<s>", "</s>"], 700, prepend=True)
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
        out = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                      pad_token="</s>")
        out.chat_template = MISTRAL_TEMPLATE
    elif name == "gemma":
        specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]
        tok = _sentencepiece(specials, 700, prepend=False)
        tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)])
        out = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", unk_token="<unk>",
                                      pad_token="<pad>", additional_special_tokens=specials[4:])
        out.chat_template = GEMMA_TEMPLATE
    else:
        raise ValueError(f"unknown family {name!r}, expected one of {FAMILIES} or 'qwen3'")
    return out
