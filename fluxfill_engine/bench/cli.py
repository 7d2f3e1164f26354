"""``fluxfill bench VERB``: registers each benchmark's verb. A verb's module exports
``add_arguments(parser)`` and ``main(args) -> int``, and imports nothing heavy until ``main`` runs, so
``fluxfill bench --help`` loads no torch."""

from __future__ import annotations

import argparse
import importlib
from typing import Any

# verb -> (its module, one line of help), in the order ``fluxfill bench --help`` lists them.
VERBS: dict[str, tuple[str, str]] = {
    "variants": (
        "fluxfill_engine.bench.variants",
        "every optimization against diffusers' FluxFillPipeline on one random-weight model: speed, "
        "stages, TFLOP/s, memory, drift",
    ),
    "lora": (
        "fluxfill_engine.bench.lora_bench",
        "what LoRAs cost per step and per switch: the engine's strategies beside diffusers + peft",
    ),
    "batch": (
        "fluxfill_engine.bench.batch_bench",
        "images per second of N requests one by one against batches of 1, 2, 4, 8",
    ),
    "crop": (
        "fluxfill_engine.bench.crop_compare",
        "full frame against crop-to-mask for a small mask in a large photo",
    ),
    "step-cache": (
        "fluxfill_engine.bench.step_cache_sweep",
        "the step caches across thresholds: skip rate, speed and drift, engine beside diffusers",
    ),
    "serve-load": (
        "fluxfill_engine.bench.serve_load",
        "open-loop load test of `fluxfill serve`: latency, throughput, 429 rate, every task ending once",
    ),
    "startup": (
        "fluxfill_engine.bench.startup_bench",
        "start to first image: a saved engine against the original folder, each in a fresh process",
    ),
    "memory-plans": (
        "fluxfill_engine.bench.memory_plans",
        "each memory plan's cost, its images against the resident run's, its estimated and measured peak",
    ),
    "gpu-run": (
        "fluxfill_engine.bench.gpu_run.main",
        "the one-command GPU run (machine, correctness, latency, e2e, step cache); --dry-run on a CPU",
    ),
    "context-parallel": (
        "fluxfill_engine.bench.context_parallel",
        "ms per step of context parallel on N = 1, 2, 4, 8 GPUs under torchrun; --dry-run on a CPU",
    ),
}


def add_bench_parser(commands: Any) -> argparse.ArgumentParser:
    """Add ``bench`` and its verbs to ``fluxfill``'s subparsers."""
    bench = commands.add_parser(
        "bench",
        help="benchmarks: every optimization against diffusers, LoRA, batching, serving, the GPU run",
        description="Every benchmark of fluxfill-engine, one verb each (fluxfill bench VERB --help).",
    )
    verbs = bench.add_subparsers(dest="bench_verb", metavar="VERB", required=True)
    for name, (module, summary) in VERBS.items():
        parser = verbs.add_parser(name, help=summary, description=summary)
        importlib.import_module(module).add_arguments(parser)
        parser.set_defaults(bench_verb=name, bench_parser=parser)
    return bench


def run_bench_command(args: argparse.Namespace) -> int:
    """Run the verb ``args`` were parsed for."""
    module, _ = VERBS[args.bench_verb]
    return importlib.import_module(module).main(args)
