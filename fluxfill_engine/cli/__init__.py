"""The ``fluxfill`` command: one module per subcommand (:mod:`.inpaint`, :mod:`.serve`, and ``bench``
from :mod:`fluxfill_engine.bench.cli`), the model arguments they share in :mod:`.model_args`.

Heavy imports (torch, diffusers) happen inside the commands, so ``fluxfill --help`` answers at once.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from .inpaint import add_inpaint_parser
from .prepare import add_prepare_parser
from .serve import add_serve_parser

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    """The ``fluxfill`` parser with every subcommand; each sets ``run``, the function taking its
    arguments and returning the exit status."""
    from ..bench.cli import add_bench_parser, run_bench_command

    parser = argparse.ArgumentParser(
        prog="fluxfill", description="FLUX.1 Fill [dev] inpainting, fast and lean (fluxfill-engine)."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_inpaint_parser(commands)
    add_bench_parser(commands).set_defaults(run=run_bench_command)
    add_serve_parser(commands)
    add_prepare_parser(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``fluxfill`` command: the exit status, 2 for a refused argument (one line
    on stderr naming it), 1 for a failure of the system such as a full disk."""
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, TypeError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
