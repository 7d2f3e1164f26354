"""Drift measures shared by the benchmarks and the tests: SQNR and PSNR in dB."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

ArrayLike = Any  # numpy arrays, torch tensors (on any device), nested lists


def _float64(value: ArrayLike) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor: bf16/fp8 have no numpy dtype
        value = value.detach().double().cpu().numpy()
    return np.asarray(value, dtype=np.float64)


def _check_shapes(reference: ArrayLike, output: ArrayLike) -> None:
    if tuple(reference.shape) != tuple(output.shape):
        raise ValueError(f"shapes differ: {tuple(reference.shape)} vs {tuple(output.shape)}")


def sqnr_db(reference: ArrayLike, output: ArrayLike) -> float | None:
    """``20 log10(|ref| / |ref - out|)`` in dB; ``None`` when they are identical (or ``ref`` is 0).

    Two torch tensors are compared in float64 on the reference's device (a large GPU output is not
    copied to the host); anything else through numpy.
    """
    if hasattr(reference, "detach") and hasattr(output, "detach"):
        _check_shapes(reference, output)
        ref = reference.detach().double()
        out = output.detach().to(ref.device).double()
        noise, signal = float((ref - out).norm()), float(ref.norm())
    else:
        ref, out = _float64(reference), _float64(output)
        _check_shapes(ref, out)
        noise, signal = float(np.linalg.norm(ref - out)), float(np.linalg.norm(ref))
    if noise == 0.0 or signal == 0.0:
        return None
    return 20.0 * math.log10(signal / noise)


def psnr_db(reference: ArrayLike, output: ArrayLike) -> float | None:
    """PSNR of images in [0, 1] in dB; ``None`` when they are identical."""
    ref, out = _float64(reference), _float64(output)
    _check_shapes(ref, out)
    mse = float(np.mean((ref - out) ** 2))
    return None if mse == 0.0 else 10.0 * math.log10(1.0 / mse)
