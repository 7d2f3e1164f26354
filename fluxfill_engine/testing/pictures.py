"""A deterministic picture and a centred mask: the request the benchmarks run (and their tests)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import PIL.Image


def picture_and_mask(
    width: int, height: int, seed: int = 0, mask_size: int | None = None
) -> tuple[PIL.Image.Image, PIL.Image.Image]:
    """Colour gradients with fine texture, and a centred white (repaint) square of ``mask_size`` pixels
    a side; without ``mask_size``, a centred rectangle of half of each side."""
    import numpy as np
    import PIL.Image

    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    u, v = xs / max(width - 1, 1), ys / max(height - 1, 1)
    rgb = np.stack([u, v, 0.5 + 0.5 * np.sin(6.0 * (u + v))], axis=-1) * 0.8
    rgb += 0.2 * rng.random((height, width, 3), dtype=np.float32)
    image = PIL.Image.fromarray((rgb.clip(0, 1) * 255).round().astype(np.uint8))
    mask_height = height - 2 * (height // 4) if mask_size is None else mask_size
    mask_width = width - 2 * (width // 4) if mask_size is None else mask_size
    top, left = (height - mask_height) // 2, (width - mask_width) // 2
    mask = np.zeros((height, width), np.uint8)
    mask[top : top + mask_height, left : left + mask_width] = 255
    return image, PIL.Image.fromarray(mask)
