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


def _interpreter_scalars_index_as_ints() -> None:
    """Let ``range(n)`` take a runtime scalar under Triton 3.6's CPU interpreter with NumPy >= 2.4.

    The interpreter holds every scalar as a 1-element array and turns it into a loop bound with
    ``int(array)``, which NumPy 2.4 refuses for arrays that are not 0-d; Triton 3.9 squeezes the array
    first. Any kernel whose loop bound is a runtime argument (every attention loop) then fails, so the
    interpreter's tensor patch is wrapped to index the same way 3.9 does. Compiled kernels are untouched:
    this only changes what the interpreter installs on ``tl.tensor`` while it runs a kernel.
    """
    try:
        from triton.runtime import interpreter
    except ImportError:  # pragma: no cover - a Triton without the interpreter
        return
    patch_tensor = getattr(interpreter, "_patch_lang_tensor", None)
    if patch_tensor is None or getattr(patch_tensor, "_fluxfill_index_fix", False):
        return

    def patch_tensor_with_index(tensor, scope) -> None:
        patch_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patch_tensor_with_index._fluxfill_index_fix = True  # pyright: ignore[reportFunctionMemberAccess]
    interpreter._patch_lang_tensor = patch_tensor_with_index


if HAS_TRITON:
    _interpreter_scalars_index_as_ints()
