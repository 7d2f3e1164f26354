"""``fluxfill bench crop``: full frame against crop-to-mask, what ``FillRequest.crop_to_mask`` saves
for a small mask in a large photo, through the engine's public API.

    fluxfill bench crop --preset cpu-mid --steps 2 --out benchmarks/results/crop-cpu-mid.json

One engine on the preset's random-weight model; one photo of ``--size`` pixels with a ``--mask-size``
square mask; two requests, interleaved over ``--repeats`` rounds after a warm-up of each: the full
frame at the photo's size (``width``/``height`` given, so the transformer sees the whole photo) and
``crop_to_mask`` (the box around the mask at about ``--max-megapixels``). Reported per request: the
working size, image tokens, end-to-end seconds and transformer milliseconds per step (medians).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from . import arguments


def compare(
    preset: str = "cpu-tiny",
    size: int = 1536,
    mask_size: int = 128,
    steps: int = 2,
    repeats: int = 2,
    max_megapixels: float = 1.0,
    device: str | None = None,
) -> dict[str, Any]:
    """Run both requests and return the record (see the module docstring)."""
    from .. import EngineConfig, FillRequest, FluxFillEngine, FluxFillPipeline
    from ..testing.pictures import picture_and_mask
    from .measure import environment, summarize
    from .models import MODEL_PRESETS, preset_device

    target = preset_device(preset, device)
    components = MODEL_PRESETS[preset].build(0, target)
    engine = FluxFillEngine(FluxFillPipeline(**components), config=EngineConfig(), device=target)
    image, mask = picture_and_mask(size, size, mask_size=mask_size)
    common: dict[str, Any] = dict(
        prompt="a white paper cup", image=image, mask=mask, num_inference_steps=steps, seed=0
    )
    requests = {
        "full-frame": FillRequest(**common, width=size, height=size),
        "crop-to-mask": FillRequest(**common, crop_to_mask=True, max_megapixels=max_megapixels),
    }
    runs: dict[str, list[Any]] = {name: [] for name in requests}
    for request in requests.values():
        engine.run(request)  # warm-up
    for _ in range(repeats):
        for name, request in requests.items():
            runs[name].append(engine.run(request))
    record: dict[str, Any] = {
        "schema": "fluxfill-crop-compare/1",
        "environment": environment(target),
        "settings": dict(
            preset=preset,
            size=size,
            mask_size=mask_size,
            steps=steps,
            repeats=repeats,
            max_megapixels=max_megapixels,
        ),
        "requests": {},
    }
    for name, results in runs.items():
        stats = results[0].stats
        record["requests"][name] = {
            "working_size": list(stats["working_size"]),
            "image_tokens": stats["image_seq_len"],
            "region": list(stats["region"]),
            "e2e_s": summarize([r.timings["total"] for r in results]),
            "ms_per_step": summarize([1000 * r.timings["denoise"] / stats["num_steps"] for r in results]),
        }
    full, crop = record["requests"]["full-frame"], record["requests"]["crop-to-mask"]
    record["speedup"] = {
        "e2e": full["e2e_s"]["median"] / crop["e2e_s"]["median"],
        "per_step": full["ms_per_step"]["median"] / crop["ms_per_step"]["median"],
    }
    return record


def markdown(record: dict[str, Any]) -> str:
    settings = record["settings"]
    lines = [
        f"# Full frame vs crop-to-mask ({settings['preset']}, {settings['size']}x{settings['size']} photo, "
        f"{settings['mask_size']}x{settings['mask_size']} mask, {settings['steps']} steps)",
        "",
        f"Device: {record['environment'].get('device_name')}; medians of {settings['repeats']} calls each.",
        "",
        "| request | working size | image tokens | e2e s | ms / step |",
        "|---|---|---|---|---|",
    ]
    for name, row in record["requests"].items():
        width, height = row["working_size"]
        lines.append(
            f"| {name} | {width}x{height} | {row['image_tokens']} | {row['e2e_s']['median']:.3f} "
            f"| {row['ms_per_step']['median']:.1f} |"
        )
    speedup = record["speedup"]
    lines += ["", f"crop-to-mask: {speedup['e2e']:.2f}x end to end, {speedup['per_step']:.2f}x per step."]
    return "\n".join(lines) + "\n"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``fluxfill bench crop``'s arguments."""
    arguments.add_model_arguments(parser, dtype=False)
    parser.add_argument("--size", type=int, default=1536, help="photo side in pixels (default: 1536)")
    parser.add_argument("--mask-size", type=int, default=128, help="mask side in pixels (default: 128)")
    parser.add_argument("--steps", type=int, default=2, help="sampling steps per call (default: 2)")
    parser.add_argument("--repeats", type=int, default=2, help="timed calls of each request (default: 2)")
    parser.add_argument("--max-megapixels", type=float, default=1.0, help="crop's working resolution")
    parser.add_argument("--out", type=Path, help="JSON record (a .md beside it)")


def main(args: argparse.Namespace) -> int:
    """Run both requests, print the markdown table, write the record (``--out``) and its markdown."""
    from .report import write_json

    record = compare(
        args.preset, args.size, args.mask_size, args.steps, args.repeats, args.max_megapixels, args.device
    )
    report = markdown(record)
    print(report)
    if args.out is not None:
        write_json(record, args.out)
        args.out.with_suffix(".md").write_text(report)
        arguments.say_written([args.out, args.out.with_suffix(".md")])
    return 0
