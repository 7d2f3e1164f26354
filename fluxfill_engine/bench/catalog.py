"""What ``fluxfill bench`` can run, by name: model presets and variants. No torch here: the command's
parser (and so ``fluxfill --help``) reads it."""

from __future__ import annotations

from ..config import PRESETS

SCHEMA = "fluxfill-bench/1"
DEFAULT_PROMPT = "a white paper cup on the table"
# The model presets (built in :mod:`.models`, which keys MODEL_PRESETS by these names, in this order).
MODEL_PRESET_NAMES = ("cpu-tiny", "cpu-mid", "gpu-full")
# The default dtype of each model preset, by name.
MODEL_PRESET_DTYPES = {"cpu-tiny": "float32", "cpu-mid": "float32", "gpu-full": "bfloat16"}
DIFFUSERS_VARIANTS: dict[str, str] = {
    "diffusers": "diffusers.FluxFillPipeline, eager",
    "diffusers-compile": "diffusers.FluxFillPipeline, regional torch.compile (compile_repeated_blocks)",
    "diffusers-fp8-compile": "diffusers.FluxFillPipeline, torchao fp8 W8A8 (row-wise) + regional compile",
    "diffusers-fbcache": "diffusers.FluxFillPipeline, diffusers' FirstBlockCacheConfig",
}
ENGINE_PREFIX = "engine"


class BenchError(ValueError):
    """A benchmark request that cannot run as asked (unknown variant, unavailable hardware, ...)."""


def known_variants() -> list[str]:
    """Every variant name: the diffusers baselines, then the engine presets (``PRESETS`` order)."""
    return [*DIFFUSERS_VARIANTS, *PRESETS]
