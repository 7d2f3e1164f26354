"""LoRA on the engine transformer: read every format diffusers reads, apply to the engine's own layers.

A LoRA adds ``scale * B @ A`` to a linear layer's weight (``A [r, in]``, ``B [out, r]``). The engine's
layers are not diffusers' one-for-one: ``to_q``/``to_k``/``to_v`` (and ``proj_mlp`` in single-stream
blocks) are one fused GEMM, so a LoRA on those sources becomes one on the fused layer: the ``A`` of
every source stacked (one GEMM for all of them) and each source's ``B`` writing only its own output
rows (a block-diagonal ``B``, computed block by block so the zeros cost nothing).

Where sets come from:

- **Files** (``FillRequest.loras``, :meth:`FluxFillPipeline.set_engine_loras`): read with diffusers'
  own ``FluxFillPipeline.lora_state_dict`` (its converters: diffusers/peft, kohya, XLabs, BFL, ...),
  scales as peft would set them (``alpha / r`` from the file's network alphas or adapter metadata),
  FLUX.1 [dev] LoRAs expanded to Fill's 384-channel input projection as diffusers does, checked
  against this model's layer shapes, cached (LRU keyed by path, size and modification time).
- **diffusers' mixin** (``pipe.load_lora_weights`` etc.): the peft layers' active adapters, their
  ``scaling`` (``set_adapters`` weights included), the call's ``joint_attention_kwargs["scale"]``,
  enable/disable and fused state are read at every call, so the engine runs diffusers' numerics.

How a set runs (:class:`LoraController`), ``EngineConfig.lora_strategy``:

- ``merge``: ``W <- W0 + sum_i s_i B_i A_i`` written into the weights (computed in float32; a native
  quantized layer is re-quantized row by row from its pristine quantized values). No per-step cost; a
  switch costs one pass over the touched layers. ``W0`` is copied to host memory before the first
  write and copied back on the next switch, so switching never drifts the base weights; the copies
  are dropped when the engine returns to the base model.
- ``side``: ``y = base(x) + (x A^T * s) B^T`` beside the (possibly quantized) base matmul; the base
  weights are never written. A per-step cost, no switch cost beyond copying the LoRA weights into the
  side path's buffers. Inside compiled blocks every layer gets the side path with every slot's rank
  padded to ``EngineConfig.max_lora_rank`` and the scales held as tensors, so switching sets changes
  tensor values only and compiles nothing new.
- ``auto`` (default): ``merge`` on an unquantized transformer; ``side`` on a quantized one, where a
  merge would round the LoRA's small update to the base's 8-bit grid (and re-quantize on every switch).

diffusers' adapters always run as a side path (diffusers' own unmerged numerics, and ``unload``
needs nothing restored).

The package's modules, each one job: :mod:`.spec` (what a request asks for and its checks; no torch),
:mod:`.files` (reading, fitting, the cache), :mod:`.adapters` (sets), :mod:`.apply` (slots, the side
path, the controller). The names below load on first use, so ``import fluxfill_engine.lora.spec``
imports no torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..lazy import lazy_exports

_EXPORTS = {
    "LoraSpec": ".spec",
    "LoraLabel": ".spec",
    "lora_label": ".spec",
    "check_lora_specs": ".spec",
    "LORA_FILE_NAME": ".files",
    "LoraTerm": ".files",
    "LoraFile": ".files",
    "LoraCache": ".files",
    "resolve_lora_file": ".files",
    "read_lora_file": ".files",
    "fit_to_model": ".files",
    "file_key": ".files",
    "Adapter": ".adapters",
    "AdapterSet": ".adapters",
    "file_set": ".adapters",
    "peft_adapter_set": ".adapters",
    "LoraSlot": ".apply",
    "LoraLinear": ".apply",
    "LoraController": ".apply",
    "base_layer": ".apply",
    "resolve_strategy": ".apply",
}

__all__ = [
    "Adapter",
    "AdapterSet",
    "LORA_FILE_NAME",
    "LoraCache",
    "LoraController",
    "LoraFile",
    "LoraLabel",
    "LoraLinear",
    "LoraSlot",
    "LoraSpec",
    "LoraTerm",
    "base_layer",
    "check_lora_specs",
    "file_key",
    "file_set",
    "fit_to_model",
    "lora_label",
    "peft_adapter_set",
    "read_lora_file",
    "resolve_lora_file",
    "resolve_strategy",
]

if TYPE_CHECKING:
    from .adapters import Adapter, AdapterSet, file_set, peft_adapter_set
    from .apply import LoraController, LoraLinear, LoraSlot, base_layer, resolve_strategy
    from .files import (
        LORA_FILE_NAME,
        LoraCache,
        LoraFile,
        LoraTerm,
        file_key,
        fit_to_model,
        read_lora_file,
        resolve_lora_file,
    )
    from .spec import LoraLabel, LoraSpec, check_lora_specs, lora_label

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
