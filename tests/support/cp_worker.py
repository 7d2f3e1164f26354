"""One rank of a context-parallel test run, started by ``tests/optimizations/test_context_parallel.py`` as
``python -m torch.distributed.run --standalone --nproc-per-node N tests/support/cp_worker.py OUT SCENARIO...``.

Every rank builds the same tiny model from a fixed seed, runs each scenario's call with
``EngineConfig(context_parallel=N)`` (or diffusers' ``enable_parallelism``) and writes its images and
step-cache stats to ``OUT/<scenario>-rank<r>.npz``. The test computes each scenario in one plain process
(:func:`run_scenario` with ``parallel=1``) and compares.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

if not torch.cuda.is_available():  # as tests/conftest.py: before anything imports triton
    os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np  # noqa: E402

PROMPT = "a white paper cup on the table"


def components(heads: int = 2) -> dict[str, Any]:
    """The tiny model; ``heads`` attention heads of 16 (the tiny model has 2)."""
    from diffusers import FluxTransformer2DModel

    from fluxfill_engine.testing.tiny import TINY_TRANSFORMER_CONFIG, tiny_components

    parts = tiny_components(0)
    if heads != TINY_TRANSFORMER_CONFIG["num_attention_heads"]:
        torch.manual_seed(0)
        config = {**TINY_TRANSFORMER_CONFIG, "num_attention_heads": heads}
        parts["transformer"] = FluxTransformer2DModel(**config).eval()
    return parts


def call_kwargs(height: int, width: int, steps: int, **overrides: Any) -> dict[str, Any]:
    """Odd token counts on purpose: 48x80 is 15 image tokens, 47 text tokens (padding on 2 ranks)."""
    gen = torch.Generator().manual_seed(3)
    image = torch.rand(1, 3, height, width, generator=gen)
    mask = torch.zeros(1, 1, height, width)
    mask[..., height // 4 : 3 * height // 4, width // 4 : width // 2] = 1
    kwargs = dict(
        prompt=PROMPT,
        image=image,
        mask_image=mask,
        height=height,
        width=width,
        num_inference_steps=steps,
        max_sequence_length=47,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    )
    kwargs.update(overrides)
    return kwargs


# name -> (heads, EngineConfig fields, call arguments)
SCENARIOS: dict[str, tuple[int, dict[str, Any], dict[str, Any]]] = {
    "reference": (2, {}, call_kwargs(48, 80, 3)),
    "batch": (2, {}, call_kwargs(48, 80, 2, num_images_per_prompt=2)),
    "step_cache": (2, {"step_cache_threshold": 0.32}, call_kwargs(48, 80, 10)),
    "step_cache_masked": (
        2,
        {"step_cache_threshold": 0.32, "step_cache_mask_aware": True},
        call_kwargs(48, 80, 10),
    ),
    "int8": (2, {"quant": "int8"}, call_kwargs(48, 80, 2)),
    "fused_kernels": (2, {"fused_kernels": True}, call_kwargs(48, 80, 2)),
    "triton": (2, {"attention": "triton"}, call_kwargs(48, 80, 2)),
    "diffusers_enable_parallelism": (2, {}, call_kwargs(48, 80, 2)),
    "compile": (2, {"compile": True}, call_kwargs(48, 80, 2)),
    # 6 heads, for 3 ranks: 64x80 is 20 image tokens (padding), 47 text tokens (padding).
    "heads6": (6, {}, call_kwargs(64, 80, 2)),
    "heads6_step_cache": (6, {"step_cache_threshold": 0.5}, call_kwargs(64, 80, 8)),
    # Two calls as one pass (generate_batch), each with its own step-cache decisions.
    "step_cache_calls": (2, {"step_cache_threshold": 0.27}, call_kwargs(48, 80, 10)),
}
# The second call of ``step_cache_calls``: another prompt and seed, two images.
SECOND_CALL = {"prompt": "a red brick wall", "num_images_per_prompt": 2}


def enable_diffusers_parallelism(transformer: Any, degree: int) -> None:
    """diffusers' ``enable_parallelism(config=ContextParallelConfig(ulysses_degree=N))``. diffusers
    0.42.1 computes ``rank % torch.accelerator.device_count()``, which divides by zero on a machine
    without an accelerator, so the count reads 1 during the call there."""
    from diffusers import ContextParallelConfig

    count = torch.accelerator.device_count
    if count() == 0:
        torch.accelerator.device_count = lambda: 1
    try:
        transformer.enable_parallelism(config=ContextParallelConfig(ulysses_degree=degree))
    finally:
        torch.accelerator.device_count = count


def run_scenario(name: str, parallel: int, seed: int = 0) -> tuple[np.ndarray, dict[str, Any]]:
    """The scenario's images and stats, on ``parallel`` ranks (1: this process alone)."""
    from fluxfill_engine import EngineConfig, FluxFillPipeline

    heads, fields, kwargs = SCENARIOS[name]
    parts = components(heads)
    if name == "diffusers_enable_parallelism":
        if parallel > 1:
            enable_diffusers_parallelism(parts["transformer"], parallel)
        config = EngineConfig()
    else:
        config = EngineConfig(context_parallel=parallel, **fields)
    pipe = FluxFillPipeline(**parts).configure(config)
    pipe.set_progress_bar_config(disable=True)
    kwargs = {**kwargs, "generator": torch.Generator().manual_seed(seed)}
    started = time.perf_counter()
    if name == "step_cache_calls":
        from fluxfill_engine import PipelineCall

        second = {**kwargs, **SECOND_CALL, "generator": torch.Generator().manual_seed(seed + 1)}
        results = pipe.generate_batch([PipelineCall(**kwargs), PipelineCall(**second)])
        images = np.concatenate([np.asarray(result.images) for result in results])
        stats = {"step_cache": [result.stats["step_cache"] for result in results]}
    else:
        images = pipe(**kwargs).images
        stats = dict(pipe.last_stats)
    stats["seconds"] = time.perf_counter() - started
    stats["transformer_path"] = pipe.describe()["transformer_path"]
    fill = pipe.runtime.current
    parallel_info = None if fill is None else fill.context_parallel
    stats["context_parallel"] = None if parallel_info is None else parallel_info.size
    return np.asarray(images), stats


def engine_random_seed(parallel: int) -> tuple[int, np.ndarray]:
    """A ``FluxFillEngine`` request without a seed, on ``parallel`` ranks: the seed used and the image."""
    import PIL.Image

    from fluxfill_engine import EngineConfig, FillRequest, FluxFillEngine, FluxFillPipeline

    engine = FluxFillEngine(FluxFillPipeline(**components()), EngineConfig(context_parallel=parallel))
    image = PIL.Image.new("RGB", (64, 48), (90, 140, 200))
    mask = PIL.Image.new("L", (64, 48), 0)
    mask.paste(255, (16, 12, 48, 36))
    request = FillRequest("a cup", image, mask, num_inference_steps=2, max_megapixels=0.065)
    result = engine.run(request)
    return result.seed, np.asarray(result.images[0])


def _jsonable(stats: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(stats, default=str))


def main(argv: list[str]) -> int:
    import torch.distributed as dist

    out, names = Path(argv[0]), argv[1:]
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    for name in names:
        if name == "different_seeds":  # a seed per process: the engine must refuse, on every rank
            try:
                run_scenario("reference", world, seed=rank)
                outcome = {"error": None}
            except ValueError as error:
                outcome = {"error": str(error)}
            (out / f"{name}-rank{rank}.json").write_text(json.dumps(outcome))
            continue
        if name == "engine_random_seed":  # FillRequest(seed=None): rank 0's seed on every rank
            seed, images = engine_random_seed(world)
            np.savez(out / f"{name}-rank{rank}.npz", images=images)
            (out / f"{name}-rank{rank}.json").write_text(json.dumps({"seed": seed}))
            continue
        images, stats = run_scenario(name, world)
        np.savez(out / f"{name}-rank{rank}.npz", images=images)
        (out / f"{name}-rank{rank}.json").write_text(json.dumps(_jsonable(stats)))
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
