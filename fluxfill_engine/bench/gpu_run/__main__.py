"""``python -m fluxfill_engine.bench.gpu_run``: the GPU run without the ``fluxfill`` command (how the
orchestrator starts each part's worker)."""

import os
import sys

if "--dry-run" in sys.argv[1:]:
    # Before anything imports triton (diffusers does): the interpreter is chosen at the first import.
    os.environ.setdefault("TRITON_INTERPRET", "1")

from .main import run  # noqa: E402

sys.exit(run())
