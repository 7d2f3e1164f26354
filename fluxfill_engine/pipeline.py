"""Drop-in ``FluxFillPipeline``: diffusers' API, the engine's own sampling loop and transformer.

It subclasses ``diffusers.FluxFillPipeline`` so loading, saving, ``from_pipe``, offloading, progress-bar
settings and the LoRA/textual-inversion mixins keep working; ``__call__`` runs this package's code
(:mod:`.sampling`, :mod:`.conditioning`, :mod:`.text`, :mod:`.model`). Unconfigured, it runs the
``reference`` preset and gives diffusers' images for the same inputs and generator.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import diffusers
import numpy as np
import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
from diffusers.pipelines.flux.pipeline_output import FluxPipelineOutput
from diffusers.utils import USE_PEFT_BACKEND, scale_lora_layers, unscale_lora_layers
from diffusers.utils.torch_utils import randn_tensor
from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

from .cache import StepCache, mask_token_weights
from .compilation import load_compile_cache, save_compile_cache
from .conditioning import (
    bools_to_float,
    check_image_values,
    fill_conditioning,
    image_seq_len,
    is_finite_number,
    latent_image_ids,
    load_image_input,
    pack_latents,
    repeat_to_batch,
    unpack_latents,
)
from .config import EngineConfig
from .model import FillTransformer
from .quantization import quantize_text_encoder as quantize_text_encoder_linears
from .quantization import resolve, weight_bytes
from .sampling import Schedule, euler_step, make_schedule, noise_latents
from .text import PromptCache, clip_pooled_embeds, t5_embeds, weights_fingerprint

logger = logging.getLogger(__name__)

OUTPUT_TYPES = ("pil", "np", "pt", "latent")
# The engine transformer is cached on the diffusers transformer it views, so every pipeline sharing that
# module (from_pipe, several engines) shares one set of fused weights instead of each fusing its own.
_FILL_ATTR = "_fluxfill_transformer"
StageHook = Callable[..., None]


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _vae_sample_shape(image: torch.Tensor, latent_channels: int, vae_scale_factor: int) -> tuple[int, ...]:
    return (
        image.shape[0],
        latent_channels,
        image.shape[2] // vae_scale_factor,
        image.shape[3] // vae_scale_factor,
    )


class FluxFillPipeline(diffusers.FluxFillPipeline):
    """``diffusers.FluxFillPipeline`` with the engine underneath. Same constructor, API and outputs.

    Use :meth:`configure` to switch optimizations on (``pipe.configure(EngineConfig.preset(...))``).
    """

    # The component annotations are diffusers' own: from_pipe and from_pretrained read them.
    def __init__(
        self,
        scheduler: FlowMatchEulerDiscreteScheduler,
        vae: AutoencoderKL,
        text_encoder: CLIPTextModel,
        tokenizer: CLIPTokenizer,
        text_encoder_2: T5EncoderModel,
        tokenizer_2: T5TokenizerFast,
        transformer: FluxTransformer2DModel,
    ) -> None:
        super().__init__(
            scheduler=scheduler,
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            text_encoder_2=text_encoder_2,
            tokenizer_2=tokenizer_2,
            transformer=transformer,
        )
        self._engine_config = EngineConfig.preset("reference")
        self.prompt_cache = PromptCache(self._engine_config.prompt_cache_size)
        self.compile_cache: dict[str, Any] | None = None  # what load_compile_cache loaded, if anything
        self.last_stats: dict[str, Any] | None = None  # steps run in full / cached in the last call

    # ---- configuration -----------------------------------------------------------------------------

    @property
    def engine_config(self) -> EngineConfig:
        return self._engine_config

    def configure(self, config: EngineConfig) -> FluxFillPipeline:
        """Apply an :class:`EngineConfig` (returns the pipeline, for chaining)."""
        if not isinstance(config, EngineConfig):
            raise TypeError(f"`config` must be an EngineConfig, got {type(config).__name__}")
        self._check_quant_change(config)
        self._engine_config = config
        self.prompt_cache = PromptCache(config.prompt_cache_size)
        dtype = config.torch_dtype
        if dtype is not None and self.transformer.dtype != dtype:
            self.transformer.to(dtype)
        if config.quantize_text_encoder and not getattr(self, "_text_encoder_quantized", False):
            plan = resolve(config.text_encoder_quant, "native", self._execution_device)
            self._record_weight_bytes("text_encoder_2")
            quantize_text_encoder_linears(self.text_encoder_2, plan)
            self._text_encoder_quantized = True
        if config.compile_cache_dir is not None:
            self.compile_cache = load_compile_cache(config.compile_cache_dir)
        if config.quant != "none" or config.compile:
            _ = self.fill_transformer  # quantize/compile now: memory drops and errors surface here
        return self

    def save_compile_cache(self) -> dict[str, Any] | None:
        """Persist this process's compiled artifacts to ``compile_cache_dir`` (after a warm-up)."""
        if self._engine_config.compile_cache_dir is None:
            raise ValueError("EngineConfig.compile_cache_dir is not set")
        return save_compile_cache(self._engine_config.compile_cache_dir)

    def _check_quant_change(self, config: EngineConfig) -> None:
        fill = self.transformer.__dict__.get(_FILL_ATTR)
        current = fill.quant_plan if fill is not None else None
        if current is not None and config.quant != self._engine_config.quant:
            raise ValueError(
                f"the transformer is already quantized ({current.mode}); quantization cannot be changed "
                "or undone in place: load the model again to use quant={config.quant!r}"
            )
        if getattr(self, "_text_encoder_quantized", False) and not config.quantize_text_encoder:
            raise ValueError("the text encoder is already quantized; load the model again to undo it")

    def _record_weight_bytes(self, name: str) -> None:
        before = self.__dict__.setdefault("_weight_bytes_before", {})
        if name not in before:
            before[name] = weight_bytes([getattr(self, name)])

    def memory_report(self) -> dict[str, dict[str, int]]:
        """Bytes of weights per component, before and after quantization (equal when unquantized)."""
        before = self.__dict__.get("_weight_bytes_before", {})
        report = {}
        for name in ("transformer", "text_encoder", "text_encoder_2", "vae"):
            module = getattr(self, name, None)
            if module is not None:
                now = weight_bytes([module])
                report[name] = {"before": before.get(name, now), "after": now}
        return report

    def to(self, *args: Any, **kwargs: Any) -> FluxFillPipeline:
        self._release_unmovable_weights()
        self.prompt_cache.clear()
        super().to(*args, **kwargs)
        transformer = getattr(self, "transformer", None)
        if transformer is not None and transformer.device.type != "cpu":  # offload parks weights on the CPU
            self._warn_if_quantized_for_another_device(transformer.device)
        return self

    def _warn_if_quantized_for_another_device(self, device: torch.device) -> None:
        """Quantizing resolves ``quant`` for the device of that moment (``auto`` fp8 runs int8-weight
        without fp8 tensor cores); say so when the pipeline moves where the choice would differ."""
        fill = self.transformer.__dict__.get(_FILL_ATTR)
        if fill is None or fill.quant_plan is None:
            return
        config = self._engine_config
        try:
            wanted = resolve(config.quant, config.quant_backend, device)
        except ValueError as error:
            wanted = None
            why = str(error)
        else:
            why = f"there it would run {wanted.mode} ({wanted.backend})"
        if wanted is None or (wanted.mode, wanted.backend) != (fill.quant_plan.mode, fill.quant_plan.backend):
            logger.warning(
                "the transformer was quantized before the move, as %s (%s); on %s quant=%r: %s. It keeps "
                "running %s: to get the device's choice, configure after moving the pipeline (load it again)",
                fill.quant_plan.mode,
                fill.quant_plan.reason,
                device,
                config.quant,
                why,
                fill.quant_plan.mode,
            )

    def _release_unmovable_weights(self) -> None:
        """Before the diffusers transformer moves: drop the engine's weights that would not move with it.

        Moving gives the diffusers modules fresh tensors, so an unquantized engine's fused QKV (whose
        views the diffusers layers were) goes stale and would keep the old device's copy alive: it is
        dropped and rebuilt on next use. A quantized engine shares modules (not views) with the diffusers
        tree and moves with it; it cannot be rebuilt from the quantized tree, so it is kept.
        """
        transformer = getattr(self, "transformer", None)
        fill = transformer.__dict__.get(_FILL_ATTR) if transformer is not None else None
        if fill is None or fill.quant_plan is None:
            self._drop_fill_transformer()

    def engine_transformer(self) -> FillTransformer:
        """The engine transformer for ``self.transformer`` under the current configuration, built,
        quantized and compiled on first use for the device the transformer runs on."""
        return self.fill_transformer

    @property
    def fill_transformer(self) -> FillTransformer:
        """The engine transformer for the current ``self.transformer`` (built on first use)."""
        fill = self.transformer.__dict__.get(_FILL_ATTR)
        if fill is not None and fill.quant_plan is not None and not fill.is_in_sync():
            raise ValueError(
                "the quantized engine transformer no longer matches pipe.transformer (its layers were "
                "replaced or cast after quantization); load the model again and configure it once"
            )
        if fill is None or not fill.is_in_sync():
            self._drop_fill_transformer()  # release the stale one before building the new one
            if any(p.device.type == "meta" for p in self.transformer.parameters()):
                raise ValueError(
                    "the transformer's weights are not materialised (sequential CPU offload?); "
                    "fluxfill-engine supports enable_model_cpu_offload(), not sequential offload"
                )
            config = self._engine_config
            fill = FillTransformer.from_diffusers(self.transformer, config.attention, config.fused_kernels)
            self.transformer.__dict__[_FILL_ATTR] = fill  # a plain attribute: not a registered submodule
        if self._engine_config.quant != "none" and fill.quant_plan is None:
            config = self._engine_config
            plan = resolve(config.quant, config.quant_backend, self._transformer_execution_device)
            self._record_weight_bytes("transformer")
            fill.quantize(plan)
        config = self._engine_config
        device = self._transformer_execution_device
        fill.set_compile((config.compile_mode, config.compile_dynamic) if config.compile else None, device)
        fill.set_attention(config.attention, config.fused_kernels, device)
        return fill

    @property
    def _transformer_execution_device(self) -> torch.device:
        """Where the transformer runs: its offload hook's device under model CPU offload, else its own."""
        hook = getattr(self.transformer, "_hf_hook", None)
        device = getattr(hook, "execution_device", None)
        return torch.device(device) if device is not None else self.transformer.device

    def _drop_fill_transformer(self) -> None:
        transformer = getattr(self, "transformer", None)
        if transformer is not None:
            transformer.__dict__.pop(_FILL_ATTR, None)

    # ---- text --------------------------------------------------------------------------------------

    def encode_prompt(
        self,
        prompt: str | list[str],
        prompt_2: str | list[str] | None = None,
        device: torch.device | None = None,
        num_images_per_prompt: int = 1,
        prompt_embeds: torch.FloatTensor | None = None,
        pooled_prompt_embeds: torch.FloatTensor | None = None,
        max_sequence_length: int = 512,
        lora_scale: float | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Encode prompts: ``(prompt_embeds [B*n, S, 4096], pooled [B*n, 768], text_ids [S, 3])``.

        Same contract as diffusers'. Repeated prompts are served from :attr:`prompt_cache`.
        """
        device = device or self._execution_device
        uses_peft = USE_PEFT_BACKEND and lora_scale is not None
        if uses_peft:
            self._lora_scale = lora_scale
            for encoder in (self.text_encoder, self.text_encoder_2):
                if encoder is not None:
                    scale_lora_layers(encoder, lora_scale)
        try:
            if prompt_embeds is None:
                prompts = [prompt] if isinstance(prompt, str) else list(prompt)
                prompts_2 = prompt_2 or prompts
                prompts_2 = [prompts_2] if isinstance(prompts_2, str) else list(prompts_2)
                prompt_embeds, pooled_prompt_embeds = self._encode_cached(
                    prompts, prompts_2, device, max_sequence_length, lora_scale
                )
                prompt_embeds = prompt_embeds.repeat_interleave(num_images_per_prompt, dim=0)
                pooled_prompt_embeds = pooled_prompt_embeds.repeat_interleave(num_images_per_prompt, dim=0)
        finally:
            if uses_peft:
                for encoder in (self.text_encoder, self.text_encoder_2):
                    if encoder is not None:
                        unscale_lora_layers(encoder, lora_scale)
        dtype = self.text_encoder.dtype if self.text_encoder is not None else self.transformer.dtype
        text_ids = torch.zeros(prompt_embeds.shape[1], 3).to(device=device, dtype=dtype)
        return prompt_embeds, pooled_prompt_embeds, text_ids

    def _encode_cached(
        self,
        prompts: list[str],
        prompts_2: list[str],
        device: torch.device,
        max_sequence_length: int,
        lora_scale: float | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        prompts = self.maybe_convert_prompt(prompts, self.tokenizer)
        prompts_2 = self.maybe_convert_prompt(prompts_2, self.tokenizer_2)
        adapters = any(getattr(e, "peft_config", None) for e in (self.text_encoder, self.text_encoder_2))
        key = (
            tuple(prompts),
            tuple(prompts_2),
            max_sequence_length,
            str(device),
            lora_scale,
            len(self.tokenizer),
            len(self.tokenizer_2),
            weights_fingerprint(self.text_encoder),
            weights_fingerprint(self.text_encoder_2),
        )
        cached = None if adapters else self.prompt_cache.get(key)
        if cached is not None:
            return cached
        pooled = clip_pooled_embeds(self.tokenizer, self.text_encoder, prompts, device)
        embeds = t5_embeds(self.tokenizer_2, self.text_encoder_2, prompts_2, max_sequence_length, device)
        if not adapters:
            self.prompt_cache.put(key, (embeds, pooled))
        return embeds, pooled

    # ---- validation --------------------------------------------------------------------------------

    def _check_engine_inputs(
        self,
        *,
        prompt: Any,
        image: Any,
        mask_image: Any,
        masked_image_latents: Any,
        height: Any,
        width: Any,
        num_inference_steps: Any,
        sigmas: Any,
        guidance_scale: Any,
        num_images_per_prompt: Any,
        generator: Any,
        latents: Any,
        prompt_embeds: Any,
        pooled_prompt_embeds: Any,
        output_type: Any,
        joint_attention_kwargs: Any,
        callback_on_step_end: Any,
        max_sequence_length: Any,
    ) -> tuple[Any, Any]:
        """Checks diffusers does not make. Returns ``(image, mask_image)`` with paths opened."""
        for name, value in (("height", height), ("width", width)):
            if not _is_int(value) or value <= 0:
                raise ValueError(f"`{name}` must be a positive int, got {value!r}")
            if value < self.vae_scale_factor * 2:
                raise ValueError(f"`{name}` must be at least {self.vae_scale_factor * 2} pixels, got {value}")
        if not _is_int(num_inference_steps) or num_inference_steps < 1:
            raise ValueError(f"`num_inference_steps` must be an int >= 1, got {num_inference_steps!r}")
        if sigmas is not None:
            values = np.asarray(sigmas, dtype=np.float64) if len(sigmas) else np.zeros(0)
            if values.ndim != 1 or values.size == 0 or not np.all((values > 0) & (values <= 1)):
                raise ValueError(
                    f"`sigmas` must be a non-empty 1-D sequence of values in (0, 1], got {sigmas!r}"
                )
        if not is_finite_number(guidance_scale):
            raise ValueError(f"`guidance_scale` must be a finite number, got {guidance_scale!r}")
        if not _is_int(num_images_per_prompt) or num_images_per_prompt < 1:
            raise ValueError(f"`num_images_per_prompt` must be an int >= 1, got {num_images_per_prompt!r}")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"`output_type` must be one of {list(OUTPUT_TYPES)}, got {output_type!r}")
        if not _is_int(max_sequence_length) or not 1 <= max_sequence_length <= 512:
            raise ValueError(f"`max_sequence_length` must be an int in [1, 512], got {max_sequence_length!r}")
        if callback_on_step_end is not None and not callable(callback_on_step_end):
            raise TypeError("`callback_on_step_end` must be callable")
        extra_kwargs = sorted(set(joint_attention_kwargs or {}) - {"scale"})
        if extra_kwargs:
            raise ValueError(
                f"`joint_attention_kwargs` keys {extra_kwargs} are not supported by fluxfill-engine's "
                "transformer (only 'scale', the LoRA scale, is)"
            )

        if image is None and masked_image_latents is None:
            raise ValueError("`image` and `mask_image` are required (or pass `masked_image_latents`)")
        if image is not None:
            image = load_image_input(image, "image")
            check_image_values(image, "image")
        if mask_image is not None:
            mask_image = bools_to_float(load_image_input(mask_image, "mask_image"))
            check_image_values(mask_image, "mask_image", unit_range=True)

        if isinstance(prompt, str):
            batch = 1
        elif prompt is not None:
            if len(prompt) == 0 or not all(isinstance(p, str) for p in prompt):
                raise ValueError("`prompt` must be a string or a non-empty list of strings")
            batch = len(prompt)
        else:
            if not isinstance(prompt_embeds, torch.Tensor) or prompt_embeds.dim() != 3:
                raise ValueError("`prompt_embeds` must be a tensor [batch, sequence, dim]")
            batch = prompt_embeds.shape[0]
        if prompt_embeds is not None and (
            not isinstance(pooled_prompt_embeds, torch.Tensor)
            or pooled_prompt_embeds.dim() != 2
            or pooled_prompt_embeds.shape[0] != prompt_embeds.shape[0]
        ):
            raise ValueError(
                "`pooled_prompt_embeds` must be a tensor [batch, dim] with the same batch as `prompt_embeds`"
            )
        total = batch * num_images_per_prompt
        if isinstance(generator, list) and len(generator) != total:
            raise ValueError(
                f"`generator` is a list of {len(generator)} generators, but the effective batch size "
                f"(prompts x num_images_per_prompt) is {total}; pass one generator per image"
            )
        seq_len = image_seq_len(height, width, self.vae_scale_factor)
        if latents is not None:
            expected = (total, seq_len, self.transformer.config.out_channels or 64)
            if not isinstance(latents, torch.Tensor) or tuple(latents.shape) != expected:
                shape = tuple(latents.shape) if isinstance(latents, torch.Tensor) else type(latents).__name__
                raise ValueError(f"`latents` must be a packed tensor of shape {expected}, got {shape}")
        if masked_image_latents is not None:
            channels = self.transformer.config.in_channels - (self.transformer.config.out_channels or 64)
            if (
                not isinstance(masked_image_latents, torch.Tensor)
                or masked_image_latents.dim() != 3
                or tuple(masked_image_latents.shape[1:]) != (seq_len, channels)
                or total % masked_image_latents.shape[0] != 0
            ):
                raise ValueError(
                    f"`masked_image_latents` must be the packed conditioning [batch, {seq_len}, {channels}] "
                    f"(masked-image latents + mask) with a batch dividing {total}"
                )
        return image, mask_image

    # ---- the call ----------------------------------------------------------------------------------

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] = None,
        prompt_2: str | list[str] | None = None,
        image: Any = None,
        mask_image: Any = None,
        masked_image_latents: torch.FloatTensor | None = None,
        height: int | None = None,
        width: int | None = None,
        strength: float = 1.0,
        num_inference_steps: int = 50,
        sigmas: list[float] | None = None,
        guidance_scale: float = 30.0,
        num_images_per_prompt: int | None = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.FloatTensor | None = None,
        prompt_embeds: torch.FloatTensor | None = None,
        pooled_prompt_embeds: torch.FloatTensor | None = None,
        output_type: str | None = "pil",
        return_dict: bool = True,
        joint_attention_kwargs: dict[str, Any] | None = None,
        callback_on_step_end: Callable[..., dict[str, Any]] | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ["latents"],  # noqa: B006 (diffusers' signature)
        max_sequence_length: int = 512,
    ) -> FluxPipelineOutput | tuple:
        """Repaint the white part of ``mask_image`` in ``image`` following ``prompt``.

        Arguments, defaults and return values are those of ``diffusers.FluxFillPipeline.__call__``.
        Additionally accepted: image and mask file paths. ``masked_image_latents`` is the packed
        320-channel conditioning ``[B, L, 320]`` and may replace ``image``/``mask_image`` (with
        ``strength=1`` or given ``latents``). Bad input raises ``ValueError``/``TypeError`` (or
        ``FileNotFoundError`` for a missing path) before any work is done.
        """
        return self._generate(
            prompt=prompt,
            prompt_2=prompt_2,
            image=image,
            mask_image=mask_image,
            masked_image_latents=masked_image_latents,
            height=height,
            width=width,
            strength=strength,
            num_inference_steps=num_inference_steps,
            sigmas=sigmas,
            guidance_scale=guidance_scale,
            num_images_per_prompt=num_images_per_prompt,
            generator=generator,
            latents=latents,
            prompt_embeds=prompt_embeds,
            pooled_prompt_embeds=pooled_prompt_embeds,
            output_type=output_type,
            return_dict=return_dict,
            joint_attention_kwargs=joint_attention_kwargs,
            callback_on_step_end=callback_on_step_end,
            callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
            max_sequence_length=max_sequence_length,
        )

    @torch.no_grad()
    def _generate(
        self,
        *,
        prompt: Any,
        prompt_2: Any,
        image: Any,
        mask_image: Any,
        masked_image_latents: torch.Tensor | None,
        height: int | None,
        width: int | None,
        strength: float,
        num_inference_steps: int,
        sigmas: Sequence[float] | None,
        guidance_scale: float,
        num_images_per_prompt: int,
        generator: Any,
        latents: torch.Tensor | None,
        prompt_embeds: torch.Tensor | None,
        pooled_prompt_embeds: torch.Tensor | None,
        output_type: str,
        return_dict: bool,
        joint_attention_kwargs: dict[str, Any] | None,
        callback_on_step_end: Callable[..., dict[str, Any]] | None,
        callback_on_step_end_tensor_inputs: list[str],
        max_sequence_length: int,
        on_stage: StageHook | None = None,
    ) -> FluxPipelineOutput | tuple:
        """The whole request. ``on_stage(name, **info)`` is told when each stage starts and ends."""

        def stage(name: str, **info: Any) -> None:
            if on_stage is not None:
                on_stage(name, **info)

        # 1. Validate everything before touching any state. (0 is rejected, not taken as "default".)
        height = self.default_sample_size * self.vae_scale_factor if height is None else height
        width = self.default_sample_size * self.vae_scale_factor if width is None else width
        if not is_finite_number(strength):
            raise ValueError(f"`strength` must be a number in [0, 1], got {strength!r}")
        self.check_inputs(
            prompt,
            prompt_2,
            strength,
            height,
            width,
            prompt_embeds=prompt_embeds,
            pooled_prompt_embeds=pooled_prompt_embeds,
            callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
            max_sequence_length=max_sequence_length,
            image=image,
            mask_image=mask_image,
            masked_image_latents=masked_image_latents,
        )
        image, mask_image = self._check_engine_inputs(
            prompt=prompt,
            image=image,
            mask_image=mask_image,
            masked_image_latents=masked_image_latents,
            height=height,
            width=width,
            num_inference_steps=num_inference_steps,
            sigmas=sigmas,
            guidance_scale=guidance_scale,
            num_images_per_prompt=num_images_per_prompt,
            generator=generator,
            latents=latents,
            prompt_embeds=prompt_embeds,
            pooled_prompt_embeds=pooled_prompt_embeds,
            output_type=output_type,
            joint_attention_kwargs=joint_attention_kwargs,
            callback_on_step_end=callback_on_step_end,
            max_sequence_length=max_sequence_length,
        )
        multiple = self.vae_scale_factor * 2
        height, width = int(height) // multiple * multiple, int(width) // multiple * multiple
        seq_len = image_seq_len(height, width, self.vae_scale_factor)
        schedule = make_schedule(num_inference_steps, seq_len, self.scheduler.config, sigmas, strength)
        if schedule.num_steps < 1:
            raise ValueError(
                f"`strength`={strength} leaves {schedule.num_steps} of the schedule's steps to run; "
                "raise `strength` or `num_inference_steps` so at least one step runs"
            )
        if image is None and latents is None and schedule.first_sigma != 1.0:
            raise ValueError(
                "without `image`, sampling must start from pure noise: use strength=1 and sigmas starting "
                "at 1.0, or pass `latents`"
            )

        self._guidance_scale = guidance_scale
        self._joint_attention_kwargs = joint_attention_kwargs
        self._interrupt = False
        self._num_timesteps = schedule.num_steps
        device = self._execution_device

        # 2. Text.
        stage("preprocess_start")
        stage("text_encode_start")
        batch = (
            1 if isinstance(prompt, str) else len(prompt) if prompt is not None else prompt_embeds.shape[0]
        )
        total = batch * num_images_per_prompt
        lora_scale = (joint_attention_kwargs or {}).get("scale", None)
        prompt_embeds, pooled_prompt_embeds, text_ids = self.encode_prompt(
            prompt=prompt,
            prompt_2=prompt_2,
            prompt_embeds=prompt_embeds,
            pooled_prompt_embeds=pooled_prompt_embeds,
            device=device,
            num_images_per_prompt=num_images_per_prompt,
            max_sequence_length=max_sequence_length,
            lora_scale=lora_scale,
        )
        if prompt_embeds.shape[0] != total:  # caller-supplied embeddings: one per prompt
            prompt_embeds = prompt_embeds.repeat_interleave(num_images_per_prompt, dim=0)
            pooled_prompt_embeds = pooled_prompt_embeds.repeat_interleave(num_images_per_prompt, dim=0)
        # Caller-supplied embeddings may wait elsewhere (diffusers' offload hooks move a forward's
        # arguments; the engine does not call that forward). No copy when already there.
        prompt_embeds, pooled_prompt_embeds = prompt_embeds.to(device), pooled_prompt_embeds.to(device)
        stage("text_encode_end")

        # 3. Image latents, noise, conditioning. The generator is consumed in diffusers' order:
        # init-image encode, noise, masked-image encode.
        stage("vae_encode_start")
        dtype = prompt_embeds.dtype
        init_image = None
        if image is not None:
            init_image = self.image_processor.preprocess(image, height=height, width=width).to(torch.float32)
        latents, img_ids = self._initial_latents(
            init_image, schedule, total, height, width, dtype, device, generator, latents
        )
        if masked_image_latents is not None:
            cond = repeat_to_batch(
                masked_image_latents.to(device=device, dtype=dtype), total, "masked_image_latents"
            )
        else:
            cond = self._fill_conditioning(
                init_image, mask_image, total, height, width, dtype, device, generator
            )
        stage("vae_encode_end")
        stage("preprocess_end")

        # 4. Denoise.
        fill = self._transformer_for_call()
        guidance = guidance_scale if self.transformer.config.guidance_embeds else None
        timesteps = schedule.timesteps.to(device)
        inputs = fill.prepare(
            cond,
            prompt_embeds,
            pooled_prompt_embeds,
            timesteps,
            guidance,
            text_ids,
            img_ids,
            latents.dtype,
        )
        sigmas_dev = schedule.sigmas.to(device)
        step_dts = sigmas_dev[1:] - sigmas_dev[:-1]
        cache = self._step_cache(schedule.num_steps, cond, height, width)
        stage("denoise_start", num_steps=schedule.num_steps)
        with self.progress_bar(total=schedule.num_steps) as progress_bar:
            for i in range(schedule.num_steps):
                if self.interrupt:
                    continue
                velocity = fill(latents, i, inputs, cache)
                latents = euler_step(latents, velocity, step_dts[i])
                if callback_on_step_end is not None:
                    local_tensors = {"latents": latents, "prompt_embeds": prompt_embeds}
                    callback_kwargs = {k: local_tensors[k] for k in callback_on_step_end_tensor_inputs}
                    callback_outputs = callback_on_step_end(self, i, timesteps[i], callback_kwargs)
                    latents = callback_outputs.pop("latents", latents)
                    new_prompt_embeds = callback_outputs.pop("prompt_embeds", prompt_embeds)
                    if new_prompt_embeds is not prompt_embeds:
                        prompt_embeds = new_prompt_embeds
                        inputs.txt = fill.text_embedding(prompt_embeds)
                progress_bar.update()
                stage("step", step=i, num_steps=schedule.num_steps)
        stage("denoise_end")
        cache_stats = None if cache is None else cache.stats()
        self.last_stats = {
            "num_steps": schedule.num_steps,
            "steps_full": schedule.num_steps if cache is None else cache_stats["steps_full"],
            "steps_cached": 0 if cache is None else cache_stats["steps_cached"],
            "step_cache": cache_stats,
        }
        del fill, inputs  # nothing below needs them: an unquantized engine's fused weights can go
        if getattr(self.transformer, "_hf_hook", None) is not None:
            self._release_unmovable_weights()  # model CPU offload: the hook moves the transformer off

        # 5. Decode.
        stage("decode_start")
        if output_type == "latent":
            images = latents
        else:
            unpacked = unpack_latents(latents, height, width, self.vae_scale_factor)
            unpacked = unpacked / self.vae.config.scaling_factor + self.vae.config.shift_factor
            unpacked = unpacked.to(self.vae.dtype)
            decoded = self.vae.decode(unpacked, return_dict=False)[0]
            images = self.image_processor.postprocess(decoded, output_type=output_type)
        stage("decode_end")
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,)
        return FluxPipelineOutput(images=images)

    def _step_cache(self, num_steps: int, cond: torch.Tensor, height: int, width: int) -> StepCache | None:
        policy = self._engine_config.step_cache_policy
        if policy is None:
            return None
        weights = None
        if policy.mask_aware:
            latent_channels = self.transformer.config.out_channels or 64
            latent_height = 2 * (height // (self.vae_scale_factor * 2))
            latent_width = 2 * (width // (self.vae_scale_factor * 2))
            weights = mask_token_weights(cond[..., latent_channels:], latent_height, latent_width)
        return StepCache(policy, num_steps, weights)

    def _transformer_for_call(self) -> FillTransformer:
        hook = getattr(self.transformer, "_hf_hook", None)
        if hook is not None:
            hook.pre_forward(self.transformer)  # model CPU offload: bring the transformer onto the device
        return self.fill_transformer

    def _vae_encode(self, image: torch.Tensor, generator: Any) -> torch.Tensor:
        return self.vae.encode(image).latent_dist.sample(generator)

    def _shift_and_scale(self, latents: torch.Tensor) -> torch.Tensor:
        return (latents - self.vae.config.shift_factor) * self.vae.config.scaling_factor

    def _initial_latents(
        self,
        init_image: torch.Tensor | None,
        schedule: Schedule,
        total: int,
        height: int,
        width: int,
        dtype: torch.dtype,
        device: torch.device,
        generator: Any,
        latents: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Packed starting latents ``[B, L, 64]`` and the image position ids ``[L, 3]``."""
        channels = self.vae.config.latent_channels
        latent_height = 2 * (height // (self.vae_scale_factor * 2))
        latent_width = 2 * (width // (self.vae_scale_factor * 2))
        img_ids = latent_image_ids(latent_height // 2, latent_width // 2, device, dtype)
        if latents is not None:
            return latents.to(device=device, dtype=dtype), img_ids

        image_latents = None
        if init_image is not None:
            image = init_image.to(device=device, dtype=dtype)
            if image.shape[1] == channels:
                image_latents = image
            elif schedule.first_sigma == 1.0:
                # Pure noise start: the image latents would be multiplied by (1 - 1.0) = 0. Skip the VAE
                # encode but draw the random numbers its sampling would have drawn, in the same order.
                shape = _vae_sample_shape(image, channels, self.vae_scale_factor)
                for rows, gen in self._per_image_generators(shape, generator):
                    randn_tensor(rows, generator=gen, device=self.vae.device, dtype=self.vae.dtype)
            elif isinstance(generator, list):
                image_latents = torch.cat(
                    [self._vae_encode(image[i : i + 1], generator[i]) for i in range(image.shape[0])]
                )
                image_latents = self._shift_and_scale(image_latents)
            else:
                image_latents = self._shift_and_scale(self._vae_encode(image, generator))
            if image_latents is not None:
                image_latents = repeat_to_batch(image_latents, total, "images")
        shape = (total, channels, latent_height, latent_width)
        noise = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        if image_latents is not None:
            noise = noise_latents(image_latents, noise, schedule.sigmas[0].to(device=device, dtype=dtype))
        return pack_latents(noise), img_ids

    @staticmethod
    def _per_image_generators(shape: tuple[int, ...], generator: Any) -> list[tuple[tuple[int, ...], Any]]:
        if isinstance(generator, list):
            return [((1, *shape[1:]), generator[i]) for i in range(shape[0])]
        return [(shape, generator)]

    def _fill_conditioning(
        self,
        init_image: torch.Tensor,
        mask_image: Any,
        total: int,
        height: int,
        width: int,
        dtype: torch.dtype,
        device: torch.device,
        generator: Any,
    ) -> torch.Tensor:
        """The packed 320-channel conditioning: masked-image latents and the 8x8-unshuffled mask."""
        mask = self.mask_processor.preprocess(mask_image, height=height, width=width)
        masked_image = (init_image * (1 - mask)).to(device=device, dtype=dtype)
        if masked_image.shape[1] == self.vae.config.latent_channels:
            masked_latents = masked_image
        else:
            masked_latents = self._vae_encode(masked_image, generator)
        masked_latents = self._shift_and_scale(masked_latents).to(device=device, dtype=dtype)
        masked_latents = repeat_to_batch(masked_latents, total, "images")
        mask = repeat_to_batch(mask, total, "masks").to(device=device, dtype=dtype)
        return fill_conditioning(
            masked_latents, mask, self.vae_scale_factor, self._engine_config.fused_kernels
        )
