"""Flow-matching sampling: the sigma schedule (resolution-dependent shift, strength) and the Euler step.

The schedule is computed on the host once per request, in float32 numpy exactly as diffusers'
``FlowMatchEulerDiscreteScheduler`` does, so the engine and diffusers step through identical sigmas.
The loop itself then runs without host syncs: every per-step scalar is a precomputed device tensor.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

# Scheduler options the engine does not implement; a pipeline whose scheduler sets one is rejected
# up front instead of being sampled with a different schedule than the user asked for.
_UNSUPPORTED_SCHEDULER_FLAGS = (
    "use_karras_sigmas",
    "use_exponential_sigmas",
    "use_beta_sigmas",
    "invert_sigmas",
    "stochastic_sampling",
)


def calculate_shift(
    image_seq_len: int,
    base_seq_len: int = 256,
    max_seq_len: int = 4096,
    base_shift: float = 0.5,
    max_shift: float = 1.15,
) -> float:
    """FLUX's resolution-dependent shift ``mu``: linear in the number of image tokens."""
    slope = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return image_seq_len * slope + (base_shift - slope * base_seq_len)


def check_scheduler_config(scheduler_config: Any) -> None:
    """Raise ``ValueError`` for scheduler options this engine's sampler does not implement."""
    used = [flag for flag in _UNSUPPORTED_SCHEDULER_FLAGS if scheduler_config.get(flag, False)]
    if used:
        raise ValueError(
            f"scheduler config sets {used}, which fluxfill-engine's flow-matching Euler sampler does not "
            "implement; use the FLUX Fill scheduler config (dynamic shifting, no sigma conversions)"
        )


def shift_sigmas(sigmas: np.ndarray, scheduler_config: Any, mu: float) -> np.ndarray:
    """Apply the scheduler's shift to float32 sigmas (dynamic exponential/linear, or static)."""
    if scheduler_config.get("use_dynamic_shifting", False):
        if scheduler_config.get("time_shift_type", "exponential") == "linear":
            sigmas = mu / (mu + (1 / sigmas - 1))
        else:
            sigmas = math.exp(mu) / (math.exp(mu) + (1 / sigmas - 1))
    else:
        shift = scheduler_config.get("shift", 1.0)
        sigmas = shift * sigmas / (1 + (shift - 1) * sigmas)
    terminal = scheduler_config.get("shift_terminal", None)
    if terminal:
        one_minus = 1 - sigmas
        sigmas = 1 - one_minus / (one_minus[-1] / (1 - terminal))
    return sigmas


@dataclass(frozen=True)
class Schedule:
    """The sigmas one request steps through.

    ``sigmas`` has one more entry than there are steps (the terminal 0); ``timesteps`` are
    ``sigmas[:-1] * num_train_timesteps`` as float32, which is what the transformer is conditioned on.
    """

    sigmas: torch.Tensor
    timesteps: torch.Tensor

    @property
    def num_steps(self) -> int:
        return int(self.timesteps.shape[0])

    @property
    def first_sigma(self) -> float:
        return float(self.sigmas[0])


def make_schedule(
    num_inference_steps: int,
    image_seq_len: int,
    scheduler_config: Any,
    sigmas: Sequence[float] | np.ndarray | None = None,
    strength: float = 1.0,
) -> Schedule:
    """The request's schedule, on the CPU.

    ``sigmas`` defaults to ``linspace(1, 1/n, n)``; it is shifted by ``mu(image_seq_len)``, then
    ``strength < 1`` drops the first ``n - int(n * strength)`` steps (image-to-image style).
    """
    check_scheduler_config(scheduler_config)
    if sigmas is None:
        sigmas = np.linspace(1.0, 1 / num_inference_steps, num_inference_steps)
    sigmas = np.array(sigmas).astype(np.float32)
    mu = calculate_shift(
        image_seq_len,
        scheduler_config.get("base_image_seq_len", 256),
        scheduler_config.get("max_image_seq_len", 4096),
        scheduler_config.get("base_shift", 0.5),
        scheduler_config.get("max_shift", 1.15),
    )
    shifted = torch.from_numpy(np.asarray(shift_sigmas(sigmas, scheduler_config, mu))).to(torch.float32)
    timesteps = shifted * scheduler_config.get("num_train_timesteps", 1000)
    all_sigmas = torch.cat([shifted, torch.zeros(1)])

    num_steps = len(shifted)
    init_steps = min(num_steps * strength, num_steps)
    start = int(max(num_steps - init_steps, 0))
    return Schedule(sigmas=all_sigmas[start:], timesteps=timesteps[start:])


def noise_latents(image_latents: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """The flow-matching forward process at ``sigma``: ``sigma * noise + (1 - sigma) * image``."""
    return sigma * noise + (1.0 - sigma) * image_latents


def euler_step(latents: torch.Tensor, velocity: torch.Tensor, dt: torch.Tensor) -> torch.Tensor:
    """One Euler step ``x + (sigma_next - sigma) * v``, accumulated in float32.

    ``dt`` is a 0-d float32 tensor. The result has the velocity's dtype (as diffusers returns it).
    """
    return (latents.to(torch.float32) + dt * velocity).to(velocity.dtype)
