"""``fluxfill bench startup``: start to first image, a start from the original diffusers folder (read,
quantize, compile) against a start from a saved engine (``fluxfill prepare``), each in a fresh process
with an empty Inductor cache.

``fluxfill bench startup --out benchmarks/results/startup-cpu-mid`` writes
``.json`` and ``.md``: per start, the engine's start report (read_weights, build, warm_up and the compile
time inside it), the first request after it, the process's import time, and the ratio of the two starts.
The model is the mid-size random model (:func:`~fluxfill_engine.testing.tiny.mid_components`) at
256x256 with the ``fast`` preset in float32 (the CPU's default dtype; ``fast`` on a CPU runs int8
weights, compiled). Each start runs in its own process (``--child``) with a fresh
``TORCHINDUCTOR_CACHE_DIR``, so the folder start compiles from nothing, as after a deploy, and the saved
engine's start has only the compile cache it carries.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

STARTED = time.perf_counter()
SIZE = (256, 256)
STEPS = 2
PRESET = "fast"
DTYPE = "float32"


def _child(mode: str, model: str, out: str | None) -> dict[str, Any]:
    """One start in this process: load ``model``, warm up, run the first request; or prepare ``out``."""
    imported = time.perf_counter()
    from ..config import EngineConfig
    from ..engine import FluxFillEngine
    from ..request import FillRequest
    from ..testing.pictures import picture_and_mask

    import_seconds = time.perf_counter() - STARTED
    config = EngineConfig.preset(PRESET, dtype=DTYPE) if mode != "saved" else None
    start = time.perf_counter()
    engine = FluxFillEngine.from_pretrained(model, config=config)
    engine.warmup(sizes=[SIZE], num_inference_steps=STEPS)
    ready = time.perf_counter() - start
    if mode == "prepare":
        assert out is not None
        manifest = engine.save(out)
        return {"manifest": manifest, "start": engine.start_report.as_dict()}
    image, mask = picture_and_mask(*SIZE)
    first = time.perf_counter()
    engine.run(FillRequest("a white paper cup", image, mask, *SIZE, STEPS, seed=0))
    first_image = time.perf_counter() - first
    return {
        "mode": mode,
        "import_seconds": round(import_seconds, 4),
        "ready_seconds": round(ready, 4),
        "first_request_seconds": round(first_image, 4),
        "start_to_first_image_seconds": round(ready + first_image, 4),
        "start": engine.start_report.as_dict(),
        "child_overhead_seconds": round(imported - STARTED, 4),
    }


def _run_child(mode: str, model: Path, out: Path | None = None) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="inductor-") as cache:
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache}
        command = [
            sys.executable,
            "-m",
            "fluxfill_engine.bench.startup_bench",
            "--child",
            mode,
            "--model",
            str(model),
        ]
        if out is not None:
            command += ["--saved", str(out)]
        wall = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=3600)
        wall = time.perf_counter() - wall
    if done.returncode != 0:
        raise RuntimeError(f"the {mode} start failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["process_wall_seconds"] = round(wall, 4)
    return result


def _folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*.safetensors"))


def measure(repeats: int, work: Path) -> dict[str, Any]:
    """Prepare a saved engine of the mid model, then time ``repeats`` starts of each kind, alternating."""
    import torch

    from ..pipeline import FluxFillPipeline
    from ..testing.tiny import mid_components
    from .measure import environment

    folder = work / "mid"
    FluxFillPipeline(**mid_components()).save_pretrained(folder)
    saved = work / "mid-saved"
    prepared = _run_child("prepare", folder, saved)
    runs: dict[str, list[dict[str, Any]]] = {"folder": [], "saved": []}
    for _ in range(repeats):
        runs["folder"].append(_run_child("folder", folder))
        runs["saved"].append(_run_child("saved", saved))

    def median(kind: str, key: str) -> float:
        return statistics.median(run[key] for run in runs[kind])

    def median_phase(kind: str, phase: str) -> float:
        return statistics.median(run["start"]["seconds"].get(phase, 0.0) for run in runs[kind])

    summary = {
        kind: {
            "start_to_first_image_seconds": median(kind, "start_to_first_image_seconds"),
            "ready_seconds": median(kind, "ready_seconds"),
            "first_request_seconds": median(kind, "first_request_seconds"),
            "import_seconds": median(kind, "import_seconds"),
            "process_wall_seconds": median(kind, "process_wall_seconds"),
            "phases": {
                phase: median_phase(kind, phase) for phase in ("read_weights", "build", "warm_up", "compile")
            },
        }
        for kind in runs
    }
    ratio = (
        summary["folder"]["start_to_first_image_seconds"] / summary["saved"]["start_to_first_image_seconds"]
    )
    return {
        "schema": "fluxfill-startup/1",
        "environment": environment(torch.device("cpu")),
        "settings": {
            "model": "mid (testing.tiny.mid_components)",
            "preset": PRESET,
            "dtype": DTYPE,
            "size": list(SIZE),
            "steps": STEPS,
            "repeats": repeats,
        },
        "bytes": {
            "folder_transformer": _folder_bytes(folder / "transformer"),
            "saved_transformer": prepared["manifest"]["weights"]["bytes"],
            "saved_compile_cache": (prepared["manifest"]["compile_cache"] or {}).get("bytes"),
        },
        "quant_plan": prepared["manifest"]["quant_plan"],
        "prepare": prepared["start"],
        "runs": runs,
        "summary": summary,
        "ratio_start_to_first_image": round(ratio, 3),
    }


def render_markdown(record: dict[str, Any]) -> str:
    env, summary, size = record["environment"], record["summary"], record["bytes"]
    lines = [
        "# Start to first image: original folder vs saved engine (cpu-mid)",
        "",
        f"Device: {env['device_name']} ({env['cpu_count']} CPUs, torch {env['torch']}, {env['platform']}); "
        f"load average at start {env.get('load_average_at_start')}; {env['date']}, git {env['git_sha'][:10]}"
        f"{' (dirty)' if env.get('git_dirty') else ''}.",
        f"Model: mid random FLUX Fill (4 + 8 blocks, width 512), preset `{record['settings']['preset']}` in "
        f"{record['settings']['dtype']} (on a CPU: {record['quant_plan']['mode']} weights, compiled), "
        f"{record['settings']['size'][0]}x{record['settings']['size'][1]}, {record['settings']['steps']} steps; "
        f"medians of {record['settings']['repeats']} starts each, every start a fresh process with an empty "
        "Inductor cache.",
        "",
        "| start from | read weights s | build s | warm-up s (compile s) | first request s | start to first image s | process wall s |",
        "|---|---|---|---|---|---|---|",
    ]
    for kind, label in (("folder", "original folder (quantize + compile)"), ("saved", "saved engine")):
        row = summary[kind]
        phases = row["phases"]
        lines.append(
            f"| {label} | {phases['read_weights']:.2f} | {phases['build']:.2f} | {phases['warm_up']:.2f} "
            f"({phases['compile']:.2f}) | {row['first_request_seconds']:.2f} | "
            f"{row['start_to_first_image_seconds']:.2f} | {row['process_wall_seconds']:.2f} |"
        )
    cache = size["saved_compile_cache"]
    pairs = zip(record["runs"]["folder"], record["runs"]["saved"], strict=True)
    each = [
        f"{folder['start_to_first_image_seconds']:.1f} / {saved['start_to_first_image_seconds']:.1f} s "
        f"({folder['start_to_first_image_seconds'] / saved['start_to_first_image_seconds']:.2f}x)"
        for folder, saved in pairs
    ]
    lines += [
        "",
        f"Each pair of starts (folder / saved, run alternately): {'; '.join(each)}. The machine was shared "
        "(see the load average): single starts vary by up to 2x, the ratio less.",
        "",
        f"**Saved engine: {record['ratio_start_to_first_image']}x faster from start to first image.**",
        "",
        f"Transformer bytes read: {size['folder_transformer'] / 2**20:.1f} MiB from the folder, "
        f"{size['saved_transformer'] / 2**20:.1f} MiB from the saved engine; compile cache "
        f"{'none' if cache is None else f'{cache / 2**20:.1f} MiB'}.",
        "The compile column is the compiler's own time inside the warm-up (torch's dynamo metrics); from the "
        "saved engine Inductor's kernels come from the carried cache, while dynamo still traces the blocks "
        "and AOTAutograd still runs, so most of the compile time remains on a CPU; the build (fusing and "
        "quantizing) is what the saved engine removes outright. The first request runs after the warm-up "
        "(a new prompt: T5 and the VAE run uncached).",
        "Produced by `fluxfill bench startup --out benchmarks/results/startup-cpu-mid`.",
    ]
    return "\n".join(lines) + "\n"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``fluxfill bench startup``'s arguments (``--child``, ``--model`` and ``--saved`` are the child
    process's, hidden)."""
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("benchmarks/results/startup-cpu-mid"),
        help="record path without suffix: writes .json and .md (default: benchmarks/results/startup-cpu-mid)",
    )
    parser.add_argument("--repeats", type=int, default=2, help="starts of each kind (default: 2)")
    parser.add_argument("--child", choices=("prepare", "folder", "saved"), help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--saved", help=argparse.SUPPRESS)
    parser.add_argument("--render", action="store_true", help="only write the .md again from the .json")


def main(args: argparse.Namespace) -> int:
    """Time both kinds of start and write the record and its markdown (or, with ``--child``, be one
    start)."""
    if args.render:
        record = json.loads(args.out.with_suffix(".json").read_text())
        args.out.with_suffix(".md").write_text(render_markdown(record))
        return 0
    if args.child is not None:
        print(json.dumps(_child(args.child, args.model, args.saved), default=str))
        return 0
    with tempfile.TemporaryDirectory(prefix="fluxfill-startup-") as work:
        record = measure(args.repeats, Path(work))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(record, indent=2, default=str) + "\n")
    args.out.with_suffix(".md").write_text(render_markdown(record))
    print(render_markdown(record))
    return 0


def run(argv: Sequence[str] | None = None) -> int:
    """The command from its own argument list: how each start's child process runs, so its clock starts
    at this module's import and not at ``fluxfill``'s parser."""
    parser = argparse.ArgumentParser(prog="python -m fluxfill_engine.bench.startup_bench")
    add_arguments(parser)
    return main(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(run())
