"""What engine a server runs: what the task service needs of one (:class:`ServingEngine`), and how to
build it from plain data (:class:`EngineSpec`: it travels to Ray replicas on other machines)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from ..engine import EventHandler, FillRequest, FillResult, FluxFillEngine


class ServingEngine(Protocol):
    """What the task service needs of an engine: a :class:`~fluxfill_engine.engine.FluxFillEngine`, or a
    :class:`~.ray_backend.RayEngine` whose replicas run elsewhere.

    Read when present: ``batch_key(request)`` (which requests fit in one pass, :mod:`.batching`; without
    it every task runs alone) and ``replicas`` (passes at once, one worker each; 1 without it).
    """

    @property
    def device(self) -> Any:
        """A ``torch.device`` or alike: its ``type`` (``cuda`` for GPU memory metrics) and ``str``."""
        ...

    def run(self, request: FillRequest, on_event: EventHandler | None = None) -> FillResult: ...

    def run_batch(
        self, requests: Sequence[FillRequest], on_event: EventHandler | None = None
    ) -> list[FillResult]: ...

    def warmup(self, sizes: Sequence[tuple[int, int]]) -> dict[str, Any]:
        """Run the given sizes once before serving; ``{"seconds": {"WxH": s, ...}, ...}``."""
        ...


@dataclass(frozen=True)
class EngineSpec:
    """How a replica builds its engine (plain data: it travels to other machines)."""

    model: str | None = None  # None: the built-in tiny model
    base: str | None = None
    preset: str = "reference"
    device: str = "cpu"
    dtype: str = "float32"
    warmup_sizes: tuple[tuple[int, int], ...] = ()
    memory_plan: str | None = None  # a name in fluxfill_engine.memory_plan.PLANS (--max-vram's choice)


def build_engine(spec: EngineSpec) -> FluxFillEngine:
    """The engine ``spec`` describes, warmed up at its ``warmup_sizes``."""
    from ..config import EngineConfig
    from ..testing.demo import tiny_engine

    config = EngineConfig.preset(spec.preset, dtype=spec.dtype)
    if spec.memory_plan is not None:
        from ..memory_plan import PLANS_BY_NAME

        config = PLANS_BY_NAME[spec.memory_plan].apply(config)
    if spec.model is None:
        engine = tiny_engine(config, device=spec.device)
    else:
        from ..engine import FluxFillEngine

        engine = FluxFillEngine.from_pretrained(spec.model, config=config, device=spec.device, base=spec.base)
    if spec.warmup_sizes:
        engine.warmup(spec.warmup_sizes)
    return engine
