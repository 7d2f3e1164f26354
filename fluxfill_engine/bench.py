"""``fluxfill bench``: every optimization against diffusers' ``FluxFillPipeline``, in one process.

One model (``--preset``: ``cpu-tiny``, ``cpu-mid`` or ``gpu-full``, see
:data:`~fluxfill_engine.bench_models.MODEL_PRESETS`) is built once with a fixed seed; every variant
(:mod:`~fluxfill_engine.bench_variants`) gets a pipeline on those weights and runs the same request
(same image, mask, prompt and seed). After each variant's warm-up calls (the first is its cold start:
compilation, autotuning, lazy initialisation), the timed calls are interleaved: repeat ``r`` runs every
variant once, in an order rotated by ``r``, so a drift in machine speed hits all variants alike.

Per variant the record holds end-to-end seconds (median, p20, p80), a per-stage breakdown, transformer
milliseconds per step, the achieved TFLOP/s (work per step counted from the shapes by
:func:`~fluxfill_engine.bench_models.transformer_flops`) and its fraction of the device's peak, peak
memory, cold and warm call seconds, drift against the ``reference`` variant (SQNR of the final latents,
PSNR of the images) and the speed ratio against ``diffusers``. :func:`render_markdown` and
:func:`plot_speed_vs_drift` turn the record into a table and a figure.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import gc
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import torch

from .bench_models import (
    MODEL_PRESETS,
    device_name_of,
    device_peak,
    full_configs,
    image_tokens_for,
    parameter_counts,
    precision_class,
    transformer_flops,
)
from .bench_variants import (
    STAGES,
    BenchError,
    BenchInputs,
    EngineRunner,
    MemoryMeter,
    RunResult,
    VariantRunner,
    VariantSpec,
    build_runners,
    dtype_name,
    known_variants,
    parse_variant,
    resolve_variants,
    split_variant_list,
    unavailable_reason,
)
from .config import parse_dtype

SCHEMA = "fluxfill-bench/1"
DEFAULT_PROMPT = "a white paper cup on the table"
BASELINE, REFERENCE = "diffusers", "reference"


@dataclass
class BenchSettings:
    """What to benchmark. ``None`` fields take the model preset's defaults.

    Attributes:
        preset: ``cpu-tiny``, ``cpu-mid`` or ``gpu-full``.
        variants: variant names (see :func:`~fluxfill_engine.bench_variants.parse_variant`); ``None``
            runs every variant this machine can run.
        width, height: request size in pixels (multiples of 16).
        steps, repeats, warmup, seed: sampling steps per call, timed calls per variant, untimed calls
            per variant before them (the first is the cold start), the request's seed.
        include_baselines: add ``diffusers`` (speed baseline) and ``reference`` (drift reference) when
            they are not listed.
        keep_prompt_cache: let the engine serve repeated prompts from its LRU cache (off: every call
            encodes its prompt, as diffusers does, so the comparison is per request).
        fresh_compile_cache: point Inductor (and Triton) at an empty cache directory, so cold starts
            include the whole compilation, not what an earlier process left on disk.
        peak_tflops: overrides of the device peak per precision class (``{"bf16": 989.4}``).
        note: free text stored with the record and shown in the markdown (why these settings).
    """

    preset: str = "cpu-tiny"
    variants: list[str] | None = None
    width: int | None = None
    height: int | None = None
    steps: int = 28
    repeats: int = 3
    warmup: int = 1
    seed: int = 0
    prompt: str = DEFAULT_PROMPT
    guidance_scale: float = 30.0
    max_sequence_length: int | None = None
    device: str | None = None
    dtype: str | None = None
    include_baselines: bool = True
    keep_prompt_cache: bool = False
    fresh_compile_cache: bool = True
    peak_tflops: dict[str, float] = field(default_factory=dict)
    progress: bool = True
    note: str | None = None

    def check(self) -> None:
        """Raise :class:`BenchError` for values no run could use."""
        if self.preset not in MODEL_PRESETS:
            raise BenchError(f"unknown preset {self.preset!r}; choose one of {list(MODEL_PRESETS)}")
        for name, low in (("steps", 1), ("repeats", 1), ("warmup", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise BenchError(f"`{name}` must be an int >= {low}, got {value!r}")
        for name in ("width", "height"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 32 or value % 16):
                raise BenchError(f"`{name}` must be a multiple of 16, at least 32, got {value!r}")
        if self.max_sequence_length is not None and not 1 <= self.max_sequence_length <= 512:
            raise BenchError(f"`max_sequence_length` must be in [1, 512], got {self.max_sequence_length}")
        try:
            parse_dtype(self.dtype, "dtype")
        except ValueError as err:
            raise BenchError(str(err)) from err


# ---- inputs, statistics, drift ---------------------------------------------------------------------


def bench_inputs(width: int, height: int, seed: int = 0) -> tuple[PIL.Image.Image, PIL.Image.Image]:
    """A deterministic picture (colour gradients with fine texture) and a centred half-size mask."""
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    u, v = xs / max(width - 1, 1), ys / max(height - 1, 1)
    rgb = np.stack([u, v, 0.5 + 0.5 * np.sin(6.0 * (u + v))], axis=-1) * 0.8
    rgb += 0.2 * rng.random((height, width, 3), dtype=np.float32)
    image = PIL.Image.fromarray((rgb.clip(0, 1) * 255).round().astype(np.uint8))
    mask = np.zeros((height, width), np.uint8)
    mask[height // 4 : height - height // 4, width // 4 : width - width // 4] = 255
    return image, PIL.Image.fromarray(mask)


def summarize(values: Sequence[float]) -> dict[str, float]:
    """Median, p20, p80 (linear interpolation), min, max and mean of ``values``."""
    array = np.asarray(values, dtype=np.float64)
    p20, median, p80 = np.percentile(array, [20, 50, 80])
    return {
        "median": float(median),
        "p20": float(p20),
        "p80": float(p80),
        "min": float(array.min()),
        "max": float(array.max()),
        "mean": float(array.mean()),
        "n": int(array.size),
    }


def sqnr_db(reference: torch.Tensor | np.ndarray, output: torch.Tensor | np.ndarray) -> float | None:
    """``20 log10(|ref| / |ref - out|)`` in dB; ``None`` when they are identical (or ``ref`` is 0)."""
    ref = np.asarray(reference, dtype=np.float64)
    out = np.asarray(output, dtype=np.float64)
    if ref.shape != out.shape:
        raise ValueError(f"shapes differ: {ref.shape} vs {out.shape}")
    noise, signal = float(np.linalg.norm(ref - out)), float(np.linalg.norm(ref))
    if noise == 0.0 or signal == 0.0:
        return None
    return 20.0 * math.log10(signal / noise)


def psnr_db(reference: np.ndarray, output: np.ndarray) -> float | None:
    """PSNR of images in [0, 1] in dB; ``None`` when they are identical."""
    ref = np.asarray(reference, dtype=np.float64)
    out = np.asarray(output, dtype=np.float64)
    if ref.shape != out.shape:
        raise ValueError(f"shapes differ: {ref.shape} vs {out.shape}")
    mse = float(np.mean((ref - out) ** 2))
    return None if mse == 0.0 else 10.0 * math.log10(1.0 / mse)


# ---- environment -----------------------------------------------------------------------------------


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _git(*args: str) -> str | None:
    root = Path(__file__).resolve().parents[1]
    try:
        done = subprocess.run(
            ["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip()


def _load_average() -> list[float] | None:
    """The 1/5/15-minute load averages: other work on the machine shows here (None where unknown)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (OSError, AttributeError):
        return None


def environment(device: torch.device) -> dict[str, Any]:
    """Where and with what the benchmark ran: device, versions, git commit, date, machine load."""
    from . import __version__

    env: dict[str, Any] = {
        "device": str(device),
        "device_name": device_name_of(device),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "git_sha": _git("rev-parse", "HEAD"),
        "git_dirty": None,
        "torch": torch.__version__,
        "triton": _version("triton"),
        "diffusers": _version("diffusers"),
        "transformers": _version("transformers"),
        "torchao": _version("torchao"),
        "optimum_quanto": _version("optimum-quanto"),
        "fluxfill_engine": __version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    status = _git("status", "--porcelain", "--untracked-files=no")
    if status is not None:
        env["git_dirty"] = bool(status)
    env["load_average_at_start"] = _load_average()
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


@contextlib.contextmanager
def _compile_environment(fresh: bool, needed: bool) -> Iterator[dict[str, Any]]:
    """An empty Inductor/Triton cache (when ``fresh``) and a recompile limit that several compiled
    variants in one process cannot exhaust; both restored afterwards."""
    import torch._dynamo.config as dynamo_config

    info: dict[str, Any] = {"fresh_cache": bool(fresh and needed)}
    saved_env = {k: os.environ.get(k) for k in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR")}
    # `recompile_limit` was `cache_size_limit` before torch 2.7
    limit_name = "recompile_limit" if hasattr(dynamo_config, "recompile_limit") else "cache_size_limit"
    saved_limit = getattr(dynamo_config, limit_name)
    try:
        if fresh and needed:
            directory = tempfile.mkdtemp(prefix="fluxfill-bench-compile-")
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(directory, "inductor")
            os.environ["TRITON_CACHE_DIR"] = os.path.join(directory, "triton")
            info["cache_dir"] = directory
        setattr(dynamo_config, limit_name, max(saved_limit, 64))
        info["recompile_limit"] = getattr(dynamo_config, limit_name)
        yield info
    finally:
        setattr(dynamo_config, limit_name, saved_limit)
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _release_freed_memory(device: torch.device) -> None:
    """Collect garbage and hand freed heap pages back, so a run's memory peak starts from a floor."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        return
    with contextlib.suppress(OSError, AttributeError):
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)


# ---- the run ---------------------------------------------------------------------------------------


def _compiles(spec: VariantSpec) -> bool:
    if spec.kind == "diffusers":
        return spec.base in ("diffusers-compile", "diffusers-fp8-compile")
    return bool(spec.config and spec.config.compile)


def _resolve_device(settings: BenchSettings) -> torch.device:
    preset = MODEL_PRESETS[settings.preset]
    device = torch.device(settings.device or preset.device_type)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BenchError(
            f"preset {settings.preset!r} runs on a CUDA GPU and this machine has none "
            f"(torch {torch.__version__}); the CPU presets are "
            f"{[n for n, p in MODEL_PRESETS.items() if p.device_type == 'cpu']}"
        )
    return device


def plan(settings: BenchSettings) -> tuple[torch.device, list[VariantSpec], dict[str, str]]:
    """Check the settings and resolve the device and variants (fails before anything is built)."""
    settings.check()
    device = _resolve_device(settings)
    specs, skipped = resolve_variants(settings.variants, device, settings.include_baselines)
    return device, specs, skipped


def memory_estimate(
    specs: Sequence[VariantSpec], counts: dict[str, int], dtype: torch.dtype
) -> dict[str, Any]:
    """Weight bytes the variants will hold together (before building anything), from parameter counts.

    The base components are held once; the first ``reference`` and eager ``diffusers`` add nothing;
    other unquantized engine variants add their fused QKV copy (or a whole cast transformer when their
    dtype differs), quantized ones their 1-byte block linears, ``diffusers-fp8-compile`` 1 byte per
    linear weight. Activations come on top (a few GiB at 1024x1024).
    """
    size = torch.tensor([], dtype=dtype).element_size()
    base = size * sum(counts[k] for k in ("transformer", "vae", "text_encoder", "text_encoder_2"))
    per_variant: dict[str, int] = {}
    owner_taken = False
    for spec in specs:
        if spec.kind == "diffusers":
            per_variant[spec.name] = counts["linears"] if spec.base == "diffusers-fp8-compile" else 0
            continue
        config = spec.config
        assert config is not None
        if spec.is_reference and not owner_taken:
            owner_taken = True
            per_variant[spec.name] = 0
            continue
        own = config.torch_dtype
        own_size = torch.tensor([], dtype=own).element_size() if own is not None else size
        cast = own is not None and own != dtype
        if config.quant != "none":
            extra = counts["block_linears"] + (
                own_size * (counts["transformer"] - counts["block_linears"]) if cast else 0
            )
        else:
            extra = own_size * counts["transformer"] if cast else size * counts["fused"]
        if config.quantize_text_encoder:
            extra += counts["t5_linears"]
        per_variant[spec.name] = extra
    return {
        "base_bytes": base,
        "per_variant_bytes": per_variant,
        "total_bytes": base + sum(per_variant.values()),
    }


def run_benchmark(
    settings: BenchSettings, on_update: Callable[[dict[str, Any]], None] | None = None
) -> dict[str, Any]:
    """Run the benchmark and return its record (see the module docstring; JSON-serialisable).

    ``on_update`` receives the partial record (``"complete": False``) after the warm-ups and after
    every repeat, so a run that is cut short still leaves its measurements.
    """
    device, specs, skipped = plan(settings)
    preset = MODEL_PRESETS[settings.preset]
    dtype = parse_dtype(settings.dtype) or preset.dtype
    estimate = None
    if preset.name == "gpu-full" and device.type == "cuda":
        estimate = memory_estimate(specs, parameter_counts(full_configs()), dtype)
        available = torch.cuda.get_device_properties(device).total_memory
        estimate["device_bytes"] = int(available)
        if estimate["total_bytes"] > 0.9 * available:
            print(
                f"warning: these variants hold about {estimate['total_bytes'] / 2**30:.1f} GiB of weights "
                f"together, on a {available / 2**30:.1f} GiB device (activations come on top); if it runs "
                f"out of memory, run fewer variants per process (each with diffusers and reference). "
                f"Per variant: { {k: round(v / 2**30, 1) for k, v in estimate['per_variant_bytes'].items()} } GiB",
                file=sys.stderr,
            )
    width, height = settings.width or preset.width, settings.height or preset.height
    max_seq = settings.max_sequence_length or preset.max_sequence_length
    image, mask = bench_inputs(width, height, settings.seed)
    inputs = BenchInputs(
        prompt=settings.prompt,
        image=image,
        mask=mask,
        width=width,
        height=height,
        steps=settings.steps,
        guidance_scale=settings.guidance_scale,
        seed=settings.seed,
        max_sequence_length=max_seq,
    )
    record: dict[str, Any] = {
        "schema": SCHEMA,
        "complete": False,
        "environment": environment(device),
        "settings": {
            **{k: v for k, v in asdict(settings).items() if k not in ("variants", "progress")},
            "variants_requested": settings.variants,
            "width": width,
            "height": height,
            "max_sequence_length": max_seq,
            "dtype": dtype_name(dtype),
            "order": "warm-ups per variant, then timed calls interleaved, order rotated every repeat",
        },
        "variants_skipped": skipped,
        "memory_estimate": estimate,
    }
    with _compile_environment(settings.fresh_compile_cache, any(map(_compiles, specs))) as compile_info:
        record["compile"] = compile_info
        start = time.perf_counter()
        components = preset.build(settings.seed, device, dtype)
        build_s = time.perf_counter() - start
        config = {k: v for k, v in components["transformer"].config.items() if not k.startswith("_")}
        image_tokens = image_tokens_for(width, height)
        flops = transformer_flops(config, image_tokens, max_seq)
        record["model"] = {
            "preset": preset.name,
            "description": preset.description,
            "transformer_config": _plain(config),
            "transformer_parameters": sum(p.numel() for p in components["transformer"].parameters()),
            "build_s": build_s,
            "image_tokens": image_tokens,
            "text_tokens": max_seq,
            "flops_per_step": flops.as_dict(),
        }
        peak = device_peak(device, settings.peak_tflops, measure=device.type == "cuda")
        record["peak"] = peak.as_dict()
        runners = build_runners(specs, components, device)
        for runner in runners:
            runner.keep_prompt_cache = settings.keep_prompt_cache
        record["variant_order"] = [r.spec.name for r in runners]
        results: dict[str, list[RunResult]] = {r.spec.name: [] for r in runners}
        warmups: dict[str, list[float]] = {r.spec.name: [] for r in runners}
        total = len(runners) * (settings.warmup + settings.repeats)
        with _progress(total, settings.progress) as bar:
            for runner in runners:
                for _ in range(settings.warmup):
                    bar.set_postfix_str(f"warm-up {runner.spec.name}")
                    _release_freed_memory(device)
                    warmups[runner.spec.name].append(runner.run(inputs).e2e_s)
                    bar.update(1)
            if on_update is not None:
                on_update(_finish(record, runners, results, warmups, flops.total, peak, device))
            for repeat in range(settings.repeats):
                shift = repeat % len(runners)
                for runner in runners[shift:] + runners[:shift]:
                    bar.set_postfix_str(f"repeat {repeat + 1}/{settings.repeats} {runner.spec.name}")
                    _release_freed_memory(device)
                    results[runner.spec.name].append(runner.run(inputs))
                    bar.update(1)
                load = _load_average()
                if load is not None:
                    record.setdefault("load_average_after_repeats", []).append(load)
                if on_update is not None:
                    on_update(_finish(record, runners, results, warmups, flops.total, peak, device))
    final = _finish(record, runners, results, warmups, flops.total, peak, device)
    final["complete"] = True
    return final


@contextlib.contextmanager
def _progress(total: int, enabled: bool) -> Iterator[Any]:
    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc="fluxfill bench", unit="run", disable=not enabled, file=sys.stderr)
    try:
        yield bar
    finally:
        bar.close()


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _finish(
    record: dict[str, Any],
    runners: list[VariantRunner],
    results: dict[str, list[RunResult]],
    warmups: dict[str, list[float]],
    flops_per_step: float,
    peak: Any,
    device: torch.device,
) -> dict[str, Any]:
    """The record with every variant's summary from the runs so far."""
    out = dict(record)
    reference = next((r for r in runners if r.spec.is_reference), None)
    ref_runs = results.get(reference.spec.name, []) if reference else []
    variants = []
    for runner in runners:
        runs = results[runner.spec.name]
        variants.append(
            _variant_summary(runner, runs, warmups[runner.spec.name], ref_runs, flops_per_step, peak)
        )
    baseline = next(
        (v for v in variants if v["kind"] == "diffusers" and v["base"] == BASELINE and not v.get("options")),
        None,
    )
    for summary in variants:
        summary["speedup_vs_diffusers"] = _ratios(baseline, summary)
    out["variants"] = variants
    out["baseline_variant"] = baseline["name"] if baseline else None
    out["reference_variant"] = reference.spec.name if reference else None
    run_peaks = [r.memory_peak_bytes for runs in results.values() for r in runs]
    if device.type == "cuda":  # the allocator's peak is reset per call: the process peak is their max
        out["process_peak_bytes"] = max(run_peaks, default=None)
    else:
        out["process_peak_bytes"] = MemoryMeter.process_peak_bytes(device)
    return out


def _ratios(baseline: dict[str, Any] | None, summary: dict[str, Any]) -> dict[str, float | None]:
    """``diffusers`` median over this variant's median: > 1 means faster than diffusers."""
    ratios: dict[str, float | None] = {"e2e": None, "transformer": None}
    if baseline is None:
        return ratios
    for key, metric in (("e2e", "e2e_s"), ("transformer", "transformer_ms_per_step")):
        mine, base = summary.get(metric), baseline.get(metric)
        if mine and base and mine["median"] > 0:
            ratios[key] = base["median"] / mine["median"]
    return ratios


def _variant_summary(
    runner: VariantRunner,
    runs: list[RunResult],
    warmups: list[float],
    ref_runs: list[RunResult],
    flops_per_step: float,
    peak: Any,
) -> dict[str, Any]:
    spec = runner.spec
    dtype, quant = runner.precision
    precision = precision_class(dtype, quant)
    summary: dict[str, Any] = {
        "name": spec.name,
        **spec.describe(),
        "transformer_dtype": dtype_name(dtype),
        "precision": precision,
        "setup_s": runner.setup_s,
    }
    if isinstance(runner, EngineRunner):
        summary["engine"] = runner.describe_engine()
    first_calls = warmups + [r.e2e_s for r in runs]
    summary["warmup"] = {
        "calls_s": warmups,
        "cold_s": first_calls[0] if first_calls else None,
        "warm_s": first_calls[1] if len(first_calls) > 1 else None,
        "cold_overhead_s": None,
    }
    if not runs:
        return summary
    e2e = summarize([r.e2e_s for r in runs])
    per_step_ms = summarize([1000.0 * r.transformer_s_per_step for r in runs])
    summary["e2e_s"] = e2e
    summary["stages_s"] = {stage: summarize([r.stages_s[stage] for r in runs]) for stage in STAGES}
    summary["transformer_ms_per_step"] = per_step_ms
    if summary["warmup"]["cold_s"] is not None:
        summary["warmup"]["cold_overhead_s"] = summary["warmup"]["cold_s"] - e2e["median"]
    tflops = flops_per_step / (per_step_ms["median"] / 1000.0) / 1e12
    peak_value = peak.for_precision(precision)
    summary["tflops"] = tflops
    summary["peak_tflops_used"] = peak_value
    summary["peak_fraction"] = tflops / peak_value if peak_value else None
    measured = peak.measured_for(precision)
    summary["measured_peak_fraction"] = tflops / measured if measured else None
    weights = runner.weight_bytes()
    extra = max(r.memory_extra_bytes for r in runs)
    summary["memory"] = {
        "measure": "cuda_allocator" if runner.device.type == "cuda" else "rss",
        "weights_bytes": weights,
        "run_peak_extra_bytes": extra,
        "standalone_peak_bytes": weights + extra,
        "process_peak_during_calls_bytes": max(r.memory_peak_bytes for r in runs),
    }
    summary["runs"] = [
        {
            "e2e_s": r.e2e_s,
            "stages_s": r.stages_s,
            "transformer_ms_per_step": 1000.0 * r.transformer_s_per_step,
            "memory_extra_bytes": r.memory_extra_bytes,
        }
        for r in runs
    ]
    stats = [r.stats for r in runs if r.stats]
    if stats:
        summary["stats"] = stats[-1]
    if ref_runs:
        ref, last = ref_runs[-1], runs[-1]
        summary["drift"] = {
            "against": "reference",
            "latent_sqnr_db": sqnr_db(ref.latents, last.latents),
            "image_psnr_db": psnr_db(ref.image, last.image),
            "exact": bool(torch.equal(ref.latents, last.latents)),
            "latent_max_abs_diff": float((ref.latents - last.latents).abs().max()),
            "image_max_abs_diff": float(np.abs(ref.image - last.image).max()),
        }
    return summary


# ---- outputs ---------------------------------------------------------------------------------------


def write_json(record: dict[str, Any], path: str | Path) -> Path:
    """Write ``record`` as strict JSON (no NaN/Infinity), atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(record, indent=2, allow_nan=False) + "\n")
    temporary.replace(path)
    return path


def _fmt(value: float | None, digits: int = 3) -> str:
    if value is None:
        return "–"
    if value == 0:
        return "0"
    magnitude = abs(value)
    if magnitude >= 100:
        return f"{value:.0f}"
    if magnitude >= 10:
        return f"{value:.1f}"
    return f"{value:.{digits}g}" if magnitude < 0.01 else f"{value:.{digits}f}".rstrip("0").rstrip(".")


def _bytes(value: int | None) -> str:
    if value is None:
        return "–"
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if value >= size:
            return f"{value / size:.1f} {unit}"
    return f"{value} B"


def _drift(variant: dict[str, Any]) -> tuple[str, str]:
    drift = variant.get("drift")
    if not drift:
        return "–", "–"
    if variant["name"] == REFERENCE or drift.get("exact"):
        return "exact", "exact" if drift.get("image_psnr_db") is None else _fmt(drift["image_psnr_db"])
    image = drift.get("image_psnr_db")
    return _fmt(drift.get("latent_sqnr_db")), "exact" if image is None else _fmt(image)


def _stats_brief(stats: dict[str, Any]) -> str:
    """The scalar entries of a variant's stats (per-step lists left to the JSON)."""
    flat: dict[str, Any] = {}
    for key, value in stats.items():
        if isinstance(value, dict):
            flat.update({k: v for k, v in value.items() if not isinstance(v, (dict, list)) and k not in flat})
        elif not isinstance(value, list):
            flat[key] = value
    return ", ".join(f"{k}={v}" for k, v in flat.items())


def render_markdown(record: dict[str, Any]) -> str:
    """The record as a markdown report: setup, one row per variant, a per-stage table, notes."""
    env, settings, model = record["environment"], record["settings"], record["model"]
    flops = model["flops_per_step"]["total"]
    peak = record["peak"]
    sha = (env.get("git_sha") or "unknown")[:10] + (" (uncommitted changes)" if env.get("git_dirty") else "")
    lines = [
        f"# fluxfill bench: {model['preset']}",
        "",
        f"- Device: **{env['device_name']}** ({env['device']}), torch {env['torch']}, "
        f"diffusers {env['diffusers']}, triton {env.get('triton') or '–'}, "
        f"transformers {env.get('transformers') or '–'}; fluxfill-engine {env['fluxfill_engine']} "
        f"at git {sha}; {env['date']}.",
        f"- Model: {model['description']}; {model['transformer_parameters'] / 1e6:.1f}M transformer "
        f"parameters, {settings['dtype']}.",
        f"- Request: {settings['width']}x{settings['height']} ({model['image_tokens']} image + "
        f"{model['text_tokens']} text tokens), {settings['steps']} steps, guidance "
        f"{settings['guidance_scale']:g}, seed {settings['seed']}. {settings['repeats']} timed calls per "
        f"variant after {settings['warmup']} warm-up call(s); {settings['order']}.",
        f"- Work per step: {_fmt(flops / 1e9)} GFLOP (transformer, counted from the shapes). Peak used for "
        f"the fraction: {peak['source']}"
        + (
            f"; measured matmul ceiling: {', '.join(f'{k} {v:.0f}' for k, v in peak['measured_tflops'].items())} "
            f"TFLOP/s ({peak['measured_method']})."
            if peak.get("measured_tflops")
            else "."
        ),
    ]
    if env.get("load_average_at_start") is not None:
        trace = record.get("load_average_after_repeats") or []
        after = f"; 1-minute load after each repeat: {[x[0] for x in trace]}" if trace else ""
        lines.append(
            f"- Load average at start: {env['load_average_at_start']} on {env['cpu_count']} CPUs{after} "
            f"(this run adds up to its {env['torch_threads']} torch threads; more means other work "
            "shared the machine)."
        )
    if settings.get("note"):
        lines.append(f"- Note: {settings['note']}")
    if not record.get("complete", False):
        lines.append("- **Partial record**: the run did not finish.")
    lines += [
        "",
        "| variant | e2e s, median [p20, p80] | vs diffusers (e2e / transformer) | transformer ms/step "
        "| TFLOP/s (of peak) | memory: weights + run peak | cold / warm s | latent SQNR dB | image PSNR dB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for v in record["variants"]:
        if "e2e_s" not in v:
            lines.append(f"| {v['name']} | (no timed calls yet) |  |  |  |  |  |  |  |")
            continue
        e2e, step = v["e2e_s"], v["transformer_ms_per_step"]
        ratio = v["speedup_vs_diffusers"]
        ratios = f"{_fmt(ratio['e2e'])}x / {_fmt(ratio['transformer'])}x" if ratio["e2e"] else "–"
        fractions = [
            f"{100 * v[key]:.1f}% {what}"
            for key, what in (("peak_fraction", "datasheet"), ("measured_peak_fraction", "measured"))
            if v.get(key)
        ]
        fraction = f" ({', '.join(fractions)})" if fractions else ""
        mem = v["memory"]
        warm = v["warmup"]
        sqnr, psnr = _drift(v)
        lines.append(
            f"| {v['name']} | {_fmt(e2e['median'])} [{_fmt(e2e['p20'])}, {_fmt(e2e['p80'])}] | {ratios} "
            f"| {_fmt(step['median'])} | {_fmt(v['tflops'])}{fraction} "
            f"| {_bytes(mem['weights_bytes'])} + {_bytes(mem['run_peak_extra_bytes'])} "
            f"| {_fmt(warm['cold_s'])} / {_fmt(warm['warm_s'])} | {sqnr} | {psnr} |"
        )
    lines += ["", "Per-stage medians (seconds):", ""]
    lines.append("| variant | " + " | ".join(STAGES) + " |")
    lines.append("|---|" + "---|" * len(STAGES))
    for v in record["variants"]:
        if "stages_s" in v:
            cells = " | ".join(_fmt(v["stages_s"][s]["median"]) for s in STAGES)
            lines.append(f"| {v['name']} | {cells} |")
    notes = [
        "e2e: the whole pipeline call (prompt encoding, VAE encode, sampling, decode, postprocess), "
        "device-synchronised. The engine clears its prompt cache before every call unless "
        "--keep-prompt-cache.",
        "transformer ms/step: engine: the denoise stage over its steps (with the Euler update); "
        "diffusers: the mean transformer forward. TFLOP/s = work per step / that time; for variants "
        "that skip blocks (step caches) it is an effective rate.",
        "memory: bytes of the variant's weights (shared storage counted once) + the peak above the "
        f"start of a call ({'CUDA allocator' if env['device'].startswith('cuda') else 'resident set size'}).",
        "cold: the variant's first call (compilation, autotuning, lazy init); warm: its second.",
        "drift: against the `reference` variant on the same inputs: SQNR of the final latents "
        "(20 log10 |ref| / |ref - out|), PSNR of the output images in [0, 1].",
    ]
    stats_lines = [
        f"`{v['name']}`: {_stats_brief(v['stats'])}"
        for v in record["variants"]
        if v.get("stats") and (v["stats"].get("step_cache") or "fbcache_threshold" in v["stats"])
    ]
    if stats_lines:
        notes.append("step caches (last call): " + "; ".join(stats_lines))
    resolved = [
        f"`{v['name']}`: {v['transformer_dtype']}"
        + (
            f", {q['mode']} via {q['backend']} ({q['why']})"
            if (q := (v.get("engine") or {}).get("quantization")) and q["mode"] != "none"
            else ""
        )
        for v in record["variants"]
        if v["kind"] == "engine"
    ]
    if resolved:
        notes.append("engine variants as resolved on this device: " + "; ".join(resolved))
    if record.get("variants_skipped"):
        skipped = "; ".join(f"`{k}`: {r}" for k, r in record["variants_skipped"].items())
        notes.append(f"cannot run on this machine: {skipped}")
    lines += ["", "Notes:", ""] + [f"- {note}" for note in notes]
    return "\n".join(lines) + "\n"


def plot_speed_vs_drift(record: dict[str, Any], path: str | Path) -> bool:
    """Scatter speed-up over diffusers against latent SQNR, one marker per variant (legend beside).

    SQNR above 100 dB (float rounding) is drawn at 100; bit-identical results at 110 ("exact").
    Returns ``False`` (and writes nothing) when matplotlib is not installed.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rounding, exact = 100.0, 110.0
    figure, axes = plt.subplots(figsize=(9, 4.8))
    colours = plt.get_cmap("tab20").colors
    markers = "osD^vP*Xh<>p"
    for i, v in enumerate(record["variants"]):
        ratio = (v.get("speedup_vs_diffusers") or {}).get("e2e")
        drift = v.get("drift") or {}
        if ratio is None or not drift:
            continue
        sqnr = drift.get("latent_sqnr_db")
        x = exact if drift.get("exact") or sqnr is None else min(sqnr, rounding)
        label = f"{v['name']} ({ratio:.2f}x, {'exact' if x == exact else f'{sqnr:.0f} dB'})"
        axes.scatter(
            [x], [ratio], s=55, marker=markers[i % len(markers)], color=colours[i % len(colours)], label=label
        )
    axes.axhline(1.0, color="0.7", linewidth=1)
    for x, text in ((rounding, ">= 100 dB"), (exact, "exact")):
        axes.axvline(x, color="0.85", linestyle=":", linewidth=1)
        axes.text(x, 1.0, f" {text}", fontsize=7, color="0.5", rotation=90, va="bottom")
    axes.set_xlabel("latent SQNR vs reference (dB, higher = less drift)")
    axes.set_ylabel("speed-up over diffusers (end to end)")
    env, model = record["environment"], record["model"]
    settings = record["settings"]
    axes.set_title(
        f"fluxfill bench {model['preset']} on {env['device_name']}: {settings['width']}x{settings['height']}, "
        f"{settings['steps']} steps",
        fontsize=9,
    )
    axes.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return True


# ---- command line ----------------------------------------------------------------------------------


def _size(text: str) -> tuple[int, int]:
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


def _peaks(text: str) -> dict[str, float]:
    peaks: dict[str, float] = {}
    for item in (p.strip() for p in text.split(",") if p.strip()):
        key, sep, value = item.partition("=")
        try:
            if sep:
                peaks[key.strip()] = float(value)
            else:
                peaks[""] = float(key)
        except ValueError as err:
            raise argparse.ArgumentTypeError(
                f"--peak-tflops takes NUMBER or PRECISION=NUMBER,... (bf16, fp16, fp8, int8, tf32, fp32); "
                f"got {text!r}"
            ) from err
    return peaks


def add_bench_parser(commands: Any) -> argparse.ArgumentParser:
    """Add the ``bench`` subcommand to ``fluxfill``'s subparsers."""
    bench = commands.add_parser(
        "bench",
        help="benchmark every optimization against diffusers' FluxFillPipeline",
        description=(
            "Run diffusers' FluxFillPipeline and the engine's variants on the same random-weight model, "
            "inputs and seed in one process, interleaved, and report speed, stages, TFLOP/s, memory, "
            "cold start and drift against the `reference` variant. Writes JSON (--out), markdown "
            "(--markdown) and a speed-vs-drift plot (--plot, needs matplotlib)."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=(
            "variants: "
            + ", ".join(known_variants())
            + "; 'engine:FIELD=VALUE,...' (the reference preset with EngineConfig fields changed, e.g. "
            "engine:quant=fp8,compile=1), 'PRESET:FIELD=VALUE,...' (e.g. balanced:attention=sdpa), "
            "'diffusers-fbcache:threshold=0.1'.\n"
            "examples:\n"
            "  fluxfill bench --preset cpu-tiny --variants diffusers,reference --steps 2 --repeats 1\n"
            "  fluxfill bench --preset cpu-mid --steps 8 --repeats 3 --out benchmarks/results/cpu-mid.json "
            "--markdown\n"
            "  fluxfill bench --preset gpu-full --variants diffusers,diffusers-compile,balanced,fast "
            "--repeats 3 --plot gpu.png"
        ),
    )
    bench.add_argument("--preset", default="cpu-tiny", choices=list(MODEL_PRESETS), help="model size")
    bench.add_argument(
        "--variants",
        action="append",
        help="comma list of variants (repeatable; default: every variant this machine can run)",
    )
    bench.add_argument("--size", type=_size, help="request size N or WxH (default: the preset's)")
    bench.add_argument("--steps", type=int, default=28, help="sampling steps per call (default: 28)")
    bench.add_argument("--repeats", type=int, default=3, help="timed calls per variant (default: 3)")
    bench.add_argument(
        "--warmup", type=int, default=1, help="untimed calls per variant first; the first is the cold one"
    )
    bench.add_argument("--seed", type=int, default=0, help="seed of the weights and the request (default: 0)")
    bench.add_argument("--prompt", default=DEFAULT_PROMPT, help="the request's prompt")
    bench.add_argument("--guidance", type=float, default=30.0, help="guidance scale (default: 30)")
    bench.add_argument(
        "--max-sequence-length", type=int, help="T5 tokens (default: the preset's: 32 / 128 / 512)"
    )
    bench.add_argument("--device", help="torch device (default: cpu for cpu-*, cuda for gpu-full)")
    bench.add_argument(
        "--dtype", choices=["float32", "bfloat16", "float16"], help="weights dtype (default: the preset's)"
    )
    bench.add_argument(
        "--out", type=Path, help="JSON record (default: bench-PRESET.json); rewritten after every repeat"
    )
    bench.add_argument(
        "--markdown",
        nargs="?",
        const="",
        metavar="PATH",
        help="also write the markdown report (to PATH, or next to --out as .md)",
    )
    bench.add_argument("--plot", type=Path, metavar="PNG", help="speed vs drift plot (needs matplotlib)")
    bench.add_argument(
        "--peak-tflops",
        type=_peaks,
        help="device peak override: NUMBER (for the preset's dtype) or PRECISION=NUMBER,...",
    )
    bench.add_argument(
        "--no-baselines",
        action="store_true",
        help="do not add `diffusers` and `reference` when they are not listed (no ratios / drift then)",
    )
    bench.add_argument(
        "--keep-prompt-cache", action="store_true", help="let the engine reuse encoded prompts across calls"
    )
    bench.add_argument(
        "--reuse-compile-cache",
        action="store_true",
        help="compile with the existing Inductor/Triton caches (default: an empty one, truly cold starts)",
    )
    bench.add_argument(
        "--list-variants", action="store_true", help="list the variants and whether they run here"
    )
    bench.add_argument("--no-progress", action="store_true", help="no progress bar")
    bench.add_argument("--note", help="free text stored in the record and shown in the markdown")
    bench.add_argument(
        "--render",
        type=Path,
        metavar="JSON",
        help="run nothing: print the markdown of an existing record (and write --markdown / --plot from it)",
    )
    return bench


def _settings_from_args(args: argparse.Namespace) -> BenchSettings:
    variants = None
    if args.variants:
        variants = [item for text in args.variants for item in split_variant_list(text)]
    dtype = args.dtype or dtype_name(MODEL_PRESETS[args.preset].dtype)
    peaks = dict(args.peak_tflops or {})
    if "" in peaks:
        peaks[precision_class(parse_dtype(dtype))] = peaks.pop("")
    width, height = args.size if args.size else (None, None)
    return BenchSettings(
        preset=args.preset,
        variants=variants,
        width=width,
        height=height,
        steps=args.steps,
        repeats=args.repeats,
        warmup=args.warmup,
        seed=args.seed,
        prompt=args.prompt,
        guidance_scale=args.guidance,
        max_sequence_length=args.max_sequence_length,
        device=args.device,
        dtype=args.dtype,
        include_baselines=not args.no_baselines,
        keep_prompt_cache=args.keep_prompt_cache,
        fresh_compile_cache=not args.reuse_compile_cache,
        peak_tflops=peaks,
        progress=not args.no_progress,
        note=args.note,
    )


def _list_variants(settings: BenchSettings) -> int:
    device = _resolve_device(settings)
    print(f"variants on {device} ({device_name_of(device)}):")
    for name in known_variants():
        reason = unavailable_reason(parse_variant(name), device)
        print(f"  {name:24s} {'runs here' if reason is None else 'cannot run: ' + reason}")
    print("  engine:FIELD=VALUE,...   the reference preset with EngineConfig fields changed")
    return 0


def _render_existing(args: argparse.Namespace) -> int:
    path: Path = args.render
    if not path.is_file():
        raise FileNotFoundError(f"--render: no such record: {str(path)!r}")
    record = json.loads(path.read_text())
    if record.get("schema") != SCHEMA:
        raise BenchError(f"--render: {str(path)!r} is not a {SCHEMA} record")
    _write_outputs(record, path, args)
    return 0


def _write_outputs(record: dict[str, Any], out: Path, args: argparse.Namespace) -> list[str]:
    """Print the markdown; write it (``--markdown``) and the plot (``--plot``); what was written."""
    report = render_markdown(record)
    print(report)
    written = []
    if args.markdown is not None:
        markdown = Path(args.markdown) if args.markdown else out.with_suffix(".md")
        markdown.parent.mkdir(parents=True, exist_ok=True)
        markdown.write_text(report)
        written.append(str(markdown))
    if args.plot is not None:
        if plot_speed_vs_drift(record, args.plot):
            written.append(str(args.plot))
        else:
            print(
                "no plot: matplotlib is not installed (pip install 'fluxfill-engine[bench]')", file=sys.stderr
            )
    if written:
        print(f"wrote {', '.join(written)}", file=sys.stderr)
    return written


def run_bench_command(args: argparse.Namespace) -> int:
    """``fluxfill bench``: run, print the markdown table, write JSON / markdown / plot."""
    if args.render is not None:
        return _render_existing(args)
    settings = _settings_from_args(args)
    settings.check()
    if args.list_variants:
        return _list_variants(settings)
    out = args.out or Path(f"bench-{settings.preset}.json")
    device, specs, skipped = plan(settings)  # fail fast, before building anything
    print(
        f"fluxfill bench {settings.preset} on {device}: {', '.join(s.name for s in specs)}", file=sys.stderr
    )
    for name, reason in skipped.items():
        print(f"  cannot run here: {name} ({reason})", file=sys.stderr)
    record = run_benchmark(settings, on_update=lambda partial: write_json(partial, out))
    write_json(record, out)
    print(f"wrote {out}", file=sys.stderr)
    _write_outputs(record, out, args)
    return 0
