"""Tiny random-weight causal LMs for the runtime tests, and a driver that grows and prunes a random tree
on a TreeRunner while checking every new span against the Hugging Face model run on its full sequence."""
import random
import warnings

import torch
from transformers import (BloomConfig, BloomForCausalLM, CohereConfig, CohereForCausalLM, DeepseekV3Config,
                          DeepseekV3ForCausalLM, GPT2Config, GPT2LMHeadModel, Gemma2Config, Gemma2ForCausalLM,
                          Gemma3Config, Gemma3ForCausalLM, Gemma3ForConditionalGeneration, Gemma3TextConfig,
                          Gemma4ForCausalLM, Gemma4TextConfig, GemmaConfig, GemmaForCausalLM, GptOssConfig,
                          GptOssForCausalLM, GraniteConfig, GraniteForCausalLM, JambaConfig, JambaForCausalLM,
                          Llama4ForCausalLM, Llama4TextConfig,
                          LlamaConfig, LlamaForCausalLM, Mamba2Config, Mamba2ForCausalLM, MambaConfig,
                          MambaForCausalLM, MistralConfig,
                          MistralForCausalLM, MixtralConfig, MixtralForCausalLM, MllamaForCausalLM, MllamaTextConfig,
                          ModernBertDecoderConfig, ModernBertDecoderForCausalLM, MptConfig, MptForCausalLM, OPTConfig,
                          OPTForCausalLM, Olmo2Config, Olmo2ForCausalLM, Olmo3Config, Olmo3ForCausalLM, Phi3Config,
                          Phi3ForCausalLM, Qwen2Config, Qwen2ForCausalLM, Qwen2MoeConfig, Qwen2MoeForCausalLM,
                          Qwen3Config, Qwen3ForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM, Qwen3NextConfig,
                          Qwen3NextForCausalLM, Qwen3_5ForCausalLM, Qwen3_5TextConfig, ReformerConfig,
                          ReformerModelWithLMHead, SmolLM3Config, SmolLM3ForCausalLM)
from fastalign import TreeRunner
from fastalign.runtime.layer_layouts import LAYOUTS

VOCAB = 101
MAX_POSITIONS = 128
_COMMON = dict(vocab_size=VOCAB, max_position_embeddings=MAX_POSITIONS, attn_implementation="eager")
_LLAMA_SHAPE = dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4)
_IDS_IN_VOCAB = dict(bos_token_id=0, eos_token_id=0, pad_token_id=0)  # OLMo's defaults lie past this vocabulary

# name -> (model class, config): Llama-family shapes that exercise GQA, tied and untied heads, RoPE scaling, a head_dim
# that is not hidden_size / num_heads, sliding windows shorter than the tree's sequences (Mistral's on every layer, the
# Gemmas' and OLMo 3's on their local layers, Gemma 3's and OLMo 3's with their own RoPE base), Qwen2's q/k/v biases,
# the per-head q/k norms of Qwen3 and Gemma 3, OLMo's over whole projections, the sandwich norms and soft-capped logits
# of Gemma 2 and 3, OLMo's post-norms, Gemma 2's soft-capped attention scores, Gemma's scaled embeddings, sparse
# mixtures of experts (Mixtral's in every layer, Qwen2-MoE's with a gated shared expert, Qwen3-MoE's after a dense
# first layer). Then families that run on PagedHF (their own layers, attention routed to the pool): Phi-3's fused
# projections, partial rotary and sliding window, Granite's multipliers and scaled logits, SmolLM3's layers without
# RoPE, Cohere's parallel blocks with LayerNorms, interleaved rotary and scaled logits, Gemma 3's image-text model (its
# language model on text alone), Gemma 4's full layers wider and with fewer K/V heads than its sliding ones and its
# last layers reusing earlier layers' K/V, gpt-oss's attention sinks on sliding and full layers, DeepSeek-V3's latent
# attention (V narrower than K) with its routed and shared experts, ModernBERT's decoder (a prediction head and a
# vocabulary projection named `decoder` after its layers) and Mllama's text model (get_decoder() of each names no
# decoder), GPT-2's and OPT's learned positions. Then models
# for the fallback, whose ALiBi biases are their own (their attention bypasses transformers' interface, or passes it a
# bias), and Llama 4's chunked layers (masked by their layer type alone; its temperature tuning, which keeps its rows
# from padding, off). Then models whose cache holds recurrent state, each span's kept: the linear-attention hybrids
# Qwen3-Next and Qwen3.5, Mamba 2 (no attention layer), and
# Mamba and Jamba, whose mixers continue a state by one token only (a forward from a state steps token by token).
# Last, one that runs by recomputing whole sequences: Reformer (it pads its input to a multiple of its chunk length,
# and trims the logits back, not the hidden states).
CONFIGS = {
    "llama-gqa-untied": (LlamaForCausalLM, lambda: LlamaConfig(
        **_COMMON, **_LLAMA_SHAPE, num_key_value_heads=2, tie_word_embeddings=False)),
    "llama-rope-scaled-tied": (LlamaForCausalLM, lambda: LlamaConfig(
        **_COMMON, **_LLAMA_SHAPE, num_key_value_heads=4, tie_word_embeddings=True,
        rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 500.0})),
    "mistral-mqa-head-dim": (MistralForCausalLM, lambda: MistralConfig(
        **_COMMON, **_LLAMA_SHAPE, num_key_value_heads=1, head_dim=16, sliding_window=22,
        tie_word_embeddings=False)),
    "qwen2-tied": (Qwen2ForCausalLM, lambda: Qwen2Config(
        **_COMMON, **_LLAMA_SHAPE, num_key_value_heads=2, tie_word_embeddings=True)),
    "qwen2-untied": (Qwen2ForCausalLM, lambda: Qwen2Config(
        **_COMMON, **_LLAMA_SHAPE, num_key_value_heads=2, tie_word_embeddings=False)),
    "qwen3-head-dim-untied": (Qwen3ForCausalLM, lambda: Qwen3Config(
        **_COMMON, **_LLAMA_SHAPE, num_key_value_heads=2, head_dim=16, tie_word_embeddings=False)),
    "gemma-geglu": (GemmaForCausalLM, lambda: GemmaConfig(
        **_COMMON, **_LLAMA_SHAPE, num_key_value_heads=2, head_dim=16)),
    "gemma2-sliding-softcaps": (Gemma2ForCausalLM, lambda: Gemma2Config(
        **_COMMON, **_LLAMA_SHAPE, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=64, sliding_window=10,
        layer_types=["sliding_attention", "full_attention"], attn_logit_softcapping=1.5, final_logit_softcapping=3.0)),
    "gemma3-sliding-softcap": (Gemma3ForCausalLM, lambda: Gemma3TextConfig(
        **_COMMON, **_LLAMA_SHAPE, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=64, sliding_window=10,
        layer_types=["sliding_attention", "full_attention"], final_logit_softcapping=3.0)),
    "olmo2-post-norms": (Olmo2ForCausalLM, lambda: Olmo2Config(
        **_COMMON, **_LLAMA_SHAPE, **_IDS_IN_VOCAB, num_key_value_heads=2, tie_word_embeddings=False)),
    "olmo3-sliding-tied": (Olmo3ForCausalLM, lambda: Olmo3Config(
        **_COMMON, **_LLAMA_SHAPE, **_IDS_IN_VOCAB, num_key_value_heads=2, sliding_window=12,
        layer_types=["sliding_attention", "full_attention"], tie_word_embeddings=True,
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                         "full_attention": {"rope_type": "default", "rope_theta": 500000.0}})),
    "mixtral-moe": (MixtralForCausalLM, lambda: MixtralConfig(
        **_COMMON, **_LLAMA_SHAPE, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
        tie_word_embeddings=False)),
    "qwen2-moe-shared-expert": (Qwen2MoeForCausalLM, lambda: Qwen2MoeConfig(
        **_COMMON, **_LLAMA_SHAPE, num_key_value_heads=2, num_experts=4, num_experts_per_tok=2,
        moe_intermediate_size=32, shared_expert_intermediate_size=64, tie_word_embeddings=False)),
    "qwen3-moe-tied": (Qwen3MoeForCausalLM, lambda: Qwen3MoeConfig(
        **_COMMON, **_LLAMA_SHAPE, num_key_value_heads=2, num_experts=4, num_experts_per_tok=2,
        moe_intermediate_size=32, mlp_only_layers=[0], tie_word_embeddings=True)),
    "phi3-partial-rotary-sliding": (Phi3ForCausalLM, lambda: Phi3Config(
        **_COMMON, **_LLAMA_SHAPE, **_IDS_IN_VOCAB, num_key_value_heads=2, partial_rotary_factor=0.5, sliding_window=10,
        tie_word_embeddings=False)),
    "granite-multipliers": (GraniteForCausalLM, lambda: GraniteConfig(
        **_COMMON, **_LLAMA_SHAPE, **_IDS_IN_VOCAB, num_key_value_heads=2, embedding_multiplier=3.0,
        residual_multiplier=0.5, attention_multiplier=0.2, logits_scaling=4.0, tie_word_embeddings=True)),
    "smollm3-nope-layers": (SmolLM3ForCausalLM, lambda: SmolLM3Config(
        **_COMMON, **_LLAMA_SHAPE, **_IDS_IN_VOCAB, num_key_value_heads=2, no_rope_layers=[1, 0])),
    "cohere-parallel-blocks": (CohereForCausalLM, lambda: CohereConfig(
        **_COMMON, **_LLAMA_SHAPE, **_IDS_IN_VOCAB, num_key_value_heads=2, logit_scale=0.5, use_qk_norm=True)),
    "gemma3-image-text": (Gemma3ForConditionalGeneration, lambda: Gemma3Config(
        text_config=dict(vocab_size=VOCAB, max_position_embeddings=MAX_POSITIONS, **_LLAMA_SHAPE, num_key_value_heads=2,
                         head_dim=16, query_pre_attn_scalar=64, sliding_window=10,
                         layer_types=["sliding_attention", "full_attention"], final_logit_softcapping=3.0),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                           image_size=28, patch_size=14),
        mm_tokens_per_image=4, image_token_index=VOCAB - 1, boi_token_index=VOCAB - 3, eoi_token_index=VOCAB - 2,
        attn_implementation="eager")),
    "gemma4-wide-full-layers-shared-kv": (Gemma4ForCausalLM, lambda: Gemma4TextConfig(
        **_COMMON, **dict(_LLAMA_SHAPE, num_hidden_layers=4), **_IDS_IN_VOCAB, num_key_value_heads=2, head_dim=16,
        global_head_dim=32, num_global_key_value_heads=1, attention_k_eq_v=True, num_kv_shared_layers=2,
        sliding_window=10, layer_types=["sliding_attention", "full_attention"] * 2, vocab_size_per_layer_input=VOCAB,
        hidden_size_per_layer_input=8, final_logit_softcapping=3.0)),
    "gpt-oss-sinks-sliding": (GptOssForCausalLM, lambda: GptOssConfig(
        **_COMMON, **_LLAMA_SHAPE, **_IDS_IN_VOCAB, num_key_value_heads=2, head_dim=16, num_local_experts=4,
        num_experts_per_tok=2, sliding_window=10, layer_types=["sliding_attention", "full_attention"],
        rope_parameters={"rope_type": "yarn", "factor": 32.0, "original_max_position_embeddings": MAX_POSITIONS // 32,
                         "rope_theta": 150000.0, "beta_fast": 32.0, "beta_slow": 1.0})),
    "deepseek-v3-latent-attention": (DeepseekV3ForCausalLM, lambda: DeepseekV3Config(
        **_COMMON, **_LLAMA_SHAPE, **_IDS_IN_VOCAB, num_key_value_heads=4, kv_lora_rank=16, q_lora_rank=24,
        qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=12, n_routed_experts=4, n_shared_experts=1,
        num_experts_per_tok=2, moe_intermediate_size=32, n_group=1, topk_group=1, first_k_dense_replace=1)),
    "modernbert-decoder-prediction-head": (ModernBertDecoderForCausalLM, lambda: ModernBertDecoderConfig(
        **_COMMON, **_LLAMA_SHAPE, **_IDS_IN_VOCAB, cls_token_id=0, sep_token_id=0, local_attention=16,
        global_attn_every_n_layers=2)),
    "mllama-text": (MllamaForCausalLM, lambda: MllamaTextConfig(
        **_COMMON, **_LLAMA_SHAPE, **_IDS_IN_VOCAB, num_key_value_heads=2, cross_attention_layers=[])),
    "gpt2-learned-positions": (GPT2LMHeadModel, lambda: GPT2Config(
        vocab_size=VOCAB, n_positions=MAX_POSITIONS, n_embd=32, n_layer=2, n_head=4, bos_token_id=0, eos_token_id=0,
        attn_implementation="eager")),
    "opt-learned-positions": (OPTForCausalLM, lambda: OPTConfig(
        **_COMMON, hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
        word_embed_proj_dim=32)),
    "bloom-alibi-fallback": (BloomForCausalLM, lambda: BloomConfig(
        vocab_size=VOCAB, hidden_size=32, n_layer=2, n_head=4, bos_token_id=0, eos_token_id=0, pad_token_id=0,
        attn_implementation="eager")),
    "llama4-chunked-fallback": (Llama4ForCausalLM, lambda: Llama4TextConfig(
        **_COMMON, **_LLAMA_SHAPE, **_IDS_IN_VOCAB, num_key_value_heads=2, intermediate_size_mlp=96,
        num_local_experts=4, num_experts_per_tok=2, moe_layers=[1], attention_chunk_size=8,
        layer_types=["chunked_attention", "full_attention"], no_rope_layers=[1, 0], attn_temperature_tuning=False)),
    "mpt-alibi-fallback": (MptForCausalLM, lambda: MptConfig(
        vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=4, max_seq_len=MAX_POSITIONS, attn_implementation="eager")),
    "qwen3-next-linear-attention-states": (Qwen3NextForCausalLM, lambda: Qwen3NextConfig(
        **_COMMON, **_LLAMA_SHAPE, num_key_value_heads=2, head_dim=12,
        layer_types=["linear_attention", "full_attention"], linear_num_value_heads=2, linear_num_key_heads=2,
        linear_key_head_dim=8, linear_value_head_dim=8, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
        shared_expert_intermediate_size=16)),
    "qwen3.5-linear-attention-states": (Qwen3_5ForCausalLM, lambda: Qwen3_5TextConfig(
        **_COMMON, **_LLAMA_SHAPE, num_key_value_heads=2, head_dim=16,
        layer_types=["linear_attention", "full_attention"], linear_num_key_heads=2, linear_num_value_heads=2,
        linear_key_head_dim=8, linear_value_head_dim=8)),
    "mamba2-states": (Mamba2ForCausalLM, lambda: Mamba2Config(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, state_size=4, num_heads=4, head_dim=16, n_groups=1,
        bos_token_id=0, eos_token_id=0, pad_token_id=0)),
    "mamba-stepped-states": (MambaForCausalLM, lambda: MambaConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, state_size=4, bos_token_id=0, eos_token_id=0,
        pad_token_id=0)),
    "jamba-stepped-states": (JambaForCausalLM, lambda: JambaConfig(
        **_COMMON, **_LLAMA_SHAPE, **_IDS_IN_VOCAB, num_key_value_heads=2, num_experts=2, num_experts_per_tok=1,
        attn_layer_period=2, attn_layer_offset=1, expert_layer_period=2, expert_layer_offset=1, mamba_d_state=4,
        mamba_dt_rank=4)),
    "reformer-padded-recompute": (ReformerModelWithLMHead, lambda: ReformerConfig(
        vocab_size=VOCAB, hidden_size=32, num_attention_heads=2, attention_head_size=16, feed_forward_size=64,
        attn_layers=["local", "local"], local_attn_chunk_length=8, local_num_chunks_after=0, is_decoder=True,
        axial_pos_shape=[8, 16], axial_pos_embds_dim=[16, 16], max_position_embeddings=MAX_POSITIONS, eos_token_id=0,
        pad_token_id=0, attn_implementation="eager")),
}


def runner_kind(name):
    """The model runner a TreeRunner picks for CONFIGS[name]: "PagedLlama" for a family layer_layouts names,
    "HFCacheModel" for the fallback models, "HFStateCacheModel" for those whose cache holds recurrent state too,
    "HFRecomputeModel" for those that cannot continue from a cache rebuilt from it, "PagedHF" for the rest."""
    if name.endswith("fallback"):
        return "HFCacheModel"
    if name.endswith("recompute"):
        return "HFRecomputeModel"
    if name.endswith("states"):
        return "HFStateCacheModel"
    return "PagedLlama" if CONFIGS[name][1]().model_type in LAYOUTS else "PagedHF"


class CountedForward(torch.nn.Module):
    """`model` whose calls are recorded in `calls` as (batch rows, tokens per row, logits positions kept)."""

    def __init__(self, model, calls):
        super().__init__()
        self.model, self.calls = model, calls

    def forward(self, input_ids, **kwargs):
        out = self.model(input_ids=input_ids, **kwargs)
        self.calls.append((*input_ids.shape, out.logits.shape[1]))
        return out

    def get_base_model(self):
        """The model counted: as PEFT's wrappers, whose forward names no cache argument either, it says under which
        name the cache goes (transformers 5.25 warns that `past_key_values` goes away in 5.40)."""
        return self.model


def counted_runner(name, kind, **kwargs):
    """(model, TreeRunner of the tiny model `name` on the Hugging Face fallback `kind` (its class name), the model's
    forward calls: (batch rows, tokens per row, logits positions kept)). The fallback's warning of how it runs is
    silenced (test_tree_runner_errors.py checks it)."""
    model = tiny_model(name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        runner = TreeRunner(model, block_size=4, attention_backend="torch", **({"max_tokens": 64} | kwargs))
    assert type(runner.model_runner).__name__ == kind
    calls = []
    runner.model_runner.model = CountedForward(model, calls)
    return model, runner, calls


def fill_with_nan(pool):
    """Every slot of `pool` NaN (-1 in a pool of token ids, which no embedding takes): a slot read before it is
    written poisons the logits, or fails."""
    for tensor in pool.tensors:
        tensor.fill_(float("nan") if tensor.is_floating_point() else -1)


class WrappedEmbedding(torch.nn.Module):
    """The user's own module around a model's input embeddings: it has no `weight`, so the model's input vocabulary
    is not known (input_vocabulary: None)."""

    def __init__(self, embedding):
        super().__init__()
        self.inner = embedding

    def forward(self, ids):
        return self.inner(ids)


def tiny_model(name, dtype=torch.float32, device="cpu", seed=0):
    """A model of CONFIGS[name] with weights drawn so that logits are O(1) (drawn_weights)."""
    cls, make_config = CONFIGS[name]
    torch.manual_seed(seed)
    return drawn_weights(cls(make_config())).to(device=device, dtype=dtype)


def drawn_weights(model):
    """`model` in eval mode, its weights drawn so that logits are O(1) (the default initialisation gives logits near
    0, where any error looks small)."""
    model.eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() >= 2:
                param.normal_(0.0, param.shape[-1] ** -0.5)
            elif name.endswith("bias"):
                param.normal_(0.0, 0.2)
            else:  # norm weights
                param.uniform_(0.5, 1.5)
    return model


@torch.no_grad()
def reference(model, span):
    """Hugging Face's logits (float32) and final hidden states at the new tokens of `span`, from the model
    run on the span's whole sequence without a cache."""
    out = model(torch.tensor([span.tokens], device=model.device), output_hidden_states=True)
    end = len(span.tokens)   # Reformer's hidden states go on past it, over the padding it adds
    start = end - len(span.new_tokens)
    return out.logits[0, start:end].float(), out.hidden_states[-1][0, start:end]


def assert_matches(model, spans, logits):
    """Each of `logits` (a runner's "all" or "last" outputs of `spans`) is Hugging Face's at the span's last tokens."""
    for span, row_logits in zip(spans, logits):
        torch.testing.assert_close(row_logits, reference(model, span)[0][-len(row_logits):], rtol=1e-4, atol=1e-4)


def grow_random_tree(runner, seed, check, steps=20, max_len=60):
    """Grows and prunes a random tree on `runner`: batches of 1-4 rows extending random live spans (parents
    repeat; sometimes a new root) by 1-7 tokens, random releases. Calls check(span, logits, hidden) with the
    outputs at the new tokens of every new span, then extends every live span (evicted ones included) by
    one token, four rows per batch, and checks those too. Returns how many live spans were found evicted."""
    rng = random.Random(seed)
    live, evicted_seen = [], 0

    def tokens(n):
        return [rng.randrange(VOCAB) for _ in range(n)]

    def extend(parents, lists):
        children, logits, hidden = runner.extend(parents, lists, logits="all", hidden="all")
        for span, lg, hd, new in zip(children, logits, hidden, lists):
            assert span.new_tokens == list(new) and len(span) == len(span.tokens)
            check(span, lg, hd)
        return children

    live += extend([None, None], [tokens(rng.randint(1, 20)), tokens(rng.randint(1, 20))])
    for _ in range(steps):
        if rng.random() < 0.25 and len(live) > 3:
            gone = rng.sample(live, rng.randint(1, 2))
            runner.release(gone)
            live = [s for s in live if s not in gone]
            continue
        candidates = [s for s in live if len(s) < max_len - 7] or [None]
        parents = [None if rng.random() < 0.08 else rng.choice(candidates) for _ in range(rng.randint(1, 4))]
        live += extend(parents, [tokens(rng.randint(1, 7)) for _ in parents])
        evicted_seen += sum(not s.resident for s in live)
    evicted_seen += sum(not s.resident for s in live)
    for i in range(0, len(live), 4):
        extend(live[i:i + 4], [tokens(1) for _ in live[i:i + 4]])
    return evicted_seen
