"""Four defects of Triton's CPU interpreter (TRITON_INTERPRET=1) that would keep it from computing what a GPU
computes with our kernels; kernels/__init__.py applies all four fixes, only under the interpreter. Compiled kernels
are not concerned.

- Loop bounds from kernel scalars (Triton < 3.7 with numpy >= 2.4). The interpreter holds a kernel scalar (an
  int argument, a program id and anything computed from them) as a one-element array and turns it into a
  Python int with int(array). numpy 2.4 refuses that for arrays of one dimension, so `range(start, end, step)`
  over kernel scalars, which every kernel here uses, fails with "only 0-dimensional arrays can be converted to
  Python scalars". Triton 3.7 squeezes the array first; `squeeze_loop_bounds` does the same on older releases
  (the GPU image ships Triton 3.6 with a newer numpy).
- bf16 dots (every release up to 3.9 at least). numpy has no bfloat16, so the interpreter holds bf16 tensors as
  their uint16 bit patterns, and its tl.dot multiplies those integers: the result is garbage. `upcast_bf16_dots`
  converts bf16 operands to fp32 first, which is what the tensor cores compute (exact products of bf16 values,
  accumulated in fp32), so that the kernels' bf16 paths are tested on the CPU too.
- fp32 -> bf16 casts (every release up to 3.9 at least) drop the bits past bf16's mantissa, where a GPU (and torch)
  rounds to the nearest even: half of all casts came out one unit lower in magnitude. `round_bf16_casts` rounds them
  through torch, so that a kernel that rounds as torch's ops do (kernels/rms_norm.py, kernels/rotary.py) is held to
  their outputs on the CPU too.
- Launches from several threads (Triton 3.9 at least). A launch patches triton.language for its run
  and puts it back after, and sets the program id on one builder shared by every launch: a launch overlapping
  another ran with the language unpatched ("Did you forget to add @triton.jit ?") or with the other's program ids
  and grid (an error, or silently wrong outputs), and could leave the language patched. `one_launch_at_a_time`
  serialises launches.
"""
import functools
import threading

import numpy as np
import torch
import triton
import triton.language as tl
from triton.runtime import interpreter


def _needs_squeeze():
    major, minor = (int(part) for part in triton.__version__.split(".")[:2])
    try:
        int(np.ones(1))
    except TypeError:
        return (major, minor) < (3, 7)
    return False


def _replace_once(owner, name, mark, wrap):
    """owner.name becomes wrap(original), marked with the attribute `mark`; nothing where it already carries the mark,
    so that each fix is idempotent."""
    original = getattr(owner, name)
    if getattr(original, mark, False):
        return
    replacement = functools.wraps(original)(wrap(original))
    setattr(replacement, mark, True)
    setattr(owner, name, replacement)


def squeeze_loop_bounds():
    """Makes the interpreter's tensors convert to an index through a squeezed array (idempotent)."""
    if not _needs_squeeze():
        return

    def wrap(original):
        def patch_lang_tensor(tensor, scope):
            original(tensor, scope)
            scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))
        return patch_lang_tensor
    _replace_once(interpreter, "_patch_lang_tensor", "squeezes_scalars", wrap)


def upcast_bf16_dots():
    """Makes the interpreter's tl.dot take bf16 operands as their fp32 values (idempotent)."""
    def wrap(original):
        def create_dot(self, a, b, *rest):
            a, b = (self.cast_impl(x, tl.float32) if x.dtype.scalar == tl.bfloat16 else x for x in (a, b))
            return original(self, a, b, *rest)
        return create_dot
    _replace_once(interpreter.InterpreterBuilder, "create_dot", "upcasts_bf16", wrap)


def round_bf16_casts():
    """Makes the interpreter's fp32 -> bf16 casts round to the nearest even (idempotent)."""
    def wrap(original):
        def cast_impl(self, src, dst_type):
            if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
                values = torch.from_numpy(np.array(src.data, dtype=np.float32))
                return interpreter.TensorHandle(values.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16),
                                                dst_type.scalar)
            return original(self, src, dst_type)
        return cast_impl
    _replace_once(interpreter.InterpreterBuilder, "cast_impl", "rounds_bf16", wrap)


def one_launch_at_a_time():
    """Makes the interpreter run one kernel launch at a time, whichever thread launches it (idempotent)."""
    lock = threading.RLock()

    def wrap(original):
        def launch(self, *args, **kwargs):
            with lock:
                return original(self, *args, **kwargs)
        return launch
    _replace_once(interpreter.GridExecutor, "__call__", "one_at_a_time", wrap)
