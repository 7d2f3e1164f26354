"""The one-command GPU run: what fluxfill-engine does on one GPU, measured in about 7 minutes.

``bash benchmarks/gpu_run.sh`` runs this on the device (after installing the carried wheels);
``python benchmarks/gpu_run.py --dry-run --out DIR`` runs every part and every variant's code path on
the CPU at a tiny size (``tests/test_gpu_run.py`` does, so CI catches what a CPU can catch).

Parts, most valuable first (each a function below, each guarded: an exception is recorded with the
tail of its traceback and the next part runs):

1. ``machine``: device name, driver, torch / triton / CUDA versions; measured bf16 and fp8 matmul
   TFLOP/s (8192^3, random data) and device-to-device copy bandwidth.
2. ``correctness``: the Triton kernels (``fused_attention`` with both k prologues, ``qk_norm_rope``,
   ``fill_cond``) in bf16 and fp16 at FLUX shapes (4096 image + 512 text tokens, 24 heads x 128)
   against their fp32 references and the tolerance table; the native fp8 / int8 linears against an
   fp64 matmul (SQNR); the native C++/CUDA library (built in the background, given one minute) against
   the references; the kernel test files, which on a CPU skip their GPU cases, run on the GPU.
3. ``latency``: one transformer step at 1024x1024 (the real architecture, random bf16 weights made on
   the GPU, batch 1, random prompt embeddings): diffusers eager, engine ``reference``, the engine with
   each attention backend and with the fused kernels, engine native fp8 eager, then the compiled ones
   with their cold compile seconds: diffusers regional compile, diffusers + torchao fp8 + compile,
   engine ``balanced``, engine ``fast``. Each: ms/step (CUDA events, median after warm-up), TFLOP/s
   (74.4 TFLOP per step) and its fraction of the measured matmul ceiling, drift against the engine
   ``reference`` output (SQNR), memory. Last, the engine ``reference`` step on batches of 2 and 4
   requests (what the server's batching runs): milliseconds per image against batch 1.
4. ``e2e``: one 1024x1024, 28-step call with T5-XXL, CLIP and the VAE for diffusers eager and engine
   ``fast``: per-stage seconds (text encoding, preparation and VAE encoding, denoising, decoding).
5. ``step_cache``: the engine step cache: a skipped step against a full step.

Memory plan (the real model in bf16; GiB = 2^30 bytes). Each part runs in its own worker process,
so everything a part allocated is gone before the next starts; inside a part, every variant or step
is freed (``gc.collect``, compiled graphs reset, ``torch.cuda.empty_cache``) before the next:

===========  ==========================================================================  =========
part         weight copies alive together                                                peak, est
===========  ==========================================================================  =========
machine      two 8192^2 bf16 matrices (+ fp8 copies), two 1 GiB copy buffers              ~3 GiB
correctness  FLUX-shaped activations and one 3072x12288 linear at a time                  ~3 GiB
latency      the base transformer (22.2); the engine fuses its QKV in place (views, no    ~43 GiB
             copy). Variants that change weights work on a weight-sharing clone, one at
             a time, freed after: native fp8 and ``fast`` add their fp8 block linears
             (11 GiB) plus a transient fused bf16 QKV (6.7 GiB) while quantizing;
             torchao fp8 adds fp8 copies of every linear (11 GiB); diffusers compile
             and ``balanced`` add nothing.
e2e          transformer 22.2 + T5-XXL 8.9 + CLIP 0.2 + VAE 0.2; engine ``fast``          ~36 GiB
             quantizes that same transformer in place, block by block, after diffusers
             has run (its bf16 block weights are freed as their fp8 copies appear),
             plus VAE activations at 1024x1024.
step_cache   the base transformer (22.2), eager                                          ~25 GiB
===========  ==========================================================================  =========

An 80 GB H100 has room for all of it; activations at 4608 tokens add 1-3 GiB to each.

Time budget: ``--budget-s`` (420 s by default, counted from the start) is shared by the parts in
proportion to :data:`GPU_SHARES`. A part may use its own share plus whatever earlier parts left
unused, never the shares of the parts after it (:func:`part_allowance`); within a part, a step whose
estimated cost no longer fits is skipped with the reason recorded. A worker stops itself
(``SIGALRM``) 20 s after its allowance, recording what it measured; the orchestrator kills one that is
still there 40 s after it (a hung kernel or compiler) and goes on with the next part. So the device
command (``timeout_s=540``) always returns the JSON and the table. The JSON (``gpu_run.json`` under
``--out`` or ``$OUT``) is rewritten after every part and every step: a run cut short keeps what it
measured. Every number in it was measured, except the budget's shares and the cost estimates quoted
in the reasons of steps skipped for time.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as dt
import functools
import gc
import importlib.util
import json
import math
import os
import platform
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

ROOT = Path(__file__).resolve().parents[1]

if __name__ == "__main__" and "--dry-run" in sys.argv[1:]:
    # Triton kernels on CPU tensors need the interpreter, chosen when @triton.jit runs (first import).
    os.environ.setdefault("TRITON_INTERPRET", "1")

for _path in (ROOT / "kernels", ROOT):  # the device runs from the tree (no `pip install -e .` there)
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

import torch  # noqa: E402

from fluxfill_engine.timing import Clock  # noqa: E402

if TYPE_CHECKING:
    from fluxfill_engine.bench.models import StepInputs

SCHEMA = "fluxfill-gpu-run/1"
PARTS = ("machine", "correctness", "latency", "e2e", "step_cache")
# Seconds per part on an H100 (their sum leaves 20 s of slack in the default budget). Guesses: nothing
# has been timed on a GPU yet; the JSON records what each part and step took, to set them from.
GPU_SHARES = {"machine": 15.0, "correctness": 85.0, "latency": 215.0, "e2e": 65.0, "step_cache": 20.0}
DEFAULT_BUDGET_S = 420.0
NATIVE_BUILD_LIMIT_S = 60.0
EPS = 1e-6  # FLUX's QK RMSNorm epsilon
GUIDANCE = 30.0
# Per-forward SQNR bounds of the quantized linears (the same as tests/test_quantization.py's).
LINEAR_SQNR_BOUND_DB = {"fp8": 25.0, "fp8-weight": 25.0, "int8": 25.0, "int8-weight": 35.0}
KERNEL_TEST_FILES = (
    "tests/test_kernel_fused_attention.py",
    "tests/test_kernel_qk_norm_rope.py",
    "tests/test_kernel_fill_cond.py",
)
GIB = float(2**30)


class HardStop(BaseException):
    """Raised by the alarm at the hard deadline; a BaseException so that no part's guard swallows it."""


# ---- profiles: the real run and the CPU dry run --------------------------------------------------


@dataclass(frozen=True)
class StepVariant:
    """One way to run a transformer step: ``name`` is a ``fluxfill bench`` variant name."""

    name: str
    clone: bool  # works on a weight-sharing clone (it changes weights or installs compiled blocks)
    estimate_s: float  # seconds on an H100 with the real model, compile included (budget only)


@dataclass(frozen=True)
class Profile:
    """Everything that differs between the GPU run and the dry run: sizes, dtypes, repeats, budgets."""

    name: str
    device: str
    dtype: torch.dtype
    transformer_config: dict[str, Any] | None  # None: the real FLUX.1 Fill [dev]
    width: int
    height: int
    text_tokens: int
    kernel_heads: int
    kernel_head_dim: int
    kernel_text_tokens: int
    kernel_grid: tuple[int, int]  # image tokens as (rows, cols) of 2x2 latent patches
    triton_dtypes: tuple[str, ...]
    native_dtypes: tuple[str, ...]
    linear_shapes: tuple[tuple[int, int, int], ...]  # (rows, in_features, out_features)
    matmul_size: int
    copy_bytes: int
    warmup: int
    repeats: int
    e2e_steps: int
    e2e_warmup_steps: int
    step_cache_steps: int
    batch_sizes: tuple[int, ...]  # the latency part's batched engine steps (batch 1: ``reference``)
    shares: dict[str, float]
    budget_s: float
    # Compiled variants that compile for real; the others run their compiled modules under
    # torch.compiler.set_stance("force_eager"). None: all compile.
    real_compile: frozenset[str] | None = None
    notes: tuple[str, ...] = ()

    @property
    def dry_run(self) -> bool:
        return self.name == "dry-run"


def gpu_profile(budget_s: float = DEFAULT_BUDGET_S) -> Profile:
    """The real model at 1024x1024 on the GPU."""
    return Profile(
        name="gpu",
        device="cuda",
        dtype=torch.bfloat16,
        transformer_config=None,
        width=1024,
        height=1024,
        text_tokens=512,
        kernel_heads=24,
        kernel_head_dim=128,
        kernel_text_tokens=512,
        kernel_grid=(64, 64),
        triton_dtypes=("bfloat16", "float16"),
        native_dtypes=("bfloat16", "float16"),
        linear_shapes=((4608, 3072, 12288), (1, 3072, 18432)),  # MLP input; a modulation (1 row)
        matmul_size=8192,
        copy_bytes=2**30,
        warmup=2,
        repeats=8,
        e2e_steps=28,
        e2e_warmup_steps=2,
        step_cache_steps=8,
        batch_sizes=(2, 4),
        shares=dict(GPU_SHARES),
        budget_s=budget_s,
    )


def dry_run_profile(budget_s: float = 900.0) -> Profile:
    """The same code path on the CPU at a tiny size; the budget is generous so that nothing is
    skipped for time (the sizes keep it short: under a minute and a half on 2 cores)."""
    from fluxfill_engine.architecture import TRANSFORMER_CONFIG

    tiny = dict(
        TRANSFORMER_CONFIG,
        num_layers=1,
        num_single_layers=2,
        num_attention_heads=2,
        attention_head_dim=32,
        joint_attention_dim=64,
        pooled_projection_dim=32,
        axes_dims_rope=(8, 12, 12),
    )
    return Profile(
        name="dry-run",
        device="cpu",
        dtype=torch.bfloat16,
        transformer_config=tiny,
        width=64,
        height=64,
        text_tokens=16,
        kernel_heads=2,
        kernel_head_dim=32,
        kernel_text_tokens=16,
        kernel_grid=(4, 6),
        # The Triton interpreter's bf16 tl.dot is wrong (DESIGN.md): bf16 is checked on the GPU only.
        triton_dtypes=("float16",),
        native_dtypes=("bfloat16", "float16"),
        linear_shapes=((48, 64, 256), (1, 64, 384)),
        matmul_size=256,
        copy_bytes=2**24,
        warmup=1,
        repeats=5,
        e2e_steps=2,
        e2e_warmup_steps=1,
        step_cache_steps=5,
        batch_sizes=(2, 4),
        shares={part: share * budget_s / sum(GPU_SHARES.values()) for part, share in GPU_SHARES.items()},
        budget_s=budget_s,
        # Three compiled variants compile for real: diffusers' regional compile, and the engine's
        # balanced and fast (quantized linears, fused kernels and compile together). torchao's cannot
        # run on a CPU, and the end-to-end `fast` call runs its compiled blocks eagerly: compiling it
        # again would only add time (about a minute of the dry run's budget on 2 cores is compile).
        real_compile=frozenset({"diffusers-compile", "balanced", "fast"}),
        notes=(
            "dry run: tiny model on the CPU; timings say nothing about a GPU",
            "Triton kernels run in the interpreter (TRITON_INTERPRET=1), bf16 only on a GPU",
        ),
    )


# In run order: the eager ones (seconds each), then the compiled ones (a cold compile each). When time
# runs short the last are skipped, so the engine's compiled presets come before torchao's baseline.
# `balanced` works on the base transformer (it changes no weight); everything that does, or installs
# compiled diffusers blocks, gets a weight-sharing clone.
STEP_VARIANTS: tuple[StepVariant, ...] = (
    StepVariant("reference", clone=False, estimate_s=6),  # first: the drift reference
    StepVariant("diffusers", clone=False, estimate_s=5),
    StepVariant("engine:attention=triton", clone=False, estimate_s=6),
    StepVariant("engine:attention=xformers", clone=False, estimate_s=5),
    StepVariant("engine:fused_kernels=1", clone=False, estimate_s=5),
    StepVariant("engine:attention=auto", clone=False, estimate_s=6),
    StepVariant("engine:quant=fp8,quant_backend=native", clone=True, estimate_s=10),
    StepVariant("diffusers-compile", clone=True, estimate_s=40),
    StepVariant("balanced", clone=False, estimate_s=45),
    StepVariant("fast", clone=True, estimate_s=45),
    StepVariant("diffusers-fp8-compile", clone=True, estimate_s=60),
)
# The batched steps of the latency part: the engine's eager reference path (the server batches requests
# of one size; eager, so a batch size costs no compile). Its estimate is per image of the batch.
BATCHED = StepVariant("reference", clone=False, estimate_s=2.5)
# What a CPU cannot run but should still build as far as it gets, in the dry run.
TRY_ON_CPU = frozenset({"diffusers-fp8-compile"})


# ---- budget ----------------------------------------------------------------------------------------


def part_allowance(remaining_s: float, share_s: float, later_shares_s: float) -> float:
    """Seconds a part may use: its share plus what earlier parts left unused, never the shares of the
    parts after it, and never more than remains. An earlier overrun squeezes later parts first (they
    are the less valuable ones)."""
    remaining_s = max(0.0, remaining_s)
    return min(remaining_s, max(share_s, remaining_s - later_shares_s))


class Deadline:
    """A point in time on the monotonic clock; ``fits(seconds)`` says whether work of that cost ends
    before it."""

    def __init__(self, seconds: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.until = clock() + max(0.0, seconds)

    def left(self) -> float:
        return max(0.0, self.until - self.clock())

    def fits(self, seconds: float) -> bool:
        return self.left() >= seconds

    def within(self, seconds: float) -> Deadline:
        """A deadline ``seconds`` from now, no later than this one."""
        return Deadline(min(seconds, self.left()), self.clock)


def too_late(what: str, needs_s: float, deadline: Deadline) -> dict[str, Any]:
    return skipped(
        f"{what} needs about {needs_s:.0f} s (estimate); {deadline.left():.0f} s of the budget left"
    )


def skipped(reason: str, **extra: Any) -> dict[str, Any]:
    return {"status": "skipped", "reason": reason, **extra}


# ---- timing and memory -----------------------------------------------------------------------------


class Timer(Clock):
    """Per-call device time on the engine's :class:`~fluxfill_engine.timing.Clock` (CUDA events on a
    GPU, each call between its own pair, read after one synchronisation; the host clock on a CPU)."""

    def __init__(self, device: torch.device) -> None:
        super().__init__(device)
        self.device = device

    @property
    def method(self) -> str:
        return "cuda events" if self.cuda else "host perf_counter (no device)"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

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


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


class Memory:
    """The CUDA caching allocator's counters (nothing is reported on a CPU: no number is guessed)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.cuda = device.type == "cuda"

    def reset_peak(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)

    def allocated_gib(self) -> float | None:
        return torch.cuda.memory_allocated(self.device) / GIB if self.cuda else None

    def peak_gib(self) -> float | None:
        if not self.cuda:
            return None
        torch.cuda.synchronize(self.device)
        return torch.cuda.max_memory_allocated(self.device) / GIB


def free_memory(device: torch.device, compiled: bool = False) -> None:
    """Drop what the last step held: garbage, compiled graphs (which may reference modules), the
    allocator's cached blocks."""
    if compiled:
        torch.compiler.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def sqnr_db(reference: torch.Tensor, output: torch.Tensor) -> float | None:
    """``20 log10(|ref| / |ref - out|)`` in dB, as :func:`fluxfill_engine.metrics.sqnr_db` defines it,
    computed in float64 where the tensors are (no copy of a large output to the host); ``None`` when
    they are identical."""
    ref, out = reference.double(), output.to(reference.device).double()
    noise, signal_ = float((ref - out).norm()), float(ref.norm())
    return None if noise == 0.0 or signal_ == 0.0 else 20.0 * math.log10(signal_ / noise)


def error_record(error: BaseException, limit: int = 4000) -> dict[str, Any]:
    """The exception as text (the object itself would keep the failed step's tensors alive)."""
    text = "".join(traceback.format_exception(type(error), error, error.__traceback__))
    return {"type": type(error).__name__, "message": str(error)[:1000], "traceback_tail": text[-limit:]}


def finite(value: Any) -> Any:
    """JSON-safe: NaN and infinities become ``None``, tensors and numpy numbers plain numbers."""
    if isinstance(value, dict):
        return {str(k): finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    if isinstance(value, torch.Tensor):
        return finite(value.item() if value.numel() == 1 else value.tolist())
    if hasattr(value, "item") and callable(value.item) and not isinstance(value, (str, bytes)):
        with contextlib.suppress(Exception):
            value = value.item()
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, (bool, int, str)):
        return value
    return str(value)


# ---- the run record --------------------------------------------------------------------------------


class Run:
    """The record, its JSON file and the guards around parts and steps.

    The orchestrating process and each part's worker process share the record through the JSON file:
    a worker loads it, runs its part (rewriting the file after every step) and exits; the orchestrator
    reads it back. Only one of them writes at a time.
    """

    def __init__(
        self, profile: Profile, out_dir: Path, parts: Sequence[str], record: dict | None = None
    ) -> None:
        self.profile = profile
        self.device = torch.device(profile.device)
        self.timer = Timer(self.device)
        self.memory = Memory(self.device)
        self.out_dir = out_dir
        self.parts = list(parts)
        self.record: dict[str, Any] = record or {
            "schema": SCHEMA,
            "mode": profile.name,
            "complete": False,
            "started_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "started_epoch_s": time.time(),
            "budget": {"total_s": profile.budget_s, "shares_s": profile.shares, "parts": self.parts},
            "notes": list(profile.notes),
            "parts": {
                name: {"status": "pending"} if name in self.parts else skipped("not selected (--parts)")
                for name in PARTS
            },
        }

    @property
    def path(self) -> Path:
        return self.out_dir / "gpu_run.json"

    @classmethod
    def load(cls, profile: Profile, out_dir: Path) -> Run:
        record = json.loads((out_dir / "gpu_run.json").read_text())
        return cls(profile, out_dir, record["budget"]["parts"], record)

    def save(self) -> None:
        """Rewrite the JSON atomically (a reader never sees half a file)."""
        self.record["elapsed_s"] = time.time() - self.record["started_epoch_s"]
        self.out_dir.mkdir(parents=True, exist_ok=True)
        temporary = self.path.with_suffix(f".json.{os.getpid()}.tmp")
        temporary.write_text(json.dumps(finite(self.record), indent=1, allow_nan=False))
        temporary.replace(self.path)

    def part(self, name: str) -> dict[str, Any]:
        return self.record["parts"][name]

    def run_part(self, name: str, deadline: Deadline) -> None:
        """Run one part until ``deadline``; whatever it raises is recorded (then the next part runs)."""
        record: dict[str, Any] = {"status": "running", "allowance_s": deadline.left(), "items": {}}
        self.record["parts"][name] = record
        self.save()
        start = time.monotonic()
        try:
            with torch.no_grad():
                PART_FUNCTIONS[name](self, deadline, record)
            failed = [key for key, item in record["items"].items() if item.get("status") == "failed"]
            record["status"] = "partial" if failed else "ok"
            if failed:
                record["failed_items"] = failed
        except HardStop:
            record["status"] = "interrupted"
            record["reason"] = "stopped at its hard time limit"
        except Exception as error:  # noqa: BLE001 (every failure is recorded, then the next part runs)
            record["status"] = "failed"
            record["error"] = error_record(error)
            print(f"   {name} failed: {type(error).__name__}: {str(error)[:300]}", flush=True)
        finally:
            record["seconds"] = time.monotonic() - start
            free_memory(self.device, compiled=True)
            self.save()

    def item(
        self, record: dict[str, Any], key: str, function: Callable[[], dict[str, Any]]
    ) -> dict[str, Any]:
        """One guarded step inside a part: its result dict, or ``failed`` with the error."""
        start = time.monotonic()
        try:
            result = function()
        except HardStop:
            record["items"][key] = {"status": "interrupted", "seconds": time.monotonic() - start}
            raise
        except Exception as error:  # noqa: BLE001
            result = {"status": "failed", "error": error_record(error)}
            print(f"   {key}: failed: {type(error).__name__}: {str(error)[:300]}", flush=True)
        result.setdefault("status", "ok")
        result["seconds"] = time.monotonic() - start
        record["items"][key] = result
        self.save()
        if result["status"] != "failed":
            print(f"   {key}: {result['status']} ({result['seconds']:.1f} s){_brief(result)}", flush=True)
        return result


def _brief(result: dict[str, Any]) -> str:
    if result.get("status") == "skipped":
        return f": {result.get('reason', '')[:160]}"
    for key in ("ms_per_step", "sqnr_db", "within_tolerance"):
        if key in result:
            value = result[key]
            return f": {key}={value:.4g}" if isinstance(value, float) else f": {key}={value}"
    return ""


# ---- part 1: the machine ---------------------------------------------------------------------------


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _command(args: Sequence[str], timeout: float = 15.0) -> str | None:
    try:
        done = subprocess.run(list(args), capture_output=True, text=True, timeout=timeout, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip()


def machine_info(device: torch.device) -> dict[str, Any]:
    """Names and versions (read, not measured)."""
    from fluxfill_engine.bench.models import device_name_of

    info: dict[str, Any] = {
        "device": str(device),
        "device_name": device_name_of(device),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": _version("triton"),
        "diffusers": _version("diffusers"),
        "transformers": _version("transformers"),
        "accelerate": _version("accelerate"),
        "torchao": _version("torchao"),
        "optimum_quanto": _version("optimum-quanto"),
        "git_sha": _command(["git", "-C", str(ROOT), "rev-parse", "HEAD"]),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        smi = _command(
            ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"]
        )
        info.update(
            {
                "driver": smi.splitlines()[0].split(",")[1].strip() if smi else None,
                "nvidia_smi": smi,
                "cudnn": torch.backends.cudnn.version(),
                "compute_capability": f"{props.major}.{props.minor}",
                "multiprocessors": props.multi_processor_count,
                "memory_gib": props.total_memory / GIB,
            }
        )
    return info


def matmul_tflops(run: Run) -> dict[str, Any]:
    """Measured matmul ceilings: bf16 ``torch.mm``; fp8 ``torch._scaled_mm`` with one scale per tensor
    and fast accumulation (the ceiling of every fp8 variant), and with row-wise scales as the
    engine's native fp8 linears call it. Random inputs; 3 warm-ups, median of 10."""
    from fluxfill_engine.quantization import has_fp8_tensor_cores

    device, size = run.device, run.profile.matmul_size
    generator = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(size, size, device=device, dtype=torch.bfloat16, generator=generator)
    b = torch.randn(size, size, device=device, dtype=torch.bfloat16, generator=generator)
    products: dict[str, Callable[[], torch.Tensor]] = {"bf16": lambda: torch.mm(a, b)}
    result: dict[str, Any] = {
        "size": size,
        "method": f"{run.timer.method}, 0.3 s of warm-up calls, median of 10",
    }
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
    else:
        result["fp8"] = skipped("no fp8 tensor cores (compute capability < 8.9)")
    for precision, product in products.items():
        try:
            run.timer.warm_up(product)
            ms = median(run.timer.call_ms(lambda _, p=product: p(), 10))
            result[precision] = {"tflops": 2 * size**3 / (ms / 1000) / 1e12, "ms": ms}
        except (RuntimeError, NotImplementedError) as error:
            if device.type == "cuda":
                raise
            result[precision] = skipped(f"this CPU build cannot: {str(error)[:200]}")
    return result


def copy_bandwidth(run: Run) -> dict[str, Any]:
    """Device-to-device copy, counting bytes read plus bytes written; warmed up, median of 10."""
    count = run.profile.copy_bytes // 4
    source = torch.randn(count, device=run.device)
    target = torch.empty_like(source)
    run.timer.warm_up(lambda: target.copy_(source))
    ms = median(run.timer.call_ms(lambda _: target.copy_(source), 10))
    return {"bytes_per_copy": 2 * count * 4, "ms": ms, "tb_per_s": 2 * count * 4 / (ms / 1000) / 1e12}


def part_machine(run: Run, deadline: Deadline, record: dict[str, Any]) -> None:
    run.item(record, "info", lambda: machine_info(run.device))
    run.item(record, "matmul", lambda: matmul_tflops(run))
    run.item(record, "copy", lambda: copy_bandwidth(run))


def measured_peaks(run: Run) -> dict[str, float]:
    """``{"bf16": TFLOP/s, "fp8": ...}`` as measured in part 1 (empty where it did not run)."""
    matmul = run.record["parts"]["machine"].get("items", {}).get("matmul", {})
    return {
        key: value["tflops"]
        for key, value in matmul.items()
        if isinstance(value, dict) and isinstance(value.get("tflops"), float)
    }


# ---- part 2: correctness ---------------------------------------------------------------------------


def attention_inputs(run: Run, dtype: torch.dtype, seed: int) -> dict[str, Any]:
    """q, k, v as strided views of one fused projection (as the model hands them over), FLUX's two-row
    norm weights and RoPE table, at the profile's FLUX shape."""
    from fluxfill_engine.bench.models import flux_ids
    from fluxfill_engine.layers import rope_table

    profile, device = run.profile, run.device
    heads, dim, txt = profile.kernel_heads, profile.kernel_head_dim, profile.kernel_text_tokens
    rows, cols = profile.kernel_grid
    seq = txt + rows * cols
    generator = torch.Generator(device=device).manual_seed(seed)
    projection = torch.randn(1, seq, 3 * heads * dim + 64, device=device, generator=generator).to(dtype)
    q, k, v = projection[..., : 3 * heads * dim].unflatten(-1, (3, heads, dim)).unbind(2)
    weights = [(1 + 0.3 * torch.randn(2, dim, device=device, generator=generator)).to(dtype) for _ in "qk"]
    txt_ids, img_ids = flux_ids(txt, (rows, cols), device)
    # FLUX splits the head dim over (text, row, col) as 16/56/56 at 128; any other size as 1/2, 1/4, 1/4.
    axes = (16, 56, 56) if dim == 128 else (dim // 2, dim // 4, dim // 4)
    cos, sin = rope_table(torch.cat([txt_ids, img_ids]), axes)
    return {"q": q, "k": k, "v": v, "q_w": weights[0], "k_w": weights[1], "cos": cos, "sin": sin, "txt": txt}


def compare(output: torch.Tensor, reference: torch.Tensor, tolerance: float) -> dict[str, Any]:
    """Errors of ``output`` against the fp32 ``reference``, and whether it is within ``atol = rtol =
    tolerance`` everywhere with no NaN (the tolerance table's test)."""
    out, ref = output.float(), reference.float()
    error = (out - ref).abs()
    return {
        "max_abs_error": float(error.max()),
        "rel_l2_error": float(error.norm() / ref.norm().clamp_min(1e-30)),
        "all_finite": bool(torch.isfinite(out).all()),
        "within_tolerance": bool(
            torch.isfinite(out).all() and torch.allclose(out, ref, atol=tolerance, rtol=tolerance)
        ),
        "tolerance": tolerance,
    }


def poison_allocator(shape: Sequence[int], dtype: torch.dtype, device: torch.device, blocks: int = 2) -> None:
    """Leave NaN-filled blocks of the output's size in the caching allocator, so a kernel that skips
    elements of its (``torch.empty``) outputs shows NaN instead of stale values (best effort: two
    blocks, as a launcher may allocate a scratch tensor of the same size first)."""
    if device.type == "cuda":
        poisoned = [torch.full(tuple(shape), float("nan"), dtype=dtype, device=device) for _ in range(blocks)]
        del poisoned


def check_fused_attention(run: Run, dtype: torch.dtype, k_prologue: str) -> dict[str, Any]:
    from fluxfill_kernels.fused_attention import fused_attention_ref, fused_attention_triton
    from fluxfill_kernels.tolerances import TOLERANCE

    x = attention_inputs(run, dtype, seed=1)
    args = (x["q"], x["k"], x["v"], x["q_w"], x["k_w"], x["cos"], x["sin"])
    reference = fused_attention_ref(*(t.float() for t in args), x["txt"], EPS)
    poison_allocator(reference.shape, dtype, run.device)
    output = fused_attention_triton(*args, x["txt"], EPS, k_prologue=k_prologue)
    return {"shape": list(x["q"].shape), **compare(output, reference, TOLERANCE[dtype])}


def check_qk_norm_rope(run: Run, dtype: torch.dtype, native: bool = False) -> dict[str, Any]:
    from fluxfill_kernels.qk_norm_rope import qk_norm_rope_ref, qk_norm_rope_triton
    from fluxfill_kernels.tolerances import TOLERANCE

    x = attention_inputs(run, dtype, seed=2)
    args = (x["q"], x["k"], x["q_w"], x["k_w"], x["cos"], x["sin"])
    q_ref, k_ref = qk_norm_rope_ref(*(t.float() for t in args), x["txt"], EPS)
    poison_allocator(q_ref.shape, dtype, run.device)
    kernel = torch.ops.fluxfill_native.qk_norm_rope if native else qk_norm_rope_triton
    q_out, k_out = kernel(*args, x["txt"], EPS)
    q_check, k_check = compare(q_out, q_ref, TOLERANCE[dtype]), compare(k_out, k_ref, TOLERANCE[dtype])
    worst = max((q_check, k_check), key=lambda c: c["max_abs_error"])
    return {
        "shape": list(x["q"].shape),
        **worst,
        "within_tolerance": q_check["within_tolerance"] and k_check["within_tolerance"],
        "q": q_check,
        "k": k_check,
    }


def check_fill_cond(run: Run, dtype: torch.dtype, native: bool = False) -> dict[str, Any]:
    """Pure data movement: must equal the reference bit for bit (and so the fp32 one within any
    tolerance)."""
    from fluxfill_kernels.fill_cond import fill_cond_ref, fill_cond_triton
    from fluxfill_kernels.tolerances import TOLERANCE

    rows, cols = run.profile.kernel_grid
    generator = torch.Generator(device=run.device).manual_seed(3)
    latents = torch.randn(1, 16, 2 * rows, 2 * cols, device=run.device, generator=generator).to(dtype)
    mask = (torch.rand(1, 1, 16 * rows, 16 * cols, device=run.device, generator=generator) > 0.5).to(dtype)
    reference = fill_cond_ref(latents.float(), mask.float(), 8)
    poison_allocator(reference.shape, dtype, run.device)
    kernel = torch.ops.fluxfill_native.fill_cond if native else fill_cond_triton
    output = kernel(latents, mask, 8)
    same_dtype = fill_cond_ref(latents, mask, 8)
    return {
        "shape": list(output.shape),
        **compare(output, reference, TOLERANCE[dtype]),
        "bitwise_equal": bool(torch.equal(output, same_dtype)),
    }


def check_linear(run: Run, mode: str, rows: int, in_features: int, out_features: int) -> dict[str, Any]:
    """A native quantized linear (and plain bf16 for scale) against an fp64 matmul: SQNR in dB."""
    from torch import nn

    from fluxfill_engine.quantization import quantize_linear, resolve

    try:
        plan = resolve(mode, "native", run.device)
    except ValueError as error:
        return skipped(str(error))
    device, dtype = run.device, run.profile.dtype
    generator = torch.Generator(device=device).manual_seed(4)
    linear = nn.Linear(in_features, out_features, device=device, dtype=dtype).requires_grad_(False)
    linear.weight.normal_(0.0, in_features**-0.5, generator=generator)
    linear.bias.normal_(0.0, 0.1, generator=generator)
    x = torch.randn(rows, in_features, device=device, generator=generator).to(dtype)
    exact = torch.addmm(linear.bias.double(), x.double(), linear.weight.double().t())
    output = quantize_linear(linear, plan)(x)
    sqnr = sqnr_db(exact, output)
    bound = LINEAR_SQNR_BOUND_DB[mode]
    return {
        "shape": [rows, in_features, out_features],
        "plan": dataclasses.asdict(plan),
        "sqnr_db": sqnr,
        "unquantized_sqnr_db": sqnr_db(exact, linear(x)),
        "bound_db": bound,
        "within_bound": sqnr is not None and sqnr >= bound and bool(torch.isfinite(output).all()),
    }


class Background:
    """A command run in the background in its own process group (so stopping it ends its children:
    the compilers CMake starts, pytest's workers), its output in a log file under the run's folder."""

    def __init__(self, name: str, log_path: Path) -> None:
        self.name = name
        self.log_path = log_path
        self.process: subprocess.Popen | None = None
        self.started = 0.0
        self.reason: str | None = None  # why it was not started

    def start(self, command: Sequence[str], env: dict[str, str], cwd: Path = ROOT) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("w") as log:
            self.started = time.monotonic()
            self.process = subprocess.Popen(
                list(command), cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
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
    CMake config needs), or why it cannot run here. The CUDA arguments are those of
    tests/test_native.py: the toolkit's root (``nvcc`` on PATH may be a wrapper outside it), nvrtc
    from torch's ``nvidia`` wheels when the toolkit lacks it, and this GPU's architecture alone."""
    beside_python = Path(sys.executable).parent / "cmake"  # pip's cmake in a venv not activated
    cmake = shutil.which("cmake") or (str(beside_python) if beside_python.exists() else None)
    if cmake is None:
        return "cmake is not installed"
    if not any(name and shutil.which(name) for name in (env.get("CXX"), "c++", "g++", "clang++")):
        return "no C++ compiler (c++, g++, clang++ or $CXX)"
    if env.get("FLUXFILL_NATIVE", "1") == "0":
        return "FLUXFILL_NATIVE=0 disables the native library"
    configure = [
        cmake,
        "-S",
        str(ROOT),
        "-B",
        str(folder),
        f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}",
        "-DCMAKE_BUILD_TYPE=Release",
        f"-DFLUXFILL_NATIVE_OUTPUT_DIR={folder}",
    ]
    if torch.version.cuda is not None:
        from torch.utils import cpp_extension

        roots = [
            cpp_extension.CUDA_HOME,
            "/usr/local/cuda",
            *sorted(map(str, Path("/usr/local").glob("cuda-*"))),
        ]
        root = next(
            (Path(r) for r in roots if r and (Path(r) / "include" / "cuda_runtime.h").is_file()), None
        )
        if root is not None:
            configure.append(f"-DCUDA_TOOLKIT_ROOT_DIR={root}")
            if not any((root / lib).glob("libnvrtc.so*") for lib in ("lib64", "lib")):
                wheels = Path(torch.__file__).resolve().parents[1] / "nvidia"
                nvrtc = sorted(wheels.glob("*/lib/libnvrtc.so*"))
                if nvrtc:
                    configure.append(f"-DCUDA_nvrtc_LIBRARY={nvrtc[0]}")
        if torch.cuda.is_available() and "TORCH_CUDA_ARCH_LIST" not in env:
            env["TORCH_CUDA_ARCH_LIST"] = "{}.{}".format(*torch.cuda.get_device_capability())
    build = [cmake, "--build", str(folder), "-j", "4"]
    return ["bash", "-c", " && ".join(shlex.join(command) for command in (configure, build))]


def kernel_tests_command(run: Run) -> list[str]:
    """pytest on the kernel test files: on a GPU every case runs on CUDA (bf16 included), which the
    CPU suite skips or runs in the interpreter; the dry run only collects them."""
    files = [f for f in KERNEL_TEST_FILES if (ROOT / f).is_file()]
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
        "command": " ".join(tests.process.args[1:]),
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


def check_native(run: Run, build: Background, folder: Path, deadline: Deadline) -> dict[str, Any]:
    """Wait for the native build (its minute, or ``deadline``), then hold the library's kernels for
    the run's device to the references."""
    from fluxfill_kernels import native

    if build.process is None:
        return skipped(build.reason or "not started")
    code = build.wait(min(NATIVE_BUILD_LIMIT_S - build.elapsed(), deadline.left()))
    built: dict[str, Any] = {"build_s": build.elapsed()}
    if code is None:
        given = f"the {build.elapsed():.0f} s it was given (at most {NATIVE_BUILD_LIMIT_S:.0f})"
        return {**built, **skipped(f"the build did not finish in {given}; see native-build.log")}
    library = folder / "_C.so"
    if code != 0 or not library.is_file():
        return {
            **built,
            "status": "failed",
            "error": {"type": "BuildError", "log_tail": build.output()[-3000:]},
        }
    built["cuda_kernels"] = "CUDA kernels: ON" in build.output()
    try:
        torch.ops.fluxfill_native.fill_cond  # noqa: B018
        # A library loaded earlier in this process owns the namespace; a second cannot load.
        built["note"] = "fluxfill_native was already loaded (the package's _C.so): checked that library"
    except (AttributeError, RuntimeError):
        if not native.load(library):
            return {
                **built,
                "status": "failed",
                "error": {"type": "LoadError", "message": "native.load refused"},
            }
    kind = run.device.type
    checks: dict[str, Any] = {}
    for op, check in (("qk_norm_rope", check_qk_norm_rope), ("fill_cond", check_fill_cond)):
        if not native.available(op, kind):
            checks[op] = skipped(f"the library has no {kind} kernel for {op} (CMake found no nvcc?)")
            continue
        for name in run.profile.native_dtypes:
            checks[f"{op}/{name}"] = check(run, getattr(torch, name), native=True)
    passed = [c.get("within_tolerance") for c in checks.values() if c.get("status") != "skipped"]
    return {**built, "checks": checks, "within_tolerance": bool(passed) and all(passed)}


def part_correctness(run: Run, deadline: Deadline, record: dict[str, Any]) -> None:
    # The native build (CPU) and the kernel tests (their own processes) run in the background while
    # this process checks the kernels and linears; nothing here is timed, so sharing the GPU is fine.
    # Both are stopped before the part ends, so they never disturb the timings of later parts.
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(ROOT), str(ROOT / "kernels"), env.get("PYTHONPATH")) if p
    )
    folder = Path(tempfile.mkdtemp(prefix="fluxfill-native-"))
    build = Background("native build", run.out_dir / "native-build.log")
    command = native_build_command(folder, env)
    if isinstance(command, str):
        build.reason = command
    else:
        build.start(command, env)
    tests = Background("kernel tests", run.out_dir / "tests-gpu.txt")
    if deadline.fits(30.0):
        tests.start(kernel_tests_command(run), env)
    else:
        tests.reason = f"needs about 30 s; {deadline.left():.0f} s of the part left"
    # If this worker is killed, the orchestrator ends these groups (a stopped worker stops them itself).
    record["background_pids"] = [job.process.pid for job in (build, tests) if job.process is not None]
    try:
        for name in ("bfloat16", "float16"):
            dtype = getattr(torch, name)
            if name not in run.profile.triton_dtypes:
                reason = "GPU only: the Triton interpreter's bf16 tl.dot is wrong"
                for op in ("fused_attention/prepass", "fused_attention/fused", "qk_norm_rope", "fill_cond"):
                    record["items"][f"{op}/{name}"] = skipped(reason)
                continue
            for prologue in ("prepass", "fused"):
                run.item(
                    record,
                    f"fused_attention/{prologue}/{name}",
                    functools.partial(check_fused_attention, run, dtype, prologue),
                )
            run.item(record, f"qk_norm_rope/{name}", functools.partial(check_qk_norm_rope, run, dtype))
            run.item(record, f"fill_cond/{name}", functools.partial(check_fill_cond, run, dtype))
        for mode in ("fp8", "int8", "fp8-weight", "int8-weight"):
            for shape in run.profile.linear_shapes:
                key = "linear/{}/{}x{}x{}".format(mode, *shape)
                run.item(record, key, functools.partial(check_linear, run, mode, *shape))
        # The native check needs a few seconds after its build; the tests get the rest.
        run.item(
            record,
            "kernel_tests",
            lambda: kernel_tests_result(run, tests, deadline.within(deadline.left() - 8.0)),
        )
        run.item(record, "native", lambda: check_native(run, build, folder, deadline))
    finally:
        tests.stop()
        build.stop()
        shutil.rmtree(folder, ignore_errors=True)  # a loaded library stays mapped after its file goes


# ---- part 3: transformer step latency ---------------------------------------------------------------


def transformer_config(profile: Profile) -> dict[str, Any]:
    from fluxfill_engine.architecture import TRANSFORMER_CONFIG

    return dict(profile.transformer_config or TRANSFORMER_CONFIG)


def step_inputs(run: Run, config: dict[str, Any], steps: int = 1) -> StepInputs:
    """One denoising step's random inputs at the profile's size (no text encoder)."""
    from fluxfill_engine.bench.models import StepInputs

    profile = run.profile
    return StepInputs.random(
        config, profile.width, profile.height, profile.text_tokens, run.device, profile.dtype, steps
    )


@dataclass
class BuiltStep:
    """A variant ready to run one step (``step(i)``), and what it is."""

    step: Callable[[int], torch.Tensor]
    compiled: bool
    precision: str  # "bf16" or "fp8": the matmul ceiling that bounds it
    info: dict[str, Any] = field(default_factory=dict)
    holds: list[Any] = field(default_factory=list)  # objects to drop when done (clones, pipelines)


def build_step(run: Run, variant: StepVariant, base: Any, inputs: StepInputs) -> BuiltStep:
    """Set ``variant`` up on ``base`` (or a weight-sharing clone of it) and return its step."""
    from fluxfill_engine.bench.variants import parse_variant

    spec = parse_variant(variant.name)
    from fluxfill_engine.bench.models import shared_clone

    transformer = shared_clone(base) if variant.clone else base
    if spec.kind == "diffusers":
        precision = "bf16"
        if spec.base == "diffusers-fp8-compile":
            from fluxfill_engine.bench.variants import _torchao_fp8

            _torchao_fp8(transformer)
            precision = "fp8"
        if spec.base in ("diffusers-compile", "diffusers-fp8-compile"):
            transformer.compile_repeated_blocks(fullgraph=True)
        kwargs = inputs.diffusers_kwargs(GUIDANCE)

        def diffusers_step(_: int) -> torch.Tensor:
            return transformer(**kwargs)[0]

        compiled = spec.base != "diffusers"
        return BuiltStep(diffusers_step, compiled, precision, {"kind": "diffusers"}, [transformer])
    assert spec.config is not None
    from fluxfill_engine.bench.models import engine_pipeline

    pipe = engine_pipeline(transformer)
    pipe.configure(spec.config)
    fill = pipe.engine_transformer()
    prepared = inputs.prepare(fill, GUIDANCE)
    plan = fill.quant_plan
    info = {
        "kind": "engine",
        "engine_config": spec.config.describe(),
        "quantization": None if plan is None else dataclasses.asdict(plan),
        "transformer_dtype": str(fill.dtype).replace("torch.", ""),
    }
    choices = getattr(fill.attention, "choices", None)  # what `auto` picked per shape
    if choices:
        info["auto_attention"] = {str(key[0]): name for key, name in choices.items()}

    def engine_step(index: int) -> torch.Tensor:
        return fill(inputs.latents, index % inputs.timesteps.shape[0], prepared)

    precision = "fp8" if plan is not None and plan.mode == "fp8" else "bf16"
    return BuiltStep(engine_step, bool(spec.config.compile), precision, info, [pipe, transformer])


def measure_step(
    run: Run,
    variant: StepVariant,
    base: Any,
    inputs: StepInputs,
    reference: torch.Tensor | None,
    flops: float,
) -> tuple[dict[str, Any], torch.Tensor | None]:
    """Build, cold call, warm-up, timed calls, drift and memory of one variant; frees it after."""
    profile = run.profile
    run.memory.reset_peak()
    before = run.memory.allocated_gib()
    built, setup_s = run.timer.wall_s(lambda: build_step(run, variant, base, inputs))
    after_setup = run.memory.allocated_gib()
    real_compile = profile.real_compile is None or variant.name in profile.real_compile
    stance = (
        contextlib.nullcontext()
        if real_compile or not built.compiled
        else torch.compiler.set_stance("force_eager")
    )
    try:
        with stance:
            output, cold_s = run.timer.wall_s(functools.partial(built.step, 0))
            for index in range(profile.warmup):
                built.step(index)
            setup_peak = run.memory.peak_gib()  # quantizing and compiling included
            run.memory.reset_peak()
            times = run.timer.call_ms(built.step, profile.repeats)
        ms = median(times)
        peaks = measured_peaks(run)
        tflops = flops / (ms / 1000) / 1e12
        result: dict[str, Any] = {
            **built.info,
            "compiled": built.compiled and real_compile,
            "setup_s": setup_s,
            "cold_call_s": cold_s,  # the first call: compilation (if any), autotuning, lazy set-up
            "cold_overhead_s": cold_s - ms / 1000,
            "ms_per_step": ms,
            "ms_all": times,
            "tflops": tflops,
            "precision": built.precision,
            "measured_peak_tflops": peaks.get(built.precision),
            "fraction_of_measured_peak": tflops / peaks[built.precision]
            if built.precision in peaks
            else None,
            "sqnr_vs_reference_db": None if reference is None else sqnr_db(reference, output),
            "exact_vs_reference": None if reference is None else bool(torch.equal(reference, output)),
            "output_finite": bool(torch.isfinite(output).all()),
            "memory_before_gib": before,
            "memory_after_setup_gib": after_setup,
            "peak_setup_and_warmup_gib": setup_peak,
            "peak_during_steps_gib": run.memory.peak_gib(),
        }
        if built.compiled and not real_compile:
            result["note"] = "dry run: compiled modules ran under torch.compiler.set_stance('force_eager')"
        return result, output.detach().clone()
    finally:
        del built
        free_memory(run.device, compiled=True)


def latency_variant(
    run: Run,
    variant: StepVariant,
    base: Any,
    inputs: StepInputs,
    outputs: dict[str, torch.Tensor],
    flops: float,
    unavailable: str | None,
) -> dict[str, Any]:
    """One variant of part 3; keeps the ``reference`` output in ``outputs`` for the others' drift."""
    try:
        result, output = measure_step(run, variant, base, inputs, outputs.get("reference"), flops)
    except Exception as error:  # noqa: BLE001
        if unavailable is None:
            raise
        # The dry run builds what a CPU cannot run as far as it gets; stopping there is expected.
        return skipped(
            f"{unavailable}; on the CPU its set-up stopped at: {type(error).__name__}: {str(error)[:300]}"
        )
    if variant.name == "reference":
        outputs["reference"] = output
        result["note"] = "the drift reference"
    return result


def batched_variant(
    run: Run,
    size: int,
    base: Any,
    inputs: StepInputs,
    outputs: dict[str, torch.Tensor],
    record: dict[str, Any],
    flops: float,
) -> dict[str, Any]:
    """The engine's step on ``size`` requests at once (what ``FluxFillEngine.run_batch`` runs): its
    milliseconds per image against batch 1 (the ``reference`` item), and each image's drift from the
    batch-1 output (the inputs are the same for every image of the batch)."""
    reference = outputs.get("reference")
    expected = None if reference is None else reference.expand(size, *reference.shape[1:])
    result, _ = measure_step(run, BATCHED, base, inputs.batched(size), expected, flops * size)
    result["batch_size"] = size
    result["ms_per_image_step"] = result["ms_per_step"] / size
    solo = record["items"].get(BATCHED.name, {})
    if solo.get("status") == "ok":
        result["speedup_per_image_vs_batch_1"] = solo["ms_per_step"] / result["ms_per_image_step"]
    if expected is not None:
        result["note"] = "drift: each image against the batch-1 output of the same inputs"
    return result


def part_latency(run: Run, deadline: Deadline, record: dict[str, Any]) -> None:
    from fluxfill_engine.bench.models import random_transformer, transformer_flops
    from fluxfill_engine.bench.variants import parse_variant, unavailable_reason

    profile = run.profile
    config = transformer_config(profile)
    inputs = step_inputs(run, config, steps=1)
    flops = transformer_flops(config, inputs.latents.shape[1], profile.text_tokens)
    record["model"] = {
        "transformer_config": {k: list(v) if isinstance(v, tuple) else v for k, v in config.items()},
        "image_tokens": inputs.latents.shape[1],
        "text_tokens": profile.text_tokens,
        "dtype": str(profile.dtype).replace("torch.", ""),
        "flops_per_step": flops.as_dict(),
    }
    base, build_s = run.timer.wall_s(
        lambda: random_transformer(config, device=run.device, dtype=profile.dtype, seed=0)
    )
    record["model"]["build_s"] = build_s
    record["model"]["parameters"] = sum(p.numel() for p in base.parameters())
    record["model"]["weights_gib"] = run.memory.allocated_gib()
    run.save()
    outputs: dict[str, torch.Tensor] = {}  # the reference's output, once it has run
    for variant in STEP_VARIANTS:
        spec = parse_variant(variant.name)  # a wrong name fails here, in the dry run too
        reason = unavailable_reason(spec, run.device)
        tries_anyway = profile.dry_run and variant.name in TRY_ON_CPU
        if reason is not None and not tries_anyway:
            record["items"][variant.name] = skipped(reason)
            continue
        if not deadline.fits(variant.estimate_s):
            record["items"][variant.name] = too_late(variant.name, variant.estimate_s, deadline)
            continue
        run.item(
            record,
            variant.name,
            functools.partial(latency_variant, run, variant, base, inputs, outputs, flops.total, reason),
        )
    for size in profile.batch_sizes:
        name = f"{BATCHED.name}:batch={size}"
        estimate_s = BATCHED.estimate_s * size
        if not deadline.fits(estimate_s):
            record["items"][name] = too_late(name, estimate_s, deadline)
            continue
        run.item(
            record,
            name,
            functools.partial(batched_variant, run, size, base, inputs, outputs, record, flops.total),
        )


# ---- part 4: end to end ----------------------------------------------------------------------------


def component_configs(profile: Profile) -> Any:
    """The real seven components, or the same classes at toy widths for the dry run."""
    from fluxfill_engine.architecture import CLIP_TEXT_CONFIG, T5_CONFIG, VAE_CONFIG
    from fluxfill_engine.bench.models import ComponentConfigs, full_configs

    if profile.transformer_config is None:
        return full_configs()
    return ComponentConfigs(
        transformer=dict(profile.transformer_config),
        vae=dict(VAE_CONFIG, block_out_channels=(8, 16, 32, 32), norm_num_groups=8, layers_per_block=1),
        clip=dict(
            CLIP_TEXT_CONFIG,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            projection_dim=32,
        ),
        t5=dict(T5_CONFIG, d_model=64, d_kv=16, d_ff=96, num_layers=2, num_heads=4),
        clip_vocab_size=int(CLIP_TEXT_CONFIG["vocab_size"]),
        t5_vocab_size=32100,
    )


def request_images(width: int, height: int) -> tuple[Any, Any]:
    """A deterministic picture with texture and a centred half-size mask (white = repaint)."""
    import numpy as np
    import PIL.Image

    rng = np.random.default_rng(0)
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    u, v = xs / max(width - 1, 1), ys / max(height - 1, 1)
    rgb = np.stack([u, v, 0.5 + 0.5 * np.sin(6.0 * (u + v))], axis=-1) * 0.8 + 0.2 * rng.random(
        (height, width, 3)
    )
    mask = np.zeros((height, width), np.uint8)
    mask[height // 4 : height - height // 4, width // 4 : width - width // 4] = 255
    return PIL.Image.fromarray((rgb.clip(0, 1) * 255).round().astype(np.uint8)), PIL.Image.fromarray(mask)


class StageClock:
    """Marks a pipeline call's stages from forward hooks on its text encoders and transformer: text
    encoding ends with the last text-encoder forward, denoising spans the first to the last transformer
    forward, decoding follows it to the end of the call. Both pipelines are timed the same way."""

    def __init__(self, timer: Timer) -> None:
        self.timer = timer
        self.intervals: dict[str, list[tuple[Any, Any]]] = {"text": [], "transformer": []}
        self._open: dict[str, Any] = {}
        self._handles: list[Any] = []

    def watch(self, module: Any, key: str) -> None:
        def before(*_: Any) -> None:
            self._open[key] = self.timer.mark()

        def after(*_: Any) -> None:
            self.intervals[key].append((self._open.pop(key), self.timer.mark()))

        self._handles += [module.register_forward_pre_hook(before), module.register_forward_hook(after)]

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def stages(self, start: Any, end: Any) -> dict[str, Any]:
        seconds = self.timer.seconds
        steps = self.intervals["transformer"]
        if not steps:
            raise RuntimeError("no transformer forward was observed: the stage hooks see nothing")
        text = self.intervals["text"]
        text_end = text[-1][1] if text else start
        return {
            "text_encode_s": seconds(start, text_end) if text else None,
            "prepare_and_vae_encode_s": seconds(text_end, steps[0][0]),
            "denoise_s": seconds(steps[0][0], steps[-1][1]),
            "decode_s": seconds(steps[-1][1], end),
            "total_s": seconds(start, end),
            "transformer_calls": len(steps),
            "transformer_ms_per_call": 1000 * sum(seconds(a, b) for a, b in steps) / len(steps),
            "text_encoder_calls": len(text),
        }


def timed_call(run: Run, pipe: Any, transformer: Any, steps: int, prompt: str) -> tuple[dict[str, Any], Any]:
    """One pipeline call with its stage times; returns the record and the images."""
    profile = run.profile
    image, mask = request_images(profile.width, profile.height)
    clock = StageClock(run.timer)
    clock.watch(pipe.text_encoder, "text")
    clock.watch(pipe.text_encoder_2, "text")
    clock.watch(transformer, "transformer")
    try:
        run.timer.sync()
        wall = time.perf_counter()
        start = run.timer.mark()
        images = pipe(
            prompt=prompt,
            image=image,
            mask_image=mask,
            height=profile.height,
            width=profile.width,
            num_inference_steps=steps,
            guidance_scale=GUIDANCE,
            max_sequence_length=profile.text_tokens,
            generator=torch.Generator("cpu").manual_seed(0),
            output_type="np",
        ).images
        end = run.timer.mark()
        run.timer.sync()
        wall = time.perf_counter() - wall
    finally:
        clock.remove()
    return {"steps": steps, "wall_s": wall, **clock.stages(start, end)}, images


def part_e2e(run: Run, deadline: Deadline, record: dict[str, Any]) -> None:
    import diffusers

    from fluxfill_engine import FluxFillPipeline
    from fluxfill_engine.bench.models import random_components
    from fluxfill_engine.config import PRESETS
    from fluxfill_engine.metrics import psnr_db

    profile = run.profile
    components, build_s = run.timer.wall_s(
        lambda: random_components(component_configs(profile), device=run.device, dtype=profile.dtype, seed=0)
    )
    record["build_s"] = build_s
    record["weights_gib"] = run.memory.allocated_gib()
    # Different prompts for warm-up and timed call: the engine's prompt cache must miss, as diffusers
    # (which has none) always does.
    warm_prompt, prompt = "a photo of a cat", "a white paper cup on the table"
    images: dict[str, Any] = {}

    def parts() -> dict[str, Any]:
        # Schedulers keep per-call state: each pipeline gets its own.
        scheduler = components["scheduler"]
        return {**components, "scheduler": type(scheduler).from_config(scheduler.config)}

    def diffusers_eager() -> dict[str, Any]:
        pipe = diffusers.FluxFillPipeline(**parts())
        pipe.set_progress_bar_config(disable=True)
        _, warm_s = run.timer.wall_s(
            lambda: timed_call(run, pipe, pipe.transformer, profile.e2e_warmup_steps, warm_prompt)
        )
        run.memory.reset_peak()
        result, images["diffusers"] = timed_call(run, pipe, pipe.transformer, profile.e2e_steps, prompt)
        return {**result, "warmup_call_s": warm_s, "peak_gib": run.memory.peak_gib()}

    def engine_fast() -> dict[str, Any]:
        # `fast` quantizes the shared transformer in place: diffusers ran on it before, never after.
        pipe = FluxFillPipeline(**parts())
        pipe.set_progress_bar_config(disable=True)
        _, configure_s = run.timer.wall_s(lambda: pipe.configure(PRESETS["fast"]))
        fill = pipe.engine_transformer()
        plan = fill.quant_plan
        stance = (
            contextlib.nullcontext()
            if profile.real_compile is None or "e2e/fast" in profile.real_compile
            else torch.compiler.set_stance("force_eager")
        )
        with stance:
            _, warm_s = run.timer.wall_s(
                lambda: timed_call(run, pipe, fill, profile.e2e_warmup_steps, warm_prompt)
            )
            run.memory.reset_peak()
            result, images["fast"] = timed_call(run, pipe, fill, profile.e2e_steps, prompt)
        out = {
            **result,
            "configure_s": configure_s,
            "warmup_call_s": warm_s,
            "warmup_note": "the warm-up call includes compiling the blocks",
            "quantization": None if plan is None else dataclasses.asdict(plan),
            "peak_gib": run.memory.peak_gib(),
        }
        if "diffusers" in images:
            out["image_psnr_vs_diffusers_db"] = psnr_db(images["diffusers"], images["fast"])
        if profile.real_compile is not None and "e2e/fast" not in profile.real_compile:
            out["note"] = "dry run: compiled blocks ran under torch.compiler.set_stance('force_eager')"
        return out

    run.item(record, "diffusers", diffusers_eager)
    free_memory(run.device)
    if deadline.fits(35.0):
        run.item(record, "fast", engine_fast)
    else:
        record["items"]["fast"] = too_late("engine fast end to end", 35.0, deadline)
    images.clear()  # the part's weights go when it returns; run_part then frees the memory


# ---- part 5: step cache ----------------------------------------------------------------------------


def part_step_cache(run: Run, deadline: Deadline, record: dict[str, Any]) -> None:
    from fluxfill_engine.bench.models import random_transformer
    from fluxfill_engine.cache import StepCache
    from fluxfill_engine.config import PRESETS, StepCachePolicy

    profile = run.profile
    config = transformer_config(profile)
    count = profile.step_cache_steps
    steps = count + 1  # step 0 is always computed: it sets the cache's reference
    inputs = step_inputs(run, config, steps=steps)
    base = random_transformer(config, device=run.device, dtype=profile.dtype, seed=0)
    from fluxfill_engine.bench.models import engine_pipeline

    pipe = engine_pipeline(base)
    pipe.configure(PRESETS["reference"])
    fill = pipe.engine_transformer()
    prepared = fill.prepare(
        inputs.cond,
        inputs.prompt_embeds,
        inputs.pooled,
        inputs.timesteps,
        GUIDANCE,
        inputs.txt_ids,
        inputs.img_ids,
        inputs.latents.dtype,
    )

    def with_cache(threshold: float) -> tuple[list[float], dict[str, Any]]:
        # final=0 and unlimited consecutive skips: with a huge threshold every step after the first
        # skips; with threshold 0 none does (the cache's bookkeeping without its savings).
        policy = StepCachePolicy(threshold=threshold, warmup=1, final=0, max_skips=10**6)
        cache = StepCache(policy, steps)
        fill(inputs.latents, 0, prepared, cache)
        times = run.timer.call_ms(lambda i: fill(inputs.latents, i, prepared, cache), count, first=1)
        return times, cache.stats()

    def measure() -> dict[str, Any]:
        for index in range(profile.warmup):
            fill(inputs.latents, index % steps, prepared)
        full = run.timer.call_ms(lambda i: fill(inputs.latents, i % steps, prepared), count)
        computed, computed_stats = with_cache(0.0)
        skipping, skipping_stats = with_cache(1e9)
        full_ms, skip_ms = median(full), median(skipping)
        return {
            "engine_config": "reference (eager)",
            "full_step_ms": full_ms,
            "full_step_with_cache_ms": median(computed),
            "skipped_step_ms": skip_ms,
            "skipped_over_full": skip_ms / full_ms,
            "steps_skipped": skipping_stats["steps_cached"],
            "steps_computed_when_never_skipping": computed_stats["steps_full"],
            "ms_all": {"full": full, "cache_never_skips": computed, "cache_skips": skipping},
        }

    run.item(record, "skip_vs_full", measure)


# ---- the table -------------------------------------------------------------------------------------


def _num(value: Any, fmt: str = ".3g") -> str:
    """A number for the table; ``-`` for what was not measured."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "NO"
    return format(value, fmt) if isinstance(value, (int, float)) else str(value)


def _why(item: dict[str, Any], width: int = 60) -> str:
    """An item's status with its reason or error, for a row that has no numbers."""
    text = item.get("reason") or (item.get("error") or {}).get("message") or ""
    return f"{item.get('status', '-')}: {text}"[:width]


def render_table(record: dict[str, Any]) -> str:
    """A short plain-text summary of the record, printed last (the device tool returns the output's
    tail); every number in it is in the JSON."""
    parts = record.get("parts", {})

    def items(part: str) -> dict[str, Any]:
        return parts.get(part, {}).get("items", {})

    lines = [
        f"fluxfill gpu_run ({record.get('mode')}): {_num(record.get('elapsed_s'), '.0f')} s, "
        f"complete: {_num(record.get('complete'))}",
        f"{'part':<13}{'status':<12}{'s':>6}  note",
    ]
    for name in PARTS:
        part = parts.get(name, {})
        note = (
            part.get("reason")
            or (part.get("error") or {}).get("message")
            or (part.get("worker") or {}).get("note")
            or ", ".join(part.get("failed_items", []))
        )
        lines.append(
            f"{name:<13}{part.get('status', '-'):<12}{_num(part.get('seconds'), '.0f'):>6}  {note[:72]}"
        )

    machine = items("machine")
    info, matmul, copy = machine.get("info", {}), machine.get("matmul", {}), machine.get("copy", {})
    if info:
        lines.append(
            f"machine: {info.get('device_name')}, driver {_num(info.get('driver'))}, torch {info.get('torch')}, "
            f"CUDA {_num(info.get('torch_cuda'))}, triton {_num(info.get('triton'))}"
        )
    if matmul or copy:
        peaks = ", ".join(
            f"{key} {_num(value['tflops'], '.1f')}"
            for key, value in matmul.items()
            if isinstance(value, dict) and "tflops" in value
        )
        lines.append(f"  matmul TFLOP/s: {peaks or '-'}; copy {_num(copy.get('tb_per_s'), '.2f')} TB/s")

    checks = items("correctness")
    if checks:
        lines.append(f"{'check':<36}{'ok':<5}{'max abs err':>12}{'rel L2':>10}{'SQNR dB':>9}")
        for key, item in checks.items():
            if key in ("native", "kernel_tests"):
                continue
            if item.get("status") != "ok":
                lines.append(f"{key:<36}{_why(item, 70)}")
                continue
            ok = item.get("within_tolerance", item.get("within_bound"))
            lines.append(
                f"{key:<36}{_num(ok):<5}{_num(item.get('max_abs_error'), '.2e'):>12}"
                f"{_num(item.get('rel_l2_error'), '.1e'):>10}{_num(item.get('sqnr_db'), '.1f'):>9}"
            )
        native = checks.get("native", {})
        if native:
            built = f"built in {_num(native.get('build_s'), '.0f')} s, " if "build_s" in native else ""
            lines.append(
                f"native library: {built}{_why(native, 60) if native.get('status') != 'ok' else 'checks within tolerance: ' + _num(native.get('within_tolerance'))}"
            )
        tests = checks.get("kernel_tests", {})
        if tests:
            summary = tests.get("counts") if tests.get("status") == "ok" else _why(tests, 70)
            lines.append(f"kernel tests on the device: {summary}")

    steps = items("latency")
    if steps:
        lines.append(
            f"{'step (1 transformer forward)':<38}{'ms':>8}{'TFLOP/s':>9}{'%peak':>7}{'SQNR':>7}{'GiB':>6}{'cold s':>8}"
        )
        for key, item in steps.items():
            if item.get("status") != "ok":
                lines.append(f"{key:<38}{_why(item, 44)}")
                continue
            fraction = item.get("fraction_of_measured_peak")
            drift = (
                "ref"
                if key == "reference"
                else "exact"
                if item.get("exact_vs_reference")
                else _num(item.get("sqnr_vs_reference_db"), ".1f")
            )
            lines.append(
                f"{key:<38}{_num(item.get('ms_per_step'), '.1f'):>8}{_num(item.get('tflops'), '.1f'):>9}"
                f"{_num(None if fraction is None else 100 * fraction, '.0f'):>7}{drift:>7}"
                f"{_num(item.get('peak_during_steps_gib'), '.1f'):>6}{_num(item.get('cold_call_s'), '.1f'):>8}"
            )
        batched = [item for item in steps.values() if item.get("status") == "ok" and "batch_size" in item]
        if batched:
            lines.append(
                "batching, ms per image-step: "
                + ", ".join(
                    f"batch {item['batch_size']} {_num(item['ms_per_image_step'], '.1f')} "
                    f"({_num(item.get('speedup_per_image_vs_batch_1'), '.2f')}x)"
                    for item in batched
                )
            )

    e2e = items("e2e")
    if e2e:
        lines.append(
            f"{'call (s)':<12}{'text':>7}{'prep+VAE':>9}{'denoise':>9}{'decode':>8}{'total':>8}{'ms/step':>9}"
        )
        for key, item in e2e.items():
            if item.get("status") != "ok":
                lines.append(f"{key:<12}{_why(item, 60)}")
                continue
            lines.append(
                f"{key:<12}{_num(item.get('text_encode_s'), '.2f'):>7}{_num(item.get('prepare_and_vae_encode_s'), '.2f'):>9}"
                f"{_num(item.get('denoise_s'), '.2f'):>9}{_num(item.get('decode_s'), '.2f'):>8}"
                f"{_num(item.get('total_s'), '.2f'):>8}{_num(item.get('transformer_ms_per_call'), '.1f'):>9}"
            )

    cache = items("step_cache").get("skip_vs_full", {})
    if cache.get("status") == "ok":
        lines.append(
            f"step cache: full step {_num(cache.get('full_step_ms'), '.1f')} ms, skipped step "
            f"{_num(cache.get('skipped_step_ms'), '.2f')} ms ({_num(100 * cache['skipped_over_full'], '.1f')}% of a full step)"
        )
    elif cache:
        lines.append(f"step cache: {_why(cache, 90)}")
    return "\n".join(lines)


# ---- main: one worker process per part -------------------------------------------------------------

PART_FUNCTIONS: dict[str, Callable[[Run, Deadline, dict[str, Any]], None]] = {
    "machine": part_machine,
    "correctness": part_correctness,
    "latency": part_latency,
    "e2e": part_e2e,
    "step_cache": part_step_cache,
}
# A worker stops itself this long after its allowance (HardStop: it records and exits); the
# orchestrator kills one that is still there later still (stuck in a kernel or a compiler).
WORKER_STOP_GRACE_S = 20.0
WORKER_KILL_GRACE_S = 40.0


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


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="fluxfill-engine's one-command GPU run (see the module docstring and benchmarks/README.md)."
    )
    parser.add_argument("--out", type=Path, default=None, help="folder for gpu_run.json (default: $OUT)")
    parser.add_argument("--dry-run", action="store_true", help="every part at a tiny size on the CPU")
    parser.add_argument(
        "--parts", default=None, help=f"comma list of parts to run: {', '.join(PARTS)} (or 1-5)"
    )
    parser.add_argument(
        "--budget-s",
        type=float,
        default=None,
        help=f"time budget (default {DEFAULT_BUDGET_S:.0f} s on a GPU)",
    )
    # Internal: how the orchestrator starts a part's worker process.
    parser.add_argument("--worker", choices=PARTS, help=argparse.SUPPRESS)
    parser.add_argument("--until", type=float, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


@contextlib.contextmanager
def hard_stop_after(seconds: float) -> Iterator[None]:
    """Raise :class:`HardStop` in the main thread after ``seconds`` (whole seconds, SIGALRM)."""

    def stop(*_: Any) -> None:
        raise HardStop()

    previous = signal.signal(signal.SIGALRM, stop)
    signal.alarm(max(1, int(math.ceil(seconds))))
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def run_worker(profile: Profile, out: Path, name: str, until: float) -> int:
    """A part's worker process: load the record, run the part until ``until`` (epoch seconds), save."""
    run = Run.load(profile, out)
    seconds = until - time.time()
    with hard_stop_after(seconds + WORKER_STOP_GRACE_S):
        run.run_part(name, Deadline(seconds))
    return 0


def stop_process_groups(pids: Sequence[int]) -> None:
    """End the background process groups a killed worker left (it could not stop them itself)."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)


def orchestrate(profile: Profile, out: Path, parts: Sequence[str], argv_extra: Sequence[str]) -> int:
    """Run each part in a fresh worker process, in order, each under its allowance of the budget.

    A fresh process per part frees every byte the part held, and keeps a broken CUDA context (an
    illegal memory access is sticky), a crash or a hang from costing the parts after it.
    """
    run = Run(profile, out, parts)
    run.save()
    budget_end = time.time() + profile.budget_s
    for index, name in enumerate(parts):
        later = sum(profile.shares[p] for p in parts[index + 1 :])
        allowance = part_allowance(budget_end - time.time(), profile.shares[name], later)
        print(f"== {name} (allowance {allowance:.0f} s)", flush=True)
        if allowance < 5.0:
            left = budget_end - time.time()
            reason = f"its allowance is {allowance:.0f} s ({left:.0f} s of the budget left)"
            run.record["parts"][name] = skipped(reason)
            run.save()
            continue
        until = time.time() + allowance
        command = [sys.executable, str(Path(__file__).resolve()), "--worker", name, "--until", f"{until:.3f}"]
        worker = subprocess.Popen([*command, "--out", str(out), *argv_extra], cwd=ROOT)
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
    run.record["complete"] = True
    run.save()
    table = render_table(run.record)
    (out / "gpu_run.txt").write_text(table + "\n")
    print(table, flush=True)
    bad = [n for n in parts if run.part(n).get("status") not in ("ok", "skipped")]
    return 1 if bad else 0


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        parts = parse_parts(args.parts)
    except ValueError as error:
        print(f"gpu_run: {error}", file=sys.stderr)
        return 2
    out = args.out or (Path(os.environ["OUT"]) if os.environ.get("OUT") else None)
    if out is None:
        print("gpu_run: give --out DIR or set OUT", file=sys.stderr)
        return 2
    if args.dry_run:
        profile = dry_run_profile(args.budget_s) if args.budget_s else dry_run_profile()
    elif not torch.cuda.is_available():
        print(
            "gpu_run: no CUDA device here; --dry-run runs the same code on the CPU at a tiny size",
            file=sys.stderr,
        )
        return 2
    else:
        profile = gpu_profile(args.budget_s or DEFAULT_BUDGET_S)
    if args.dry_run:
        # One thread: at these sizes more only adds OpenMP spin-waits, which a busy CI machine turns
        # into 100x slower steps.
        torch.set_num_threads(1)
    if args.worker:
        return run_worker(profile, out, args.worker, args.until)
    extra = (["--dry-run"] if args.dry_run else []) + (
        ["--budget-s", str(args.budget_s)] if args.budget_s else []
    )
    return orchestrate(profile, out, parts, extra)


if __name__ == "__main__":
    sys.exit(main())
