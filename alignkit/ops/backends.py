"""Backend resolution and the optional compiled module.

"auto" picks, per device: CUDA -> "triton" (when triton imports, else "torch"), CPU -> "cpp" when
alignkit._C loaded, else "torch". Forcing a backend that cannot run raises; "triton" on CPU
tensors runs under the Triton interpreter when TRITON_INTERPRET=1 is set.
"""
from __future__ import annotations

import os
import warnings

import torch

try:  # built from csrc/ by setup.py; optional so that a machine without a compiler still works
    from alignkit import _C as _cpp
    _CPP_ERROR = None
except ImportError as exc:  # pragma: no cover - exercised only where the build failed
    _cpp = None
    _CPP_ERROR = exc

_warned = False


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def cpp_module():
    return _cpp


def cpp_available() -> bool:
    return _cpp is not None


def _warn_no_cpp():
    global _warned
    if not _warned:
        _warned = True
        warnings.warn(
            f"alignkit: the C++ extension alignkit._C could not be loaded ({_CPP_ERROR}); "
            "the CPU path falls back to the slower torch backend. Reinstall with a C++17 "
            "compiler (`pip install -e .`) to build it.",
            RuntimeWarning,
            stacklevel=3,
        )


def resolve(backend: str, device: torch.device) -> str:
    """Returns the concrete backend ("torch" or "cpp") for tensors on `device`."""
    if backend == "triton":
        if not triton_available():
            raise RuntimeError("backend='triton' needs the triton package "
                               "(pip install 'alignkit[triton]')")
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError(f"backend='triton' runs on CUDA tensors, or on CPU tensors under "
                             f"TRITON_INTERPRET=1 (the interpreter); got tensors on {device}")
        return "triton"
    if backend == "auto" and device.type == "cuda" and triton_available():
        return "triton"
    if backend == "cpp":
        if device.type != "cpu":
            raise ValueError(f"backend='cpp' runs on CPU tensors only, got tensors on {device}")
        if _cpp is None:
            raise RuntimeError(f"backend='cpp' requested but alignkit._C is not built: {_CPP_ERROR}")
        return "cpp"
    if backend == "torch":
        return "torch"
    # auto
    if device.type == "cpu" and os.environ.get("ALIGNKIT_DISABLE_CPP") != "1":
        if _cpp is not None:
            return "cpp"
        _warn_no_cpp()
    return "torch"
