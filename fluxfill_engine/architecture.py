"""The real FLUX.1 Fill [dev] component configurations (public model configs), for building the
architecture without a checkpoint: on the meta device to count parameters, or with random weights
on a GPU for benchmarks. Keys are the constructor arguments of the diffusers classes."""

from __future__ import annotations

from typing import Any

TRANSFORMER_CONFIG: dict[str, Any] = {
    "patch_size": 1,
    "in_channels": 384,
    "out_channels": 64,
    "num_layers": 19,
    "num_single_layers": 38,
    "attention_head_dim": 128,
    "num_attention_heads": 24,
    "joint_attention_dim": 4096,
    "pooled_projection_dim": 768,
    "guidance_embeds": True,
    "axes_dims_rope": (16, 56, 56),
}


def meta_transformer() -> Any:
    """The real transformer (11.9B parameters) on the meta device: shapes only, no memory."""
    import torch
    from diffusers import FluxTransformer2DModel

    with torch.device("meta"):
        return FluxTransformer2DModel(**TRANSFORMER_CONFIG)
