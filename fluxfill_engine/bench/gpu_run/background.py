"""The GPU run's background jobs: the native library's CMake build (started first, by the
orchestrator, with Ninja, at low priority) and the kernel test files under pytest, each in its own
process group, with what their output says."""

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
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fluxfill_kernels.build import cmake_commands

from ..measure import ROOT, tree_environment
from .budget import Deadline, skipped
from .record import Run

KERNEL_TEST_FILES = (
    "tests/kernels/test_kernel_fused_attention.py",
    "tests/kernels/test_kernel_qk_norm_rope.py",
    "tests/kernels/test_kernel_fill_cond.py",
    "tests/kernels/test_kernel_fused_attention_fp8.py",
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


NATIVE_BUILD_LOG = "native-build.log"
_BUILD_SECONDS = re.compile(r"^fluxfill native build: exit (\d+) after (\d+) s$", re.MULTILINE)


def _tool(name: str) -> str | None:
    """``name`` on PATH, or beside this Python (pip's cmake and ninja in a venv not activated)."""
    beside_python = Path(sys.executable).parent / name
    return shutil.which(name) or (str(beside_python) if beside_python.exists() else None)


def _cmake_version(cmake: str) -> tuple[int, ...]:
    try:
        done = subprocess.run([cmake, "--version"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return ()
    found = re.search(r"version (\d+)\.(\d+)\.?(\d*)", done.stdout)
    return tuple(int(n) for n in found.groups() if n) if found else ()


def newest_cmake() -> str | None:
    """The newest of the cmake on PATH and pip's beside this Python: torch 2.11's CMake config asks for
    the CUDA20 dialect, which an older CMake (3.25 with nvcc 13) does not know how to enable."""
    found = {path for path in (shutil.which("cmake"), str(Path(sys.executable).parent / "cmake")) if path}
    versions = {path: _cmake_version(path) for path in sorted(found) if Path(path).exists()}
    runnable = [path for path, version in versions.items() if version]
    return max(runnable, key=lambda path: versions[path]) if runnable else None


def native_build_command(folder: Path, env: dict[str, str]) -> list[str] | str:
    """The CMake configure-and-build of the native library into ``folder`` (``env`` gets what torch's
    CMake config needs), or why it cannot run here: the commands of :mod:`fluxfill_kernels.build`, as the
    native library's tests run them, with the Ninja generator where ninja is installed (it builds the
    CUDA and C++ objects in parallel; make would be the default), at low CPU priority (the parts time
    the GPU meanwhile), and a last log line giving its exit code and seconds."""
    cmake = newest_cmake()
    if cmake is None:
        return "cmake is not installed"
    if not any(name and shutil.which(name) for name in (env.get("CXX"), "c++", "g++", "clang++")):
        return "no C++ compiler (c++, g++, clang++ or $CXX)"
    if env.get("FLUXFILL_NATIVE", "1") == "0":
        return "FLUXFILL_NATIVE=0 disables the native library"
    configure, build = cmake_commands(ROOT, folder, cmake, env, jobs=min(8, os.cpu_count() or 1))
    ninja = _tool("ninja")
    if ninja is not None:
        configure += ["-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={ninja}"]
    script = " && ".join(shlex.join(command) for command in (configure, build))
    script = f'({script}); code=$?; echo "fluxfill native build: exit $code after $SECONDS s"; exit $code'
    nice = ["nice", "-n", "10"] if shutil.which("nice") else []
    return [*nice, "bash", "-c", script]


class NativeBuild:
    """The native library's build, started by the orchestrator before the first part so that it has
    the whole run to finish; the correctness part loads what it built. Its outcome is one record (one
    row of the results): a failed or unfinished build costs that row, never a part."""

    def __init__(self, out_dir: Path) -> None:
        self.folder = Path(tempfile.mkdtemp(prefix="fluxfill-native-"))
        self.job = Background("native build", out_dir / NATIVE_BUILD_LOG)
        self.generator = "default"

    def start(self) -> None:
        env = tree_environment()
        command = native_build_command(self.folder, env)
        if isinstance(command, str):
            self.job.reason = command
            return
        self.generator = "Ninja" if "-G Ninja" in command[-1] else "default"
        self.job.start(command, env)

    def result(self, wait_s: float) -> dict[str, Any]:
        """Wait up to ``wait_s`` more for the build (then stop it) and say how it went: its exit code,
        seconds, generator, log file, and on failure the log's tail."""
        job = self.job
        if job.process is None:
            return skipped(job.reason or "not started")
        code = job.wait(wait_s)
        output = job.output()
        timed = _BUILD_SECONDS.search(output)
        record: dict[str, Any] = {
            "build_s": float(timed.group(2)) if timed else job.elapsed(),
            "generator": self.generator,
            "log": NATIVE_BUILD_LOG,
            "exit_code": code,
        }
        if code is None:
            reason = f"the build did not finish in the {job.elapsed():.0f} s it had; see {NATIVE_BUILD_LOG}"
            return {**record, **skipped(reason)}
        library = self.folder / "_C.so"
        if code != 0 or not library.is_file():
            return {**record, "status": "failed", "error": {"type": "BuildError", "log_tail": output[-3000:]}}
        return {
            **record,
            "status": "ok",
            "library": str(library),
            "cuda_kernels": "CUDA kernels: ON" in output,
        }

    def close(self) -> None:
        """Stop the build if it still runs and remove what it built (a loaded library stays mapped)."""
        self.job.stop()
        shutil.rmtree(self.folder, ignore_errors=True)


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
