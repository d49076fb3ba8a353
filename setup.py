"""Builds the compiled ops `ahn_rt._C`: a CUDAExtension (csrc/cuda/*.cu) when torch has CUDA and a CUDA
toolkit is found, else a CppExtension with the CPU kernels only. The build never needs a GPU.

    pip install --no-build-isolation -e .          # metadata in pyproject.toml
    AHN_RT_CUDA=0 pip install --no-build-isolation -e .   # force the CPU-only build (1 forces CUDA)
    TORCH_CUDA_ARCH_LIST="9.0" is the default for CUDA builds (H100 / H200).
"""
import glob
import os
import runpy

from setuptools import setup

import torch
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

ROOT = os.path.dirname(os.path.abspath(__file__))
# The environment switches are read in one place, ahn_rt/settings.py (standard library only).
SETTINGS = runpy.run_path(os.path.join(ROOT, "ahn_rt", "settings.py"))


def _use_cuda() -> bool:
    can = torch.version.cuda is not None and CUDA_HOME is not None
    env = SETTINGS["build_cuda"]()
    if env == "0":
        return False
    if env == "1":
        if not can:
            raise RuntimeError(
                f"AHN_RT_CUDA=1 but torch {torch.__version__} has no CUDA (torch.version.cuda="
                f"{torch.version.cuda}) or no CUDA toolkit was found (CUDA_HOME={CUDA_HOME})")
        return True
    return can


def _extensions():
    rel = lambda pattern: sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))
    sources = rel("csrc/*.cpp") + rel("csrc/host/*.cpp") + rel("csrc/cpu/*.cpp")
    cxx = ["-O3", "-std=c++17"]
    if not _use_cuda():
        print("ahn_rt: building the CPU-only extension")
        return [CppExtension("ahn_rt._C", sources, extra_compile_args={"cxx": cxx})]
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")
    print(f"ahn_rt: building the CUDA extension for TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']}")
    nvcc = ["-O3", "-std=c++17", "--expt-relaxed-constexpr", "-lineinfo"]
    return [CUDAExtension("ahn_rt._C", sources + rel("csrc/cuda/*.cu"), define_macros=[("AHN_RT_WITH_CUDA", None)],
                          extra_compile_args={"cxx": cxx, "nvcc": nvcc})]


setup(
    name="ahn_rt",
    packages=["ahn_rt"],
    ext_modules=_extensions(),
    cmdclass={"build_ext": BuildExtension},
)
