"""What a request asks of LoRA: :class:`LoraSpec` (a file and its strength) and its checks.

No torch here: :mod:`~fluxfill_engine.validation` imports this module alone, and so can a process that
only checks requests.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import InputError, InputTypeError
from ..limits import MAX_LORA_SCALE


@dataclass(frozen=True)
class LoraSpec:
    """One LoRA of a request: a local ``.safetensors`` file (or a folder holding diffusers'
    ``pytorch_lora_weights.safetensors``) and its strength.

    ``scale`` multiplies the LoRA's update (1.0: as trained; 0: off; negative values invert it),
    finite, within ``[-MAX_LORA_SCALE, MAX_LORA_SCALE]`` (4).
    """

    path: str | Path
    scale: float = 1.0


@dataclass(frozen=True)
class LoraLabel:
    """How errors name one LoRA of a request: ``text`` in messages (its place and path), ``field`` as
    :class:`~.errors.InputError` carries it (``loras[1]``)."""

    text: str
    field: str | None = None

    def __str__(self) -> str:
        return self.text

    def error(self, message: str, kind: type[InputError] = InputError) -> InputError:
        """``kind`` of error about this LoRA: ``"<text>: <message>"``, with its field."""
        return kind(f"{self.text}: {message}", self.field)


def lora_label(index: int, spec: LoraSpec) -> LoraLabel:
    """How errors name a LoRA: its place in the request and its path."""
    return LoraLabel(f"`loras[{index}]` ({str(spec.path)!r})", f"loras[{index}]")


def check_lora_specs(loras: Any, max_loras: int) -> tuple[LoraSpec, ...]:
    """``loras`` as checked :class:`LoraSpec` objects: a list of specs, ``{"path", "scale"}`` dicts or
    paths, at most ``max_loras``, each scale finite in ``[-4, 4]``. Files are not opened here."""
    if loras is None:
        return ()
    if isinstance(loras, (str, Path, Mapping, LoraSpec)) or not isinstance(loras, Sequence):
        raise InputTypeError(
            f'`loras` must be a list of {{"path": ..., "scale": ...}} dicts or LoraSpec objects, got {loras!r}',
            "loras",
        )
    if len(loras) > max_loras:
        raise InputError(
            f"`loras`: {len(loras)} LoRAs given, at most {max_loras} are accepted (EngineConfig.max_loras)",
            "loras",
        )
    specs = []
    for index, item in enumerate(loras):
        field = f"loras[{index}]"
        where = f"`{field}`"
        if isinstance(item, LoraSpec):
            spec = item
        elif isinstance(item, (str, Path)):
            spec = LoraSpec(item)
        elif isinstance(item, Mapping):
            unknown = sorted(set(item) - {"path", "scale"})
            if unknown:
                raise InputError(
                    f"{where}: unknown keys {unknown}; a LoRA is {{'path': ..., 'scale': ...}}", field
                )
            if "path" not in item:
                raise InputError(f"{where}: a LoRA needs a 'path' (a .safetensors file or a folder)", field)
            spec = LoraSpec(item["path"], item.get("scale", 1.0))
        else:
            raise InputTypeError(
                f"{where} must be a dict, a LoraSpec or a path, got {type(item).__name__}", field
            )
        if not isinstance(spec.path, (str, Path)) or not str(spec.path):
            raise InputTypeError(
                f"{where}.path must be a non-empty str or Path, got {spec.path!r}", f"{field}.path"
            )
        scale = spec.scale
        finite = isinstance(scale, numbers.Real) and not isinstance(scale, bool) and math.isfinite(scale)
        if not finite or abs(scale) > MAX_LORA_SCALE:
            raise InputError(
                f"{where}.scale must be a finite number in [{-MAX_LORA_SCALE:g}, {MAX_LORA_SCALE:g}], "
                f"got {scale!r} (LoRA {str(spec.path)!r})",
                f"{field}.scale",
            )
        specs.append(LoraSpec(spec.path, float(scale)))
    return tuple(specs)
