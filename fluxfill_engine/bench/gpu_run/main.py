"""``fluxfill bench gpu-run``: its arguments and the command (the orchestrator, or one part's worker).
No torch at import: ``fluxfill bench --help`` reads the arguments."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from .budget import DEFAULT_BUDGET_S, PARTS


def parse_parts(text: str | None) -> list[str]:
    """``"latency,e2e"`` or ``"3,4"`` -> part names in run order; ``None``: all. ``ValueError`` names
    the valid ones."""
    if not text:
        return list(PARTS)
    chosen = set()
    for token in (t.strip() for t in text.split(",") if t.strip()):
        if token.isdigit() and 1 <= int(token) <= len(PARTS):
            chosen.add(PARTS[int(token) - 1])
        elif token in PARTS:
            chosen.add(token)
        else:
            raise ValueError(f"unknown part {token!r}; parts: {', '.join(PARTS)} (or 1-{len(PARTS)})")
    return [p for p in PARTS if p in chosen]


def _parts_argument(text: str) -> list[str]:
    try:
        return parse_parts(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def parse_rows(text: str) -> tuple[str, ...]:
    """``"lever,engine:quant=fp8,quant_backend=native"`` -> the row names and groups, checked:
    ``ValueError`` names a token that is neither a group nor a row of the latency part."""
    from ..catalog import split_variant_list
    from .profiles import BATCHED, ROW_GROUPS, STEP_VARIANTS

    rows = tuple(split_variant_list(text))
    known = {variant.name for variant in STEP_VARIANTS}
    for token in rows:
        if token not in ROW_GROUPS and token not in known and not token.startswith(f"{BATCHED.name}:batch="):
            raise ValueError(
                f"unknown row {token!r}; groups: {', '.join(ROW_GROUPS)}; rows: {', '.join(sorted(known))}"
            )
    return rows


def _rows_argument(text: str) -> tuple[str, ...]:
    try:
        return parse_rows(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``fluxfill bench gpu-run``'s arguments (``--worker`` and ``--until`` start a part's worker)."""
    parser.description = (
        "fluxfill-engine's one-command GPU run: machine ceilings, kernel correctness, step latency of "
        "every variant, an end-to-end call and the step cache, within a time budget "
        "(see benchmarks/README.md)."
    )
    parser.add_argument("--out", type=Path, default=None, help="folder for gpu_run.json (default: $OUT)")
    parser.add_argument("--dry-run", action="store_true", help="every part at a tiny size on the CPU")
    parser.add_argument(
        "--parts",
        type=_parts_argument,
        default=None,
        help=f"comma list of parts to run: {', '.join(PARTS)} (or 1-{len(PARTS)}; default: all)",
    )
    parser.add_argument(
        "--budget-s",
        type=float,
        default=None,
        help=f"time budget (default {DEFAULT_BUDGET_S:.0f} s on a GPU)",
    )
    parser.add_argument(
        "--rows",
        type=_rows_argument,
        default=None,
        help="comma list of the latency part's rows to run, by variant name or group (headline, more, "
        "lever); the drift reference always runs (default: all)",
    )
    parser.add_argument("--worker", choices=PARTS, help=argparse.SUPPRESS)
    parser.add_argument("--until", type=float, help=argparse.SUPPRESS)


def main(args: argparse.Namespace) -> int:
    """Run the parts (each in its own worker process) and print the table; or, with ``--worker``, be
    that worker."""
    out = args.out or (Path(os.environ["OUT"]) if os.environ.get("OUT") else None)
    if out is None:
        print("gpu-run: give --out DIR or set OUT", file=sys.stderr)
        return 2
    if args.dry_run:
        # Triton kernels on CPU tensors need the interpreter, chosen when @triton.jit runs (first
        # import); the workers inherit it.
        os.environ.setdefault("TRITON_INTERPRET", "1")
    import torch

    if not args.dry_run and not torch.cuda.is_available():
        print(
            "gpu-run: no CUDA device here; --dry-run runs the same code on the CPU at a tiny size",
            file=sys.stderr,
        )
        return 2
    if not args.worker:  # before any part: a missing wheel would fail nearly every one of them
        from .preflight import missing_imports, missing_line

        missing = missing_imports()
        if missing:
            print(missing_line(missing), file=sys.stderr)
            return 3

    from .profiles import dry_run_profile, gpu_profile
    from .workers import orchestrate, run_worker

    if args.dry_run:
        profile = dry_run_profile(args.budget_s) if args.budget_s else dry_run_profile()
        # One thread: at these sizes more only adds OpenMP spin-waits, which a busy CI machine turns
        # into 100x slower steps.
        torch.set_num_threads(1)
    else:
        profile = gpu_profile(args.budget_s or DEFAULT_BUDGET_S)
    if args.rows:
        profile = dataclasses.replace(profile, rows=args.rows)
    out = out.resolve()  # the workers run from the tree's root
    if args.worker:
        return run_worker(profile, out, args.worker, args.until)
    extra = (["--dry-run"] if args.dry_run else []) + (
        ["--budget-s", str(args.budget_s)] if args.budget_s else []
    )
    if args.rows:
        extra += ["--rows", ",".join(args.rows)]
    return orchestrate(profile, out, args.parts or list(PARTS), extra)


def run(argv: Sequence[str] | None = None) -> int:
    """The command from its own argument list (a worker process, ``python -m``)."""
    parser = argparse.ArgumentParser(prog="python -m fluxfill_engine.bench.gpu_run")
    add_arguments(parser)
    return main(parser.parse_args(argv))
