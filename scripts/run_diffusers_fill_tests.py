"""Run diffusers' own FluxFill pipeline tests against ``fluxfill_engine.FluxFillPipeline``.

    python scripts/run_diffusers_fill_tests.py /path/to/diffusers-checkout [pytest arguments]

diffusers' test files are not in its wheel: give a checkout of the diffusers release that is
installed (``pip show diffusers``). Its Fill tests build their tokenizers and T5 from the Hugging Face
Hub's ``hf-internal-testing/tiny-random-t5`` and ``tiny-random-clip``, so they need those in the local
Hugging Face cache or a network. A pytest plugin swaps ``diffusers.FluxFillPipeline`` for ours before
the test module imports it; everything else (``PipelineTesterMixin`` and its checks) is diffusers'.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

PLUGIN = """
import diffusers
import diffusers.pipelines.flux as flux

from fluxfill_engine import FluxFillPipeline

diffusers.FluxFillPipeline = FluxFillPipeline
flux.FluxFillPipeline = FluxFillPipeline
"""
TEST_FILE = Path("tests/pipelines/flux/test_pipeline_flux_fill.py")


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    checkout = Path(argv[0]).resolve()
    if not (checkout / TEST_FILE).is_file():
        print(f"error: {checkout} has no {TEST_FILE}: give a diffusers checkout", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / "fluxfill_swap.py").write_text(PLUGIN)
        path = os.pathsep.join([folder, str(checkout), os.environ.get("PYTHONPATH", "")])
        command = [
            sys.executable,
            "-m",
            "pytest",
            "-p",
            "fluxfill_swap",
            str(checkout / TEST_FILE),
            *argv[1:],
        ]
        return subprocess.call(command, cwd=checkout, env={**os.environ, "PYTHONPATH": path})


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
