"""The measurement primitives every benchmark shares: device time, stage time through forward hooks,
memory, the matmul ceiling, statistics and the environment a run was measured in.

Work per step and the device's datasheet peaks are in :mod:`.flops`; drift (SQNR, PSNR) is in
:mod:`fluxfill_engine.metrics`.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import functools
import gc
import math
import os
import platform
import statistics
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..timing import Clock

GIB = float(2**30)
ROOT = Path(__file__).resolve().parents[2]  # the checkout (for its git commit)


# ---- device time -----------------------------------------------------------------------------------


class Timer(Clock):
    """Per-call device time on the engine's :class:`~fluxfill_engine.timing.Clock` (CUDA events on a
    GPU, each call between its own pair, read after one synchronisation; the host clock on a CPU)."""

    @property
    def method(self) -> str:
        return "cuda events" if self.cuda else "host perf_counter (no device)"

    def call_ms(self, fn: Callable[[int], Any], count: int, first: int = 0) -> list[float]:
        """Milliseconds of each of ``count`` calls ``fn(first)``, ``fn(first + 1)``, ..."""
        marks = []
        for index in range(first, first + count):
            start = self.mark()
            fn(index)
            marks.append((start, self.mark()))
        self.sync()
        return [1000.0 * self.seconds(start, end) for start, end in marks]

    def warm_up(self, fn: Callable[[], Any], seconds: float = 0.3, least: int = 3) -> None:
        """Call ``fn`` at least ``least`` times and, on a GPU, for ``seconds``: an idle GPU's clocks
        take that long to rise to their working speed."""
        start = time.perf_counter()
        calls = 0
        while calls < least or (self.cuda and time.perf_counter() - start < seconds):
            fn()
            calls += 1
            if calls % 4 == 0:
                self.sync()
        self.sync()

    def wall_s(self, fn: Callable[[], Any]) -> tuple[Any, float]:
        """``fn()`` and its seconds, synchronised before and after (cold starts, setup)."""
        self.sync()
        start = time.perf_counter()
        result = fn()
        self.sync()
        return result, time.perf_counter() - start


class ForwardIntervals:
    """Every forward of the watched modules as a ``(start, end)`` pair of clock marks, per key: how a
    pipeline's stages are cut where it reports no timings itself (text encoders, transformer steps).

    Use as a context manager (or call :meth:`remove`): the hooks come off afterwards. Read the marks
    with the clock's ``seconds`` after it has synchronised.
    """

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.intervals: dict[str, list[tuple[Any, Any]]] = {}
        self._open: dict[str, Any] = {}
        self._handles: list[Any] = []

    def watch(self, module: torch.nn.Module, key: str) -> ForwardIntervals:
        self.intervals.setdefault(key, [])

        def before(*_: Any) -> None:
            self._open[key] = self.clock.mark()

        def after(*_: Any) -> None:
            start = self._open.pop(key, None)
            if start is not None:
                self.intervals[key].append((start, self.clock.mark()))

        self._handles += [module.register_forward_pre_hook(before), module.register_forward_hook(after)]
        return self

    def clear(self) -> None:
        for spans in self.intervals.values():
            spans.clear()
        self._open.clear()

    def total_seconds(self, key: str) -> float:
        return sum(self.clock.seconds(start, end) for start, end in self.intervals.get(key, []))

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def __enter__(self) -> ForwardIntervals:
        return self

    def __exit__(self, *_: Any) -> None:
        self.remove()


# ---- statistics ------------------------------------------------------------------------------------


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def summarize(values: Sequence[float]) -> dict[str, float]:
    """Median, p20, p80 (linear interpolation), min, max and mean of ``values``."""
    array = np.asarray(values, dtype=np.float64)
    p20, middle, p80 = np.percentile(array, [20, 50, 80])
    return {
        "median": float(middle),
        "p20": float(p20),
        "p80": float(p80),
        "min": float(array.min()),
        "max": float(array.max()),
        "mean": float(array.mean()),
        "n": int(array.size),
    }


def jsonable(value: Any, tensor_elements: int = 64) -> Any:
    """A record's value as strict JSON: NaN and infinities become ``None``; tensors and numpy numbers
    plain numbers or lists (a tensor of more than ``tensor_elements`` values: its shape, as text); any
    other object its text."""
    if isinstance(value, dict):
        return {str(k): jsonable(v, tensor_elements) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v, tensor_elements) for v in value]
    if isinstance(value, torch.Tensor):
        if value.numel() > tensor_elements:
            return f"tensor{tuple(value.shape)}"
        return jsonable(value.item() if value.numel() == 1 else value.tolist(), tensor_elements)
    if hasattr(value, "item") and callable(value.item) and not isinstance(value, (str, bytes)):
        with contextlib.suppress(Exception):
            value = value.item()
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, (bool, int, str)):
        return value
    return str(value)


# ---- memory ----------------------------------------------------------------------------------------


class AllocatorCounters:
    """The CUDA caching allocator's counters (nothing is reported on a CPU: no number is guessed)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.cuda = device.type == "cuda"

    def reset_peak(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)

    def allocated_bytes(self) -> int | None:
        return int(torch.cuda.memory_allocated(self.device)) if self.cuda else None

    def peak_bytes(self) -> int | None:
        if not self.cuda:
            return None
        torch.cuda.synchronize(self.device)
        return int(torch.cuda.max_memory_allocated(self.device))

    def allocated_gib(self) -> float | None:
        allocated = self.allocated_bytes()
        return None if allocated is None else allocated / GIB

    def peak_gib(self) -> float | None:
        peak = self.peak_bytes()
        return None if peak is None else peak / GIB


class MemoryMeter:
    """Peak memory of one run above what was allocated when it started.

    CUDA: the caching allocator's ``max_memory_allocated`` (reset per run). CPU: the process's resident
    set size, sampled every ``interval`` seconds from ``/proc/self/statm`` by a background thread
    (``ru_maxrss`` where there is no ``/proc``: then only new process-wide highs show).
    """

    def __init__(self, device: torch.device, interval: float = 0.005) -> None:
        self.device = device
        self.interval = interval
        self.kind = "cuda_allocator" if device.type == "cuda" else "rss"
        self._allocator = AllocatorCounters(device)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._start_bytes = 0
        self._peak = 0

    @staticmethod
    def rss_bytes() -> int | None:
        try:
            with open("/proc/self/statm") as statm:
                return int(statm.read().split()[1]) * _page_size()
        except (OSError, ValueError, IndexError):
            return None

    @staticmethod
    def process_peak_bytes(device: torch.device) -> int:
        if device.type == "cuda":
            return int(torch.cuda.max_memory_allocated(device))
        import resource

        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024

    def start(self) -> None:
        if self._allocator.cuda:
            self._allocator.reset_peak()
            self._start_bytes = self._allocator.allocated_bytes() or 0
            return
        rss = self.rss_bytes()
        if rss is None:
            self._start_bytes = self.process_peak_bytes(self.device)
            return
        self._start_bytes = self._peak = rss
        self._stop.clear()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            rss = self.rss_bytes()
            if rss is not None and rss > self._peak:
                self._peak = rss

    def stop(self) -> int:
        """Peak bytes above the start of the run (the absolute peak is left in :attr:`peak_bytes`)."""
        if self._allocator.cuda:
            self._peak = self._allocator.peak_bytes() or 0
        elif self._thread is None:
            self._peak = self.process_peak_bytes(self.device)
        else:
            self._stop.set()
            self._thread.join()
            self._thread = None
            self._peak = max(self._peak, self.rss_bytes() or 0)
        return max(0, self._peak - self._start_bytes)

    @property
    def peak_bytes(self) -> int:
        """The whole process's peak during the run: allocator bytes (CUDA) or resident set size."""
        return self._peak


@functools.cache
def _page_size() -> int:
    return os.sysconf("SC_PAGE_SIZE")


def _reset_compiler() -> None:
    """``torch.compiler.reset()``, again when a compile backend's own reset added a backend while torch
    iterated over them ("dictionary changed size during iteration", seen after a reduce-overhead row)."""
    try:
        torch.compiler.reset()
    except RuntimeError as error:
        if "dictionary changed size" not in str(error):
            raise
        torch.compiler.reset()


def free_memory(device: torch.device, compiled: bool = False) -> None:
    """Drop what the last run held, so the next one's peak starts from a floor: compiled graphs (which
    may reference modules) when ``compiled``, garbage, the allocator's cached blocks (CUDA) or the
    freed heap pages (CPU)."""
    if compiled:
        _reset_compiler()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        return
    with contextlib.suppress(OSError, AttributeError):
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)


# ---- the matmul ceiling ----------------------------------------------------------------------------


def matmul_ceiling(timer: Timer, size: int) -> dict[str, dict[str, float] | str]:
    """Measured matmul TFLOP/s per precision, ``{"tflops", "ms"}`` each, or the reason it could not run:
    bf16 ``torch.mm``; fp8 ``torch._scaled_mm`` with one scale per tensor and fast accumulation (the
    ceiling of every fp8 variant, as torchao's fp8 inference runs), and with row-wise scales as the
    engine's native fp8 linears call it,
    without and with fast accumulation (torchao's row-wise default). A ``size``-cubed product on random data; 0.3 s of warm-up
    calls, median of 10. fp8 needs fp8 tensor cores on a GPU; on a CPU it is tried (some builds can).
    """
    from ..quantization import has_fp8_tensor_cores

    device = timer.device
    generator = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(size, size, device=device, dtype=torch.bfloat16, generator=generator)
    b = torch.randn(size, size, device=device, dtype=torch.bfloat16, generator=generator)
    products: dict[str, Callable[[], torch.Tensor]] = {"bf16": lambda: torch.mm(a, b)}
    result: dict[str, dict[str, float] | str] = {}
    if device.type == "cpu" or has_fp8_tensor_cores(device):
        a8 = a.to(torch.float8_e4m3fn)
        b8 = b.t().contiguous().to(torch.float8_e4m3fn).t()  # column-major, as _scaled_mm wants
        one = torch.ones((), device=device, dtype=torch.float32)
        rows = torch.ones(size, 1, device=device, dtype=torch.float32)
        products["fp8"] = lambda: torch._scaled_mm(
            a8, b8, scale_a=one, scale_b=one, out_dtype=torch.bfloat16, use_fast_accum=True
        )
        products["fp8_rowwise"] = lambda: torch._scaled_mm(
            a8, b8, scale_a=rows, scale_b=rows.t(), out_dtype=torch.bfloat16
        )
        products["fp8_rowwise_fast_accum"] = lambda: torch._scaled_mm(
            a8, b8, scale_a=rows, scale_b=rows.t(), out_dtype=torch.bfloat16, use_fast_accum=True
        )
    else:
        result["fp8"] = "no fp8 tensor cores (compute capability < 8.9)"
    for precision, product in products.items():
        try:
            timer.warm_up(product)
            ms = median(timer.call_ms(lambda _, p=product: p(), 10))
            result[precision] = {"tflops": 2 * size**3 / (ms / 1000) / 1e12, "ms": ms}
        except (RuntimeError, NotImplementedError) as error:
            if device.type == "cuda":
                raise
            result[precision] = f"this CPU build cannot: {str(error)[:200]}"
    return result


MATMUL_CEILING_METHOD = "0.3 s of warm-up calls, median of 10"


# ---- the environment -------------------------------------------------------------------------------


def package_version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def command_output(args: Sequence[str], timeout: float = 15.0) -> str | None:
    """A command's stripped standard output, or ``None`` when it is missing or fails."""
    try:
        done = subprocess.run(list(args), capture_output=True, text=True, timeout=timeout, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip()


def git_output(*args: str) -> str | None:
    """``git ARGS`` in the checkout the package runs from (``None`` outside one)."""
    return command_output(["git", "-C", str(ROOT), *args], timeout=10.0)


def tree_environment() -> dict[str, str]:
    """This process's environment with the tree (and its kernels) first on ``PYTHONPATH``: the device
    runs from the tree, with no ``pip install -e .`` there."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(ROOT), str(ROOT / "kernels"), env.get("PYTHONPATH")) if p
    )
    return env


def load_average() -> list[float] | None:
    """The 1/5/15-minute load averages: other work on the machine shows here (None where unknown)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (OSError, AttributeError):
        return None


def device_name_of(device: torch.device) -> str:
    """``torch.cuda.get_device_name`` on CUDA; the CPU model name otherwise."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def environment(device: torch.device) -> dict[str, Any]:
    """Where and with what a benchmark ran: device, versions, git commit, date, machine load."""
    from .. import __version__

    env: dict[str, Any] = {
        "device": str(device),
        "device_name": device_name_of(device),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "git_sha": git_output("rev-parse", "HEAD"),
        "git_dirty": None,
        "torch": torch.__version__,
        "triton": package_version("triton"),
        "diffusers": package_version("diffusers"),
        "transformers": package_version("transformers"),
        "torchao": package_version("torchao"),
        "optimum_quanto": package_version("optimum-quanto"),
        "fluxfill_engine": __version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    status = git_output("status", "--porcelain", "--untracked-files=no")
    if status is not None:
        env["git_dirty"] = bool(status)
    env["load_average_at_start"] = load_average()
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(
            {
                "cuda": torch.version.cuda,
                "cudnn": torch.backends.cudnn.version(),
                "compute_capability": f"{props.major}.{props.minor}",
                "device_memory_bytes": int(props.total_memory),
                "multiprocessors": props.multi_processor_count,
                "matmul_precision": torch.get_float32_matmul_precision(),
            }
        )
    return env
