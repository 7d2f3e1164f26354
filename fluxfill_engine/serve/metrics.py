"""Prometheus metrics of one server (its own registry, so several apps in one process stay apart)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LATENCY_BUCKETS = (0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600)


class ServeMetrics:
    """Queue depth, tasks by outcome, task latency, per-stage seconds, batch sizes, GPU memory."""

    def __init__(self, queue_depth: Callable[[], float], gpu_memory: Callable[[], float]) -> None:
        self.registry = CollectorRegistry()
        Gauge("fluxfill_queue_depth", "Tasks waiting in the queue", registry=self.registry).set_function(
            queue_depth
        )
        Gauge(
            "fluxfill_gpu_memory_bytes",
            "GPU memory allocated by the engine (0 on CPU)",
            registry=self.registry,
        ).set_function(gpu_memory)
        self.tasks = Counter(
            "fluxfill_tasks", "Finished tasks by outcome", ["outcome"], registry=self.registry
        )
        self.latency = Histogram(
            "fluxfill_task_latency_seconds",
            "From submission to the closing event",
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.stage = Histogram(
            "fluxfill_stage_seconds",
            "Seconds per engine stage (text_encode, vae_encode, denoise, decode, total)",
            ["stage"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "fluxfill_batch_requests",
            "Requests run together in one engine pass",
            buckets=(1, 2, 3, 4, 6, 8, 16),
            registry=self.registry,
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)


def allocated_gpu_bytes(engine: Any) -> float:
    """GPU memory the engine's process has allocated on its device; 0 on a CPU or before it loaded."""
    if engine is None or engine.device.type != "cuda":
        return 0.0
    import torch

    return float(torch.cuda.memory_allocated(engine.device))
