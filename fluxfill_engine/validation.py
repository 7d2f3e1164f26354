"""Input checks: the primitives every check uses (ints, numbers, text, tensors, image values) and the
drop-in call's checks (:func:`check_call`, :func:`check_schedule`, :func:`check_batch` for calls run as
one batch). A :class:`~.request.FillRequest` is checked in :mod:`.request`, with these.

Checks run before any work and raise :class:`~.errors.InputError` (a ``ValueError``;
:class:`~.errors.InputTypeError` is also a ``TypeError``, :class:`~.errors.InputFileNotFound` a
``FileNotFoundError``) with ``field`` set to the parameter and a message saying what is allowed, so a
refused request changes nothing.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .call import OUTPUT_TYPES, ImageInput, PipelineCall
from .conditioning import image_seq_len
from .errors import InputError, InputTypeError
from .images import bools_to_float, check_mask_fits_image, load_image_input
from .limits import (
    MAX_CALL_BATCH,
    MAX_CALL_SIDE,
    MAX_CALL_STEPS,
    MAX_INPUT_MEGAPIXELS,
    MAX_PROMPT_CHARS,
)

if TYPE_CHECKING:
    from .sampling import Schedule


def is_int(value: Any) -> bool:
    """A Python or numpy integer, not a bool."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def is_finite_number(value: Any) -> bool:
    """A real, finite number (Python or numpy scalar; not a bool)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def check_int_range(name: str, value: Any, low: int, high: int, field: str | None = None) -> None:
    """``value`` is an int in ``[low, high]``; the error's field is ``field`` (default ``name``)."""
    if not is_int(value) or not low <= value <= high:
        raise InputError(f"`{name}` must be an int in [{low}, {high}], got {value!r}", field or name)


def check_text(name: str, text: str) -> None:
    """A prompt must be encodable text of at most :data:`MAX_PROMPT_CHARS` characters."""
    if len(text) > MAX_PROMPT_CHARS:
        raise InputError(
            f"`{name}` has {len(text)} characters; at most {MAX_PROMPT_CHARS} are accepted", name
        )
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise InputError(
            f"`{name}` is not valid text: character {err.start} is {text[err.start]!r}, a lone surrogate "
            "(undecodable bytes?); pass UTF-8 text",
            name,
        ) from None


def check_finite_tensor(name: str, value: Any) -> None:
    if isinstance(value, torch.Tensor) and value.is_floating_point() and not torch.isfinite(value).all():
        raise InputError(f"`{name}` contains NaN or infinite values", name)


def _arrays(value: ImageInput) -> list[np.ndarray | torch.Tensor]:
    items = value if isinstance(value, list) else [value]
    return [item for item in items if isinstance(item, (np.ndarray, torch.Tensor))]


def check_image_values(value: ImageInput, name: str, unit_range: bool = False) -> None:
    """Reject non-finite values (and, with ``unit_range``, values outside [0, 1]) in array inputs."""
    for array in _arrays(value):
        tensor = torch.as_tensor(array)
        if tensor.dtype == torch.bool or not tensor.is_floating_point():
            tensor = tensor.to(torch.float32)
        if tensor.numel() == 0:
            raise InputError(f"`{name}` is empty (shape {tuple(tensor.shape)})", name)
        if not torch.isfinite(tensor).all():
            raise InputError(f"`{name}` contains NaN or infinite values", name)
        if unit_range and (tensor.min() < 0 or tensor.max() > 1):
            raise InputError(
                f"`{name}` values must lie in [0, 1] (white = repaint, black = keep); "
                f"got min {tensor.min().item():.4g}, max {tensor.max().item():.4g}",
                name,
            )


# ---- the drop-in's call ----------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelShape:
    """What the checks need to know of the loaded model."""

    vae_scale_factor: int
    in_channels: int
    out_channels: int
    joint_attention_dim: int  # width of the T5 prompt embeddings
    pooled_projection_dim: int  # width of the CLIP pooled embeddings

    @classmethod
    def of(cls, transformer_config: Any, vae_scale_factor: int) -> ModelShape:
        """From a diffusers ``FluxTransformer2DModel.config``."""
        return cls(
            vae_scale_factor=vae_scale_factor,
            in_channels=transformer_config.in_channels,
            out_channels=transformer_config.out_channels or 64,
            joint_attention_dim=transformer_config.joint_attention_dim,
            pooled_projection_dim=transformer_config.pooled_projection_dim,
        )


@dataclass(frozen=True)
class CheckedCall:
    """A call that passed :func:`check_call`: images opened, the size floored to the packing multiple."""

    call: PipelineCall
    image: ImageInput
    mask_image: ImageInput
    height: int
    width: int
    total: int  # prompts x num_images_per_prompt


def check_strength(strength: Any) -> None:
    if not is_finite_number(strength):
        raise InputError(f"`strength` must be a number in [0, 1], got {strength!r}", "strength")


def check_call(
    call: PipelineCall,
    height: Any,
    width: Any,
    model: ModelShape,
    max_megapixels: float = MAX_INPUT_MEGAPIXELS,
) -> CheckedCall:
    """The checks diffusers does not make (``height``/``width`` already defaulted); they run before
    diffusers' own, so a wrong type gets a message naming the parameter, not a deep error."""
    scale = model.vae_scale_factor
    for name, value in (("height", height), ("width", width)):
        if not is_int(value) or value <= 0:
            raise InputError(f"`{name}` must be a positive int, got {value!r}", name)
        if not scale * 2 <= value <= MAX_CALL_SIDE:
            raise InputError(f"`{name}` must be in [{scale * 2}, {MAX_CALL_SIDE}] pixels, got {value}", name)
    steps = call.num_inference_steps
    if not is_int(steps) or not 1 <= steps <= MAX_CALL_STEPS:
        raise InputError(
            f"`num_inference_steps` must be an int in [1, {MAX_CALL_STEPS}], got {steps!r}",
            "num_inference_steps",
        )
    if call.sigmas is not None:
        values = np.asarray(call.sigmas, dtype=np.float64) if len(call.sigmas) else np.zeros(0)
        if values.ndim != 1 or values.size == 0 or not np.all((values > 0) & (values <= 1)):
            raise InputError(
                f"`sigmas` must be a non-empty 1-D sequence of values in (0, 1], got {call.sigmas!r}",
                "sigmas",
            )
    if not is_finite_number(call.guidance_scale):
        raise InputError(
            f"`guidance_scale` must be a finite number, got {call.guidance_scale!r}", "guidance_scale"
        )
    if not is_int(call.num_images_per_prompt) or call.num_images_per_prompt < 1:
        raise InputError(
            f"`num_images_per_prompt` must be an int >= 1, got {call.num_images_per_prompt!r}",
            "num_images_per_prompt",
        )
    if call.output_type not in OUTPUT_TYPES:
        raise InputError(
            f"`output_type` must be one of {list(OUTPUT_TYPES)}, got {call.output_type!r}", "output_type"
        )
    if not is_int(call.max_sequence_length) or not 1 <= call.max_sequence_length <= 512:
        raise InputError(
            f"`max_sequence_length` must be an int in [1, 512], got {call.max_sequence_length!r}",
            "max_sequence_length",
        )
    if call.callback_on_step_end is not None and not callable(call.callback_on_step_end):
        raise InputTypeError("`callback_on_step_end` must be callable", "callback_on_step_end")
    _check_generator(call.generator)
    extra_kwargs = sorted(set(call.joint_attention_kwargs or {}) - {"scale"})
    if extra_kwargs:
        raise InputError(
            f"`joint_attention_kwargs` keys {extra_kwargs} are not supported by fluxfill-engine's "
            "transformer (only 'scale', the LoRA scale, is)",
            "joint_attention_kwargs",
        )

    image, mask_image = call.image, call.mask_image
    if image is None and call.masked_image_latents is None:
        raise InputError("`image` and `mask_image` are required (or pass `masked_image_latents`)", "image")
    if image is not None:
        image = load_image_input(image, "image", max_megapixels=max_megapixels)
        check_image_values(image, "image")
    if mask_image is not None:
        mask_image = load_image_input(mask_image, "mask_image", mask=True, max_megapixels=max_megapixels)
        mask_image = bools_to_float(mask_image)
        check_image_values(mask_image, "mask_image", unit_range=True)
    if image is not None and mask_image is not None:
        check_mask_fits_image(image, mask_image)

    total = _prompt_batch(call, model) * call.num_images_per_prompt
    if total > MAX_CALL_BATCH:
        raise InputError(
            f"prompts x `num_images_per_prompt` = {total} images in one call; at most {MAX_CALL_BATCH}",
            "num_images_per_prompt",
        )
    if isinstance(call.generator, list) and len(call.generator) != total:
        raise InputError(
            f"`generator` is a list of {len(call.generator)} generators, but the effective batch size "
            f"(prompts x num_images_per_prompt) is {total}; pass one generator per image",
            "generator",
        )
    seq_len = image_seq_len(height, width, scale)
    for name in ("latents", "masked_image_latents"):
        check_finite_tensor(name, getattr(call, name))
    latents = call.latents
    if latents is not None:
        expected = (total, seq_len, model.out_channels)
        if not isinstance(latents, torch.Tensor) or tuple(latents.shape) != expected:
            shape = tuple(latents.shape) if isinstance(latents, torch.Tensor) else type(latents).__name__
            raise InputError(f"`latents` must be a packed tensor of shape {expected}, got {shape}", "latents")
    conditioning = call.masked_image_latents
    if conditioning is not None:
        channels = model.in_channels - model.out_channels
        if (
            not isinstance(conditioning, torch.Tensor)
            or conditioning.dim() != 3
            or tuple(conditioning.shape[1:]) != (seq_len, channels)
            or total % conditioning.shape[0] != 0
        ):
            raise InputError(
                f"`masked_image_latents` must be the packed conditioning [batch, {seq_len}, {channels}] "
                f"(masked-image latents + mask) with a batch dividing {total}",
                "masked_image_latents",
            )
    multiple = scale * 2
    return CheckedCall(
        call=call,
        image=image,
        mask_image=mask_image,
        height=int(height) // multiple * multiple,
        width=int(width) // multiple * multiple,
        total=total,
    )


def _check_generator(generator: Any) -> None:
    items = generator if isinstance(generator, list) else [generator]
    if generator is None or all(isinstance(g, torch.Generator) for g in items):
        return
    raise InputTypeError(
        "`generator` must be a torch.Generator, a list of them (one per image) or None, got "
        f"{type(generator).__name__}; for a seed, pass torch.Generator('cpu').manual_seed(seed)",
        "generator",
    )


def _prompts(name: str, value: Any) -> int | None:
    """How many prompts ``value`` holds (``None`` for no prompt), after checking each one."""
    if value is None:
        return None
    prompts = [value] if isinstance(value, str) else value
    if not isinstance(prompts, (list, tuple)) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise InputError(f"`{name}` must be a string or a non-empty list of strings", name)
    for text in prompts:
        check_text(name, text)
    return len(prompts)


def _prompt_batch(call: PipelineCall, model: ModelShape) -> int:
    batch = _prompts("prompt", call.prompt)
    batch_2 = _prompts("prompt_2", call.prompt_2)
    if batch is not None and batch_2 is not None and batch_2 != batch:
        raise InputError(
            f"`prompt_2` holds {batch_2} prompts for {batch} `prompt`s: give one per prompt", "prompt_2"
        )
    embeds, pooled = call.prompt_embeds, call.pooled_prompt_embeds
    if batch is None:
        if not isinstance(embeds, torch.Tensor) or embeds.dim() != 3:
            raise InputError(
                "`prompt_embeds` must be a tensor [batch, sequence, dim]",
                "prompt" if embeds is None else "prompt_embeds",
            )
        batch = embeds.shape[0]
    if embeds is None:
        return batch
    if not isinstance(pooled, torch.Tensor) or pooled.dim() != 2 or pooled.shape[0] != embeds.shape[0]:
        raise InputError(
            "`pooled_prompt_embeds` must be a tensor [batch, dim] with the same batch as `prompt_embeds`",
            "pooled_prompt_embeds",
        )
    if embeds.shape[-1] != model.joint_attention_dim:
        raise InputError(
            f"`prompt_embeds` must be T5 embeddings of width {model.joint_attention_dim}, got width "
            f"{embeds.shape[-1]} (shape {tuple(embeds.shape)})",
            "prompt_embeds",
        )
    if pooled.shape[-1] != model.pooled_projection_dim:
        raise InputError(
            f"`pooled_prompt_embeds` must be CLIP pooled embeddings of width {model.pooled_projection_dim}, "
            f"got width {pooled.shape[-1]}",
            "pooled_prompt_embeds",
        )
    check_finite_tensor("prompt_embeds", embeds)
    check_finite_tensor("pooled_prompt_embeds", pooled)
    return batch


def check_schedule(schedule: Schedule, checked: CheckedCall) -> None:
    """What the schedule leaves to run must be runnable from what was given."""
    if schedule.num_steps < 1:
        raise InputError(
            f"`strength`={checked.call.strength} leaves {schedule.num_steps} of the schedule's steps to "
            "run; raise `strength` or `num_inference_steps` so at least one step runs",
            "strength",
        )
    if checked.image is None and checked.call.latents is None and schedule.first_sigma != 1.0:
        raise InputError(
            "without `image`, sampling must start from pure noise: use strength=1 and sigmas starting "
            "at 1.0, or pass `latents`",
            "strength",
        )


# What the denoising loop reads from a call: calls batched together must agree on it.
_SHARED_FIELDS = (
    "num_inference_steps",
    "sigmas",
    "strength",
    "guidance_scale",
    "joint_attention_kwargs",
    "max_sequence_length",
)


def check_batch(checked: Sequence[CheckedCall]) -> None:
    """Calls run as one batch share the size and every field the loop reads; a step callback sees the
    whole batch's latents, so it is refused with more than one call."""
    first = checked[0]
    for index, one in enumerate(checked[1:], start=1):
        pairs = [("height", one.height, first.height), ("width", one.width, first.width)]
        pairs += [(name, getattr(one.call, name), getattr(first.call, name)) for name in _SHARED_FIELDS]
        for name, value, expected in pairs:
            if not _same(value, expected):
                raise InputError(
                    f"calls[{index}]: `{name}` is {value!r} but calls[0] has {expected!r}; calls run as one "
                    "batch must agree on it",
                    f"calls[{index}].{name}",
                )
    if len(checked) > 1:
        for index, one in enumerate(checked):
            if one.call.callback_on_step_end is not None:
                raise InputError(
                    f"calls[{index}]: `callback_on_step_end` runs only with a single call",
                    f"calls[{index}].callback_on_step_end",
                )


def _same(value: Any, expected: Any) -> bool:
    """Equal values; arrays (``sigmas`` may be one) element by element."""
    if value is None or expected is None:
        return value is expected
    try:
        return bool(value == expected)
    except (TypeError, ValueError, RuntimeError):  # an array's == is elementwise
        as_tensor = torch.as_tensor
        return torch.equal(as_tensor(value, dtype=torch.float64), as_tensor(expected, dtype=torch.float64))
