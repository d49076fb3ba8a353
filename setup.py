"""Builds the compiled ops `ahn_rt._C`: a CUDAExtension (csrc/cuda/*.cu) when torch has CUDA and a CUDA
toolkit is found, else a CppExtension with the CPU kernels only. The build never needs a GPU.

    pip install --no-build-isolation -e .          # metadata in pyproject.toml
    AHN_RT_CUDA=0 pip install --no-build-isolation -e .   # force the CPU-only build (1 forces CUDA)
    TORCH_CUDA_ARCH_LIST="9.0" is the default for CUDA builds (H100 / H200).

A CUDA build also compiles the prefill's band attention through cuDNN (csrc/cuda/band_attention_cudnn.cpp)
where it finds cudnn-frontend's headers (`pip install nvidia-cudnn-frontend`) and cuDNN's headers and library
(the nvidia-cudnn package that torch's CUDA wheels install, or CUDNN_HOME); otherwise that op has its CPU
kernel only and the prefill runs its attention without it.
"""
import glob
import importlib.util
import os
import runpy
import sys

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


def _cudnn_frontend():
    """(include dirs, library dir) of cudnn-frontend and cuDNN 9, or None where either is missing."""
    fe = next((os.path.join(p, "include") for p in sys.path
               if os.path.isfile(os.path.join(p, "include", "cudnn_frontend.h"))), None)
    roots = [os.environ["CUDNN_HOME"]] if os.environ.get("CUDNN_HOME") else []
    spec = importlib.util.find_spec("nvidia.cudnn") if importlib.util.find_spec("nvidia") else None
    if spec is not None and spec.submodule_search_locations:
        roots += list(spec.submodule_search_locations)
    if CUDA_HOME:
        roots.append(CUDA_HOME)
    for root in roots:
        inc = os.path.join(root, "include")
        lib = next((os.path.join(root, d) for d in ("lib", "lib64")
                    if os.path.isfile(os.path.join(root, d, "libcudnn.so.9"))), None)
        if fe and lib and os.path.isfile(os.path.join(inc, "cudnn.h")):
            return [fe, inc], lib
    print(f"ahn_rt: no band attention through cuDNN (cudnn-frontend headers: {fe or 'not found'}; cuDNN 9 "
          f"headers and library: not found under {roots or 'any root'})")
    return None


def _extensions():
    rel = lambda pattern: sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))
    sources = rel("csrc/*.cpp") + rel("csrc/host/*.cpp") + rel("csrc/cpu/*.cpp")
    cxx = ["-O3", "-std=c++17"]
    # Where the toolchain links its C++ runtime statically (some do, e.g. the H100 machine's gcc 13 wrapper),
    # that copy's symbols would be exported and bound to the shared libstdc++ that torch loads: a mix of two
    # runtimes' locale data, which crashed cudnn-frontend's first stringstream. Kept local, each is whole.
    link = ["-Wl,--exclude-libs,ALL"]
    if not _use_cuda():
        print("ahn_rt: building the CPU-only extension")
        return [CppExtension("ahn_rt._C", sources, extra_compile_args={"cxx": cxx}, extra_link_args=link)]
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")
    print(f"ahn_rt: building the CUDA extension for TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']}")
    nvcc = ["-O3", "-std=c++17", "--expt-relaxed-constexpr", "-lineinfo"]
    macros, include_dirs = [("AHN_RT_WITH_CUDA", None)], []
    cudnn = _cudnn_frontend()
    if cudnn:
        include_dirs, lib = cudnn
        print(f"ahn_rt: band attention through cuDNN (headers {include_dirs}; cuDNN {lib}, loaded at run time)")
        sources += rel("csrc/cuda/*.cpp")
        # cudnn-frontend reaches cuDNN (torch's copy), the CUDA runtime and NVRTC through dlopen, so the
        # extension links none of them
        macros += [("AHN_RT_WITH_CUDNN_FE", None), ("CUDNN_FRONTEND_SKIP_JSON_LIB", None),
                   ("NV_CUDNN_FRONTEND_USE_DYNAMIC_LOADING", None)]
        link += ["-ldl"]
    return [CUDAExtension("ahn_rt._C", sources + rel("csrc/cuda/*.cu"), define_macros=macros,
                          include_dirs=include_dirs, extra_link_args=link,
                          extra_compile_args={"cxx": cxx, "nvcc": nvcc})]


# name, version and packages come from pyproject.toml alone (a list here disagreed with it)
setup(
    ext_modules=_extensions(),
    cmdclass={"build_ext": BuildExtension},
)
