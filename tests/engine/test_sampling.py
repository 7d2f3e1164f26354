"""The schedule and Euler step against diffusers' FlowMatchEulerDiscreteScheduler: sigmas, timesteps and
the Euler update (fp32 and bf16) bit-equal to the scheduler's; strength, custom sigmas and shifts."""

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from fluxfill_engine.architecture import SCHEDULER_CONFIG as FLUX_FILL_SCHEDULER_CONFIG
from fluxfill_engine.sampling import calculate_shift, euler_step, make_schedule

FLUX_SCHEDULER = FLUX_FILL_SCHEDULER_CONFIG


def diffusers_schedule(steps, seq_len, strength=1.0, sigmas=None, **overrides):
    scheduler = FlowMatchEulerDiscreteScheduler(**{**FLUX_SCHEDULER, **overrides})
    sigmas = np.linspace(1.0, 1 / steps, steps) if sigmas is None else sigmas
    scheduler.set_timesteps(sigmas=sigmas, mu=calculate_shift(seq_len))
    start = int(max(len(sigmas) - min(len(sigmas) * strength, len(sigmas)), 0))
    return scheduler.sigmas[start:], scheduler.timesteps[start:]


def test_shift_endpoints():
    assert calculate_shift(256) == pytest.approx(0.5)
    assert calculate_shift(4096) == pytest.approx(1.15)


@pytest.mark.parametrize("steps", [1, 4, 28, 50])
@pytest.mark.parametrize("seq_len", [6, 256, 1024, 4096, 9216])
def test_schedule_equals_diffusers(steps, seq_len):
    schedule = make_schedule(steps, seq_len, FLUX_SCHEDULER)
    sigmas, timesteps = diffusers_schedule(steps, seq_len)
    assert torch.equal(schedule.sigmas, sigmas)
    assert torch.equal(schedule.timesteps, timesteps)
    assert schedule.first_sigma == 1.0


@pytest.mark.parametrize("strength", [0.0, 0.3, 0.5, 0.99, 1.0])
def test_strength_drops_leading_steps(strength):
    schedule = make_schedule(10, 256, FLUX_SCHEDULER, strength=strength)
    sigmas, timesteps = diffusers_schedule(10, 256, strength=strength)
    assert torch.equal(schedule.sigmas, sigmas)
    assert torch.equal(schedule.timesteps, timesteps)
    assert schedule.num_steps == len(timesteps)


def test_custom_sigmas_and_static_and_linear_shift():
    custom = [1.0, 0.7, 0.3, 0.05]
    schedule = make_schedule(4, 512, FLUX_SCHEDULER, sigmas=custom)
    assert torch.equal(schedule.sigmas, diffusers_schedule(4, 512, sigmas=custom)[0])
    static = {**FLUX_SCHEDULER, "use_dynamic_shifting": False}
    expected, _ = diffusers_schedule(6, 512, use_dynamic_shifting=False)
    assert torch.equal(make_schedule(6, 512, static).sigmas, expected)
    linear = {**FLUX_SCHEDULER, "time_shift_type": "linear", "shift_terminal": 0.1}
    expected, _ = diffusers_schedule(6, 512, time_shift_type="linear", shift_terminal=0.1)
    assert torch.allclose(make_schedule(6, 512, linear).sigmas, expected, atol=1e-7)


@pytest.mark.parametrize("flag", ["use_karras_sigmas", "stochastic_sampling", "invert_sigmas"])
def test_unsupported_scheduler_options_are_rejected(flag):
    with pytest.raises(ValueError, match=flag):
        make_schedule(4, 256, {**FLUX_SCHEDULER, flag: True})


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_euler_step_matches_scheduler_step(dtype):
    scheduler = FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER)
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 0.25, 4), mu=calculate_shift(1024))
    schedule = make_schedule(4, 1024, FLUX_SCHEDULER)
    gen = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 6, 64, generator=gen).to(dtype)
    velocity = torch.randn(2, 6, 64, generator=gen).to(dtype)
    dts = schedule.sigmas[1:] - schedule.sigmas[:-1]
    ours, theirs = latents, latents
    for i, t in enumerate(scheduler.timesteps):
        ours = euler_step(ours, velocity, dts[i])
        theirs = scheduler.step(velocity, t, theirs, return_dict=False)[0]
    assert ours.dtype == theirs.dtype == dtype
    assert torch.equal(ours, theirs)
