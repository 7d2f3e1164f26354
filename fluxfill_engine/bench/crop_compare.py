"""Full frame against crop-to-mask: what ``FillRequest.crop_to_mask`` saves for a small mask in a
large photo, through the engine's public API.

    python -m fluxfill_engine.bench.crop_compare --preset cpu-mid --steps 2 \\
        --out benchmarks/results/crop-cpu-mid.json

One engine on the preset's random-weight model; one photo of ``--size`` pixels with a ``--mask-size``
square mask; two requests, interleaved over ``--repeats`` rounds after a warm-up of each: the full
frame at the photo's size (``width``/``height`` given, so the transformer sees the whole photo) and
``crop_to_mask`` (the box around the mask at about ``--max-megapixels``). Reported per request: the
working size, image tokens, end-to-end seconds and transformer milliseconds per step (medians).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import torch

from ..config import EngineConfig
from ..engine import FillRequest, FluxFillEngine
from ..pipeline import FluxFillPipeline
from .catalog import MODEL_PRESET_NAMES
from .models import MODEL_PRESETS
from .report import write_json
from .runner import environment, summarize


def inputs(size: int, mask_size: int) -> tuple[PIL.Image.Image, PIL.Image.Image]:
    """A deterministic photo and a centred square mask."""
    rng = np.random.default_rng(0)
    ys, xs = np.mgrid[0:size, 0:size]
    base = np.stack([xs / size, ys / size, (xs + ys) / (2 * size)], axis=-1)
    picture = np.round((0.7 * base + 0.3 * rng.random((size, size, 3))) * 255).astype(np.uint8)
    mask = np.zeros((size, size), np.uint8)
    start = (size - mask_size) // 2
    mask[start : start + mask_size, start : start + mask_size] = 255
    return PIL.Image.fromarray(picture), PIL.Image.fromarray(mask)


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
    model = MODEL_PRESETS[preset]
    target = torch.device(device or ("cuda" if model.device_type == "cuda" else "cpu"))
    components = model.build(0, target)
    engine = FluxFillEngine(FluxFillPipeline(**components), config=EngineConfig(), device=target)
    image, mask = inputs(size, mask_size)
    common = dict(prompt="a white paper cup", image=image, mask=mask, num_inference_steps=steps, seed=0)
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="cpu-tiny", choices=MODEL_PRESET_NAMES)
    parser.add_argument("--size", type=int, default=1536, help="photo side in pixels (default: 1536)")
    parser.add_argument("--mask-size", type=int, default=128, help="mask side in pixels (default: 128)")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--max-megapixels", type=float, default=1.0, help="crop's working resolution")
    parser.add_argument("--device")
    parser.add_argument("--out", type=Path, help="JSON record (a .md beside it)")
    args = parser.parse_args(argv)
    record = compare(
        args.preset, args.size, args.mask_size, args.steps, args.repeats, args.max_megapixels, args.device
    )
    report = markdown(record)
    print(report)
    if args.out is not None:
        write_json(record, args.out)
        args.out.with_suffix(".md").write_text(report)
        print(f"wrote {args.out} and {args.out.with_suffix('.md')}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
