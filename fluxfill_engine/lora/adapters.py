"""Adapter sets: the LoRAs one call runs, from a request's files or from diffusers' peft adapters."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn

from .files import LoraFile, LoraTerm
from .spec import LoraSpec

if TYPE_CHECKING:
    from diffusers import FluxTransformer2DModel

    from ..stats import AdapterStats


@dataclass
class Adapter:
    """One LoRA of a set: its terms with their final scales (module scale x the adapter's scale)."""

    name: str
    scale: float
    terms: dict[str, LoraTerm]

    @property
    def rank(self) -> int:
        return max((t.rank for t in self.terms.values()), default=0)


@dataclass
class AdapterSet:
    """The LoRAs one call runs. ``key`` identifies a set whose tensors never change (files), so the
    same set twice in a row costs nothing; ``None`` means "read again every call" (diffusers' adapters,
    whose weights and scales can change in place)."""

    adapters: list[Adapter]
    key: tuple | None
    source: str  # "request" (files) or "diffusers" (peft adapters)
    files: list[tuple[LoraFile, bool]] = field(default_factory=list)  # (file, came from the cache)

    def scaled(self, factor: float) -> AdapterSet:
        """The set with every adapter's strength multiplied by ``factor`` (a call's LoRA scale)."""
        if factor == 1.0:
            return self
        adapters = [
            Adapter(
                a.name,
                a.scale * factor,
                {k: LoraTerm(t.down, t.up, t.scale * factor) for k, t in a.terms.items()},
            )
            for a in self.adapters
        ]
        key = None if self.key is None else (self.key, factor)
        return AdapterSet(adapters, key, self.source, self.files)

    def describe(self) -> list[AdapterStats]:
        """Each adapter's stats, in order (a file's with its cache hit, load time and ignored parts)."""
        described = []
        for index, adapter in enumerate(self.adapters):
            info: AdapterStats = {
                "name": adapter.name,
                "scale": adapter.scale,
                "rank": adapter.rank,
                "layers": len(adapter.terms),
            }
            if index < len(self.files):
                loaded, cached = self.files[index]
                info.update(
                    cached=cached,
                    load_seconds=0.0 if cached else loaded.load_seconds,
                    ignored=loaded.ignored,
                )
            described.append(info)
        return described


def file_set(specs: Sequence[LoraSpec], files: Sequence[tuple[LoraFile, bool]]) -> AdapterSet:
    """The set of a request's files with the request's scales."""
    adapters = []
    for spec, (loaded, _) in zip(specs, files, strict=True):
        terms = {k: LoraTerm(t.down, t.up, t.scale * spec.scale) for k, t in loaded.terms.items()}
        adapters.append(Adapter(str(spec.path), spec.scale, terms))
    key = tuple((loaded.key, spec.scale) for spec, (loaded, _) in zip(specs, files, strict=True))
    return AdapterSet(adapters, key, "request", list(files))


def peft_adapter_set(transformer: FluxTransformer2DModel, call_scale: float = 1.0) -> AdapterSet | None:
    """diffusers' adapters on ``transformer`` as the set a forward of the diffusers module would run
    now: active, not fused into the weights, with peft's ``scaling`` x the call's LoRA scale.
    ``None`` when no adapter is loaded."""
    if not getattr(transformer, "peft_config", None):
        return None
    from peft.tuners.lora import LoraLayer

    adapters: dict[str, dict[str, LoraTerm]] = {}
    for path, module in transformer.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        if module.disable_adapters:
            if module.merged:
                module.unmerge()  # what peft's forward does on a disabled layer with fused adapters
            continue
        for name in module.active_adapters:
            if name not in module.lora_A or name in module.merged_adapters:
                continue
            if module.use_dora.get(name) or module.lora_bias.get(name) or name in module.lora_variant:
                raise ValueError(
                    f"diffusers adapter {name!r} on {path} is a LoRA variant (DoRA, bias, ...) that the "
                    "engine does not run; plain LoRA only"
                )
            down, up = module.lora_A[name], module.lora_B[name]
            if not isinstance(down, nn.Linear) or not isinstance(up, nn.Linear):
                raise ValueError(
                    f"diffusers adapter {name!r} on {path}: only linear-layer LoRAs are supported"
                )
            scaling = module.scaling[name]
            scaling = float(scaling.item() if isinstance(scaling, torch.Tensor) else scaling)
            term = LoraTerm(down.weight, up.weight, scaling * call_scale)
            adapters.setdefault(name, {})[path] = term
    return AdapterSet([Adapter(n, call_scale, t) for n, t in adapters.items()], None, "diffusers")
