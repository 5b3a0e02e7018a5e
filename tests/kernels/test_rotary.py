"""kernels/rotary.py against the torch rotation it stands for in the paged forward (fastalign.runtime.rotary:
x * cos + rotate_half(x) * sin in the promoted dtype, rounded to x's): equal to the bit in every dtype, with cos and
sin in q's dtype (three rounded 16-bit ops) or in fp32 (OLMo 3's: one rounding), at odd head counts and widths, one
token and none; q and k are rotated in place, and with a store the rotated keys and the values land in the slots of
a paged cache as write_kv puts them; with head norms, q and k are first normalised as Qwen3's, Gemma 3's (per head)
and OLMo's (over all the heads) q_norm and k_norm modules normalise them."""
import pytest
import torch
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from fastalign.kernels.rotary import rotate_qk_triton
from fastalign.ops.paged_attention import write_kv_unchecked
from fastalign.ops.rms_norm import WEIGHT_RULES
from fastalign.runtime.rotary import rotate_qk_torch
from tests.conftest import TRITON_DEVICE
from tests.kernels.test_rms_norm import assert_as_module, module_and_input


def inputs(tokens, q_heads, kv_heads, head_dim, dtype, cos_dtype, seed=0):
    torch.manual_seed(seed)
    q, k = (torch.randn(tokens, heads, head_dim).to(TRITON_DEVICE, dtype) for heads in (q_heads, kv_heads))
    angles = torch.rand(tokens, 1, head_dim) * 6.3
    return q, k, angles.cos().to(TRITON_DEVICE, cos_dtype), angles.sin().to(TRITON_DEVICE, cos_dtype)


@pytest.mark.parametrize("dtype, cos_dtype", [(torch.float32, torch.float32), (torch.float16, torch.float16),
                                              (torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32)])
@pytest.mark.parametrize("tokens, q_heads, kv_heads, head_dim", [(5, 4, 2, 16), (1, 3, 1, 80), (3, 6, 6, 2)])
def test_equals_the_torch_rotation(tokens, q_heads, kv_heads, head_dim, dtype, cos_dtype):
    q, k, cos, sin = inputs(tokens, q_heads, kv_heads, head_dim, dtype, cos_dtype)
    ref_q, ref_k = rotate_qk_torch(q, k, cos, sin)
    out_q, out_k = rotate_qk_triton(q, k, cos[:, 0], sin[:, 0])
    assert out_q is q and out_k is k   # in place
    assert torch.equal(out_q, ref_q) and torch.equal(out_k, ref_k)


def assert_rotates_and_stores_as_torch(q, k, cos, sin, v, pool, slots):
    """The kernel's rotation of q and k, and its store of the keys and v into the layer `pool` [2, blocks, block_size,
    heads, D] at `slots`, to the bit the torch rotation's and write_kv's (NaNs where neither writes)."""
    ref_pool = pool.clone()
    ref_q, ref_k = rotate_qk_torch(q, k, cos, sin)
    write_kv_unchecked(ref_k, v, ref_pool[0], ref_pool[1], slots)
    out_q, out_k = rotate_qk_triton(q, k, cos[:, 0], sin[:, 0], store=(v, pool[0], pool[1], slots))
    assert torch.equal(out_q, ref_q) and torch.equal(out_k, ref_k)
    torch.testing.assert_close(pool, ref_pool, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("dtype, cos_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                              (torch.bfloat16, torch.float32)])
@pytest.mark.parametrize("tokens, q_heads, kv_heads, head_dim", [(5, 4, 2, 16), (1, 3, 3, 80)])
def test_store_writes_the_rotated_keys_and_the_values_to_their_slots(tokens, q_heads, kv_heads, head_dim, dtype,
                                                                     cos_dtype):
    """As write_kv writes the torch rotation's keys, into a KV pool layer's two caches (of one [2, blocks, block_size,
    heads, D] tensor); the slots not written keep their NaNs."""
    q, k, cos, sin = inputs(tokens, q_heads, kv_heads, head_dim, dtype, cos_dtype)
    v = torch.randn(tokens, kv_heads, head_dim).to(TRITON_DEVICE, dtype)
    pool = torch.full((2, 3, 4, kv_heads, head_dim), float("nan"), dtype=dtype, device=TRITON_DEVICE)
    slots = torch.tensor([9, 0, 4, 11, 2][:tokens], device=TRITON_DEVICE)
    assert_rotates_and_stores_as_torch(q, k, cos, sin, v, pool, slots)
    assert pool.isnan().sum() == pool.numel() - 2 * tokens * kv_heads * head_dim


def head_norm_modules(rule, widths, dtype, over_heads=False):
    """A q_norm and a k_norm of the family whose RMSNorms apply their weight by `rule`, of the given widths, with
    their kernel arguments."""
    modules = [module_and_input(rule, (1, width), dtype, seed=seed)[0] for seed, width in zip((1, 2), widths)]
    return modules, dict(q_weight=modules[0].weight, k_weight=modules[1].weight, q_eps=1e-5, k_eps=1e-5,
                         **WEIGHT_RULES[rule], over_heads=over_heads)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rule, over_heads", [("rounded", False), ("one plus", False), ("fp32", True)])
@pytest.mark.parametrize("tokens, q_heads, kv_heads, head_dim", [(5, 4, 2, 16), (2, 3, 1, 80)])
def test_head_norms_before_the_rotation_as_the_modules(tokens, q_heads, kv_heads, head_dim, rule, over_heads, dtype):
    """q and k normalised as the family's q_norm and k_norm modules normalise them (Qwen3's and Gemma 3's over each
    head, OLMo's over all the heads of a token; 16-bit values within a unit in the last place, as
    kernels/rms_norm.py's), then rotated."""
    q, k, cos, sin = inputs(tokens, q_heads, kv_heads, head_dim, dtype, dtype)
    widths = (q_heads * head_dim, kv_heads * head_dim) if over_heads else (head_dim, head_dim)
    modules, arguments = head_norm_modules(rule, widths, dtype, over_heads)
    with torch.no_grad():
        ref_q, ref_k = rotate_qk_torch(q, k, cos, sin, head_norms=modules)
        out_q, out_k = rotate_qk_triton(q, k, cos[:, 0], sin[:, 0], head_norms=arguments)
    assert_as_module(out_q, ref_q)
    assert_as_module(out_k, ref_k)


@pytest.mark.parametrize("over_heads", [False, True])
def test_each_head_norm_takes_its_own_eps(over_heads):
    """q's norm with eps 1e-6 and k's with 1e-2, on values whose mean square (2.5e-3) each eps moves apart; per head
    and over all the heads of a token (OLMo's)."""
    torch.manual_seed(0)
    q, k = 0.05 * torch.randn(3, 4, 16), 0.05 * torch.randn(3, 2, 16)
    angles = torch.rand(3, 1, 16) * 6.3
    cos, sin = angles.cos(), angles.sin()
    q_norm, k_norm = LlamaRMSNorm(64 if over_heads else 16, eps=1e-6), LlamaRMSNorm(32 if over_heads else 16, eps=1e-2)
    with torch.no_grad():
        ref_q, ref_k = rotate_qk_torch(q, k, cos, sin, head_norms=(q_norm, k_norm))
        out_q, out_k = rotate_qk_triton(q.clone().to(TRITON_DEVICE), k.clone().to(TRITON_DEVICE),
                                        cos[:, 0].to(TRITON_DEVICE), sin[:, 0].to(TRITON_DEVICE),
                                        head_norms=dict(q_weight=q_norm.weight.to(TRITON_DEVICE),
                                                        k_weight=k_norm.weight.to(TRITON_DEVICE), q_eps=1e-6,
                                                        k_eps=1e-2, **WEIGHT_RULES["rounded"], over_heads=over_heads))
    torch.testing.assert_close(out_q.cpu(), ref_q, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out_k.cpu(), ref_k, rtol=1e-5, atol=1e-6)


def test_the_other_head_norm_rule_is_told_apart():
    q, k, cos, sin = inputs(5, 4, 2, 16, torch.bfloat16, torch.bfloat16)
    modules, arguments = head_norm_modules("rounded", (16, 16), torch.bfloat16)
    with torch.no_grad():
        ref_q, _ = rotate_qk_torch(q, k, cos, sin, head_norms=modules)
        out_q, _ = rotate_qk_triton(q, k, cos[:, 0], sin[:, 0], head_norms=dict(arguments, **WEIGHT_RULES["fp32"]))
    with pytest.raises(AssertionError):
        assert_as_module(out_q, ref_q)


def test_rounding_once_where_torch_rounds_each_op_is_told_apart():
    """bf16 cos and sin passed as fp32 (one rounding instead of three) fail the comparison: the test can fail."""
    q, k, cos, sin = inputs(8, 4, 2, 32, torch.bfloat16, torch.bfloat16)
    ref_q, _ = rotate_qk_torch(q, k, cos, sin)
    out_q, _ = rotate_qk_triton(q.clone(), k.clone(), cos[:, 0].float(), sin[:, 0].float())
    assert not torch.equal(out_q, ref_q)


def test_strided_tokens_and_no_tokens():
    """q and k as views of one fused projection [T, (q_heads + kv_heads) * D], as the runner's are of theirs."""
    q, k, cos, sin = inputs(4, 4, 2, 8, torch.float32, torch.float32)
    fused = torch.cat([q.flatten(1), k.flatten(1)], dim=1)
    ref_q, ref_k = rotate_qk_torch(q, k, cos, sin)
    out_q, out_k = rotate_qk_triton(fused[:, :32].view(4, 4, 8), fused[:, 32:].view(4, 2, 8), cos[:, 0], sin[:, 0])
    assert torch.equal(out_q, ref_q) and torch.equal(out_k, ref_k)
    assert torch.equal(fused[:, 32:], ref_k.flatten(1))
    empty = torch.empty(0, 4, 8, device=TRITON_DEVICE)
    assert rotate_qk_triton(empty, empty[:, :2], cos[:0, 0], sin[:0, 0])[0].shape == (0, 4, 8)


COMPILE_FOR_SM90 = """
import itertools

from fastalign.kernels.rotary import _rotary_kernel, rotary_warps
from tests.kernels.gpu_build import build_for_gpu, check_build, stack_bytes

for dtype, cos in (("bf16", "bf16"), ("bf16", "fp32"), ("fp16", "fp16"), ("fp32", "fp32")):
    # 1B, 8B, 70B, Gemma 3's wide heads; rotating only, storing K and V in the cache too, and normalising q and k
    # first as well (Qwen3's and Gemma 3's rules, per head; OLMo's, over the heads)
    for (half, q_heads, kv_heads), (store, norm, rounded, over_heads) in itertools.product(
            ((32, 32, 8), (64, 32, 8), (64, 64, 8), (128, 16, 8)),
            ((False, False, False, False), (True, False, False, False), (True, True, True, False),
             (True, True, False, False), (True, True, False, True))):
        pointers = dict(Q=dtype, K=dtype, V=dtype, Cos=cos, Sin=cos, KCache=dtype, VCache=dtype, Slots="i64",
                        QWeight=dtype, KWeight=dtype)
        types = {name: "*" + kind for name, kind in pointers.items()}
        compiled = build_for_gpu(_rotary_kernel, dict(types, q_eps="fp32", k_eps="fp32", weight_offset="fp32"),
                                 dict(HALF=half, BLOCK_QH=q_heads, BLOCK_KH=kv_heads, BLOCK_HALF=half,
                                      ROUND_EACH_OP=dtype == cos, STORE=store, NORM=norm, ROUND_BEFORE_WEIGHT=rounded,
                                      OVER_HEADS=over_heads),
                                 rotary_warps(q_heads, half), 1, enable_fp_fusion=False)   # as it launches
        what = ("rotary", dtype, cos, half, q_heads, kv_heads, store, norm, rounded, over_heads)
        check_build(compiled, what, tuned=False)
        assert stack_bytes(compiled) == 0, (what, "spills registers")
"""


def test_kernel_compiles_for_sm90_without_a_gpu():
    """What the interpreter never does: the build, at the heads of 1B, 8B, 70B and Gemma 3 models, without spills, with
    and without the store to the cache and the heads' norms."""
    from tests.kernels.gpu_build import assert_builds
    assert_builds(COMPILE_FOR_SM90)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_each_tensor_is_read_and_written_by_its_own_strides(dtype):
    """q, v and the caches with heads wider than head_dim (views of padded rows), k contiguous, sin a view of wider
    rows than cos: every tensor is read (and the caches written) by its own token and head strides, as the torch
    rotation and write_kv compute."""
    tokens, q_heads, kv_heads, head_dim = 3, 4, 2, 16
    q, k, cos, sin = inputs(tokens, q_heads, kv_heads, head_dim, dtype, dtype)
    padded_q = torch.randn(tokens, q_heads, head_dim + 8).to(TRITON_DEVICE, dtype)
    padded_q[..., 8:] = q
    q = padded_q[..., 8:]
    v = torch.randn(tokens, kv_heads, head_dim + 4).to(TRITON_DEVICE, dtype)[..., 4:]
    wide_sin = torch.randn(tokens, 1, 2 * head_dim).to(TRITON_DEVICE, dtype)
    wide_sin[..., :head_dim] = sin
    sin = wide_sin[..., :head_dim]
    padded_pool = torch.full((2, 3, 4, kv_heads, head_dim + 8), float("nan"), dtype=dtype, device=TRITON_DEVICE)
    pool = padded_pool[..., :head_dim]
    assert q.stride(1) != k.stride(1) and v.stride()[:2] != k.stride()[:2] and sin.stride(0) != cos.stride(0)
    assert pool[0].stride(2) != head_dim
    slots = torch.tensor([9, 0, 4], device=TRITON_DEVICE)
    assert_rotates_and_stores_as_torch(q, k, cos, sin, v, pool, slots)
