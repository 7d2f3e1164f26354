"""Where the model works, and how its result returns to the picture the user gave.

A request's input (any size) becomes a *canvas* (the output: the input, grown by an outpaint margin,
resized when an output size is asked), a *region* of it that the model repaints (the whole canvas, or
the box around the mask with ``crop_to_mask``) and a *working size* at which the transformer sees that
region (about ``max_megapixels``, aspect kept, multiples of 16). The result is resized back to the
region and pasted into the canvas: with ``paste_back`` only inside the (grown) mask, feathered over
``mask_blur`` pixels, so every pixel farther out is exactly the input's.

All sizes here are ``(width, height)`` in pixels; boxes are ``(left, top, right, bottom)``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import PIL.Image
import PIL.ImageFilter

from .limits import MAX_SIZE, MIN_SIZE, SIZE_MULTIPLE

Size = tuple[int, int]
Box = tuple[int, int, int, int]
OUTPAINT_SIDES = ("left", "top", "right", "bottom")
# The working resolution's megapixel is 1024x1024 pixels, as the hosted FLUX APIs count it: 1.0 is the
# resolution FLUX was trained at.
WORKING_MEGAPIXEL = 1024 * 1024
_THRESHOLD = [0] * 128 + [255] * 128  # the point table of an L mask thresholded at half


def working_size(size: Size, max_megapixels: float) -> Size:
    """The transformer's size for a region of ``size``: about ``max_megapixels`` (in units of
    :data:`WORKING_MEGAPIXEL`, so 1.0 is FLUX's 1024x1024), the aspect ratio kept, each side a multiple
    of 16 in [256, 1536] (extreme aspect ratios are clamped, so slightly stretched, and un-stretched
    when the result is resized back)."""
    width, height = size
    scale = math.sqrt(max_megapixels * WORKING_MEGAPIXEL / (width * height))

    def side(value: float) -> int:
        snapped = round(value * scale / SIZE_MULTIPLE) * SIZE_MULTIPLE
        return int(min(max(snapped, MIN_SIZE), MAX_SIZE))

    return side(width), side(height)


def floor_to_multiple(size: Size) -> Size:
    return size[0] // SIZE_MULTIPLE * SIZE_MULTIPLE, size[1] // SIZE_MULTIPLE * SIZE_MULTIPLE


def _window_max(array: np.ndarray, radius: int, axis: int) -> np.ndarray:
    """The maximum over ``[i - radius, i + radius]`` along ``axis`` (edges replicated), in about
    ``log2(radius)`` passes: maxima over windows doubling in width, then two overlapping windows."""
    pad = [(radius, radius) if dim == axis else (0, 0) for dim in range(array.ndim)]
    values = np.moveaxis(np.pad(array, pad, mode="edge"), axis, 0)
    length, window, width = array.shape[axis], 2 * radius + 1, 1
    while width * 2 <= window:  # values[i] = max of `width` entries from i on
        values = np.maximum(values[:-width], values[width:])
        width *= 2
    result = np.maximum(values[:length], values[window - width : window - width + length])
    return np.moveaxis(result, 0, axis)


def grow_mask(mask: PIL.Image.Image, pixels: int) -> PIL.Image.Image:
    """``mask`` dilated by ``pixels`` (a square neighbourhood; grey levels keep their maxima)."""
    if pixels <= 0:
        return mask
    array = _window_max(_window_max(np.asarray(mask), pixels, 0), pixels, 1)
    return PIL.Image.fromarray(np.ascontiguousarray(array), "L")


def paste_alpha(mask: PIL.Image.Image, blur: int) -> np.ndarray:
    """The paste-back weight ``[H, W]`` in [0, 1]: the mask, feathered by a box blur of radius ``blur``
    (a blend over ``blur`` pixels on each side of the border; exactly 0 farther out)."""
    if blur > 0:
        mask = mask.filter(PIL.ImageFilter.BoxBlur(blur))
    return np.asarray(mask, dtype=np.float32) / 255.0


def outpaint_canvas(
    image: PIL.Image.Image, mask: PIL.Image.Image | None, margins: dict[str, int]
) -> tuple[PIL.Image.Image, PIL.Image.Image]:
    """The image grown by ``margins`` and its mask: the new area and the caller's mask, if any (the
    request's ``mask_grow`` then grows both, which repaints a seam of that width into the original).

    The new area is prefilled by extending the image's edge pixels outward. FLUX Fill conditions on
    ``image * (1 - mask)``, so under a binary mask the prefill never reaches the model; it matters only
    where the mask is grey (soft masks, the feathered seam), and there the edge colours blend far better
    than black would.
    """
    return _outpaint_image(image, margins), outpaint_mask(image.size, mask, margins)


def _outpaint_image(image: PIL.Image.Image, margins: dict[str, int]) -> PIL.Image.Image:
    left, top, right, bottom = (margins.get(side, 0) for side in OUTPAINT_SIDES)
    array = np.asarray(image.convert("RGB"))
    extended = np.pad(array, ((top, bottom), (left, right), (0, 0)), mode="edge")
    return PIL.Image.fromarray(extended, "RGB")


def outpaint_mask(image_size: Size, mask: PIL.Image.Image | None, margins: dict[str, int]) -> PIL.Image.Image:
    """:func:`outpaint_canvas`'s mask, from the image's size alone: the new area (255) and ``mask``."""
    left, top, right, bottom = (margins.get(side, 0) for side in OUTPAINT_SIDES)
    width, height = image_size
    new_mask = np.full((height + top + bottom, width + left + right), 255, np.uint8)
    new_mask[top : top + height, left : left + width] = 0
    if mask is not None:
        given = np.asarray(mask.resize((width, height), PIL.Image.Resampling.BILINEAR))
        region = new_mask[top : top + height, left : left + width]
        new_mask[top : top + height, left : left + width] = np.maximum(region, given)
    return PIL.Image.fromarray(new_mask, "L")


def crop_box(mask: PIL.Image.Image, padding: int) -> Box:
    """The box around the mask's non-zero pixels, grown by ``padding`` for context and kept inside the
    image; the whole image when the mask is empty."""
    box = mask.getbbox()
    if box is None:
        return (0, 0, mask.width, mask.height)
    left, top, right, bottom = box
    return (
        max(left - padding, 0),
        max(top - padding, 0),
        min(right + padding, mask.width),
        min(bottom + padding, mask.height),
    )


def resized(image: PIL.Image.Image, size: Size) -> PIL.Image.Image:
    """``image`` at ``size`` (the same object when it already is)."""
    if image.size == tuple(size):
        return image
    resample = PIL.Image.Resampling.BILINEAR if image.mode == "L" else PIL.Image.Resampling.LANCZOS
    return image.resize(size, resample)


@dataclass(frozen=True)
class Frame:
    """One request's geometry: the output canvas, the repainted region in it, the transformer's size."""

    canvas: PIL.Image.Image  # the output's base: input (+ outpaint margin), at the output size
    mask: PIL.Image.Image  # the canvas's mask, grown: what the model repaints (255 = repaint)
    region: Box
    working_size: Size

    @property
    def region_size(self) -> Size:
        left, top, right, bottom = self.region
        return right - left, bottom - top

    def model_inputs(self) -> tuple[PIL.Image.Image, PIL.Image.Image]:
        """The region's image and mask at the working size."""
        image, mask = self.canvas.crop(self.region), self.mask.crop(self.region)
        return resized(image, self.working_size), resized(mask, self.working_size)

    def compose(
        self, generated: Sequence[PIL.Image.Image], paste_back: bool, blur: int
    ) -> list[PIL.Image.Image]:
        """Each of ``generated`` (at the working size) back in the canvas: inside the mask only
        (feathered) with ``paste_back``, else over the whole region. The feathered mask is computed
        once for all of them."""
        left, top, right, bottom = self.region
        whole = self.region == (0, 0, *self.canvas.size)
        blend = None  # with paste_back: the feathered mask and the input, over the region
        if paste_back:
            alpha = paste_alpha(self.mask, blur)[top:bottom, left:right, None]
            blend = alpha, np.asarray(self.canvas.crop(self.region), dtype=np.float32)
        outputs = []
        for picture in generated:
            region = resized(picture.convert("RGB"), self.region_size)
            if not paste_back and whole:
                outputs.append(region)
                continue
            output = self.canvas.copy()
            if blend is not None:
                alpha, original = blend
                blended = original * (1 - alpha) + np.asarray(region, dtype=np.float32) * alpha
                exact = alpha[..., 0] == 0  # outside the feathered mask: the input's pixels, bit for bit
                blended[exact] = original[exact]
                region = PIL.Image.fromarray(np.round(blended).astype(np.uint8), "RGB")
            output.paste(region, (left, top))
            outputs.append(output)
        return outputs


def make_frame(
    image: PIL.Image.Image,
    mask: PIL.Image.Image | None,
    size: Size | None,
    outpaint: dict[str, int] | None,
    mask_grow: int,
    mask_blur: int,
    crop_to_mask: bool,
    crop_padding: int,
    max_megapixels: float,
    soft_mask: bool = False,
) -> Frame:
    """The geometry of one request (see the module docstring); ``size`` is the asked output size.
    Without ``soft_mask`` the mask is thresholded at half (as diffusers does), so what the model
    repaints and what is pasted back are the same pixels."""
    canvas = image
    if outpaint is not None:
        canvas = _outpaint_image(image, outpaint)
    if size is not None:
        canvas = resized(canvas, size)
    mask = canvas_mask(image.size, mask, size, outpaint, soft_mask)
    crop_mask = mask if crop_to_mask else None
    region, working = _placement(
        canvas.size, crop_mask, size, mask_grow, mask_blur, crop_padding, max_megapixels
    )
    return Frame(canvas=canvas, mask=grow_mask(mask, mask_grow), region=region, working_size=working)


def frame_working_size(
    image_size: Size,
    mask: PIL.Image.Image | None,
    size: Size | None,
    outpaint: dict[str, int] | None,
    mask_grow: int,
    mask_blur: int,
    crop_to_mask: bool,
    crop_padding: int,
    max_megapixels: float,
    soft_mask: bool = False,
) -> Size:
    """:func:`make_frame`'s ``working_size`` (same arguments, the image's size for the image) without
    touching the image's pixels: arithmetic on sizes, and with ``crop_to_mask`` the box of the mask
    (resized and thresholded as the frame's, never grown: the grown box is the box grown)."""
    canvas = size or image_size
    if size is None and outpaint is not None:
        left, top, right, bottom = (outpaint.get(side, 0) for side in OUTPAINT_SIDES)
        canvas = (image_size[0] + left + right, image_size[1] + top + bottom)
    crop_mask = canvas_mask(image_size, mask, size, outpaint, soft_mask) if crop_to_mask else None
    return _placement(canvas, crop_mask, size, mask_grow, mask_blur, crop_padding, max_megapixels)[1]


def canvas_mask(
    image_size: Size,
    mask: PIL.Image.Image | None,
    size: Size | None,
    outpaint: dict[str, int] | None,
    soft_mask: bool,
) -> PIL.Image.Image:
    """The mask on the canvas, before ``mask_grow``: at the image's size, grown by the outpaint margin,
    at the output size, thresholded at half unless ``soft_mask``."""
    if mask is not None:
        mask = resized(mask, image_size)
    if outpaint is not None:
        mask = outpaint_mask(image_size, mask, outpaint)
    if mask is None:
        raise ValueError("a mask or outpaint margins are needed")  # FillRequest.validated refuses neither
    if size is not None:
        mask = resized(mask, size)
    if not soft_mask:
        mask = mask.point(_THRESHOLD)
    return mask


def _placement(
    canvas_size: Size,
    crop_mask: PIL.Image.Image | None,
    size: Size | None,
    mask_grow: int,
    mask_blur: int,
    crop_padding: int,
    max_megapixels: float,
) -> tuple[Box, Size]:
    """The region and the working size, from the canvas's size and, with ``crop_to_mask``, the canvas's
    mask before ``mask_grow`` (``crop_mask``; ``None``: the whole canvas): growing by ``g`` grows the
    mask's box by ``g`` (clipped to the canvas)."""
    if crop_mask is not None:
        # Padding at least the feather, so the seam's blend never reaches the region's edge.
        region = crop_box(crop_mask, mask_grow + max(crop_padding, mask_blur))
        left, top, right, bottom = region
        return region, working_size((right - left, bottom - top), max_megapixels)
    working = floor_to_multiple(size) if size is not None else working_size(canvas_size, max_megapixels)
    return (0, 0, *canvas_size), working
