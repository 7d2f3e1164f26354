"""The GPU run's background jobs: the native library's CMake build and the kernel test files under
pytest, each in its own process group, with what their output says."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fluxfill_kernels.build import cmake_commands

from ..measure import ROOT
from .budget import Deadline, skipped
from .record import Run

KERNEL_TEST_FILES = (
    "tests/kernels/test_kernel_fused_attention.py",
    "tests/kernels/test_kernel_qk_norm_rope.py",
    "tests/kernels/test_kernel_fill_cond.py",
)


class Background:
    """A command run in the background in its own process group (so stopping it ends its children:
    the compilers CMake starts, pytest's workers), its output in a log file under the run's folder."""

    def __init__(self, name: str, log_path: Path) -> None:
        self.name = name
        self.log_path = log_path
        self.process: subprocess.Popen | None = None
        self.command: list[str] = []  # what was started (Popen.args is typed as any command form)
        self.started = 0.0
        self.reason: str | None = None  # why it was not started

    def start(self, command: Sequence[str], env: dict[str, str], cwd: Path = ROOT) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("w") as log:
            self.started = time.monotonic()
            self.command = list(command)
            self.process = subprocess.Popen(
                self.command, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def wait(self, seconds: float) -> int | None:
        """The exit code, or ``None`` when it was still running after ``seconds`` (then it is stopped)."""
        if self.process is None:
            return None
        try:
            return self.process.wait(timeout=max(0.0, seconds))
        except subprocess.TimeoutExpired:
            self.stop()
            return None

    def output(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.is_file() else ""

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()


def native_build_command(folder: Path, env: dict[str, str]) -> list[str] | str:
    """The CMake configure-and-build of the native library into ``folder`` (``env`` gets what torch's
    CMake config needs), or why it cannot run here: the commands of :mod:`fluxfill_kernels.build`, as the
    native library's tests run them."""
    beside_python = Path(sys.executable).parent / "cmake"  # pip's cmake in a venv not activated
    cmake = shutil.which("cmake") or (str(beside_python) if beside_python.exists() else None)
    if cmake is None:
        return "cmake is not installed"
    if not any(name and shutil.which(name) for name in (env.get("CXX"), "c++", "g++", "clang++")):
        return "no C++ compiler (c++, g++, clang++ or $CXX)"
    if env.get("FLUXFILL_NATIVE", "1") == "0":
        return "FLUXFILL_NATIVE=0 disables the native library"
    commands = cmake_commands(ROOT, folder, cmake, env, jobs=4)
    return ["bash", "-c", " && ".join(shlex.join(command) for command in commands)]


def kernel_tests_command(run: Run) -> list[str] | None:
    """pytest on the kernel test files: on a GPU every case runs on CUDA (bf16 included), which the
    CPU suite skips or runs in the interpreter; the dry run only collects them. ``None`` when the tree
    has none of them (an installed package without its tests)."""
    files = [f for f in KERNEL_TEST_FILES if (ROOT / f).is_file()]
    if not files:
        return None
    command = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-o", "addopts=", *files]
    if run.profile.dry_run:
        return [*command, "--collect-only", "-q"]
    command += ["-v", "-rfE"]
    if importlib.util.find_spec("xdist") is not None:
        command += ["-n", str(len(files)), "--dist", "loadfile"]
    return command


def kernel_tests_result(run: Run, tests: Background, deadline: Deadline) -> dict[str, Any]:
    """Wait for the kernel tests (until ``deadline``); outcomes are read from the streamed ``-v``
    output, so a run stopped at its limit still reports what finished."""
    if tests.process is None:
        return skipped(tests.reason or "not started")
    code = tests.wait(deadline.left())
    output = tests.output()
    result: dict[str, Any] = {
        "command": " ".join(str(word) for word in tests.command[1:]),
        "exit_code": code,
        "run_s": tests.elapsed(),
    }
    if run.profile.dry_run:
        collected = re.search(r"(\d+) tests? collected", output)
        if code != 0:
            return {
                **result,
                "status": "failed",
                "error": {"type": "CollectError", "output_tail": output[-3000:]},
            }
        reason = "dry run: collected only (running them in the Triton interpreter takes minutes)"
        return {**result, **skipped(reason, collected=int(collected.group(1)) if collected else None)}
    outcomes = parse_pytest_outcomes(output)
    counts = {name: sum(1 for o in outcomes.values() if o == name) for name in sorted(set(outcomes.values()))}
    failed = sorted(nodeid for nodeid, outcome in outcomes.items() if outcome in ("FAILED", "ERROR"))
    result.update({"counts": counts, "failed": failed[:30], "all_passed": code == 0})
    if code is None:
        result["note"] = "stopped at its time limit; the counts are what finished"
    elif code != 0 and not failed:
        result["output_tail"] = output[-3000:]
    return result


_OUTCOME = re.compile(r"\b(PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\b")
_NODEID = re.compile(r"(\S+\.py::\S+)")


def parse_pytest_outcomes(output: str) -> dict[str, str]:
    """``{nodeid: outcome}`` from ``pytest -v`` lines (with or without xdist's ``[gw0]`` prefixes)."""
    outcomes: dict[str, str] = {}
    for line in output.splitlines():
        outcome, nodeid = _OUTCOME.search(line), _NODEID.search(line)
        if outcome and nodeid and nodeid.group(1) not in outcomes:
            outcomes[nodeid.group(1)] = outcome.group(1)
    return outcomes
