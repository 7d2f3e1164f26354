"""diffusers' model-level features on the drop-in: which ones the engine's transformer cannot honour,
and the path that honours them: diffusers' own transformer forward inside the engine's loop.

The engine's transformer is its own module (fused QKV, split input projection), so whatever diffusers
attaches to ``FluxTransformer2DModel`` (hooks, attention processors, quantized layers, offload hooks)
would be bypassed by it. :func:`diffusers_features` lists what is set; when anything is, the pipeline
runs :class:`DiffusersForward` for that call (with a one-time warning naming the features), which calls
the diffusers module exactly as diffusers' Fill loop does, so the feature acts with diffusers' numerics.
Nothing is ignored silently.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from diffusers import FluxTransformer2DModel

    from .cache import StepCache

# diffusers hook names (diffusers.hooks) -> the feature a user switched on.
_HOOK_FEATURES = {
    "fbc_": "enable_cache (FirstBlockCacheConfig)",
    "taylorseer": "enable_cache (TaylorSeerCacheConfig)",
    "faster_cache": "enable_cache (FasterCacheConfig)",
    "mag_cache": "enable_cache (MagCacheConfig)",
    "pyramid_attention_broadcast": "enable_cache (PyramidAttentionBroadcastConfig)",
    "sea_cache": "enable_cache (SeaCacheConfig)",
    "text_kv_cache": "enable_cache (TextKVCacheConfig)",
    "layer_skip": "layer skipping",
    "layerwise_casting": "enable_layerwise_casting",
    "peft_autocast_disable": "enable_layerwise_casting",
    "group_offloading": "enable_group_offload",
    "lazy_prefetch_group_offloading": "enable_group_offload",
    "cp_input": "enable_parallelism",
    "cp_output": "enable_parallelism",
}
_DEFAULT_PROCESSOR = "FluxAttnProcessor"


def _hook_features(transformer: torch.nn.Module) -> set[str]:
    features = set()
    for module in transformer.modules():
        registry = module.__dict__.get("_diffusers_hook")
        for name in getattr(registry, "hooks", {}):
            feature = next((f for prefix, f in _HOOK_FEATURES.items() if name.startswith(prefix)), None)
            features.add(feature or f"diffusers hook {name!r}")
    return features


def diffusers_features(transformer: FluxTransformer2DModel) -> list[str]:
    """The features set on ``transformer`` that only diffusers' own forward honours (sorted names)."""
    features = _hook_features(transformer)
    if getattr(transformer, "hf_quantizer", None) is not None or getattr(transformer, "is_quantized", False):
        method = getattr(getattr(transformer, "hf_quantizer", None), "quantization_config", None)
        features.add(f"quantized by diffusers ({getattr(method, 'quant_method', 'quantization_config')})")
    if any("_hf_hook" in m.__dict__ for m in transformer.modules() if m is not transformer):
        features.add("enable_sequential_cpu_offload")
    for module in transformer.modules():
        processor = module.__dict__.get("processor")
        if processor is None:
            continue
        backend = getattr(processor, "_attention_backend", None)
        if backend is not None:
            features.add(f"set_attention_backend ({getattr(backend, 'value', backend)})")
        name = type(processor).__name__
        if name != _DEFAULT_PROCESSOR:
            features.add(f"attention processor {name}")
    return sorted(features)


def diffusers_cache_enabled(transformer: FluxTransformer2DModel) -> bool:
    """Whether a diffusers cache (``enable_cache``) is on: its hooks need a cache context per call."""
    return bool(getattr(transformer, "is_cache_enabled", False))


@dataclass
class DiffusersInputs:
    """What every step passes to diffusers' forward; ``txt`` may be replaced by a step callback."""

    cond: torch.Tensor
    txt: torch.Tensor
    pooled: torch.Tensor
    timesteps: torch.Tensor
    guidance: torch.Tensor | None
    txt_ids: torch.Tensor
    img_ids: torch.Tensor
    latents_dtype: torch.dtype


class DiffusersForward:
    """The loop's transformer interface (``prepare``, a call per step, ``text_embedding``) on
    diffusers' own ``FluxTransformer2DModel.forward``, called as diffusers' Fill pipeline calls it."""

    quant_plan = None
    compile_settings = None

    def __init__(
        self, transformer: FluxTransformer2DModel, joint_attention_kwargs: dict[str, Any] | None
    ) -> None:
        self.transformer = transformer
        self.joint_attention_kwargs = joint_attention_kwargs
        self.cache_context = diffusers_cache_enabled(transformer)

    @property
    def dtype(self) -> torch.dtype:
        return self.transformer.dtype

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
    ) -> DiffusersInputs:
        guidance_t = None
        if guidance is not None:
            guidance_t = torch.full([1], guidance, device=cond.device, dtype=torch.float32)
            guidance_t = guidance_t.expand(cond.shape[0])
        return DiffusersInputs(
            cond, prompt_embeds, pooled_prompt_embeds, timesteps, guidance_t, txt_ids, img_ids, latents_dtype
        )

    def text_embedding(self, prompt_embeds: torch.Tensor) -> torch.Tensor:
        return prompt_embeds  # diffusers' forward embeds the text itself, every step

    def __call__(
        self, latents: torch.Tensor, step: int, inputs: DiffusersInputs, cache: StepCache | None = None
    ) -> torch.Tensor:
        if cache is not None:
            raise ValueError("the engine's step cache cannot run on diffusers' forward")
        timestep = inputs.timesteps[step].expand(latents.shape[0]).to(latents.dtype)
        arguments = dict(
            hidden_states=torch.cat((latents, inputs.cond), dim=2),
            timestep=timestep / 1000,
            guidance=inputs.guidance,
            pooled_projections=inputs.pooled,
            encoder_hidden_states=inputs.txt,
            txt_ids=inputs.txt_ids,
            img_ids=inputs.img_ids,
            joint_attention_kwargs=self.joint_attention_kwargs,
            return_dict=False,
        )
        if self.cache_context:
            with self.transformer.cache_context("cond"):
                return self.transformer(**arguments)[0]
        return self.transformer(**arguments)[0]
