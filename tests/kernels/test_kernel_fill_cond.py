"""``fluxfill::fill_cond``: reference, Triton kernel (CPU interpreter without a GPU), op registration."""

from __future__ import annotations

import types

import pytest
import torch

from fluxfill_engine.conditioning import fill_conditioning
from fluxfill_kernels import fill_cond as fill_cond_module
from fluxfill_kernels._triton import HAS_TRITON
from fluxfill_kernels.fill_cond import fill_cond_ref, fill_cond_triton
from fluxfill_kernels.tolerances import assert_matches_reference
from tests.support import helpers

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
KERNEL_DTYPES = helpers.KERNEL_DTYPES
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")

# (B, C, h, w, s): FLUX's C = 16 and s = 8, non-square, odd channel counts, a small scale factor.
SHAPES = [(1, 16, 4, 6, 8), (2, 16, 6, 4, 8), (2, 3, 2, 2, 8), (1, 5, 6, 10, 2), (2, 16, 8, 2, 2)]


def make_inputs(
    batch: int, channels: int, height: int, width: int, s: int, dtype=torch.float32, mask_dtype=None, seed=0
):
    gen = torch.Generator().manual_seed(seed)
    latents = torch.randn(batch, channels, height, width, generator=gen).to(dtype)
    # Distinct values everywhere (not just 0/1) so any misplaced element shows.
    mask = torch.rand(batch, 1, height * s, width * s, generator=gen).to(mask_dtype or dtype)
    return latents.to(DEVICE), mask.to(DEVICE)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize(
    "dtype, mask_dtype",
    [
        (torch.float32, torch.float32),
        (torch.float16, torch.float16),
        (torch.bfloat16, torch.float32),
        (torch.float16, torch.float32),
        (torch.float32, torch.float64),
    ],
)
def test_ref_is_fill_conditioning(shape, dtype, mask_dtype) -> None:
    latents, mask = make_inputs(*shape, dtype=dtype, mask_dtype=mask_dtype)
    out = fill_cond_ref(latents, mask, shape[-1])
    expected = fill_conditioning(latents, mask, shape[-1])
    assert out.dtype == dtype
    assert out.shape == (shape[0], shape[2] // 2 * shape[3] // 2, 4 * shape[1] + 4 * shape[4] ** 2)
    assert torch.equal(out, expected)


@needs_triton
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
def test_triton_matches_ref(shape, dtype) -> None:
    latents, mask = make_inputs(*shape, dtype=dtype, mask_dtype=torch.float32, seed=1)
    out = fill_cond_triton(latents, mask, shape[-1])
    assert out.dtype == dtype and out.is_contiguous()
    assert torch.equal(out, fill_cond_ref(latents, mask, shape[-1]))
    assert_matches_reference(out, fill_cond_ref(latents.float(), mask.float(), shape[-1]))


@needs_triton
def test_triton_same_dtype_mask_and_strided_inputs() -> None:
    batch, channels, height, width, s = 2, 16, 4, 6, 8
    base, mask = make_inputs(batch, 2 * channels, height + 2, width, s, dtype=torch.float16, seed=2)
    latents = base[:, ::2, 1 : height + 1]  # every other channel, rows 1..h: strided in C and h
    mask = mask[:, :, s : (height + 1) * s]
    channels_last = latents.contiguous(memory_format=torch.channels_last)
    for lat in (latents, channels_last):
        assert torch.equal(fill_cond_triton(lat, mask, s), fill_conditioning(lat, mask, s))


def test_registered_op_on_cpu_matches_ref() -> None:
    latents, mask = make_inputs(2, 16, 4, 6, 8, dtype=torch.float16, mask_dtype=torch.float32)
    latents, mask = latents.cpu(), mask.cpu()
    assert torch.equal(torch.ops.fluxfill.fill_cond(latents, mask, 8), fill_conditioning(latents, mask, 8))


@pytest.mark.gpu
def test_registered_op_on_cuda_matches_ref() -> None:
    latents, mask = make_inputs(2, 16, 64, 96, 8, dtype=torch.bfloat16, mask_dtype=torch.float32)
    assert torch.equal(torch.ops.fluxfill.fill_cond(latents, mask, 8), fill_conditioning(latents, mask, 8))


def test_cpu_kernel_prefers_native(monkeypatch) -> None:
    calls = []

    def native_fill_cond(latents, mask, s):
        calls.append(s)
        return fill_cond_ref(latents, mask, s)

    monkeypatch.setattr(fill_cond_module.native, "available", lambda op, device_type="cpu": True)
    monkeypatch.setattr(
        torch.ops, "fluxfill_native", types.SimpleNamespace(fill_cond=native_fill_cond), raising=False
    )
    latents = torch.randn(1, 4, 2, 2)
    mask = torch.rand(1, 1, 4, 4)
    out = torch.ops.fluxfill.fill_cond(latents, mask, 2)
    assert calls == [2]
    assert torch.equal(out, fill_conditioning(latents, mask, 2))


def test_opcheck() -> None:
    latents = torch.randn(2, 4, 4, 6)
    mask = torch.rand(2, 1, 8, 12)
    torch.library.opcheck(torch.ops.fluxfill.fill_cond.default, (latents, mask, 2))
    torch.library.opcheck(torch.ops.fluxfill.fill_cond.default, (latents.half(), mask, 2))


def test_compile_fullgraph_matches_eager() -> None:
    def condition(latents: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return torch.ops.fluxfill.fill_cond(latents * 2.0, mask, 2) + 1.0

    latents = torch.randn(1, 4, 4, 2)
    mask = torch.rand(1, 1, 8, 4)
    compiled = torch.compile(condition, fullgraph=True)
    assert torch.equal(compiled(latents, mask), condition(latents, mask))


BAD_INPUTS = [
    ("odd latent size", (1, 16, 5, 4), (1, 1, 40, 32), 8, "even"),
    ("3-D latents", (16, 4, 4), (1, 1, 32, 32), 8, r"\[B, C, h, w\]"),
    ("mask wrong size", (1, 16, 4, 4), (1, 1, 32, 24), 8, r"mask must be \[B, 1, h\*s, w\*s\]"),
    ("mask 2 channels", (1, 16, 4, 4), (1, 2, 32, 32), 8, "mask must be"),
    ("mask batch", (2, 16, 4, 4), (1, 1, 32, 32), 8, "mask must be"),
    ("zero scale factor", (1, 16, 4, 4), (1, 1, 32, 32), 0, "vae_scale_factor"),
]


@pytest.mark.parametrize(
    "name, lat_shape, mask_shape, s, message", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS]
)
def test_bad_shapes_raise(name, lat_shape, mask_shape, s, message) -> None:
    latents, mask = torch.zeros(lat_shape), torch.zeros(mask_shape)
    functions = [fill_cond_ref, torch.ops.fluxfill.fill_cond] + ([fill_cond_triton] if HAS_TRITON else [])
    for function in functions:
        with pytest.raises(ValueError, match=message):
            function(latents, mask, s)


def test_integer_inputs_raise() -> None:
    with pytest.raises(ValueError, match="floating point"):
        torch.ops.fluxfill.fill_cond(torch.zeros(1, 4, 2, 2), torch.zeros(1, 1, 4, 4, dtype=torch.uint8), 2)
