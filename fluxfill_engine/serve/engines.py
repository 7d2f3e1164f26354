"""What engine a server runs, as plain data (it travels to Ray replicas on other machines), and
building it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class EngineSpec:
    """How a replica builds its engine (plain data: it travels to other machines)."""

    model: str | None = None  # None: the built-in tiny model
    base: str | None = None
    preset: str = "reference"
    device: str = "cpu"
    dtype: str = "float32"
    warmup_sizes: tuple[tuple[int, int], ...] = ()


def build_engine(spec: EngineSpec) -> Any:
    from ..config import EngineConfig
    from ..testing.demo import tiny_engine

    config = EngineConfig.preset(spec.preset, dtype=spec.dtype)
    if spec.model is None:
        engine = tiny_engine(config, device=spec.device)
    else:
        from ..engine import FluxFillEngine

        engine = FluxFillEngine.from_pretrained(spec.model, config=config, device=spec.device, base=spec.base)
    if spec.warmup_sizes:
        engine.warmup(spec.warmup_sizes)
    return engine
