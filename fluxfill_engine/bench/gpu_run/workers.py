"""The GPU run's orchestration: each part in a fresh worker process, in order, each under its
allowance of the budget, and what a worker does."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from ..measure import ROOT, tree_environment
from .background import NativeBuild
from .budget import Deadline, hard_stop_after, part_allowance, skipped
from .profiles import Profile
from .record import PartFunction, Run
from .table import render_table

# A worker stops itself this long after its allowance (HardStop: it records and exits); the
# orchestrator kills one that is still there later still (stuck in a kernel or a compiler).
WORKER_STOP_GRACE_S = 20.0
WORKER_KILL_GRACE_S = 40.0
# The longest the run waits for the native build when the correctness part is due (it started first
# and had the parts before; past this it is stopped and recorded as unfinished).
NATIVE_BUILD_WAIT_S = 30.0


def part_function(name: str) -> PartFunction:
    """The function that runs part ``name`` (its module is imported only in that part's worker)."""
    if name == "machine":
        from .machine import part_machine

        return part_machine
    if name == "correctness":
        from .correctness import part_correctness

        return part_correctness
    if name == "latency":
        from .latency import part_latency

        return part_latency
    if name == "e2e":
        from .e2e import part_e2e

        return part_e2e
    if name == "step_cache":
        from .step_cache import part_step_cache

        return part_step_cache
    raise ValueError(f"no part {name!r}")


def run_worker(profile: Profile, out: Path, name: str, until: float) -> int:
    """A part's worker process: load the record, run the part until ``until`` (epoch seconds), save."""
    run = Run.load(profile, out)
    seconds = until - time.time()
    with hard_stop_after(seconds + WORKER_STOP_GRACE_S):
        run.run_part(name, part_function(name), Deadline(seconds))
    return 0


def stop_process_groups(pids: Sequence[int]) -> None:
    """End the background process groups a killed worker left (it could not stop them itself)."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)


def orchestrate(profile: Profile, out: Path, parts: Sequence[str], argv_extra: Sequence[str]) -> int:
    """Run each part in a fresh worker process, in order, each under its allowance of the budget; the
    native library builds in the background from the start (when the correctness part runs).

    A fresh process per part frees every byte the part held, and keeps a broken CUDA context (an
    illegal memory access is sticky), a crash or a hang from costing the parts after it.
    """
    run = Run(profile, out, parts)
    run.save()
    budget_end = time.time() + profile.budget_s
    build = NativeBuild(out) if "correctness" in parts else None
    if build is not None:
        build.start()
    try:
        for index, name in enumerate(parts):
            if name == "correctness" and build is not None:
                wait_s = min(NATIVE_BUILD_WAIT_S, max(0.0, budget_end - time.time() - 5.0))
                run.record["native_build"] = build.result(wait_s)
                run.save()
            run = run_part_in_worker(profile, out, parts, index, budget_end, argv_extra)
    finally:
        if build is not None:
            if "native_build" not in run.record:
                run.record["native_build"] = build.result(0.0)
            build.close()
    run.record["complete"] = True
    run.save()
    table = render_table(run.record)
    (out / "gpu_run.txt").write_text(table + "\n")
    print(table, flush=True)
    bad = [n for n in parts if run.part(n).get("status") not in ("ok", "skipped")]
    return 1 if bad else 0


def run_part_in_worker(
    profile: Profile,
    out: Path,
    parts: Sequence[str],
    index: int,
    budget_end: float,
    argv_extra: Sequence[str],
) -> Run:
    """Part ``parts[index]`` in its own worker process under its allowance; the record as it left it."""
    name = parts[index]
    later = parts[index + 1 :]
    allowance = part_allowance(
        budget_end - time.time(),
        profile.shares[name],
        sum(profile.shares[p] for p in later),
        sum(profile.minimums.get(p, 0.0) for p in later),
    )
    print(f"== {name} (allowance {allowance:.0f} s)", flush=True)
    if allowance < 5.0:
        run = Run.load(profile, out)
        left = budget_end - time.time()
        run.record["parts"][name] = skipped(
            f"its allowance is {allowance:.0f} s ({left:.0f} s of the budget left)"
        )
        run.save()
        return run
    until = time.time() + allowance
    command = [sys.executable, "-m", "fluxfill_engine.bench.gpu_run", "--worker", name]
    command += ["--until", f"{until:.3f}", "--out", str(out), *argv_extra]
    worker = subprocess.Popen(command, cwd=ROOT, env=tree_environment())
    try:
        code: int | None = worker.wait(timeout=allowance + WORKER_KILL_GRACE_S)
    except subprocess.TimeoutExpired:
        worker.kill()
        worker.wait()
        code = None
    run = Run.load(profile, out)  # what the worker recorded
    part = run.part(name)
    if code is None:
        stop_process_groups(part.get("background_pids", []))
    if code != 0 or part.get("status") in ("pending", "running"):
        why = "killed at its time limit" if code is None else f"its worker exited with code {code}"
        if part.get("status") in ("pending", "running"):
            part["status"] = "failed"
        part["worker"] = {"exit_code": code, "note": f"{why} (see gpu_run.log)"}
        run.save()
    return run
