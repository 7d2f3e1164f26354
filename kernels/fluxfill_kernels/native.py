"""The optional native kernel library: ``kernels/csrc`` built by CMake into ``fluxfill_kernels/_C*.so``.

It defines ops in the ``fluxfill_native`` namespace (``fill_cond``, ``qk_norm_rope``) with C++ CPU
kernels, and CUDA kernels when torch has CUDA. The ``fluxfill`` ops call them when the library is
present (preferred on CPU), so a deployment that must not JIT-compile Triton still gets fused kernels.
The package works without it. ``FLUXFILL_NATIVE=0`` disables loading.

On CUDA the ``fluxfill`` ops run Triton unless ``FLUXFILL_CUDA_KERNELS=native`` (or triton is not
installed) and the library has a CUDA kernel for the op: that is the cold-start deployment, which must
not JIT-compile Triton.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch

_loaded: bool | None = None


def library_path() -> Path | None:
    """The built library inside the package folder, if any."""
    candidates = sorted(Path(__file__).parent.glob("_C*.so"))
    return candidates[0] if candidates else None


def load(path: str | Path | None = None) -> bool:
    """Load the library once (from ``path`` or the package folder); whether it is loaded."""
    global _loaded
    if _loaded and path is None:
        return True
    if os.environ.get("FLUXFILL_NATIVE", "1") == "0":
        _loaded = False
        return False
    path = Path(path) if path is not None else library_path()
    if path is None:
        _loaded = False
        return False
    torch.ops.load_library(str(path))
    _loaded = True
    return True


def available(op: str, device_type: str = "cpu") -> bool:
    """Whether ``torch.ops.fluxfill_native.<op>`` has a kernel for ``device_type`` ("cpu" or "cuda")."""
    if _loaded is None:
        load()
    if not _loaded:
        return False
    key = {"cpu": "CPU", "cuda": "CUDA"}[device_type]
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"fluxfill_native::{op}", key)


def use_native_on_cuda(op: str) -> bool:
    """Whether the CUDA kernel of ``fluxfill::<op>`` should be the native one rather than Triton's."""
    wanted = os.environ.get("FLUXFILL_CUDA_KERNELS", "triton") == "native"
    no_triton = importlib.util.find_spec("triton") is None
    return (wanted or no_triton) and available(op, "cuda")
