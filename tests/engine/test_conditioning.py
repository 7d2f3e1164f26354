"""Packing and the 320-channel fill conditioning against diffusers' FluxFillPipeline code."""

import diffusers
import pytest
import torch

from fluxfill_engine.conditioning import (
    fill_conditioning,
    image_seq_len,
    latent_image_ids,
    pack_latents,
    pack_mask,
    repeat_to_batch,
    unpack_latents,
)
from fluxfill_engine.testing.tiny import tiny_components


@pytest.mark.parametrize(("height", "width"), [(32, 32), (48, 80), (96, 16)])
def test_pack_unpack_roundtrip(height, width):
    latents = torch.randn(2, 16, height // 8, width // 8)
    packed = pack_latents(latents)
    assert packed.shape == (2, image_seq_len(height, width, 8), 64)
    assert torch.equal(unpack_latents(packed, height, width, 8), latents)
    ref = diffusers.FluxFillPipeline._pack_latents(latents, 2, 16, height // 8, width // 8)
    assert torch.equal(packed, ref)


@pytest.mark.parametrize(("batch", "height", "width"), [(1, 32, 48), (2, 48, 80), (3, 16, 112)])
def test_fill_conditioning_equals_diffusers(batch, height, width):
    pipe = diffusers.FluxFillPipeline(**tiny_components())
    gen = torch.Generator().manual_seed(0)
    raw_latents = torch.randn(batch, 16, height // 8, width // 8, generator=gen)
    mask = (torch.rand(batch, 1, height, width, generator=gen) > 0.5).float()
    ref_mask, ref_latents = pipe.prepare_mask_latents(
        mask, raw_latents, batch, 16, 1, height, width, torch.float32, "cpu", None
    )
    scaled = (raw_latents - pipe.vae.config.shift_factor) * pipe.vae.config.scaling_factor
    cond = fill_conditioning(scaled, mask, 8)
    assert cond.shape == (batch, image_seq_len(height, width, 8), 64 + 256)
    assert torch.equal(cond, torch.cat((ref_latents, ref_mask), dim=-1))


def test_pack_mask_channel_layout():
    """Channel c of the packed mask is pixel (c // 4 // 8, c // 4 % 8) of the 2x2 patch's sub-block c % 4."""
    mask = torch.zeros(1, 1, 16, 16)
    mask[0, 0, 8 + 3, 5] = 1.0  # latent cell (1, 0), pixel (3, 5) inside it
    packed = pack_mask(mask, 8)
    assert packed.shape == (1, 1, 256)
    (channel,) = torch.nonzero(packed[0, 0]).flatten().tolist()
    assert channel == (3 * 8 + 5) * 4 + 2  # patch sub-position (row 1, col 0) -> index 2


def test_latent_image_ids_and_repeat():
    ids = latent_image_ids(2, 3, "cpu", torch.float32)
    assert ids.tolist() == [[0, 0, 0], [0, 0, 1], [0, 0, 2], [0, 1, 0], [0, 1, 1], [0, 1, 2]]
    assert repeat_to_batch(torch.ones(2, 3), 6, "images").shape == (6, 3)
    with pytest.raises(ValueError, match="images"):
        repeat_to_batch(torch.ones(2, 3), 5, "images")
