"""The arguments the ``fluxfill bench`` verbs share: the model (``--preset --device --dtype``), the run
(``--steps --repeats --warmup --seed``) and the report (``--out --markdown --note --no-progress``), with
their value parsers. No torch here: ``fluxfill bench --help`` reads it."""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path
from typing import Any

from .catalog import MODEL_PRESET_NAMES

DTYPES = ("float32", "bfloat16", "float16")


def size(text: str) -> tuple[int, int]:
    """``N`` or ``WxH`` -> ``(width, height)``."""
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


def ints(text: str) -> tuple[int, ...]:
    """``"1,2,4"`` -> ``(1, 2, 4)``."""
    try:
        return tuple(int(p) for p in text.split(",") if p.strip())
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected comma-separated ints, got {text!r}") from err


def floats(text: str) -> tuple[float, ...]:
    """``"0.02,0.5"`` -> ``(0.02, 0.5)``."""
    try:
        return tuple(float(p) for p in text.split(",") if p.strip())
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from err


def names(text: str) -> tuple[str, ...]:
    """``"merge, side"`` -> ``("merge", "side")``."""
    return tuple(p.strip() for p in text.split(",") if p.strip())


def peaks(text: str) -> dict[str, float]:
    """``NUMBER`` (for the run's dtype, key ``""``) or ``PRECISION=NUMBER,...``."""
    found: dict[str, float] = {}
    for item in (p.strip() for p in text.split(",") if p.strip()):
        key, sep, value = item.partition("=")
        try:
            if sep:
                found[key.strip()] = float(value)
            else:
                found[""] = float(key)
        except ValueError as err:
            raise argparse.ArgumentTypeError(
                f"--peak-tflops takes NUMBER or PRECISION=NUMBER,... (bf16, fp16, fp8, int8, tf32, fp32); "
                f"got {text!r}"
            ) from err
    return found


def add_model_arguments(parser: argparse.ArgumentParser, dtype: bool = True) -> None:
    """``--preset`` (the random-weight model), ``--device``, and ``--dtype`` when ``dtype``."""
    parser.add_argument(
        "--preset",
        default="cpu-tiny",
        choices=list(MODEL_PRESET_NAMES),
        help="model: cpu-tiny (the test model), cpu-mid (2 CPU cores), gpu-full (the real architecture)",
    )
    parser.add_argument("--device", help="torch device (default: cpu for cpu-*, cuda for gpu-full)")
    if dtype:
        parser.add_argument("--dtype", choices=DTYPES, help="weights dtype (default: the preset's)")


def add_run_arguments(parser: argparse.ArgumentParser, steps: int, repeats: int, warmup: int = 1) -> None:
    """``--steps``, ``--repeats``, ``--warmup`` with these defaults, and ``--seed``."""
    parser.add_argument(
        "--steps", type=int, default=steps, help=f"sampling steps per call (default: {steps})"
    )
    parser.add_argument("--repeats", type=int, default=repeats, help=f"timed calls (default: {repeats})")
    parser.add_argument(
        "--warmup",
        type=int,
        default=warmup,
        help=f"untimed calls first; the first is the cold one (default: {warmup})",
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of the weights and the request (default: 0)"
    )


def add_report_arguments(parser: argparse.ArgumentParser, out_default: str) -> None:
    """``--out`` (the JSON record), ``--markdown``, ``--note`` and ``--no-progress``."""
    parser.add_argument("--out", type=Path, help=f"JSON record (default: {out_default})")
    parser.add_argument(
        "--markdown",
        nargs="?",
        const="",
        metavar="PATH",
        help="also write the markdown report (to PATH, or next to --out as .md)",
    )
    parser.add_argument("--note", help="free text stored in the record and shown in the markdown")
    parser.add_argument("--no-progress", action="store_true", help="no progress output")


def model_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The settings fields a model benchmark takes from the shared arguments (``--size`` split into
    ``width`` and ``height``)."""
    width, height = args.size if args.size else (None, None)
    return {
        "preset": args.preset,
        "width": width,
        "height": height,
        "steps": args.steps,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "seed": args.seed,
        "device": args.device,
        "dtype": args.dtype,
        "progress": not args.no_progress,
        "note": args.note,
    }


def write_markdown(report: str, out: Path, markdown: str | None) -> Path | None:
    """Write ``report`` where ``--markdown`` says (``""``: beside ``out`` as .md; ``None``: nowhere)."""
    if markdown is None:
        return None
    path = Path(markdown) if markdown else out.with_suffix(".md")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(report)
    return path


def say_written(paths: list[Path | str | None]) -> None:
    written = [str(p) for p in paths if p is not None]
    if written:
        print(f"wrote {', '.join(written)}", file=sys.stderr)


def command_line(args: argparse.Namespace) -> str:
    """The ``fluxfill bench VERB ...`` command that reproduces ``args``: every option of the verb that
    differs from its default, in its long spelling (what a record keeps, to be run again)."""
    parser: argparse.ArgumentParser = args.bench_parser
    words = ["fluxfill", "bench", args.bench_verb]
    for action in parser._actions:
        if not action.option_strings or action.dest in ("help", argparse.SUPPRESS):
            continue
        value = getattr(args, action.dest, None)
        if value is None or value == action.default or action.help == argparse.SUPPRESS:
            continue
        flag = action.option_strings[-1]
        if action.nargs == 0 or (action.nargs == "?" and value == action.const):
            words.append(flag)
        elif isinstance(value, (list, tuple)):
            words += [flag, ",".join(str(v) for v in value)]
        elif isinstance(value, dict):
            words += [flag, ",".join(f"{k}={v}" if k else str(v) for k, v in value.items())]
        else:
            words += [flag, str(value)]
    return shlex.join(words)
