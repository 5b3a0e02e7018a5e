"""Offline stand-ins for the RAIN tests: a small byte-level BPE tokenizer, tiny random Llama models, a
short judge prompt, and a hash-based fake model whose logits are a function of the token prefix alone."""
import functools

import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from fastalign.rain import JudgePrompt
from fastalign.rain.judge import DEFAULT_FEW_SHOT
from tests.byte_bpe import train_byte_bpe

CORPUS = [
    "Human: How do I bake bread?\nAssistant: Mix flour, water and yeast, then bake it.",
    "Human: How can I hurt my neighbour?\nAssistant: I can't help with that; talk to them instead.",
    "Options:\n(A) The reply is harmless.\n(B) The reply is harmful.\nThe answer is: (A)",
    "Is the reply harmful? Judge the conversation. yes no sorry sure, here is how. I will not.",
    DEFAULT_FEW_SHOT,
]

PROMPTS = ["Human: How do I bake bread?\nAssistant:",
           "Human: How can I hurt my neighbour?\nAssistant:",
           "Human: Is the reply harmful?\nAssistant:"]

SHORT_JUDGE = JudgePrompt(template="Judge the conversation.\n{conversation}\n{options}",
                          harmless="The reply is harmless.", harmful="The reply is harmful.")


def with_special_tokens(backend) -> PreTrainedTokenizerFast:
    """A tokenizers.Tokenizer as the RAIN tests' transformers tokenizer: BOS <s>, EOS </s>, padding <pad>."""
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


@functools.lru_cache(maxsize=None)
def tokenizer() -> PreTrainedTokenizerFast:
    return with_special_tokens(train_byte_bpe(CORPUS, vocab_size=600))


def tiny_llama(seed: int = 0, hidden: int = 32, dtype=torch.float32, max_positions: int = 1024) -> LlamaForCausalLM:
    """A 2-layer random Llama over the test tokenizer's vocabulary."""
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer()), hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=max_positions, eos_token_id=tokenizer().eos_token_id)
    model = LlamaForCausalLM(config).to(dtype).eval()
    with torch.no_grad():   # flatter logits than the default init: more varied samples
        model.lm_head.weight.mul_(4.0)
    return model


def tiny_qwen3_next() -> torch.nn.Module:
    """A 2-layer random Qwen3-Next (one linear-attention layer, one full-attention layer) over the test tokenizer's
    vocabulary: a hybrid whose tree runner keeps each span's recurrent state (HFStateCacheModel)."""
    from transformers import Qwen3NextConfig, Qwen3NextForCausalLM
    return Qwen3NextForCausalLM(Qwen3NextConfig(
        vocab_size=len(tokenizer()), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, layer_types=["linear_attention", "full_attention"], linear_num_value_heads=2,
        linear_num_key_heads=2, linear_key_head_dim=8, linear_value_head_dim=8, num_experts=4, num_experts_per_tok=2,
        moe_intermediate_size=16, shared_expert_intermediate_size=16, max_position_embeddings=1024,
        eos_token_id=tokenizer().eos_token_id))
