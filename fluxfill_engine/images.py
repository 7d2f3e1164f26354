"""Reading images and masks as a viewer shows them, or refusing them clearly.

- EXIF orientation is applied (a phone photo is upright, and a mask drawn on it as shown fits it).
- 16-bit and 32-bit greyscale is scaled to 8 bits, not clipped; palette, CMYK, LA, RGBA are converted.
- Masks (white = repaint) follow one documented rule: a mask whose alpha channel is not fully opaque
  carries its strokes there, so the alpha is the mask (opaque = repaint); otherwise the mask is the
  brightest channel of each pixel (grey masks are unchanged; a coloured stroke on black repaints).
- A file's pixel count is read from its header and refused above the limit before anything is decoded.
"""

from __future__ import annotations

import io
import logging
import re
import warnings
from pathlib import Path
from typing import Any, cast

import numpy as np
import PIL.Image
import PIL.ImageOps
import torch

from .call import ImageInput
from .errors import InputError, InputFileNotFound, InputTypeError
from .limits import MAX_INPUT_MEGAPIXELS

logger = logging.getLogger(__name__)

_EXIF_ORIENTATION = 0x0112
_WIDE_GREY_MODES = {"I;16": 65535.0, "I;16B": 65535.0, "I;16L": 65535.0, "I;16N": 65535.0, "I": 65535.0}
_ASPECT_TOLERANCE = 0.01


def load_image_input(
    value: ImageInput, name: str, mask: bool = False, max_megapixels: float = MAX_INPUT_MEGAPIXELS
) -> ImageInput:
    """Open paths and bring PIL images into the form a viewer shows (see the module docstring); check
    the type and size of everything else. ``mask`` selects the mask rule (the result is mode ``L``).

    Raises :class:`~.errors.InputFileNotFound` for a missing path, :class:`~.errors.InputError` for an
    unreadable or too large image and :class:`~.errors.InputTypeError` for anything that is not an
    image, their ``field`` the parameter ``name``.
    """
    if isinstance(value, (list, tuple)):
        if len(value) == 0:
            raise InputError(f"`{name}` is an empty list; pass at least one image", name)
        return [load_image_input(item, name, mask, max_megapixels) for item in value]
    if isinstance(value, (str, Path)):
        value = _open_file(Path(value), name, max_megapixels)
    if isinstance(value, PIL.Image.Image):
        _check_pixels(value.width, value.height, name, max_megapixels)
        return viewer_mask(value) if mask else viewer_image(value)
    if isinstance(value, (np.ndarray, torch.Tensor)):
        height, width = _array_size(value)
        _check_pixels(width, height, name, max_megapixels)
        return value
    raise InputTypeError(
        f"`{name}` must be a PIL.Image.Image, numpy.ndarray, torch.Tensor, a file path, or a list of those; "
        f"got {type(value).__name__}",
        name,
    )


def _check_pixels(width: int, height: int, name: str, max_megapixels: float) -> None:
    if width * height > max_megapixels * 1e6:
        raise InputError(
            f"`{name}` is {width}x{height} = {width * height / 1e6:.1f} megapixels, above the limit of "
            f"{max_megapixels:g} (EngineConfig.max_input_megapixels); downscale it first",
            name,
        )


def _open_file(path: Path, name: str, max_megapixels: float) -> PIL.Image.Image:
    if not path.is_file():
        raise InputFileNotFound(f"`{name}`: no such image file: {str(path)!r}", name)
    return _decode(path, repr(str(path)), name, max_megapixels)


def open_image_bytes(data: bytes, name: str, max_megapixels: float = MAX_INPUT_MEGAPIXELS) -> PIL.Image.Image:
    """An image file's bytes (an upload, a decoded data URL) opened with the same header limit and
    errors as a path; the result is not yet in viewer form (see :func:`load_image_input`)."""
    return _decode(io.BytesIO(data), f"the {len(data)}-byte upload", name, max_megapixels)


def _decode(source: Path | io.BytesIO, label: str, name: str, max_megapixels: float) -> PIL.Image.Image:
    try:
        with warnings.catch_warnings():
            # Our own limit is checked from the header below; PIL's bomb warning would only be noise.
            warnings.simplefilter("ignore", PIL.Image.DecompressionBombWarning)
            with PIL.Image.open(source) as opened:
                _check_pixels(opened.width, opened.height, name, max_megapixels)  # header only
                opened.load()
                return opened.copy()
    except PIL.Image.DecompressionBombError as err:
        # PIL refuses at open what is far above its own limit, before our header check can run.
        found = re.search(r"\((\d+) pixels\)", str(err))
        size = f"{int(found.group(1)) / 1e6:.1f} megapixels" if found else "too large"
        raise InputError(
            f"`{name}` ({label}) is {size} by its header, above the limit of {max_megapixels:g} "
            "(EngineConfig.max_input_megapixels); downscale it first",
            name,
        ) from None
    except (OSError, PIL.UnidentifiedImageError, SyntaxError) as err:
        raise InputError(f"`{name}`: cannot read {label} as an image: {_reason(err)}", name) from err


def _reason(err: BaseException) -> str:
    """What was wrong with an unreadable image, in words: PIL's own messages name the file object it was
    given (``<_io.BytesIO object at 0x...>``), which says nothing to the sender."""
    if isinstance(err, PIL.UnidentifiedImageError):
        return "not an image format Pillow reads (PNG, JPEG, WebP, ...)"
    return re.sub(r"\s*<[\w.]+ object at 0x[0-9a-fA-F]+>", "", str(err)) or type(err).__name__


def _upright(image: PIL.Image.Image) -> PIL.Image.Image:
    """Apply the EXIF orientation (no copy when there is none)."""
    if image.getexif().get(_EXIF_ORIENTATION, 1) in (0, 1):
        return image
    return PIL.ImageOps.exif_transpose(image)


def _wide_grey_to_l(image: PIL.Image.Image) -> PIL.Image.Image:
    """16/32-bit integer or float greyscale scaled (not clipped) to 8 bits."""
    array = np.asarray(image, dtype=np.float64)
    full_scale = 1.0 if image.mode == "F" else _WIDE_GREY_MODES[image.mode]
    return PIL.Image.fromarray(np.round(np.clip(array / full_scale, 0, 1) * 255).astype(np.uint8), "L")


def viewer_image(image: PIL.Image.Image) -> PIL.Image.Image:
    """``image`` upright and in RGB (or L), as a viewer shows it; RGB/L input without EXIF rotation is
    returned as it is."""
    image = _upright(image)
    if image.mode in _WIDE_GREY_MODES or image.mode == "F":
        image = _wide_grey_to_l(image)
    return image if image.mode in ("RGB", "L") else image.convert("RGB")


def has_transparency(image: PIL.Image.Image) -> bool:
    """Whether ``image`` has an alpha channel (or palette transparency) that is not fully opaque."""
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode not in ("RGBA", "LA", "PA", "La", "RGBa"):
        return False
    lowest, _ = cast("tuple[float, float]", image.getchannel("A").getextrema())  # one channel: (min, max)
    return lowest < 255


def viewer_mask(mask: PIL.Image.Image) -> PIL.Image.Image:
    """A one-channel mask (mode ``L``, 255 = repaint) by the module's rule."""
    mask = _upright(mask)
    if mask.mode in _WIDE_GREY_MODES or mask.mode == "F":
        return _wide_grey_to_l(mask)
    if mask.mode == "L":
        return mask
    if has_transparency(mask):
        return mask.convert("RGBA").getchannel("A")
    if mask.mode == "1":
        return mask.convert("L")
    rgb = np.asarray(mask.convert("RGB"))
    return PIL.Image.fromarray(rgb.max(axis=-1), "L")


def _array_size(value: np.ndarray | torch.Tensor) -> tuple[int, int]:
    """``(height, width)`` of an image array: numpy ``[..., H, W(, C)]`` or tensor ``[..., (C,) H, W]``
    with at most 4 channels in the channel axis."""
    shape = tuple(value.shape)
    if isinstance(value, np.ndarray) and len(shape) >= 3 and shape[-1] <= 4:
        return shape[-3], shape[-2]
    if len(shape) >= 2:
        return shape[-2], shape[-1]
    return (shape[0] if shape else 0), 1


def image_size(value: ImageInput) -> tuple[int, int] | None:
    """``(width, height)`` of a loaded image (PIL or array), of the first of a list; ``None`` if unknown."""
    if isinstance(value, list):
        return image_size(value[0]) if value else None
    if isinstance(value, PIL.Image.Image):
        return value.size
    if isinstance(value, (np.ndarray, torch.Tensor)) and value.ndim >= 2:
        height, width = _array_size(value)
        return width, height
    return None


def check_mask_fits_image(image: ImageInput, mask: ImageInput, mask_name: str = "mask_image") -> None:
    """A mask must cover the image as shown: the same size, or the same aspect ratio (then scaled, with a
    warning). Another aspect ratio would be stretched onto the image: refused, naming both sizes."""
    image_wh, mask_wh = image_size(image), image_size(mask)
    if image_wh is None or mask_wh is None or image_wh == mask_wh:
        return
    (image_w, image_h), (mask_w, mask_h) = image_wh, mask_wh
    if abs(image_w * mask_h - mask_w * image_h) > _ASPECT_TOLERANCE * image_w * mask_h:
        raise InputError(
            f"`{mask_name}` is {mask_w}x{mask_h} but the image is {image_w}x{image_h}: another aspect "
            "ratio, so the mask would be stretched onto the image. Give a mask of the image's size (as "
            "the image is shown, EXIF rotation applied), or of the same aspect ratio",
            mask_name,
        )
    logger.warning(
        "%s is %dx%d and the image %dx%d (same aspect ratio): the mask is scaled to the image",
        mask_name,
        mask_w,
        mask_h,
        image_w,
        image_h,
    )


def bools_to_float(value: ImageInput) -> ImageInput:
    """Boolean mask arrays/tensors as float32 (True = 1 = repaint); everything else unchanged."""
    if isinstance(value, list):
        return [bools_to_float(item) for item in value]
    if isinstance(value, torch.Tensor) and value.dtype == torch.bool:
        return value.to(torch.float32)
    if isinstance(value, np.ndarray) and value.dtype == np.bool_:
        return value.astype(np.float32)
    return value


def to_pil(value: Any, name: str, mode: str) -> PIL.Image.Image:
    """One PIL image in ``mode`` from a PIL image, an ``[H, W(, C)]`` array or a ``[(C,) H, W]`` tensor
    with values in [0, 1] (checked by the caller). A three-channel array becomes a mask (``L``) by its
    brightest channel, as mask images do."""
    if isinstance(value, list):
        if len(value) != 1:
            raise InputError(f"`{name}` must be a single image, got a list of {len(value)}", name)
        value = value[0]
    if isinstance(value, PIL.Image.Image):
        return value.convert(mode)
    if isinstance(value, torch.Tensor):
        array = value.detach().to("cpu", torch.float32)
        if array.dim() == 4 and array.shape[0] == 1:
            array = array[0]
        if array.dim() == 3:
            array = array.permute(1, 2, 0)
        array = array.numpy()
    else:
        array = np.asarray(value, dtype=np.float32)
        if array.ndim == 4 and array.shape[0] == 1:
            array = array[0]
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim == 3 and array.shape[-1] == 4:
        array = array[..., :3]
    if array.ndim == 3 and array.shape[-1] == 3 and mode == "L":
        array = array.max(axis=-1)  # the mask rule: the brightest channel
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] != 3):
        raise InputError(
            f"`{name}` must be one image: [H, W], [H, W, 1|3|4] (numpy) or [1|3, H, W] (tensor); "
            f"got shape {tuple(np.shape(value))}",
            name,
        )
    pil = PIL.Image.fromarray(np.round(array * 255).astype(np.uint8))
    return pil.convert(mode)
