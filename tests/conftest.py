"""Shared fixtures: tiny random FLUX Fill components and both pipelines (helpers: ``helpers.py``)."""

from __future__ import annotations

import os
from typing import Any

import torch

# Without a GPU, Triton kernels run in Triton's CPU interpreter. This must be set before anything
# imports triton (diffusers does), or triton's own jitted helpers are set up for GPU compilation.
# This is the one place the test suite sets it.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import diffusers  # noqa: E402
import pytest  # noqa: E402

from fluxfill_engine import FluxFillPipeline  # noqa: E402
from fluxfill_engine.testing.tiny import tiny_components  # noqa: E402
from tests.support.helpers import build_pipes, disable_progress  # noqa: E402


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``gpu`` are skipped, with the reason, where there is no CUDA GPU."""
    if torch.cuda.is_available():
        return
    for item in items:
        marker = item.get_closest_marker("gpu")
        if marker is not None:
            item.add_marker(pytest.mark.skip(reason=marker.kwargs.get("reason", "needs a CUDA GPU")))


# ---- fixtures --------------------------------------------------------------------------------------


@pytest.fixture
def components() -> dict[str, Any]:
    """Fresh tiny random components (seed 0) for every test."""
    return tiny_components(0)


@pytest.fixture
def pipes(components: dict[str, Any]) -> tuple[diffusers.FluxFillPipeline, FluxFillPipeline]:
    """``(diffusers.FluxFillPipeline, fluxfill_engine.FluxFillPipeline)`` sharing the same components."""
    return build_pipes(components)


@pytest.fixture
def pipe(components: dict[str, Any]) -> FluxFillPipeline:
    """Our pipeline alone, progress bar off."""
    ours = FluxFillPipeline(**components)
    disable_progress(ours)
    return ours
