"""Where an engine's start went: reading weights, building (fusing, quantizing), compiling, warming up.

:class:`StartReport` is filled by :class:`~.engine.FluxFillEngine` as it starts
(``engine.start_report``), and read by ``fluxfill serve`` (a log line, ``/healthz``) and the start-time
benchmark. Phases, in the order they happen:

- ``read_weights``: loading the model's files into modules (a diffusers folder, a single file, or a
  saved engine's bytes assigned in place);
- ``build``: the engine transformer made ready for the configuration: fused QKV, the quantization of
  every block linear (none for a saved engine: its weights are stored quantized), the compile cache
  loaded, the blocks wrapped for compilation (compiling itself is lazy);
- ``warm_up``: :meth:`~.engine.FluxFillEngine.warmup`'s requests, which is where ``torch.compile``
  compiles; ``compile`` is the part of it torch's compiler reports as its own (dynamo + Inductor,
  from ``torch._dynamo.utils.compilation_time_metrics`` when the running torch has it).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

PHASES = ("read_weights", "build", "warm_up")


def compiler_seconds() -> float:
    """Seconds torch's compiler has spent in this process so far (0.0 when torch does not say)."""
    import sys

    utils = sys.modules.get("torch._dynamo.utils")
    metrics = getattr(utils, "compilation_time_metrics", None)
    if not isinstance(metrics, dict):
        return 0.0
    return float(sum(sum(times) for name, times in metrics.items() if name.endswith("compile_inner")))


@dataclass
class StartReport:
    """Seconds per start phase (see the module docstring), and what the engine started from."""

    source: str = "pipeline"
    seconds: dict[str, float] = field(default_factory=dict)

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Time the block as phase ``name`` (added to it when it runs again: several warm-ups)."""
        start = time.perf_counter()
        compiled_before = compiler_seconds() if name == "warm_up" else 0.0
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start
            if name == "warm_up":
                spent = compiler_seconds() - compiled_before
                self.seconds["compile"] = self.seconds.get("compile", 0.0) + spent

    @property
    def total(self) -> float:
        """Seconds of the phases that ran (``compile`` is inside ``warm_up``, not added again)."""
        return sum(seconds for name, seconds in self.seconds.items() if name != "compile")

    def as_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "seconds": {name: round(value, 4) for name, value in self.seconds.items()},
            "total": round(self.total, 4),
        }

    def line(self) -> str:
        """One log line: ``start 12.3 s from saved engine: read_weights 1.2 s, build 0.1 s, ...``."""
        parts = ", ".join(f"{name} {value:.2f} s" for name, value in self.seconds.items())
        return f"start {self.total:.2f} s from {self.source}: {parts or 'nothing timed'}"
