"""pytest-benchmark micro benchmarks: ``pytest benchmarks --benchmark-only``.

CPU benchmarks run at the mid model's shapes (256 image + 128 text tokens, 8 heads x 64); the ones
marked ``gpu`` run at the real model's shapes (4096 + 512 tokens, 24 heads x 128, bf16) and are skipped
without CUDA. Not part of the CI test command (``python -m pytest`` collects ``tests/`` only).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch

# As in tests/conftest.py: Triton's CPU interpreter must be chosen before anything imports triton
# (diffusers does), or triton sets itself up for GPU compilation.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

HAS_CUDA = torch.cuda.is_available()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    try:
        import pytest_benchmark  # noqa: F401

        missing_plugin = None
    except ImportError:
        missing_plugin = pytest.mark.skip(
            reason="pytest-benchmark is not installed (pip install pytest-benchmark)"
        )
    no_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if missing_plugin is not None:
            item.add_marker(missing_plugin)
        elif "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(no_gpu)


def synchronized(fn: Callable[[], Any], device: torch.device) -> Callable[[], Any]:
    """``fn`` followed by a device synchronisation, so a timed call includes its GPU work."""
    if device.type != "cuda":
        return fn

    def call() -> Any:
        out = fn()
        torch.cuda.synchronize(device)
        return out

    return call


@pytest.fixture
def run(benchmark: Any) -> Callable[..., Any]:
    """``run(fn, device, rounds=None)``: benchmark ``fn`` (synchronised on CUDA) under ``no_grad``.

    With ``rounds``, a fixed number of rounds after one warm-up round (for the slow, whole-model cases).
    """

    def go(fn: Callable[[], Any], device: torch.device, rounds: int | None = None) -> Any:
        timed = synchronized(fn, device)

        def call() -> Any:
            with torch.no_grad():
                return timed()

        if rounds is None:
            return benchmark(call)
        return benchmark.pedantic(call, rounds=rounds, warmup_rounds=1, iterations=1)

    return go
