"""Fill conditioning: input checks, image/mask loading, latent packing and the 320-channel condition.

Shapes (s = VAE scale factor, 8 for FLUX): image ``[B, 3, H, W]`` -> latents ``[B, 16, H/s, W/s]``
-> packed ``[B, L, 64]`` with ``L = (H/2s) * (W/2s)``; mask ``[B, 1, H, W]`` -> pixel-unshuffle by s
-> ``[B, s*s, H/s, W/s]`` -> packed ``[B, L, 4*s*s]`` (256 channels for s = 8).
"""

from __future__ import annotations

import math
import numbers
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import torch

ImageInput = Any  # PIL image, numpy array, torch tensor, a path, or a list of those


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
            raise ValueError(f"`{name}` is empty (shape {tuple(tensor.shape)})")
        if not torch.isfinite(tensor).all():
            raise ValueError(f"`{name}` contains NaN or infinite values")
        if unit_range and (tensor.min() < 0 or tensor.max() > 1):
            raise ValueError(
                f"`{name}` values must lie in [0, 1] (white = repaint, black = keep); "
                f"got min {tensor.min().item():.4g}, max {tensor.max().item():.4g}"
            )


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """``[B, C, h, w]`` -> ``[B, (h/2)*(w/2), 4C]``: 2x2 patches flattened channel-major."""
    batch, channels, height, width = latents.shape
    latents = latents.view(batch, channels, height // 2, 2, width // 2, 2)
    latents = latents.permute(0, 2, 4, 1, 3, 5)
    return latents.reshape(batch, (height // 2) * (width // 2), channels * 4)


def unpack_latents(packed: torch.Tensor, height: int, width: int, vae_scale_factor: int) -> torch.Tensor:
    """Inverse of :func:`pack_latents` for an image of ``height x width`` pixels."""
    batch, _, channels = packed.shape
    latent_height = 2 * (int(height) // (vae_scale_factor * 2))
    latent_width = 2 * (int(width) // (vae_scale_factor * 2))
    latents = packed.view(batch, latent_height // 2, latent_width // 2, channels // 4, 2, 2)
    latents = latents.permute(0, 3, 1, 4, 2, 5)
    return latents.reshape(batch, channels // 4, latent_height, latent_width)


def pack_mask(mask: torch.Tensor, vae_scale_factor: int) -> torch.Tensor:
    """``[B, 1, H, W]`` pixel mask -> ``[B, L, 4*s*s]``: 8x8 pixel-unshuffle to latent size, then packed."""
    batch, _, height, width = mask.shape
    s = vae_scale_factor
    latent_height, latent_width = height // s, width // s
    mask = mask[:, 0].reshape(batch, latent_height, s, latent_width, s)
    mask = mask.permute(0, 2, 4, 1, 3).reshape(batch, s * s, latent_height, latent_width)
    return pack_latents(mask)


def fill_conditioning(
    masked_image_latents: torch.Tensor, mask: torch.Tensor, vae_scale_factor: int, fused: bool = False
) -> torch.Tensor:
    """The transformer's conditioning channels: ``cat(pack(masked_image_latents), pack_mask(mask))``.

    ``masked_image_latents`` is ``[B, C, h, w]`` (already shifted and scaled), ``mask`` is
    ``[B, 1, h*s, w*s]``. Returns ``[B, (h/2)*(w/2), 4*C + 4*s*s]`` (320 channels for FLUX Fill).
    ``fused`` runs the one-pass ``fluxfill::fill_cond`` op (same values, one kernel).
    """
    if fused:
        import fluxfill_kernels.fill_cond  # noqa: F401  (registers the op)

        return torch.ops.fluxfill.fill_cond(masked_image_latents, mask, vae_scale_factor)
    packed_latents = pack_latents(masked_image_latents)
    packed_mask = pack_mask(mask, vae_scale_factor).to(packed_latents.dtype)
    return torch.cat((packed_latents, packed_mask), dim=-1)


def repeat_to_batch(tensor: torch.Tensor, batch_size: int, name: str) -> torch.Tensor:
    """Tile ``tensor`` along dim 0 up to ``batch_size`` (which it must divide)."""
    if tensor.shape[0] == batch_size:
        return tensor
    if tensor.shape[0] > batch_size or batch_size % tensor.shape[0] != 0:
        raise ValueError(
            f"{tensor.shape[0]} {name} were passed for a total batch size of {batch_size} "
            "(prompts x num_images_per_prompt); the number of them must divide the batch size"
        )
    return tensor.repeat(batch_size // tensor.shape[0], *([1] * (tensor.dim() - 1)))


def latent_image_ids(latent_height: int, latent_width: int, device: Any, dtype: torch.dtype) -> torch.Tensor:
    """Position ids ``[L, 3]`` of the packed image tokens: (0, row, column)."""
    ids = torch.zeros(latent_height, latent_width, 3)
    ids[..., 1] = ids[..., 1] + torch.arange(latent_height)[:, None]
    ids[..., 2] = ids[..., 2] + torch.arange(latent_width)[None, :]
    return ids.reshape(latent_height * latent_width, 3).to(device=device, dtype=dtype)


def image_seq_len(height: int, width: int, vae_scale_factor: int) -> int:
    """Number of packed image tokens for a ``height x width`` image."""
    return (int(height) // vae_scale_factor // 2) * (int(width) // vae_scale_factor // 2)


def is_finite_number(value: Any) -> bool:
    """A real, finite number (Python or numpy scalar; not a bool)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def bools_to_float(value: ImageInput) -> ImageInput:
    """Boolean mask arrays/tensors as float32 (True = 1 = repaint); everything else unchanged."""
    if isinstance(value, list):
        return [bools_to_float(item) for item in value]
    if isinstance(value, torch.Tensor) and value.dtype == torch.bool:
        return value.to(torch.float32)
    if isinstance(value, np.ndarray) and value.dtype == np.bool_:
        return value.astype(np.float32)
    return value
