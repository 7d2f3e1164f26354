"""Functional building blocks of the FLUX transformer: embeddings, RoPE, norms, modulation, fusion."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def timestep_embedding(timesteps: torch.Tensor, dim: int = 256, max_period: int = 10000) -> torch.Tensor:
    """Sinusoidal embedding ``[N, dim]`` in float32, cosines first (FLUX's ``flip_sin_to_cos``)."""
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half
    angles = timesteps[:, None].float() * torch.exp(exponent)[None, :]
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)


def rope_table(
    ids: torch.Tensor, axes_dim: Sequence[int], theta: int = 10000
) -> tuple[torch.Tensor, torch.Tensor]:
    """FLUX's rotary table for position ids ``[L, n_axes]``: ``(cos, sin)``, each ``[L, sum(axes_dim)]``.

    Frequencies are computed in float64 (float32 on MPS, which has no float64) and each angle is repeated
    for the two members of its interleaved pair, as diffusers' ``FluxPosEmbed`` does.
    """
    freqs_dtype = torch.float32 if ids.device.type == "mps" else torch.float64
    positions = ids.float()
    cos_parts, sin_parts = [], []
    for axis, dim in enumerate(axes_dim):
        inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=freqs_dtype, device=ids.device) / dim))
        angles = torch.outer(positions[:, axis], inv_freq)
        cos_parts.append(angles.cos().repeat_interleave(2, dim=1).float())
        sin_parts.append(angles.sin().repeat_interleave(2, dim=1).float())
    return torch.cat(cos_parts, dim=-1), torch.cat(sin_parts, dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs of ``x [B, L, H, D]`` by the table ``cos, sin [L, D]`` (float32 math)."""
    real, imag = x.reshape(*x.shape[:-1], -1, 2).unbind(-1)
    rotated = torch.stack([-imag, real], dim=-1).flatten(3)
    cos, sin = cos[None, :, None, :], sin[None, :, None, :]
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)


def layer_norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """LayerNorm over the last dim without affine parameters (AdaLN supplies scale and shift)."""
    return F.layer_norm(x, (x.shape[-1],), eps=eps)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """AdaLN: ``x * (1 + scale) + shift`` with per-sample ``shift, scale [B, D]``."""
    return x * (1 + scale[:, None]) + shift[:, None]


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


def fuse_linears(linears: Sequence[nn.Linear]) -> nn.Linear:
    """One ``nn.Linear`` computing all of ``linears`` (same input) in a single GEMM.

    The originals' weights and biases become views into the fused tensors, so only one copy of the
    weights exists afterwards (the originals keep working and keep saving correctly). Peak extra
    memory is one set of these layers' weights, for the duration of the concatenation.
    """
    first = linears[0]
    weight = torch.cat([linear.weight.data for linear in linears])
    bias = torch.cat([linear.bias.data for linear in linears]) if first.bias is not None else None
    fused = nn.Linear(first.in_features, weight.shape[0], bias=bias is not None, device="meta")
    fused.weight = nn.Parameter(weight, requires_grad=False)
    if bias is not None:
        fused.bias = nn.Parameter(bias, requires_grad=False)
    offset = 0
    for linear in linears:
        rows = linear.out_features
        linear.weight.data = weight[offset : offset + rows]
        if bias is not None:
            linear.bias.data = bias[offset : offset + rows]
        offset += rows
    return fused


def shares_storage(fused: nn.Linear, linears: Sequence[nn.Module]) -> bool:
    """Whether ``linears`` still view ``fused``'s weight (false once something replaced their tensors)."""
    pointer = fused.weight.untyped_storage().data_ptr()
    return all(
        isinstance(linear, nn.Linear) and linear.weight.untyped_storage().data_ptr() == pointer
        for linear in linears
    )


class RowSlice(nn.Module):
    """Output rows ``[start, end)`` of a fused layer: stands in for one of the layers it replaced.

    After quantization the diffusers module's ``to_q``/``to_k``/``to_v`` become slices of the engine's
    fused quantized layer, so both module trees hold the one quantized copy and ``Module.to`` moves it.
    """

    def __init__(self, fused: nn.Module, start: int, end: int) -> None:
        super().__init__()
        self.fused, self.start, self.end = fused, start, end
        self.in_features, self.out_features = fused.in_features, end - start

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fused(x)[..., self.start : self.end]
