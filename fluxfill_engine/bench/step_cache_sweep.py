"""``fluxfill bench step-cache``: skip rate, speed and drift across thresholds on the mid CPU model,
for the engine's cache (plain and mask-aware criteria) side by side with diffusers'
FirstBlockCacheConfig.

    fluxfill bench step-cache --out benchmarks/results/step-cache-cpu-mid.json \\
        --markdown benchmarks/results/step-cache-cpu-mid.md

Drift is measured against the same implementation with the cache off, on the same request: SQNR of the
final latents and PSNR of the images. Random weights make every step look alike, so skip rates here are
far higher than a trained model's at the same threshold; what the sweep shows is the machinery's
cost/benefit at equal drift, not trained-model quality.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import arguments

if TYPE_CHECKING:
    import torch

SIZE = 256
REQUESTS = [  # (prompt, seed, mask box as fractions: top, left, bottom, right)
    ("a white paper cup on the table", 0, (0.25, 0.25, 0.75, 0.75)),
    ("a red bird in front of the house", 1, (0.0, 0.0, 1.0, 0.5)),
    ("a small green flower", 2, (0.4, 0.55, 0.7, 0.85)),
]


def make_inputs(seed: int, box: tuple[float, float, float, float]) -> tuple[torch.Tensor, torch.Tensor]:
    import torch

    gen = torch.Generator().manual_seed(100 + seed)
    image = torch.rand(1, 3, SIZE, SIZE, generator=gen)
    mask = torch.zeros(1, 1, SIZE, SIZE)
    top, left, bottom, right = (round(f * SIZE) for f in box)
    mask[..., top:bottom, left:right] = 1
    return image, mask


def _or_inf(decibels: float | None) -> float:
    """Identical outputs (no drift: ``None``) as infinite dB, so they average like numbers."""
    return math.inf if decibels is None else decibels


def run(pipe: Any, request: tuple, steps: int, cache_context: bool = False) -> dict[str, Any]:
    import torch

    from ..testing.tiny import MID_MAX_SEQUENCE_LENGTH

    prompt, seed, box = request
    image, mask = make_inputs(seed, box)
    final = {}

    def keep_latents(_pipe: Any, step: int, _t: Any, tensors: dict[str, Any]) -> dict[str, Any]:
        if step == steps - 1:
            final["latents"] = tensors["latents"].clone()
        return tensors

    kwargs = dict(
        prompt=prompt,
        image=image,
        mask_image=mask,
        height=SIZE,
        width=SIZE,
        num_inference_steps=steps,
        max_sequence_length=MID_MAX_SEQUENCE_LENGTH,
        generator=torch.Generator().manual_seed(seed),
        output_type="np",
        callback_on_step_end=keep_latents,
    )
    start = time.perf_counter()
    if cache_context:
        with pipe.transformer.cache_context("cond"):
            images = pipe(**kwargs).images
    else:
        images = pipe(**kwargs).images
    return {"seconds": time.perf_counter() - start, "latents": final["latents"], "images": images}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``fluxfill bench step-cache``'s arguments."""
    parser.add_argument("--steps", type=int, default=28, help="sampling steps per call (default: 28)")
    parser.add_argument(
        "--thresholds",
        type=arguments.floats,
        default=(0.02, 0.05, 0.08, 0.12, 0.2, 0.3, 0.5),
        help="comma list (default: 0.02,0.05,0.08,0.12,0.2,0.3,0.5)",
    )
    parser.add_argument(
        "--out", type=Path, default=Path("step-cache-cpu-mid.json"), help="JSON record (default: %(default)s)"
    )
    parser.add_argument("--markdown", type=Path, help="also write the markdown table here")


def main(args: argparse.Namespace) -> int:
    """Run the sweep, write the record (and ``--markdown``), print the summary."""
    import diffusers
    import torch
    from diffusers.hooks import FirstBlockCacheConfig
    from tqdm.auto import tqdm

    from .. import EngineConfig, FluxFillPipeline
    from ..metrics import psnr_db, sqnr_db
    from ..testing.tiny import mid_components
    from ..timing import Clock
    from .measure import ForwardIntervals

    thresholds = list(args.thresholds)
    torch.set_num_threads(max(1, torch.get_num_threads()))

    ours = FluxFillPipeline(**mid_components(0))
    theirs = diffusers.FluxFillPipeline(**mid_components(0))
    for pipe in (ours, theirs):
        pipe.set_progress_bar_config(disable=True)
    # Steps on which the second block really ran: watched *inside* the block, since diffusers' cache
    # hooks replace the block's forward (a hook on the block itself fires on skipped steps too).
    full_steps = ForwardIntervals(Clock(torch.device("cpu")))
    full_steps.watch(theirs.transformer.transformer_blocks[1].norm1, "second_block")
    for pipe in (ours, theirs):  # warm-up: the first call of a process is slower (allocator, caches)
        run(pipe, REQUESTS[0], args.steps)

    # engine-no-guards: no forced final step and unlimited consecutive skips, diffusers' FBCache rules.
    variants = [
        ("engine", False),
        ("engine-mask-aware", True),
        ("engine-no-guards", False),
        ("diffusers-fbcache", None),
    ]
    total = len(REQUESTS) * (2 + len(thresholds) * len(variants))
    rows: dict[tuple[str, float], list[dict[str, Any]]] = {}
    with tqdm(total=total, desc="step-cache sweep", unit="run") as progress:
        for request in REQUESTS:
            ours.configure(EngineConfig())
            base_ours = run(ours, request, args.steps)
            progress.update()
            base_theirs = run(theirs, request, args.steps)
            progress.update()
            for threshold in thresholds:
                for name, mask_aware in variants:
                    if mask_aware is None:
                        theirs.transformer.enable_cache(FirstBlockCacheConfig(threshold=threshold))
                        full_steps.clear()
                        result = run(theirs, request, args.steps, cache_context=True)
                        theirs.transformer.disable_cache()
                        full, base = len(full_steps.intervals["second_block"]), base_theirs
                    else:
                        no_guards = {"step_cache_final": 0, "step_cache_max_skips": args.steps}
                        config = EngineConfig(
                            step_cache_threshold=threshold,
                            step_cache_mask_aware=mask_aware,
                            **(no_guards if name == "engine-no-guards" else {}),
                        )
                        ours.configure(config)
                        result = run(ours, request, args.steps)
                        full, base = (ours.last_stats or {})["steps_full"], base_ours
                    rows.setdefault((name, threshold), []).append(
                        {
                            "steps_full": full,
                            "skip_rate": 1 - full / args.steps,
                            "speedup": base["seconds"] / result["seconds"],
                            "seconds": result["seconds"],
                            "baseline_seconds": base["seconds"],
                            "latent_sqnr_db": _or_inf(sqnr_db(base["latents"], result["latents"])),
                            "image_psnr_db": _or_inf(psnr_db(base["images"], result["images"])),
                        }
                    )
                    progress.update()

    summary = []
    for (name, threshold), runs in rows.items():
        summary.append(
            {
                "variant": name,
                "threshold": threshold,
                "skip_rate": statistics.mean(r["skip_rate"] for r in runs),
                "speedup": statistics.median(r["speedup"] for r in runs),
                "seconds": statistics.median(r["seconds"] for r in runs),
                "latent_sqnr_db": statistics.mean(r["latent_sqnr_db"] for r in runs),
                "image_psnr_db": statistics.mean(r["image_psnr_db"] for r in runs),
                "runs": runs,
            }
        )
    record = {
        "benchmark": "step-cache sweep",
        "model": "mid_components(0) (random weights)",
        "size": SIZE,
        "steps": args.steps,
        "requests": [{"prompt": p, "seed": s, "mask_box": b} for p, s, b in REQUESTS],
        "environment": {
            "device": platform.processor() or platform.machine(),
            "cpu_threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "diffusers": diffusers.__version__,
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        },
        "note": "random weights: skip rates are far above a trained model's at equal thresholds",
        "results": summary,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2))
    if args.markdown:
        lines = [
            f"# Step-cache sweep (cpu-mid, {SIZE}x{SIZE}, {args.steps} steps, {len(REQUESTS)} requests)",
            "",
            "Random weights: skip rates are far above a trained model's at equal thresholds.",
            "Speedup and drift are against the same implementation with its cache off; compare the",
            "implementations by absolute seconds at equal drift (the engine's cache-off run is itself faster).",
            "",
            "| variant | threshold | skip rate | seconds (median) | speedup vs own cache-off | latent SQNR dB "
            "| image PSNR dB |",
            "|---|---|---|---|---|---|---|",
        ]
        for row in sorted(summary, key=lambda r: (r["threshold"], r["variant"])):
            lines.append(
                f"| {row['variant']} | {row['threshold']:g} | {row['skip_rate']:.2f} | {row['seconds']:.2f} "
                f"| {row['speedup']:.2f}x | {row['latent_sqnr_db']:.1f} | {row['image_psnr_db']:.1f} |"
            )
        args.markdown.write_text("\n".join(lines) + "\n")
    print(json.dumps([{k: v for k, v in r.items() if k != "runs"} for r in summary], indent=1))
    return 0
