"""Where the components live under a memory plan, and how their weights reach the device.

The :class:`~.config.EngineConfig` fields (chosen by :mod:`.memory_plan`):

- ``cpu_offload``: the text encoders and the VAE live in host memory and are copied to the device only
  for their forward passes (the VAE's encoder and decoder separately): :class:`OffloadedModule`.
- ``text_encoders_on_cpu``: CLIP and T5 stay on the CPU and run there; their outputs move to the device.
- ``quantize_on_cpu``: the transformer (with ``quant``) and T5 (with ``quantize_text_encoder``) wait in
  host memory until they are quantized, then move (:meth:`MemoryPlacement.settle`): the device never
  holds their bf16 weights.
- ``block_streaming``: the transformer's blocks live in host memory (pinned when CUDA is available) and
  each is copied to the device on a side stream while the block before it runs: :class:`BlockStreamer`.
  The layers outside the blocks (embedders, final layer: about 1% of the weights) stay on the device.

Weights move by swapping each parameter's and buffer's ``.data`` to a device copy for the call and back
to the very same host tensor afterwards: parameter objects, the engine's shared and fused views, the
quantized modules and the prompt cache's weight fingerprints are unchanged, and the math is the same
(outputs equal the resident run bit for bit on the same device). On a CPU-only machine the "device"
is the CPU: the copies are still made and swapped, so the same code path runs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.utils._pytree import tree_map

from .config import EngineConfig

if TYPE_CHECKING:
    from torch.utils.hooks import RemovableHandle

    from .model import FillTransformer

STREAMER_ATTR = "_fluxfill_block_streamer"  # on a FillTransformer: its streamer, once attached


def module_tensors(module: nn.Module) -> list[torch.Tensor]:
    """``module``'s parameters and buffers, each object once (tied weights are one)."""
    seen: dict[int, torch.Tensor] = {}
    for tensor in [*module.parameters(), *module.buffers()]:
        seen.setdefault(id(tensor), tensor)
    return list(seen.values())


def _copy_to(tensors: Iterable[torch.Tensor], device: torch.device, non_blocking: bool) -> list[torch.Tensor]:
    # copy=True: on a CPU-only machine the "device" copy is a real copy, so the swap path is exercised.
    return [t.data.to(device, non_blocking=non_blocking, copy=True) for t in tensors]


class _Swapped:
    """Tensors whose ``.data`` points at device copies until :meth:`restore`."""

    def __init__(self, tensors: list[torch.Tensor], copies: list[torch.Tensor]) -> None:
        self.tensors = tensors
        self.originals = [t.data for t in tensors]
        for tensor, copy in zip(tensors, copies, strict=True):
            tensor.data = copy

    def restore(self) -> None:
        for tensor, original in zip(self.tensors, self.originals, strict=True):
            tensor.data = original


def _versions(tensors: list[torch.Tensor]) -> list[tuple[int, int]]:
    return [(id(t), t._version) for t in tensors]


def _to_device(value: Any, device: torch.device) -> Any:
    return tree_map(lambda v: v.to(device) if isinstance(v, torch.Tensor) else v, value)


class OffloadedModule:
    """Model CPU offload of one module: its weights stay in host memory; for each forward they are
    copied to ``device`` (and its tensor arguments moved there), and afterwards (also after an error)
    the module points at its host weights again and the copies are freed."""

    def __init__(self, module: nn.Module, device: torch.device) -> None:
        self.module = module
        self.device = device
        self._swapped: list[_Swapped] = []
        self._handles: list[RemovableHandle] = [
            module.register_forward_pre_hook(self._before, with_kwargs=True),
            module.register_forward_hook(self._after, always_call=True),
        ]

    def _before(self, module: nn.Module, args: Any, kwargs: Any) -> tuple[Any, Any]:
        tensors = module_tensors(module)
        self._swapped.append(_Swapped(tensors, _copy_to(tensors, self.device, non_blocking=False)))
        return _to_device(args, self.device), _to_device(kwargs, self.device)

    def _after(self, module: nn.Module, args: Any, output: Any) -> None:
        if self._swapped:
            self._swapped.pop().restore()

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


@dataclasses.dataclass
class _Fetched:
    """One block's weights copied (or being copied) to the device."""

    tensors: list[torch.Tensor]
    copies: list[torch.Tensor]
    ready: torch.cuda.Event | None
    versions: list[tuple[int, int]]  # which tensors, at which in-place version: a stale copy is refetched


class BlockStreamer:
    """Runs a :class:`~.model.FillTransformer`'s blocks with their weights in host memory.

    Before block ``i`` runs, its weights are swapped to device copies and block ``i + 1``'s copy is
    started (on CUDA on a side stream, so it overlaps block ``i``'s compute; after the last block, the
    first block's for the next step). At most two blocks' weights are on the device at a time. After
    a block ran its weights point at the host tensors again and its copies are freed (on CUDA once the
    compute stream is done with them: ``record_stream``).
    """

    def __init__(self, fill: FillTransformer, device: torch.device) -> None:
        self.device = device
        self.blocks: list[nn.Module] = list(fill.blocks())
        self._next = {
            id(block): self.blocks[(i + 1) % len(self.blocks)] for i, block in enumerate(self.blocks)
        }
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self._pending: dict[int, _Fetched] = {}
        self._running: dict[int, _Swapped] = {}
        self.copies_made = 0  # blocks copied to the device so far (tests and stats)
        self._handles: list[RemovableHandle] = []
        for block in self.blocks:
            self._handles.append(block.register_forward_pre_hook(self._before))
            self._handles.append(block.register_forward_hook(self._after, always_call=True))

    def _fetch(self, block: nn.Module) -> _Fetched:
        tensors = module_tensors(block)  # read at each call: LoRA side paths come and go
        self.copies_made += 1
        if self.stream is None:
            return _Fetched(
                tensors, _copy_to(tensors, self.device, non_blocking=False), None, _versions(tensors)
            )
        self.stream.wait_stream(torch.cuda.current_stream(self.device))  # weights written before (LoRA)
        with torch.cuda.stream(self.stream):
            copies = _copy_to(tensors, self.device, non_blocking=True)
            ready = torch.cuda.Event()
            ready.record(self.stream)
        return _Fetched(tensors, copies, ready, _versions(tensors))

    def _before(self, block: nn.Module, args: Any) -> None:
        fetched = self._pending.pop(id(block), None)
        if fetched is None or fetched.versions != _versions(module_tensors(block)):
            fetched = self._fetch(block)
        upcoming = self._next[id(block)]
        if upcoming is not block and id(upcoming) not in self._pending:
            self._pending[id(upcoming)] = self._fetch(upcoming)
        if fetched.ready is not None:
            compute = torch.cuda.current_stream(self.device)
            compute.wait_event(fetched.ready)
            for copy in fetched.copies:
                copy.record_stream(compute)  # allocated on the side stream, used on this one
        self._running[id(block)] = _Swapped(fetched.tensors, fetched.copies)

    def _after(self, block: nn.Module, args: Any, output: Any) -> None:
        swapped = self._running.pop(id(block), None)
        if swapped is not None:
            swapped.restore()

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._pending.clear()


def repoint_storages(tensors: Iterable[torch.Tensor], pin: bool) -> int:
    """Give the storages of ``tensors`` new host memory (page-locked with ``pin``), keeping every
    tensor's offset, shape and stride: tensors that shared a storage (the engine's fused weights and
    the diffusers layers viewing them) share the new one. Returns the bytes moved. Storages already
    pinned are left (with ``pin``)."""
    groups: dict[int, list[torch.Tensor]] = {}
    for tensor in tensors:
        if tensor.device.type != "cpu" or (pin and tensor.is_pinned()):
            continue
        groups.setdefault(tensor.untyped_storage().data_ptr(), []).append(tensor)
    moved = 0
    for members in groups.values():
        old = members[0].untyped_storage()
        new = torch.empty(old.nbytes(), dtype=torch.uint8, pin_memory=pin)
        new.copy_(torch.empty(0, dtype=torch.uint8).set_(old))
        for tensor in members:
            view = torch.empty(0, dtype=tensor.dtype)
            tensor.data = view.set_(
                new.untyped_storage(), tensor.storage_offset(), tensor.shape, tensor.stride()
            )
        moved += old.nbytes()
    return moved


def _outer_modules(transformer: nn.Module) -> list[nn.Module]:
    """The diffusers transformer's layers outside the blocks (embedders, final norm and projection)."""
    blocks = {"transformer_blocks", "single_transformer_blocks"}
    return [child for name, child in transformer.named_children() if name not in blocks]


@dataclasses.dataclass
class MemoryPlacement:
    """Where a pipeline's components live and run under a configuration's memory fields."""

    device: torch.device
    cpu_offload: bool
    text_encoders_on_cpu: bool
    block_streaming: bool
    quantize_on_cpu: bool
    offloaded: list[OffloadedModule] = dataclasses.field(default_factory=list)
    streamed: list[FillTransformer] = dataclasses.field(default_factory=list)
    deferred: list[nn.Module] = dataclasses.field(default_factory=list)  # to the device once quantized
    pinned_bytes: int = 0

    @property
    def key(self) -> tuple[torch.device, bool, bool, bool, bool]:
        return (
            self.device,
            self.cpu_offload,
            self.text_encoders_on_cpu,
            self.block_streaming,
            self.quantize_on_cpu,
        )

    def describe(self) -> dict[str, Any]:
        return {
            "device": str(self.device),
            "text_encoders": "cpu"
            if self.text_encoders_on_cpu
            else ("offloaded" if self.cpu_offload else "device"),
            "vae": "offloaded" if self.cpu_offload else "device",
            "transformer": "block streaming" if self.block_streaming else "device",
            "quantize_on_cpu": self.quantize_on_cpu,
            "pinned_bytes": self.pinned_bytes,
        }

    def attach(self, fill: FillTransformer) -> None:
        """Stream ``fill``'s blocks (once per engine transformer; a rebuilt one gets its own streamer)."""
        if not self.block_streaming or STREAMER_ATTR in fill.__dict__:
            return
        pin = torch.cuda.is_available()  # page-locked memory needs CUDA; on a CPU the copies are plain
        tensors = [t for block in fill.blocks() for t in module_tensors(block)]
        source = fill.source[0]
        tensors += [t for t in module_tensors(source) if t.device.type == "cpu"]
        if pin:
            self.pinned_bytes += repoint_storages(tensors, pin=True)
        fill.__dict__[STREAMER_ATTR] = BlockStreamer(fill, self.device)
        self.streamed.append(fill)

    def settle(self) -> None:
        """Move the modules that waited in host memory to be quantized to the device (call once they
        are: a quantized engine transformer moves with its module and stays in sync)."""
        for module in self.deferred:
            module.to(self.device)
        self.deferred.clear()

    def remove(self) -> None:
        """Take the hooks off: the modules run where their weights are."""
        for offloaded in self.offloaded:
            offloaded.remove()
        self.offloaded.clear()
        for fill in self.streamed:
            streamer = fill.__dict__.pop(STREAMER_ATTR, None)
            if streamer is not None:
                streamer.remove()
        self.streamed.clear()


def uses_memory_plan(config: EngineConfig) -> bool:
    """Whether ``config`` places components anywhere but all on the device."""
    return (
        config.cpu_offload or config.text_encoders_on_cpu or config.block_streaming or config.quantize_on_cpu
    )


def place_components(pipe: Any, config: EngineConfig, device: str | torch.device) -> MemoryPlacement:
    """Move ``pipe``'s components where ``config``'s memory fields say, for running on ``device``; the
    pipeline keeps the placement (``pipe.memory_placement``). Nothing goes to the device that the plan
    keeps in host memory, so a model that does not fit the device loads (on the CPU) and is placed."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    previous = getattr(pipe, "memory_placement", None)
    if previous is not None:
        previous.remove()
    placement = MemoryPlacement(
        device,
        config.cpu_offload,
        config.text_encoders_on_cpu,
        config.block_streaming,
        config.quantize_on_cpu,
    )
    cpu = torch.device("cpu")
    transformer = pipe.transformer
    pipe.runtime.release()  # the engine transformer's views follow the move; rebuilt on first use
    if config.block_streaming:
        transformer.to(cpu)
        for module in _outer_modules(transformer):
            module.to(device)
    elif config.quantize_on_cpu and config.quant != "none" and pipe.runtime.quant_plan is None:
        transformer.to(cpu)
        placement.deferred.append(transformer)
    else:
        transformer.to(device)
    for name in ("text_encoder", "text_encoder_2"):
        encoder = getattr(pipe, name, None)
        if encoder is None:
            continue
        if config.text_encoders_on_cpu:
            encoder.to(cpu)
        elif config.cpu_offload:
            encoder.to(cpu)
            placement.offloaded.append(OffloadedModule(encoder, device))
        elif name == "text_encoder_2" and config.quantize_on_cpu and config.quantize_text_encoder:
            encoder.to(cpu)  # quantized by configure if it is not yet (once quantized, moving is cheap)
            placement.deferred.append(encoder)
        else:
            encoder.to(device)
    vae = pipe.vae
    if config.cpu_offload:
        vae.to(cpu)
        for part in vae.children():
            if module_tensors(part):
                placement.offloaded.append(OffloadedModule(part, device))
    else:
        vae.to(device)
    pipe.prompt_cache.clear()  # entries on another device
    pipe.memory_placement = placement
    return placement
