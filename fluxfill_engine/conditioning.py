"""Fill conditioning: latent packing, the starting latents and the 320-channel condition.

Shapes (s = VAE scale factor, 8 for FLUX): image ``[B, 3, H, W]`` -> latents ``[B, 16, H/s, W/s]``
-> packed ``[B, L, 64]`` with ``L = (H/2s) * (W/2s)``; mask ``[B, 1, H, W]`` -> pixel-unshuffle by s
-> ``[B, s*s, H/s, W/s]`` -> packed ``[B, L, 4*s*s]`` (256 channels for s = 8).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from diffusers.utils.torch_utils import randn_tensor

from .errors import InputError
from .sampling import Schedule, noise_latents

if TYPE_CHECKING:
    from diffusers import AutoencoderKL

    from .call import Generator


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
        raise InputError(
            f"{tensor.shape[0]} {name} were passed for a total batch size of {batch_size} "
            "(prompts x num_images_per_prompt); the number of them must divide the batch size",
            name,
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


# ---- what one call conditions on -------------------------------------------------------------------


@dataclass(frozen=True)
class LatentGrid:
    """The latent geometry of a call: ``batch`` images of ``height x width`` pixels (multiples of
    ``2 * vae_scale_factor``)."""

    batch: int
    height: int
    width: int
    vae_scale_factor: int

    @property
    def latent_height(self) -> int:
        return 2 * (self.height // (self.vae_scale_factor * 2))

    @property
    def latent_width(self) -> int:
        return 2 * (self.width // (self.vae_scale_factor * 2))


def vae_latents(
    vae: AutoencoderKL, image: torch.Tensor, generator: Generator, per_image: bool = True
) -> torch.Tensor:
    """Sampled, shifted and scaled VAE latents of ``image``. With a list of generators and
    ``per_image``, each image is encoded on its own with its generator (diffusers encodes the init image
    so, and the masked image in one batch)."""
    if isinstance(generator, list) and per_image:
        samples = [
            _encoded(vae, image[i : i + 1]).latent_dist.sample(generator[i]) for i in range(len(image))
        ]
        sample = torch.cat(samples)
    else:
        sample = _encoded(vae, image).latent_dist.sample(generator)
    config = vae_config(vae)
    return (sample - config.shift_factor) * config.scaling_factor


def vae_config(vae: AutoencoderKL) -> Any:
    """The VAE's config (diffusers' FrozenDict, read by attribute: ``latent_channels``, ``shift_factor``,
    ``scaling_factor``)."""
    return vae.config


def _encoded(vae: AutoencoderKL, image: torch.Tensor) -> Any:
    """``vae.encode(image)``: an ``AutoencoderKLOutput`` (``return_dict`` is on), its ``latent_dist``."""
    return vae.encode(image)


def _draw_skipped_encode_noise(
    vae: AutoencoderKL, image: torch.Tensor, generator: Generator, grid: LatentGrid
) -> None:
    """Draw the random numbers a VAE encode's sampling would draw, in the same order, without encoding."""
    shape = (image.shape[0], vae_config(vae).latent_channels, image.shape[2] // grid.vae_scale_factor)
    shape = (*shape, image.shape[3] // grid.vae_scale_factor)
    if isinstance(generator, list):
        for i in range(image.shape[0]):
            randn_tensor((1, *shape[1:]), generator=generator[i], device=vae.device, dtype=vae.dtype)
    else:
        randn_tensor(shape, generator=generator, device=vae.device, dtype=vae.dtype)


def initial_latents(
    vae: AutoencoderKL,
    init_image: torch.Tensor | None,
    schedule: Schedule,
    grid: LatentGrid,
    dtype: torch.dtype,
    device: torch.device,
    generator: Generator,
    latents: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed starting latents ``[B, L, 64]`` and the image position ids ``[L, 3]``.

    Noise at the schedule's first sigma, mixed with the image's latents when it starts below 1
    (``strength < 1``). The generator is consumed in diffusers' order (init-image encode, then noise).
    """
    channels = vae_config(vae).latent_channels
    img_ids = latent_image_ids(grid.latent_height // 2, grid.latent_width // 2, device, dtype)
    if latents is not None:
        return latents.to(device=device, dtype=dtype), img_ids
    image_latents = None
    if init_image is not None:
        image = init_image.to(device=device, dtype=dtype)
        if image.shape[1] == channels:
            image_latents = image
        elif schedule.first_sigma == 1.0:
            # Pure noise start: the image latents would be multiplied by (1 - 1.0) = 0.
            _draw_skipped_encode_noise(vae, image, generator, grid)
        else:
            image_latents = vae_latents(vae, image, generator)
        if image_latents is not None:
            image_latents = repeat_to_batch(image_latents, grid.batch, "images")
    shape = (grid.batch, channels, grid.latent_height, grid.latent_width)
    noise = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
    if image_latents is not None:
        noise = noise_latents(image_latents, noise, schedule.sigmas[0].to(device=device, dtype=dtype))
    return pack_latents(noise), img_ids


def masked_image_conditioning(
    vae: AutoencoderKL,
    init_image: torch.Tensor,
    mask: torch.Tensor,
    grid: LatentGrid,
    dtype: torch.dtype,
    device: torch.device,
    generator: Generator,
    fused: bool = False,
) -> torch.Tensor:
    """The packed 320-channel conditioning of ``init_image`` ``[B, 3, H, W]`` and its ``mask``
    ``[B, 1, H, W]`` (1 = repaint): the latents of the image with the masked part blacked out, and the
    8x8-unshuffled mask (as BFL's ``prepare_fill`` builds it)."""
    masked_image = (init_image * (1 - mask)).to(device=device, dtype=dtype)
    config = vae_config(vae)
    if masked_image.shape[1] == config.latent_channels:
        masked_latents = (masked_image - config.shift_factor) * config.scaling_factor
    else:
        masked_latents = vae_latents(vae, masked_image, generator, per_image=False)
    masked_latents = repeat_to_batch(masked_latents.to(device=device, dtype=dtype), grid.batch, "images")
    mask = repeat_to_batch(mask, grid.batch, "masks").to(device=device, dtype=dtype)
    return fill_conditioning(masked_latents, mask, grid.vae_scale_factor, fused)


def soft_mask_processor(mask_processor: Any) -> Any:
    """diffusers' mask processor without its 0.5 threshold: grey mask levels reach the conditioning."""
    from diffusers.image_processor import VaeImageProcessor

    config = mask_processor.config
    return VaeImageProcessor(
        vae_scale_factor=config.vae_scale_factor,
        vae_latent_channels=config.vae_latent_channels,
        do_normalize=False,
        do_binarize=False,
        do_convert_grayscale=True,
    )
