"""The serving tests' engine: one tiny reference engine per module, shared by its servers."""

from __future__ import annotations

import pytest

from fluxfill_engine import EngineConfig
from fluxfill_engine.testing.demo import tiny_engine


@pytest.fixture(scope="module")
def shared_engine():
    """The built-in tiny model in float32 with every optimization off (what ``fluxfill serve`` serves
    without ``--model``)."""
    return tiny_engine(EngineConfig.preset("reference", dtype="float32"))
