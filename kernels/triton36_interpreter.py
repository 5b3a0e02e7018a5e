"""Loop bounds from kernel scalars under Triton 3.6's interpreter with numpy >= 2.4.

The interpreter holds a kernel scalar (an int argument, a program id and anything computed from them) as a
one-element array and turns it into a Python int with int(array). numpy 2.4 refuses that for arrays of one
dimension, so `range(start, end, step)` over kernel scalars, which every kernel here uses, fails with
"only 0-dimensional arrays can be converted to Python scalars". Triton 3.7 squeezes the array first; this
does the same on older releases (the GPU image ships Triton 3.6 with a newer numpy). Compiled kernels are
not concerned.
"""
import numpy as np
import triton
from triton.runtime import interpreter


def _needs_squeeze():
    major, minor = (int(part) for part in triton.__version__.split(".")[:2])
    try:
        int(np.ones(1))
    except TypeError:
        return (major, minor) < (3, 7)
    return False


def squeeze_loop_bounds():
    """Makes the interpreter's tensors convert to an index through a squeezed array (idempotent)."""
    original = interpreter._patch_lang_tensor
    if not _needs_squeeze() or getattr(original, "squeezes_scalars", False):
        return

    def patch_lang_tensor(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    patch_lang_tensor.squeezes_scalars = True
    interpreter._patch_lang_tensor = patch_lang_tensor
