"""The demo the CLI and the server run when no model is given: the built-in tiny random-weight engine
and a gradient image with a centred mask."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import PIL.Image

    from ..config import EngineConfig
    from ..engine import FluxFillEngine


def demo_inputs(width: int, height: int) -> tuple[PIL.Image.Image, PIL.Image.Image]:
    """A smooth colour gradient and a centred rectangular mask covering half of each side."""
    import numpy as np
    import PIL.Image

    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    rgb = np.stack([xs / max(width - 1, 1), ys / max(height - 1, 1), 0.5 + 0.0 * xs], axis=-1)
    image = PIL.Image.fromarray((rgb * 255).round().astype(np.uint8))
    mask = np.zeros((height, width), np.uint8)
    mask[height // 4 : height - height // 4, width // 4 : width - width // 4] = 255
    return image, PIL.Image.fromarray(mask)


def tiny_engine(config: EngineConfig, device: str | None = None, seed: int = 0) -> FluxFillEngine:
    """An engine on the built-in tiny random-weight model (:mod:`.tiny`): every stage runs, the
    images are noise."""
    from ..engine import FluxFillEngine
    from ..pipeline import FluxFillPipeline
    from .tiny import tiny_components

    dtype = config.torch_dtype
    components = tiny_components(seed) if dtype is None else tiny_components(seed, dtype=dtype)
    return FluxFillEngine(FluxFillPipeline(**components), config=config, device=device)
