"""The engine transformer's lifecycle: build, keep in sync, quantize, compile, choose attention, release.

One :class:`TransformerRuntime` belongs to each diffusers ``FluxTransformer2DModel`` and is kept on it
(:func:`runtime_of`), so every pipeline that shares the module (``from_pipe``, several engines, the
benchmark's variants) shares one set of fused weights. :meth:`TransformerRuntime.get` is the one way to
the engine's :class:`~.model.FillTransformer`: it builds what is missing for a configuration and a
device, and says clearly what cannot be done.

Sync rules: the engine's fused QKV weights are views the diffusers layers share, so the two trees hold
one copy. Moving or casting the diffusers module gives it fresh tensors; an unquantized engine is then
rebuilt (and released before the move, so the old device's copy is freed). A quantized engine holds
modules the diffusers tree holds too, so it moves with it; it cannot be rebuilt from the quantized
tree, so it is kept, and a change that broke the sharing is an error.
"""

from __future__ import annotations

import copy
import logging
from typing import TYPE_CHECKING, Any

import torch

from .config import EngineConfig
from .lora.apply import resolve_strategy
from .lora.files import LoraCache
from .model import FillTransformer
from .parallel import resolve_context_parallel
from .quantization import QuantPlan, resolve, weight_bytes

if TYPE_CHECKING:
    from diffusers import FluxTransformer2DModel

logger = logging.getLogger(__name__)

# Where the runtime lives on the diffusers module: a plain attribute, not a registered submodule, so
# state dicts, saving and offload hooks never see the engine's modules twice.
RUNTIME_ATTR = "_fluxfill_runtime"


def runtime_of(transformer: FluxTransformer2DModel) -> TransformerRuntime:
    """The runtime kept on ``transformer`` (created on first use)."""
    runtime = transformer.__dict__.get(RUNTIME_ATTR)
    if runtime is None:
        runtime = transformer.__dict__[RUNTIME_ATTR] = TransformerRuntime(transformer)
    return runtime


def execution_device(transformer: FluxTransformer2DModel) -> torch.device:
    """Where the transformer runs: its offload hook's device under model CPU offload, else its own."""
    hook = getattr(transformer, "_hf_hook", None)
    device = getattr(hook, "execution_device", None)
    return torch.device(device) if device is not None else transformer.device


class TransformerRuntime:
    """The engine transformer of one diffusers transformer (see the module docstring)."""

    def __init__(self, transformer: FluxTransformer2DModel) -> None:
        self.transformer = transformer
        self._fill: FillTransformer | None = None
        self.unquantized_bytes: int | None = None  # weight bytes before quantization, once quantized
        self._lora_cache: LoraCache | None = None

    def __deepcopy__(self, memo: dict[int, Any]) -> TransformerRuntime:
        # A copied diffusers module gets an empty runtime of its own: it builds its own engine
        # transformer on first use instead of duplicating (and then sharing nothing with) this one.
        return TransformerRuntime(copy.deepcopy(self.transformer, memo))

    @property
    def current(self) -> FillTransformer | None:
        """The engine transformer built so far (``None`` before the first :meth:`get` or after release)."""
        return self._fill

    @property
    def quant_plan(self) -> QuantPlan | None:
        return None if self._fill is None else self._fill.quant_plan

    def get(self, config: EngineConfig, device: torch.device) -> FillTransformer:
        """The engine transformer for ``config`` on ``device``: built or rebuilt when missing or stale,
        quantized once, compiled and given its attention backend for ``device``."""
        fill = self._fill
        if fill is not None and fill.quant_plan is not None and not fill.is_in_sync():
            raise ValueError(
                "the quantized engine transformer no longer matches pipe.transformer (its layers were "
                "replaced or cast after quantization); load the model again and configure it once"
            )
        if fill is None or not fill.is_in_sync():
            if fill is not None:
                fill.lora.reset()  # a merged LoRA set goes back out of weights the diffusers module may share
            self._fill = None  # release the stale one before building the new one
            if any(p.device.type == "meta" for p in self.transformer.parameters()):
                raise ValueError(
                    "the transformer's weights are not materialised (sequential CPU offload?); "
                    "fluxfill-engine supports enable_model_cpu_offload(), not sequential offload"
                )
            fill = FillTransformer.from_diffusers(self.transformer, config.attention, config.fused_kernels)
            self._fill = fill
        if config.quant != "none" and fill.quant_plan is None:
            plan = resolve(config.quant, config.quant_backend, device)
            resolve_strategy(config.lora_strategy, plan)  # an impossible LoRA strategy: before quantizing
            self.unquantized_bytes = weight_bytes([self.transformer])
            fill.quantize(plan)
        fill.set_compile((config.compile_mode, config.compile_dynamic) if config.compile else None, device)
        fill.set_attention(config.attention, config.fused_kernels, device, config.attention_fp8)
        fill.set_context_parallel(resolve_context_parallel(config.context_parallel, self.transformer))
        fill.precompute_modulation = config.precompute_modulation
        resolve_strategy(config.lora_strategy, fill.quant_plan)
        return fill

    def lora_cache(self, capacity: int) -> LoraCache:
        """The loaded LoRA files of this transformer (checked against its shapes), kept across engine
        rebuilds; ``capacity`` files at most."""
        if self._lora_cache is None:
            self._lora_cache = LoraCache(capacity)
        self._lora_cache.capacity = capacity
        return self._lora_cache

    def check_change(self, old: EngineConfig, new: EngineConfig) -> None:
        """Refuse a configuration change that cannot be made in place (quantization is not undoable)."""
        plan = self.quant_plan
        if plan is not None and new.quant != old.quant:
            raise ValueError(
                f"the transformer is already quantized ({plan.mode}); quantization cannot be changed "
                f"or undone in place: load the model again to use quant={new.quant!r}"
            )

    def release(self) -> None:
        """Before the diffusers module moves: drop an unquantized engine (its fused weights would keep
        the old device's copy alive; it is rebuilt on the next :meth:`get`). A quantized one moves with
        the module and is kept. Either way a LoRA set is taken out first (merged weights restored
        exactly, side paths dropped: they would stay on the old device); the next call applies it again."""
        if self._fill is not None:
            self._fill.lora.reset()
        if self._fill is not None and self._fill.quant_plan is None:
            self._fill = None

    def warn_if_quantized_for_another_device(self, config: EngineConfig, device: torch.device) -> None:
        """Quantizing resolves ``quant`` for the device of that moment (``auto`` fp8 runs int8-weight
        without fp8 tensor cores); say so when the module moves where the choice would differ."""
        plan = self.quant_plan
        if plan is None:
            return
        try:
            wanted = resolve(config.quant, config.quant_backend, device)
        except ValueError as error:
            wanted, why = None, str(error)
        else:
            why = f"there it would run {wanted.mode} ({wanted.backend})"
        if wanted is None or (wanted.mode, wanted.backend) != (plan.mode, plan.backend):
            logger.warning(
                "the transformer was quantized before the move, as %s (%s); on %s quant=%r: %s. It keeps "
                "running %s: to get the device's choice, configure after moving the pipeline (load it again)",
                plan.mode,
                plan.reason,
                device,
                config.quant,
                why,
                plan.mode,
            )
