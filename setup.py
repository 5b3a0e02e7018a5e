"""Builds fastalign's compiled extensions.

- `fastalign._C`: every C++ file under csrc/ (except csrc/cuda/), plain pybind11, built on every machine.
- `fastalign._cuda`: the sources under csrc/cuda/ (.cu and their .cpp bindings), built only where a CUDA
  build of torch and nvcc are present (install with `--no-build-isolation` so that torch is visible);
  skipped cleanly everywhere else.
Either is omitted while it has no sources.
"""
import glob
import os

from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import find_packages, setup


def _sources(pattern):
    return sorted(glob.glob(os.path.join("csrc", pattern), recursive=True))


def cpp_extensions():
    sources = [s for s in _sources("**/*.cpp") if not s.startswith(os.path.join("csrc", "cuda", ""))]
    if not sources:
        return []
    return [Pybind11Extension("fastalign._C", sources, include_dirs=["csrc"], cxx_std=17,
                              extra_compile_args=["-O3"])]


def cuda_extensions():
    """The CUDA extension and torch's build_ext, or ([], None) where CUDA cannot be built here."""
    sources = _sources("cuda/**/*.cu") + _sources("cuda/**/*.cpp")
    if not sources:
        return [], None
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError:
        return [], None
    if torch.version.cuda is None or CUDA_HOME is None:
        return [], None
    ext = CUDAExtension("fastalign._cuda", sources, include_dirs=[os.path.abspath("csrc")],
                        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "--use_fast_math"]})
    return [ext], BuildExtension


cuda_exts, cuda_build_ext = cuda_extensions()
setup(
    # kernels/ is mapped onto fastalign.kernels by package-dir in pyproject.toml; the demo's assets folder holds
    # data only and is listed as a package of its own, which is how setuptools wants package data folders.
    packages=find_packages(include=["fastalign", "fastalign.*"]) + ["fastalign.kernels", "fastalign.demo.assets"],
    ext_modules=cpp_extensions() + cuda_exts,
    cmdclass={"build_ext": cuda_build_ext or build_ext},
)
