"""diffusers' model-level features on the drop-in: which ones the engine's transformer cannot honour,
and the path that honours them: diffusers' own transformer forward inside the engine's loop.

The engine's transformer is its own module (fused QKV, split input projection), so whatever diffusers
attaches to ``FluxTransformer2DModel`` (hooks, attention processors, quantized layers, offload hooks,
compiled blocks) would be bypassed by it. :func:`diffusers_features` lists what is set; when anything is,
the pipeline runs :class:`DiffusersForward` for that call (with a one-time warning naming the features),
which calls the diffusers module exactly as diffusers' Fill loop does, so the feature acts with
diffusers' numerics. Nothing diffusers offers is ignored silently.

Every user-facing feature of diffusers 0.42 on the transformer (``FluxTransformer2DModel`` and its
mixins ``ModelMixin``, ``CacheMixin``, ``AttentionMixin``, ``PeftAdapterMixin``,
``FromOriginalModelMixin``, ``FluxTransformer2DLoadersMixin``) and on the pipeline (``FluxFillPipeline``,
``DiffusionPipeline``, ``FluxLoraLoaderMixin``, ``TextualInversionLoaderMixin``, ``FromSingleFileMixin``),
and what the drop-in does with it. "engine": the engine's transformer honours it; "diffusers": this
module routes the call to diffusers' forward, with the warning. Tests: ``F`` tests/pipeline/test_diffusers_features.py,
``C`` tests/pipeline/test_diffusers_fill_cases.py, ``L`` tests/lora/test_lora.py, ``B`` tests/pipeline/test_pipeline_behaviour.py,
``D`` tests/engine/test_loading.py; "gpu": the test runs where there is a CUDA GPU only.

=============================================================  =========  ==============================
feature                                                        path       tested (images = diffusers')
=============================================================  =========  ==============================
transformer.enable_cache: FirstBlockCache, TaylorSeer,         diffusers  F, each config; the loop gives
  MagCache, PyramidAttentionBroadcast, SeaCache, TextKVCache                the "cond" cache context
  FasterCache                                                  diffusers  F: fails on Flux in diffusers
                                                                            too (same error)
transformer.disable_cache                                      engine     F
transformer.enable_layerwise_casting                           diffusers  F (fp32 compute), C (bf16)
transformer.enable_group_offload (block/leaf level)            diffusers  F, C
transformer.set_attention_backend / reset_attention_backend    diffusers  F / engine again (F)
diffusers.attention_backend(...) context,                      diffusers  F (any backend but native)
  DIFFUSERS_ATTN_BACKEND
enable_xformers_memory_efficient_attention (transformer, pipe) diffusers  F: routed, the call raises
  enable_npu_flash_attention, FluxAttnProcessor2_0_NPU                      diffusers' own error here
  enable_xla_flash_attention, XLAFluxFlashAttnProcessor2_0                  (no xformers/NPU/XLA)
transformer.set_attn_processor: FluxAttnProcessor              engine     F
  any other processor (custom, IP-Adapter)                     diffusers  F (custom subclass)
transformer.fuse_qkv_projections / unfuse_qkv_projections      engine     F (values unchanged)
transformer.compile_repeated_blocks, .compile(),               diffusers  F (eager backend)
  torch.compile(transformer)
transformer.enable_gradient_checkpointing / disable_...        engine     F (inference: no effect in
                                                                            diffusers either)
from_pretrained(quantization_config=...): torchao, quanto,     diffusers  F (torchao, quanto); others
  bitsandbytes, gguf, modelopt, nunchaku, sdnq, autoround, bfl              detected by hf_quantizer,
                                                                            not run (GPU/packages)
transformer.dequantize                                         engine     F (torchao)
layers quantized outside diffusers (torchao quantize_,         diffusers  F (both)
  optimum-quanto quantize)
enable_parallelism                                             (owned elsewhere: context parallel)
LoRA: load_lora_weights, set_adapters, fuse/unfuse_lora,       engine     L (load_lora_adapter leaves
  enable/disable_lora, delete_adapters, unload_lora(_weights),              the same peft adapters; not
  enable_lora_hotswap, transformer.load_lora_adapter                        tested on its own)
pipe.enable_model_cpu_offload                                  engine     B (execution device CPU)
pipe.enable_sequential_cpu_offload, accelerate offload         diffusers  F (diffusers' method, CPU as
  hooks from device_map loading                                             execution device), C gpu;
                                                                            device_map: not run
pipe.enable_group_offload                                      diffusers  F, C (transformer routed; the
                                                                            other components run their own
                                                                            forward)
pipe.remove_all_hooks, maybe_free_model_hooks                  engine     F (remove_all_hooks)
pipe.enable_attention_slicing / set_attention_slice            engine     F, C (no Fill component has
                                                                            set_attention_slice: a no-op
                                                                            in diffusers too)
pipe.load_textual_inversion / unload_textual_inversion         engine     F (load: prompts converted
                                                                            as diffusers does)
pipe.to, from_pretrained (dtype, variant, device_map=device),  engine     B, D, C
  save_pretrained, from_pipe, from_single_file, components
pipe.set_progress_bar_config, callbacks, interrupt             engine     B, C
VAE and text-encoder features (vae.enable_tiling, their        engine     by construction: the drop-in
  offload or casting hooks)                                                 calls those modules' own
                                                                            forward/encode/decode
=============================================================  =========  ==============================

Not routed, on purpose: plain ``torch.nn.Module`` hooks a user registers on the transformer
(``register_forward_hook`` and the like) do not fire on the engine's path, which never calls the diffusers
module's forward; the benchmark's diffusers runner instruments a transformer it shares with the engine's
reference runner and relies on that. Model-level features on the other components need nothing here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from .parallel import engine_runs_diffusers_parallelism
from .runtime import RUNTIME_ATTR

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
    "smoothed_energy_guidance": "smoothed energy guidance",
    "layerwise_casting": "enable_layerwise_casting",
    "peft_autocast_disable": "enable_layerwise_casting",
    "group_offloading": "enable_group_offload",
    "lazy_prefetch_group_offloading": "enable_group_offload",
    "layer_execution_tracker": "enable_group_offload",
    "cp_input": "enable_parallelism",
    "cp_output": "enable_parallelism",
}
# Attention backends some diffusers methods set (diffusers.models.attention.AttentionModuleMixin).
_BACKEND_METHODS = {
    "xformers": "enable_xformers_memory_efficient_attention",
    "_native_npu": "enable_npu_flash_attention",
    "_fused_npu": "enable_npu_flash_attention",
    "_native_xla": "enable_xla_flash_attention",
}


def _hook_features(transformer: torch.nn.Module) -> set[str]:
    features = set()
    for module in transformer.modules():
        registry = module.__dict__.get("_diffusers_hook")
        for name in getattr(registry, "hooks", {}):
            feature = next((f for prefix, f in _HOOK_FEATURES.items() if name.startswith(prefix)), None)
            features.add(feature or f"diffusers hook {name!r}")
    return features


def _backend_feature(backend: Any) -> str:
    name = getattr(backend, "value", backend)
    return f"{_BACKEND_METHODS.get(name, 'set_attention_backend')} (attention backend {name})"


def _attention_features(transformer: torch.nn.Module) -> set[str]:
    """Non-default attention processors, backends set on processors, and diffusers' process-wide
    active backend (``attention_backend(...)`` context or ``DIFFUSERS_ATTN_BACKEND``), which every
    processor without a backend of its own follows."""
    from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry
    from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

    features = set()
    follows_active = False
    for module in transformer.modules():
        processor = module.__dict__.get("processor")
        if processor is None:
            continue
        if type(processor) is not FluxAttnProcessor:
            features.add(f"set_attn_processor ({type(processor).__name__})")
        backend = getattr(processor, "_attention_backend", None)
        if backend is not None:
            features.add(_backend_feature(backend))
        follows_active = follows_active or backend is None
    active = _AttentionBackendRegistry._active_backend
    active = getattr(active, "value", active)
    if follows_active and active != AttentionBackendName.NATIVE.value:
        features.add(f"attention_backend context or DIFFUSERS_ATTN_BACKEND (attention backend {active})")
    return features


def _quantization_features(transformer: torch.nn.Module) -> set[str]:
    """Quantized by diffusers (``quantization_config``), or layers replaced or given tensor-subclass
    weights by someone other than the engine (torchao ``quantize_``, optimum-quanto ``quantize``)."""
    quantizer = getattr(transformer, "hf_quantizer", None)
    if quantizer is not None or getattr(transformer, "is_quantized", False):
        method = getattr(getattr(quantizer, "quantization_config", None), "quant_method", None)
        return {f"quantized by diffusers ({getattr(method, 'value', method) or 'quantization_config'})"}
    runtime = transformer.__dict__.get(RUNTIME_ATTR)
    if runtime is not None and runtime.quant_plan is not None:
        return set()  # the engine's own quantization: its layers are in the diffusers tree too
    kinds = set()
    for module in transformer.modules():
        if isinstance(module, torch.nn.Linear) and type(module) is not torch.nn.Linear:
            kinds.add(type(module).__name__)
        for parameter in module._parameters.values():
            if parameter is not None and type(parameter) not in (torch.nn.Parameter, torch.Tensor):
                kinds.add(type(parameter).__name__)
    return {f"quantized or replaced layers ({', '.join(sorted(kinds))})"} if kinds else set()


def _compiled(transformer: torch.nn.Module) -> bool:
    from torch._dynamo.eval_frame import OptimizedModule

    if isinstance(transformer, OptimizedModule):
        return True
    return any(getattr(m, "_compiled_call_impl", None) is not None for m in transformer.modules())


def diffusers_features(transformer: FluxTransformer2DModel) -> list[str]:
    """The features set on ``transformer`` that only diffusers' own forward honours (sorted names)."""
    features = _hook_features(transformer) | _attention_features(transformer)
    if engine_runs_diffusers_parallelism(transformer):  # Ulysses: the engine's own context parallel
        features.discard("enable_parallelism")
    features |= _quantization_features(transformer)
    if any("_hf_hook" in m.__dict__ for m in transformer.modules() if m is not transformer):
        features.add("enable_sequential_cpu_offload (accelerate offload hooks)")
    if _compiled(transformer):
        features.add("torch.compile (compile_repeated_blocks, Module.compile or torch.compile)")
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
