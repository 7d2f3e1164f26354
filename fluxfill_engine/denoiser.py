"""Which transformer runs a call, and with which LoRAs: the engine's own (with the request's or
diffusers' adapters applied to its layers) or diffusers' forward, for features only it honours
(:mod:`.diffusers_path`).

The pipeline owns a :class:`DenoiserRouter`: it holds the engine's LoRA set
(``FluxFillPipeline.set_engine_loras``) and the features already warned about, and it is given the
diffusers transformer and the configuration for each decision. The engine transformer is reached
through the transformer's :class:`~.runtime.TransformerRuntime`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol

from .call import PipelineCall
from .diffusers_path import DiffusersForward, diffusers_cache_enabled, diffusers_features
from .lora.adapters import AdapterSet, file_set, peft_adapter_set
from .lora.apply import resolve_strategy
from .lora.spec import LoraSpec, check_lora_specs, lora_label
from .runtime import execution_device, runtime_of

if TYPE_CHECKING:
    import torch
    from diffusers import FluxTransformer2DModel

    from .config import EngineConfig
    from .model import FillTransformer
    from .stats import LoraStats

logger = logging.getLogger("fluxfill_engine.pipeline")  # the drop-in's warnings, under its name


class Denoiser(Protocol):
    """What the sampling loop calls: the engine transformer (:class:`~.model.FillTransformer`) or
    diffusers' forward (:class:`~.diffusers_path.DiffusersForward`). ``prepare`` runs once per call and
    returns the inputs every step reads."""

    def prepare(
        self,
        cond: torch.Tensor,
        prompt_embeds: torch.Tensor,
        pooled_prompt_embeds: torch.Tensor,
        timesteps: torch.Tensor,
        guidance: float | None,
        txt_ids: torch.Tensor,
        img_ids: torch.Tensor,
        latents_dtype: torch.dtype,
    ) -> Any: ...

    def text_embedding(self, prompt_embeds: torch.Tensor) -> torch.Tensor: ...

    def __call__(self, latents: torch.Tensor, step: int, inputs: Any, cache: Any = None) -> torch.Tensor: ...


def _engine_transformer(transformer: FluxTransformer2DModel, config: EngineConfig) -> FillTransformer:
    """The engine transformer of ``transformer`` for ``config``, built for the device it runs on (under
    model CPU offload, the offload's execution device)."""
    return runtime_of(transformer).get(config, execution_device(transformer))


def describe_path(transformer: FluxTransformer2DModel, config: EngineConfig) -> dict[str, Any]:
    """Which transformer path runs (``engine``, or ``diffusers`` for the features listed) and the
    configuration."""
    features = diffusers_features(transformer)
    return {
        "transformer_path": "diffusers" if features else "engine",
        "diffusers_features": features,
        "config": config.describe(),
    }


class DenoiserRouter:
    """Chooses the transformer of each call and the LoRA set it runs with.

    ``engine_loras`` is the engine's own set (``None``: none), applied to the engine transformer's
    layers with ``EngineConfig.lora_strategy``; diffusers' adapters (``load_lora_weights``) are read from
    the transformer at every call. The two at once are refused.
    """

    def __init__(self) -> None:
        self.engine_loras: AdapterSet | None = None
        self._warned: set[tuple[str, ...]] = set()  # feature lists already warned about, once each

    def load_loras(
        self,
        transformer: FluxTransformer2DModel,
        config: EngineConfig,
        loras: Sequence[LoraSpec | dict[str, Any] | str] | None,
    ) -> AdapterSet | None:
        """:meth:`FluxFillPipeline.load_engine_loras` (its docstring says what is checked); changes
        nothing."""
        specs = check_lora_specs(loras, config.max_loras)
        if not specs:
            return None
        fill = _engine_transformer(transformer, config)
        shapes = fill.lora.shapes()
        cache = runtime_of(transformer).lora_cache(config.lora_cache_size)
        device = execution_device(transformer)
        files = [
            cache.load(spec, lora_label(i, spec), shapes, config.max_lora_rank, device, fill.dtype)
            for i, spec in enumerate(specs)
        ]
        return file_set(specs, files)

    def lora_set_for(
        self, transformer: FluxTransformer2DModel, config: EngineConfig, call: PipelineCall
    ) -> tuple[AdapterSet | None, str]:
        """The set this call runs and how: diffusers' adapters as a side path, or the engine's own."""
        scale = (call.joint_attention_kwargs or {}).get("scale")
        scale = 1.0 if scale is None else float(scale)
        adapters = peft_adapter_set(transformer, scale)
        requested = self.engine_loras
        if adapters is not None and requested is not None:
            raise ValueError(
                "the transformer has diffusers LoRA adapters (load_lora_weights) and engine LoRAs "
                "(set_engine_loras) at once; use one: pipe.unload_lora_weights() or pipe.set_engine_loras(None)"
            )
        if adapters is not None:
            return adapters, "side"
        if requested is None:
            return None, "side"
        strategy = resolve_strategy(config.lora_strategy, runtime_of(transformer).quant_plan)
        return requested.scaled(scale), strategy

    def choose(
        self, transformer: FluxTransformer2DModel, config: EngineConfig, call: PipelineCall
    ) -> tuple[Denoiser, LoraStats]:
        """The engine transformer (with this call's LoRAs applied), or diffusers' own forward when the
        diffusers module has features only that forward honours (see :mod:`.diffusers_path`); and the
        call's LoRA stats (empty on diffusers' forward, which applies its adapters itself)."""
        features = diffusers_features(transformer)
        if not features:
            fill = _engine_transformer(transformer, config)
            return fill, self._activate_loras(transformer, config, fill, call)  # before prepare
        if config.step_cache_policy is not None and diffusers_cache_enabled(transformer):
            cache = next(f for f in features if f.startswith("enable_cache"))
            raise ValueError(
                f"EngineConfig.step_cache_threshold and diffusers' {cache} are both set; use one of them "
                "(pipe.configure(...step_cache_threshold=None) or pipe.transformer.disable_cache())"
            )
        if self.engine_loras is not None:
            raise ValueError(
                f"engine LoRAs (set_engine_loras) run on the engine's transformer, but {features} need "
                "diffusers' own forward; use diffusers' load_lora_weights, or switch those features off"
            )
        current = runtime_of(transformer).current
        if current is not None:  # a merged engine LoRA set must not reach diffusers' forward
            current.lora.apply(None, "side", execution_device(transformer), current.dtype, None)
        if tuple(features) not in self._warned:
            self._warned.add(tuple(features))
            logger.warning(
                "%s: only diffusers' own transformer forward honours this, so it runs inside the engine's "
                "loop (the engine's transformer optimizations are off while it is set)",
                ", ".join(features),
            )
        return DiffusersForward(transformer, call.joint_attention_kwargs), {}

    def _activate_loras(
        self,
        transformer: FluxTransformer2DModel,
        config: EngineConfig,
        fill: FillTransformer,
        call: PipelineCall,
    ) -> LoraStats:
        adapters, strategy = self.lora_set_for(transformer, config, call)
        compiled = fill.compile_settings is not None
        padded = (config.max_loras, config.max_lora_rank) if compiled and strategy == "side" else None
        applied = fill.lora.apply(adapters, strategy, execution_device(transformer), fill.dtype, padded)
        adapters_info = [] if adapters is None else adapters.describe()
        return {
            "source": None if adapters is None or not adapters.adapters else adapters.source,
            "adapters": adapters_info,
            "load_seconds": sum(a.get("load_seconds", 0.0) for a in adapters_info),
            **applied,
        }
