"""Applying a set to the engine transformer: where a diffusers layer's LoRA lands (:class:`LoraSlot`),
the side path (:class:`LoraLinear`) and :class:`LoraController` (merge or side, switching, restoring).
The strategies are described in the package docstring (:mod:`fluxfill_engine.lora`)."""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from ..config import LORA_STRATEGIES
from ..quantization import QuantizedLinear, quantize_rows
from .adapters import AdapterSet
from .files import LoraTerm

if TYPE_CHECKING:
    from ..quantization import QuantPlan
    from ..stats import LoraSwitch


@dataclass(eq=False)
class LoraSlot:
    """One engine linear layer a LoRA can touch: ``getattr(owner, attr)``.

    ``sources`` are the diffusers module paths it computes, in output-row order (three or four for a
    fused layer), ``rows`` their output rows. ``in_block``: it runs inside a (possibly compiled) block.
    """

    key: str
    owner: nn.Module
    attr: str
    sources: tuple[str, ...]
    rows: tuple[tuple[int, int], ...]
    in_features: int
    in_block: bool

    @property
    def layer(self) -> nn.Module:
        return getattr(self.owner, self.attr)

    @property
    def base(self) -> nn.Module:
        return base_layer(self.layer)


def base_layer(module: nn.Module) -> nn.Module:
    """The plain layer under the engine's side path and under a peft LoRA wrapper."""
    while True:
        if isinstance(module, LoraLinear):
            module = module.base
        elif hasattr(module, "base_layer") and hasattr(module, "lora_A"):  # peft's LoraLayer
            module = cast("Any", module).get_base_layer()
        else:
            return module


def resolve_strategy(requested: str, plan: QuantPlan | None) -> str:
    """``merge`` or ``side`` for ``EngineConfig.lora_strategy`` on a transformer quantized by ``plan``."""
    if requested not in LORA_STRATEGIES:
        raise ValueError(f"lora_strategy must be one of {list(LORA_STRATEGIES)}, got {requested!r}")
    if requested == "auto":
        return "merge" if plan is None else "side"
    if requested == "merge" and plan is not None and plan.backend != "native":
        raise ValueError(
            f"lora_strategy='merge' on a transformer quantized by the {plan.backend} backend is not "
            "supported (its weights cannot be re-quantized in place); use lora_strategy='side' or 'auto'"
        )
    return requested


class LoraLinear(nn.Module):
    """``base`` plus a low-rank side path: ``y = base(x)``, then for each source ``s`` (output rows
    ``rows[s]``) ``y[..., rows[s]] += (x @ A_s^T * scales_s) @ B_s^T``.

    ``down`` is every source's (and every adapter's) ``A`` stacked, so one GEMM reads ``x`` for all of
    them; ``ups[s]`` is source ``s``'s ``B`` with the adapters side by side along the rank. ``scales`` is
    a tensor (one value per rank column, or ``[batch, columns]`` for different sets per sample): changing
    it, or copying new values into padded buffers, recompiles nothing.
    """

    base: Any  # a linear layer: nn.Linear, QuantizedLinear or a quantization backend's
    down: torch.Tensor  # buffers, registered in __init__
    scales: torch.Tensor

    def __init__(self, base: nn.Module, rows: Sequence[tuple[int, int]]) -> None:
        super().__init__()
        self.base = base
        self.rows = tuple(rows)
        self.widths: tuple[int, ...] = tuple(0 for _ in rows)
        self.active = False
        self.padded = False
        self.register_buffer("down", None, persistent=False)
        self.register_buffer("scales", None, persistent=False)
        for index in range(len(rows)):
            self.register_buffer(f"up{index}", None, persistent=False)

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def ups(self) -> list[torch.Tensor]:
        return [getattr(self, f"up{index}") for index in range(len(self.rows))]

    def set_exact(
        self, down: torch.Tensor, ups: Sequence[torch.Tensor], widths: Sequence[int], scales: torch.Tensor
    ) -> None:
        """Buffers of exactly the set's widths (eager: no padding, nothing to skip)."""
        self.down, self.scales, self.widths, self.padded = down, scales, tuple(widths), False
        for index, up in enumerate(ups):
            setattr(self, f"up{index}", up)

    def allocate_padded(self, width: int, device: torch.device, dtype: torch.dtype) -> None:
        """Fixed buffers of ``width`` rank columns per source (compiled blocks), zero."""
        sources = len(self.rows)
        self.down = torch.zeros(sources * width, self.in_features, device=device, dtype=dtype)
        self.scales = torch.zeros(sources * width, device=device, dtype=torch.float32)
        for index, (start, end) in enumerate(self.rows):
            setattr(self, f"up{index}", torch.zeros(end - start, width, device=device, dtype=dtype))
        self.widths, self.padded = tuple(width for _ in self.rows), True

    def delta(self, x: torch.Tensor, columns: tuple[int, int] | None = None) -> torch.Tensor:
        """The side path's output alone, for input ``x`` (``columns``: ``x`` holds only those input
        channels, as the split input projection feeds them)."""
        out = x.new_zeros(*x.shape[:-1], self.out_features, dtype=self.down.dtype)
        self._add_side(out, x, columns)
        return out

    def _add_side(self, y: torch.Tensor, x: torch.Tensor, columns: tuple[int, int] | None = None) -> None:
        down = self.down if columns is None else self.down[:, columns[0] : columns[1]]
        hidden = F.linear(x.to(down.dtype), down)
        scales = self.scales
        if scales.dim() == 2:  # one row of scales per sample
            scales = scales.view(scales.shape[0], *([1] * (hidden.dim() - 2)), scales.shape[1])
        hidden = (hidden * scales).to(hidden.dtype)  # scales stay float32: peft multiplies by a Python float
        offset = 0
        for (start, end), up, width in zip(self.rows, self.ups(), self.widths, strict=True):
            if width:
                y[..., start:end] += F.linear(hidden[..., offset : offset + width], up).to(y.dtype)
            offset += width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if self.active:
            self._add_side(y, x)
        return y

    def extra_repr(self) -> str:
        return (
            f"rows={list(self.rows)}, widths={list(self.widths)}, active={self.active}, padded={self.padded}"
        )


# ---- applying a set --------------------------------------------------------------------------------


@dataclass
class _Backup:
    """A layer's pristine weights in host memory, while a merged set has written over them."""

    tensors: list[torch.Tensor]


def _host_copy(tensor: torch.Tensor) -> torch.Tensor:
    copy = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=tensor.is_cuda)
    copy.copy_(tensor, non_blocking=tensor.is_cuda)
    return copy


def _mergeable(base: nn.Module, key: str) -> None:
    if isinstance(base, (nn.Linear, QuantizedLinear)):
        return
    raise ValueError(
        f"lora_strategy='merge' cannot write into {key} ({type(base).__name__}); use lora_strategy='side'"
    )


def _weights_of(base: nn.Module) -> list[torch.Tensor]:
    if isinstance(base, QuantizedLinear):
        return [base.weight_bits, base.scale_bits]
    return [cast("torch.Tensor", base.weight)]


def _merge_rows(base: nn.Module, start: int, end: int, delta: torch.Tensor) -> None:
    """Rows ``[start, end)`` of ``base`` become their current (pristine) values plus ``delta`` (fp32)."""
    if isinstance(base, QuantizedLinear):
        current = base.weight_values[start:end].to(torch.float32) * base.weight_scale[start:end]
        values, scale = quantize_rows(current + delta, base.fmt)
        bits = values.view(torch.uint8) if base.fmt == "fp8" else values
        base.weight_bits[start:end].copy_(bits)
        base.scale_bits[start:end].copy_(scale.view(torch.int32))
        return
    rows = cast("torch.Tensor", base.weight)[start:end]
    rows.copy_((rows.to(torch.float32) + delta).to(rows.dtype))


class LoraController:
    """The LoRA state of one engine transformer: which set runs, how, and the pristine weights a
    merged set wrote over. :meth:`apply` switches sets; :meth:`reset` returns to the base model."""

    def __init__(self, slots: Iterable[LoraSlot]) -> None:
        self.slots = {slot.key: slot for slot in slots}
        self.by_path: dict[str, tuple[LoraSlot, int]] = {}
        for slot in self.slots.values():
            for index, source in enumerate(slot.sources):
                self.by_path[source] = (slot, index)
        self.applied_key: tuple | None = None
        self.strategy: str | None = None
        self.backups: dict[str, _Backup] = {}
        self.padded_width: int | None = None  # per-source rank columns of the compiled side path
        # Side paths taken out of the layers (the base model runs the plain layers again, the structure
        # the blocks were first compiled for, not a third one with idle wrappers), kept to be put back
        # with their buffers: a compiled slot's padded buffers are allocated once.
        self.parked: dict[str, LoraLinear] = {}

    def shapes(self) -> dict[str, tuple[int, int]]:
        """``{diffusers layer path: (in_features, out_features)}`` of every layer a LoRA may target."""
        return {
            path: (slot.in_features, slot.rows[index][1] - slot.rows[index][0])
            for path, (slot, index) in self.by_path.items()
        }

    @property
    def active(self) -> bool:
        return self.applied_key is not None

    def _grouped(
        self, adapters: AdapterSet, device: torch.device, dtype: torch.dtype
    ) -> dict[str, list[list[tuple[int, LoraTerm]]]]:
        """Terms per slot key, per source: ``[(adapter index, term), ...]``, on ``device`` in ``dtype``
        (a set loaded before the pipeline moved is moved with it)."""
        grouped: dict[str, list[list[tuple[int, LoraTerm]]]] = {}
        for index, adapter in enumerate(adapters.adapters):
            for path, term in adapter.terms.items():
                where = self.by_path.get(path)
                if where is None:
                    raise ValueError(
                        f"LoRA {adapter.name!r} targets {path!r}, a layer the engine does not apply LoRAs to"
                    )
                slot, source = where
                lists = grouped.setdefault(slot.key, [[] for _ in slot.sources])
                term = LoraTerm(term.down.to(device, dtype), term.up.to(device, dtype), term.scale)
                lists[source].append((index, term))
        return grouped

    @torch.no_grad()
    def apply(
        self,
        adapters: AdapterSet | None,
        strategy: str,
        device: torch.device,
        dtype: torch.dtype,
        padded: tuple[int, int] | None = None,
    ) -> LoraSwitch:
        """Make ``adapters`` (``None`` or empty: the base model) the running set, with ``strategy``
        (``merge``/``side``), for layers computing in ``dtype`` on ``device``;
        ``padded=(max_loras, max_rank)`` when the blocks are compiled. Returns what happened:
        ``switched``, ``switch_seconds``, ``strategy``, ``layers``."""
        if adapters is not None and not adapters.adapters:
            adapters = None
        key = None if adapters is None else (adapters.key, strategy, padded, device, dtype)
        cacheable = adapters is None or adapters.key is not None
        if cacheable and key == self.applied_key:
            return {"switched": False, "switch_seconds": 0.0, "strategy": self.strategy, "layers": None}
        start = time.perf_counter()
        grouped = {} if adapters is None else self._grouped(adapters, device, dtype)
        if strategy == "merge" and adapters is not None:
            for slot_key in grouped:
                _mergeable(self.slots[slot_key].base, slot_key)
        self.applied_key = self.strategy = None  # whatever fails below, nothing stale is reused
        if strategy == "merge" or adapters is None:
            self._park_side()
        if strategy == "side" or adapters is None:
            self._restore_merged(keep=())
        if adapters is not None:
            if strategy == "merge":
                self._merge(grouped)
            else:
                self._side(grouped, padded, device, dtype)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        self.applied_key = key if adapters is not None else None
        self.strategy = strategy if adapters is not None else None
        return {
            "switched": True,
            "switch_seconds": time.perf_counter() - start,
            "strategy": self.strategy,
            "layers": len(grouped),
        }

    @torch.no_grad()
    def reset(self) -> None:
        """Back to the base model: merged weights restored exactly, side paths removed."""
        self._restore_merged(keep=())
        self._park_side()
        self.parked.clear()
        self.padded_width = None
        self.applied_key = None
        self.strategy = None

    # -- merge ---------------------------------------------------------------------------------------

    def _restore_merged(self, keep: Iterable[str]) -> None:
        keep = set(keep)
        for slot_key in list(self.backups):
            slot = self.slots[slot_key]
            for tensor, saved in zip(_weights_of(slot.base), self.backups[slot_key].tensors, strict=True):
                tensor.copy_(saved, non_blocking=True)
            if slot_key not in keep:
                del self.backups[slot_key]

    def _merge(self, grouped: dict[str, list[list[tuple[int, LoraTerm]]]]) -> None:
        # Back to W0 everywhere first: layers of the old set only are done; layers of both are merged
        # again from W0 (never from W0 + old delta, which would drift).
        self._restore_merged(keep=grouped)
        for slot_key, sources in grouped.items():
            slot = self.slots[slot_key]
            base = slot.base
            if slot_key not in self.backups:
                self.backups[slot_key] = _Backup([_host_copy(t) for t in _weights_of(base)])
            for (start, end), terms in zip(slot.rows, sources, strict=True):
                if not terms:
                    continue
                (_, first), *others = terms
                delta = first.up.to(torch.float32) @ first.down.to(torch.float32) * first.scale
                for _, term in others:
                    delta.add_(term.up.to(torch.float32) @ term.down.to(torch.float32), alpha=term.scale)
                _merge_rows(base, start, end, delta)

    # -- side path -----------------------------------------------------------------------------------

    def _park_side(self, keep: Iterable[str] = ()) -> None:
        """Take the side paths out of the layers (but those in ``keep``): the plain layer runs again."""
        keep = set(keep)
        for slot in self.slots.values():
            layer = slot.layer
            if isinstance(layer, LoraLinear) and slot.key not in keep:
                setattr(slot.owner, slot.attr, layer.base)
                self.parked[slot.key] = layer

    def _wrapper(self, slot: LoraSlot) -> LoraLinear:
        layer = slot.layer
        if isinstance(layer, LoraLinear):
            return layer
        wrapper = self.parked.pop(slot.key, None)
        if wrapper is None or wrapper.base is not layer:
            wrapper = LoraLinear(layer, slot.rows)
        setattr(slot.owner, slot.attr, wrapper)
        wrapper.active = True
        return wrapper

    def _side(
        self,
        grouped: dict[str, list[list[tuple[int, LoraTerm]]]],
        padded: tuple[int, int] | None,
        device: torch.device,
        dtype: torch.dtype,
    ) -> None:
        width = None
        if padded is not None:
            max_loras, max_rank = padded
            # Slots hold the adapters side by side; a set larger than the declared limits (diffusers'
            # adapters are not limited) gets wider buffers: correct, at the price of one recompile.
            needed = max(
                (sum(t.rank for _, t in terms) for sources in grouped.values() for terms in sources),
                default=0,
            )
            width = max(max_loras * max_rank, needed)
            if self.padded_width != width:
                self.reset()
                self.padded_width = width
        elif self.padded_width is not None:
            self.reset()
        needed = [key for key, slot in self.slots.items() if key in grouped or (width and slot.in_block)]
        self._park_side(keep=needed)
        for slot_key in needed:
            slot = self.slots[slot_key]
            sources = grouped.get(slot.key)
            wrapper = self._wrapper(slot)
            sources = sources or [[] for _ in slot.sources]
            if width is not None and slot.in_block:  # a compiled block's slot: fixed, padded buffers
                if not wrapper.padded or wrapper.down.dtype != dtype or wrapper.down.device != device:
                    wrapper.allocate_padded(width, device, dtype)
                self._fill_padded(wrapper, sources)
            else:
                self._fill_exact(wrapper, sources, device, dtype)

    @staticmethod
    def _fill_exact(
        wrapper: LoraLinear,
        sources: list[list[tuple[int, LoraTerm]]],
        device: torch.device,
        dtype: torch.dtype,
    ) -> None:
        downs, ups, widths, scales = [], [], [], []
        for (start, end), terms in zip(wrapper.rows, sources, strict=True):
            widths.append(sum(t.rank for _, t in terms))
            if not terms:
                ups.append(torch.zeros(end - start, 0, device=device, dtype=dtype))
                continue
            for _, term in terms:
                downs.append(term.down)
                scales.append(torch.full((term.rank,), term.scale, device=device, dtype=torch.float32))
            ups.append(torch.cat([t.up for _, t in terms], dim=1))
        wrapper.set_exact(torch.cat(downs), ups, widths, torch.cat(scales))

    @staticmethod
    def _fill_padded(wrapper: LoraLinear, sources: list[list[tuple[int, LoraTerm]]]) -> None:
        """Copy the set into the fixed buffers: each source's terms side by side from the start of its
        block of rank columns, zeros after them, so the shapes never change."""
        wrapper.down.zero_()
        wrapper.scales.zero_()
        for index, (terms, up, width) in enumerate(zip(sources, wrapper.ups(), wrapper.widths, strict=True)):
            up.zero_()
            column = index * width
            offset = 0
            for _, term in terms:
                rank = term.rank
                wrapper.down[column + offset : column + offset + rank].copy_(term.down)
                wrapper.scales[column + offset : column + offset + rank].fill_(term.scale)
                up[:, offset : offset + rank].copy_(term.up)
                offset += rank
