"""The step cache: exactness at threshold 0, forced steps, monotonicity, statistics, batches, masks."""

import numpy as np
import pytest
import torch

from fluxfill_engine import EngineConfig, FillRequest, FluxFillPipeline
from fluxfill_engine.cache import StepCachePolicy, mask_token_weights
from fluxfill_engine.testing.tiny import tiny_components
from tests.support import helpers

STEPS = 10


def run(config, prompt="a red cup", steps=STEPS, output_type="np", **overrides):
    pipe = FluxFillPipeline(**tiny_components()).configure(config)
    pipe.set_progress_bar_config(disable=True)
    gen = torch.Generator().manual_seed(2)
    image = torch.rand(1, 3, 48, 64, generator=gen)
    mask = torch.zeros(1, 1, 48, 64)
    mask[..., 16:32, 16:48] = 1
    kwargs = dict(
        prompt=prompt,
        image=image,
        mask_image=mask,
        height=48,
        width=64,
        num_inference_steps=steps,
        max_sequence_length=16,
        generator=torch.Generator().manual_seed(0),
        output_type=output_type,
    )
    kwargs.update(overrides)
    return pipe(**kwargs).images, pipe.last_stats


def expected_full_steps(steps, warmup, final, max_skips):
    """Which steps run in full when every non-forced step would be skipped (an independent count)."""
    full, consecutive = [], 0
    for step in range(steps):
        if step == 0 or step < warmup or step >= steps - final or consecutive >= max_skips:
            full.append(step)
            consecutive = 0
        else:
            consecutive += 1
    return full


def test_threshold_zero_is_identical_to_the_cache_off():
    off, off_stats = run(EngineConfig())
    zero, zero_stats = run(EngineConfig(step_cache_threshold=0.0))
    np.testing.assert_array_equal(off, zero)
    assert off_stats["steps_cached"] == zero_stats["steps_cached"] == 0
    assert zero_stats["steps_full"] == STEPS and off_stats["step_cache"] is None


@pytest.mark.parametrize(("warmup", "final", "max_skips"), [(1, 1, 3), (2, 2, 1), (0, 1, 5), (3, 0, 2)])
def test_huge_threshold_runs_exactly_the_forced_steps(warmup, final, max_skips):
    config = EngineConfig(
        step_cache_threshold=1e9,
        step_cache_warmup=warmup,
        step_cache_final=final,
        step_cache_max_skips=max_skips,
    )
    _, stats = run(config, output_type="latent")
    full = [step for step, cached in enumerate(stats["step_cache"]["cached"]) if not cached]
    assert full == expected_full_steps(STEPS, warmup, final, max_skips)


@pytest.mark.slow
def test_higher_threshold_never_computes_more_steps():
    counts = []
    for threshold in (0.0, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 1e9):
        _, stats = run(EngineConfig(step_cache_threshold=threshold), output_type="latent")
        counts.append(stats["steps_full"])
    assert counts == sorted(counts, reverse=True)
    assert counts[0] == STEPS and counts[-1] < STEPS


@pytest.mark.parametrize("mask_aware", [False, True])
def test_statistics_add_up(mask_aware):
    _, stats = run(
        EngineConfig(step_cache_threshold=0.3, step_cache_mask_aware=mask_aware), output_type="latent"
    )
    cache = stats["step_cache"]
    assert stats["steps_full"] + stats["steps_cached"] == stats["num_steps"] == STEPS
    assert len(cache["rel_l1"]) == len(cache["cached"]) == STEPS
    assert cache["rel_l1"][0] is None and all(value >= 0 for value in cache["rel_l1"][1:])
    assert cache["mask_aware"] is mask_aware


def test_a_batch_of_two_shares_one_decision_per_step():
    images, stats = run(EngineConfig(step_cache_threshold=0.3), prompt=["a red cup", "blue sky"])
    assert images.shape[0] == 2 and np.isfinite(images).all()
    assert len(stats["step_cache"]["cached"]) == STEPS


def test_skipping_changes_the_result_only_a_little():
    off, _ = run(EngineConfig(), output_type="latent")
    cached, stats = run(EngineConfig(step_cache_threshold=1e9), output_type="latent")
    assert stats["steps_cached"] > 0
    sqnr = helpers.sqnr(off, cached)
    # Measured: 6 of 10 steps cached, 37 dB. Skipping must change the result (finite SQNR); wrong cached
    # residuals measured 16-22 dB (the first block's residual reused, none added, the residual negated).
    assert 30 <= sqnr < float("inf")


def test_mask_token_weights():
    packed = torch.zeros(1, 4 * 6, 256)
    packed[0, 1 * 6 + 2, 7] = 1.0  # one token (row 1, column 2) of a 4x6 token grid touches the mask
    weights = mask_token_weights(packed, latent_height=8, latent_width=12, dilation=1).view(4, 6)
    expected = torch.zeros(4, 6)
    expected[0:3, 1:4] = 1
    assert torch.equal(weights, expected)
    assert torch.equal(mask_token_weights(torch.zeros(1, 24, 256), 8, 12), torch.ones(1, 24))


def test_engine_reports_cache_statistics():
    engine = helpers.tiny_engine(EngineConfig(step_cache_threshold=1e9))
    image, mask = torch.rand(3, 256, 256), torch.zeros(256, 256)
    mask[64:128, 64:192] = 1
    result = engine.run(
        FillRequest("a cup", image, mask, num_inference_steps=6, seed=0, max_megapixels=0.065)
    )
    assert result.stats["steps_full"] + result.stats["steps_cached"] == 6
    assert result.stats["steps_cached"] > 0 and len(result.stats["step_cache"]["rel_l1"]) == 6


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"step_cache_threshold": -0.1}, "step_cache_threshold"),
        ({"step_cache_threshold": float("nan")}, "step_cache_threshold"),
        ({"step_cache_warmup": -1}, "step_cache_warmup"),
        ({"step_cache_max_skips": 0}, "step_cache_max_skips"),
        ({"step_cache_final": 1.5}, "step_cache_final"),
    ],
)
def test_invalid_cache_settings(fields, match):
    with pytest.raises(ValueError, match=match):
        EngineConfig(**fields)
    assert StepCachePolicy(0.1).max_skips == 3
