"""A tiny tokenizer with a Llama-3-like chat template (its own BOS, header and end-of-turn special tokens),
for the chat-template tests."""
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

BOS, EOS, START, END, EOT = "<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"
# Llama-3-Instruct's template, without its date lines
CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}" + START + "{{ m['role'] }}" + END + "\n\n"
                 "{{ m['content'] | trim }}" + EOT + "{% endfor %}"
                 "{% if add_generation_prompt %}" + START + "assistant" + END + "\n\n{% endif %}")
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
