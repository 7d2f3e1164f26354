"""``fluxfill bench``: every optimization against diffusers' ``FluxFillPipeline``, in one process.

One model (``--preset``: ``cpu-tiny``, ``cpu-mid`` or ``gpu-full``, see
:data:`~fluxfill_engine.bench.models.MODEL_PRESETS`) is built once with a fixed seed; every variant
(:mod:`~fluxfill_engine.bench.variants`) gets a pipeline on those weights and runs the same request
(same image, mask, prompt and seed). After each variant's warm-up calls (the first is its cold start:
compilation, autotuning, lazy initialisation), the timed calls are interleaved: repeat ``r`` runs every
variant once, in an order rotated by ``r``, so a drift in machine speed hits all variants alike.

Per variant the record holds end-to-end seconds (median, p20, p80), a per-stage breakdown, transformer
milliseconds per step, the achieved TFLOP/s (work per step counted from the shapes by
:func:`~fluxfill_engine.bench.models.transformer_flops`) and its fraction of the device's peak, peak
memory, cold and warm call seconds, drift against the ``reference`` variant (SQNR of the final latents,
PSNR of the images) and the speed ratio against ``diffusers``. :func:`render_markdown` and
:func:`plot_speed_vs_drift` turn the record into a table and a figure.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import gc
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

from ..config import parse_dtype
from ..metrics import psnr_db, sqnr_db
from .catalog import DEFAULT_PROMPT, SCHEMA, BenchError
from .models import (
    MODEL_PRESETS,
    device_name_of,
    device_peak,
    full_configs,
    image_tokens_for,
    parameter_counts,
    precision_class,
    transformer_flops,
)
from .variants import (
    STAGES,
    BenchInputs,
    EngineRunner,
    MemoryMeter,
    RunResult,
    VariantRunner,
    VariantSpec,
    build_runners,
    dtype_name,
    resolve_variants,
)

BASELINE, REFERENCE = "diffusers", "reference"


def check_run_settings(settings: Any) -> None:
    """The checks every benchmark's settings share: the model preset, ``steps`` / ``repeats`` /
    ``warmup`` and the request size. Raises :class:`BenchError`."""
    if settings.preset not in MODEL_PRESETS:
        raise BenchError(f"unknown preset {settings.preset!r}; choose one of {list(MODEL_PRESETS)}")
    for name, low in (("steps", 1), ("repeats", 1), ("warmup", 0)):
        value = getattr(settings, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise BenchError(f"`{name}` must be an int >= {low}, got {value!r}")
    for name in ("width", "height"):
        value = getattr(settings, name)
        if value is not None and (not isinstance(value, int) or value < 32 or value % 16):
            raise BenchError(f"`{name}` must be a multiple of 16, at least 32, got {value!r}")


@dataclass
class BenchSettings:
    """What to benchmark. ``None`` fields take the model preset's defaults.

    Attributes:
        preset: ``cpu-tiny``, ``cpu-mid`` or ``gpu-full``.
        variants: variant names (see :func:`~fluxfill_engine.bench.variants.parse_variant`); ``None``
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
        check_run_settings(self)
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
    from .. import __version__

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


def resolve_device(settings: BenchSettings) -> torch.device:
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
    device = resolve_device(settings)
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
