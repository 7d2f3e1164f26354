"""``fluxfill::fill_cond``: FLUX Fill's conditioning channels in one pass.

``cat(pack(masked_image_latents), pack(pixel_unshuffle(mask, s)))``: the packed latents (``4*C``
channels) followed by the packed, pixel-unshuffled mask (``4*s*s`` channels), in the latents' dtype.
Pure data movement plus one cast, so every implementation is bitwise equal to the reference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from . import native
from ._triton import HAS_TRITON, require_triton, tl, triton

# Tokens and output channels per program.
BLOCK_N = 32
BLOCK_C = 64


def fill_cond_shape(
    masked_image_latents: Tensor, mask: Tensor, vae_scale_factor: int
) -> tuple[int, int, int]:
    """Check the inputs; the output shape ``(B, (h/2)*(w/2), 4*C + 4*s*s)``. Raises ``ValueError``."""
    s = vae_scale_factor
    if isinstance(s, bool) or s < 1:
        raise ValueError(f"fill_cond: vae_scale_factor must be a positive int, got {s!r}")
    if masked_image_latents.dim() != 4:
        raise ValueError(
            f"fill_cond: masked_image_latents must be [B, C, h, w], got shape {tuple(masked_image_latents.shape)}"
        )
    batch, channels, height, width = masked_image_latents.shape
    if height % 2 or width % 2:
        raise ValueError(f"fill_cond: latent height and width must be even, got {height}x{width}")
    expected = (batch, 1, height * s, width * s)
    if mask.dim() != 4 or tuple(mask.shape) != expected:
        raise ValueError(
            f"fill_cond: mask must be [B, 1, h*s, w*s] = {list(expected)} for latents "
            f"{list(masked_image_latents.shape)} and vae_scale_factor {s}, got {list(mask.shape)}"
        )
    if not masked_image_latents.is_floating_point() or not mask.is_floating_point():
        raise ValueError(
            f"fill_cond: inputs must be floating point, got {masked_image_latents.dtype} and {mask.dtype}"
        )
    if masked_image_latents.device != mask.device:
        raise ValueError(
            f"fill_cond: inputs must be on one device, got {masked_image_latents.device} and {mask.device}"
        )
    return batch, (height // 2) * (width // 2), 4 * channels + 4 * s * s


def _pack(x: Tensor) -> Tensor:
    batch, channels, height, width = x.shape
    x = x.reshape(batch, channels, height // 2, 2, width // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(batch, (height // 2) * (width // 2), channels * 4)


def fill_cond_ref(masked_image_latents: Tensor, mask: Tensor, vae_scale_factor: int) -> Tensor:
    """The definition. ``masked_image_latents [B, C, h, w]``, ``mask [B, 1, h*s, w*s]`` (s =
    ``vae_scale_factor``) -> ``[B, (h/2)*(w/2), 4*C + 4*s*s]`` in ``masked_image_latents.dtype``.
    """
    fill_cond_shape(masked_image_latents, mask, vae_scale_factor)
    packed_mask = _pack(F.pixel_unshuffle(mask, vae_scale_factor)).to(masked_image_latents.dtype)
    return torch.cat((_pack(masked_image_latents), packed_mask), dim=-1)


if HAS_TRITON:

    @triton.jit
    def _fill_cond_kernel(
        lat_ptr,
        mask_ptr,
        out_ptr,
        n_tokens,
        half_w,
        lat_channels,
        out_channels,
        s: tl.constexpr,
        lat_sb,
        lat_sc,
        lat_sh,
        lat_sw,
        mask_sb,
        mask_sh,
        mask_sw,
        BLOCK_N: tl.constexpr,
        BLOCK_C: tl.constexpr,
    ):
        pid_n = tl.program_id(0)
        pid_c = tl.program_id(1)
        pid_b = tl.program_id(2).to(tl.int64)
        tokens = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        chans = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
        row = tokens // half_w
        col = tokens % half_w
        in_bounds = (tokens < n_tokens)[:, None] & (chans < out_channels)[None, :]

        # Channels [0, 4C): channel c of the packed latents is (ch, dy, dx) = (c // 4, c // 2 % 2, c % 2).
        lat_c = chans // 4
        y = 2 * row[:, None] + (chans // 2 % 2)[None, :]
        x = 2 * col[:, None] + (chans % 2)[None, :]
        is_lat = chans < 4 * lat_channels
        lat_offsets = pid_b * lat_sb + lat_c[None, :] * lat_sc + y.to(tl.int64) * lat_sh + x * lat_sw
        lat_vals = tl.load(lat_ptr + lat_offsets, mask=in_bounds & is_lat[None, :], other=0.0)

        # Channels [4C, 4C + 4s^2): unshuffled channel m = sy*s + sx at latent pixel (y, x) is mask pixel
        # (y*s + sy, x*s + sx).
        m = tl.maximum(chans - 4 * lat_channels, 0) // 4
        py = y * s + (m // s)[None, :]
        px = x * s + (m % s)[None, :]
        mask_offsets = pid_b * mask_sb + py.to(tl.int64) * mask_sh + px * mask_sw
        mask_vals = tl.load(mask_ptr + mask_offsets, mask=in_bounds & ~is_lat[None, :], other=0.0)

        out_dtype = out_ptr.dtype.element_ty
        vals = tl.where(is_lat[None, :], lat_vals.to(out_dtype), mask_vals.to(out_dtype))
        out_offsets = (pid_b * n_tokens + tokens[:, None]) * out_channels + chans[None, :]
        tl.store(out_ptr + out_offsets, vals, mask=in_bounds)


def fill_cond_triton(masked_image_latents: Tensor, mask: Tensor, vae_scale_factor: int) -> Tensor:
    """The Triton launcher: same contract as :func:`fill_cond_ref`. Inputs may have any strides."""
    require_triton("fill_cond")
    batch, n_tokens, out_channels = fill_cond_shape(masked_image_latents, mask, vae_scale_factor)
    out = masked_image_latents.new_empty((batch, n_tokens, out_channels))
    if out.numel() == 0:
        return out
    lat_channels = masked_image_latents.shape[1]
    grid = (triton.cdiv(n_tokens, BLOCK_N), triton.cdiv(out_channels, BLOCK_C), batch)
    # pyright cannot type Triton launches: it counts no *stride() spreads, knows no launch options
    # (num_warps), and takes plain values for tl.constexpr parameters; hence the ignores below.
    _fill_cond_kernel[grid](
        masked_image_latents,
        mask,
        out,
        n_tokens,
        masked_image_latents.shape[3] // 2,
        lat_channels,
        out_channels,
        vae_scale_factor,
        *masked_image_latents.stride(),
        mask.stride(0),  # pyright: ignore[reportCallIssue]
        mask.stride(2),  # pyright: ignore[reportCallIssue]
        mask.stride(3),  # pyright: ignore[reportCallIssue]
        BLOCK_N=BLOCK_N,
        BLOCK_C=BLOCK_C,
        num_warps=4,  # pyright: ignore[reportCallIssue]
    )
    return out


@torch.library.custom_op("fluxfill::fill_cond", mutates_args=(), device_types="cuda")
def fill_cond(masked_image_latents: Tensor, mask: Tensor, vae_scale_factor: int) -> Tensor:
    """``[B, C, h, w]``, ``[B, 1, h*s, w*s]`` -> ``[B, (h/2)*(w/2), 4*C + 4*s*s]`` (CUDA: Triton,
    or the native kernel, see :func:`native.use_native_on_cuda`)."""
    if native.use_native_on_cuda("fill_cond"):
        fill_cond_shape(masked_image_latents, mask, vae_scale_factor)
        return torch.ops.fluxfill_native.fill_cond(masked_image_latents, mask, vae_scale_factor)
    return fill_cond_triton(masked_image_latents, mask, vae_scale_factor)


@fill_cond.register_kernel("cpu")
def _fill_cond_cpu(masked_image_latents: Tensor, mask: Tensor, vae_scale_factor: int) -> Tensor:
    if native.available("fill_cond", "cpu"):
        fill_cond_shape(masked_image_latents, mask, vae_scale_factor)
        return torch.ops.fluxfill_native.fill_cond(masked_image_latents, mask, vae_scale_factor)
    return fill_cond_ref(masked_image_latents, mask, vae_scale_factor)


@fill_cond.register_fake
def _fill_cond_fake(masked_image_latents: Tensor, mask: Tensor, vae_scale_factor: int) -> Tensor:
    return masked_image_latents.new_empty(fill_cond_shape(masked_image_latents, mask, vae_scale_factor))
