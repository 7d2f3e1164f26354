"""The model arguments of every command that builds an engine (``inpaint``, ``serve``): ``--model
--base --preset --device --dtype``, with one dtype default and one device check."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..config import PRESETS
from ..devices import DTYPES, default_dtype, resolve_device

if TYPE_CHECKING:
    from ..config import EngineConfig


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``--model --base --preset --device --dtype`` to a subcommand's parser."""
    group = parser.add_argument_group("model")
    group.add_argument(
        "--model",
        type=Path,
        help="a diffusers FLUX.1 Fill folder, or a single-file transformer checkpoint with --base "
        "(default: the built-in tiny random-weight model, whose images are noise)",
    )
    group.add_argument(
        "--base", type=Path, help="with a single-file --model: the diffusers folder with the other components"
    )
    group.add_argument(
        "--preset",
        default="reference",
        choices=sorted(PRESETS),
        help="optimization preset (default: reference)",
    )
    group.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    group.add_argument(
        "--dtype",
        default=None,
        choices=DTYPES,
        help="weights dtype (default: bfloat16 on cuda, float32 on cpu)",
    )


def check_model_paths(args: argparse.Namespace) -> None:
    """Refuse a ``--model`` or ``--base`` that does not exist, before anything loads."""
    for option, path in (("--model", args.model), ("--base", args.base)):
        if path is not None and not path.exists():
            raise ValueError(f"{option}: no such file or folder: {str(path)!r}")


@dataclass(frozen=True)
class ModelArguments:
    """The model arguments with the device checked and the dtype chosen."""

    model: Path | None
    base: Path | None
    preset: str
    device: str
    dtype: str

    def engine_config(self, **fields: Any) -> EngineConfig:
        """The preset's :class:`~fluxfill_engine.config.EngineConfig` in this dtype, ``fields`` changed."""
        from ..config import EngineConfig

        return EngineConfig.preset(self.preset, dtype=self.dtype, **fields)


def resolve_model_arguments(args: argparse.Namespace) -> ModelArguments:
    """``args``' model arguments, checked: the paths exist, the device is one this machine has
    (:func:`~fluxfill_engine.devices.resolve_device`, which loads torch), the dtype defaults by device."""
    check_model_paths(args)
    device = resolve_device(args.device)
    return ModelArguments(args.model, args.base, args.preset, device, args.dtype or default_dtype(device))
