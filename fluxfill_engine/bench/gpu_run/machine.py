"""Part 1, ``machine``: names and versions, the measured matmul ceilings and the copy bandwidth."""

from __future__ import annotations

import os
import platform
from typing import Any

import torch

from ..measure import (
    GIB,
    MATMUL_CEILING_METHOD,
    command_output,
    device_name_of,
    git_output,
    matmul_ceiling,
    median,
    package_version,
)
from .budget import Deadline, skipped
from .record import Run


def machine_info(device: torch.device) -> dict[str, Any]:
    """Names and versions (read, not measured)."""
    info: dict[str, Any] = {
        "device": str(device),
        "device_name": device_name_of(device),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": package_version("triton"),
        "diffusers": package_version("diffusers"),
        "transformers": package_version("transformers"),
        "accelerate": package_version("accelerate"),
        "torchao": package_version("torchao"),
        "optimum_quanto": package_version("optimum-quanto"),
        "git_sha": git_output("rev-parse", "HEAD"),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        smi = command_output(
            ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"]
        )
        info.update(
            {
                "driver": smi.splitlines()[0].split(",")[1].strip() if smi else None,
                "nvidia_smi": smi,
                "cudnn": torch.backends.cudnn.version(),
                "compute_capability": f"{props.major}.{props.minor}",
                "multiprocessors": props.multi_processor_count,
                "memory_gib": props.total_memory / GIB,
            }
        )
    return info


# The ceiling each step precision is held to: the fp8 rows (the engine's native fp8 and torchao's) run
# row-wise scaled products with fast accumulation, so they are held to the measured row-wise product
# with fast accumulation, not to the tensor-wise one (faster, and what datasheets quote).
CEILING_FOR = {"bf16": ("bf16",), "fp8": ("fp8_rowwise_fast_accum", "fp8_rowwise", "fp8")}


def matmul_tflops(run: Run) -> dict[str, Any]:
    """The measured matmul ceilings (:func:`~fluxfill_engine.bench.measure.matmul_ceiling`), with a precision that cannot run here recorded as
    skipped."""
    size = run.profile.matmul_size
    result: dict[str, Any] = {"size": size, "method": f"{run.timer.method}, {MATMUL_CEILING_METHOD}"}
    for precision, value in matmul_ceiling(run.timer, size).items():
        result[precision] = value if isinstance(value, dict) else skipped(value)
    result["ceiling_for"] = {precision: list(keys) for precision, keys in CEILING_FOR.items()}
    return result


def copy_bandwidth(run: Run) -> dict[str, Any]:
    """Device-to-device copy, counting bytes read plus bytes written; warmed up, median of 10."""
    count = run.profile.copy_bytes // 4
    source = torch.randn(count, device=run.device)
    target = torch.empty_like(source)
    run.timer.warm_up(lambda: target.copy_(source))
    ms = median(run.timer.call_ms(lambda _: target.copy_(source), 10))
    return {"bytes_per_copy": 2 * count * 4, "ms": ms, "tb_per_s": 2 * count * 4 / (ms / 1000) / 1e12}


def part_machine(run: Run, deadline: Deadline, record: dict[str, Any]) -> None:
    run.item(record, "info", lambda: machine_info(run.device))
    run.item(record, "matmul", lambda: matmul_tflops(run))
    run.item(record, "copy", lambda: copy_bandwidth(run))


def measured_ceiling(run: Run, precision: str) -> tuple[str, float] | None:
    """``(ceiling name, TFLOP/s)`` a step of ``precision`` ("bf16" or "fp8") is held to, as measured in
    this part: the first of :data:`CEILING_FOR`'s that was measured; ``None`` when none was."""
    matmul = run.record["parts"]["machine"].get("items", {}).get("matmul", {})
    for key in CEILING_FOR.get(precision, ()):
        value = matmul.get(key)
        if isinstance(value, dict) and isinstance(value.get("tflops"), float):
            return key, value["tflops"]
    return None
