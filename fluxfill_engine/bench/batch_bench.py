"""``fluxfill bench batch``: images per second for N requests run one by one (``FluxFillEngine.run``)
against the same requests run as batches (``FluxFillEngine.run_batch``) of 1, 2, 4, 8, through the
engine's public API.

    fluxfill bench batch --preset cpu-mid --steps 4 --requests 8 --out benchmarks/results/batch-cpu-mid.json

One engine (``--engine-preset``, default ``reference``) on the random-weight model of ``--preset``;
``--requests`` requests at one fixed ``--size`` (each its own prompt, seed and mask, one image each), so
all share a batch key. Every mode runs all the requests once per round, after a warm-up call of each
mode; the modes are interleaved and their order rotates every round (``--repeats`` rounds). Reported
per mode: images per second (median over rounds), the speed-up over one by one, the transformer's
milliseconds per step of one pass, and how far its images are from the one-by-one images (8-bit levels:
the largest difference and the share of values that differ).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..config import PRESETS
from . import arguments
from .catalog import BenchError

if TYPE_CHECKING:
    from .. import FillRequest, FillResult, FluxFillEngine

SCHEMA = "fluxfill-batch-bench/1"
PROMPTS = ("a white paper cup", "a red brick wall", "a small green plant", "a sleeping cat", "a wooden chair")
ONE_BY_ONE = "one by one"


def make_requests(count: int, size: int, steps: int, mask_size: int) -> list[FillRequest]:
    """``count`` requests at ``size`` x ``size``: one photo, each its own prompt, seed and mask place."""
    import numpy as np
    import PIL.Image

    from .. import FillRequest
    from ..testing.pictures import picture_and_mask

    image, mask = picture_and_mask(size, size, mask_size=mask_size)
    step = max((size - mask_size) // (2 * max(count, 1)), 1)
    requests = []
    for index in range(count):
        shifted = np.roll(np.asarray(mask), (index * step, -index * step), axis=(0, 1))
        requests.append(
            FillRequest(
                prompt=PROMPTS[index % len(PROMPTS)],
                image=image,
                mask=PIL.Image.fromarray(shifted),
                width=size,
                height=size,
                num_inference_steps=steps,
                seed=index,
            )
        )
    return requests


def _run_mode(engine: FluxFillEngine, requests: Sequence[FillRequest], batch: int | None) -> list[FillResult]:
    if batch is None:
        return [engine.run(request) for request in requests]
    results = []
    for start in range(0, len(requests), batch):
        results += engine.run_batch(requests[start : start + batch])
    return results


def _difference(results: Sequence[FillResult], reference: Sequence[FillResult]) -> dict[str, float]:
    """The 8-bit images' largest difference and the share of values that differ."""
    import numpy as np

    ours = np.stack([np.asarray(im, np.int16) for r in results for im in r.images])
    theirs = np.stack([np.asarray(im, np.int16) for r in reference for im in r.images])
    difference = np.abs(ours - theirs)
    return {"max_levels": int(difference.max()), "share_differing": float((difference > 0).mean())}


def measure(
    preset: str = "cpu-tiny",
    size: int | None = None,
    steps: int = 4,
    requests: int = 8,
    batch_sizes: Sequence[int] = (1, 2, 4, 8),
    repeats: int = 2,
    warmup: bool = True,
    engine_preset: str = "reference",
    mask_size: int | None = None,
    device: str | None = None,
    threads: int | None = None,
) -> dict[str, Any]:
    """Run every mode and return the record (see the module docstring)."""
    import numpy as np
    import torch

    from .. import EngineConfig, FluxFillEngine, FluxFillPipeline
    from ..limits import MIN_SIZE
    from .measure import environment, summarize
    from .models import MODEL_PRESETS, preset_device

    if threads is not None:
        torch.set_num_threads(threads)
    if preset not in MODEL_PRESETS:
        raise BenchError(f"--preset must be one of {list(MODEL_PRESETS)}, got {preset!r}")
    if engine_preset not in PRESETS:
        raise BenchError(f"--engine-preset must be one of {list(PRESETS)}, got {engine_preset!r}")
    batch_sizes = tuple(batch_sizes)
    if requests < 1 or repeats < 1 or steps < 1:
        raise BenchError("--requests, --repeats and --steps must be at least 1")
    if (
        not batch_sizes
        or any(b < 1 or b > requests for b in batch_sizes)
        or len(set(batch_sizes)) < len(batch_sizes)
    ):
        raise BenchError(
            f"--batch-sizes must be distinct, each in [1, --requests={requests}], got {batch_sizes}"
        )
    config = EngineConfig.preset(engine_preset)
    model = MODEL_PRESETS[preset]
    size = size or max(model.width, MIN_SIZE)
    mask_size = mask_size or size // 4
    target = preset_device(preset, device)
    engine = FluxFillEngine(FluxFillPipeline(**model.build(0, target, config.torch_dtype)), config, target)
    work = make_requests(requests, size, steps, mask_size)
    if engine.batch_key(work[0].validated()) is None:
        raise BenchError("this engine runs every request alone (FluxFillEngine.batch_key is None)")

    modes: dict[str, int | None] = {ONE_BY_ONE: None, **{f"batches of {b}": b for b in batch_sizes}}
    if warmup:  # one call of each mode (on a GPU: each batch size's shapes, compiled kernels, allocator)
        for batch in modes.values():
            _run_mode(engine, work[: batch or 1], batch)
    seconds: dict[str, list[float]] = {name: [] for name in modes}
    cpu_seconds: dict[str, list[float]] = {name: [] for name in modes}
    results: dict[str, list[FillResult]] = {}  # the first round's, for the images
    passes: dict[str, list[FillResult]] = {name: [] for name in modes}  # one result per pass, every round
    names = list(modes)
    for round_index in range(repeats):
        order = names[round_index % len(names) :] + names[: round_index % len(names)]
        for name in order:
            start, cpu_start = time.perf_counter(), time.process_time()
            done = _run_mode(engine, work, modes[name])
            seconds[name].append(time.perf_counter() - start)
            cpu_seconds[name].append(time.process_time() - cpu_start)
            results.setdefault(name, done)
            passes[name] += done[:: modes[name] or 1]
    images = sum(request.num_images for request in work)
    record: dict[str, Any] = {
        "schema": SCHEMA,
        "environment": environment(target),
        "settings": dict(
            preset=preset,
            size=size,
            steps=steps,
            requests=requests,
            batch_sizes=list(batch_sizes),
            repeats=repeats,
            warmup=warmup,
            engine_preset=engine_preset,
            mask_size=mask_size,
            dtype=str(engine.pipeline.transformer.dtype).replace("torch.", ""),
        ),
        "modes": {},
    }
    baseline = summarize([images / s for s in seconds[ONE_BY_ONE]])
    for name, batch in modes.items():
        rate = summarize([images / s for s in seconds[name]])
        record["modes"][name] = {
            "batch_size": batch or 1,
            "calls": len(passes[name]) // repeats,
            "seconds": summarize(seconds[name]),
            "cpu_seconds": summarize(cpu_seconds[name]),
            "images_per_s": rate,
            # Median over rounds, and best round against best round (robust to a shared machine's load).
            "speedup": rate["median"] / baseline["median"],
            "speedup_best": rate["max"] / baseline["max"],
            "ms_per_step_per_pass": summarize([1000 * r.timings["denoise"] / steps for r in passes[name]]),
            "stage_s_per_image": {
                stage: float(np.median([r.timings[stage] / r.stats["batch_size"] for r in passes[name]]))
                for stage in ("text_encode", "vae_encode", "denoise", "decode")
            },
            "vs_one_by_one": _difference(results[name], results[ONE_BY_ONE]),
        }
    return record


def markdown(record: dict[str, Any], command: str | None = None) -> str:
    settings, env = record["settings"], record["environment"]
    size = settings["size"]
    lines = [
        f"# Batching: {settings['requests']} requests one by one vs in batches ({settings['preset']}, "
        f"{size}x{size}, {settings['steps']} steps)",
        "",
        f"Device: {env.get('device_name')} ({env.get('device')}, torch threads: {env.get('torch_threads')}), "
        f"{settings['dtype']}, engine preset `{settings['engine_preset']}`, torch {env.get('torch')}; "
        f"{settings['repeats']} rounds, modes interleaved (order rotated each round), after a warm-up call "
        "of each; median: over rounds; best: the fastest round of each mode. Per image: the stage seconds of "
        "a pass over its images (median over passes).",
        "",
        "| mode | calls | images/s (median) | speed-up | images/s (best) | speed-up (best) "
        "| CPU s per image | ms/step per pass | denoise s per image | other s per image "
        "| vs one by one: max levels, share |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    images = settings["requests"]  # one image each
    for name, row in record["modes"].items():
        diff, stages = row["vs_one_by_one"], row["stage_s_per_image"]
        other = stages["text_encode"] + stages["vae_encode"] + stages["decode"]
        lines.append(
            f"| {name} | {row['calls']} | {row['images_per_s']['median']:.3f} | {row['speedup']:.2f}x "
            f"| {row['images_per_s']['max']:.3f} | {row['speedup_best']:.2f}x "
            f"| {row['cpu_seconds']['median'] / images:.2f} | {row['ms_per_step_per_pass']['median']:.1f} "
            f"| {stages['denoise']:.3f} | {other:.3f} | {diff['max_levels']}, {diff['share_differing']:.1e} |"
        )
    if env.get("device") == "cpu":
        lines += ["", "CPU only: no GPU was measured here."]
    if command:
        lines += ["", "Command:", "", "```", command, "```"]
    return "\n".join(lines) + "\n"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``fluxfill bench batch``'s arguments."""
    arguments.add_model_arguments(parser, dtype=False)
    parser.add_argument("--size", type=int, help="request side in pixels (default: the model's size)")
    parser.add_argument("--steps", type=int, default=4, help="sampling steps per call (default: 4)")
    parser.add_argument("--requests", type=int, default=8, help="requests per round (default: 8)")
    parser.add_argument(
        "--batch-sizes", type=arguments.ints, default=(1, 2, 4, 8), help="comma list (default: 1,2,4,8)"
    )
    parser.add_argument("--repeats", type=int, default=2, help="rounds (default: 2)")
    parser.add_argument("--no-warmup", action="store_true", help="no warm-up call of each mode")
    parser.add_argument(
        "--engine-preset", default="reference", choices=list(PRESETS), help="EngineConfig preset"
    )
    parser.add_argument("--mask-size", type=int, help="mask side in pixels (default: a quarter of --size)")
    parser.add_argument(
        "--threads",
        type=int,
        help="torch CPU threads; 1 on a shared machine: others' load then slows the run without "
        "stalling a thread team at every barrier, and CPU seconds per image stay exact",
    )
    parser.add_argument("--out", type=Path, help="JSON record (a .md beside it)")


def main(args: argparse.Namespace) -> int:
    """Measure every mode, print the markdown table, write the record (``--out``) and its markdown."""
    from .report import write_json

    record = measure(
        args.preset,
        args.size,
        args.steps,
        args.requests,
        args.batch_sizes,
        args.repeats,
        not args.no_warmup,
        args.engine_preset,
        args.mask_size,
        args.device,
        args.threads,
    )
    command = arguments.command_line(args)
    report = markdown(record, command)
    print(report)
    if args.out is not None:
        write_json({**record, "command": command}, args.out)
        args.out.with_suffix(".md").write_text(report)
        arguments.say_written([args.out, args.out.with_suffix(".md")])
    return 0
