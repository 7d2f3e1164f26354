"""diffusers' model-level features on the drop-in: each gives diffusers' images, or the engine's own
path with the same numerics; nothing is ignored silently (fp32, tiny models)."""

from __future__ import annotations

import contextlib
import logging

import helpers
import pytest
import torch
from diffusers import FirstBlockCacheConfig, TaylorSeerCacheConfig

from fluxfill_engine import EngineConfig


@contextlib.contextmanager
def cache_context_around_forward(transformer):
    """diffusers' Fill loop sets no cache context, so its caches raise "No cache context is set";
    the reference wraps every forward in one, as the engine's loop does."""
    forward = transformer.forward

    def with_context(*args, **kwargs):
        with transformer.cache_context("cond"):
            return forward(*args, **kwargs)

    transformer.forward = with_context
    try:
        yield
    finally:
        del transformer.forward


FEATURES = {
    "first-block-cache": lambda t: t.enable_cache(FirstBlockCacheConfig(threshold=0.5)),
    "taylorseer-cache": lambda t: t.enable_cache(TaylorSeerCacheConfig()),
    "layerwise-casting": lambda t: t.enable_layerwise_casting(
        storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.float32
    ),
    "group-offload": lambda t: t.enable_group_offload(
        onload_device=torch.device("cpu"), offload_type="block_level", num_blocks_per_group=1
    ),
    "attention-backend": lambda t: t.set_attention_backend("native"),
}


@pytest.mark.parametrize("feature", list(FEATURES))
def test_each_feature_gives_diffusers_images_with_a_warning(pipes, feature, caplog):
    reference, ours = pipes
    FEATURES[feature](ours.transformer)  # the components are shared: both pipelines have it
    kwargs = dict(num_inference_steps=4)
    with cache_context_around_forward(reference.transformer):
        expected = reference(**helpers.call_kwargs(**kwargs)).images
    with caplog.at_level(logging.WARNING, logger="fluxfill_engine.pipeline"):
        actual = ours(**helpers.call_kwargs(**kwargs)).images
        again = ours(**helpers.call_kwargs(**kwargs)).images
    helpers.assert_close(actual, expected)
    helpers.assert_close(again, expected)
    warnings = [
        r.getMessage() for r in caplog.records if "diffusers' own transformer forward" in r.getMessage()
    ]
    assert len(warnings) == 1  # once per pipeline and set of features
    described = ours.describe()
    assert described["transformer_path"] == "diffusers" and described["diffusers_features"]


def test_without_features_the_engine_runs(pipe):
    described = pipe.describe()
    assert described["transformer_path"] == "engine" and described["diffusers_features"] == []


def test_disabling_the_feature_returns_to_the_engine(pipes):
    reference, ours = pipes
    ours.transformer.enable_cache(FirstBlockCacheConfig(threshold=0.5))
    assert ours.describe()["transformer_path"] == "diffusers"
    ours.transformer.disable_cache()
    assert ours.describe()["transformer_path"] == "engine"
    helpers.assert_close(ours(**helpers.call_kwargs()).images, reference(**helpers.call_kwargs()).images)


def test_fused_qkv_projections_run_on_the_engine_with_the_same_images(pipes):
    reference, ours = pipes
    ours.transformer.fuse_qkv_projections()
    expected = reference(**helpers.call_kwargs()).images
    assert ours.describe()["transformer_path"] == "engine"  # its QKV is fused anyway
    helpers.assert_close(ours(**helpers.call_kwargs()).images, expected)


def test_an_engine_step_cache_with_a_diffusers_cache_is_an_error(pipe):
    pipe.configure(EngineConfig(step_cache_threshold=0.1))
    pipe.transformer.enable_cache(FirstBlockCacheConfig(threshold=0.5))
    with pytest.raises(ValueError, match=r"step_cache_threshold.*enable_cache \(FirstBlockCacheConfig\)"):
        pipe(**helpers.call_kwargs())
