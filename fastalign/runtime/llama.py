"""Runs a loaded Hugging Face Llama-family model on the paged KV pool: Llama, Mistral, Qwen2, Qwen3, Gemma, Gemma 2
and Gemma 3 (text), and the mixtures of experts Mixtral, Qwen2-MoE and Qwen3-MoE.

The model's own modules do everything but attention: embeddings (Gemma's scaled ones), RMSNorms, q/k/v/o
projections (with Qwen2's biases), the per-head RMSNorms of q and k of Qwen3 and Gemma 3, the MLP (SwiGLU, GeGLU,
or a sparse mixture of experts), the final norm, the (tied or untied) LM head, and the rotary embedding module,
which gives cos/sin for any positions including Hugging Face's RoPE scaling variants (Gemma 3's per layer type).
Attention is `paged_attention` over the pool, after `write_kv` has stored the new tokens' rotated K and V, so that
rows of a batch read their shared prefix blocks in place; a layer with a sliding window (Mistral's, Qwen2's and
the Gemmas' sliding layers) attends to its window of the pool, without the cascade, and Gemma 2's attention scores
are soft-capped (attn_logit_softcapping) as its eager attention caps them. The index metadata comes from
the span tree's forward plan, so the ops' checks of its contents (a device sync on CUDA, ~0.2 ms per layer on the
CPU) are skipped: the runtime tests hold the plans to the Hugging Face model's outputs instead. Their shape, dtype
and device checks run on the first layer's arguments only.

Per decoder layer, as in Hugging Face's LlamaDecoderLayer:
    h = h + o_proj(attention(rope(q_norm(q_proj(n))), rope(k_norm(k_proj(n))), v_proj(n)))
                                                          with n = input_layernorm(h), q/k_norm where the model has them
    h = h + mlp(post_attention_layernorm(h))
and in Gemma 2's and 3's, whose norms sandwich each block:
    h = h + post_attention_layernorm(o_proj(attention(...)))
    h = h + post_feedforward_layernorm(mlp(pre_feedforward_layernorm(h)))
with their logits soft-capped as their forwards cap them (final_logit_softcapping).
"""
import torch

from fastalign.eval_mode import eval_mode
from fastalign.ops.paged_attention import (check_paged_attention, check_write_kv, paged_attention_unchecked,
                                          resolve_backend, write_kv_unchecked)

LLAMA_FAMILY = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "mixtral", "qwen2_moe",
                "qwen3_moe")
# the model types whose attention normalises each head of q and k (an RMSNorm over head_dim) before RoPE
QK_NORM_FAMILY = ("qwen3", "qwen3_moe", "gemma3_text")
# the model types whose layers sandwich attention and MLP in norms (_SANDWICH_NORMS too) and whose forward soft-caps
# the logits (final_logit_softcapping)
SANDWICH_NORM_FAMILY = ("gemma2", "gemma3_text")
# the model types whose rotary embedding differs by layer type (Gemma 3's local and global bases)
ROPE_BY_LAYER_TYPE_FAMILY = ("gemma3_text",)
# the model types whose attention soft-caps its scores (Gemma 3's config holds attn_logit_softcapping, unused)
SCORE_SOFTCAP_FAMILY = ("gemma2",)
# a layer's MLP is called as one module: SwiGLU, or a sparse mixture of experts with its router (and Qwen2-MoE's
# gated shared expert)
_LAYER_MODULES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp",
                  "input_layernorm", "post_attention_layernorm")
_QK_NORMS = ("self_attn.q_norm", "self_attn.k_norm")
_SANDWICH_NORMS = ("pre_feedforward_layernorm", "post_feedforward_layernorm")


def llama_family_problem(model):
    """Why `model` cannot run on the paged Llama path, or None when it can."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in LLAMA_FAMILY:
        return f"model_type {model_type!r} is not one of {LLAMA_FAMILY}"
    inner = getattr(model, "model", None)
    missing = [name for name in ("embed_tokens", "layers", "norm", "rotary_emb") if not hasattr(inner, name)]
    if not hasattr(model, "lm_head"):
        missing.append("lm_head")
    if not missing:
        names = (_LAYER_MODULES + (_QK_NORMS if model_type in QK_NORM_FAMILY else ())
                 + (_SANDWICH_NORMS if model_type in SANDWICH_NORM_FAMILY else ()))
        missing = [f"layers[{i}].{name}" for i, layer in enumerate(inner.layers) for name in names
                   if not _has_submodule(layer, name)]
    if missing:
        return f"its modules do not follow the Llama layout (missing {', '.join(missing)})"
    if getattr(config, "use_bidirectional_attention", False):
        return "it attends bidirectionally (use_bidirectional_attention), not causally"
    return None


def _has_submodule(module, name):
    try:
        module.get_submodule(name)
    except AttributeError:
        return False
    return True


def layer_windows(model):
    """Each layer's sliding window (None: it attends to the whole sequence), as Hugging Face's forward masks it:
    the attention module's `sliding_window` where it has one (Qwen2, Gemma 3 set it per layer type), else
    config.sliding_window (Mistral slides every layer whatever config.layer_types says); 0 means none."""
    default = getattr(model.config, "sliding_window", None)
    windows = [getattr(layer.self_attn, "sliding_window", default) or None for layer in model.model.layers]
    for index, window in enumerate(windows):
        if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 1):
            raise ValueError(f"model: layer {index}'s sliding window must be a positive int, got {window!r}")
    return windows


def longrope_limit(config, limit):
    """`limit` (None: none) capped at LongRoPE's original_max_position_embeddings. Past that length
    Hugging Face rotates EVERY position of the sequence with the long factors (its generate drops the cache
    there), so KV cached while a sequence was shorter, or next to a longer row of the same forward, would
    no longer match the model run on the full sequence."""
    params = getattr(config, "rope_parameters", None) or {}
    for rope in [params] if "rope_type" in params else params.values():  # or one dict per layer type
        if isinstance(rope, dict) and rope.get("rope_type") == "longrope":
            original = rope["original_max_position_embeddings"]
            limit = original if limit is None else min(limit, original)
    return limit


def rotate_half(x):
    """[x1, x2] -> [-x2, x1] over the last dimension (the pairing of Hugging Face's RoPE layout)."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class PagedLlama:
    """The forward of a Llama-family causal LM over a ForwardBatch, with its KV in a KVPool."""

    def __init__(self, model, attention_backend, device):
        problem = llama_family_problem(model)
        if problem is not None:
            raise ValueError(f"model: cannot run on the paged Llama path: {problem}")
        config = model.config
        self.model = model
        self.layers = model.model.layers
        self.num_layers = len(self.layers)
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = self.layers[0].self_attn.head_dim
        self.qk_norm = config.model_type in QK_NORM_FAMILY
        self.sandwich_norms = config.model_type in SANDWICH_NORM_FAMILY
        self.layer_types = config.layer_types if config.model_type in ROPE_BY_LAYER_TYPE_FAMILY else None
        self.windows = layer_windows(model)
        self.score_softcaps = [getattr(layer.self_attn, "attn_logit_softcapping", None)
                               if config.model_type in SCORE_SOFTCAP_FAMILY else None for layer in self.layers]
        self.logit_softcap = getattr(config, "final_logit_softcapping", None) if self.sandwich_norms else None
        self.max_context = longrope_limit(config, config.max_position_embeddings)
        # device: where the whole model computes (model_device), embeddings offloaded by accelerate included
        self.dtype, self.device = model.model.embed_tokens.weight.dtype, device
        self.backend = resolve_backend(attention_backend, self.device)  # "triton" or "torch"

    def forward(self, batch, pool, select, want_logits, want_hidden, logits_rows=None):
        """Writes the KV of every token of `batch` into `pool`; returns (logits, hidden) of the tokens
        at indices `select` (None: nothing), logits in float32 (only at select[logits_rows] when given:
        [tokens, vocab] float32 logits of a long row would be the largest tensor of the call), hidden after
        the final norm. Dropout is off whatever the model's mode: a LoRA adapter's sits in the layers run here,
        and would make the K/V cached for the tree, and every logit, random."""
        with eval_mode(self.model):
            return self._forward(batch, pool, select, want_logits, want_hidden, logits_rows)

    def _forward(self, batch, pool, select, want_logits, want_hidden, logits_rows):
        inner = self.model.model
        num_tokens = batch.num_tokens
        h = inner.embed_tokens(batch.input_ids)
        rotations = self._rotations(h, batch.positions)
        for index, layer in enumerate(self.layers):
            attn = layer.self_attn
            cos, sin = rotations[self.layer_types[index] if self.layer_types else None]
            x = layer.input_layernorm(h)
            q = attn.q_proj(x).view(num_tokens, self.num_heads, self.head_dim)
            k = attn.k_proj(x).view(num_tokens, self.num_kv_heads, self.head_dim)
            v = attn.v_proj(x).view(num_tokens, self.num_kv_heads, self.head_dim)
            if self.qk_norm:
                q, k = attn.q_norm(q), attn.k_norm(k)
            q = q * cos + rotate_half(q) * sin
            k = k * cos + rotate_half(k) * sin
            o = self._attention(index, q, k, v, pool, batch, attn.scaling)
            o = attn.o_proj(o.reshape(num_tokens, self.num_heads * self.head_dim))
            # [1, T, H]: the sparse MoE blocks read [batch, sequence, hidden]
            if self.sandwich_norms:
                h = h + layer.post_attention_layernorm(o)
                h = h + layer.post_feedforward_layernorm(layer.mlp(layer.pre_feedforward_layernorm(h)[None])[0])
            else:
                h = h + o
                h = h + layer.mlp(layer.post_attention_layernorm(h)[None])[0]
        if select is None:
            return None, None
        hidden = inner.norm(h[select])
        at = hidden if logits_rows is None else hidden[logits_rows]
        head = self.model.lm_head
        weight = getattr(head, "weight", None)
        if isinstance(weight, torch.Tensor) and weight.is_floating_point():  # an lm_head kept in another dtype
            at = at.to(weight.dtype)                                          # (fp32 on a bf16 model) takes its own
        logits = self._soft_capped(head(at)).float() if want_logits else None
        return logits, hidden if want_hidden else None

    def _rotations(self, h, positions):
        """(cos, sin) [T, 1, head_dim] (broadcast over heads) of the tokens' positions: one pair (key None), or one
        per layer type for Gemma 3, whose local and global layers rotate with different bases."""
        rotary = self.model.model.rotary_emb
        types = sorted(set(self.layer_types)) if self.layer_types else [None]
        pairs = {t: rotary(h, positions[None]) if t is None else rotary(h, positions[None], t) for t in types}
        return {t: (cos[0, :, None, :], sin[0, :, None, :]) for t, (cos, sin) in pairs.items()}

    def _soft_capped(self, logits):
        """c tanh(logits / c) with Gemma 2's or 3's final_logit_softcapping c, in the head's dtype as their forwards
        cap them; the logits themselves for every other model."""
        c = self.logit_softcap
        return logits if c is None else torch.tanh(logits / c) * c

    def _attention(self, index, q, k, v, pool, batch, scale):
        """Layer `index`'s K/V written into the pool, then its attention. Only the first layer's arguments go
        through the ops' shape, dtype and device checks (~20 us of host time per layer): every later layer's
        are shaped as the first's (one config, views of one pool)."""
        k_cache, v_cache = pool.k(index), pool.v(index)
        window, softcap = self.windows[index], self.score_softcaps[index]
        shared_prefix = batch.shared_prefix if window is None else None  # the cascade reads whole prefixes
        if index == 0:
            check_write_kv(k, v, k_cache, v_cache, batch.slot_mapping, validate=False)
            check_paged_attention(q, k_cache, v_cache, batch.block_table, batch.seq_lens, batch.cu_q_lens, scale=scale,
                                  backend=self.backend, validate=False, shared_prefix=shared_prefix, window=window,
                                  softcap=softcap)
        write_kv_unchecked(k, v, k_cache, v_cache, batch.slot_mapping)
        if len(batch.host_extra_src):
            write_kv_unchecked(k[batch.extra_src], v[batch.extra_src], k_cache, v_cache, batch.extra_dst)
        return paged_attention_unchecked(q, k_cache, v_cache, batch.block_table, batch.seq_lens, batch.cu_q_lens,
                                         scale=float(scale), backend=self.backend, shared_prefix=shared_prefix,
                                         window=window, softcap=softcap)
