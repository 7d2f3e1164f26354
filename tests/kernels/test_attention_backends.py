"""Attention backends and fused kernels in the engine: availability errors naming what is available,
`auto` selection (a fake timer), and each backend's images equal to the `reference` preset's (fp32, 1e-4)."""

import numpy as np
import pytest
import torch

from fluxfill_engine import EngineConfig, FluxFillPipeline
from fluxfill_engine.attention import (
    AutoAttention,
    JointQKV,
    available_backends,
    make_attention,
    sdpa_attention,
)
from fluxfill_engine.layers import rope_table
from fluxfill_engine.testing.tiny import tiny_components

CPU = torch.device("cpu")


def test_unavailable_backend_says_why_and_lists_the_available_ones():
    with pytest.raises(
        ValueError, match=r"xformers needs a CUDA device.*available: \['sdpa', 'triton', 'auto'\]"
    ):
        make_attention("xformers", CPU)
    with pytest.raises(ValueError, match="unknown attention backend"):
        make_attention("flash9", CPU)
    assert available_backends(CPU) == ["sdpa", "triton", "auto"]


def test_pipeline_with_unavailable_backend_fails_at_first_use_with_the_reason():
    pipe = FluxFillPipeline(**tiny_components()).configure(EngineConfig(attention="xformers"))
    with pytest.raises(ValueError, match="xformers needs a CUDA device"):
        pipe.engine_transformer()


def random_qkv(batch=1, txt=5, img=7, heads=2, dim=16, seed=0):
    gen = torch.Generator().manual_seed(seed)

    def parts():
        return [torch.randn(batch, n, heads, dim, generator=gen) for n in (txt, img)]

    weights = [torch.rand(dim, generator=gen) + 0.5 for _ in range(4)]
    qkv = JointQKV(parts(), parts(), parts(), weights[:2], weights[2:], eps=1e-6)
    ids = torch.stack([torch.zeros(txt + img), torch.arange(txt + img).float(), torch.zeros(txt + img)], -1)
    return qkv, rope_table(ids, (4, 6, 6))


def test_auto_times_each_candidate_once_per_shape_and_picks_the_fastest():
    calls = []
    fake_ms = {"slow": 2.0, "fast": 1.0}

    def timer(attend, qkv, rope):
        calls.append(attend.name)
        return fake_ms[attend.name]

    def named(name):
        attend = sdpa_attention(fused_kernels=False)

        def run(qkv, rope):
            return attend(qkv, rope)

        run.name = name
        return run

    auto = AutoAttention({"slow": named("slow"), "fast": named("fast")}, timer=timer)
    qkv, rope = random_qkv()
    expected = sdpa_attention(False)(qkv, rope)
    torch.testing.assert_close(auto(qkv, rope), expected, rtol=0, atol=0)
    auto(qkv, rope)
    assert sorted(calls) == ["fast", "slow"]  # measured once for this shape, then remembered
    assert list(auto.choices.values()) == ["fast"]
    other, other_rope = random_qkv(img=9)
    auto(other, other_rope)
    assert len(calls) == 4 and len(auto.choices) == 2


def run_tiny(config):
    pipe = FluxFillPipeline(**tiny_components()).configure(config)
    pipe.set_progress_bar_config(disable=True)
    gen = torch.Generator().manual_seed(3)
    image = torch.rand(1, 3, 48, 32, generator=gen)
    mask = torch.zeros(1, 1, 48, 32)
    mask[..., 8:40, 4:20] = 1
    return pipe(
        prompt=["a red cup", "blue sky"],
        image=image,
        mask_image=mask,
        height=48,
        width=32,
        num_inference_steps=2,
        max_sequence_length=20,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    ).images


@pytest.mark.parametrize(
    "config",
    [
        EngineConfig(attention="sdpa", fused_kernels=True),
        EngineConfig(attention="triton", fused_kernels=True),
        EngineConfig(attention="triton", fused_kernels=False),
        EngineConfig(attention="auto", fused_kernels=True),
    ],
    ids=lambda c: f"{c.attention}-fused{int(c.fused_kernels)}",
)
def test_backends_and_fused_kernels_match_the_reference_preset(config):
    reference = run_tiny(EngineConfig.preset("reference"))
    assert np.abs(run_tiny(config) - reference).max() <= 1e-4
