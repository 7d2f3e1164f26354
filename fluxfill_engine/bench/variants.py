"""``fluxfill bench variants``: every optimization against diffusers' ``FluxFillPipeline``, in one
process, on one random-weight model. The variants are named in :mod:`.catalog`; :mod:`.runner` runs
them, :mod:`.runners` times each, :mod:`.summary` and :mod:`.report` write the record."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import arguments
from .catalog import (
    DEFAULT_PROMPT,
    MODEL_PRESET_DTYPES,
    SCHEMA,
    BenchError,
    known_variants,
    parse_variant,
    split_variant_list,
    unavailable_reason,
)

if TYPE_CHECKING:
    from .runner import BenchSettings


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``fluxfill bench variants``' arguments."""
    parser.description = (
        "Run diffusers' FluxFillPipeline and the engine's variants on the same random-weight model, "
        "inputs and seed in one process, interleaved, and report speed, stages, TFLOP/s, memory, "
        "cold start and drift against the `reference` variant. Writes JSON (--out), markdown "
        "(--markdown) and a speed-vs-drift plot (--plot, needs matplotlib)."
    )
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = (
        "variants: "
        + ", ".join(known_variants())
        + "; 'engine:FIELD=VALUE,...' (the reference preset with EngineConfig fields changed, e.g. "
        "engine:quant=fp8,compile=1), 'PRESET:FIELD=VALUE,...' (e.g. balanced:attention=sdpa), "
        "'diffusers-fbcache:threshold=0.1'.\n"
        "examples:\n"
        "  fluxfill bench variants --preset cpu-tiny --variants diffusers,reference --steps 2 --repeats 1\n"
        "  fluxfill bench variants --preset cpu-mid --steps 8 --repeats 3 "
        "--out benchmarks/results/cpu-mid.json --markdown\n"
        "  fluxfill bench variants --preset gpu-full --variants diffusers,diffusers-compile,balanced,fast "
        "--repeats 3 --plot gpu.png"
    )
    arguments.add_model_arguments(parser)
    parser.add_argument(
        "--variants",
        action="append",
        help="comma list of variants (repeatable; default: every variant this machine can run)",
    )
    parser.add_argument("--size", type=arguments.size, help="request size N or WxH (default: the preset's)")
    arguments.add_run_arguments(parser, steps=28, repeats=3)
    parser.add_argument("--prompt", default=DEFAULT_PROMPT, help="the request's prompt")
    parser.add_argument("--guidance", type=float, default=30.0, help="guidance scale (default: 30)")
    parser.add_argument(
        "--max-sequence-length", type=int, help="T5 tokens (default: the preset's: 32 / 128 / 512)"
    )
    arguments.add_report_arguments(parser, "bench-PRESET.json, rewritten after every repeat")
    parser.add_argument("--plot", type=Path, metavar="PNG", help="speed vs drift plot (needs matplotlib)")
    parser.add_argument(
        "--peak-tflops",
        type=arguments.peaks,
        help="device peak override: NUMBER (for the preset's dtype) or PRECISION=NUMBER,...",
    )
    parser.add_argument(
        "--no-baselines",
        action="store_true",
        help="do not add `diffusers` and `reference` when they are not listed (no ratios / drift then)",
    )
    parser.add_argument(
        "--keep-prompt-cache", action="store_true", help="let the engine reuse encoded prompts across calls"
    )
    parser.add_argument(
        "--reuse-compile-cache",
        action="store_true",
        help="compile with the existing Inductor/Triton caches (default: an empty one, truly cold starts)",
    )
    parser.add_argument(
        "--list-variants", action="store_true", help="list the variants and whether they run here"
    )
    parser.add_argument(
        "--render",
        type=Path,
        metavar="JSON",
        help="run nothing: print the markdown of an existing record (and write --markdown / --plot from it)",
    )


def _settings(args: argparse.Namespace) -> BenchSettings:
    from ..config import parse_dtype
    from .flops import precision_class
    from .runner import BenchSettings

    variants = None
    if args.variants:
        variants = [item for text in args.variants for item in split_variant_list(text)]
    peaks = dict(args.peak_tflops or {})
    if "" in peaks:
        dtype = parse_dtype(args.dtype or MODEL_PRESET_DTYPES[args.preset])
        assert dtype is not None  # a preset always names its dtype
        peaks[precision_class(dtype)] = peaks.pop("")
    return BenchSettings(
        **arguments.model_settings(args),
        variants=variants,
        prompt=args.prompt,
        guidance_scale=args.guidance,
        max_sequence_length=args.max_sequence_length,
        include_baselines=not args.no_baselines,
        keep_prompt_cache=args.keep_prompt_cache,
        fresh_compile_cache=not args.reuse_compile_cache,
        peak_tflops=peaks,
    )


def _list_variants(settings: BenchSettings) -> int:
    from .measure import device_name_of
    from .models import preset_device

    device = preset_device(settings.preset, settings.device)
    print(f"variants on {device} ({device_name_of(device)}):")
    for name in known_variants():
        reason = unavailable_reason(parse_variant(name), device)
        print(f"  {name:24s} {'runs here' if reason is None else 'cannot run: ' + reason}")
    print("  engine:FIELD=VALUE,...   the reference preset with EngineConfig fields changed")
    return 0


def _write_outputs(record: dict[str, Any], out: Path, args: argparse.Namespace) -> None:
    """Print the markdown; write it (``--markdown``) and the plot (``--plot``)."""
    from .report import plot_speed_vs_drift, render_markdown

    report = render_markdown(record)
    print(report)
    written: list[Path | str | None] = [arguments.write_markdown(report, out, args.markdown)]
    if args.plot is not None:
        if plot_speed_vs_drift(record, args.plot):
            written.append(args.plot)
        else:
            print(
                "no plot: matplotlib is not installed (pip install 'fluxfill-engine[bench]')", file=sys.stderr
            )
    arguments.say_written(written)


def main(args: argparse.Namespace) -> int:
    """Run the variants (or list them, or render a saved record); print the markdown table, write
    JSON / markdown / plot."""
    if args.render is not None:
        path: Path = args.render
        if not path.is_file():
            raise FileNotFoundError(f"--render: no such record: {str(path)!r}")
        record = json.loads(path.read_text())
        if record.get("schema") != SCHEMA:
            raise BenchError(f"--render: {str(path)!r} is not a {SCHEMA} record")
        _write_outputs(record, path, args)
        return 0
    from .report import write_json
    from .runner import plan, run_benchmark

    settings = _settings(args)
    settings.check()
    if args.list_variants:
        return _list_variants(settings)
    out = args.out or Path(f"bench-{settings.preset}.json")
    device, specs, skipped = plan(settings)  # fail fast, before building anything
    names = ", ".join(s.name for s in specs)
    print(f"fluxfill bench variants {settings.preset} on {device}: {names}", file=sys.stderr)
    for name, reason in skipped.items():
        print(f"  cannot run here: {name} ({reason})", file=sys.stderr)

    def save(partial: dict[str, Any]) -> None:
        write_json(partial, out)

    record = run_benchmark(settings, on_update=save)
    write_json(record, out)
    print(f"wrote {out}", file=sys.stderr)
    _write_outputs(record, out, args)
    return 0
