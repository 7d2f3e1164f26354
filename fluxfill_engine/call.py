"""One typed request path: a :class:`PipelineCall` goes into ``FluxFillPipeline.generate`` and one
:class:`PipelineResult` comes out. The drop-in's ``__call__``, :class:`~.engine.FluxFillEngine` and the
benchmark all build a call and read a result; nothing comes back through side channels."""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import torch

if TYPE_CHECKING:
    from .stats import PipelineStats

ImageInput = Any  # PIL image, numpy array, torch tensor, a file path, or a list of those
Generator = torch.Generator | list[torch.Generator] | None
StepCallback = Callable[..., dict[str, Any]]
OUTPUT_TYPES = ("pil", "np", "pt", "latent")
STAGES = ("text_encode", "vae_encode", "denoise", "decode")


@dataclass
class PipelineCall:
    """The arguments of ``diffusers.FluxFillPipeline.__call__`` (same names and defaults), less
    ``return_dict``, which only shapes the drop-in's return value.

    ``image`` and ``mask_image`` may also be file paths; ``masked_image_latents`` is the packed
    320-channel conditioning ``[B, L, 320]`` and may replace them (with ``strength=1`` or ``latents``).
    """

    prompt: str | list[str] | None = None
    prompt_2: str | list[str] | None = None
    image: ImageInput = None
    mask_image: ImageInput = None
    masked_image_latents: torch.Tensor | None = None
    height: int | None = None
    width: int | None = None
    strength: float = 1.0
    num_inference_steps: int = 50
    sigmas: Sequence[float] | None = None
    guidance_scale: float = 30.0
    num_images_per_prompt: int = 1
    generator: Generator = None
    latents: torch.Tensor | None = None
    prompt_embeds: torch.Tensor | None = None
    pooled_prompt_embeds: torch.Tensor | None = None
    output_type: str = "pil"
    joint_attention_kwargs: dict[str, Any] | None = None
    callback_on_step_end: StepCallback | None = None
    callback_on_step_end_tensor_inputs: list[str] = field(default_factory=lambda: ["latents"])
    max_sequence_length: int = 512


@dataclass
class PipelineResult:
    """What one call produced.

    Attributes:
        images: in the call's ``output_type`` (PIL images, ``np`` array, ``pt`` tensor, or the packed
            latents for ``"latent"``).
        latents: the final packed latents ``[B, L, 64]``, before unpacking and decoding.
        stats: :class:`~.stats.PipelineStats`: ``width``, ``height`` (what the transformer saw),
            ``image_seq_len``, ``num_steps``, ``steps_full``, ``steps_cached``, ``step_cache`` (the step
            cache's record, or ``None``), ``loras`` and ``prompt_cache_hit`` (``None`` when the caller
            passed prompt embeddings).
        timings: seconds per stage (:data:`STAGES`) and ``total``; on a GPU measured with CUDA events, so
            nothing waits between stages.
    """

    images: Any
    latents: torch.Tensor
    stats: PipelineStats
    timings: dict[str, float]


class StageHook(Protocol):
    """Told when each stage starts and ends (``"<stage>_start"``, ``"<stage>_end"``, also
    ``"preprocess_start"`` / ``"preprocess_end"`` around text and VAE encoding) and after every sampling
    step (``"step"`` with ``step`` = 0-based index and ``total``)."""

    def __call__(self, name: str, step: int | None = None, total: int | None = None) -> None: ...


class PerThread:
    """diffusers' per-call attributes (``_interrupt``, ``_guidance_scale``, ...), kept per thread: a step
    callback that sets ``pipe._interrupt`` stops its own call, not another thread's on the same pipeline."""

    def __init__(self, default: Any = None) -> None:
        self.default = default

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, pipe: Any, owner: type | None = None) -> Any:
        if pipe is None:
            return self
        return getattr(_thread_state(pipe), self.name, self.default)

    def __set__(self, pipe: Any, value: Any) -> None:
        setattr(_thread_state(pipe), self.name, value)


def _thread_state(owner: Any) -> threading.local:
    state = owner.__dict__.get("_thread_state")
    if state is None:
        state = owner.__dict__.setdefault("_thread_state", threading.local())
    return state
