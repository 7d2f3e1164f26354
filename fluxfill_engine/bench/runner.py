"""``fluxfill bench variants``: every optimization against diffusers' ``FluxFillPipeline``, in one process.

One model (``--preset``: ``cpu-tiny``, ``cpu-mid`` or ``gpu-full``, see
:data:`~.models.MODEL_PRESETS`) is built once with a fixed seed; every variant
(:mod:`.variants`) gets a pipeline on those weights and runs the same request
(same image, mask, prompt and seed). After each variant's warm-up calls (the first is its cold start:
compilation, autotuning, lazy initialisation), the timed calls are interleaved: repeat ``r`` runs every
variant once, in an order rotated by ``r``, so a drift in machine speed hits all variants alike.

Per variant the record holds end-to-end seconds (median, p20, p80), a per-stage breakdown, transformer
milliseconds per step, the achieved TFLOP/s (work per step counted from the shapes by
:func:`~.flops.transformer_flops`) and its fraction of the device's peak, peak
memory, cold and warm call seconds, drift against the ``reference`` variant (SQNR of the final latents,
PSNR of the images) and the speed ratio against ``diffusers``. :func:`~.report.render_markdown` and
:func:`~.report.plot_speed_vs_drift` turn the record into a table and a figure.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from ..config import parse_dtype
from ..testing import random_models
from .catalog import DEFAULT_PROMPT, SCHEMA, BenchError, VariantSpec, resolve_variants
from .flops import device_peak, image_tokens_for, transformer_flops
from .measure import environment, free_memory, load_average
from .models import MODEL_PRESETS, parameter_counts, preset_device
from .runners import BenchInputs, RunResult, build_runners, dtype_name
from .summary import memory_estimate, summarize_runs


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


# ---- the run ---------------------------------------------------------------------------------------


def _compiles(spec: VariantSpec) -> bool:
    if spec.kind == "diffusers":
        return spec.base in ("diffusers-compile", "diffusers-fp8-compile")
    return bool(spec.config and spec.config.compile)


def plan(settings: BenchSettings) -> tuple[torch.device, list[VariantSpec], dict[str, str]]:
    """Check the settings and resolve the device and variants (fails before anything is built)."""
    settings.check()
    device = preset_device(settings.preset, settings.device)
    specs, skipped = resolve_variants(settings.variants, device, settings.include_baselines)
    return device, specs, skipped


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
        estimate = memory_estimate(specs, parameter_counts(random_models.full_configs()), dtype)
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
    inputs = BenchInputs.picture(
        width, height, settings.steps, settings.seed, max_seq, settings.prompt, settings.guidance_scale
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
                    free_memory(device)
                    warmups[runner.spec.name].append(runner.run(inputs).e2e_s)
                    bar.update(1)
            if on_update is not None:
                on_update(summarize_runs(record, runners, results, warmups, flops.total, peak, device))
            for repeat in range(settings.repeats):
                shift = repeat % len(runners)
                for runner in runners[shift:] + runners[:shift]:
                    bar.set_postfix_str(f"repeat {repeat + 1}/{settings.repeats} {runner.spec.name}")
                    free_memory(device)
                    results[runner.spec.name].append(runner.run(inputs))
                    bar.update(1)
                load = load_average()
                if load is not None:
                    record.setdefault("load_average_after_repeats", []).append(load)
                if on_update is not None:
                    on_update(summarize_runs(record, runners, results, warmups, flops.total, peak, device))
    final = summarize_runs(record, runners, results, warmups, flops.total, peak, device)
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
