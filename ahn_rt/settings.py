"""Every environment switch of ahn_rt, read here and nowhere else in Python (the README lists them).

This module uses only the standard library, so that setup.py can read it without importing torch.

| variable             | read by                | values (default first)                                          |
|----------------------|------------------------|-----------------------------------------------------------------|
| AHN_RT_BACKEND       | ahn_rt.ops, at import  | auto: compiled ops where built; ref: pure-torch references;     |
|                      |                        | ext: compiled ops or an error                                   |
| AHN_RT_GRAPH         | ahn_rt.graph           | 1: capture the CUDA decode step in a graph; 0: eager steps      |
| AHN_RT_CUDA          | setup.py (build)       | unset: CUDA kernels when torch has CUDA and nvcc is found;      |
|                      |                        | 0: CPU-only build; 1: CUDA build or an error                    |
| AHN_RT_PREFILL_CUDNN | ahn_rt.ops, each call  | 1: a whole chunk's unmasked blocks through cuDNN, in key blocks |
|                      | (and at load)          | of a fixed ladder whose plans are built at load (per thread);   |
|                      |                        | 0: FlashAttention-2 for every block of prefill attention        |
| AHN_RT_PREFILL_BAND  | ahn_rt.ops, each call  | 1: a chunk past the window's fill point attends its window in   |
|                      | (and at load)          | one cuDNN band call over a linear copy of its keys (where built |
|                      |                        | and warmed), the sinks apart; 0: the ladder above for every one |
| AHN_RT_DECODE_FORK   | ahn_rt.model, each     | 1: in a captured CUDA decode graph, each layer's memory step on |
|                      | graph capture (and at  | a second stream beside the window attention, its term added by  |
|                      | load)                  | o_proj's GEMV on load (same bits); 0: serial (a bench A/B)      |
| AHN_RT_TRAIN_ATTENTION                        | auto: FlexAttention (compiled) for the training student's       |
|                      | ahn_rt.train.attention | window on CUDA, SDPA query blocks elsewhere; sdpa; flex (on the |
|                      | (each window plan)     | CPU eager and forward-only: for checks)                         |
| AHN_RT_GEMV_PDL      | CUDA gemv, every call  | unset: programmatic dependent launch for the decode step's      |
|                      |                        | GEMVs (static weights) only; 0: never; 1: every call (A/B)      |
| AHN_RT_GEMV_SIMT     | CUDA gemv, every call  | 0; 1: bf16 / fp16 on the CUDA-core kernel (a bench A/B)         |
| AHN_RT_GEMV_X_UNSTAGED                        | 0; 1: the tensor-core kernel never stages the normalized x in   |
|                      | CUDA gemv, every call  | shared memory; each warp normalizes its own (a bench A/B)       |
| AHN_RT_DECODE_PDL    | CUDA decode_prep,      | 1: those kernels launch with programmatic dependent launch      |
|                      | swa_decode, gdn_decode | (each waits first); 0: plain launches (a bench A/B)             |
|                      | once                   |                                                                 |
| AHN_RT_GDN_GENERIC   | CUDA gdn_decode, once  | 0; 1: force the generic kernel (an A/B switch for benches)      |
| AHN_RT_GDN_SCAN_SIMT | CUDA gdn_chunk_scan,   | 0; 1: the CUDA-core float32 scan where the tensor-core one      |
|                      | once                   | would run (Dk a multiple of 16; an A/B switch for benches)      |

The last six are kernel A/B switches that the C++ side reads: AHN_RT_GEMV_PDL in csrc/host/gemv.cpp (unset
and empty differ from 0 there), the other five through ``env_flag`` (csrc/common.h); ``kernel_flag`` reads
them as ``env_flag`` does, for benchmarks that label their rows. They take 0, 1 or nothing (unset or empty:
the default); ``check`` refuses any other value, which the C++ side would read as on.
"""
from __future__ import annotations

import os

try:
    from .errors import AhnError as _Base   # inside the package: a bad switch is a user's mistake (one line)
except ImportError:                           # setup.py runs this file alone (runpy), outside the package
    _Base = ValueError

_CHOICES = {
    "AHN_RT_BACKEND": ("auto", "ref", "ext"),
    "AHN_RT_GRAPH": ("1", "0"),
    "AHN_RT_CUDA": ("", "0", "1"),
    "AHN_RT_PREFILL_CUDNN": ("1", "0"),
    "AHN_RT_PREFILL_BAND": ("1", "0"),
    "AHN_RT_DECODE_FORK": ("1", "0"),
    "AHN_RT_TRAIN_ATTENTION": ("auto", "sdpa", "flex"),
}


# env_flag's (on/off); those of _KERNEL_FLAGS_ON are on when unset or empty, the others off
_KERNEL_FLAGS = ("AHN_RT_GEMV_SIMT", "AHN_RT_GEMV_X_UNSTAGED", "AHN_RT_DECODE_PDL", "AHN_RT_GDN_GENERIC",
                 "AHN_RT_GDN_SCAN_SIMT")
_KERNEL_FLAGS_ON = ("AHN_RT_DECODE_PDL",)
# every kernel switch (the on/off ones and AHN_RT_GEMV_PDL) takes 0, 1 or nothing (unset or empty: its
# default); the C++ side would read any other value ("false", "off") as on, so they are refused here
KERNEL_SWITCHES = _KERNEL_FLAGS + ("AHN_RT_GEMV_PDL",)
_FLAG_VALUES = ("", "0", "1")


class SettingsError(_Base):
    """A switch set to a value it does not take (one line). An ``AhnError`` (errors.py is standard library
    only too), so every command line prints it as "error: ..." and exits 2."""


def _read(name: str) -> str:
    if name in KERNEL_SWITCHES:   # read as the C++ side reads it: no stripping
        value, allowed = os.environ.get(name, ""), _FLAG_VALUES
    else:
        value, allowed = os.environ.get(name, _CHOICES[name][0]).strip(), _CHOICES[name]
    if value not in allowed:
        raise SettingsError(f"{name}={value!r} is not one of {', '.join(v or 'unset' for v in allowed)}")
    return value


def check(*names: str):
    """SettingsError (one line) when one of these switches (names of the table above: ``_CHOICES`` keys or
    ``KERNEL_SWITCHES``) has a value it does not take: for commands that check their switches before any
    work."""
    for name in names:
        _read(name)


def backend() -> str:
    """AHN_RT_BACKEND: 'auto', 'ref' or 'ext'."""
    return _read("AHN_RT_BACKEND")


def graphs_enabled() -> bool:
    """AHN_RT_GRAPH: capture the CUDA decode step (default) or run it eagerly."""
    return _read("AHN_RT_GRAPH") == "1"


def prefill_cudnn() -> bool:
    """AHN_RT_PREFILL_CUDNN: cuDNN for the unmasked blocks of prefill attention (default; those of the shapes
    warmed at load: ops.warm_prefill_attention), or FlashAttention-2 alone."""
    return _read("AHN_RT_PREFILL_CUDNN") == "1"


def prefill_band() -> bool:
    """AHN_RT_PREFILL_BAND: whole chunks in one cuDNN band call where one applies (the default, where built and
    warmed: ops.warm_prefill_attention): a chunk whose every window lies past the sinks over a linear copy of
    its keys (its sinks a second call), a chunk that fills the cache in order over the cache itself; or every
    chunk through the ladder of AHN_RT_PREFILL_CUDNN (0)."""
    return _read("AHN_RT_PREFILL_BAND") == "1"


def decode_fork() -> bool:
    """AHN_RT_DECODE_FORK: in a captured CUDA decode graph, run each layer's memory step on a second stream
    beside the window attention, its term added by o_proj's GEMV (default; the same bits as the serial
    step), or serially (0)."""
    return _read("AHN_RT_DECODE_FORK") == "1"


def train_attention() -> str:
    """AHN_RT_TRAIN_ATTENTION: 'auto', 'sdpa' or 'flex' (the student's window attention in training)."""
    return _read("AHN_RT_TRAIN_ATTENTION")


def build_cuda() -> str:
    """AHN_RT_CUDA for setup.py: '' (auto), '0' or '1'."""
    return _read("AHN_RT_CUDA")


def kernel_flag(name: str) -> bool:
    """An on/off kernel A/B switch (one of ``_KERNEL_FLAGS``), as csrc/common.h env_flag reads it. Not
    AHN_RT_GEMV_PDL: unset, 0 and 1 are three settings there."""
    if name not in _KERNEL_FLAGS:
        raise KeyError(name)
    v = _read(name)
    return name in _KERNEL_FLAGS_ON if v == "" else v == "1"
