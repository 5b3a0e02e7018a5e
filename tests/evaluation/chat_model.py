"""A tiny tokenizer with a Llama-3-like chat template (its own BOS, header and end-of-turn special tokens),
and a tiny Llama rigged to end its answer with that end of turn, for the chat-template tests."""
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from fastalign.evaluation.generation import encode_prompts
from fastalign.evaluation.prompts import chat_prompt
from tests.evaluation.conftest import tiny_llama

BOS, EOS = "<|begin_of_text|>", "<|end_of_text|>"
START, END, EOT = "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"
# Llama-3-Instruct's template, without its date lines
CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}" + START + "{{ m['role'] }}" + END + "\n\n"
                 "{{ m['content'] | trim }}" + EOT + "{% endfor %}"
                 "{% if add_generation_prompt %}" + START + "assistant" + END + "\n\n{% endif %}")
QUESTION, SYSTEM = "Who is Bob?", "Be brief."
# the texts between special tokens that the tests render, and words an answer can hold
SEGMENTS = ("system", "user", "assistant", "\n\n", "\n\nWho is Bob?", "\n\nWhere does Alice live?", "\n\nBe brief.",
            "Hello", "Hi", " yes no the a city sea Bob Alice")


def chat_tokenizer(chat_template: str = CHAT_TEMPLATE) -> PreTrainedTokenizerFast:
    """Word-level over the byte-level pieces of SEGMENTS (a word keeps its leading space), BOS prepended."""
    pre = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    pieces = sorted({piece for text in SEGMENTS for piece, _ in pre.pre_tokenize_str(text)})
    specials = [BOS, EOS, START, END, EOT, "<unk>"]
    core = Tokenizer(models.WordLevel({t: i for i, t in enumerate(specials + pieces)}, unk_token="<unk>"))
    core.pre_tokenizer = pre
    core.decoder = decoders.ByteLevel()
    core.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", special_tokens=[(BOS, 0)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, bos_token=BOS, eos_token=EOS, unk_token="<unk>",
                                        additional_special_tokens=[START, END, EOT])
    tokenizer.chat_template = chat_template
    return tokenizer


def greedy(model, ids, steps):
    """The next `steps` greedy tokens after ids, with no stop rule at all."""
    ids = list(ids)
    with torch.no_grad():
        for _ in range(steps):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[-steps:]


def rigged_chat_model(tokenizer):
    """(model, its two answer tokens): a tiny Llama whose greedy answer to QUESTION (after SYSTEM) is two
    ordinary words, then <|eot_id|>, then another word (the lm_head rows of <|eot_id|> and the third word of a
    random model's answer swapped); its generation config lists only <|end_of_text|>, as the first
    Llama-3-Instruct release did."""
    prompt_ids = encode_prompts(tokenizer, [chat_prompt(tokenizer, QUESTION, SYSTEM)], 8, tiny_llama(tokenizer, 0))[0]
    specials = set(tokenizer.all_special_ids) | {tokenizer.unk_token_id}
    eot = tokenizer.convert_tokens_to_ids(EOT)
    for seed in range(50):
        model = tiny_llama(tokenizer, seed)
        first, second, third = greedy(model, prompt_ids, 3)
        if {first, second, third} & specials or third in (first, second):
            continue
        with torch.no_grad():
            rows = model.lm_head.weight
            rows[[eot, third]] = rows[[third, eot]]
        *_, now_third, fourth = greedy(model, prompt_ids, 4)
        if now_third == eot and fourth not in specials:
            model.generation_config.eos_token_id = tokenizer.eos_token_id
            return model, [first, second]
    raise AssertionError("no seed gives a usable greedy answer")
