"""The rotary position embedding of a layer's queries and keys as the Llama family's attention applies it:
x * cos + rotate_half(x) * sin, in the dtype torch promotes x and cos to, rounded back to x's. On the Triton backend
one kernel rotates every head of q and k in place (kernels/rotary.py) instead of ten elementwise launches a layer;
the torch ops elsewhere, and for tensors the kernel does not take."""
import torch


def rotate_half(x):
    """[x1, x2] -> [-x2, x1] over the last dimension (the pairing of Hugging Face's RoPE layout)."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rotate_qk_torch(q, k, cos, sin):
    """(q, k) [T, heads, D] rotated by cos, sin [T, 1, D], as new tensors."""
    return (q * cos + rotate_half(q) * sin).to(q.dtype), (k * cos + rotate_half(k) * sin).to(k.dtype)


def qk_rotation(backend):
    """rotate(q, k, cos, sin) -> (q, k) for the attention `backend` ("triton": the kernel, in place)."""
    if backend != "triton":
        return rotate_qk_torch
    from fastalign.kernels.rotary import rotate_qk_triton

    def rotate(q, k, cos, sin):
        head_dim = q.shape[-1]
        if (head_dim % 2 or k.shape[-1] != head_dim or cos.shape[-1] != head_dim or k.dtype != q.dtype
                or sin.dtype != cos.dtype or any(t.stride(-1) != 1 or t.device != q.device for t in (k, cos, sin))
                or q.stride(-1) != 1):
            return rotate_qk_torch(q, k, cos, sin)
        return rotate_qk_triton(q, k, cos[:, 0], sin[:, 0])
    return rotate
