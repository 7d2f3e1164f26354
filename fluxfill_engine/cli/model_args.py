"""The model arguments of every command that builds an engine (``inpaint``, ``serve``): ``--model
--base --preset --device --dtype``, with one dtype default and one device check; and the memory plan
(``--max-vram 16GB`` picks the fastest plan whose estimate fits, ``--memory-plan NAME`` names one; see
:mod:`fluxfill_engine.memory_plan`)."""

from __future__ import annotations

import argparse
import sys
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
    group.add_argument(
        "--max-vram",
        metavar="SIZE",
        help="device memory to fit in, e.g. 16GB or 24GB (GB = GiB, as cards are sold): runs the "
        "fastest memory plan whose estimated peak at 1024x1024 (or --width x --height) fits",
    )
    group.add_argument(
        "--memory-plan",
        metavar="NAME",
        help="run this memory plan (resident, resident-t5-quantized, offload-encoders-vae, "
        "text-encoders-on-cpu, block-streaming, block-streaming-text-on-cpu) instead of choosing one",
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
    memory_plan: str | None = None  # a name in fluxfill_engine.memory_plan.PLANS

    def engine_config(self, **fields: Any) -> EngineConfig:
        """The preset's :class:`~fluxfill_engine.config.EngineConfig` in this dtype, ``fields`` changed,
        with the memory plan's placement fields (block streaming: ``compile`` off)."""
        from ..config import EngineConfig

        config = EngineConfig.preset(self.preset, dtype=self.dtype, **fields)
        if self.memory_plan is None:
            return config
        from ..memory_plan import PLANS_BY_NAME

        return PLANS_BY_NAME[self.memory_plan].apply(config)


def resolve_model_arguments(args: argparse.Namespace) -> ModelArguments:
    """``args``' model arguments, checked: the paths exist, the device is one this machine has
    (:func:`~fluxfill_engine.devices.resolve_device`, which loads torch), the dtype defaults by device."""
    check_model_paths(args)
    device = resolve_device(args.device)
    dtype = args.dtype or default_dtype(device)
    plan = resolve_memory_plan(args, dtype)
    args.memory_plan = plan  # the plan chosen by --max-vram too: what `fluxfill serve` hands its engines
    return ModelArguments(args.model, args.base, args.preset, device, dtype, plan)


def resolve_memory_plan(args: argparse.Namespace, dtype: str) -> str | None:
    """The plan ``--memory-plan`` names, or the one ``--max-vram`` chooses for the model's own configs
    (its diffusers folder, or ``--base``; the built-in tiny model's without ``--model``) at
    ``--width`` x ``--height`` (default 1024x1024); ``None`` without either flag. Says what it chose
    on stderr; ``ValueError`` naming the flag when nothing fits."""
    max_vram, named = getattr(args, "max_vram", None), getattr(args, "memory_plan", None)
    if named is not None:
        from ..memory_plan import PLANS_BY_NAME

        if max_vram is not None:
            raise ValueError("--memory-plan and --max-vram: give one (--max-vram chooses a plan)")
        if named not in PLANS_BY_NAME:
            raise ValueError(f"--memory-plan must be one of {', '.join(PLANS_BY_NAME)}; got {named!r}")
        return named
    if max_vram is None:
        return None
    from ..memory_plan import choose_memory_plan, format_gib, parse_memory_size

    budget = parse_memory_size(max_vram, "--max-vram")
    width, height = getattr(args, "width", None) or 1024, getattr(args, "height", None) or 1024
    quant = PRESETS[args.preset].quant
    try:
        plan, estimate = choose_memory_plan(budget, width, height, quant, dtype, configs=_model_configs(args))
    except ValueError as err:
        raise ValueError(f"--max-vram {max_vram}: {err}") from None
    print(
        f"--max-vram {max_vram}: memory plan {plan.name!r} ({plan.description}); estimated peak "
        f"{format_gib(estimate.peak_bytes)} at {width}x{height}",
        file=sys.stderr,
    )
    return plan.name


def _model_configs(args: argparse.Namespace) -> Any:
    """The component configs of the model the command will load (see :func:`resolve_memory_plan`)."""
    from ..memory_plan import ModelConfigs

    if args.model is None:
        from ..testing.tiny import tiny_components

        return ModelConfigs.of_components(tiny_components(0))
    folder = args.model if args.model.is_dir() else args.base
    if folder is None:
        raise ValueError("--max-vram with a single-file --model needs --base (the folder with the configs)")
    return ModelConfigs.from_folder(folder)
