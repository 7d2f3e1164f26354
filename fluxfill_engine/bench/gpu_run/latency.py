"""Part 3, ``latency``: one transformer step of every variant at the profile's size (the real
architecture with random weights on the GPU): ms/step, TFLOP/s against the measured ceiling, drift
against the engine's ``reference`` step, memory; then the ``reference`` step on batches of requests."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from ...metrics import sqnr_db
from ...testing.step_inputs import StepInputs
from ..measure import free_memory, median
from .budget import Deadline, overrun_in, skipped, time_limit, too_late
from .machine import measured_ceiling
from .profiles import BATCHED, GUIDANCE, TRY_ON_CPU, Profile, StepVariant, rows_in_run_order
from .record import Run


def step_inputs(run: Run, config: dict[str, Any], steps: int = 1) -> StepInputs:
    """One denoising step's random inputs at the profile's size (no text encoder)."""
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
    after_steps: Callable[[], dict[str, Any]] | None = None  # what the steps decided (auto attention)


def build_step(run: Run, variant: StepVariant, base: Any, inputs: StepInputs) -> BuiltStep:
    """Set ``variant`` up on ``base`` (or a weight-sharing clone of it) and return its step."""
    from ...testing.random_models import shared_clone
    from ..catalog import parse_variant

    spec = parse_variant(variant.name)
    transformer = shared_clone(base) if variant.clone else base
    if spec.kind == "diffusers":
        precision = "bf16"
        info: dict[str, Any] = {"kind": "diffusers"}
        if spec.base == "diffusers-fp8-compile":
            from ..runners import torchao_fp8

            info["fp8_fast_accumulation"] = torchao_fp8(transformer)
            precision = "fp8"
        if spec.base in ("diffusers-compile", "diffusers-fp8-compile"):
            transformer.compile_repeated_blocks(fullgraph=True)
        kwargs = inputs.diffusers_kwargs(GUIDANCE)

        def diffusers_step(_: int) -> torch.Tensor:
            return transformer(**kwargs)[0]

        compiled = spec.base != "diffusers"
        if compiled:
            info["compile"] = "regional (compile_repeated_blocks), fullgraph, static shapes"
        return BuiltStep(diffusers_step, compiled, precision, info, [transformer])
    assert spec.config is not None
    from ...testing.step_inputs import engine_pipeline

    pipe = engine_pipeline(transformer)
    pipe.configure(spec.config)
    fill = pipe.engine_transformer()
    prepared = inputs.prepare(fill, GUIDANCE)
    plan = fill.quant_plan
    info: dict[str, Any] = {
        "kind": "engine",
        "engine_config": spec.config.describe(),
        "quantization": None if plan is None else dataclasses.asdict(plan),
        "transformer_dtype": str(fill.dtype).replace("torch.", ""),
    }
    if spec.config.compile:
        shapes = "dynamic" if spec.config.compile_dynamic else "static"
        info["compile"] = (
            f"regional (each block), fullgraph, {shapes} shapes, mode {spec.config.compile_mode}"
        )
    precision = "fp8" if plan is not None and plan.mode == "fp8" else "bf16"
    if precision == "fp8" and plan is not None and plan.backend == "native":
        from ...quantization import FP8_FAST_ACCUM

        info["fp8_fast_accumulation"] = FP8_FAST_ACCUM

    def engine_step(index: int) -> torch.Tensor:
        return fill(inputs.latents, index % inputs.timesteps.shape[0], prepared)

    def after_steps() -> dict[str, Any]:
        return auto_attention_record(fill.attention)

    return BuiltStep(
        engine_step, bool(spec.config.compile), precision, info, [pipe, transformer], after_steps
    )


def auto_attention_record(attention: Any) -> dict[str, Any]:
    """What ``auto`` attention picked per shape, and the candidates it dropped with their reasons
    (a kernel that failed to compile or launch); empty for any other backend."""
    from ...attention import AutoAttention

    if not isinstance(attention, AutoAttention):
        return {}
    record: dict[str, Any] = {
        "auto_attention": {str(key[0]): name for key, name in attention.choices.items()}
    }
    if attention.dropped:
        record["auto_attention_dropped"] = dict(attention.dropped)
    return record


def measure_step(
    run: Run,
    variant: StepVariant,
    base: Any,
    inputs: StepInputs,
    reference: torch.Tensor | None,
    flops: float,
) -> tuple[dict[str, Any], torch.Tensor]:
    """Build, cold call, warm-up, timed calls, drift and memory of one variant; frees it after."""
    profile = run.profile
    run.memory.reset_peak()
    before = run.memory.allocated_gib()
    built, setup_s = run.timer.wall_s(lambda: build_step(run, variant, base, inputs))
    after_setup = run.memory.allocated_gib()
    real_compile = profile.compiles(variant.name)
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
        ceiling = measured_ceiling(run, built.precision)
        tflops = flops / (ms / 1000) / 1e12
        result: dict[str, Any] = {
            **built.info,
            **(built.after_steps() if built.after_steps else {}),
            "compiled": built.compiled and real_compile,
            "setup_s": setup_s,
            "cold_call_s": cold_s,  # the first call: compilation (if any), autotuning, lazy set-up
            "cold_overhead_s": cold_s - ms / 1000,
            "ms_per_step": ms,
            "ms_all": times,
            "tflops": tflops,
            "precision": built.precision,
            "ceiling": None if ceiling is None else ceiling[0],
            "measured_peak_tflops": None if ceiling is None else ceiling[1],
            "fraction_of_measured_peak": None if ceiling is None else tflops / ceiling[1],
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
    limit_s: float,
) -> dict[str, Any]:
    """One variant of part 3, stopped at ``limit_s`` (its own limit, or what is left of the part);
    keeps the ``reference`` output in ``outputs`` for the others' drift."""
    try:
        with time_limit(limit_s, variant.name):
            result, output = measure_step(run, variant, base, inputs, outputs.get("reference"), flops)
    except Exception as error:  # noqa: BLE001
        overrun = overrun_in(error)
        if overrun is not None:
            free_memory(run.device, compiled=True)
            return {"status": "timed_out", "reason": str(overrun), "limit_s": limit_s}
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


def selected(profile: Profile, name: str, group: str) -> bool:
    """Whether ``--rows`` selects a row (by its name or its group); the drift reference always runs."""
    return profile.rows is None or name == "reference" or name in profile.rows or group in profile.rows


def row_limit(variant: StepVariant, deadline: Deadline, own_limits: bool = True) -> float:
    """A row's own limit: its ``limit_s`` (with ``own_limits``: they are set for a GPU), never past the
    part's deadline."""
    own = variant.limit_s if own_limits and variant.limit_s is not None else float("inf")
    return min(own, deadline.left())


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
    from ...testing.random_models import random_transformer
    from ..catalog import parse_variant, unavailable_reason
    from ..flops import transformer_flops

    profile = run.profile
    config = profile.transformer()
    inputs = step_inputs(run, config, steps=1)
    flops = transformer_flops(config, inputs.latents.shape[1], profile.text_tokens)
    record["model"] = {
        "transformer_config": {k: list(v) if isinstance(v, tuple) else v for k, v in config.items()},
        "width": profile.width,
        "height": profile.height,
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
    for variant in rows_in_run_order():
        spec = parse_variant(variant.name)  # a wrong name fails here, in the dry run too
        if not selected(profile, variant.name, variant.group):
            continue
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
            functools.partial(
                latency_variant,
                run,
                variant,
                base,
                inputs,
                outputs,
                flops.total,
                reason,
                row_limit(variant, deadline, own_limits=not profile.dry_run),
            ),
        )
    for size in profile.batch_sizes:
        name = f"{BATCHED.name}:batch={size}"
        if not selected(profile, name, BATCHED.group):
            continue
        estimate_s = BATCHED.estimate_s * size
        if not deadline.fits(estimate_s):
            record["items"][name] = too_late(name, estimate_s, deadline)
            continue
        run.item(
            record,
            name,
            functools.partial(batched_variant, run, size, base, inputs, outputs, record, flops.total),
        )
