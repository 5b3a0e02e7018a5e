"""The fused-loss kernels build for an H100/H200 (sm_90) in every autotuning configuration, without a GPU.

The interpreter that runs them in CPU tests never compiles them; this catches what only the compiler sees
(unsupported ops, tile shapes that do not lower, shared memory beyond the 227 KiB an sm_90 block can have,
fp32 dots lowered to TF32).
"""
from tests.kernels.sm90_build import assert_builds_for_sm90

COMPILE_FOR_SM90 = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from fastalign.kernels import linear_cross_entropy as ce, linear_kl_div as kl

SM90_SHARED_MEMORY = 227 * 1024

def compile_config(tuner, pointers, constants, config):
    constants = {**constants, **config.kwargs}
    signature = {name: "constexpr" if name in constants else pointers.get(name, "i32") for name in tuner.fn.arg_names}
    return triton.compile(ASTSource(tuner.fn, signature, constants), target=GPUTarget("cuda", 90, 32),
                          options={"num_warps": config.num_warps, "num_stages": config.num_stages})

# bf16 in every configuration; fp32 in the smallest one, which the autotuner keeps as the one that always fits
for dtype in ("bf16", "fp32"):
    x = "*" + dtype
    stats = dict(lse_ptr="*fp32", ref_lse_ptr="*fp32", scale_ptr="*fp32", split_stats_ptr="*fp32",
                 target_logit_ptr="*fp32", target_ptr="*i64")
    cases = [
        (ce._forward_kernel, dict(x_ptr=x, w_ptr=x, b_ptr=x, **stats), dict(HAS_BIAS=True)),
        (ce._gradient_kernel, dict(x_ptr=x, w_ptr=x, b_ptr=x, g_ptr=x, **stats), dict(HAS_BIAS=True)),
        (kl._forward_kernel, dict(x_ptr=x, w_ptr=x, xr_ptr=x, wr_ptr=x, **stats),
         dict(SHARED_WEIGHT=False, EXPM1_SERIES_LIMIT=0.5)),
        (kl._gradient_kernel, dict(x_ptr=x, w_ptr=x, xr_ptr=x, wr_ptr=x, g_ptr=x, **stats), dict(SHARED_WEIGHT=True)),
    ]
    for tuner, pointers, constants in cases:
        for config in tuner.configs if dtype == "bf16" else tuner.configs[-1:]:
            compiled = compile_config(tuner, pointers, constants, config)
            assert compiled.metadata.shared <= SM90_SHARED_MEMORY, (tuner.fn.__name__, config, compiled.metadata.shared)
            # input_precision="ieee" is invisible in the interpreter: only the build shows fp32 dots kept off TF32
            assert dtype == "bf16" or "tf32" not in compiled.asm["ptx"], (tuner.fn.__name__, "fp32 dots use TF32")
"""


def test_kernels_compile_for_sm90_without_a_gpu():
    assert_builds_for_sm90(COMPILE_FOR_SM90)
