"""``fluxfill bench memory-plans``: what each memory plan's placement costs, and that it gives the
resident run's images.

    fluxfill bench memory-plans --preset cpu-mid --steps 4 --out benchmarks/results/memory-plans-cpu-mid.json

One engine per placement (:data:`PLACEMENTS`: the :class:`~fluxfill_engine.config.EngineConfig` memory
fields) on the preset's random-weight model; after a warm-up of each, ``--repeats`` rounds of one
request per engine, interleaved, each round with a new prompt (so offloaded text encoders move every
time, their worst case). Reported per placement: the
end-to-end and text-encoding seconds (medians), the ratio to the resident run, whether the images equal
the resident run's bit for bit, and the estimated peak (:func:`~fluxfill_engine.memory_plan.
estimate_config`, for the preset's model at the request's size). On a CPU the "device" is the CPU:
the copies are made and swapped as on a GPU, so the numbers are the mechanism's host-side cost, not
PCIe transfers.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from . import arguments
from .catalog import MODEL_PRESET_NAMES

PLACEMENTS: dict[str, dict[str, Any]] = {
    "resident": {},
    "cpu_offload": {"cpu_offload": True},
    "text_encoders_on_cpu": {"text_encoders_on_cpu": True},
    "block_streaming": {"block_streaming": True},
    "block_streaming + cpu_offload": {"block_streaming": True, "cpu_offload": True},
}


def _config(engine_preset: str, fields: dict[str, Any]) -> Any:
    from ..config import EngineConfig

    streaming = {"compile": False, "precompute_modulation": False} if fields.get("block_streaming") else {}
    return EngineConfig.preset(engine_preset, **fields, **streaming)


def measure(
    preset: str = "cpu-mid",
    size: int = 256,
    steps: int = 4,
    repeats: int = 3,
    engine_preset: str = "reference",
) -> dict[str, Any]:
    """Run every placement and return the record (see the module docstring). On CUDA the engines run
    one after another (one model on the device at a time), each with its peak device memory measured
    after it was placed (``torch.cuda.max_memory_allocated``), for comparing with the estimate."""
    import gc

    import numpy as np
    import torch

    from .. import FillRequest, FluxFillEngine, FluxFillPipeline
    from ..memory_plan import ModelConfigs, estimate_config
    from ..testing.pictures import picture_and_mask
    from .measure import environment, summarize
    from .models import MODEL_PRESETS, preset_device

    target = preset_device(preset, None)
    image, mask = picture_and_mask(size, size, mask_size=size // 4)
    words = ["red", "blue", "green", "old", "new", "small", "large", "bright", "dark"]
    record: dict[str, Any] = {
        "schema": "fluxfill-memory-plans/1",
        "environment": environment(target),
        "settings": dict(preset=preset, engine_preset=engine_preset, size=size, steps=steps, repeats=repeats),
        "placements": {},
    }

    def request(prompt: str) -> Any:
        return FillRequest(prompt, image, mask, size, size, steps, seed=0, max_megapixels=1.0)

    def build(fields: dict[str, Any]) -> FluxFillEngine:
        components = MODEL_PRESETS[preset].build(0, target)
        return FluxFillEngine(FluxFillPipeline(**components), _config(engine_preset, fields), device=target)

    cuda = target.type == "cuda"
    engines = {} if cuda else {name: build(fields) for name, fields in PLACEMENTS.items()}
    firsts: dict[str, list[Any]] = {}
    runs: dict[str, list[Any]] = {name: [] for name in PLACEMENTS}
    measured: dict[str, dict[str, int]] = {}
    estimates: dict[str, int] = {}
    for name, fields in PLACEMENTS.items():
        engine = engines[name] if not cuda else build(fields)
        estimate = estimate_config(engine.config, size, size, 1, ModelConfigs.of_pipeline(engine.pipeline))
        estimates[name] = estimate.peak_bytes
        if cuda:
            gc.collect()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(target)
        # warm-up; the images every placement compares
        firsts[name] = [np.asarray(picture) for picture in engine.run(request("a white paper cup")).images]
        if cuda:  # one engine at a time on the device: its requests now, its peak, then it goes
            runs[name] = [engine.run(request(f"a {words[i % len(words)]} cup {i}")) for i in range(repeats)]
            measured[name] = {
                "max_allocated_bytes": torch.cuda.max_memory_allocated(target),
                "max_reserved_bytes": torch.cuda.max_memory_reserved(target),
            }
            del engine
    for i in range(repeats if not cuda else 0):  # interleaved: a change in the load reaches every placement
        for name, engine in engines.items():
            runs[name].append(engine.run(request(f"a {words[i % len(words)]} cup {i}")))
    for name, results in runs.items():
        equal = zip(firsts[name], firsts["resident"], strict=True)
        record["placements"][name] = {
            "fields": PLACEMENTS[name],
            "e2e_s": summarize([r.timings["total"] for r in results]),
            "text_encode_s": summarize([r.timings["text_encode"] for r in results]),
            "equal_to_resident": all(np.array_equal(a, b) for a, b in equal),
            "estimated_peak_bytes": estimates[name],
            **measured.get(name, {}),
        }
    resident = record["placements"]["resident"]["e2e_s"]["median"]
    for entry in record["placements"].values():
        entry["vs_resident"] = entry["e2e_s"]["median"] / resident
    return record


def markdown(record: dict[str, Any]) -> str:
    settings = record["settings"]
    lines = [
        f"# Memory plans on {record['environment']['device']} ({settings['preset']}, "
        f"{settings['size']}x{settings['size']}, {settings['steps']} steps, a new prompt per request)",
        "",
        f"Device: {record['environment']['device_name']} ({record['environment']['cpu_count']} cores, load "
        f"average at start {record['environment']['load_average_at_start']}); medians of "
        f"{settings['repeats']} requests. On a CPU the copies are host memcpy: the mechanism's cost, "
        "not PCIe.",
        "",
        "| placement | e2e s | vs resident | text encode s | images equal resident | estimated peak MiB "
        "| measured peak MiB (allocated) |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, entry in record["placements"].items():
        allocated = entry.get("max_allocated_bytes")
        lines.append(
            f"| {name} | {entry['e2e_s']['median']:.3f} | {entry['vs_resident']:.2f}x | "
            f"{entry['text_encode_s']['median']:.3f} | {'yes' if entry['equal_to_resident'] else 'NO'} | "
            f"{entry['estimated_peak_bytes'] / 2**20:.0f} | "
            f"{'-' if allocated is None else f'{allocated / 2**20:.0f}'} |"
        )
    lines += [
        "",
        f"Produced by `fluxfill bench memory-plans --preset {settings['preset']} --engine-preset "
        f"{settings['engine_preset']} --size {settings['size']} --steps {settings['steps']} --repeats "
        f"{settings['repeats']}`.",
    ]
    return "\n".join(lines) + "\n"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``fluxfill bench memory-plans``' arguments."""
    parser.add_argument(
        "--preset",
        default="cpu-mid",
        choices=list(MODEL_PRESET_NAMES),
        help="the random-weight model (default: cpu-mid)",
    )
    parser.add_argument(
        "--engine-preset", default="reference", help="the engine configuration preset (default: reference)"
    )
    parser.add_argument("--size", type=int, default=256, help="image side in pixels (default: 256)")
    parser.add_argument("--steps", type=int, default=4, help="sampling steps per request (default: 4)")
    parser.add_argument("--repeats", type=int, default=3, help="timed requests per placement (default: 3)")
    parser.add_argument("--out", type=Path, help="write the record here (JSON) and a .md beside it")


def main(args: argparse.Namespace) -> int:
    """Run every placement, print the markdown table, write the record (``--out``) and its markdown."""
    from .report import write_json

    record = measure(args.preset, args.size, args.steps, args.repeats, args.engine_preset)
    text = markdown(record)
    print(text)
    if args.out is not None:
        write_json(record, args.out)
        args.out.with_suffix(".md").write_text(text)
        arguments.say_written([args.out, args.out.with_suffix(".md")])
    return 0
