"""How each model family that runs on the paged pool arranges a decoder layer: which norms sit where around
attention and the MLP, how q and k are normalised, how its RMSNorms apply their weight, whether RoPE differs by layer
type, and whether its attention soft-caps its scores. `PagedLlama` reads these instead of branching on model types.

A layer computes, with norm(None, x) = x:
    n = norm(input_norm, h)
    q, k = q_proj(n), k_proj(n)        q, k = q_norm(q), k_norm(k) here when qk_norm == "projection" (OLMo 2 and 3)
    q, k, v per head                   q, k = q_norm(q), k_norm(k) here when qk_norm == "head" (Qwen3, Gemma 3)
    h = h + norm(attention_out_norm, o_proj(attention(rope(q), rope(k), v)))
    h = h + norm(mlp_out_norm, mlp(norm(mlp_in_norm, h)))
"""
from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class LayerLayout:
    """The decoder layer of one family (names of the layer's norm modules; None: no norm there)."""

    input_norm: Optional[str] = "input_layernorm"
    mlp_in_norm: Optional[str] = "post_attention_layernorm"
    attention_out_norm: Optional[str] = None
    mlp_out_norm: Optional[str] = None
    qk_norm: Optional[str] = None            # None, "head" (RMSNorm over head_dim) or "projection" (over all heads)
    rope_by_layer_type: bool = False         # the rotary embedding takes the layer's type (its own base)
    windows: Optional[str] = None            # where config.sliding_window applies: None (nowhere), "every layer",
    #                                          "by layer type" (its config.layer_types entry is sliding_attention)
    score_softcap: bool = False              # attention scores capped at self_attn.attn_logit_softcapping
    rms_norm: str = "rounded"                # how its RMSNorms apply their weight (fastalign.ops.rms_norm.WEIGHT_RULES)

    def norms(self):
        """The RMSNorm submodules of a layer that the paged forward calls."""
        layer_norms = (self.input_norm, self.mlp_in_norm, self.attention_out_norm, self.mlp_out_norm)
        qk_norms = ("self_attn.q_norm", "self_attn.k_norm") if self.qk_norm else ()
        return qk_norms + tuple(name for name in layer_norms if name)

    def modules(self):
        """The submodules of a layer that the paged forward calls."""
        attention = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
        # the MLP is called as one module: SwiGLU, GeGLU, or a sparse mixture of experts with its router
        return attention + ("mlp",) + self.norms()


_LLAMA = LayerLayout()
_SLIDING = LayerLayout(windows="every layer")
_TYPED_WINDOWS = LayerLayout(windows="by layer type")
_GEMMA_SANDWICH = dict(mlp_in_norm="pre_feedforward_layernorm", attention_out_norm="post_attention_layernorm",
                       mlp_out_norm="post_feedforward_layernorm", rms_norm="one plus")
_OLMO_POST_NORMS = dict(input_norm=None, mlp_in_norm=None, attention_out_norm="post_attention_layernorm",
                        mlp_out_norm="post_feedforward_layernorm", qk_norm="projection", rms_norm="fp32")

# model_type -> layout (Gemma's, Mistral's, Qwen2's and the MoEs' layers are Llama's, Gemma's norms aside; their
# scaled embeddings and shared expert live in modules called as they are)
LAYOUTS = {
    "llama": _LLAMA, "mistral": _SLIDING, "qwen2": _TYPED_WINDOWS, "gemma": LayerLayout(rms_norm="one plus"),
    "mixtral": _SLIDING,
    "qwen2_moe": _TYPED_WINDOWS,
    "qwen3": LayerLayout(qk_norm="head", windows="by layer type"),
    "qwen3_moe": LayerLayout(qk_norm="head", windows="every layer"),
    # Gemma 3 keeps attn_logit_softcapping unused
    "gemma2": LayerLayout(**_GEMMA_SANDWICH, score_softcap=True, windows="by layer type"),
    "gemma3_text": LayerLayout(**_GEMMA_SANDWICH, qk_norm="head", rope_by_layer_type=True, windows="by layer type"),
    "olmo2": LayerLayout(**_OLMO_POST_NORMS),
    "olmo3": LayerLayout(**_OLMO_POST_NORMS, rope_by_layer_type=True, windows="by layer type"),
}
