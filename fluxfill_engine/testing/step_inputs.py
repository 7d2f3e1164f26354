"""One transformer step's inputs, random and made on the device, for the step-level benchmarks (the GPU
run, the context-parallel benchmark) and their tests: no text encoder, no VAE.

- :class:`StepInputs`: packed latents, the 320-channel condition, prompt embeddings, ids, timesteps;
  how the engine's transformer (``prepare``) and diffusers' transformer (its call kwargs) take them.
- :func:`flux_ids`: FLUX's text and image position ids.
- :func:`engine_pipeline`: the drop-in pipeline around a transformer alone.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from ..architecture import SCHEDULER_CONFIG


def engine_pipeline(transformer: Any) -> Any:
    """The drop-in pipeline around a transformer alone: a step needs no text encoder or VAE."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from ..pipeline import FluxFillPipeline

    # A diffusers pipeline registers a component given as None as absent; its __init__ annotations
    # (which from_pretrained reads, so they stay as they are) do not say so.
    absent: dict[str, Any] = dict.fromkeys(
        ("vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")
    )
    return FluxFillPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG), transformer=transformer, **absent
    )


def flux_ids(
    text_tokens: int, grid: tuple[int, int], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """FLUX's position ids: text all zeros, image ``(0, row, col)`` over the patch grid."""
    rows, cols = grid
    img_ids = torch.zeros(rows, cols, 3, device=device)
    img_ids[..., 1] = torch.arange(rows, device=device)[:, None]
    img_ids[..., 2] = torch.arange(cols, device=device)[None, :]
    return torch.zeros(text_tokens, 3, device=device), img_ids.reshape(rows * cols, 3)


@dataclass
class StepInputs:
    """One request's transformer inputs for ``steps`` steps, random from a fixed seed and made on the
    device: packed latents, the condition (latents and a random mask), prompt embeddings (no text
    encoder), ids and the timesteps."""

    latents: torch.Tensor
    cond: torch.Tensor
    prompt_embeds: torch.Tensor
    pooled: torch.Tensor
    txt_ids: torch.Tensor
    img_ids: torch.Tensor
    timesteps: torch.Tensor  # sigma * 1000, float32, one per step (the engine's prepare)

    @classmethod
    def random(
        cls,
        config: Mapping[str, Any],
        width: int,
        height: int,
        text_tokens: int,
        device: torch.device,
        dtype: torch.dtype,
        steps: int = 1,
    ) -> StepInputs:
        rows, cols = height // 16, width // 16
        tokens = rows * cols
        generator = torch.Generator(device=device).manual_seed(5)

        def randn(*shape: int) -> torch.Tensor:
            return torch.randn(*shape, device=device, generator=generator).to(dtype)

        noise = int(config.get("out_channels") or 64)
        mask_channels = int(config["in_channels"]) - 2 * noise
        cond_latents = randn(1, tokens, noise)
        mask = torch.rand(1, tokens, mask_channels, device=device, generator=generator) > 0.5
        txt_ids, img_ids = flux_ids(text_tokens, (rows, cols), device)
        return cls(
            latents=randn(1, tokens, noise),
            cond=torch.cat([cond_latents, mask.to(dtype)], dim=2),
            prompt_embeds=randn(1, text_tokens, int(config["joint_attention_dim"])),
            pooled=randn(1, int(config["pooled_projection_dim"])),
            txt_ids=txt_ids,
            img_ids=img_ids,
            timesteps=torch.linspace(750.0, 750.0 / steps, steps, device=device),
        )

    def batched(self, size: int) -> StepInputs:
        """The same inputs for ``size`` requests at once, as the server's batches run them: every
        per-request tensor repeated along the batch dimension (the ids are shared)."""
        return dataclasses.replace(
            self,
            latents=self.latents.repeat(size, 1, 1),
            cond=self.cond.repeat(size, 1, 1),
            prompt_embeds=self.prompt_embeds.repeat(size, 1, 1),
            pooled=self.pooled.repeat(size, 1),
        )

    def prepare(self, fill: Any, guidance: float) -> Any:
        """The engine transformer's per-request precompute (``FillTransformer.prepare``) for these."""
        return fill.prepare(
            self.cond,
            self.prompt_embeds,
            self.pooled,
            self.timesteps,
            guidance,
            self.txt_ids,
            self.img_ids,
            self.latents.dtype,
        )

    def diffusers_kwargs(self, guidance: float, step: int = 0) -> dict[str, Any]:
        """diffusers' FluxFillPipeline call of its transformer: the timestep rounded through the latents'
        dtype and divided by 1000, guidance as float32."""
        dtype = self.latents.dtype
        return {
            "hidden_states": torch.cat((self.latents, self.cond), dim=2),
            "timestep": self.timesteps[step : step + 1].to(dtype) / 1000,
            "guidance": torch.full([1], guidance, device=self.latents.device, dtype=torch.float32),
            "pooled_projections": self.pooled,
            "encoder_hidden_states": self.prompt_embeds,
            "txt_ids": self.txt_ids,
            "img_ids": self.img_ids,
            "return_dict": False,
        }
