"""``fluxfill prepare``: load a model once, quantize and compile it as a preset says, warm it up, and
save it as a saved engine (:mod:`fluxfill_engine.saved_engine`) that later starts without doing any of
that again (``fluxfill serve --model DIR``, ``FluxFillEngine.from_pretrained(DIR)``)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from .model_args import add_model_arguments, check_model_paths, resolve_model_arguments
from .serve import _sizes


def add_prepare_parser(commands: Any) -> None:
    """Add the ``prepare`` subcommand to ``fluxfill``'s subparsers."""
    prepare = commands.add_parser(
        "prepare",
        help="save a model quantized and compiled for this device, for instant restarts",
        description="Load --model with --preset on --device, warm it up (compiling, when the preset "
        "compiles) and save it in --out: the transformer's weights as the engine runs them, a manifest, "
        "the compile cache and the other components. Start from it with --model OUT.",
    )
    add_model_arguments(prepare)
    prepare.add_argument("--out", type=Path, required=True, help="the folder to write (new or empty)")
    prepare.add_argument(
        "--warmup",
        type=_sizes,
        default=None,
        metavar="WxH[,WxH...]",
        help="sizes to compile for before saving (default: 1024x1024 when the preset compiles; '' for none)",
    )
    prepare.add_argument("--warmup-steps", type=int, default=2, help="steps per warm-up request (default: 2)")
    prepare.set_defaults(run=run_prepare)


def run_prepare(args: argparse.Namespace) -> int:
    """Build, warm up and save the engine; print what was written."""
    out: Path = args.out
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"--out: {str(out)!r} exists and is not an empty folder")
    if args.warmup_steps < 1:
        raise ValueError(f"--warmup-steps must be >= 1, got {args.warmup_steps}")
    check_model_paths(args)
    model = resolve_model_arguments(args)
    config = model.engine_config()
    sizes = args.warmup if args.warmup is not None else ([(1024, 1024)] if config.compile else [])
    if model.model is None:
        from ..testing.demo import tiny_engine

        print("No --model given: preparing the built-in tiny random-weight model (its images are noise).")
        engine = tiny_engine(config, device=model.device)
    else:
        from ..engine import FluxFillEngine

        engine = FluxFillEngine.from_pretrained(
            model.model, config=config, device=model.device, base=model.base
        )
    if sizes:
        engine.warmup(sizes=sizes, num_inference_steps=args.warmup_steps)
    manifest = engine.save(out)
    weights = manifest["weights"]
    cache = manifest["compile_cache"]
    plan = manifest["quant_plan"]
    print(f"saved engine: {out}")
    print(
        f"  transformer: {weights['bytes'] / 2**20:.1f} MiB ({weights['dtype']}, quant {plan and plan['mode']})"
    )
    cache_size = "none" if cache is None else f"{cache['bytes'] / 2**20:.1f} MiB"
    print(f"  compile cache: {cache_size}")
    print(f"  prepared for: {manifest['device_kind']}")
    print(f"  {engine.start_report.line()}")
    return 0
