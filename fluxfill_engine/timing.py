"""Marks on a device's timeline: CUDA events on a GPU (nothing waits in between), ``perf_counter`` on a
CPU. The pipeline times its stages with it, and the benchmarks their calls."""

from __future__ import annotations

import time
from typing import Any

import torch


class Clock:
    """Take marks with :meth:`mark`; read the seconds between two with :meth:`seconds` after :meth:`sync`."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.cuda = device.type == "cuda"

    def mark(self) -> Any:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def seconds(self, start: Any, end: Any) -> float:
        """Seconds from ``start`` to ``end``; on CUDA both events must have completed (``sync`` first)."""
        if self.cuda:
            return float(start.elapsed_time(end)) / 1000.0
        return float(end - start)

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)


class StageTimes:
    """Named marks of one call; ``durations`` gives ``{stage: end - start}`` from ``<stage>_start`` and
    ``<stage>_end`` marks with one device synchronization at the end."""

    def __init__(self, device: torch.device) -> None:
        self.clock = Clock(device)
        self.marks: dict[str, Any] = {}

    def mark(self, name: str) -> None:
        self.marks[name] = self.clock.mark()

    def durations(self, stages: tuple[str, ...]) -> dict[str, float]:
        self.clock.sync()
        return {
            stage: self.clock.seconds(self.marks[f"{stage}_start"], self.marks[f"{stage}_end"])
            for stage in stages
            if f"{stage}_start" in self.marks and f"{stage}_end" in self.marks
        }
