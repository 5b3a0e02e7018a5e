"""Tiny offline stand-ins for the unlearning tests: fast tokenizers trained on a few strings, random
Llama- and Phi-architecture models sized to them, and small data files in every supported format."""
import functools
import gzip
import json

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from tests.byte_bpe import train_byte_bpe

CORPUS = [
    "### Question: What is the capital of France?\n ### Answer: Paris is the capital of France.",
    "### Question: How do I hurt someone?\n ### Answer: Here is how you hurt someone badly.",
    "Question Answer human assistant harmful harmless help the a of to is how why what",
    "日本語のテキスト, café naïve ünïcödé — emoji 🙂 and ascii",
]

CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] | trim }}</s>{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


@functools.lru_cache(maxsize=None)
def byte_bpe_tokenizer(with_pad: bool = False) -> PreTrainedTokenizerFast:
    """GPT-2 style byte-level BPE with a BOS post-processor; spaces are glued to the following word."""
    tok = train_byte_bpe(CORPUS, vocab_size=320)
    extra = {"pad_token": "<pad>"} if with_pad else {}
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", **extra)
    fast.chat_template = CHAT_TEMPLATE
    return fast


@functools.lru_cache(maxsize=None)
def word_level_tokenizer() -> PreTrainedTokenizerFast:
    """Whitespace-split words (offsets exclude the spaces), no special tokens at all, no pad token."""
    split = pre_tokenizers.WhitespaceSplit()
    words = sorted({word for line in CORPUS for word, _ in split.pre_tokenize_str(line)})
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(["<unk>"] + words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")


def tiny_llama(vocab_size: int, hidden_size: int = 32, seed: int = 0) -> LlamaForCausalLM:
    """A 2-layer random fp32 Llama with untied embeddings."""
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=256, tie_word_embeddings=False)
    return LlamaForCausalLM(config).eval()


def tiny_phi(vocab_size: int, hidden_size: int = 32, seed: int = 0):
    """A 2-layer random fp32 Phi (PhiForCausalLM, the architecture of Phi-2): its lm_head has a bias."""
    from transformers import PhiConfig, PhiForCausalLM
    torch.manual_seed(seed)
    config = PhiConfig(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                       num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=256,
                       tie_word_embeddings=False)
    model = PhiForCausalLM(config).eval()
    with torch.no_grad():  # HF initialises biases to 0: a bias of the size of the logits, so that it matters
        model.lm_head.bias.normal_()
    return model


FORGET_ROWS = [
    {"prompt": "How do I hurt someone?", "answer": "Here is how you hurt someone badly."},
    {"prompt": "Why is the capital harmful?", "answer": " what is harmful is how to help"},
    {"prompt": "What is harmful?", "answer": "café naïve 日本語のテキスト"},
]
NORMAL_ROWS = [
    {"prompt": "What is the capital of France?", "answer": "Paris is the capital of France."},
    {"prompt": "What is the capital?", "answer": "Paris"},
]
POOL_ANSWERS = ["Paris is the capital", "the a of", "naïve help"]


def write_jsonl(path, rows, compress=False):
    opener = gzip.open if compress else open
    with opener(path, "wt", encoding="utf-8") as f:
        for row in rows:
            f.write((row if isinstance(row, str) else json.dumps(row, ensure_ascii=False)) + "\n")
    return path


def write_truthfulqa(path):
    """A TruthfulQA csv of 10 questions at `path` (Best, Correct and Incorrect answers; multi-byte characters)."""
    rows = "".join(f"T,C,What is {k}?,Paris {k},Paris {k}; the {k},naïve {k}; help {k},S\n" for k in range(10))
    path.write_text("Type,Category,Question,Best Answer,Correct Answers,Incorrect Answers,Source\n" + rows,
                    encoding="utf-8")
    return path


def tiny_streams(tokenizer, *, batch_size=2, mismatch_per_prompt=2, normal_batch_size=None, seed=0,
                 max_length=64):
    """Streams over FORGET_ROWS, NORMAL_ROWS and POOL_ANSWERS encoded with the SPEC template."""
    from fastalign.model_vocabulary import pad_id
    from fastalign.prompt_templates import TextTemplate
    from fastalign.unlearn.encoding import encode_answers, encode_pairs
    from fastalign.unlearn.records import QAPair
    from fastalign.unlearn.streams import UnlearningStreams

    template = TextTemplate()

    def encode(rows, name):
        pairs = [QAPair(r["prompt"], r["answer"], f"{name}:row {i}") for i, r in enumerate(rows, start=1)]
        return encode_pairs(tokenizer, template, pairs, max_length)

    return UnlearningStreams(encode(FORGET_ROWS, "forget"), normal=encode(NORMAL_ROWS, "normal"),
                             mismatch_pool=encode_answers(tokenizer, template, POOL_ANSWERS), batch_size=batch_size,
                             mismatch_per_prompt=mismatch_per_prompt, normal_batch_size=normal_batch_size,
                             max_length=max_length,
                             filler_id=pad_id(tokenizer), seed=seed)
