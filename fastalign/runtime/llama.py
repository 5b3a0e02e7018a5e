"""Runs a loaded Hugging Face Llama-family model on the paged KV pool: Llama, Mistral, Qwen2, Qwen3, Gemma, Gemma 2,
Gemma 3 (text), OLMo 2 and OLMo 3, and the mixtures of experts Mixtral, Qwen2-MoE and Qwen3-MoE.

The model's own modules do everything but attention: embeddings (Gemma's scaled ones), RMSNorms wherever its layers
put them (layer_layouts), q/k/v/o projections (with Qwen2's biases), the q and k norms of Qwen3, Gemma 3 and OLMo,
the MLP (SwiGLU, GeGLU, or a sparse mixture of experts), the final norm, the (tied or untied) LM head, and the rotary
embedding module, which gives cos/sin for any positions including Hugging Face's RoPE scaling variants (per layer
type for Gemma 3 and OLMo 3). Attention is `paged_attention` over the pool, after `write_kv` has stored the new
tokens' rotated K and V, so that rows of a batch read their shared prefix blocks in place; a layer with a sliding
window (Mistral's, Qwen2's, the Gemmas' and OLMo 3's sliding layers) attends to its window of the pool (through the
cascade too, each query reading the shared keys in its window), and Gemma 2's attention scores are soft-capped as its
eager attention caps them, as are the Gemmas' logits (final_logit_softcapping). The index metadata comes from the span
tree's forward plan, so the ops' checks of its contents (a device sync on CUDA, ~0.2 ms per layer on the CPU) are
skipped (pool_attention). On the Triton backend, fused kernels that round as the modules do stand in for the RMSNorms
(each with the residual add before it), the rotation of q and k (with Qwen3's, Gemma 3's and OLMo's q/k norms before it,
and the store of K and V after it), and a dense MLP's activation and product (rms_norms, rotary, gated_mlps): a
forward bound by launches makes fewer.

Each call reads what Hugging Face's forward reads at each call: the decoder's layers and norm and every module in them
(a module replaced since the runner was made runs, its stand-in made again; on the Triton backend a dense MLP's
activation, act_fn, is read when its MLP's stand-in is made), the config's final_logit_softcapping,
sliding_window and layer_types, and each attention's attn_logit_softcapping and scaling; the shapes (layers, heads,
head_dim: the pool's; a model with another number of layers is refused), the dtype and the context limit are read when
the runner is made.
"""
import functools
import operator

import numpy as np
import torch

from fastalign.eval_mode import eval_mode
from fastalign.model_context import runner_context
from fastalign.ops.checks import is_integer
from fastalign.runtime.gated_mlps import fused_gated_mlp
from fastalign.runtime.layer_layouts import LAYOUTS
from fastalign.runtime.module_hooks import runs_a_users_hooks, runs_more_than_its_forward
from fastalign.runtime.pool_attention import pool_attention
from fastalign.runtime.rms_norms import add_then_norm, fused_rms_norm
from fastalign.runtime.rotary import qk_rotation
from fastalign.transfers import index_on
from fastalign.unlearn.models import logit_setting_places, logit_softcap

LLAMA_FAMILY = tuple(LAYOUTS)


def llama_family_problem(model):
    """Why `model` cannot run on the paged Llama path, or None when it can."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in LAYOUTS:
        return f"model_type {model_type!r} is not one of {LLAMA_FAMILY}"
    inner = getattr(model, "model", None)
    missing = [name for name in ("embed_tokens", "layers", "norm", "rotary_emb") if not hasattr(inner, name)]
    if not hasattr(model, "lm_head"):
        missing.append("lm_head")
    if not missing:
        names = LAYOUTS[model_type].modules()
        missing = [f"layers[{i}].{name}" for i, layer in enumerate(inner.layers) for name in names
                   if not _has_submodule(layer, name)]
    if missing:
        return f"its modules do not follow the Llama layout (missing {', '.join(missing)})"
    if getattr(config, "use_bidirectional_attention", False):
        return "it attends bidirectionally (use_bidirectional_attention), not causally"
    hooked = [name or type(model).__name__ for name, module in _passed_over(model) if runs_a_users_hooks(module)]
    if hooked:
        return (f"{', '.join(hooked)} run{'s' * (len(hooked) == 1)} hooks (forward hooks or pre-hooks, or a forward "
                "set on the instance) that the paged Llama forward, which calls their submodules, would skip")
    return None


def _passed_over(model):
    """(name, module) of each module whose submodules the paged forward calls instead of it: the model, its decoder,
    each layer and each layer's attention."""
    yield "", model
    yield "model", model.model
    for index, layer in enumerate(model.model.layers):
        yield f"model.layers.{index}", layer
        yield f"model.layers.{index}.self_attn", layer.self_attn


def _has_submodule(module, name):
    try:
        module.get_submodule(name)
    except AttributeError:
        return False
    return True


def layer_windows(model, layout):
    """Each layer's sliding window (None: it attends to the whole sequence), as Hugging Face's forward masks it
    (`layout.windows`): config.sliding_window on every layer (Mistral's, whatever config.layer_types says), or on the
    layers whose config.layer_types entry is "sliding_attention" (Qwen2-MoE's full layers have no `sliding_window`
    attribute to say so, and were given the config's), or on none (Llama's, even where its config names one); 0
    means none."""
    config, count = model.config, len(model.model.layers)
    window = getattr(config, "sliding_window", None) if layout.windows else None
    if layout.windows == "by layer type":
        windows = [window if kind == "sliding_attention" else None for kind in config.layer_types]
    else:
        windows = [window] * count
    windows = [w or None for w in windows]
    for index, window in enumerate(windows):
        if window is not None and (not is_integer(window) or window < 1):
            raise ValueError(f"model: layer {index}'s sliding window must be a positive int, got {window!r}")
    return windows


def plain_linear(module):
    """The torch.nn.Linear that `module` is, or that PEFT's LoRA layer `module` wraps (base_layer): its forward takes
    inputs of its weight's dtype alone, and returns that dtype. None for any other module (one that dequantizes its
    weights, say, computing in its input's dtype)."""
    linear = getattr(module, "base_layer", module)
    return linear if type(linear).forward is torch.nn.Linear.forward else None


def kv_dtype(model):
    """The dtype of the K/V that `model`'s layers compute: its first layer's k_proj's weight's where that is a plain
    Linear (bf16 embeddings before fp32 layers: fp32, as their RMSNorms' fp32 weights promote the embeddings), else
    (a quantized projection) the input embeddings' dtype, which the layers compute in."""
    k_proj = plain_linear(model.model.layers[0].self_attn.k_proj)
    return model.model.embed_tokens.weight.dtype if k_proj is None else k_proj.weight.dtype


class PagedLlama:
    """The forward of a Llama-family causal LM over a ForwardBatch, with its KV in a KVPool."""

    paged = True   # attention on the pool, every row of a forward in one batch
    recomputes_context = False   # a row's context runs once, when its span is made (HFRecomputeModel: every call)

    def __init__(self, model, backend, device):
        problem = llama_family_problem(model)
        if problem is not None:
            raise ValueError(f"model: cannot run on the paged Llama path: {problem}")
        config = model.config
        self.model = model
        self.num_layers = len(model.model.layers)
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = model.model.layers[0].self_attn.head_dim
        self.pool_shapes = [(self.num_kv_heads, self.head_dim)] * self.num_layers   # KVPool's layers: the model's
        self.layout = layout = LAYOUTS[config.model_type]
        self._logit_places = logit_setting_places(model)   # where its forward reads its soft cap (read at each call)
        layer_windows(model, layout)   # a bad window refused when the runner is made (read again at each call)
        self.max_context = runner_context(config)
        # device: where the whole model computes (model_device), embeddings offloaded by accelerate included; dtype:
        # the pool's, that of the K/V the layers compute (kv_dtype)
        self.dtype, self.device = kv_dtype(model), device
        self.backend = backend   # resolved: "triton" or "torch"
        # on the Triton backend, one kernel for each RMSNorm (with the residual add before it), for the rotation
        # of q and k, and for a dense MLP's activation and product: fewer launches. These stand-ins hold the modules
        # they stand in for, so each call makes them again for a module replaced since (_layers)
        self._rule, self._rotate = layout.rms_norm if self.backend == "triton" else None, qk_rotation(self.backend)
        self._stood_in_for = operator.attrgetter(*layout.norms(), "mlp")   # a layer's modules that stand-ins hold
        self._made_for = [None] * self.num_layers   # per layer, the modules its stand-ins were made for
        self.norms, self.rotations = [None] * self.num_layers, [None] * self.num_layers
        self.mlps = [None] * self.num_layers        # None: the module
        self.final_norm = self._final_norm_of = None
        self._columns_index = (None, None)   # head_at_columns': (the ids, vocabulary size and device; their index)
        self._layers()

    def forward(self, batch, pool, select, want_logits, want_hidden, logits_rows=None):
        """Writes the KV of every token of `batch` into `pool`; returns (logits, hidden) of the tokens
        at indices `select` (None: nothing), logits in float32 (only at select[logits_rows] when given:
        [tokens, vocab] float32 logits of a long row would be the largest tensor of the call), hidden after
        the final norm. Dropout is off whatever the model's mode: a LoRA adapter's sits in the layers run here,
        and would make the K/V cached for the tree, and every logit, random."""
        with eval_mode(self.model):
            return self._forward(batch, pool, select, want_logits, want_hidden, logits_rows)

    @property
    def windows(self):
        """Each layer's sliding window as the config gives it now (layer_windows)."""
        return layer_windows(self.model, self.layout)

    def _forward(self, batch, pool, select, want_logits, want_hidden, logits_rows):
        inner = self.model.model
        num_tokens = batch.num_tokens
        h = inner.embed_tokens(batch.input_ids)
        layout = self.layout
        layer_types = self.model.config.layer_types if layout.rope_by_layer_type else None
        rotations = self._rotations(h, batch.positions, layer_types)
        windows = self.windows
        # the last MLP's output, added to the residual stream h by the next norm's kernel after the family's norm of
        # it (pending_norm: the Gemmas' and OLMo's post-feedforward norm, else None)
        pending = pending_norm = None
        for index, layer in enumerate(self._layers()):
            attn, norms = layer.self_attn, self.norms[index]
            cos, sin = rotations[layer_types[index] if layer_types else None]
            if pending is None:
                x = _norm(norms, layout.input_norm, h)
            else:
                h, x = add_then_norm(norms.get(layout.input_norm), h, pending, pending_norm)
            q, k, v = attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)
            q = q.view(num_tokens, self.num_heads, self.head_dim)
            k = k.view(num_tokens, self.num_kv_heads, self.head_dim)
            v = v.view(num_tokens, self.num_kv_heads, self.head_dim)
            # normalised where the family normalises them (qk_norm), rotated in the rotation's dtype, rounded back to
            # the projections' (OLMo 3 rotates a bf16 model in fp32), on their way into the pool
            softcap = getattr(attn, "attn_logit_softcapping", None) if layout.score_softcap else None
            o = pool_attention(index, q, k, v, pool, batch, scale=attn.scaling, window=windows[index], softcap=softcap,
                               backend=self.backend, rotation=(self.rotations[index], cos, sin))
            o = attn.o_proj(o.reshape(num_tokens, self.num_heads * self.head_dim))
            h, x = add_then_norm(norms.get(layout.mlp_in_norm), h, o, norms.get(layout.attention_out_norm))
            mlp = self.mlps[index]
            # the module on [1, T, H]: the sparse MoE blocks read [batch, sequence, hidden]
            pending = layer.mlp(x[None])[0] if mlp is None else mlp(x)
            pending_norm = norms.get(layout.mlp_out_norm)
        if select is None:
            return None, None
        if pending is None:
            hidden = self.final_norm(h[select])
        else:   # the last residual add at the selected tokens only
            hidden = add_then_norm(self.final_norm, h[select], pending[select], pending_norm)[1]
        at = hidden if logits_rows is None else hidden[logits_rows]
        head = self.model.lm_head
        # the final norm's output as Hugging Face's forward feeds it (a head that dequantizes float8 weights, or
        # computes in its input's dtype, gets it as is), but a plain Linear kept in another dtype than the layers
        # (fp32 on a bf16 model), which takes no other, gets it in its own
        linear = plain_linear(head)
        if linear is not None:
            at = at.to(linear.weight.dtype)
        logits = self._soft_capped(head(at)).float() if want_logits else None
        return logits, hidden if want_hidden else None

    def head_at_columns(self, ids: np.ndarray):
        """The function from final hidden states (forward's) to the float32 logits at the vocabulary `ids` (an int
        array: TreeRunner checked them) that forward's head gives there, from those rows of the lm_head (and its bias)
        alone; None where the head is not a plain torch.nn.Linear run as its class runs it (a LoRA on it, a quantized
        head, a hook: what it computes at a few columns is not its weight's rows). The head is looked at at each call,
        as it is now; the ids' index on the device is kept for the next call with the same ids, vocabulary size and
        device (a tree engine asks for the judge's label columns at each judge call): no copy to the device then."""
        head = self.model.lm_head
        if type(head).forward is not torch.nn.Linear.forward or runs_more_than_its_forward(head):
            return None
        weight, ids = head.weight, ids.astype(np.int64)   # (a copy: the index kept must not follow the caller's array)
        key = (ids.tobytes(), weight.shape[0], weight.device)
        kept_for, index = self._columns_index   # (one read: another thread may replace it)
        if kept_for != key:
            if ids.size and (ids.min() < 0 or ids.max() >= weight.shape[0]):
                raise ValueError(f"columns: expected vocabulary ids in [0, {weight.shape[0]}), got {ids.tolist()}")
            index = index_on(ids, weight.device)
            self._columns_index = (key, index)

        def logits(hidden):
            if not isinstance(hidden, torch.Tensor) or hidden.dim() != 2 or hidden.shape[1] != weight.shape[1]:
                found = tuple(hidden.shape) if isinstance(hidden, torch.Tensor) else type(hidden).__name__
                raise ValueError(f"hidden: expected final hidden states [N, {weight.shape[1]}] (extend's with "
                                 f"hidden=\"last\"; torch.cat those of hidden=\"all\", a list by span), got {found}")
            bias = None if head.bias is None else head.bias[index]
            return self._soft_capped(torch.nn.functional.linear(hidden.to(weight.dtype), weight[index], bias)).float()
        return logits

    def _layers(self):
        """The decoder's layers as they are now, after making the stand-ins (norms, rotation, MLP) of any module
        replaced since they were made; a ValueError where they are not as many as the pool holds K/V for."""
        inner = self.model.model
        layers = inner.layers
        if len(layers) != self.num_layers:
            raise ValueError(f"model: it has {len(layers)} decoder layers now, and this TreeRunner's KV pool was made "
                             f"for {self.num_layers}; make a new TreeRunner for the model as it is now")
        for index, layer in enumerate(layers):
            modules = self._stood_in_for(layer)
            if modules != self._made_for[index]:
                self._stand_in(index, layer, modules)
        if inner.norm is not self._final_norm_of:
            self.final_norm, self._final_norm_of = fused_rms_norm(inner.norm, self._rule, self.dtype), inner.norm
        return layers

    def _stand_in(self, index, layer, modules):
        """Layer `index`'s norms, rotation (with its q and k norms before it where the family has them: one kernel)
        and MLP as the backend runs them, made for its `modules` (_stood_in_for)."""
        norms = {name: fused_rms_norm(module, self._rule, self.dtype) for name, module in zip(self.layout.norms(),
                                                                                                modules)}
        self.norms[index] = norms
        self.rotations[index] = (functools.partial(self._rotate, head_norms=(norms["self_attn.q_norm"],
                                                                              norms["self_attn.k_norm"]))
                                 if self.layout.qk_norm else self._rotate)
        self.mlps[index] = fused_gated_mlp(layer.mlp, self.backend)
        self._made_for[index] = modules

    def _rotations(self, h, positions, layer_types):
        """(cos, sin) [T, 1, head_dim] (broadcast over heads) of the tokens' positions: one pair (key None), or one
        per layer type where local and global layers rotate with different bases (Gemma 3, OLMo 3: `layer_types`)."""
        rotary = self.model.model.rotary_emb
        types = sorted(set(layer_types)) if layer_types else [None]
        pairs = {t: rotary(h, positions[None]) if t is None else rotary(h, positions[None], t) for t in types}
        return {t: (cos[0, :, None, :], sin[0, :, None, :]) for t, (cos, sin) in pairs.items()}

    def _soft_capped(self, logits):
        """c tanh(logits / c) with the soft cap c the model's forward reads (logit_softcap: Gemma 2's and 3's
        final_logit_softcapping; None: the logits themselves), in the head's dtype as their forwards cap them."""
        c = logit_softcap(self.model, self._logit_places)
        return logits if c is None else torch.tanh(logits / c) * c


def _norm(norms, name, x):
    """The layer's norm `name` (its module, or the fused kernel standing for it) applied to x, or x where the family
    has no norm there (name None)."""
    return x if name is None else norms[name](x)
