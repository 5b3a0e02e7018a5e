"""Building Triton kernels for NVIDIA GPUs (an H100/H200, sm_90, first) on a machine without a GPU.

The interpreter that runs the kernels in CPU tests never compiles them; a build with the wheel's ptxas
catches what only the compiler sees. Kernels are built as a launch at the shapes that matter specialises
them: every pointer (torch allocations are 16-byte aligned) and every integer argument that the kernel lets
Triton specialise carries the multiple-of-16 hint (at Llama-3-8B's H 4096, V 128256 and 16-row tiles all of
them are). Only with those hints are loads vectorised and software-pipelined, which sets the registers and
the shared memory that a GPU run gets. The build runs in a fresh process, outside the interpreter:
assert_builds(script) runs a script that calls build_for_gpu and check_build.
"""
import os
import re
import subprocess
import sys
import tempfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# The most shared memory one block can have, by compute capability: H100/H200, A100, L4/RTX 4090 (and sm_86),
# B200/GB200, RTX 50 series/RTX PRO Blackwell.
SHARED_MEMORY_PER_BLOCK = {90: 227 * 1024, 80: 163 * 1024, 89: 99 * 1024, 100: 227 * 1024, 120: 99 * 1024}


def assert_builds(script):
    """Runs `script` in a fresh process without TRITON_INTERPRET; fails with the end of its stderr if it
    does not exit cleanly."""
    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", script], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]


def build_for_gpu(kernel, types, constants, num_warps, num_stages, capability=90, enable_fp_fusion=True,
                  unaligned=()):
    """triton.compile of `kernel` (a JITFunction) for sm_`capability`, with the FMA contraction its launches set.
    `types` maps pointer arguments to "*bf16" etc. and float scalars to "fp32"; other arguments not in `constants`
    are i32. `unaligned` names i32 arguments to build without the multiple-of-16 hint, as a launch where they are
    not multiples of 16 (a vocabulary of 32001) builds them."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature = {name: "constexpr" if name in constants else types.get(name, "i32") for name in kernel.arg_names}
    unspecialised = set(kernel.do_not_specialize) | set(unaligned)
    hinted = [i for i, name in enumerate(kernel.arg_names)
              if signature[name].startswith("*") or (signature[name] == "i32" and name not in unspecialised)]
    options = {"num_warps": num_warps, "num_stages": num_stages, "enable_fp_fusion": enable_fp_fusion}
    return triton.compile(ASTSource(kernel, signature, constants, {(i,): [["tt.divisibility", 16]] for i in hinted}),
                          target=GPUTarget("cuda", capability, 32), options=options)


def stack_bytes(compiled):
    """The per-thread stack frame of the built kernel (register spills land there), read with cuobjdump."""
    from triton import knobs

    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(compiled.asm["cubin"])
        path = f.name
    try:
        usage = subprocess.run([knobs.nvidia.cuobjdump.path, "--dump-resource-usage", path], capture_output=True,
                               text=True, check=True).stdout
    finally:
        os.remove(path)
    return int(re.search(r"STACK:(\d+)", usage).group(1))


def check_build(compiled, what, *, tuned, capability=90):
    """Shared memory within what a block of sm_`capability` can have; for a `tuned` build (one meant to be
    fast on a GPU) also no register spills and a main loop whose global loads are copied asynchronously."""
    limit = SHARED_MEMORY_PER_BLOCK[capability]
    assert compiled.metadata.shared <= limit, (what, f"sm_{capability} shared memory", compiled.metadata.shared)
    if tuned:
        assert stack_bytes(compiled) == 0, (what, "spills registers")
        assert "async_copy_global_to_local" in compiled.asm["ttgir"], (what, "global loads are not pipelined")


def uses_tensor_cores(compiled):
    """Whether every dot of the build runs on the tensor cores: its result has an MMA layout (mma.sync, or an H100's
    warp-group wgmma), not a blocked one, or it became a B200's tcgen05 MMA (tc_gen5_mma, accumulating in tensor
    memory). A 16-bit dot that Triton cannot put there runs on the FMA units, many times slower, with the same
    results."""
    dots = [line for line in compiled.asm["ttgir"].splitlines()
            if re.search(r"(= (tt\.dot|ttng\.warp_group_dot)|ttng\.tc_gen5_mma) ", line)]
    return bool(dots) and all("ttng.tc_gen5_mma " in line or re.search(r"-> tensor<[^<>]*, #mma\d*>", line)
                              for line in dots)
