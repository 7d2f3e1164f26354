"""Reduced precision: the engine's lossless rewrites only change rounding, not results."""

import diffusers
import pytest
import torch

from fluxfill_engine import FluxFillPipeline
from fluxfill_engine.metrics import psnr_db
from fluxfill_engine.testing.tiny import tiny_components


@pytest.mark.slow
def test_bf16_agrees_with_diffusers_bf16_to_rounding():
    # Measured on this tiny model: ~53 dB (max pixel difference 0.018). Random weights make the output
    # insensitive to small conditioning errors (a 2% timestep error still gives ~50 dB), so this guards
    # against gross errors only; test_bf16_step_conditioning_equals_diffusers checks the rounding path.
    components = tiny_components(dtype=torch.bfloat16)
    gen = torch.Generator().manual_seed(1)
    image = torch.rand(1, 3, 64, 64, generator=gen)
    mask = torch.zeros(1, 1, 64, 64)
    mask[..., 16:48, 16:48] = 1
    outputs = []
    for pipeline_class in (diffusers.FluxFillPipeline, FluxFillPipeline):
        pipe = pipeline_class(**components)
        pipe.set_progress_bar_config(disable=True)
        outputs.append(
            pipe(
                prompt="a white cup",
                image=image,
                mask_image=mask,
                height=64,
                width=64,
                num_inference_steps=4,
                generator=torch.Generator().manual_seed(0),
                output_type="np",
                max_sequence_length=32,
            ).images
        )
    assert (psnr_db(*outputs) or float("inf")) >= 40.0


def test_bf16_step_conditioning_equals_diffusers():
    """Timestep and guidance go through the same bf16 roundings as in diffusers' pipeline + forward."""
    from fluxfill_engine.model import FillTransformer
    from fluxfill_engine.sampling import make_schedule

    transformer = tiny_components(dtype=torch.bfloat16)["transformer"]
    schedule = make_schedule(5, 1024, {"use_dynamic_shifting": True})
    batch, steps = 2, schedule.num_steps
    gen = torch.Generator().manual_seed(0)
    pooled = torch.randn(batch, 32, generator=gen).to(torch.bfloat16)
    with torch.no_grad():
        expected = []
        for t in schedule.timesteps:
            timestep = t.expand(batch).to(torch.bfloat16) / 1000  # the pipeline
            guidance = torch.full([1], 30.0, dtype=torch.float32).expand(batch)
            expected.append(  # the transformer's forward
                transformer.time_text_embed(
                    timestep.to(torch.bfloat16) * 1000, guidance.to(torch.bfloat16) * 1000, pooled
                )
            )
        fill = FillTransformer.from_diffusers(transformer)
        cond = torch.zeros(batch, 4, 320, dtype=torch.bfloat16)
        inputs = fill.prepare(
            cond,
            torch.zeros(batch, 3, 32, dtype=torch.bfloat16),
            pooled,
            schedule.timesteps,
            30.0,
            torch.zeros(3, 3),
            torch.zeros(4, 3),
            torch.bfloat16,
        )
    assert inputs.temb.shape == (steps, batch, 32)
    for step in range(steps):
        torch.testing.assert_close(inputs.temb[step], expected[step], rtol=2e-2, atol=2e-2)
