"""Weight and activation quantization of linear layers: fp8 / int8, W8A8 dynamic or weight-only.

Modes (``EngineConfig.quant``):

- ``fp8``: W8A8. e4m3 weights with per-output-channel scales; activations quantized per token at run
  time; ``torch._scaled_mm`` with row-wise scales.
- ``fp8-weight``: e4m3 weights, dequantized to the compute dtype for the matmul.
- ``int8``: W8A8 dynamic. int8 weights per channel, activations per token; ``torch._int_mm``.
- ``int8-weight``: int8 weights, dequantized to the compute dtype for the matmul.

Backends (``EngineConfig.quant_backend``): ``native`` (this module's :class:`QuantizedLinear`,
written to compile with ``fullgraph=True``), ``quanto`` (optimum-quanto; weight-only modes, since its
activation quantization needs calibration), ``torchao`` (its fp8/int8 configs; fp8 W8A8 needs a GPU of
compute capability >= 8.9), and ``auto`` (native; fp8 W8A8 on GPUs with fp8 tensor cores, else
int8-weight, as :func:`resolve` reports).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .config import QUANT_BACKENDS, QUANT_MODES

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max
INT8_MAX = 127.0
_SCALE_FLOOR = 1e-12  # an all-zero row or token must not divide by zero
# fp8 W8A8 products accumulate in the tensor cores' fast (reduced-precision) mode, as torchao's
# row-wise fp8 inference does by default: the two are compared like for like (CPUs ignore it).
FP8_FAST_ACCUM = True


@dataclass(frozen=True)
class QuantPlan:
    """What will actually run: the mode and backend after resolving ``auto``, and why."""

    mode: str
    backend: str
    reason: str


def has_fp8_tensor_cores(device: torch.device) -> bool:
    if device.type != "cuda":
        return False
    return torch.cuda.get_device_capability(device) >= (8, 9)


def _scaled_mm_supported(device: torch.device) -> bool:
    """fp8 ``_scaled_mm`` runs: on CUDA with fp8 tensor cores, and on CPU builds that implement it."""
    if device.type == "cuda":
        return has_fp8_tensor_cores(device)
    try:
        probe = torch.ones(16, 16, device=device).to(FP8)
        scale = torch.ones(16, 1, device=device)
        torch._scaled_mm(probe, probe.t(), scale_a=scale, scale_b=scale.t(), out_dtype=torch.float32)
        return True
    except (RuntimeError, NotImplementedError):
        return False


def resolve(mode: str, backend: str, device: torch.device) -> QuantPlan:
    """Check a mode/backend combination for ``device``; ``ValueError`` naming what would work."""
    if mode not in QUANT_MODES:
        raise ValueError(f"quant must be one of {list(QUANT_MODES)}, got {mode!r}")
    if backend not in QUANT_BACKENDS:
        raise ValueError(f"quant_backend must be one of {list(QUANT_BACKENDS)}, got {backend!r}")
    if mode == "none":
        return QuantPlan("none", "none", "quantization off")
    if backend == "auto":
        # fp8 W8A8 pays off only on fp8 tensor cores; a CPU build's _scaled_mm runs but is slow
        # (measured: fp8 W8A8 2.9x slower than bf16 on the cpu-mid benchmark).
        if mode == "fp8" and not has_fp8_tensor_cores(device):
            return QuantPlan(
                "int8-weight",
                "native",
                f"no fp8 tensor cores on {device}: int8 weights, compute-dtype matmuls",
            )
        return QuantPlan(mode, "native", "native kernels")
    if backend in ("quanto", "torchao"):
        package = "optimum.quanto" if backend == "quanto" else "torchao"
        if importlib.util.find_spec(package.split(".")[0]) is None:
            raise ValueError(
                f"quant_backend={backend!r} needs {package}, which is not installed "
                "(pip install 'fluxfill-engine[quant]'); quant_backend='native' needs nothing"
            )
    if backend == "quanto" and mode in ("fp8", "int8"):
        raise ValueError(
            f"quant={mode!r} with quant_backend='quanto' is not supported: quanto quantizes activations "
            f"with calibrated static scales; use quant='{mode}-weight' with quanto, or "
            f"quant_backend='native' for dynamic {mode} W8A8"
        )
    if mode == "fp8" and backend == "torchao" and not has_fp8_tensor_cores(device):
        raise ValueError(
            f"quant='fp8' with quant_backend='torchao' needs a GPU with fp8 tensor cores (compute "
            f"capability >= 8.9), not {device}; use quant_backend='native' or quant='fp8-weight'"
        )
    if mode == "fp8" and backend == "native" and not _scaled_mm_supported(device):
        raise ValueError(
            f"quant='fp8' with quant_backend='native' needs torch._scaled_mm with fp8 on {device}, which "
            "this build lacks; use quant='fp8-weight' or quant_backend='auto'"
        )
    return QuantPlan(mode, backend, f"{backend} backend")


def quantize_rows(weight: torch.Tensor, fmt: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row quantization of ``[N, K]``: ``(values [N, K], scales [N, 1] fp32)``."""
    qmax = FP8_MAX if fmt == "fp8" else INT8_MAX
    weight = weight.float()
    scale = (weight.abs().amax(dim=-1, keepdim=True) / qmax).clamp(min=_SCALE_FLOOR)
    scaled = (weight / scale).clamp(-qmax, qmax)
    values = scaled.to(FP8) if fmt == "fp8" else scaled.round().to(torch.int8)
    return values, scale


# CUDA's torch._int_mm refuses inputs of 16 rows or fewer; smaller inputs are zero-padded past it.
INT_MM_MIN_ROWS = 16


class QuantizedLinear(nn.Module):
    """A linear layer with fp8/int8 weights and per-output-channel fp32 scales (native backend).

    Quantized values and scales are kept as integer-typed buffers (uint8 / int32 bit views) so that
    ``Module.to(dtype)`` moves them but never casts them; the bias follows the module's dtype.
    """

    weight_bits: torch.Tensor  # buffers, registered in __init__
    scale_bits: torch.Tensor

    def __init__(self, linear: nn.Linear, mode: str) -> None:
        super().__init__()
        if mode not in QUANT_MODES[1:]:
            raise ValueError(f"QuantizedLinear mode must be one of {list(QUANT_MODES[1:])}, got {mode!r}")
        self.mode = mode
        self.fmt = mode.split("-")[0]
        self.in_features, self.out_features = linear.in_features, linear.out_features
        values, scale = quantize_rows(linear.weight.data, self.fmt)
        bits = values.view(torch.uint8) if self.fmt == "fp8" else values
        self.register_buffer("weight_bits", bits.contiguous())
        self.register_buffer("scale_bits", scale.contiguous().view(torch.int32))
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.data, requires_grad=False)

    @property
    def weight_values(self) -> torch.Tensor:
        return self.weight_bits.view(FP8) if self.fmt == "fp8" else self.weight_bits

    @property
    def weight_scale(self) -> torch.Tensor:
        return self.scale_bits.view(torch.float32)

    def dequantized_weight(self, dtype: torch.dtype) -> torch.Tensor:
        return (self.weight_values.to(torch.float32) * self.weight_scale).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode.endswith("-weight"):
            return F.linear(x, self.dequantized_weight(x.dtype), self.bias)
        flat = x.reshape(-1, self.in_features)
        if self.fmt == "fp8":
            values, scale = quantize_rows(flat, "fp8")
            # CUDA's _scaled_mm fuses a bias only into a bf16/fp16 output.
            fused_bias = self.bias if x.dtype in (torch.bfloat16, torch.float16) else None
            out = torch._scaled_mm(
                values,
                self.weight_values.t(),
                scale_a=scale,
                scale_b=self.weight_scale.t(),
                bias=fused_bias,
                out_dtype=x.dtype,
                use_fast_accum=FP8_FAST_ACCUM,
            )
            if self.bias is not None and fused_bias is None:
                out = out + self.bias
        else:
            values, scale = quantize_rows(flat, "int8")
            rows = values.shape[0]
            if rows <= INT_MM_MIN_ROWS:  # the modulation layers see one row per image
                values = F.pad(values, (0, 0, 0, INT_MM_MIN_ROWS + 1 - rows))
            accumulated = torch._int_mm(values, self.weight_values.t())[:rows]
            out = (accumulated.float() * scale * self.weight_scale.t()).to(x.dtype)
            if self.bias is not None:
                out = out + self.bias
        return out.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, mode={self.mode}"


def _sharing_copy(linear: nn.Linear) -> nn.Sequential:
    # The backends swap modules or parameters in place; give them a fresh Linear holding the same
    # Parameter objects so the original layer is left as it was.
    fresh = nn.Linear(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
    fresh.weight = linear.weight
    fresh.bias = linear.bias
    return nn.Sequential(fresh)


def _quanto_linear(linear: nn.Linear, mode: str) -> nn.Module:
    from optimum.quanto import freeze, qfloat8, qint8, quantize

    holder = _sharing_copy(linear)
    quantize(holder, weights=qfloat8 if mode.startswith("fp8") else qint8)
    freeze(holder)
    return holder[0]


def _torchao_linear(linear: nn.Linear, mode: str) -> nn.Module:
    from torchao.quantization import (
        Float8DynamicActivationFloat8WeightConfig,
        Float8WeightOnlyConfig,
        Int8DynamicActivationInt8WeightConfig,
        Int8WeightOnlyConfig,
        PerRow,
        quantize_,
    )

    # set_inductor_config=False: torchao would otherwise change global Inductor settings (coordinate
    # descent tuning, ...) for every model compiled later in the process, not just this one.
    configs = {
        "fp8": lambda: Float8DynamicActivationFloat8WeightConfig(
            granularity=PerRow(), set_inductor_config=False
        ),
        "fp8-weight": lambda: Float8WeightOnlyConfig(set_inductor_config=False),
        "int8": lambda: Int8DynamicActivationInt8WeightConfig(set_inductor_config=False),
        "int8-weight": lambda: Int8WeightOnlyConfig(set_inductor_config=False),
    }
    holder = _sharing_copy(linear)
    quantize_(holder, configs[mode]())
    return holder[0]


def quantize_linear(linear: nn.Linear, plan: QuantPlan) -> nn.Module:
    """A quantized replacement for ``linear`` (the original is left untouched)."""
    if plan.backend == "native":
        return QuantizedLinear(linear, plan.mode)
    if plan.backend == "quanto":
        return _quanto_linear(linear, plan.mode)
    return _torchao_linear(linear, plan.mode)


def quantize_text_encoder(module: nn.Module, plan: QuantPlan, skip: tuple[str, ...] = ("wo",)) -> int:
    """Replace the linear layers of a text encoder with quantized ones, in place; returns how many.

    ``skip`` names layers left as they are: T5's feed-forward output ``wo`` is read by transformers
    (``self.wo.weight.dtype``) and kept in full precision for stability.
    """
    targets = [
        (parent, name)
        for parent in module.modules()
        for name, child in parent.named_children()
        if isinstance(child, nn.Linear) and name not in skip
    ]
    for parent, name in targets:
        setattr(parent, name, quantize_linear(getattr(parent, name), plan))
    return len(targets)


def weight_bytes(modules: Iterable[nn.Module]) -> int:
    """Bytes of parameters and buffers of ``modules``, each storage counted once."""
    storages: dict[int, int] = {}
    for module in modules:
        if module is None:
            continue
        for tensor in [*module.parameters(), *module.buffers()]:
            for part in _storages(tensor):
                storages[part.data_ptr()] = part.nbytes()
    return sum(storages.values())


def _storages(tensor: torch.Tensor) -> list[torch.UntypedStorage]:
    # Tensor subclasses (torchao, quanto) hold their data in inner tensors.
    if hasattr(tensor, "__tensor_flatten__") and type(tensor) not in (torch.Tensor, nn.Parameter):
        names, _ = getattr(tensor, "__tensor_flatten__")()  # noqa: B009 (not on torch.Tensor's type)
        return [storage for name in names for storage in _storages(getattr(tensor, name))]
    return [tensor.untyped_storage()]
