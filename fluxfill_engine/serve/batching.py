"""Which queued tasks run together as one engine pass.

Tasks fit together when the engine's ``batch_key`` of their requests is equal (same working size, steps,
LoRA set: see :meth:`~fluxfill_engine.engine.FluxFillEngine.batch_key`) and they ask for the same safety
check. A task that asks for a rewritten prompt runs alone: its prompt is known only when it starts. A
batch holds at most ``max_images`` images. With several workers idle (one per engine replica), each
takes an even share of what fits, so a backlog spreads over the replicas instead of becoming one batch on
one of them.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

from .inputs import TaskSpec


def batch_key(engine: Any, spec: TaskSpec) -> Hashable | None:
    """What a task must share with others to run with them; ``None``: it runs alone (an engine without
    ``batch_key``, or a prompt to rewrite first)."""
    key_of = getattr(engine, "batch_key", None)
    if key_of is None or spec.enhance_prompt:
        return None
    return (key_of(spec.request), spec.safety_checker)


def batch_share(tasks: int, idle_workers: int) -> int:
    """How many of ``tasks`` that could run together one of ``idle_workers`` takes: an even share,
    rounded up (8 over 2 idle replicas: 4 each; 3 over 2: 2 then 1)."""
    return -(-tasks // max(1, idle_workers))


def choose_batch(
    queue: Sequence[str],
    specs: Mapping[str, TaskSpec],
    engine: Any,
    max_images: int,
    idle_workers: int = 1,
) -> list[str]:
    """The oldest task of ``queue`` (ids, oldest first) and the queued tasks that fit with it, in queue
    order, up to ``max_images`` images; of those, this worker's share among ``idle_workers``."""
    first = queue[0]
    batch, images = [first], specs[first].request.num_images
    key = batch_key(engine, specs[first])
    if key is not None:
        for task_id in queue[1:]:
            spec = specs[task_id]
            if images + spec.request.num_images <= max_images and batch_key(engine, spec) == key:
                batch.append(task_id)
                images += spec.request.num_images
    return batch[: batch_share(len(batch), idle_workers)]
