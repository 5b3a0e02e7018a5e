"""The rotary position embedding of a layer's queries and keys as the Llama family's attention applies it:
x * cos + rotate_half(x) * sin, in the dtype torch promotes x and cos to, rounded back to x's. On the Triton backend
one kernel rotates every head of q and k in place, and stores the rotated keys and the values in the paged KV cache
(kernels/rotary.py), instead of ten elementwise launches and two scatters a layer; the torch ops and write_kv
elsewhere, and for tensors the kernel does not take. Where a family normalises q and k before rotating them
(`head_norms`: Qwen3's and Gemma 3's q_norm and k_norm, over each head; OLMo's, over the whole projection, all the
heads of a token at once), the same kernel applies those RMSNorms first, when both are the fused kernel's
(rms_norms.FusedRMSNorm); otherwise the norms are called as they are.
"""
import torch

from fastalign.ops.paged_attention import write_kv_unchecked
from fastalign.runtime.rms_norms import FusedRMSNorm


def rotate_half(x):
    """[x1, x2] -> [-x2, x1] over the last dimension (the pairing of Hugging Face's RoPE layout)."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rotate_qk_torch(q, k, cos, sin, store=None, head_norms=None):
    """(q, k) [T, heads, D] rotated by cos, sin [T, 1, D], as new tensors, after head_norms = (q_norm, k_norm) where
    given; with store = (v, k_cache, v_cache, slot_mapping), the rotated k and v also written to the slots of the
    caches (write_kv)."""
    if head_norms is not None:
        q, k = _normed(head_norms[0], q), _normed(head_norms[1], k)
    q, k = (q * cos + rotate_half(q) * sin).to(q.dtype), (k * cos + rotate_half(k) * sin).to(k.dtype)
    if store is not None:
        v, k_cache, v_cache, slot_mapping = store
        write_kv_unchecked(k, v, k_cache, v_cache, slot_mapping)
    return q, k


def qk_rotation(backend):
    """rotate(q, k, cos, sin, store=None, head_norms=None) -> (q, k) for the attention `backend` ("triton": the
    kernel, in place), as rotate_qk_torch computes it."""
    if backend != "triton":
        return rotate_qk_torch
    from fastalign.kernels.rotary import rotate_qk_triton

    def rotate(q, k, cos, sin, store=None, head_norms=None):
        takes = _kernel_takes(q, k, cos, sin, store)
        norms = _kernel_norms(q, k, *head_norms) if takes and head_norms is not None else None
        if head_norms is not None and norms is None:   # the norms as they are, then the rotation
            q, k = _normed(head_norms[0], q), _normed(head_norms[1], k)
            takes = _kernel_takes(q, k, cos, sin, store)
        if not takes:
            return rotate_qk_torch(q, k, cos, sin, store)
        return rotate_qk_triton(q, k, cos[:, 0], sin[:, 0], store, norms)
    return rotate


def _over_heads(norm, x):
    """Whether `norm` (a FusedRMSNorm or a module) normalises all the heads of x [T, heads, D] at once (its weight
    spans them), not each head."""
    return getattr(norm, "module", norm).weight.shape[0] != x.shape[-1]


def _normed(norm, x):
    """x [T, heads, D] normalised by `norm`, over each head or over all of them as its weight says."""
    return norm(x.flatten(-2)).view(x.shape) if _over_heads(norm, x) else norm(x)


def _kernel_norms(q, k, q_norm, k_norm):
    """The kernel's head_norms argument for the two norms, or None where the kernel cannot apply them: a norm that is
    not a FusedRMSNorm, rules that differ, or weights that are not contiguous ones of [head_dim] (or of all the
    heads, for both norms) on q's device."""
    if not (isinstance(q_norm, FusedRMSNorm) and isinstance(k_norm, FusedRMSNorm) and q_norm.rule == k_norm.rule):
        return None
    over_heads = _over_heads(q_norm, q)
    shapes = [x.shape[-2:].numel() if over_heads else x.shape[-1] for x in (q, k)]
    weights = q_norm.module.weight, k_norm.module.weight
    if any(w.shape != (n,) or w.stride(-1) != 1 or w.device != q.device for w, n in zip(weights, shapes)):
        return None
    return dict(q_weight=weights[0], k_weight=weights[1], q_eps=q_norm.eps, k_eps=k_norm.eps, **q_norm.rule,
                over_heads=over_heads)


def _kernel_takes(q, k, cos, sin, store):
    """Whether the kernel computes these: heads of one even width and dtype, cos and sin of one dtype with a row per
    token (not broadcast), last dimensions contiguous, all on q's device; a store's caches of k's dtype and of one
    layout, and its slots one contiguous row."""
    head_dim = q.shape[-1]
    tensors = (k, cos, sin)
    if any(t.dim() < 2 or t.shape[0] != q.shape[0] for t in tensors):
        return False
    if store is not None:
        v, k_cache, v_cache, slots = store
        if (v.dtype != k.dtype or k_cache.dtype != k.dtype or k_cache.stride() != v_cache.stride()
                or slots.dim() != 1 or slots.stride(0) != 1):
            return False
        tensors += (v, k_cache, v_cache)
    return not (head_dim % 2 or k.shape[-1] != head_dim or cos.shape[-1] != head_dim or k.dtype != q.dtype
                or sin.dtype != cos.dtype or q.stride(-1) != 1
                or any(t.stride(-1) != 1 or t.device != q.device for t in tensors))
