"""What the GPU run checks before anything else: that every package its parts import is importable
(a missing wheel would otherwise fail nearly every part, one traceback at a time)."""

from __future__ import annotations

import importlib
from collections.abc import Sequence

# (module to import, what to install or carry when it fails). The engine's optional backends (xformers)
# are not here: a row that needs one is skipped with the reason.
REQUIRED_MODULES: tuple[tuple[str, str], ...] = (
    ("torch", "torch"),
    ("triton", "triton"),
    ("transformers", "transformers"),
    ("accelerate", "accelerate"),
    ("diffusers", "diffusers"),
    ("torchao", "torchao"),
    ("optimum.quanto", "optimum-quanto"),
    ("fluxfill_kernels", "this tree's kernels/ (on PYTHONPATH)"),
    ("fluxfill_engine.pipeline", "this tree (on PYTHONPATH)"),
)


def missing_imports(modules: Sequence[tuple[str, str]] | None = None) -> list[str]:
    """``"diffusers (ModuleNotFoundError: No module named 'diffusers')"`` for each module that does not
    import (default: :data:`REQUIRED_MODULES`), in order; empty when all do. Importing (not only
    finding) catches a wheel that is there but broken against this torch."""
    missing = []
    for module, package in REQUIRED_MODULES if modules is None else modules:
        try:
            importlib.import_module(module)
        except Exception as error:  # noqa: BLE001 (any import failure is reported the same way)
            missing.append(f"{package} ({type(error).__name__}: {str(error).splitlines()[0][:160]})")
    return missing


def missing_line(missing: Sequence[str]) -> str:
    """The one line the run stops with."""
    return (
        f"gpu-run: cannot start, these do not import: {'; '.join(missing)}. Carry the wheels "
        "(bash benchmarks/gpu_run.sh wheels here, then the device call with carry=['.whl'])"
    )
