"""Each op against its reference: the fused conditioning, QK-norm + RoPE, attention backends, quantized
linear layers. One benchmark group per op; compare the rows of a group."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fluxfill_engine.attention import JointQKV, make_attention
from fluxfill_engine.conditioning import fill_conditioning
from fluxfill_engine.layers import rope_table
from fluxfill_engine.quantization import QuantizedLinear, resolve

CPU, CUDA = torch.device("cpu"), torch.device("cuda")
# (device, dtype, image side in pixels, text tokens, heads, head dim, width) per tier
TIERS = {
    "cpu": (CPU, torch.float32, 256, 128, 8, 64, 512),
    "gpu": (CUDA, torch.bfloat16, 1024, 512, 24, 128, 3072),
}
TIER_PARAMS = [pytest.param("cpu"), pytest.param("gpu", marks=pytest.mark.gpu)]


def _tokens(side: int) -> int:
    return (side // 16) ** 2


def _attention_inputs(tier: str, streams: int = 2) -> tuple[JointQKV, tuple[torch.Tensor, torch.Tensor]]:
    device, dtype, side, text, heads, head_dim, _ = TIERS[tier]
    gen = torch.Generator(device=device).manual_seed(0)
    lengths = [text, _tokens(side)] if streams == 2 else [text + _tokens(side)]

    def parts() -> list[torch.Tensor]:
        return [
            torch.randn(1, n, heads, head_dim, device=device, dtype=dtype, generator=gen) for n in lengths
        ]

    norms = [torch.rand(head_dim, device=device, dtype=dtype, generator=gen) + 0.5 for _ in lengths]
    qkv = JointQKV(parts(), parts(), parts(), norms, list(norms), eps=1e-6)
    total = sum(lengths)
    ids = torch.zeros(total, 3, device=device)
    ids[text:, 1] = torch.arange(total - text, device=device) // (side // 16)
    ids[text:, 2] = torch.arange(total - text, device=device) % (side // 16)
    axes = (16, 56, 56) if head_dim == 128 else (8, 28, 28)
    return qkv, rope_table(ids, axes)


@pytest.mark.benchmark(group="fill_cond")
@pytest.mark.parametrize("tier", TIER_PARAMS)
@pytest.mark.parametrize("impl", ["reference", "fused-op"])
def test_fill_cond(run, tier, impl):
    """The 320 conditioning channels: pack(masked latents) + 8x8-unshuffled mask, one op vs torch ops."""
    device, dtype, side, *_ = TIERS[tier]
    latents = torch.randn(1, 16, side // 8, side // 8, device=device, dtype=dtype)
    mask = (torch.rand(1, 1, side, side, device=device) > 0.5).to(dtype)
    out = run(lambda: fill_conditioning(latents, mask, 8, fused=impl == "fused-op"), device)
    assert out.shape == (1, _tokens(side), 320)


@pytest.mark.benchmark(group="qk_norm_rope")
@pytest.mark.parametrize("tier", TIER_PARAMS)
@pytest.mark.parametrize("impl", ["reference", "op"])
def test_qk_norm_rope(run, tier, impl):
    """RMSNorm of q and k (text and image weights) + RoPE, ``[B, L, H, D]`` -> ``[B, H, L, D]``."""
    import fluxfill_kernels.qk_norm_rope as kernel

    qkv, (cos, sin) = _attention_inputs(tier)
    q, k, _, q_w, k_w, txt_len = qkv.joined()
    fn = kernel.qk_norm_rope_ref if impl == "reference" else torch.ops.fluxfill.qk_norm_rope
    device = TIERS[tier][0]
    q_out, _ = run(lambda: fn(q, k, q_w, k_w, cos, sin, txt_len, 1e-6), device)
    assert q_out.shape == (1, q.shape[2], q.shape[1], q.shape[3])


ATTENTION = [
    pytest.param("cpu", "sdpa", False, id="cpu-sdpa"),
    pytest.param("cpu", "sdpa", True, id="cpu-sdpa+qk_norm_rope"),
    pytest.param("gpu", "sdpa", False, id="gpu-sdpa", marks=pytest.mark.gpu),
    pytest.param("gpu", "sdpa", True, id="gpu-sdpa+qk_norm_rope", marks=pytest.mark.gpu),
    pytest.param("gpu", "triton", False, id="gpu-triton-fused_attention", marks=pytest.mark.gpu),
]


@pytest.mark.benchmark(group="attention")
@pytest.mark.parametrize(("tier", "backend", "fused"), ATTENTION)
def test_attention_backends(run, tier, backend, fused):
    """A double-stream block's joint attention (norm, RoPE, softmax(QK^T)V) per backend."""
    qkv, rope = _attention_inputs(tier)
    device = TIERS[tier][0]
    attend = make_attention(backend, device, fused)
    out = run(lambda: attend(qkv, rope), device)
    assert out.shape[1] == sum(q.shape[1] for q in qkv.q)


@pytest.mark.benchmark(group="fused_attention-vs-reference")
@pytest.mark.gpu
@pytest.mark.parametrize("impl", ["reference", "triton"])
def test_fused_attention_kernel(run, impl):
    """The Triton flash kernel against its fp32 torch definition, real shapes."""
    import fluxfill_kernels.fused_attention as kernel

    qkv, (cos, sin) = _attention_inputs("gpu")
    q, k, v, q_w, k_w, txt_len = qkv.joined()
    fn = kernel.fused_attention_ref if impl == "reference" else torch.ops.fluxfill.fused_attention
    run(lambda: fn(q, k, v, q_w, k_w, cos, sin, txt_len, 1e-6), CUDA)


LINEAR_MODES = [
    pytest.param("cpu", "none", id="cpu-dense"),
    pytest.param("cpu", "int8-weight", id="cpu-int8-weight"),
    pytest.param("cpu", "int8", id="cpu-int8"),
    pytest.param("gpu", "none", id="gpu-bf16", marks=pytest.mark.gpu),
    pytest.param("gpu", "fp8", id="gpu-fp8", marks=pytest.mark.gpu),
    pytest.param("gpu", "fp8-weight", id="gpu-fp8-weight", marks=pytest.mark.gpu),
    pytest.param("gpu", "int8", id="gpu-int8", marks=pytest.mark.gpu),
]


@pytest.mark.benchmark(group="linear")
@pytest.mark.parametrize(("tier", "mode"), LINEAR_MODES)
def test_quantized_linear(run, tier, mode):
    """A block's MLP input projection (width -> 4 x width) over all tokens, per quantization mode."""
    device, dtype, side, text, _, _, width = TIERS[tier]
    linear = nn.Linear(width, 4 * width, device=device, dtype=dtype)
    if mode != "none":
        plan = resolve(mode, "native", device)
        linear = QuantizedLinear(linear, plan.mode)
    x = torch.randn(1, _tokens(side) + text, width, device=device, dtype=dtype)
    out = run(lambda: linear(x), device)
    assert out.shape == (1, x.shape[1], 4 * width)
