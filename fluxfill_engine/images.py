"""Reading images and masks: file paths opened, everything converted to what the pipeline takes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import torch

from .call import ImageInput

# ITU-R 601 luma, what PIL's convert("L") uses, so array masks convert like image masks.
_LUMA = (0.299, 0.587, 0.114)


def load_image_input(value: ImageInput, name: str) -> ImageInput:
    """Open paths as PIL images and check the type of everything else.

    Raises ``FileNotFoundError`` for a missing path, ``ValueError`` for an unreadable file and
    ``TypeError`` for anything that is not an image, naming the parameter ``name``.
    """
    if isinstance(value, (list, tuple)):
        if len(value) == 0:
            raise ValueError(f"`{name}` is an empty list; pass at least one image")
        return [load_image_input(item, name) for item in value]
    if isinstance(value, (str, Path)):
        path = Path(value)
        if not path.is_file():
            raise FileNotFoundError(f"`{name}`: no such image file: {str(path)!r}")
        try:
            with PIL.Image.open(path) as opened:
                return opened.convert("RGB") if opened.mode not in ("RGB", "L") else opened.copy()
        except (OSError, PIL.UnidentifiedImageError) as err:
            raise ValueError(f"`{name}`: cannot read {str(path)!r} as an image: {err}") from err
    if isinstance(value, (PIL.Image.Image, np.ndarray, torch.Tensor)):
        return value
    raise TypeError(
        f"`{name}` must be a PIL.Image.Image, numpy.ndarray, torch.Tensor, a file path, or a list of those; "
        f"got {type(value).__name__}"
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
    with values in [0, 1] (checked by the caller)."""
    if isinstance(value, list):
        if len(value) != 1:
            raise ValueError(f"`{name}` must be a single image, got a list of {len(value)}")
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
        array = array @ np.asarray(_LUMA, dtype=np.float32)
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] != 3):
        raise ValueError(
            f"`{name}` must be one image: [H, W], [H, W, 1|3|4] (numpy) or [1|3, H, W] (tensor); "
            f"got shape {tuple(np.shape(value))}"
        )
    pil = PIL.Image.fromarray(np.round(array * 255).astype(np.uint8))
    return pil.convert(mode)
