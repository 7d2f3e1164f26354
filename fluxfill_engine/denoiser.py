"""Which transformer runs a call, and with which LoRAs: the engine's own (with the request's or
diffusers' adapters applied to its layers) or diffusers' forward, for features only it honours
(:mod:`.diffusers_path`)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from .call import PipelineCall
from .diffusers_path import DiffusersForward, diffusers_cache_enabled, diffusers_features
from .lora.adapters import AdapterSet, file_set, peft_adapter_set
from .lora.apply import resolve_strategy
from .lora.spec import LoraSpec, check_lora_specs, lora_label
from .runtime import execution_device

if TYPE_CHECKING:
    from .model import FillTransformer
    from .pipeline import FluxFillPipeline

logger = logging.getLogger("fluxfill_engine.pipeline")  # the drop-in's warnings, under its name


def load_engine_loras(
    pipe: FluxFillPipeline, loras: Sequence[LoraSpec | dict[str, Any] | str] | None
) -> AdapterSet | None:
    """:meth:`FluxFillPipeline.load_engine_loras` (its docstring says what is checked)."""
    config = pipe.engine_config
    specs = check_lora_specs(loras, config.max_loras)
    if not specs:
        return None
    fill = pipe.engine_transformer()
    shapes = fill.lora.shapes()
    cache = pipe.runtime.lora_cache(config.lora_cache_size)
    device = execution_device(pipe.transformer)
    files = [
        cache.load(spec, lora_label(i, spec), shapes, config.max_lora_rank, device, fill.dtype)
        for i, spec in enumerate(specs)
    ]
    return file_set(specs, files)


def lora_set_for(pipe: FluxFillPipeline, call: PipelineCall) -> tuple[AdapterSet | None, str]:
    """The set this call runs and how: diffusers' adapters as a side path, or the engine's own."""
    scale = (call.joint_attention_kwargs or {}).get("scale")
    scale = 1.0 if scale is None else float(scale)
    adapters = peft_adapter_set(pipe.transformer, scale)
    requested = pipe._engine_loras
    if adapters is not None and requested is not None:
        raise ValueError(
            "the transformer has diffusers LoRA adapters (load_lora_weights) and engine LoRAs "
            "(set_engine_loras) at once; use one: pipe.unload_lora_weights() or pipe.set_engine_loras(None)"
        )
    if adapters is not None:
        return adapters, "side"
    if requested is None:
        return None, "side"
    strategy = resolve_strategy(pipe.engine_config.lora_strategy, pipe.runtime.quant_plan)
    return requested.scaled(scale), strategy


def activate_loras(pipe: FluxFillPipeline, fill: FillTransformer, call: PipelineCall) -> dict[str, Any]:
    adapters, strategy = lora_set_for(pipe, call)
    config = pipe.engine_config
    compiled = fill.compile_settings is not None
    padded = (config.max_loras, config.max_lora_rank) if compiled and strategy == "side" else None
    device = execution_device(pipe.transformer)
    applied = fill.lora.apply(adapters, strategy, device, fill.dtype, padded)
    adapters_info = [] if adapters is None else adapters.describe()
    return {
        "source": None if adapters is None or not adapters.adapters else adapters.source,
        "adapters": adapters_info,
        "load_seconds": sum(a.get("load_seconds", 0.0) for a in adapters_info),
        **applied,
    }


def choose_denoiser(
    pipe: FluxFillPipeline, call: PipelineCall
) -> tuple[FillTransformer | DiffusersForward, dict[str, Any]]:
    """The engine transformer (with this call's LoRAs), or diffusers' own forward when the diffusers
    module has features only that forward honours (see :mod:`.diffusers_path`)."""
    features = diffusers_features(pipe.transformer)
    if not features:
        fill = pipe.engine_transformer()
        return fill, activate_loras(pipe, fill, call)  # before prepare: embedders may carry LoRAs
    if pipe.engine_config.step_cache_policy is not None and diffusers_cache_enabled(pipe.transformer):
        cache = next(f for f in features if f.startswith("enable_cache"))
        raise ValueError(
            f"EngineConfig.step_cache_threshold and diffusers' {cache} are both set; use one of them "
            "(pipe.configure(...step_cache_threshold=None) or pipe.transformer.disable_cache())"
        )
    if pipe._engine_loras is not None:
        raise ValueError(
            f"engine LoRAs (set_engine_loras) run on the engine's transformer, but {features} need "
            "diffusers' own forward; use diffusers' load_lora_weights, or switch those features off"
        )
    current = pipe.runtime.current
    if current is not None:  # a merged engine LoRA set must not reach diffusers' forward
        current.lora.apply(None, "side", execution_device(pipe.transformer), current.dtype, None)
    warned = pipe.__dict__.setdefault("_diffusers_path_warned", set())
    if tuple(features) not in warned:
        warned.add(tuple(features))
        logger.warning(
            "%s: only diffusers' own transformer forward honours this, so it runs inside the engine's "
            "loop (the engine's transformer optimizations are off while it is set)",
            ", ".join(features),
        )
    return DiffusersForward(pipe.transformer, call.joint_attention_kwargs), {}


def describe_path(pipe: FluxFillPipeline) -> dict[str, Any]:
    """Which transformer path runs (``engine``, or ``diffusers`` for the features listed) and the
    configuration."""
    features = diffusers_features(pipe.transformer)
    return {
        "transformer_path": "diffusers" if features else "engine",
        "diffusers_features": features,
        "config": pipe.engine_config.describe(),
    }
