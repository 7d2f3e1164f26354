"""The benchmark models (``--preset``): how each is built, where it runs and the request size it is
measured at by default; the parameter counts that size a run's memory.

- ``cpu-tiny``: the test model; ``cpu-mid``: structurally faithful, 2-core-CPU sized (both from
  :mod:`fluxfill_engine.testing.tiny`); ``gpu-full``: the real FLUX.1 Fill [dev] architecture with
  random weights created directly on the GPU
  (:func:`~fluxfill_engine.testing.random_models.random_components`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..architecture import PIPELINE_DEFAULTS
from ..testing import random_models
from ..testing.random_models import ComponentConfigs, tie_t5_embeddings
from ..testing.tiny import MID_MAX_SEQUENCE_LENGTH, mid_components, tiny_components
from .catalog import BenchError


@dataclass(frozen=True)
class ModelPreset:
    """A benchmark model: how to build it and the request size it is measured at by default."""

    name: str
    description: str
    device_type: str  # "cpu" or "cuda": where it is meant to run
    dtype: torch.dtype
    width: int
    height: int
    max_sequence_length: int
    builder: Callable[[int, torch.device, torch.dtype], dict[str, Any]]

    def build(self, seed: int, device: torch.device, dtype: torch.dtype | None = None) -> dict[str, Any]:
        return self.builder(seed, device, dtype or self.dtype)


def _cpu_builder(
    factory: Callable[..., dict[str, Any]],
) -> Callable[[int, torch.device, torch.dtype], dict[str, Any]]:
    def build(seed: int, device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
        components = factory(seed, dtype=dtype)
        for name in ("transformer", "vae", "text_encoder", "text_encoder_2"):
            components[name].to(device)
        return components

    return build


def _full_builder(seed: int, device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    # Looked up at call time, so a test can swap the real configs for reduced ones.
    configs = random_models.full_configs()
    return random_models.random_components(configs, device=device, dtype=dtype, seed=seed)


MODEL_PRESETS: dict[str, ModelPreset] = {
    "cpu-tiny": ModelPreset(
        name="cpu-tiny",
        description="the test-size model (2 + 2 blocks, 2 heads x 16): a smoke run, seconds",
        device_type="cpu",
        dtype=torch.float32,
        width=64,
        height=64,
        max_sequence_length=32,
        builder=_cpu_builder(tiny_components),
    ),
    "cpu-mid": ModelPreset(
        name="cpu-mid",
        description=(
            "structurally faithful mid-size model (4 double + 8 single blocks, 8 heads x 64, "
            "256 image + 128 text tokens at 256x256) for 2 CPU cores"
        ),
        device_type="cpu",
        dtype=torch.float32,
        width=256,
        height=256,
        max_sequence_length=MID_MAX_SEQUENCE_LENGTH,
        builder=_cpu_builder(mid_components),
    ),
    "gpu-full": ModelPreset(
        name="gpu-full",
        description=(
            "the real FLUX.1 Fill [dev] architecture (19 + 38 blocks, 24 heads x 128, T5-XXL, CLIP-L, "
            "16-channel VAE) with random weights created on the GPU, 1024x1024"
        ),
        device_type="cuda",
        dtype=torch.bfloat16,
        width=int(PIPELINE_DEFAULTS["width"]),
        height=int(PIPELINE_DEFAULTS["height"]),
        max_sequence_length=int(PIPELINE_DEFAULTS["max_sequence_length"]),
        builder=_full_builder,
    ),
}


def preset_device(preset: str, requested: str | None = None) -> torch.device:
    """Where ``preset`` runs: ``requested`` (checked as ``--device`` is everywhere), else the preset's own
    device type, which must exist here."""
    from ..devices import resolve_device

    model = MODEL_PRESETS[preset]
    if requested is None and model.device_type == "cuda" and not torch.cuda.is_available():
        raise BenchError(
            f"preset {preset!r} runs on a CUDA GPU and this machine has none "
            f"(torch {torch.__version__}); the CPU presets are "
            f"{[n for n, p in MODEL_PRESETS.items() if p.device_type == 'cpu']}"
        )
    return torch.device(resolve_device(requested or model.device_type))


def parameter_counts(configs: ComponentConfigs) -> dict[str, int]:
    """Parameter counts that decide what each benchmark variant adds to memory (meta device, free).

    ``transformer``: all; ``fused``: the layers the engine fuses into new tensors (QKV of both streams,
    single-block QKV + MLP input); ``block_linears``: the linear layers inside the blocks (what the
    engine quantizes); ``linears``: every linear layer (what torchao's ``quantize_`` converts);
    ``t5_linears``: T5's linear layers but ``wo`` (what ``quantize_text_encoder`` converts); plus
    ``vae``, ``text_encoder``, ``text_encoder_2``.
    """
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from diffusers.models.transformers.transformer_flux import (
        FluxSingleTransformerBlock,
        FluxTransformerBlock,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    def count(modules: Any) -> int:
        return sum(p.numel() for m in modules for p in m.parameters())

    with init_empty_weights(include_buffers=False):
        transformer = FluxTransformer2DModel(**configs.transformer)
        vae = AutoencoderKL(**configs.vae)
        clip = CLIPTextModel(CLIPTextConfig(**configs.clip))
        t5 = T5EncoderModel(T5Config(**configs.t5))
    tie_t5_embeddings(t5)
    fused: list[nn.Module] = []
    # The block lists are ModuleLists (items typed as Module): the checks give the layers their types.
    for block in transformer.transformer_blocks:
        if not isinstance(block, FluxTransformerBlock):
            raise BenchError(
                f"not a FLUX block: {type(block).__name__} in FluxTransformer2DModel.transformer_blocks"
            )
        attn = block.attn
        fused += [attn.to_q, attn.to_k, attn.to_v, attn.add_q_proj, attn.add_k_proj, attn.add_v_proj]
    for block in transformer.single_transformer_blocks:
        if not isinstance(block, FluxSingleTransformerBlock):
            raise BenchError(
                f"not a FLUX block: {type(block).__name__} in FluxTransformer2DModel.single_transformer_blocks"
            )
        fused += [block.attn.to_q, block.attn.to_k, block.attn.to_v, block.proj_mlp]
    blocks = [*transformer.transformer_blocks, *transformer.single_transformer_blocks]
    return {
        "transformer": count([transformer]),
        "fused": count(fused),
        "block_linears": count(m for b in blocks for m in b.modules() if isinstance(m, nn.Linear)),
        "linears": count(m for m in transformer.modules() if isinstance(m, nn.Linear)),
        "t5_linears": count(
            m for name, m in t5.named_modules() if isinstance(m, nn.Linear) and not name.endswith("wo")
        ),
        "vae": count([vae]),
        "text_encoder": count([clip]),
        "text_encoder_2": count([t5]),
    }
