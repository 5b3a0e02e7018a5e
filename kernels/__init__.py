"""Triton kernels of fastalign, one file per kernel family, installed as `fastalign.kernels`.

Each kernel family's module (linear_cross_entropy, linear_kl_div, paged_attention) holds the @triton.jit kernels
and the host-side launchers that the ops in `fastalign.ops` dispatch to (rms_norm, rotary and gated_activation: those
that the paged model runner calls, `fastalign.runtime.rms_norms`, `.rotary` and `.gated_mlps`, rms_norm and
gated_activation also those of the training ops `fastalign.ops.rms_norm` and `.gated_linear`; kahan_adamw: the step
of `fastalign.KahanAdamW`);
linear_softmax_tiles, chunked_backward and device_guard are parts they share, interpreter_fixes serves the CPU
interpreter. Importing a module here requires triton.
Every launch passes enable_fp_fusion (True: multiply-adds contracted to FMA; False in the rotary and Kahan AdamW
kernels, which round as torch's separate multiply and add do): Triton 3.9 warns when it is left unset and Triton 3.10
turns it off by default, which would change the kernels' rounding and speed.

Python run from a checkout's root (`python -m pytest`, `python -m fastalign`) has the root on sys.path, where
this folder is found first as a top-level package named `kernels`: the name of Hugging Face's kernels package,
which transformers >= 5.25 imports with its models. Imported under that name, this package puts the installed
package of that name in its place, so that a checkout does not shadow it.
"""
import importlib.machinery
import importlib.util
import os
import sys


def _installed_package_named(name):
    """The spec of the package `name` that the import system finds when this checkout's root is not searched."""
    root = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))
    elsewhere = [entry for entry in sys.path if os.path.realpath(entry or os.curdir) != root]
    for finder in sys.meta_path:
        if not hasattr(finder, "find_spec"):
            continue
        spec = finder.find_spec(name, elsewhere if finder is importlib.machinery.PathFinder else None)
        if spec is not None and spec.origin not in (None, __file__):
            return spec
    return None


if __name__ == "kernels":
    installed = _installed_package_named(__name__)
    if installed is not None:
        sys.modules[__name__] = importlib.util.module_from_spec(installed)
        installed.loader.exec_module(sys.modules[__name__])
elif os.environ.get("TRITON_INTERPRET") == "1":
    from .interpreter_fixes import one_launch_at_a_time, round_bf16_casts, squeeze_loop_bounds, upcast_bf16_dots

    squeeze_loop_bounds()
    upcast_bf16_dots()
    round_bf16_casts()
    one_launch_at_a_time()
