"""LoRA files for the tests, made here (nothing is downloaded): peft adapters with random weights saved by
diffusers' ``save_lora_weights``, a kohya (sd-scripts) file written key by key, and files that must be
refused. Imported as ``from tests.support import lora as lora_helpers``."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from diffusers import FluxFillPipeline as DiffusersFill
from diffusers import FluxTransformer2DModel
from safetensors.torch import save_file

from fluxfill_engine.testing.tiny import TINY_TRANSFORMER_CONFIG

# Every kind of linear layer of the FLUX transformer, inside the blocks and around them.
ALL_TARGETS = [
    "to_q",
    "to_k",
    "to_v",
    "to_out.0",
    "add_q_proj",
    "add_k_proj",
    "add_v_proj",
    "to_add_out",
    "proj_mlp",
    "proj_out",
    "norm1.linear",
    "norm1_context.linear",
    "norm.linear",
    "ff.net.0.proj",
    "ff.net.2",
    "ff_context.net.0.proj",
    "ff_context.net.2",
    "x_embedder",
    "context_embedder",
    "linear_1",
    "linear_2",
    "norm_out.linear",
]
# What most FLUX LoRAs hold: attention projections only.
ATTENTION_TARGETS = [
    "to_q",
    "to_k",
    "to_v",
    "to_out.0",
    "add_q_proj",
    "add_k_proj",
    "add_v_proj",
    "to_add_out",
]


def tiny_transformer(**overrides: Any) -> FluxTransformer2DModel:
    """A tiny transformer of the test model's structure (``in_channels=64``: FLUX.1 [dev]'s input)."""
    return FluxTransformer2DModel(**{**TINY_TRANSFORMER_CONFIG, **overrides})


def peft_lora(
    path: Path,
    seed: int,
    rank: int = 4,
    alpha: float | None = 8,
    targets: list[str] | None = None,
    metadata: bool = True,
    **model: Any,
) -> Path:
    """A LoRA made with peft (``init_lora_weights=False``: random A and B) on a tiny transformer and
    saved with diffusers' ``save_lora_weights`` into the folder ``path``. ``alpha=None``: no alpha (scale
    1); ``metadata=False``: no adapter metadata in the file (diffusers infers ranks then)."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    torch.manual_seed(1000 + seed)
    transformer = tiny_transformer(**model)
    config = LoraConfig(
        r=rank,
        lora_alpha=rank if alpha is None else alpha,
        target_modules=targets or ALL_TARGETS,
        init_lora_weights=False,
    )
    transformer.add_adapter(config, adapter_name="default")
    state_dict = get_peft_model_state_dict(transformer, adapter_name="default")
    kwargs = {"transformer_lora_adapter_metadata": config.to_dict()} if metadata else {}
    DiffusersFill.save_lora_weights(path, transformer_lora_layers=state_dict, **kwargs)
    return path


def kohya_lora(path: Path, seed: int, rank: int = 4, alpha: float = 2.0, text_encoder: bool = False) -> Path:
    """A kohya / sd-scripts FLUX LoRA (BFL layer names, ``lora_down``/``lora_up``/``alpha``; fused qkv)
    for the tiny model, written by hand as diffusers' converter reads it."""
    width, mlp = 32, 128
    gen = torch.Generator().manual_seed(2000 + seed)
    layers = {}
    for block in range(2):
        for stream in ("img", "txt"):
            layers[f"lora_unet_double_blocks_{block}_{stream}_attn_qkv"] = (width, 3 * width)
            layers[f"lora_unet_double_blocks_{block}_{stream}_attn_proj"] = (width, width)
            layers[f"lora_unet_double_blocks_{block}_{stream}_mlp_0"] = (width, mlp)
            layers[f"lora_unet_double_blocks_{block}_{stream}_mod_lin"] = (width, 6 * width)
        layers[f"lora_unet_single_blocks_{block}_linear2"] = (width + mlp, width)
        layers[f"lora_unet_single_blocks_{block}_modulation_lin"] = (width, 3 * width)
    if text_encoder:
        layers["lora_te1_text_model_encoder_layers_0_self_attn_q_proj"] = (32, 32)
    tensors = {}
    for name, (fan_in, fan_out) in layers.items():
        tensors[f"{name}.lora_down.weight"] = torch.randn(rank, fan_in, generator=gen) / math.sqrt(fan_in)
        tensors[f"{name}.lora_up.weight"] = torch.randn(fan_out, rank, generator=gen) / math.sqrt(rank)
        tensors[f"{name}.alpha"] = torch.tensor(alpha)
    save_file(tensors, str(path))
    return path


def raw_lora(path: Path, tensors: dict[str, torch.Tensor]) -> Path:
    """A .safetensors file holding exactly ``tensors`` (for files that must be refused)."""
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return path
