"""What ``fluxfill bench`` can run, by name: the model presets, the variants ``fluxfill bench variants``
compares and whether each runs on this machine. No torch at import: the command's parser (and so
``fluxfill --help``) reads it.

A variant is a way to run the same model on the same request:

- ``diffusers``: ``diffusers.FluxFillPipeline``, eager.
- ``diffusers-compile``: the same with diffusers' regional compile
  (``transformer.compile_repeated_blocks(fullgraph=True)``).
- ``diffusers-fp8-compile``: torchao fp8 W8A8 (dynamic row-wise activations) on every linear layer,
  then the regional compile; needs a GPU with fp8 tensor cores.
- ``diffusers-fbcache``: diffusers' ``FirstBlockCacheConfig`` (``diffusers-fbcache:threshold=0.1``).
- every engine preset of :data:`fluxfill_engine.config.PRESETS` by name, with optional field overrides
  (``balanced:attention=sdpa``), and ``engine:FIELD=VALUE,...``: the ``reference`` preset with the
  given :class:`~fluxfill_engine.config.EngineConfig` fields changed.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..config import PRESETS, EngineConfig

if TYPE_CHECKING:
    import torch

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


DEFAULT_FBCACHE_THRESHOLD = 0.05  # diffusers' FirstBlockCacheConfig default


# ---- variant specs ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class VariantSpec:
    """One variant: its display ``name``, whose pipeline runs it and how it is configured."""

    name: str
    kind: str  # "diffusers" or "engine"
    base: str  # a DIFFUSERS_VARIANTS name, or the engine preset the config starts from
    config: EngineConfig | None = None
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def is_reference(self) -> bool:
        """The engine with every optimization off: the drift reference."""
        return self.kind == "engine" and self.config == PRESETS["reference"]

    def describe(self) -> dict[str, Any]:
        info: dict[str, Any] = {"kind": self.kind, "base": self.base}
        if self.kind == "diffusers":
            info["description"] = DIFFUSERS_VARIANTS[self.base]
        if self.config is not None:
            info["engine_config"] = self.config.describe()
        if self.options:
            info["options"] = dict(self.options)
        return info


def split_variant_list(text: str) -> list[str]:
    """Split a comma list of variants; ``KEY=VALUE`` items continue the ``NAME:...`` before them.

    ``"diffusers,engine:quant=fp8,compile=1,fast"`` -> ``["diffusers", "engine:quant=fp8,compile=1",
    "fast"]``.
    """
    items: list[str] = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        if "=" in part and ":" not in part:
            if not items or ":" not in items[-1]:
                raise BenchError(
                    f"variant option {part!r} has no variant before it; write NAME:{part} "
                    f"(e.g. engine:{part})"
                )
            items[-1] = f"{items[-1]},{part}"
        else:
            items.append(part)
    return items


def _engine_field_types() -> dict[str, Any]:
    return typing.get_type_hints(EngineConfig)


def _convert(field_name: str, hint: Any, raw: str) -> Any:
    """``raw`` as the type of EngineConfig field ``field_name`` (bool, int, float, str or None)."""
    args = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    text = raw.strip()
    if type(None) in args and text.lower() in ("none", "null"):
        return None
    for kind in (bool, int, float, str):
        if kind not in args:
            continue
        if kind is bool:
            lowered = text.lower()
            if lowered in ("1", "true", "yes", "on"):
                return True
            if lowered in ("0", "false", "no", "off"):
                return False
            continue
        try:
            return kind(text)
        except ValueError:
            continue
    names = " or ".join(getattr(a, "__name__", str(a)) for a in args)
    raise BenchError(f"engine field {field_name!r} expects {names}, got {raw!r}")


def parse_engine_overrides(text: str) -> dict[str, Any]:
    """``"quant=fp8,compile=1"`` -> ``{"quant": "fp8", "compile": True}``, typed by EngineConfig."""
    hints = _engine_field_types()
    valid = [f.name for f in dataclasses.fields(EngineConfig)]
    overrides: dict[str, Any] = {}
    for item in (p.strip() for p in text.split(",")):
        if not item:
            continue
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep:
            raise BenchError(f"engine option {item!r} must be FIELD=VALUE; valid fields: {valid}")
        if key not in hints:
            raise BenchError(f"unknown EngineConfig field {key!r}; valid fields: {valid}")
        overrides[key] = _convert(key, hints[key], value)
    return overrides


def parse_variant(token: str) -> VariantSpec:
    """One variant from its name (``fast``, ``diffusers-fbcache:threshold=0.1``, ``engine:quant=fp8``)."""
    token = token.strip()
    head, _, options = token.partition(":")
    head = head.strip()
    if head in DIFFUSERS_VARIANTS:
        opts: dict[str, Any] = {}
        if head == "diffusers-fbcache":
            opts["threshold"] = DEFAULT_FBCACHE_THRESHOLD
        for item in (p.strip() for p in options.split(",") if options):
            if not item:
                continue
            key, sep, value = item.partition("=")
            if head != "diffusers-fbcache" or key.strip() != "threshold" or not sep:
                allowed = "threshold=FLOAT" if head == "diffusers-fbcache" else "none"
                raise BenchError(f"variant {head!r} does not take option {item!r} (options: {allowed})")
            try:
                opts["threshold"] = float(value)
            except ValueError as err:
                raise BenchError(f"{head}: threshold must be a number, got {value!r}") from err
        return VariantSpec(name=token, kind="diffusers", base=head, options=opts)
    if head == ENGINE_PREFIX or head in PRESETS:
        base = "reference" if head == ENGINE_PREFIX else head
        overrides = parse_engine_overrides(options)
        try:
            config = dataclasses.replace(PRESETS[base], **overrides)
        except (TypeError, ValueError) as err:
            raise BenchError(f"variant {token!r}: {err}") from err
        return VariantSpec(name=token, kind="engine", base=base, config=config)
    raise BenchError(
        f"unknown variant {token!r}; known variants: {known_variants()}, or "
        f"'{ENGINE_PREFIX}:FIELD=VALUE,...' / 'PRESET:FIELD=VALUE,...' with EngineConfig fields "
        f"{[f.name for f in dataclasses.fields(EngineConfig)]}"
    )


def unavailable_reason(spec: VariantSpec, device: torch.device) -> str | None:
    """Why ``spec`` cannot run on ``device`` (hardware or a missing package), or ``None``."""
    from ..compilation import compile_unavailable_reason

    if spec.kind == "diffusers":
        if spec.base in ("diffusers-compile", "diffusers-fp8-compile"):
            reason = compile_unavailable_reason(device)
            if reason:
                return reason
        if spec.base == "diffusers-fp8-compile":
            from ..quantization import has_fp8_tensor_cores

            if importlib.util.find_spec("torchao") is None:
                return "needs torchao (pip install 'fluxfill-engine[quant]')"
            if not has_fp8_tensor_cores(device):
                return f"needs a CUDA GPU with fp8 tensor cores (compute capability >= 8.9), not {device}"
        if spec.base == "diffusers-fbcache":
            try:
                from diffusers import FirstBlockCacheConfig  # noqa: F401
            except ImportError:
                return "this diffusers has no FirstBlockCacheConfig"
        return None
    from ..attention import backend_unavailable_reason
    from ..quantization import resolve

    config = spec.config
    assert config is not None
    reason = backend_unavailable_reason(config.attention, device)
    if reason:
        return f"attention={config.attention!r}: {reason}"
    if config.quant != "none":
        try:
            resolve(config.quant, config.quant_backend, device)
        except ValueError as err:
            return str(err)
    if config.compile:
        reason = compile_unavailable_reason(device)
        if reason:
            return f"compile: {reason}"
    return None


def resolve_variants(
    requested: Sequence[str] | None, device: torch.device, include_baselines: bool = True
) -> tuple[list[VariantSpec], dict[str, str]]:
    """The variants to run, and the known variants that cannot run here (with the reason).

    Explicitly requested variants that cannot run raise :class:`BenchError` naming why and listing
    what can. With ``include_baselines``, ``diffusers`` (the speed baseline) and ``reference`` (the
    drift reference) are added at the front when missing.
    """
    skipped: dict[str, str] = {}
    for name in known_variants():
        reason = unavailable_reason(parse_variant(name), device)
        if reason is not None:
            skipped[name] = reason
    if requested is None:
        specs = [parse_variant(name) for name in known_variants() if name not in skipped]
    else:
        specs = [parse_variant(token) for token in requested]
        problems = {s.name: r for s in specs if (r := unavailable_reason(s, device)) is not None}
        if problems:
            runnable = [n for n in known_variants() if n not in skipped]
            detail = "; ".join(f"{name}: {reason}" for name, reason in problems.items())
            raise BenchError(f"cannot run on {device}: {detail}. Variants that run here: {runnable}")
    names = [s.name for s in specs]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise BenchError(f"variants listed twice: {duplicates}")
    if include_baselines:
        front = []
        if not any(s.kind == "diffusers" and s.base == "diffusers" and not s.options for s in specs):
            front.append(parse_variant("diffusers"))
        if not any(s.is_reference for s in specs):
            front.append(parse_variant("reference"))
        specs = front + specs
    if not specs:
        raise BenchError("no variant to run")
    return specs, skipped
