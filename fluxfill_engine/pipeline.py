"""Drop-in ``FluxFillPipeline``: diffusers' API, the engine's own sampling loop and transformer.

It subclasses ``diffusers.FluxFillPipeline`` so loading, saving, ``from_pipe``, offloading, progress-bar
settings and the LoRA/textual-inversion mixins keep working. A call is one :class:`~.call.PipelineCall`
through :meth:`FluxFillPipeline.generate`, which reads like the request's data flow: validate, encode the
prompt, prepare latents and the fill conditioning, denoise, decode. Unconfigured, it runs the
``reference`` preset and gives diffusers' images for the same inputs and generator.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import diffusers
import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
from diffusers.pipelines.flux.pipeline_output import FluxPipelineOutput
from transformers import (
    CLIPTextModel,
    CLIPTokenizer,
    T5EncoderModel,
    T5TokenizerFast,  # pyright: ignore[reportAttributeAccessIssue]  (transformers 5: an alias of T5Tokenizer)
)

from .cache import BatchStepCache
from .call import STAGES, ImageInput, PerThread, PipelineCall, PipelineResult, StageHook
from .compilation import load_compile_cache, save_compile_cache
from .conditioning import (
    LatentGrid,
    image_seq_len,
    initial_latents,
    masked_image_conditioning,
    repeat_to_batch,
    soft_mask_processor,
    unpack_latents,
)
from .config import EngineConfig
from .denoiser import DenoiserRouter, describe_path
from .errors import InputError, InputTypeError
from .limits import MAX_CALL_BATCH
from .lora.adapters import AdapterSet
from .lora.spec import LoraSpec
from .model import FillTransformer
from .offload import MemoryPlacement, place_components, uses_memory_plan
from .quantization import quantize_text_encoder as quantize_text_encoder_linears
from .quantization import resolve, weight_bytes
from .runtime import TransformerRuntime, execution_device, runtime_of
from .sampling import Schedule, euler_step, make_schedule
from .stats import LoopStats, PipelineStats
from .text import EncodedPrompt, PromptCache, PromptEncoder, TextComponents
from .timing import StageTimes
from .validation import CheckedCall, ModelShape, check_batch, check_call, check_schedule, check_strength


class FluxFillPipeline(diffusers.FluxFillPipeline):
    """``diffusers.FluxFillPipeline`` with the engine underneath. Same constructor, API and outputs.

    Use :meth:`configure` to switch optimizations on (``pipe.configure(EngineConfig.preset(...))``).
    After a call, :attr:`last_stats` holds that call's stats (see :class:`~.call.PipelineResult`).
    """

    _interrupt = PerThread(False)
    _guidance_scale = PerThread()
    _joint_attention_kwargs = PerThread()
    _num_timesteps = PerThread()
    _current_timestep = PerThread()

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
        self.prompt_encoder = PromptEncoder(self._engine_config.prompt_cache_size)
        self.denoisers = DenoiserRouter()  # which transformer runs a call; the engine's LoRA set
        self.compile_cache: dict[str, Any] | None = None  # what load_compile_cache loaded, if anything
        self.last_stats: PipelineStats | None = None  # the drop-in's convenience: the last call's stats
        self._text_encoder_bytes: int | None = None  # T5's weight bytes before it was quantized
        self.memory_placement: MemoryPlacement | None = None  # set by a memory plan (see .offload)

    # ---- configuration and the engine transformer --------------------------------------------------

    @property
    def engine_config(self) -> EngineConfig:
        return self._engine_config

    @property
    def prompt_cache(self) -> PromptCache:
        """The LRU cache of encoded prompts (``EngineConfig.prompt_cache_size`` entries)."""
        return self.prompt_encoder.cache

    @property
    def runtime(self) -> TransformerRuntime:
        """The lifecycle of the engine transformer of ``self.transformer`` (see :mod:`.runtime`)."""
        return runtime_of(self.transformer)

    def engine_transformer(self) -> FillTransformer:
        """The engine transformer for the current configuration, built, quantized and compiled for the
        device the transformer runs on (under model CPU offload, the offload's execution device)."""
        placement = self.memory_placement
        if placement is None:
            return self.runtime.get(self._engine_config, execution_device(self.transformer))
        fill = self.runtime.get(self._engine_config, placement.device)  # quantized in host memory
        placement.attach(fill)  # block streaming: its blocks' weights come from host memory
        placement.settle()  # quantize_on_cpu: now the quantized weights move
        return fill

    @property
    def _execution_device(self) -> torch.device:
        """Where the pipeline computes: a memory plan's device, else diffusers' answer."""
        placement = getattr(self, "memory_placement", None)
        return super()._execution_device if placement is None else placement.device

    def place(self, config: EngineConfig, device: str | torch.device | None = None) -> MemoryPlacement | None:
        """Put the components where ``config``'s memory fields say, for running on ``device`` (default:
        the current execution device); ``None`` when the configuration keeps everything on the device
        and no plan was placed before (then nothing moves)."""
        if self.memory_placement is None and not uses_memory_plan(config):
            return None
        device = self._execution_device if device is None else torch.device(device)
        placement = self.memory_placement
        wanted = (
            device,
            config.cpu_offload,
            config.text_encoders_on_cpu,
            config.block_streaming,
            config.quantize_on_cpu,
        )
        if placement is not None and placement.key == wanted:
            return placement
        return place_components(self, config, device)

    def configure(self, config: EngineConfig) -> FluxFillPipeline:
        """Apply an :class:`EngineConfig` (returns the pipeline, for chaining)."""
        if not isinstance(config, EngineConfig):
            raise TypeError(f"`config` must be an EngineConfig, got {type(config).__name__}")
        self.runtime.check_change(self._engine_config, config)
        if self._text_encoder_bytes is not None and not config.quantize_text_encoder:
            raise ValueError("the text encoder is already quantized; load the model again to undo it")
        self._engine_config = config
        self.prompt_encoder = PromptEncoder(config.prompt_cache_size)
        dtype = config.torch_dtype
        if dtype is not None and self.transformer.dtype != dtype:
            self.runtime.release()  # a merged LoRA set leaves the weights before they are cast
            self.transformer.to(dtype)
        self.place(config)
        if config.quantize_text_encoder and self._text_encoder_bytes is None:
            plan = resolve(config.text_encoder_quant, "native", self._execution_device)
            self._text_encoder_bytes = weight_bytes([self.text_encoder_2])
            quantize_text_encoder_linears(self.text_encoder_2, plan)
        if config.compile_cache_dir is not None:
            self.compile_cache = load_compile_cache(config.compile_cache_dir)
        if config.quant != "none" or config.compile or config.context_parallel > 1:
            self.engine_transformer()  # quantize/compile/join the ranks now: errors surface here
        if self.memory_placement is not None:
            self.memory_placement.settle()  # quantize_on_cpu: T5 quantized above moves now
        return self

    # ---- the engine's own LoRAs ----------------------------------------------------------------------

    def load_engine_loras(self, loras: Sequence[LoraSpec | dict[str, Any] | str] | None) -> AdapterSet | None:
        """Read and check LoRA files for this model without changing anything (``None`` for none).

        ``loras``: at most ``EngineConfig.max_loras`` items, each a :class:`~.lora.LoraSpec`, a
        ``{"path", "scale"}`` dict or a path. Every format diffusers reads is read (through its
        converters); files are cached (``EngineConfig.lora_cache_size``). Raises ``ValueError`` /
        ``TypeError`` / ``FileNotFoundError`` naming ``loras[i]`` and its path: a missing file, a
        non-finite scale, a file with no LoRA, a LoRA for another model (its layer shapes).
        """
        return self.denoisers.load_loras(self.transformer, self._engine_config, loras)

    def set_engine_loras(
        self, loras: Sequence[LoraSpec | dict[str, Any] | str] | AdapterSet | None
    ) -> AdapterSet | None:
        """Run the following calls with these LoRAs (``None`` or ``[]``: the base model), applied to the
        engine's own layers with ``EngineConfig.lora_strategy``. Unlike diffusers' adapters
        (``load_lora_weights``, which also work here), they work on a quantized or compiled pipeline,
        and switching sets never drifts the base weights. Checked as :meth:`load_engine_loras`."""
        if not isinstance(loras, AdapterSet):
            loras = self.load_engine_loras(loras)
        self.denoisers.engine_loras = loras
        return loras

    def describe(self) -> dict[str, Any]:
        """Which transformer path runs (``engine``, or ``diffusers`` for the features listed) and the
        configuration."""
        return describe_path(self.transformer, self._engine_config)

    def save_compile_cache(self) -> dict[str, Any] | None:
        """Persist this process's compiled artifacts to ``compile_cache_dir`` (after a warm-up)."""
        if self._engine_config.compile_cache_dir is None:
            raise ValueError("EngineConfig.compile_cache_dir is not set")
        return save_compile_cache(self._engine_config.compile_cache_dir)

    def memory_report(self) -> dict[str, dict[str, int]]:
        """Bytes of weights per component, before and after quantization (equal when unquantized)."""
        before = {"transformer": self.runtime.unquantized_bytes, "text_encoder_2": self._text_encoder_bytes}
        report = {}
        for name in ("transformer", "text_encoder", "text_encoder_2", "vae"):
            module = getattr(self, name, None)
            if module is not None:
                now = weight_bytes([module])
                report[name] = {"before": before.get(name) or now, "after": now}
        return report

    def to(self, *args: Any, **kwargs: Any) -> FluxFillPipeline:
        transformer = getattr(self, "transformer", None)
        if transformer is not None:
            self.runtime.release()
        if self.memory_placement is not None:  # everything goes where it is sent: the plan is off
            self.memory_placement.remove()
            self.memory_placement = None
        self.prompt_cache.clear()
        super().to(*args, **kwargs)
        if transformer is not None and transformer.device.type != "cpu":  # offload parks weights on the CPU
            self.runtime.warn_if_quantized_for_another_device(self._engine_config, transformer.device)
        return self

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
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """Encode prompts: ``(prompt_embeds [B*n, S, 4096], pooled [B*n, 768], text_ids [S, 3])``.

        Same contract as diffusers' (given ``prompt_embeds`` come back as they are, with the given
        pooled embeddings). Repeated prompts are served from :attr:`prompt_cache`.
        """
        device = device or self._execution_device
        if prompt_embeds is not None:
            return prompt_embeds, pooled_prompt_embeds, self._text_ids(prompt_embeds, device)
        scale = None if lora_scale is None else {"scale": lora_scale}
        call = PipelineCall(
            prompt=prompt,
            prompt_2=prompt_2,
            max_sequence_length=max_sequence_length,
            joint_attention_kwargs=scale,
        )
        encoded = self._encode_prompts(call, device)
        embeds = encoded.prompt_embeds.repeat_interleave(num_images_per_prompt, dim=0)
        pooled = encoded.pooled_prompt_embeds.repeat_interleave(num_images_per_prompt, dim=0)
        return embeds, pooled, self._text_ids(embeds, device)

    def _encode_prompts(self, call: PipelineCall, device: torch.device) -> EncodedPrompt:
        """The call's prompts through the prompt encoder, with this pipeline's text components."""
        text = TextComponents(
            self.tokenizer,
            self.text_encoder,
            self.tokenizer_2,
            self.text_encoder_2,
            self.maybe_convert_prompt,
        )
        encoded = self.prompt_encoder.encode(text, call, device)
        if encoded.lora_scale is not None:
            self._lora_scale = encoded.lora_scale  # what diffusers' encode_prompt leaves for its LoRA mixin
        return encoded

    def _text_ids(self, prompt_embeds: torch.Tensor, device: torch.device) -> torch.Tensor:
        dtype = self.text_encoder.dtype if self.text_encoder is not None else self.transformer.dtype
        return torch.zeros(prompt_embeds.shape[1], 3).to(device=device, dtype=dtype)

    # ---- the call ----------------------------------------------------------------------------------

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        prompt_2: str | list[str] | None = None,
        image: ImageInput = None,
        mask_image: ImageInput = None,
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
        # Every argument but return_dict is a PipelineCall field of the same name (a test keeps it so).
        arguments = {name: value for name, value in locals().items() if name not in ("self", "return_dict")}
        result = self.generate(PipelineCall(**arguments))
        self.last_stats = result.stats
        return FluxPipelineOutput(images=result.images) if return_dict else (result.images,)

    @torch.no_grad()
    def generate(
        self, call: PipelineCall, on_stage: StageHook | None = None, soft_mask: bool = False
    ) -> PipelineResult:
        """Run one call: validate, encode the prompt, prepare latents and the fill conditioning,
        denoise, decode. ``on_stage`` is told when each stage starts and ends and after every step.
        ``soft_mask``: grey mask levels reach the conditioning instead of diffusers' 0.5 threshold."""
        return self.generate_batch([call], on_stage, soft_mask)[0]

    @torch.no_grad()
    def generate_batch(
        self, calls: Sequence[PipelineCall], on_stage: StageHook | None = None, soft_mask: bool = False
    ) -> list[PipelineResult]:
        """Run several calls as one pass of the transformer (batch = all their images); one result each.

        Each call is prepared exactly as alone (its prompt through the cache; its generator consumed in
        diffusers' order: init-image encode, noise, masked-image encode), the latents and conditioning
        are concatenated and denoised together, and each call's latents are decoded on their own, so a
        call's images are those it gives alone up to the GEMMs' rounding for another batch size: on a
        CPU in fp32 the token-level layers are bit-equal and the per-sample ones (modulation, time and
        text embedders, where M = batch) differ by ~1e-6 (tested). The calls must share what the loop
        reads (:func:`~.validation.check_batch`). Every call is validated before any stage; the stages (and their
        timings) are the batch's, shared.
        """
        calls = [] if isinstance(calls, PipelineCall) else list(calls)
        if not calls:
            raise InputError("`calls` must be a non-empty sequence of PipelineCall objects", "calls")
        checked = [self._validated(call) for call in calls]
        check_batch(checked)
        scale = self.vae_scale_factor
        grids = [LatentGrid(c.total, c.height, c.width, scale) for c in checked]
        grid = LatentGrid(sum(g.batch for g in grids), grids[0].height, grids[0].width, scale)
        if grid.batch > MAX_CALL_BATCH:
            raise InputError(f"{grid.batch} images in one batch of calls; at most {MAX_CALL_BATCH}", "calls")
        seq_len = image_seq_len(grid.height, grid.width, scale)
        lead = calls[0]
        schedule = make_schedule(
            lead.num_inference_steps, seq_len, self.scheduler.config, lead.sigmas, lead.strength
        )
        for one in checked:
            check_schedule(schedule, one)

        # diffusers' properties, read by step callbacks (pipe.guidance_scale, pipe.interrupt, ...).
        self._guidance_scale = lead.guidance_scale
        self._joint_attention_kwargs = lead.joint_attention_kwargs
        self._interrupt = False
        self._num_timesteps = schedule.num_steps
        device = self._execution_device
        times = StageTimes(device)

        def stage(name: str, step: int | None = None, total: int | None = None) -> None:
            if name != "step":
                times.mark(name)
            if on_stage is not None:
                on_stage(name, step=step, total=total)

        stage("total_start")
        stage("preprocess_start")
        stage("text_encode_start")
        texts = [self._prompt_embeddings(call, device) for call in calls]
        prompt_embeds = _cat([text[0] for text in texts], "prompt_embeds")
        pooled_prompt_embeds = _cat([text[1] for text in texts], "pooled_prompt_embeds")
        text_ids = self._text_ids(prompt_embeds, device)
        stage("text_encode_end")

        stage("vae_encode_start")
        dtype = prompt_embeds.dtype
        prepared = [
            self._call_latents(one, part, schedule, dtype, device, soft_mask)
            for one, part in zip(checked, grids, strict=True)
        ]
        latents, img_ids = _cat([p[0] for p in prepared], "latents"), prepared[0][1]
        cond = _cat([p[2] for p in prepared], "masked_image_latents")
        stage("vae_encode_end")
        stage("preprocess_end")

        stage("denoise_start")
        latents, step_stats = self._denoise(
            lead,
            schedule,
            latents,
            cond,
            prompt_embeds,
            pooled_prompt_embeds,
            text_ids,
            img_ids,
            grid,
            stage,
            [g.batch for g in grids],
        )
        stage("denoise_end")

        stage("decode_start")
        parts = list(latents.split([g.batch for g in grids]))
        images = [
            self._decode(part, g, c.output_type) for part, g, c in zip(parts, grids, calls, strict=True)
        ]
        stage("decode_end")
        stage("total_end")
        self.maybe_free_model_hooks()
        timings = times.durations((*STAGES, "total"))
        results = []
        for call_images, part, text, steps in zip(images, parts, texts, step_stats, strict=True):
            stats: PipelineStats = {
                "width": grid.width,
                "height": grid.height,
                "image_seq_len": seq_len,
                **steps,
                "prompt_cache_hit": text[2],
            }
            results.append(PipelineResult(call_images, part, stats, dict(timings)))
        return results

    def _prompt_embeddings(
        self, call: PipelineCall, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor, bool | None]:
        """One call's prompt embeddings, one per image, and whether the prompt cache served them."""
        prompt_embeds, pooled_prompt_embeds, cache_hit = call.prompt_embeds, call.pooled_prompt_embeds, None
        if prompt_embeds is None:
            encoded = self._encode_prompts(call, device)
            prompt_embeds, pooled_prompt_embeds = encoded.prompt_embeds, encoded.pooled_prompt_embeds
            cache_hit = encoded.cache_hit
        elif pooled_prompt_embeds is None:  # check_call refuses this before any work
            raise InputError(
                "`pooled_prompt_embeds` must be given with `prompt_embeds`", "pooled_prompt_embeds"
            )
        # One per prompt -> one per image. Given embeddings may wait on another device (offload hooks
        # move a forward's arguments; the engine calls no such forward): no copy when already there.
        repeats = call.num_images_per_prompt
        prompt_embeds = prompt_embeds.repeat_interleave(repeats, dim=0).to(device)
        pooled_prompt_embeds = pooled_prompt_embeds.repeat_interleave(repeats, dim=0).to(device)
        return prompt_embeds, pooled_prompt_embeds, cache_hit

    def _call_latents(
        self,
        checked: CheckedCall,
        grid: LatentGrid,
        schedule: Schedule,
        dtype: torch.dtype,
        device: torch.device,
        soft_mask: bool,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One call's starting latents, image ids and 320-channel conditioning. The generator is
        consumed in diffusers' order: init-image encode, noise, masked-image encode."""
        call = checked.call
        init_image = None
        if checked.image is not None:
            init_image = self.image_processor.preprocess(checked.image, height=grid.height, width=grid.width)
            init_image = init_image.to(torch.float32)
        latents, img_ids = initial_latents(
            self.vae, init_image, schedule, grid, dtype, device, call.generator, call.latents
        )
        if call.masked_image_latents is not None:
            given = call.masked_image_latents.to(device=device, dtype=dtype)
            return latents, img_ids, repeat_to_batch(given, grid.batch, "masked_image_latents")
        if init_image is None:  # check_call refuses this before any work
            raise InputError(
                "`image` and `mask_image` are required (or pass `masked_image_latents`)", "image"
            )
        processor = soft_mask_processor(self.mask_processor) if soft_mask else self.mask_processor
        mask = processor.preprocess(checked.mask_image, height=grid.height, width=grid.width)
        fused = self._engine_config.fused_kernels
        cond = masked_image_conditioning(
            self.vae, init_image, mask, grid, dtype, device, call.generator, fused
        )
        return latents, img_ids, cond

    def _validated(self, call: PipelineCall) -> CheckedCall:
        """The engine's checks (types, ranges, images read as a viewer shows them), then diffusers' own
        (its messages for the rest). 0 is rejected, not taken as a default."""
        default = self.default_sample_size * self.vae_scale_factor
        height = default if call.height is None else call.height
        width = default if call.width is None else call.width
        check_strength(call.strength)
        # diffusers' and the engine's LoRAs at once: refused before any work
        self.denoisers.lora_set_for(self.transformer, self._engine_config, call)
        model = ModelShape.of(self.transformer.config, self.vae_scale_factor)
        checked = check_call(call, height, width, model, self._engine_config.max_input_megapixels)
        self.check_inputs(
            call.prompt,
            call.prompt_2,
            call.strength,
            height,
            width,
            prompt_embeds=call.prompt_embeds,
            pooled_prompt_embeds=call.pooled_prompt_embeds,
            callback_on_step_end_tensor_inputs=call.callback_on_step_end_tensor_inputs,
            max_sequence_length=call.max_sequence_length,
            image=call.image,
            mask_image=call.mask_image,
            masked_image_latents=call.masked_image_latents,
        )
        return checked

    def _denoise(
        self,
        call: PipelineCall,
        schedule: Schedule,
        latents: torch.Tensor,
        cond: torch.Tensor,
        prompt_embeds: torch.Tensor,
        pooled_prompt_embeds: torch.Tensor,
        text_ids: torch.Tensor,
        img_ids: torch.Tensor,
        grid: LatentGrid,
        stage: StageHook,
        sizes: Sequence[int],
    ) -> tuple[torch.Tensor, list[LoopStats]]:
        """The Euler loop over the schedule; returns the final latents and each call's step statistics
        (``sizes``: each call's images, in batch order; with the step cache each call decides its own
        steps, as alone)."""
        hook = getattr(self.transformer, "_hf_hook", None)
        if hook is not None:
            hook.pre_forward(self.transformer)  # model CPU offload: bring the transformer onto the device
        fill, lora_stats = self.denoisers.choose(self.transformer, self._engine_config, call)
        if self.memory_placement is not None and isinstance(fill, FillTransformer):
            self.memory_placement.attach(fill)  # an engine transformer rebuilt since configure streams too
        device = latents.device
        guidance = call.guidance_scale if self.transformer.config.guidance_embeds else None
        timesteps = schedule.timesteps.to(device)
        inputs = fill.prepare(
            cond, prompt_embeds, pooled_prompt_embeds, timesteps, guidance, text_ids, img_ids, latents.dtype
        )
        sigmas = schedule.sigmas.to(device)
        step_dts = sigmas[1:] - sigmas[:-1]
        policy = self._engine_config.step_cache_policy
        noise_channels = self.transformer.config.out_channels or 64
        cache = (
            None
            if policy is None
            else BatchStepCache.for_requests(policy, schedule.num_steps, cond, noise_channels, grid, sizes)
        )
        callback = call.callback_on_step_end
        progress: Any = self.progress_bar  # torch.compiler.disable hides its signature from type checkers
        with progress(total=schedule.num_steps) as progress_bar:
            for i in range(schedule.num_steps):
                if self.interrupt:
                    continue
                latents = euler_step(latents, fill(latents, i, inputs, cache), step_dts[i])
                if callback is not None:
                    local_tensors = {"latents": latents, "prompt_embeds": prompt_embeds}
                    kwargs = {name: local_tensors[name] for name in call.callback_on_step_end_tensor_inputs}
                    outputs = callback(self, i, timesteps[i], kwargs)
                    if not isinstance(outputs, dict):
                        raise InputTypeError(
                            f"`callback_on_step_end` must return a dict (of the tensors it changed), got "
                            f"{type(outputs).__name__} at step {i}",
                            "callback_on_step_end",
                        )
                    latents = outputs.pop("latents", latents)
                    if not torch.isfinite(latents).all():
                        raise InputError(
                            f"`callback_on_step_end` left non-finite latents at step {i}",
                            "callback_on_step_end",
                        )
                    new_prompt_embeds = outputs.pop("prompt_embeds", prompt_embeds)
                    if new_prompt_embeds is not prompt_embeds:
                        prompt_embeds = new_prompt_embeds
                        inputs.txt = fill.text_embedding(prompt_embeds)
                progress_bar.update()
                stage("step", step=i, total=schedule.num_steps)
        cache_stats = [None] * len(sizes) if cache is None else cache.stats_per_request()
        stats: list[LoopStats] = [
            {
                "num_steps": schedule.num_steps,
                "steps_full": schedule.num_steps if one is None else one["steps_full"],
                "steps_cached": 0 if one is None else one["steps_cached"],
                "step_cache": one,
                "loras": lora_stats,
            }
            for one in cache_stats
        ]
        del fill, inputs  # nothing below needs them: an unquantized engine's fused weights can go
        if hook is not None:
            self.runtime.release()  # model CPU offload: the hook moves the transformer off
        return latents, stats

    def _decode(self, latents: torch.Tensor, grid: LatentGrid, output_type: str) -> Any:
        if output_type == "latent":
            return latents
        unpacked = unpack_latents(latents, grid.height, grid.width, self.vae_scale_factor)
        unpacked = unpacked / self.vae.config.scaling_factor + self.vae.config.shift_factor
        decoded = self.vae.decode(unpacked.to(self.vae.dtype), return_dict=False)[0]
        return self.image_processor.postprocess(decoded, output_type=output_type)


def _cat(tensors: Sequence[torch.Tensor], name: str) -> torch.Tensor:
    """The calls' tensors along the batch; one call's as it is."""
    if len(tensors) == 1:
        return tensors[0]
    shapes = {tuple(t.shape[1:]) for t in tensors}
    if len(shapes) > 1:
        raise InputError(
            f"`{name}` of the calls in one batch have different shapes {sorted(shapes)}", "calls"
        )
    return torch.cat(list(tensors))
