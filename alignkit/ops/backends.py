"""Backend resolution and the optional compiled module.

"auto" picks, per device: CUDA -> "triton" (when triton imports, else "torch"), CPU -> "cpp" when
alignkit._C loaded, else "torch". Forcing a backend that cannot run raises; "triton" on CPU
tensors runs under the Triton interpreter when TRITON_INTERPRET=1 is set.
"""
from __future__ import annotations

import functools
import os
import warnings

import torch

from alignkit.ops.env import env_flag

try:  # built from csrc/ by setup.py; optional so that a machine without a compiler still works
    from alignkit import _C as _cpp
    _CPP_ERROR = None
except ImportError as exc:  # pragma: no cover - exercised only where the build failed
    _cpp = None
    _CPP_ERROR = exc

_warned = False


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset:
    """The CPU's feature flags (/proc/cpuinfo's first flags line; empty where unreadable)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cpu_has_bf16() -> bool:
    """The CPU has bf16 matrix units (avx512_bf16 or AMX): only there is a bf16 GEMM with fp32
    accumulation a candidate at all; without them bf16 matmul runs ~20x slower than fp32
    (bench/HISTORY.md, "bf16 on CPU")."""
    return bool({"avx512_bf16", "amx_bf16"} & cpu_flags())


def gemm_dtype(dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The dtype the head's GEMMs run in for inputs of `dtype` (accumulation is fp32 inside the
    GEMM either way): bf16/fp16 on CUDA; bf16 on CPUs with bf16 units; fp32 elsewhere."""
    if dtype == torch.float32 or dtype == torch.float64:
        return torch.float32
    if device.type == "cuda":
        return dtype
    if dtype == torch.bfloat16 and device.type == "cpu" and cpu_has_bf16():
        return torch.bfloat16
    return torch.float32


# the tensors of a head call that autocast would cast (a matmul's operands): weight, hidden and
# these keyword arguments
_HEAD_KWARGS = ("bias", "ref_hidden", "ref_weight")


def autocast_head(fn):
    """Runs a head front door (fn(hidden, weight, ...)) as torch.autocast would run the matmul
    inside it, the way torch.amp.custom_fwd(cast_inputs=dtype) runs an autograd.Function, with
    the dtype read at call time: under autocast for hidden's device, the floating fp32/bf16/fp16
    inputs are cast to the autocast dtype (F.linear's rule; float64 is left alone) and fn runs
    with autocast off, so its GEMMs run in that dtype with fp32 statistics, and no inner matmul
    is cast again. The casts are differentiable: an fp32 master weight gets an fp32 gradient.
    Without the cast, fp32 weights under bf16 autocast ran the whole head in fp32 (on a GPU, fp32
    dots on the CUDA cores), and bf16 hidden against an fp32 head was promoted to fp32."""
    @functools.wraps(fn)
    def run(hidden, weight, *args, **kwargs):
        dev = hidden.device.type if isinstance(hidden, torch.Tensor) else None
        if dev not in ("cpu", "cuda") or not torch.is_autocast_enabled(dev):
            return fn(hidden, weight, *args, **kwargs)
        dt = torch.get_autocast_dtype(dev)

        def cast(t):
            ok = isinstance(t, torch.Tensor) and t.dtype in (torch.float32, torch.bfloat16,
                                                              torch.float16)
            return t.to(dt) if ok and t.dtype != dt else t
        kwargs = {k: cast(v) if k in _HEAD_KWARGS else v for k, v in kwargs.items()}
        with torch.autocast(dev, enabled=False):
            return fn(cast(hidden), cast(weight), *args, **kwargs)
    return run


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
    if device.type == "cpu" and env_flag("ALIGNKIT_DISABLE_CPP") is not True:
        if _cpp is not None:
            return "cpp"
        _warn_no_cpp()
    return "torch"
