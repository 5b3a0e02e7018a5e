"""The fused-loss kernels build for an H100/H200 (sm_90) in every autotuning configuration, without a GPU.

The interpreter that runs them in CPU tests never compiles them; this catches what only the compiler sees
(unsupported ops, tile shapes that do not lower, shared memory beyond the 227 KiB an sm_90 block can have,
register spills, main loops whose loads are not pipelined, fp32 dots lowered to TF32). The kernels' FROM_BUFFER
builds (grads_in_forward's, which read logits from a buffer instead of taking dots) are checked for shared memory and
spills, as built for a vocabulary that is not a multiple of 16 (GPT-2's 50257: V and the gradient chunk's row stride
unaligned). The bf16 configurations also build for Blackwell (a B200's sm_100, an RTX 50's sm_120), within its block's
shared memory and with their dots on its tensor cores; the tiles are tuned for sm_90, and on Blackwell some of the
forward's spill a few registers.
"""
from tests.kernels.gpu_build import assert_builds

COMPILE_FOR_SM90 = """
from fastalign.kernels import linear_cross_entropy as ce, linear_kl_div as kl
from fastalign.kernels.linear_softmax_tiles import _SMALL_TILE
from tests.kernels.gpu_build import (SHARED_MEMORY_PER_BLOCK, build_for_gpu, check_build, stack_bytes,
                                    uses_tensor_cores)

# bf16 in every configuration; fp32 in the smallest one, which the autotuner keeps as the one that always fits
for dtype in ("bf16", "fp32"):
    x = "*" + dtype
    stats = dict(lse_ptr="*fp32", ref_lse_ptr="*fp32", scale_ptr="*fp32", split_stats_ptr="*fp32",
                 target_logit_ptr="*fp32", target_ptr="*i64", softcap="fp32", smoothing="fp32", uniform="fp32",
                 z_ptr="*fp32", zr_ptr="*fp32")
    # with the logit soft cap (Gemma's), and the cross-entropy's label smoothing: the larger kernels, whose builds the
    # plain ones' are a part of
    cap = dict(HAS_SOFTCAP=True, FROM_BUFFER=False)
    smooth = dict(HAS_BIAS=True, HAS_SMOOTHING=True, **cap)
    cases = [
        (ce._forward_kernel, dict(x_ptr=x, w_ptr=x, b_ptr=x, **stats), smooth),
        (ce._gradient_kernel, dict(x_ptr=x, w_ptr=x, b_ptr=x, g_ptr=x, **stats), smooth),
        (kl._forward_kernel, dict(x_ptr=x, w_ptr=x, b_ptr=x, xr_ptr=x, wr_ptr=x, br_ptr=x, **stats),
         dict(SHARED_WEIGHT=False, HAS_BIAS=True, HAS_REF_BIAS=True, EXPM1_SERIES_LIMIT=0.5, **cap)),
        (kl._gradient_kernel, dict(x_ptr=x, w_ptr=x, b_ptr=x, xr_ptr=x, wr_ptr=x, br_ptr=x, g_ptr=x, **stats),
         dict(SHARED_WEIGHT=True, HAS_BIAS=True, HAS_REF_BIAS=True, **cap)),
    ]
    for tuner, types, constants in cases:
        for config in tuner.configs if dtype == "bf16" else tuner.configs[-1:]:
            kernel = (tuner.fn, types, {**constants, **config.kwargs}, config.num_warps, config.num_stages)
            compiled = build_for_gpu(*kernel)
            what = (tuner.fn.__module__, tuner.fn.__name__, dtype, config.kwargs, config.num_warps, config.num_stages)
            # the tile shapes are tuned for 16-bit inputs, the small tile for fp32 (whose dots run on FMA units)
            small = (*config.kwargs.values(), config.num_warps, config.num_stages) == _SMALL_TILE
            assert dtype == "fp32" or uses_tensor_cores(compiled), (what, "bf16 dots off the tensor cores")
            check_build(compiled, what, tuned=small == (dtype == "fp32"))
            # input_precision="ieee" is invisible in the interpreter: only the build shows fp32 dots kept off TF32
            assert dtype == "bf16" or "tf32" not in compiled.asm["ptx"], (what, "fp32 dots use TF32")
            if small:  # the configuration that always launches, also on an A100 or an L4 (sm_89)
                for capability in (80, 89):
                    check_build(build_for_gpu(*kernel, capability), what, tuned=False, capability=capability)
            if dtype == "bf16":   # Blackwell's builds (sm_100: tcgen05 MMA): tuned on sm_90 alone, so spills allowed
                for capability in (100, 120):
                    compiled = build_for_gpu(*kernel, capability)
                    assert uses_tensor_cores(compiled), (what, capability, "bf16 dots off the tensor cores")
                    check_build(compiled, what, tuned=False, capability=capability)
            if dtype == "bf16":   # the same kernel reading its logits from fp32 buffers (no dots, no K loop), at a
                # vocabulary that is not a multiple of 16 (GPT-2's 50257), in buffers whose rows are padded to one
                buffered = (tuner.fn, types, {**kernel[2], "FROM_BUFFER": True}, config.num_warps, config.num_stages)
                compiled = build_for_gpu(*buffered, unaligned=("V", "G_STRIDE"))
                assert compiled.metadata.shared <= SHARED_MEMORY_PER_BLOCK[90], (what, "FROM_BUFFER shared memory")
                # a register or two at most (Triton 3.9 spills 8 bytes in one configuration); unpadded, 1.5-5 KB
                assert stack_bytes(compiled) <= 16, (what, "FROM_BUFFER spills registers")
"""


def test_kernels_compile_for_sm90_without_a_gpu():
    assert_builds(COMPILE_FOR_SM90)
