"""``fluxfill bench lora``: what LoRAs cost per step and per switch, engine strategies beside diffusers.

On one random-weight model (``--preset``) and one request, for every rank (``--ranks``, default
16 and 64) and adapter count (``--counts``, default 1 and 3):

- each engine strategy (``merge``, ``side``; ``--compile`` compiles the blocks) through the public
  API (``FluxFillPipeline.set_engine_loras`` + ``generate``): transformer milliseconds per step
  (``denoise`` minus the switch, over the steps) and the switch seconds the call reports, every timed
  call switching (the set's scales alternate, so each call is a new set);
- ``diffusers`` + peft on the same weights: ``load_lora_weights`` per file (load seconds),
  ``set_adapters`` with weights (its switch), the transformer's forward per step.

Each runner also runs the base model (no LoRA) for the overhead ratio. LoRA files are written in the
test's way: random ``lora_A``/``lora_B`` pairs in diffusers' format on the blocks' attention and MLP
layers (what FLUX LoRA trainers target), into a temporary folder. Runs are sequential (not interleaved
like the main benchmark): read small differences with the machine's noise in mind.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..config import LORA_STRATEGIES, EngineConfig, parse_dtype
from . import arguments
from .catalog import BenchError

if TYPE_CHECKING:
    import torch

SCHEMA = "fluxfill-lora-bench/1"
# Where FLUX LoRA trainers put adapters: every attention projection and MLP layer of the blocks.
TARGET_SUFFIXES = (
    "attn.to_q",
    "attn.to_k",
    "attn.to_v",
    "attn.to_out.0",
    "attn.add_q_proj",
    "attn.add_k_proj",
    "attn.add_v_proj",
    "attn.to_add_out",
    "ff.net.0.proj",
    "ff.net.2",
    "ff_context.net.0.proj",
    "ff_context.net.2",
    "proj_mlp",
    "proj_out",
)
ENGINE_STRATEGIES = tuple(s for s in LORA_STRATEGIES if s != "auto")


@dataclass
class LoraBenchSettings:
    """What to measure; the model, request and repeat fields mean what they mean in ``fluxfill bench``."""

    preset: str = "cpu-tiny"
    width: int | None = None
    height: int | None = None
    steps: int = 8
    repeats: int = 3
    warmup: int = 1
    seed: int = 0
    device: str | None = None
    dtype: str | None = None
    ranks: tuple[int, ...] = (16, 64)
    counts: tuple[int, ...] = (1, 3)
    strategies: tuple[str, ...] = ENGINE_STRATEGIES
    compile: bool = False
    diffusers: bool = True
    progress: bool = True
    note: str | None = None

    def check(self) -> None:
        from .runner import check_run_settings

        check_run_settings(self)
        if not self.ranks or any(not isinstance(r, int) or r < 1 for r in self.ranks):
            raise BenchError(f"--ranks must be positive ints, got {self.ranks!r}")
        if not self.counts or any(not isinstance(c, int) or not 1 <= c <= 3 for c in self.counts):
            raise BenchError(f"--counts must be ints in [1, 3] (EngineConfig.max_loras), got {self.counts!r}")
        unknown = [s for s in self.strategies if s not in ENGINE_STRATEGIES]
        if unknown:
            raise BenchError(f"--strategies must be among {list(ENGINE_STRATEGIES)}, got {unknown}")
        try:
            parse_dtype(self.dtype, "dtype")
        except ValueError as err:
            raise BenchError(str(err)) from err


def write_lora_files(
    transformer: torch.nn.Module, folder: Path, ranks: Sequence[int], count: int, seed: int = 0
) -> dict[int, list[Path]]:
    """``count`` random LoRA files per rank for ``transformer``'s block layers (diffusers' format)."""
    import torch
    from safetensors.torch import save_file

    layers = [
        (name, module)
        for name, module in transformer.named_modules()
        if isinstance(module, torch.nn.Linear)
        and name.startswith(("transformer_blocks.", "single_transformer_blocks."))
        and name.endswith(TARGET_SUFFIXES)
    ]
    generator = torch.Generator().manual_seed(seed)
    dtype = next(transformer.parameters()).dtype
    files: dict[int, list[Path]] = {}
    for rank in ranks:
        for index in range(count):
            tensors = {}
            for name, module in layers:
                # A delta of about 10% of the weights' scale: a visible change, finite activations.
                down = torch.randn(rank, module.in_features, generator=generator) / math.sqrt(
                    module.in_features
                )
                up = torch.randn(module.out_features, rank, generator=generator) * (0.1 / math.sqrt(rank))
                tensors[f"transformer.{name}.lora_A.weight"] = down.to(dtype).contiguous()
                tensors[f"transformer.{name}.lora_B.weight"] = up.to(dtype).contiguous()
            path = folder / f"rank{rank}-{index}.safetensors"
            save_file(tensors, str(path))
            files.setdefault(rank, []).append(path)
    return files


def _median(values: Sequence[float]) -> float | None:
    return statistics.median(values) if values else None


@dataclass
class _Row:
    runner: str
    adapters: int
    rank: int | None
    ms_per_step: list[float] = field(default_factory=list)
    switch_s: list[float] = field(default_factory=list)
    load_s: float | None = None

    def summary(self, base_ms: float | None) -> dict[str, Any]:
        ms = _median(self.ms_per_step)
        return {
            "runner": self.runner,
            "adapters": self.adapters,
            "rank": self.rank,
            "ms_per_step": ms,
            "ms_per_step_all": self.ms_per_step,
            "overhead": None if ms is None or not base_ms else ms / base_ms - 1.0,
            "switch_s": _median(self.switch_s),
            "switch_s_all": self.switch_s,
            "load_s": self.load_s,
        }


def _engine_rows(
    settings: LoraBenchSettings,
    components: dict[str, Any],
    call: Any,
    files: dict[int, list[Path]],
    strategy: str,
) -> list[dict[str, Any]]:
    from .. import FluxFillPipeline

    config = EngineConfig(
        lora_strategy=strategy, compile=settings.compile, max_lora_rank=max(settings.ranks), max_loras=3
    )
    name = f"engine-{strategy}" + ("-compiled" if settings.compile else "")
    pipe = FluxFillPipeline(**components).configure(config)
    pipe.set_progress_bar_config(disable=True)
    steps = settings.steps

    def run(loras: list[dict[str, Any]] | None) -> tuple[float, float, float]:
        pipe.set_engine_loras(loras)
        result = pipe.generate(call())
        lora = result.stats["loras"]
        switch = lora.get("switch_seconds", 0.0)
        return (result.timings["denoise"] - switch) / steps * 1000.0, switch, lora.get("load_seconds", 0.0)

    base = _Row(name, 0, None)
    for _ in range(settings.warmup):
        run(None)
    for _ in range(settings.repeats):
        base.ms_per_step.append(run(None)[0])
    base_ms = _median(base.ms_per_step)
    rows = [base.summary(base_ms)]
    for rank in settings.ranks:
        for count in settings.counts:
            row = _Row(name, count, rank)
            paths = files[rank][:count]
            pipe.runtime.lora_cache(config.lora_cache_size).clear()  # the load is read from disk
            _, _, row.load_s = run([{"path": str(p), "scale": 1.0} for p in paths])  # loads: not timed
            for _ in range(settings.warmup):
                run([{"path": str(p), "scale": 0.9} for p in paths])
            for repeat in range(settings.repeats):
                scale = 1.0 if repeat % 2 == 0 else 0.9  # a new set every call: every call switches
                ms, switch, _ = run([{"path": str(p), "scale": scale} for p in paths])
                row.ms_per_step.append(ms)
                row.switch_s.append(switch)
            rows.append(row.summary(base_ms))
    pipe.set_engine_loras(None)
    pipe.generate(call())  # back to the base weights before the next runner
    return rows


def _diffusers_rows(
    settings: LoraBenchSettings, components: dict[str, Any], inputs: Any, files: dict[int, list[Path]]
) -> list[dict[str, Any]]:
    import diffusers

    from .measure import ForwardIntervals, Timer

    device = next(components["transformer"].parameters()).device
    clock = Timer(device)
    pipe = diffusers.FluxFillPipeline(**components)
    pipe.set_progress_bar_config(disable=True)
    forwards = ForwardIntervals(clock).watch(pipe.transformer, "transformer")

    def run() -> float:
        forwards.clear()
        pipe(**inputs.diffusers_kwargs())
        clock.sync()
        return 1000.0 * forwards.total_seconds("transformer") / len(forwards.intervals["transformer"])

    try:
        base = _Row("diffusers+peft", 0, None)
        for _ in range(settings.warmup):
            run()
        for _ in range(settings.repeats):
            base.ms_per_step.append(run())
        base_ms = _median(base.ms_per_step)
        rows = [base.summary(base_ms)]
        loaded: dict[tuple[int, int], float] = {}
        for rank in settings.ranks:
            for index, path in enumerate(files[rank][: max(settings.counts)]):
                clock.sync()
                start = time.perf_counter()
                pipe.load_lora_weights(str(path), adapter_name=f"r{rank}_{index}")
                clock.sync()
                loaded[(rank, index)] = time.perf_counter() - start
        for rank in settings.ranks:
            for count in settings.counts:
                row = _Row("diffusers+peft", count, rank)
                row.load_s = sum(loaded[(rank, i)] for i in range(count))
                names = [f"r{rank}_{i}" for i in range(count)]
                pipe.set_adapters(names, [0.9] * count)
                for _ in range(settings.warmup):
                    run()
                for repeat in range(settings.repeats):
                    scale = 1.0 if repeat % 2 == 0 else 0.9
                    clock.sync()
                    start = time.perf_counter()
                    pipe.set_adapters(names, [scale] * count)
                    clock.sync()
                    row.switch_s.append(time.perf_counter() - start)
                    row.ms_per_step.append(run())
                rows.append(row.summary(base_ms))
    finally:
        forwards.remove()
        if getattr(pipe.transformer, "peft_config", None):
            pipe.unload_lora_weights()
    return rows


def run_lora_benchmark(settings: LoraBenchSettings) -> dict[str, Any]:
    """Measure and return the record (``schema``, ``environment``, ``settings``, ``rows``)."""
    from .measure import environment
    from .models import MODEL_PRESETS, preset_device
    from .runners import BenchInputs

    settings.check()
    preset = MODEL_PRESETS[settings.preset]
    device = preset_device(settings.preset, settings.device)
    dtype = parse_dtype(settings.dtype) or preset.dtype
    width, height = settings.width or preset.width, settings.height or preset.height
    components = preset.build(settings.seed, device, dtype)
    inputs = BenchInputs.picture(width, height, settings.steps, settings.seed, preset.max_sequence_length)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="fluxfill-lora-bench-") as folder:
        files = write_lora_files(
            components["transformer"], Path(folder), settings.ranks, max(settings.counts), settings.seed
        )
        for strategy in settings.strategies:
            if settings.progress:
                print(f"lora bench: engine {strategy}", file=sys.stderr)
            rows += _engine_rows(settings, components, inputs.call, files, strategy)
        if settings.diffusers:
            if settings.progress:
                print("lora bench: diffusers + peft", file=sys.stderr)
            rows += _diffusers_rows(settings, components, inputs, files)
    return {
        "schema": SCHEMA,
        "environment": environment(device),
        "settings": {
            **dataclasses.asdict(settings),
            "width": width,
            "height": height,
            "dtype": str(dtype).replace("torch.", ""),
        },
        "rows": rows,
    }


def render_lora_markdown(record: dict[str, Any]) -> str:
    """The record as a markdown table (one row per runner, adapter count and rank)."""
    env, settings = record["environment"], record["settings"]

    def number(value: float | None, scale: float = 1.0, digits: int = 2) -> str:
        return "-" if value is None else f"{value * scale:.{digits}f}"

    lines = [
        f"# LoRA: per-step and switch cost ({settings['preset']}, {env['device_name']})",
        "",
        f"{settings['width']}x{settings['height']}, {settings['steps']} steps, {settings['dtype']}, "
        f"{settings['repeats']} timed calls per row (medians), torch {env['torch']}, diffusers "
        f"{env['diffusers']}. Every timed call switches sets (its scales alternate); a request with "
        "the set of the one before switches nothing.",
        "",
        "| runner | LoRAs | rank | ms/step | vs no LoRA | switch ms | load ms |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in record["rows"]:
        overhead = row["overhead"]
        lines.append(
            f"| {row['runner']} | {row['adapters']} | {row['rank'] or '-'} | {number(row['ms_per_step'])} | "
            f"{'-' if overhead is None else f'{overhead * 100:+.1f}%'} | {number(row['switch_s'], 1000)} | "
            f"{number(row['load_s'], 1000)} |"
        )
    if record["settings"].get("note"):
        lines += ["", record["settings"]["note"]]
    return "\n".join(lines) + "\n"


# ---- the verb --------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``fluxfill bench lora``'s arguments."""
    arguments.add_model_arguments(parser)
    parser.add_argument("--size", type=arguments.size, help="request size N or WxH (default: the preset's)")
    arguments.add_run_arguments(parser, steps=28, repeats=3)
    parser.add_argument("--ranks", type=arguments.ints, default=(16, 64), help="LoRA ranks (default: 16,64)")
    parser.add_argument(
        "--counts", type=arguments.ints, default=(1, 3), help="LoRAs per request (default: 1,3)"
    )
    parser.add_argument(
        "--strategies",
        type=arguments.names,
        default=ENGINE_STRATEGIES,
        help=f"engine strategies (default: {','.join(ENGINE_STRATEGIES)})",
    )
    parser.add_argument("--compile", action="store_true", help="compile the engine's blocks")
    parser.add_argument("--no-diffusers", action="store_true", help="skip the diffusers + peft rows")
    arguments.add_report_arguments(parser, "bench-lora-PRESET.json")


def main(args: argparse.Namespace) -> int:
    """Measure, print the markdown table, write the JSON record (and ``--markdown``)."""
    from .report import write_json

    settings = LoraBenchSettings(
        **arguments.model_settings(args),
        ranks=tuple(args.ranks),
        counts=tuple(args.counts),
        strategies=tuple(args.strategies),
        compile=args.compile,
        diffusers=not args.no_diffusers,
    )
    settings.check()
    record = run_lora_benchmark(settings)
    out = args.out or Path(f"bench-lora-{settings.preset}.json")
    write_json(record, out)
    report = render_lora_markdown(record)
    print(report)
    arguments.say_written([out, arguments.write_markdown(report, out, args.markdown)])
    return 0
