"""The real FLUX.1 Fill [dev] component configurations (public model configs), for building the
architecture without a checkpoint: on the meta device to count parameters, or with random weights
on a GPU for benchmarks. Keys are the constructor arguments of the diffusers classes."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from diffusers import FluxTransformer2DModel

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


def meta_transformer() -> FluxTransformer2DModel:
    """The real transformer (11.9B parameters) on the meta device: shapes only, no memory."""
    import torch
    from diffusers import FluxTransformer2DModel

    with torch.device("meta"):
        return FluxTransformer2DModel(**TRANSFORMER_CONFIG)


# The other components of FLUX.1 Fill [dev] (from its public component configs). Keys are the constructor
# arguments of diffusers.AutoencoderKL, transformers.CLIPTextConfig and transformers.T5Config.
VAE_CONFIG: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 16,
    "block_out_channels": (128, 256, 512, 512),
    "layers_per_block": 2,
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "act_fn": "silu",
    "norm_num_groups": 32,
    "sample_size": 1024,
    "scaling_factor": 0.3611,
    "shift_factor": 0.1159,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
    "mid_block_add_attention": True,
    "force_upcast": True,
}

# CLIP ViT-L/14 text tower (123M parameters).
CLIP_TEXT_CONFIG: dict[str, Any] = {
    "vocab_size": 49408,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "projection_dim": 768,
    "layer_norm_eps": 1e-05,
    "bos_token_id": 49406,
    "eos_token_id": 49407,
    "pad_token_id": 1,
}

# T5 v1.1 XXL encoder (4.76B parameters).
T5_CONFIG: dict[str, Any] = {
    "vocab_size": 32128,
    "d_model": 4096,
    "d_kv": 64,
    "d_ff": 10240,
    "num_layers": 24,
    "num_heads": 64,
    "relative_attention_num_buckets": 32,
    "relative_attention_max_distance": 128,
    "feed_forward_proj": "gated-gelu",
    "layer_norm_epsilon": 1e-06,
    "dropout_rate": 0.1,
    "is_encoder_decoder": False,
}

# FLUX.1 Fill [dev]'s scheduler (diffusers' FlowMatchEulerDiscreteScheduler arguments): the flow-matching
# schedule with FLUX's resolution-dependent shift, from 0.5 at 256 image tokens to 1.15 at 4096.
SCHEDULER_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": True,
    "base_shift": 0.5,
    "max_shift": 1.15,
    "base_image_seq_len": 256,
    "max_image_seq_len": 4096,
}

# What the real pipeline runs with: 1024x1024, 512 T5 tokens, 77 CLIP tokens, guidance 30.
PIPELINE_DEFAULTS: dict[str, Any] = {
    "height": 1024,
    "width": 1024,
    "vae_scale_factor": 8,
    "max_sequence_length": 512,
    "clip_max_length": 77,
    "guidance_scale": 30.0,
    "num_inference_steps": 28,
}
