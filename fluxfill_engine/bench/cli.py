"""``fluxfill bench``: its arguments and the command."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .catalog import (
    DEFAULT_PROMPT,
    MODEL_PRESET_DTYPES,
    MODEL_PRESET_NAMES,
    SCHEMA,
    BenchError,
    known_variants,
)

if TYPE_CHECKING:
    from .runner import BenchSettings


def _size(text: str) -> tuple[int, int]:
    parts = text.lower().replace(",", "x").split("x")
    try:
        values = [int(p) for p in parts]
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"size must be N or WxH, got {text!r}") from err
    if len(values) == 1:
        values = values * 2
    if len(values) != 2:
        raise argparse.ArgumentTypeError(f"size must be N or WxH, got {text!r}")
    return values[0], values[1]


def _peaks(text: str) -> dict[str, float]:
    peaks: dict[str, float] = {}
    for item in (p.strip() for p in text.split(",") if p.strip()):
        key, sep, value = item.partition("=")
        try:
            if sep:
                peaks[key.strip()] = float(value)
            else:
                peaks[""] = float(key)
        except ValueError as err:
            raise argparse.ArgumentTypeError(
                f"--peak-tflops takes NUMBER or PRECISION=NUMBER,... (bf16, fp16, fp8, int8, tf32, fp32); "
                f"got {text!r}"
            ) from err
    return peaks


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(p) for p in text.split(",") if p.strip())
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected comma-separated ints, got {text!r}") from err


def add_bench_parser(commands: Any) -> argparse.ArgumentParser:
    """Add the ``bench`` subcommand to ``fluxfill``'s subparsers."""
    bench = commands.add_parser(
        "bench",
        help="benchmark every optimization against diffusers' FluxFillPipeline",
        description=(
            "Run diffusers' FluxFillPipeline and the engine's variants on the same random-weight model, "
            "inputs and seed in one process, interleaved, and report speed, stages, TFLOP/s, memory, "
            "cold start and drift against the `reference` variant. Writes JSON (--out), markdown "
            "(--markdown) and a speed-vs-drift plot (--plot, needs matplotlib)."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=(
            "variants: "
            + ", ".join(known_variants())
            + "; 'engine:FIELD=VALUE,...' (the reference preset with EngineConfig fields changed, e.g. "
            "engine:quant=fp8,compile=1), 'PRESET:FIELD=VALUE,...' (e.g. balanced:attention=sdpa), "
            "'diffusers-fbcache:threshold=0.1'.\n"
            "examples:\n"
            "  fluxfill bench --preset cpu-tiny --variants diffusers,reference --steps 2 --repeats 1\n"
            "  fluxfill bench --preset cpu-mid --steps 8 --repeats 3 --out benchmarks/results/cpu-mid.json "
            "--markdown\n"
            "  fluxfill bench --preset gpu-full --variants diffusers,diffusers-compile,balanced,fast "
            "--repeats 3 --plot gpu.png"
        ),
    )
    bench.add_argument("--preset", default="cpu-tiny", choices=list(MODEL_PRESET_NAMES), help="model size")
    bench.add_argument(
        "--variants",
        action="append",
        help="comma list of variants (repeatable; default: every variant this machine can run)",
    )
    bench.add_argument("--size", type=_size, help="request size N or WxH (default: the preset's)")
    bench.add_argument("--steps", type=int, default=28, help="sampling steps per call (default: 28)")
    bench.add_argument("--repeats", type=int, default=3, help="timed calls per variant (default: 3)")
    bench.add_argument(
        "--warmup", type=int, default=1, help="untimed calls per variant first; the first is the cold one"
    )
    bench.add_argument("--seed", type=int, default=0, help="seed of the weights and the request (default: 0)")
    bench.add_argument("--prompt", default=DEFAULT_PROMPT, help="the request's prompt")
    bench.add_argument("--guidance", type=float, default=30.0, help="guidance scale (default: 30)")
    bench.add_argument(
        "--max-sequence-length", type=int, help="T5 tokens (default: the preset's: 32 / 128 / 512)"
    )
    bench.add_argument("--device", help="torch device (default: cpu for cpu-*, cuda for gpu-full)")
    bench.add_argument(
        "--dtype", choices=["float32", "bfloat16", "float16"], help="weights dtype (default: the preset's)"
    )
    bench.add_argument(
        "--out", type=Path, help="JSON record (default: bench-PRESET.json); rewritten after every repeat"
    )
    bench.add_argument(
        "--markdown",
        nargs="?",
        const="",
        metavar="PATH",
        help="also write the markdown report (to PATH, or next to --out as .md)",
    )
    bench.add_argument("--plot", type=Path, metavar="PNG", help="speed vs drift plot (needs matplotlib)")
    bench.add_argument(
        "--peak-tflops",
        type=_peaks,
        help="device peak override: NUMBER (for the preset's dtype) or PRECISION=NUMBER,...",
    )
    bench.add_argument(
        "--no-baselines",
        action="store_true",
        help="do not add `diffusers` and `reference` when they are not listed (no ratios / drift then)",
    )
    bench.add_argument(
        "--keep-prompt-cache", action="store_true", help="let the engine reuse encoded prompts across calls"
    )
    bench.add_argument(
        "--reuse-compile-cache",
        action="store_true",
        help="compile with the existing Inductor/Triton caches (default: an empty one, truly cold starts)",
    )
    bench.add_argument(
        "--list-variants", action="store_true", help="list the variants and whether they run here"
    )
    bench.add_argument("--no-progress", action="store_true", help="no progress bar")
    bench.add_argument("--note", help="free text stored in the record and shown in the markdown")
    lora = bench.add_argument_group(
        "LoRA",
        "--lora runs the LoRA benchmark instead: ms/step and switch time per strategy, beside diffusers + peft",
    )
    lora.add_argument(
        "--lora", action="store_true", help="run the LoRA benchmark (fluxfill_engine.bench.lora_bench)"
    )
    lora.add_argument("--lora-ranks", type=_ints, default=(16, 64), help="LoRA ranks (default: 16,64)")
    lora.add_argument("--lora-counts", type=_ints, default=(1, 3), help="LoRAs per request (default: 1,3)")
    lora.add_argument(
        "--lora-strategies", default="merge,side", help="engine strategies (default: merge,side)"
    )
    lora.add_argument("--lora-compile", action="store_true", help="compile the engine's blocks")
    lora.add_argument("--no-diffusers", action="store_true", help="skip the diffusers + peft rows")
    bench.add_argument(
        "--render",
        type=Path,
        metavar="JSON",
        help="run nothing: print the markdown of an existing record (and write --markdown / --plot from it)",
    )
    return bench


def _settings_from_args(args: argparse.Namespace) -> BenchSettings:
    from ..config import parse_dtype
    from .models import precision_class
    from .runner import BenchSettings
    from .variants import split_variant_list

    variants = None
    if args.variants:
        variants = [item for text in args.variants for item in split_variant_list(text)]
    dtype = args.dtype or MODEL_PRESET_DTYPES[args.preset]
    peaks = dict(args.peak_tflops or {})
    if "" in peaks:
        peaks[precision_class(parse_dtype(dtype))] = peaks.pop("")
    width, height = args.size if args.size else (None, None)
    return BenchSettings(
        preset=args.preset,
        variants=variants,
        width=width,
        height=height,
        steps=args.steps,
        repeats=args.repeats,
        warmup=args.warmup,
        seed=args.seed,
        prompt=args.prompt,
        guidance_scale=args.guidance,
        max_sequence_length=args.max_sequence_length,
        device=args.device,
        dtype=args.dtype,
        include_baselines=not args.no_baselines,
        keep_prompt_cache=args.keep_prompt_cache,
        fresh_compile_cache=not args.reuse_compile_cache,
        peak_tflops=peaks,
        progress=not args.no_progress,
        note=args.note,
    )


def _list_variants(settings: BenchSettings) -> int:
    from .models import device_name_of
    from .runner import resolve_device
    from .variants import parse_variant, unavailable_reason

    device = resolve_device(settings)
    print(f"variants on {device} ({device_name_of(device)}):")
    for name in known_variants():
        reason = unavailable_reason(parse_variant(name), device)
        print(f"  {name:24s} {'runs here' if reason is None else 'cannot run: ' + reason}")
    print("  engine:FIELD=VALUE,...   the reference preset with EngineConfig fields changed")
    return 0


def _render_existing(args: argparse.Namespace) -> int:
    path: Path = args.render
    if not path.is_file():
        raise FileNotFoundError(f"--render: no such record: {str(path)!r}")
    record = json.loads(path.read_text())
    if record.get("schema") != SCHEMA:
        raise BenchError(f"--render: {str(path)!r} is not a {SCHEMA} record")
    _write_outputs(record, path, args)
    return 0


def _write_outputs(record: dict[str, Any], out: Path, args: argparse.Namespace) -> list[str]:
    """Print the markdown; write it (``--markdown``) and the plot (``--plot``); what was written."""
    from .report import plot_speed_vs_drift, render_markdown

    report = render_markdown(record)
    print(report)
    written = []
    if args.markdown is not None:
        markdown = Path(args.markdown) if args.markdown else out.with_suffix(".md")
        markdown.parent.mkdir(parents=True, exist_ok=True)
        markdown.write_text(report)
        written.append(str(markdown))
    if args.plot is not None:
        if plot_speed_vs_drift(record, args.plot):
            written.append(str(args.plot))
        else:
            print(
                "no plot: matplotlib is not installed (pip install 'fluxfill-engine[bench]')", file=sys.stderr
            )
    if written:
        print(f"wrote {', '.join(written)}", file=sys.stderr)
    return written


def _run_lora_bench(args: argparse.Namespace) -> int:
    """``fluxfill bench --lora``: the LoRA benchmark, its JSON (``--out``) and markdown."""
    from .lora_bench import LoraBenchSettings, render_lora_markdown, run_lora_benchmark
    from .report import write_json

    width, height = args.size if args.size else (None, None)
    settings = LoraBenchSettings(
        preset=args.preset,
        width=width,
        height=height,
        steps=args.steps,
        repeats=args.repeats,
        warmup=args.warmup,
        seed=args.seed,
        device=args.device,
        dtype=args.dtype,
        ranks=tuple(args.lora_ranks),
        counts=tuple(args.lora_counts),
        strategies=tuple(s.strip() for s in args.lora_strategies.split(",") if s.strip()),
        compile=args.lora_compile,
        diffusers=not args.no_diffusers,
        progress=not args.no_progress,
        note=args.note,
    )
    settings.check()
    record = run_lora_benchmark(settings)
    out = args.out or Path(f"bench-lora-{settings.preset}.json")
    write_json(record, out)
    report = render_lora_markdown(record)
    print(report)
    written = [str(out)]
    if args.markdown is not None:
        markdown = Path(args.markdown) if args.markdown else out.with_suffix(".md")
        markdown.parent.mkdir(parents=True, exist_ok=True)
        markdown.write_text(report)
        written.append(str(markdown))
    print(f"wrote {', '.join(written)}", file=sys.stderr)
    return 0


def run_bench_command(args: argparse.Namespace) -> int:
    """``fluxfill bench``: run, print the markdown table, write JSON / markdown / plot."""
    from .report import write_json
    from .runner import plan, run_benchmark

    if args.render is not None:
        return _render_existing(args)
    if args.lora:
        return _run_lora_bench(args)
    settings = _settings_from_args(args)
    settings.check()
    if args.list_variants:
        return _list_variants(settings)
    out = args.out or Path(f"bench-{settings.preset}.json")
    device, specs, skipped = plan(settings)  # fail fast, before building anything
    print(
        f"fluxfill bench {settings.preset} on {device}: {', '.join(s.name for s in specs)}", file=sys.stderr
    )
    for name, reason in skipped.items():
        print(f"  cannot run here: {name} ({reason})", file=sys.stderr)
    record = run_benchmark(settings, on_update=lambda partial: write_json(partial, out))
    write_json(record, out)
    print(f"wrote {out}", file=sys.stderr)
    _write_outputs(record, out, args)
    return 0
