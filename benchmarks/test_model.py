"""Whole-model pieces: one transformer forward, one sampling step, the request's conditioning and prompt
encoding, each engine against diffusers on the same weights.

CPU: the mid model (4 + 8 blocks, width 512) at 256x256 with 128 text tokens. GPU (marked ``gpu``): the
real 11.9B transformer with random weights created on the GPU, 1024x1024, 512 text tokens, bf16.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from fluxfill_engine.architecture import SCHEDULER_CONFIG
from fluxfill_engine.conditioning import latent_image_ids
from fluxfill_engine.model import FillTransformer
from fluxfill_engine.pipeline import FluxFillPipeline
from fluxfill_engine.sampling import calculate_shift, euler_step, make_schedule
from fluxfill_engine.testing.pictures import picture_and_mask
from fluxfill_engine.testing.random_models import random_transformer
from fluxfill_engine.testing.tiny import MID_MAX_SEQUENCE_LENGTH, mid_components

CPU, CUDA = torch.device("cpu"), torch.device("cuda")
TIER_PARAMS = [pytest.param("cpu"), pytest.param("gpu", marks=pytest.mark.gpu)]


class Setup:
    """A transformer (diffusers module + the engine's view of it) and one request's tensors."""

    def __init__(self, tier: str) -> None:
        if tier == "cpu":
            self.device, self.dtype, side, self.text = CPU, torch.float32, 256, MID_MAX_SEQUENCE_LENGTH
            self.transformer = mid_components(0)["transformer"]
        else:
            self.device, self.dtype, side, self.text = CUDA, torch.bfloat16, 1024, 512
            self.transformer = random_transformer(device=CUDA, dtype=torch.bfloat16)
        config = self.transformer.config
        gen = torch.Generator(device=self.device).manual_seed(0)
        grid = side // 16
        self.image_tokens = grid * grid

        def randn(*shape: int) -> torch.Tensor:
            return torch.randn(*shape, generator=gen, device=self.device, dtype=self.dtype)

        self.latents = randn(1, self.image_tokens, 64)
        self.cond = randn(1, self.image_tokens, 320)
        self.prompt_embeds = randn(1, self.text, config.joint_attention_dim)
        self.pooled = randn(1, config.pooled_projection_dim)
        self.img_ids = latent_image_ids(grid, grid, self.device, self.dtype)
        self.txt_ids = torch.zeros(self.text, 3, device=self.device, dtype=self.dtype)
        self.schedule = make_schedule(28, self.image_tokens, SCHEDULER_CONFIG, None, 1.0)
        # The engine's transformer fuses QKV into views of the diffusers module's weights: both run on
        # one copy, so diffusers' forward is timed on exactly the same weights.
        self.fill = FillTransformer.from_diffusers(self.transformer)
        self.inputs = self.fill.prepare(
            self.cond,
            self.prompt_embeds,
            self.pooled,
            self.schedule.timesteps.to(self.device),
            30.0,
            self.txt_ids,
            self.img_ids,
            self.dtype,
        )

    def diffusers_forward(self, step: int = 0) -> torch.Tensor:
        t = self.schedule.timesteps[step : step + 1].to(self.device, self.dtype) / 1000
        return self.transformer(
            hidden_states=torch.cat((self.latents, self.cond), dim=2),
            timestep=t,
            guidance=torch.full([1], 30.0, device=self.device, dtype=torch.float32),
            pooled_projections=self.pooled,
            encoder_hidden_states=self.prompt_embeds,
            txt_ids=self.txt_ids,
            img_ids=self.img_ids,
            return_dict=False,
        )[0]


_SETUPS: dict[str, Setup] = {}


def setup_for(tier: str) -> Setup:
    if tier not in _SETUPS:
        _SETUPS[tier] = Setup(tier)
    return _SETUPS[tier]


@pytest.mark.benchmark(group="transformer-forward")
@pytest.mark.parametrize("tier", TIER_PARAMS)
@pytest.mark.parametrize("impl", ["diffusers", "engine"])
def test_transformer_forward(run, tier, impl):
    """One forward of the whole transformer (57 blocks on GPU, 12 on CPU)."""
    s = setup_for(tier)
    fn = s.diffusers_forward if impl == "diffusers" else (lambda: s.fill(s.latents, 0, s.inputs))
    out = run(fn, s.device, rounds=5)
    assert out.shape == (1, s.image_tokens, 64)


@pytest.mark.benchmark(group="sampling-step")
@pytest.mark.parametrize("tier", TIER_PARAMS)
@pytest.mark.parametrize("impl", ["diffusers", "engine"])
def test_sampling_step(run, tier, impl):
    """One Euler step: transformer + update (diffusers: its scheduler's ``step``)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    s = setup_for(tier)
    if impl == "diffusers":
        config = SCHEDULER_CONFIG
        scheduler = FlowMatchEulerDiscreteScheduler(**config)
        mu = calculate_shift(
            s.image_tokens,
            config["base_image_seq_len"],
            config["max_image_seq_len"],
            config["base_shift"],
            config["max_shift"],
        )
        scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / 28, 28), mu=mu, device=s.device)

        def step() -> torch.Tensor:
            scheduler._step_index = 0  # every call is step 0 of the schedule
            velocity = s.diffusers_forward(0)
            return scheduler.step(velocity, scheduler.timesteps[0], s.latents, return_dict=False)[0]

    else:
        dt = (s.schedule.sigmas[1] - s.schedule.sigmas[0]).to(s.device)

        def step() -> torch.Tensor:
            return euler_step(s.latents, s.fill(s.latents, 0, s.inputs), dt)

    out = run(step, s.device, rounds=5)
    assert out.shape == s.latents.shape


def _pipes() -> tuple[Any, FluxFillPipeline, Any, Any]:
    """diffusers' pipeline and the engine's on one set of mid components, and the benchmark's request."""
    import diffusers

    components = mid_components(0)
    image, mask = picture_and_mask(256, 256)
    return diffusers.FluxFillPipeline(**components), FluxFillPipeline(**components), image, mask


@pytest.mark.benchmark(group="conditioning")
@pytest.mark.parametrize("impl", ["diffusers", "engine", "engine-fused"])
def test_conditioning(run, impl):
    """Image + mask -> the packed 320-channel conditioning (VAE encode of the masked image included)."""
    reference, ours, image, mask = _pipes()
    init = reference.image_processor.preprocess(image, height=256, width=256).to(torch.float32)
    if impl == "diffusers":
        mask_t = reference.mask_processor.preprocess(mask, height=256, width=256)
        masked = init * (1 - mask_t)

        def fn() -> torch.Tensor:
            gen = torch.Generator().manual_seed(0)
            m, latents = reference.prepare_mask_latents(
                mask_t, masked, 1, 16, 1, 256, 256, torch.float32, CPU, gen
            )
            return torch.cat((latents, m), dim=-1)

    else:
        from fluxfill_engine.conditioning import LatentGrid, masked_image_conditioning

        mask_t = ours.mask_processor.preprocess(mask, height=256, width=256)
        grid = LatentGrid(batch=1, height=256, width=256, vae_scale_factor=ours.vae_scale_factor)
        fused = impl == "engine-fused"

        def fn() -> torch.Tensor:
            gen = torch.Generator().manual_seed(0)
            return masked_image_conditioning(ours.vae, init, mask_t, grid, torch.float32, CPU, gen, fused)

    out = run(fn, CPU)
    assert out.shape == (1, 256, 320)


@pytest.mark.benchmark(group="text-encode")
@pytest.mark.parametrize("impl", ["diffusers", "engine", "engine-cached"])
def test_prompt_encoding(run, impl):
    """CLIP pooled + T5 sequence (128 tokens); ``engine-cached`` is a prompt-cache hit."""
    reference, ours, _, _ = _pipes()
    pipe = reference if impl == "diffusers" else ours

    def fn() -> torch.Tensor:
        if impl == "engine":
            ours.prompt_cache.clear()
        return pipe.encode_prompt("a white paper cup", device=CPU, max_sequence_length=128)[0]

    out = run(fn, CPU)
    assert out.shape[:2] == (1, 128)
