"""The stats a call reports, as typed dicts (plain dicts at run time, so they serialize as they are).

:class:`PipelineStats` is ``PipelineResult.stats`` (and the drop-in's ``pipe.last_stats``);
:class:`FillStats` is ``FillResult.stats``: the pipeline's, plus the request as it ran. No torch here.
"""

from __future__ import annotations

from typing import Any, TypedDict


class StepCacheStats(TypedDict):
    """One request's step-cache record (:meth:`~.cache.StepCache.stats`)."""

    steps_full: int
    steps_cached: int
    rel_l1: list[float | None]  # per step; ``None`` before a reference residual exists
    cached: list[bool]  # per step: whether the remaining blocks were skipped
    threshold: float
    mask_aware: bool


class AdapterStats(TypedDict, total=False):
    """One LoRA of the running set; ``cached``, ``load_seconds`` and ``ignored`` only for files."""

    name: str  # the file's path, or diffusers' adapter name
    scale: float
    rank: int
    layers: int
    cached: bool  # the file came from the LoRA cache
    load_seconds: float  # 0.0 when cached
    ignored: list[str]  # parts of the file the engine does not apply (text encoders)


class LoraSwitch(TypedDict):
    """What making a set the running one did (:meth:`~.lora.apply.LoraController.apply`)."""

    switched: bool  # ``False``: the same set was already running
    switch_seconds: float
    strategy: str | None  # ``merge`` or ``side``; ``None`` on the base model
    layers: int | None  # layers touched; ``None`` when nothing switched


class LoraStats(TypedDict, total=False):
    """The LoRAs of a call: the :class:`LoraSwitch` record and the set's adapters; empty when diffusers'
    own forward ran the call (it applies its adapters itself)."""

    source: str | None  # ``request`` (files), ``diffusers`` (peft adapters) or ``None`` (no LoRA)
    adapters: list[AdapterStats]
    load_seconds: float  # the files' read time (0.0 when all were cached)
    switched: bool
    switch_seconds: float
    strategy: str | None
    layers: int | None


class LoopStats(TypedDict):
    """What one call's sampling loop did."""

    num_steps: int  # steps run (``strength`` may leave fewer than ``num_inference_steps``)
    steps_full: int
    steps_cached: int
    step_cache: StepCacheStats | None  # ``None`` without the step cache
    loras: LoraStats


class PipelineStats(LoopStats):
    """``PipelineResult.stats``: what the transformer saw and what the loop did."""

    width: int
    height: int
    image_seq_len: int
    prompt_cache_hit: bool | None  # ``None`` when the caller passed prompt embeddings


class FillStats(PipelineStats):
    """``FillResult.stats``: the pipeline's stats and the request as it ran."""

    working_size: tuple[int, int]  # (width, height) the model ran at
    output_size: tuple[int, int]  # (width, height) of the returned images
    region: tuple[int, int, int, int]  # (left, top, right, bottom) repainted: the canvas, or the crop
    num_inference_steps: int
    num_images: int
    batch_size: int  # images in the model's pass: ``num_images`` alone, all the requests' in a batch
    batch_requests: int  # requests in the pass (1 alone)
    preset_fields: dict[str, Any]  # ``EngineConfig.describe()``
