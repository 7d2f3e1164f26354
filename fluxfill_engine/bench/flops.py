"""Work and the ceiling it is measured against: the FLOPs of one transformer step, counted from the
shapes, and the device's dense peak per precision (datasheet, overrides, measured matmul ceiling)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from .measure import MATMUL_CEILING_METHOD, Timer, device_name_of, matmul_ceiling

MEASURED_SIZE = 8192  # the matmul ceiling's side: large enough to saturate an H100's tensor cores


@dataclass(frozen=True)
class FlopCount:
    """FLOPs of one transformer forward (2 per multiply-add), split by where they are spent.

    ``blocks`` is the 19 + 38 blocks' ``24 d^2 N + 4 N^2 d`` each (``attention`` is the ``4 N^2 d``
    part of it); ``embeddings`` the input/text/time embedders, the per-block modulation (AdaLN) and the
    output layer. Counted as the model defines them (the 384-channel input projection every step), so
    every variant is credited with the same work per step.
    """

    blocks: float
    attention: float
    embeddings: float
    image_tokens: int
    text_tokens: int
    batch: int

    @property
    def total(self) -> float:
        return self.blocks + self.embeddings

    def as_dict(self) -> dict[str, Any]:
        return {
            "total": self.total,
            "blocks": self.blocks,
            "attention": self.attention,
            "embeddings": self.embeddings,
            "image_tokens": self.image_tokens,
            "text_tokens": self.text_tokens,
            "batch": self.batch,
            "formula": "blocks x (24 d^2 N + 4 N^2 d) + embeddings, N = image + text tokens",
        }


def image_tokens_for(width: int, height: int, vae_scale_factor: int = 8) -> int:
    """Image tokens of a ``width x height`` request: one per 2x2 patch of latents (``H*W/256``)."""
    multiple = 2 * vae_scale_factor
    return (height // multiple) * (width // multiple)


def transformer_flops(
    config: Mapping[str, Any], image_tokens: int, text_tokens: int, batch: int = 1
) -> FlopCount:
    """FLOPs of one forward of a FLUX transformer with ``config`` (diffusers constructor arguments).

    Per block (double- and single-stream alike), with width ``d`` and ``N`` joint tokens: QKV ``3d^2``,
    attention output ``d^2`` and MLP ``8d^2`` multiply-adds per token (a single-stream block's fused
    ``[attn, mlp]`` output projection is ``5d^2``, its MLP input ``4d^2``: the same ``12 d^2``), so
    ``24 d^2 N`` FLOPs; ``Q K^T`` and ``P V`` add ``4 N^2 d``. At 1024x1024 (N = 4096 + 512, d = 3072)
    that is 74.4 TFLOP for the 57 blocks.
    """
    d = int(config["num_attention_heads"]) * int(config["attention_head_dim"])
    double, single = int(config["num_layers"]), int(config["num_single_layers"])
    n = image_tokens + text_tokens
    per_block_linear = 24 * d * d * n
    per_block_attention = 4 * n * n * d
    blocks = (double + single) * (per_block_linear + per_block_attention)
    attention = (double + single) * per_block_attention
    in_channels = int(config["in_channels"])
    out_channels = int(config.get("out_channels") or in_channels)
    joint = int(config["joint_attention_dim"])
    pooled = int(config["pooled_projection_dim"])
    time_proj = 256  # sinusoidal timestep features fed to the time (and guidance) MLPs
    embedders = 2 if config.get("guidance_embeds") else 1
    embeddings = (
        2 * image_tokens * in_channels * d  # x_embedder
        + 2 * text_tokens * joint * d  # context_embedder
        + embedders * 2 * (time_proj * d + d * d)  # timestep (+ guidance) MLP
        + 2 * (pooled * d + d * d)  # pooled text MLP
        + double * 2 * 2 * d * 6 * d  # AdaLN modulation, two streams
        + single * 2 * d * 3 * d  # AdaLN modulation, one stream
        + 2 * d * 2 * d  # norm_out modulation
        + 2 * image_tokens * d * out_channels  # proj_out
    )
    return FlopCount(
        blocks=float(batch * blocks),
        attention=float(batch * attention),
        embeddings=float(batch * embeddings),
        image_tokens=image_tokens,
        text_tokens=text_tokens,
        batch=batch,
    )


# ---- device peaks ----------------------------------------------------------------------------------

# Dense (no sparsity) tensor-core peaks in TFLOP/s, from NVIDIA's datasheets. Matched in this order
# against torch.cuda.get_device_name(); "fp32" is the non-tensor-core rate (torch's default matmul
# precision), "tf32" the tensor-core one.
_NVIDIA_PEAKS: list[tuple[tuple[str, ...], dict[str, float], str]] = [
    (
        ("H100", "PCIE"),
        {"bf16": 756.0, "fp16": 756.0, "fp8": 1513.0, "int8": 1513.0, "tf32": 378.0, "fp32": 51.0},
        "NVIDIA H100 PCIe datasheet, dense",
    ),
    (
        ("H100", "NVL"),
        {"bf16": 835.0, "fp16": 835.0, "fp8": 1671.0, "int8": 1671.0, "tf32": 418.0, "fp32": 60.0},
        "NVIDIA H100 NVL datasheet, dense",
    ),
    (
        ("H100",),
        {"bf16": 989.4, "fp16": 989.4, "fp8": 1978.9, "int8": 1978.9, "tf32": 494.7, "fp32": 66.9},
        "NVIDIA H100 SXM5 datasheet, dense",
    ),
    (
        ("H200",),
        {"bf16": 989.4, "fp16": 989.4, "fp8": 1978.9, "int8": 1978.9, "tf32": 494.7, "fp32": 66.9},
        "NVIDIA H200 SXM datasheet, dense",
    ),
    (
        ("B200",),
        {"bf16": 2250.0, "fp16": 2250.0, "fp8": 4500.0, "int8": 4500.0, "tf32": 1100.0, "fp32": 80.0},
        "NVIDIA B200 (HGX) datasheet, dense",
    ),
    (
        ("A100",),
        {"bf16": 312.0, "fp16": 312.0, "int8": 624.0, "tf32": 156.0, "fp32": 19.5},
        "NVIDIA A100 datasheet, dense",
    ),
    (
        ("L40S",),
        {"bf16": 362.05, "fp16": 362.05, "fp8": 733.0, "int8": 733.0, "tf32": 183.0, "fp32": 91.6},
        "NVIDIA L40S datasheet, dense",
    ),
    (
        ("L4",),
        {"bf16": 121.0, "fp16": 121.0, "fp8": 242.5, "int8": 242.5, "tf32": 60.0, "fp32": 30.3},
        "NVIDIA L4 datasheet, dense",
    ),
]


@dataclass(frozen=True)
class DevicePeak:
    """Peak TFLOP/s per precision class (``bf16``, ``fp16``, ``fp8``, ``int8``, ``tf32``, ``fp32``)."""

    device_name: str
    tflops: dict[str, float] = field(default_factory=dict)
    source: str = "unknown device: no peak known (give --peak-tflops)"
    measured_tflops: dict[str, float] = field(default_factory=dict)

    def for_precision(self, precision: str) -> float | None:
        return self.tflops.get(precision)

    def measured_for(self, precision: str) -> float | None:
        return self.measured_tflops.get(precision)

    def as_dict(self) -> dict[str, Any]:
        return {
            "device_name": self.device_name,
            "tflops": dict(self.tflops),
            "source": self.source,
            "measured_tflops": dict(self.measured_tflops),
            "measured_method": f"{MEASURED_SIZE}^3 matmul on random data, CUDA events, "
            f"{MATMUL_CEILING_METHOD}"
            if self.measured_tflops
            else None,
        }


def device_peak(
    device: torch.device,
    overrides: Mapping[str, float] | None = None,
    device_name: str | None = None,
    measure: bool = False,
) -> DevicePeak:
    """The datasheet peak of ``device`` (none known for CPUs), with ``overrides`` applied on top;
    with ``measure``, also the measured matmul ceiling (:func:`~.measure.matmul_ceiling`, CUDA only)."""
    name = device_name or device_name_of(device)
    tflops: dict[str, float] = {}
    source = "no datasheet peak known for this device"
    if device.type == "cuda":
        upper = name.upper()
        for keys, peaks, where in _NVIDIA_PEAKS:
            if all(key in upper for key in keys):
                tflops, source = dict(peaks), where
                break
    if overrides:
        tflops.update({k: float(v) for k, v in overrides.items()})
        source = f"{source}; overridden on the command line: {dict(overrides)}"
    measured: dict[str, float] = {}
    if measure and device.type == "cuda":
        ceiling = matmul_ceiling(Timer(device), MEASURED_SIZE)
        measured = {key: value["tflops"] for key, value in ceiling.items() if isinstance(value, dict)}
    return DevicePeak(name, tflops, source, measured)


def precision_class(dtype: torch.dtype, quant_mode: str | None = None) -> str:
    """The peak that bounds a variant's matmuls: ``fp8``/``int8`` for W8A8, else the compute dtype.

    Weight-only quantization dequantizes to the compute dtype, so it is bounded by that dtype's peak.
    fp32 counts against the non-tensor-core fp32 rate (torch's default ``highest`` matmul precision).
    """
    if quant_mode in ("fp8", "int8"):
        return quant_mode
    if dtype == torch.float32:
        return "tf32" if torch.get_float32_matmul_precision() != "highest" else "fp32"
    return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "fp32")
