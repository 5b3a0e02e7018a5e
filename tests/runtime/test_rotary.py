"""fastalign.runtime.rotary: the rotation the paged Llama forward applies, the kernel on the Triton backend (held to
the torch ops in tests/kernels/test_rotary.py), the torch ops elsewhere and for tensors the kernel does not take."""
import pytest
import torch

from fastalign.runtime.rotary import qk_rotation, rotate_half, rotate_qk_torch
from tests.conftest import TRITON_DEVICE


def test_rotate_half_pairs_the_halves():
    """Of an odd width too, as Hugging Face's rotate_half splits it (the first half the shorter)."""
    from transformers.models.llama.modeling_llama import rotate_half as hf_rotate_half
    assert rotate_half(torch.tensor([1.0, 2.0, 3.0, 4.0])).tolist() == [-3.0, -4.0, 1.0, 2.0]
    odd = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    assert rotate_half(odd).tolist() == hf_rotate_half(odd).tolist() == [-3.0, -4.0, -5.0, 1.0, 2.0]


def test_torch_backend_rotates_out_of_place():
    q, k, cos, sin = torch.randn(3, 4, 8), torch.randn(3, 2, 8), torch.randn(3, 1, 8), torch.randn(3, 1, 8)
    rotate = qk_rotation("torch")
    out_q, out_k = rotate(q, k, cos, sin)
    assert out_q is not q and torch.equal(out_q, q * cos + rotate_half(q) * sin)


def test_triton_backend_rotates_in_place_and_leaves_what_it_cannot_take_to_torch():
    torch.manual_seed(0)
    rotate = qk_rotation("triton")
    q, k = torch.randn(3, 4, 8, device=TRITON_DEVICE), torch.randn(3, 2, 8, device=TRITON_DEVICE)
    cos, sin = torch.randn(3, 1, 8, device=TRITON_DEVICE), torch.randn(3, 1, 8, device=TRITON_DEVICE)
    ref = rotate_qk_torch(q, k, cos, sin)
    out = rotate(q, k, cos, sin)
    assert out[0] is q and all(torch.equal(a, b) for a, b in zip(out, ref))
    odd = torch.randn(3, 4, 7, device=TRITON_DEVICE), torch.randn(3, 2, 7, device=TRITON_DEVICE)
    odd_cos = torch.randn(3, 1, 7, device=TRITON_DEVICE)
    out = rotate(*odd, odd_cos, odd_cos)     # an odd head_dim has no halves: the torch ops answer as they would
    assert out[0] is not odd[0] and torch.equal(out[0], rotate_qk_torch(*odd, odd_cos, odd_cos)[0])


def pool_layer(tokens, kv_heads, head_dim, dtype=torch.float32):
    """(v, k_cache, v_cache, slot_mapping): a store into a NaN-filled pool layer [2, 3 blocks, 4 slots, ...]."""
    pool = torch.full((2, 3, 4, kv_heads, head_dim), float("nan"), dtype=dtype, device=TRITON_DEVICE)
    v = torch.randn(tokens, kv_heads, head_dim, device=TRITON_DEVICE)
    return v, pool[0], pool[1], torch.randperm(12, device=TRITON_DEVICE)[:tokens]


def test_both_backends_store_the_rotated_keys_and_the_values_alike():
    """The kernel's store (and its fallback for what it cannot take, an odd head_dim) as rotate_qk_torch's."""
    torch.manual_seed(0)
    for head_dim in (8, 7):
        q, k = torch.randn(3, 4, head_dim, device=TRITON_DEVICE), torch.randn(3, 2, head_dim, device=TRITON_DEVICE)
        cos, sin = torch.randn(3, 1, head_dim, device=TRITON_DEVICE), torch.randn(3, 1, head_dim, device=TRITON_DEVICE)
        store = pool_layer(3, 2, head_dim)
        ref_store = (store[0], store[1].clone(), store[2].clone(), store[3])
        ref = rotate_qk_torch(q, k, cos, sin, ref_store)
        out = qk_rotation("triton")(q, k, cos, sin, store)
        assert all(torch.equal(a, b) for a, b in zip(out, ref))
        for cache, ref_cache in zip(store[1:3], ref_store[1:3]):
            torch.testing.assert_close(cache, ref_cache, rtol=0, atol=0, equal_nan=True)
        assert not store[1].isnan().all() and store[1].isnan().any()


def test_k_of_another_head_dim_is_left_to_the_torch_ops():
    """k [T, heads, 6] with q and cos of head_dim 8: the kernel would rotate k's heads as 8 wide (reading past them);
    the torch ops refuse the broadcast, as they would."""
    q, k = torch.randn(3, 4, 8, device=TRITON_DEVICE), torch.randn(3, 2, 6, device=TRITON_DEVICE)
    cos = torch.randn(3, 1, 8, device=TRITON_DEVICE)
    with pytest.raises(RuntimeError, match="size of tensor"):
        qk_rotation("triton")(q, k, cos, cos)


def test_broadcast_cos_and_strided_slots_are_left_to_the_torch_ops():
    """cos and sin of one row for every token, and slots that are a strided view: the kernel reads a row per token and
    the slots as one contiguous row, so it read past cos and stored into other slots (one past the pool). The torch
    ops take them, as they would."""
    torch.manual_seed(0)
    q, k = torch.randn(4, 2, 8, device=TRITON_DEVICE), torch.randn(4, 1, 8, device=TRITON_DEVICE)
    cos, sin = torch.randn(1, 1, 8, device=TRITON_DEVICE), torch.randn(1, 1, 8, device=TRITON_DEVICE)
    out = qk_rotation("triton")(q.clone(), k.clone(), cos, sin)
    assert all(torch.equal(a, b) for a, b in zip(out, rotate_qk_torch(q, k, cos, sin)))
    v, k_cache, v_cache, _ = pool_layer(4, 1, 8)
    slots = torch.tensor([3, 100, 7, 100, 1, 100, 11, 100], device=TRITON_DEVICE)[::2]
    full_cos, full_sin = cos.expand(4, 1, 8), sin.expand(4, 1, 8)
    ref_store = (v, k_cache.clone(), v_cache.clone(), slots)
    rotate_qk_torch(q, k, full_cos, full_sin, ref_store)
    qk_rotation("triton")(q.clone(), k.clone(), full_cos, full_sin, (v, k_cache, v_cache, slots))
    for cache, ref_cache in zip((k_cache, v_cache), ref_store[1:3]):
        torch.testing.assert_close(cache, ref_cache, rtol=0, atol=0, equal_nan=True)


def qwen3_heads_and_norms(head_dim):
    """bf16 q [3, 4, D] and k [3, 2, D], cos and sin [3, 1, D], Qwen3's q_norm and k_norm modules over D and a
    FusedRMSNorm of each."""
    from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm

    from fastalign.runtime.rms_norms import FusedRMSNorm
    torch.manual_seed(0)
    q, k = (torch.randn(3, heads, head_dim).to(TRITON_DEVICE, torch.bfloat16) for heads in (4, 2))
    cos, sin = (torch.randn(3, 1, head_dim).to(TRITON_DEVICE, torch.bfloat16) for _ in range(2))
    modules = [Qwen3RMSNorm(head_dim, eps=1e-6).to(TRITON_DEVICE, torch.bfloat16) for _ in range(2)]
    for module in modules:
        torch.nn.init.normal_(module.weight, 1.0, 0.5)
    return q, k, cos, sin, modules, [FusedRMSNorm(module, 1e-6, "rounded") for module in modules]


def test_head_norms_run_in_the_kernel_when_both_are_fused_and_as_called_otherwise(monkeypatch):
    """Qwen3's q_norm and k_norm: with both FusedRMSNorm, the kernel normalises (no norm is called); with a module
    among them, each norm is called as it is, then the heads are rotated."""
    from fastalign.runtime.rms_norms import FusedRMSNorm
    from tests.kernels.test_rms_norm import assert_as_module
    q, k, cos, sin, modules, fused = qwen3_heads_and_norms(16)
    calls = []
    monkeypatch.setattr(FusedRMSNorm, "__call__", lambda self, x: calls.append(self) or self.module(x))
    with torch.no_grad():
        ref = rotate_qk_torch(q, k, cos, sin, head_norms=modules)
        out = qk_rotation("triton")(q.clone(), k.clone(), cos, sin, head_norms=fused)
        assert calls == []
        mixed = qk_rotation("triton")(q.clone(), k.clone(), cos, sin, head_norms=(fused[0], modules[1]))
    assert calls == [fused[0]]
    for a, b in zip(out, ref):
        assert_as_module(a, b)
    assert all(torch.equal(a, b) for a, b in zip(mixed, ref))


def test_head_norms_still_apply_where_the_kernel_does_not_rotate():
    """Fused head norms with heads the kernel cannot rotate (an odd head_dim): the norms run as they are, then the
    torch rotation, as rotate_qk_torch computes with the modules."""
    from tests.kernels.test_rms_norm import assert_as_module
    q, k, cos, sin, modules, fused = qwen3_heads_and_norms(7)
    with torch.no_grad():
        ref = rotate_qk_torch(q, k, cos, sin, head_norms=modules)
        out = qk_rotation("triton")(q, k, cos, sin, head_norms=fused)
    for a, b in zip(out, ref):
        assert_as_module(a, b)


def test_heads_whose_norms_change_their_dtype_are_checked_again():
    """q_norm a module of an fp32 weight (its bf16 heads come out in fp32), k_norm one of bf16: the kernel takes the
    heads before the norms but not after (k's dtype is not q's), so the torch ops rotate them, as rotate_qk_torch."""
    q, k, cos, sin, modules, _ = qwen3_heads_and_norms(16)
    modules[0].float()
    with torch.no_grad():
        ref = rotate_qk_torch(q, k, cos, sin, head_norms=modules)
        out = qk_rotation("triton")(q.clone(), k.clone(), cos, sin, head_norms=modules)
    assert out[0].dtype == torch.float32 and out[1].dtype == torch.bfloat16
    assert all(torch.equal(a, b) for a, b in zip(out, ref))


def test_fused_head_norms_of_two_spans_are_called_as_they_are():
    """A fused q_norm over all of q's heads and a fused k_norm over each of k's: the kernel normalises both alike (it
    would read k's weight of one head as one over both), so the norms run as they are, then the rotation."""
    from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm

    from fastalign.runtime.rms_norms import FusedRMSNorm
    from tests.kernels.test_rms_norm import assert_as_module
    q, k, cos, sin, modules, _ = qwen3_heads_and_norms(16)
    modules[0] = Qwen3RMSNorm(64, eps=1e-6).to(TRITON_DEVICE, torch.bfloat16)
    torch.nn.init.normal_(modules[0].weight, 1.0, 0.5)
    with torch.no_grad():
        ref = rotate_qk_torch(q, k, cos, sin, head_norms=modules)
        out = qk_rotation("triton")(q.clone(), k.clone(), cos, sin,
                                    head_norms=[FusedRMSNorm(module, 1e-6, "rounded") for module in modules])
    for a, b in zip(out, ref):
        assert_as_module(a, b)


def _heads(tokens, heads, head_dim, dtype=torch.float32):
    return torch.randn(tokens, heads, head_dim).to(TRITON_DEVICE, dtype)


def _cannot_take(case):
    """q, k, cos, sin and a store of tensors the kernel does not take, each for a reason of its own."""
    q, k, v = _heads(3, 4, 8), _heads(3, 2, 8), _heads(3, 2, 8)
    cos, sin = _heads(3, 1, 8), _heads(3, 1, 8)
    pool = torch.full((2, 3, 4, 2, 8), float("nan"), device=TRITON_DEVICE)
    k_cache, v_cache = pool[0], pool[1]
    if case == "caches of two layouts":   # the kernel writes both by k_cache's strides
        v_cache = torch.full((3, 4, 2, 16), float("nan"), device=TRITON_DEVICE)[..., 8:]
    elif case == "sin of another dtype than cos":   # the kernel rounds by cos's dtype
        q, k, v, pool = (t.bfloat16() for t in (q, k, v, pool))
        k_cache, v_cache, cos = pool[0], pool[1], cos.bfloat16()
    elif case == "k of another dtype than q":   # the kernel rounds k by q's dtype
        k, v, pool, cos, sin = (t.bfloat16() for t in (k, v, pool, cos, sin))
        k_cache, v_cache = pool[0], pool[1]
    elif case == "q strided in its last dimension":
        q = _heads(3, 8, 4).transpose(1, 2)
    elif case == "cos strided in its last dimension":
        cos = _heads(3, 1, 16)[..., ::2]
    elif case == "cos of one value a token":   # broadcast over head_dim by the torch ops
        cos = _heads(3, 1, 1)
    elif case == "v strided in its last dimension":
        v = _heads(3, 2, 16)[..., ::2]
    return q, k, cos, sin, (v, k_cache, v_cache, torch.tensor([9, 0, 4], device=TRITON_DEVICE))


@pytest.mark.parametrize("case", ["caches of two layouts", "sin of another dtype than cos", "k of another dtype than q",
                                  "q strided in its last dimension", "cos strided in its last dimension",
                                  "cos of one value a token", "v strided in its last dimension"])
def test_what_the_kernel_cannot_take_is_left_to_the_torch_ops(case):
    """Each of these the kernel would read or write as the contiguous, one-dtype tensors it takes (silently wrong
    rotations or stores): the Triton backend rotates and stores them as rotate_qk_torch does."""
    torch.manual_seed(0)
    q, k, cos, sin, store = _cannot_take(case)
    ref_store = (store[0], store[1].clone(), store[2].clone(), store[3])
    ref = rotate_qk_torch(q, k, cos, sin, ref_store)
    out = qk_rotation("triton")(q.clone(), k.clone(), cos, sin, store)
    assert all(torch.equal(a, b) for a, b in zip(out, ref))
    for cache, ref_cache in zip(store[1:3], ref_store[1:3]):
        torch.testing.assert_close(cache, ref_cache, rtol=0, atol=0, equal_nan=True)


def test_fused_head_norms_of_their_own_eps_rules_and_weights():
    """Fused q_norm and k_norm with eps of their own (1e-6, 1e-2, on heads whose mean square each moves apart), then
    with rules that differ and with a weight that is a strided view (which the kernel cannot take: the norms run as
    they are): the rotation of the heads as each norm normalises them."""
    from fastalign.runtime.rms_norms import FusedRMSNorm
    from tests.kernels.test_rms_norm import assert_as_module
    q, k, cos, sin, modules, _ = qwen3_heads_and_norms(16)
    q, k = 0.05 * q, 0.05 * k
    modules[1].variance_epsilon = 1e-2
    strided = type(modules[1])(16).to(TRITON_DEVICE, torch.bfloat16)
    strided.weight = torch.nn.Parameter(torch.randn(32, device=TRITON_DEVICE).bfloat16()[::2])
    for norms in ([FusedRMSNorm(modules[0], 1e-6, "rounded"), FusedRMSNorm(modules[1], 1e-2, "rounded")],
                  [FusedRMSNorm(modules[0], 1e-6, "rounded"), FusedRMSNorm(modules[1], 1e-2, "fp32")],
                  [FusedRMSNorm(modules[0], 1e-6, "rounded"), FusedRMSNorm(strided, 1e-6, "rounded")]):
        with torch.no_grad():
            ref = rotate_qk_torch(q, k, cos, sin, head_norms=norms)
            out = qk_rotation("triton")(q.clone(), k.clone(), cos, sin, head_norms=norms)
        for a, b in zip(out, ref):
            assert_as_module(a, b)
