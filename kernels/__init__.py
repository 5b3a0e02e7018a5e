"""Triton kernels of fastalign, one file per kernel family, installed as `fastalign.kernels`.

Each kernel family's module (linear_cross_entropy, linear_kl_div, paged_attention) holds the @triton.jit kernels
and the host-side launchers that the ops in `fastalign.ops` dispatch to; linear_softmax_tiles, chunked_backward
and device_guard are parts they share, interpreter_fixes serves the CPU interpreter. Importing a module here
requires triton.
Every launch passes enable_fp_fusion=True (multiply-adds contracted to FMA): Triton 3.9 warns when it is left
unset and Triton 3.10 turns it off by default, which would change the kernels' rounding and speed.
"""
import os

if os.environ.get("TRITON_INTERPRET") == "1":
    from .interpreter_fixes import one_launch_at_a_time, squeeze_loop_bounds, upcast_bf16_dots

    squeeze_loop_bounds()
    upcast_bf16_dots()
    one_launch_at_a_time()
