"""EngineConfig: presets, validation, and applying a config to the drop-in pipeline."""

import dataclasses

import pytest
import torch

from fluxfill_engine import EngineConfig, FluxFillPipeline
from fluxfill_engine.testing.tiny import tiny_components


def test_reference_preset_turns_everything_off():
    config = EngineConfig.preset("reference")
    assert config == EngineConfig()
    assert config.dtype is None and config.attention == "sdpa"
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.attention = "x"


def test_preset_overrides_and_unknown_names():
    assert EngineConfig.preset("reference", dtype="bf16").torch_dtype == torch.bfloat16
    with pytest.raises(ValueError, match="unknown preset"):
        EngineConfig.preset("ludicrous")


@pytest.mark.parametrize(
    ("fields", "error", "match"),
    [
        ({"dtype": "int8"}, ValueError, "dtype"),
        ({"attention": "flash9"}, ValueError, "attention"),
        ({"prompt_cache_size": -1}, ValueError, "prompt_cache_size"),
        ({"prompt_cache_size": 2.0}, TypeError, "prompt_cache_size"),
    ],
)
def test_invalid_fields(fields, error, match):
    with pytest.raises(error, match=match):
        EngineConfig(**fields)


def test_configure_returns_pipeline_and_applies_dtype():
    pipe = FluxFillPipeline(**tiny_components())
    assert pipe.engine_config == EngineConfig.preset("reference")
    assert pipe.configure(EngineConfig(dtype="bfloat16")) is pipe
    assert pipe.transformer.dtype == torch.bfloat16
    assert pipe.engine_transformer().dtype == torch.bfloat16
    with pytest.raises(TypeError, match="EngineConfig"):
        pipe.configure({"dtype": "bf16"})


def test_presets_build_on_each_other():
    from fluxfill_engine.config import PRESETS

    balanced, fast, fastest = PRESETS["balanced"], PRESETS["fast"], PRESETS["fastest"]
    assert (balanced.dtype, balanced.compile, balanced.fused_kernels, balanced.attention) == (
        "bfloat16",
        True,
        True,
        "auto",
    )
    assert dataclasses.replace(fast, quant="none", quant_backend="auto") == balanced and fast.quant == "fp8"
    assert dataclasses.replace(fastest, step_cache_threshold=None) == fast
    assert fastest.step_cache_threshold == 0.08
