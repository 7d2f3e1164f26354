"""Helpers the test files share: tiny deterministic inputs, both pipelines on one set of components,
comparisons, and the tiny engine. Imported as ``from tests.support import helpers``.

Everything is tiny (32x48 images, 2 steps, 48 T5 tokens) so the suite runs in about a minute on a CPU.
Components are rebuilt for every test (~0.03 s): our pipeline fuses the transformer's QKV weights in
place the first time it runs, so components must not be shared across tests. Within one test, diffusers'
pipeline and ours are built on the *same* components; diffusers' forward gives identical results on the
fused views (the values are unchanged), which is what makes the parity tests meaningful.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import diffusers
import numpy as np
import PIL.Image
import pytest
import torch

from fluxfill_engine import EngineConfig, FluxFillEngine, FluxFillPipeline
from fluxfill_engine.metrics import sqnr_db
from fluxfill_engine.testing.demo import tiny_engine as _tiny_engine

# Kernel dtypes: the Triton interpreter computes fp32 and fp16 right, but bf16 `tl.dot` wrong, so bf16
# cases run on a GPU only (and show as skipped elsewhere).
KERNEL_DTYPES = [
    torch.float32,
    torch.float16,
    pytest.param(
        torch.bfloat16,
        marks=pytest.mark.gpu(reason="bf16 needs a GPU: the Triton interpreter's bf16 tl.dot is wrong"),
        id="bfloat16",
    ),
]

HEIGHT, WIDTH = 32, 48
STEPS = 2
MAX_SEQ = 48
PROMPT = "a white paper cup on the table"
ATOL = 1e-4


# ---- inputs ----------------------------------------------------------------------------------------


def image_tensor(height: int = HEIGHT, width: int = WIDTH, seed: int = 0, batch: int = 1) -> torch.Tensor:
    """A deterministic image ``[batch, 3, height, width]`` in [0, 1]: smooth gradients plus noise."""
    gen = torch.Generator().manual_seed(seed)
    ys = torch.linspace(0, 1, height)[:, None].expand(height, width)
    xs = torch.linspace(0, 1, width)[None, :].expand(height, width)
    base = torch.stack([ys, xs, (ys + xs) / 2])[None].repeat(batch, 1, 1, 1)
    noise = torch.rand(batch, 3, height, width, generator=gen)
    return (0.6 * base + 0.4 * noise).clamp(0, 1)


def mask_tensor(height: int = HEIGHT, width: int = WIDTH, batch: int = 1) -> torch.Tensor:
    """A mask ``[batch, 1, height, width]``: black (keep) with a white (repaint) rectangle in the middle."""
    mask = torch.zeros(batch, 1, height, width)
    mask[:, :, height // 4 : 3 * height // 4, width // 4 : 3 * width // 4] = 1.0
    return mask


def to_pil(tensor: torch.Tensor) -> PIL.Image.Image:
    """``[1, C, H, W]`` (or ``[C, H, W]``) in [0, 1] -> an RGB image (C = 3) or an L image (C = 1)."""
    if tensor.dim() == 4:
        tensor = tensor[0]
    array = (tensor.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    if array.shape[-1] == 1:
        return PIL.Image.fromarray(array[..., 0], mode="L")
    return PIL.Image.fromarray(array, mode="RGB")


def to_numpy(tensor: torch.Tensor) -> np.ndarray:
    """``[B, C, H, W]`` -> float32 ``[B, H, W, C]`` (diffusers' numpy image layout)."""
    return tensor.permute(0, 2, 3, 1).numpy().astype(np.float32)


def generators(seeds: int | Sequence[int] | None) -> torch.Generator | list[torch.Generator] | None:
    """A fresh CPU generator for an int seed, a list of them for a list of seeds, ``None`` for ``None``."""
    if seeds is None:
        return None
    if isinstance(seeds, int):
        return torch.Generator("cpu").manual_seed(seeds)
    return [torch.Generator("cpu").manual_seed(s) for s in seeds]


def call_kwargs(seed: int | Sequence[int] | None = 0, **overrides: Any) -> dict[str, Any]:
    """Keyword arguments of a small, fast, valid call (fresh generator(s) every time)."""
    height = overrides.get("height", HEIGHT)
    width = overrides.get("width", WIDTH)
    # Invalid sizes (validation tests) still get valid default-sized images.
    image_height = height if isinstance(height, int) and height >= 16 else HEIGHT
    image_width = width if isinstance(width, int) and width >= 16 else WIDTH
    kwargs: dict[str, Any] = {
        "prompt": PROMPT,
        "image": image_tensor(image_height, image_width),
        "mask_image": mask_tensor(image_height, image_width),
        "height": height,
        "width": width,
        "num_inference_steps": STEPS,
        "max_sequence_length": MAX_SEQ,
        "output_type": "np",
        "generator": generators(seed),
    }
    kwargs.update(overrides)
    return kwargs


def as_array(images: Any) -> np.ndarray:
    """Pipeline output of any output type as a float64 numpy array (PIL images as values in [0, 1])."""
    if isinstance(images, list):
        return np.stack([np.asarray(im, dtype=np.float64) / 255.0 for im in images])
    if isinstance(images, torch.Tensor):
        return images.detach().to(torch.float64).cpu().numpy()
    return np.asarray(images, dtype=np.float64)


def max_abs_diff(a: Any, b: Any) -> float:
    a, b = as_array(a), as_array(b)
    assert a.shape == b.shape, f"shapes differ: {a.shape} vs {b.shape}"
    return float(np.abs(a - b).max())


def assert_close(a: Any, b: Any, atol: float = ATOL) -> None:
    diff = max_abs_diff(a, b)
    assert diff <= atol, f"max abs difference {diff:.3g} > {atol:g}"


def disable_progress(*pipes: Any) -> None:
    for pipe in pipes:
        pipe.set_progress_bar_config(disable=True)


def build_pipes(components: dict[str, Any]) -> tuple[diffusers.FluxFillPipeline, FluxFillPipeline]:
    """diffusers' pipeline and ours on the same components, progress bars off."""
    reference = diffusers.FluxFillPipeline(**components)
    ours = FluxFillPipeline(**components)
    disable_progress(reference, ours)
    return reference, ours


def sqnr(reference: Any, output: Any) -> float:
    """SQNR in dB (:func:`fluxfill_engine.metrics.sqnr_db`); identical tensors give infinity."""
    value = sqnr_db(reference, output)
    return float("inf") if value is None else value


def tiny_engine(config: EngineConfig | None = None, **kwargs: Any) -> FluxFillEngine:
    """A :class:`FluxFillEngine` on the tiny model (default: the ``reference`` preset)."""
    return _tiny_engine(config or EngineConfig.preset("reference"), **kwargs)
