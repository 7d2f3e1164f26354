"""Triton, when installed. CPU-only installs work without it: every op's CPU kernel is its reference."""

from __future__ import annotations

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where triton is absent
    triton = None
    tl = None

HAS_TRITON = triton is not None


def require_triton(op: str) -> None:
    """Raise a clear error when a Triton launcher is called without Triton installed."""
    if not HAS_TRITON:
        raise RuntimeError(f"{op}: Triton is not installed (pip install triton); use the reference on CPU")
