"""Which torch device a command-line ``--device`` names, checked against what this machine has, and
the weights dtype a device runs by default."""

from __future__ import annotations

DTYPES = ("float32", "bfloat16", "float16")
"""The weights dtypes a command line (``--dtype``) or an engine spec may name."""


def default_dtype(device: str) -> str:
    """The weights dtype when none is given: bfloat16 on a GPU, float32 on a CPU."""
    return "bfloat16" if device.startswith("cuda") else "float32"


def resolve_device(name: str | None) -> str:
    """``--device`` as a torch device this machine has (default: cuda if available, else cpu)."""
    import torch

    if name is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise ValueError(f"--device: {name!r} is not a device; use cpu or cuda[:N]") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device: {name!r} is not supported; use cpu or cuda[:N]")
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"--device: {name!r} asks for a GPU, but no CUDA GPU is available here; use cpu")
        if device.index is not None and device.index >= count:
            raise ValueError(f"--device: {name!r}: this machine has {count} CUDA GPU(s), numbered from 0")
    return name
