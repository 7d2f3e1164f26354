"""What a caller of :class:`~.engine.FluxFillEngine` sends and gets back: :class:`FillRequest` and its
checks, :class:`FillResult`, and the lifecycle :class:`Event` objects reported on the way.

A request is checked here, before any work (:meth:`FillRequest.validated`), with the shared checks of
:mod:`.validation` and :mod:`.images`; the engine then frames it (:mod:`.framing`) and runs it as a
:class:`~.call.PipelineCall`.
"""

from __future__ import annotations

import dataclasses
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import PIL.Image

from .errors import InputError, InputTypeError
from .framing import OUTPAINT_SIDES
from .images import check_mask_fits_image, load_image_input, to_pil
from .limits import (
    MAX_CROP_PADDING,
    MAX_GUIDANCE,
    MAX_IMAGES,
    MAX_INPUT_MEGAPIXELS,
    MAX_LORAS,
    MAX_MASK_BLUR,
    MAX_MASK_GROW,
    MAX_OUTPAINT,
    MAX_SEED,
    MAX_SIZE,
    MAX_STEPS,
    MAX_WORKING_MEGAPIXELS,
    MIN_SIZE,
    MIN_WORKING_MEGAPIXELS,
)
from .lora.spec import LoraSpec, check_lora_specs
from .validation import check_image_values, check_int_range, check_text, is_finite_number

if TYPE_CHECKING:
    from .call import ImageInput
    from .stats import FillStats


@dataclass(frozen=True)
class Event:
    """A lifecycle event. ``step`` counts completed steps (1..total) on ``step`` events."""

    type: str
    step: int | None = None
    total: int | None = None
    message: str | None = None
    time: float = field(default_factory=time.perf_counter)


EventHandler = Callable[[Event], None]


@dataclass
class FillRequest:
    """One inpainting request.

    Attributes:
        prompt: what to paint into the masked area.
        image: a PIL image, numpy ``[H, W, C]`` or tensor ``[C, H, W]`` in [0, 1], or a file path; any
            size (see ``max_megapixels``).
        mask: white (1) = repaint, black (0) = keep; any of the image types, converted to one channel
            (the rule is in :mod:`.images`). Optional with ``outpaint``.
        width, height: the output size, 256-1536 each (both or neither); ``None``: the output has the
            input's size (grown by ``outpaint``), whatever it is.
        num_inference_steps: 1-100.
        guidance_scale: the distilled guidance value, finite, 0-100 (FLUX Fill is tuned for 30).
        seed: an int in [0, 2**64); ``None`` picks a random one, reported in the result.
        num_images: 1-8 images for this prompt.
        paste_back: outside the (grown) mask the output is the input's pixels exactly; across the border
            a blend over ``mask_blur`` pixels. ``False``: the model's whole picture (or region).
        mask_grow: dilate the mask by this many pixels (of the output), 0-256, before the model sees it.
        mask_blur: feather the paste-back seam over this many pixels on each side, 0-128.
        soft_mask: grey mask levels reach the model (the masked image is ``image * (1 - mask)`` and the
            mask channels carry the grey values) instead of being thresholded at 0.5.
        max_megapixels: the working resolution when the engine chooses it (no ``width``/``height``, or
            ``crop_to_mask``): about this many megapixels, aspect kept, sides multiples of 16 in
            256-1536. 0.065-2.36; default 1.0, FLUX's training resolution.
        crop_to_mask: repaint only the box around the mask, padded by ``crop_padding`` pixels of context,
            at the working resolution, and stitch it back: a small mask in a large photo costs a
            fraction of the full-frame work and gets more detail.
        crop_padding: context pixels around the mask's box with ``crop_to_mask``, 0-1024.
        outpaint: ``{"left", "top", "right", "bottom"}`` pixels (0-2048 each) to grow the canvas by; the
            new area (and ``mask_grow`` pixels of overlap) is filled, the original kept.
        loras: at most ``EngineConfig.max_loras`` (3) LoRAs, each ``{"path": ..., "scale": ...}`` or a
            :class:`~.lora.LoraSpec`: a local ``.safetensors`` file (any format diffusers reads) or a
            folder holding diffusers' ``pytorch_lora_weights.safetensors``; ``scale`` finite in [-4, 4]
            (default 1). Checked against the model before any work; see :mod:`.lora`.
    """

    prompt: str
    image: ImageInput
    mask: ImageInput | None = None
    width: int | None = None
    height: int | None = None
    num_inference_steps: int = 28
    guidance_scale: float = 30.0
    seed: int | None = None
    num_images: int = 1
    paste_back: bool = True
    mask_grow: int = 0
    mask_blur: int = 0
    soft_mask: bool = False
    max_megapixels: float = 1.0
    crop_to_mask: bool = False
    crop_padding: int = 64
    outpaint: dict[str, int] | None = None
    loras: Sequence[LoraSpec | dict[str, Any]] | None = None

    def validated(
        self, max_input_megapixels: float = MAX_INPUT_MEGAPIXELS, max_loras: int = MAX_LORAS
    ) -> FillRequest:
        """A checked copy: images opened as a viewer shows them, the mask one-channel, the size floored,
        the seed chosen.

        Raises :class:`~.errors.InputError` (a ``ValueError``; ``InputTypeError`` is also a ``TypeError``,
        ``InputFileNotFound`` a ``FileNotFoundError``) with ``field`` set and a message saying what is
        allowed.
        """
        return check_fill_request(self, max_input_megapixels, max_loras)


@dataclass
class FillResult:
    """What a request produced.

    ``timings`` are seconds per stage: ``text_encode``, ``vae_encode``, ``denoise``, ``decode``, ``total``.
    ``stats`` (:class:`~.stats.FillStats`) holds the resolved request (size, steps, image tokens),
    ``prompt_cache_hit``, the step cache's ``steps_full`` / ``steps_cached`` / ``step_cache``, the
    configuration (``preset_fields``), ``loras`` (:class:`~.stats.LoraStats`: the LoRAs applied, the
    strategy, load and switch times), ``batch_size`` (the images of the model's pass: ``num_images``
    alone, all the requests' in :meth:`~.engine.FluxFillEngine.run_batch`) and ``batch_requests``
    (1 alone).
    """

    images: list[PIL.Image.Image]
    seed: int
    timings: dict[str, float]
    stats: FillStats


# ---- checks -------------------------------------------------------------------------------------------------


def _single_image(value: Any, name: str, mode: str, max_megapixels: float) -> Any:
    loaded = load_image_input(value, name, mask=mode == "L", max_megapixels=max_megapixels)
    check_image_values(loaded, name, unit_range=True)
    return to_pil(loaded, name, mode)


def _check_bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise InputTypeError(f"`{name}` must be a bool, got {value!r}", name)


def _check_outpaint(value: Any) -> dict[str, int] | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise InputTypeError(
            f"`outpaint` must be a dict of {list(OUTPAINT_SIDES)} -> pixels, got {value!r}", "outpaint"
        )
    unknown = sorted(set(value) - set(OUTPAINT_SIDES))
    if unknown:
        raise InputError(f"`outpaint` keys must be among {list(OUTPAINT_SIDES)}, got {unknown}", "outpaint")
    for side, pixels in value.items():
        check_int_range(f"outpaint['{side}']", pixels, 0, MAX_OUTPAINT, field=f"outpaint.{side}")
    return {side: int(value.get(side, 0)) for side in OUTPAINT_SIDES}


def check_fill_request(
    request: FillRequest, max_megapixels: float = MAX_INPUT_MEGAPIXELS, max_loras: int = MAX_LORAS
) -> FillRequest:
    """A checked copy of ``request``: images opened as a viewer shows them, the mask one-channel (or
    ``None`` with ``outpaint``), the seed chosen (``None`` draws one), ``loras`` as ``LoraSpec`` objects
    (count and scales checked; the files are read by the engine, which knows the model)."""
    loras = check_lora_specs(request.loras, max_loras)
    if not isinstance(request.prompt, str):
        raise InputTypeError(f"`prompt` must be a string, got {type(request.prompt).__name__}", "prompt")
    check_text("prompt", request.prompt)
    outpaint = _check_outpaint(request.outpaint)
    if request.image is None or (request.mask is None and outpaint is None):
        raise InputError(
            "`image` and `mask` are both required (the mask is optional with `outpaint`)",
            "image" if request.image is None else "mask",
        )
    image = _single_image(request.image, "image", "RGB", max_megapixels)
    mask = None if request.mask is None else _single_image(request.mask, "mask", "L", max_megapixels)
    if mask is not None:
        check_mask_fits_image(image, mask, "mask")
    if (request.width is None) != (request.height is None):
        raise InputError(
            "`width` and `height`: give both (the output size) or neither (the input's size)",
            "height" if request.width is None else "width",  # the one given alone
        )
    if request.width is not None:
        check_int_range("width", request.width, MIN_SIZE, MAX_SIZE)
        check_int_range("height", request.height, MIN_SIZE, MAX_SIZE)
    check_int_range("num_inference_steps", request.num_inference_steps, 1, MAX_STEPS)
    guidance = request.guidance_scale
    if not is_finite_number(guidance) or not 0 <= guidance <= MAX_GUIDANCE:
        raise InputError(
            f"`guidance_scale` must be a finite number in [0, {MAX_GUIDANCE:g}], got {guidance!r}",
            "guidance_scale",
        )
    check_int_range("num_images", request.num_images, 1, MAX_IMAGES)
    for name in ("paste_back", "soft_mask", "crop_to_mask"):
        _check_bool(name, getattr(request, name))
    check_int_range("mask_grow", request.mask_grow, 0, MAX_MASK_GROW)
    check_int_range("mask_blur", request.mask_blur, 0, MAX_MASK_BLUR)
    check_int_range("crop_padding", request.crop_padding, 0, MAX_CROP_PADDING)
    working = request.max_megapixels
    if not is_finite_number(working) or not MIN_WORKING_MEGAPIXELS <= working <= MAX_WORKING_MEGAPIXELS:
        raise InputError(
            f"`max_megapixels` must be a number in [{MIN_WORKING_MEGAPIXELS}, {MAX_WORKING_MEGAPIXELS}] "
            f"(the working resolution), got {working!r}",
            "max_megapixels",
        )
    if outpaint is not None:
        width = image.width + outpaint["left"] + outpaint["right"]
        height = image.height + outpaint["top"] + outpaint["bottom"]
        if width * height > max_megapixels * 1e6:
            raise InputError(
                f"`outpaint` grows the canvas to {width}x{height}, above the limit of {max_megapixels:g} "
                "megapixels (EngineConfig.max_input_megapixels)",
                "outpaint",
            )
    seed = request.seed
    if seed is None:
        seed = secrets.randbits(63)
    else:
        check_int_range("seed", seed, 0, MAX_SEED)
    return dataclasses.replace(
        request,
        image=image,
        mask=mask,
        outpaint=outpaint,
        seed=int(seed),
        max_megapixels=float(working),
        loras=loras,
    )
