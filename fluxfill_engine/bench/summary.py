"""A ``fluxfill bench variants`` record's summaries: per variant, the statistics of its calls, its
TFLOP/s against the peak, memory, drift against ``reference`` and the speed ratio against ``diffusers``;
and the weight memory the variants will hold together, estimated before anything is built."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from ..call import STAGES
from ..metrics import psnr_db, sqnr_db
from .catalog import VariantSpec
from .flops import DevicePeak, precision_class
from .measure import MemoryMeter, summarize
from .runners import EngineRunner, RunResult, VariantRunner, dtype_name

BASELINE, REFERENCE = "diffusers", "reference"


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


def summarize_runs(
    record: dict[str, Any],
    runners: list[VariantRunner],
    results: dict[str, list[RunResult]],
    warmups: dict[str, list[float]],
    flops_per_step: float,
    peak: DevicePeak,
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
