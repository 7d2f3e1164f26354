"""Regional ``torch.compile`` of the engine transformer, and a persistent compile cache.

Each transformer block is compiled with ``fullgraph=True``; with nn-module inlining (torch's default)
all instances of a block class share one graph, so compile time does not grow with depth (19 + 38
blocks compile as 2 graphs). The step orchestration between blocks stays eager, which is where the
step cache decides what to run. With ``dynamic=True`` the sequence length is symbolic: new resolutions
reuse the graph.

Warm start: Inductor's artifacts are saved with ``torch.compiler.save_cache_artifacts`` into
``compile_cache_dir`` and loaded back before compiling in a later process ("mega-cache").
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from .config import COMPILE_MODES

CACHE_FILE = "fluxfill-compile-cache.bin"


def compile_unavailable_reason(device: torch.device) -> str | None:
    """Why ``torch.compile`` (Inductor) cannot build kernels for ``device``, or ``None``."""
    if device.type == "cuda":
        if importlib.util.find_spec("triton") is None:
            return "Inductor needs triton to compile for CUDA, and it is not installed"
        return None
    if device.type == "cpu":
        compiler = os.environ.get("CXX") or "c++"
        if shutil.which(compiler) is None and shutil.which("g++") is None:
            return f"Inductor needs a C++ compiler for CPU code, and none was found ({compiler!r}, 'g++')"
        return None
    return f"compile is not supported on {device.type} by fluxfill-engine"


def compile_blocks(blocks: list[torch.nn.Module], mode: str, dynamic: bool, device: torch.device) -> None:
    """Compile every block in place (``Module.compile``), ``fullgraph=True``."""
    if mode not in COMPILE_MODES:
        raise ValueError(f"compile_mode must be one of {list(COMPILE_MODES)}, got {mode!r}")
    reason = compile_unavailable_reason(device)
    if reason is not None:
        raise ValueError(f"compile=True cannot be honoured on {device}: {reason}")
    for block in blocks:
        block.compile(fullgraph=True, dynamic=dynamic, mode=None if mode == "default" else mode)


def load_compile_cache(directory: str | Path) -> dict[str, Any] | None:
    """Load saved Inductor artifacts from ``directory`` (before compiling); what was loaded, or None."""
    path = Path(directory) / CACHE_FILE
    if not path.is_file():
        return None
    info = torch.compiler.load_cache_artifacts(path.read_bytes())
    if info is None:
        return None
    return {"path": str(path), "bytes": path.stat().st_size}


def save_compile_cache(directory: str | Path) -> dict[str, Any] | None:
    """Save the artifacts compiled so far in this process to ``directory``; what was saved, or None."""
    saved = torch.compiler.save_cache_artifacts()
    if saved is None:
        return None
    data, _ = saved
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    target = path / CACHE_FILE
    temporary = target.with_suffix(".tmp")
    temporary.write_bytes(data)
    temporary.replace(target)  # atomic: a concurrent reader never sees half a file
    return {"path": str(target), "bytes": len(data)}
