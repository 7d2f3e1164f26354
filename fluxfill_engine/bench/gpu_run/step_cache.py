"""Part 5, ``step_cache``: the engine's step cache on an eager ``reference`` step, a skipped step
against a full one."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..measure import median
from .budget import Deadline
from .latency import step_inputs
from .profiles import GUIDANCE
from .record import Run


def part_step_cache(run: Run, deadline: Deadline, record: dict[str, Any]) -> None:
    from ...cache import StepCache
    from ...config import PRESETS, StepCachePolicy
    from ...testing.random_models import random_transformer
    from ...testing.step_inputs import engine_pipeline

    profile = run.profile
    config = profile.transformer()
    count = profile.step_cache_steps
    steps = count + 1  # step 0 is always computed: it sets the cache's reference
    inputs = step_inputs(run, config, steps=steps)
    base = random_transformer(config, device=run.device, dtype=profile.dtype, seed=0)
    pipe = engine_pipeline(base)
    pipe.configure(PRESETS["reference"])
    fill = pipe.engine_transformer()
    prepared = inputs.prepare(fill, GUIDANCE)

    def with_cache(threshold: float) -> tuple[list[float], Mapping[str, Any]]:
        # final=0 and unlimited consecutive skips: with a huge threshold every step after the first
        # skips; with threshold 0 none does (the cache's bookkeeping without its savings).
        policy = StepCachePolicy(threshold=threshold, warmup=1, final=0, max_skips=10**6)
        cache = StepCache(policy, steps)
        fill(inputs.latents, 0, prepared, cache)
        times = run.timer.call_ms(lambda i: fill(inputs.latents, i, prepared, cache), count, first=1)
        return times, cache.stats()

    def measure() -> dict[str, Any]:
        for index in range(profile.warmup):
            fill(inputs.latents, index % steps, prepared)
        full = run.timer.call_ms(lambda i: fill(inputs.latents, i % steps, prepared), count)
        computed, computed_stats = with_cache(0.0)
        skipping, skipping_stats = with_cache(1e9)
        full_ms, skip_ms = median(full), median(skipping)
        return {
            "engine_config": "reference (eager)",
            "full_step_ms": full_ms,
            "full_step_with_cache_ms": median(computed),
            "skipped_step_ms": skip_ms,
            "skipped_over_full": skip_ms / full_ms,
            "steps_skipped": skipping_stats["steps_cached"],
            "steps_computed_when_never_skipping": computed_stats["steps_full"],
            "ms_all": {"full": full, "cache_never_skips": computed, "cache_skips": skipping},
        }

    run.item(record, "skip_vs_full", measure)
