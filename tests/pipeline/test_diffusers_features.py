"""diffusers' model-level features on the drop-in: each gives diffusers' images, or the engine's own
path with the same numerics; nothing is ignored silently (fp32, tiny models). The list of features and
the path each takes is in the docstring of ``fluxfill_engine/diffusers_path.py``.

Images equal diffusers' with the same feature: the cache configurations, fp8/bf16 layerwise casting,
group offload (block, leaf, pipeline), the ``native`` / ``_native_math`` attention backends, a custom
processor, compiled transformers, TorchAo/Quanto ``quantization_config`` and a direct ``quantize_``,
sequential CPU offload executing on the CPU. Hardware attention backends (xformers, NPU, XLA) are routed
to diffusers' forward, which this machine cannot run."""

from __future__ import annotations

import contextlib
import logging

import accelerate
import pytest
import torch
from diffusers import (
    FirstBlockCacheConfig,
    FluxFillPipeline,
    FluxTransformer2DModel,
    MagCacheConfig,
    PyramidAttentionBroadcastConfig,
    QuantoConfig,
    SeaCacheConfig,
    TaylorSeerCacheConfig,
    TextKVCacheConfig,
    TorchAoConfig,
)
from diffusers.hooks import FasterCacheConfig
from diffusers.hooks.mag_cache import FLUX_MAG_RATIOS
from diffusers.models.attention_dispatch import (
    AttentionBackendName,
    _AttentionBackendRegistry,
    attention_backend,
)
from diffusers.models.attention_processor import FluxAttnProcessor2_0_NPU
from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

from fluxfill_engine import EngineConfig
from fluxfill_engine.testing.tiny import tiny_components
from tests.support import helpers

ROUTED = "diffusers' own transformer forward"


@pytest.fixture(autouse=True)
def _restore_the_active_attention_backend():
    """``set_attention_backend`` also sets diffusers' process-wide active backend: put it back."""
    active = _AttentionBackendRegistry._active_backend
    yield
    _AttentionBackendRegistry.set_active_backend(active)


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


def routed_warnings(caplog):
    return [r.getMessage() for r in caplog.records if ROUTED in r.getMessage()]


def assert_routed(pipe, caplog, *names):
    """Routed to diffusers' forward, with one warning that names each of ``names``."""
    described = pipe.describe()
    assert described["transformer_path"] == "diffusers", described
    warnings = routed_warnings(caplog)
    assert len(warnings) == 1, warnings  # once per pipeline and set of features
    for name in names:
        assert name in warnings[0] and any(name in f for f in described["diffusers_features"]), (
            name,
            warnings,
        )


class CountingProcessor(FluxAttnProcessor):
    """A non-default processor (a stand-in for xformers/NPU/XLA ones): diffusers' attention, counted."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return super().__call__(*args, **kwargs)


def _torchao_quantize(transformer):
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    quantize_(transformer, Int8WeightOnlyConfig())


def _quanto_quantize(transformer):
    from optimum.quanto import freeze, qint8, quantize

    quantize(transformer, weights=qint8)
    freeze(transformer)


# feature -> (how to switch it on, a name the warning must contain)
FEATURES = {
    "first-block-cache": (lambda t: t.enable_cache(FirstBlockCacheConfig(threshold=0.5)), "FirstBlockCache"),
    "taylorseer-cache": (lambda t: t.enable_cache(TaylorSeerCacheConfig()), "TaylorSeerCache"),
    "mag-cache": (
        lambda t: t.enable_cache(
            MagCacheConfig(threshold=0.5, num_inference_steps=4, mag_ratios=FLUX_MAG_RATIOS)
        ),
        "MagCache",
    ),
    "pyramid-attention-broadcast": (
        lambda t: t.enable_cache(
            PyramidAttentionBroadcastConfig(
                spatial_attention_block_skip_range=2,
                spatial_attention_timestep_skip_range=(-1, 1001),
                current_timestep_callback=lambda: 500,  # diffusers' Fill pipeline has no current_timestep
            )
        ),
        "PyramidAttentionBroadcast",
    ),
    # With a name-only cache context (diffusers' FluxPipeline gives the same) SeaCache fails open.
    "sea-cache": (lambda t: t.enable_cache(SeaCacheConfig()), "SeaCache"),
    "text-kv-cache": (lambda t: t.enable_cache(TextKVCacheConfig()), "TextKVCache"),
    "layerwise-casting": (
        lambda t: t.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.float32),
        "enable_layerwise_casting",
    ),
    "group-offload-block": (
        lambda t: t.enable_group_offload(
            onload_device=torch.device("cpu"), offload_type="block_level", num_blocks_per_group=1
        ),
        "enable_group_offload",
    ),
    "group-offload-leaf": (
        lambda t: t.enable_group_offload(onload_device=torch.device("cpu"), offload_type="leaf_level"),
        "enable_group_offload",
    ),
    "attention-backend-native": (lambda t: t.set_attention_backend("native"), "attention backend native"),
    "attention-backend-math": (
        lambda t: t.set_attention_backend("_native_math"),
        "attention backend _native_math",
    ),
    "attention-processor": (lambda t: t.set_attn_processor(CountingProcessor()), "CountingProcessor"),
    "compile-repeated-blocks": (lambda t: t.compile_repeated_blocks(backend="eager"), "torch.compile"),
    "torchao-quantize": (_torchao_quantize, "Int8Tensor"),
    "quanto-quantize": (_quanto_quantize, "QLinear"),
}


@pytest.mark.slow
@pytest.mark.parametrize("feature", list(FEATURES))
def test_each_feature_gives_diffusers_images_with_a_warning(pipes, feature, caplog):
    reference, ours = pipes
    switch_on, name = FEATURES[feature]
    switch_on(ours.transformer)  # the components are shared: both pipelines have it
    kwargs = dict(num_inference_steps=4)
    with cache_context_around_forward(reference.transformer):
        expected = reference(**helpers.call_kwargs(**kwargs)).images
    with caplog.at_level(logging.WARNING, logger="fluxfill_engine.pipeline"):
        actual = ours(**helpers.call_kwargs(**kwargs)).images
        again = ours(**helpers.call_kwargs(**kwargs)).images
    helpers.assert_close(actual, expected)
    helpers.assert_close(again, expected)
    assert_routed(ours, caplog, name)


@pytest.mark.slow
def test_the_caches_change_the_images(pipes):
    # The comparisons above are not vacuous: these caches skip work on the tiny model in 4 steps.
    reference, ours = pipes
    uncached = reference(**helpers.call_kwargs(num_inference_steps=4)).images
    for config in (
        FirstBlockCacheConfig(threshold=0.5),
        MagCacheConfig(threshold=0.5, num_inference_steps=4, mag_ratios=FLUX_MAG_RATIOS),
    ):
        ours.transformer.enable_cache(config)
        assert (
            helpers.max_abs_diff(ours(**helpers.call_kwargs(num_inference_steps=4)).images, uncached) > 1e-3
        )
        ours.transformer.disable_cache()


def test_a_custom_processor_is_the_one_that_runs(pipe):
    processor = CountingProcessor()
    pipe.transformer.set_attn_processor(processor)
    pipe(**helpers.call_kwargs())
    blocks = len(pipe.transformer.transformer_blocks) + len(pipe.transformer.single_transformer_blocks)
    assert processor.calls == blocks * helpers.STEPS


def test_faster_cache_fails_on_flux_as_in_diffusers(pipes):
    reference, ours = pipes
    ours.transformer.enable_cache(
        FasterCacheConfig(
            spatial_attention_block_skip_range=2,
            spatial_attention_timestep_skip_range=(-1, 1001),
            is_guidance_distilled=True,
            current_timestep_callback=lambda: 500,
        )
    )
    with pytest.raises(TypeError) as theirs, cache_context_around_forward(reference.transformer):
        reference(**helpers.call_kwargs())
    with pytest.raises(TypeError) as mine:
        ours(**helpers.call_kwargs())
    assert str(mine.value) == str(theirs.value)


def test_the_attention_backend_context_is_followed(pipes, caplog):
    reference, ours = pipes
    with attention_backend("_native_math"):
        expected = reference(**helpers.call_kwargs()).images
        with caplog.at_level(logging.WARNING, logger="fluxfill_engine.pipeline"):
            actual = ours(**helpers.call_kwargs()).images
        assert_routed(ours, caplog, "attention backend _native_math")
    helpers.assert_close(actual, expected)
    assert ours.describe()["transformer_path"] == "engine"


@pytest.mark.parametrize(
    "backend, method",
    [
        ("xformers", "enable_xformers_memory_efficient_attention"),
        ("_native_npu", "enable_npu_flash_attention"),
        ("_native_xla", "enable_xla_flash_attention"),
    ],
)
def test_hardware_attention_backends_are_routed(pipes, caplog, backend, method):
    """xformers, NPU and XLA attention need their hardware and packages: diffusers' methods refuse to
    switch them on here. Their end state (the backend on every processor) is set directly: the call
    goes to diffusers' forward and fails as diffusers' own pipeline does, instead of running without."""
    reference, ours = pipes
    for processor in ours.transformer.attn_processors.values():
        processor._attention_backend = AttentionBackendName(backend)
    with pytest.raises(Exception) as theirs:
        reference(**helpers.call_kwargs())
    with (
        caplog.at_level(logging.WARNING, logger="fluxfill_engine.pipeline"),
        pytest.raises(Exception) as mine,
    ):
        ours(**helpers.call_kwargs())
    assert type(mine.value) is type(theirs.value) and str(mine.value) == str(theirs.value)
    assert_routed(ours, caplog, method)


def test_the_deprecated_npu_processor_is_routed(pipe):
    pipe.transformer.set_attn_processor(FluxAttnProcessor2_0_NPU())  # a FluxAttnProcessor on _native_npu
    assert any("enable_npu_flash_attention" in f for f in pipe.describe()["diffusers_features"])


def test_diffusers_refuses_hardware_attention_it_cannot_run(pipe):
    with pytest.raises(ModuleNotFoundError):
        pipe.enable_xformers_memory_efficient_attention()
    with pytest.raises(ImportError):
        pipe.transformer.enable_npu_flash_attention()
    with pytest.raises(ImportError):
        pipe.transformer.enable_xla_flash_attention()
    assert pipe.describe()["transformer_path"] == "engine"


def _torchao_config():
    from torchao.quantization import Int8WeightOnlyConfig

    return Int8WeightOnlyConfig()


def quantized_components(folder, config):
    """The tiny components with the transformer saved to ``folder`` and loaded back quantized by
    diffusers (``from_pretrained(..., quantization_config=config)``, fp32 for the other layers)."""
    tiny_components(0)["transformer"].save_pretrained(folder)
    components = tiny_components(0)
    components["transformer"] = FluxTransformer2DModel.from_pretrained(
        folder, quantization_config=config, torch_dtype=torch.float32
    )
    assert components["transformer"].hf_quantizer is not None
    return components


@pytest.mark.parametrize(
    "config",
    [
        pytest.param(lambda: TorchAoConfig(_torchao_config()), id="torchao"),
        pytest.param(lambda: QuantoConfig(weights_dtype="int8"), id="quanto"),
    ],
)
def test_a_transformer_quantized_by_diffusers(config, tmp_path, caplog):
    components = quantized_components(tmp_path, config())
    reference, ours = helpers.build_pipes(components)
    expected = reference(**helpers.call_kwargs()).images
    with caplog.at_level(logging.WARNING, logger="fluxfill_engine.pipeline"):
        helpers.assert_close(ours(**helpers.call_kwargs()).images, expected)
    assert_routed(ours, caplog, "quantized by diffusers")


def test_a_dequantized_transformer_runs_on_the_engine(tmp_path):
    components = quantized_components(tmp_path, TorchAoConfig(_torchao_config()))
    reference, ours = helpers.build_pipes(components)
    assert ours.describe()["transformer_path"] == "diffusers"
    ours.transformer.dequantize()  # diffusers drops its quantizer: plain fp32 layers again
    described = ours.describe()
    assert described["transformer_path"] == "engine" and described["diffusers_features"] == []
    helpers.assert_close(ours(**helpers.call_kwargs()).images, reference(**helpers.call_kwargs()).images)


def test_module_compile_is_routed(pipe):
    pipe.transformer.compile(backend="eager")  # what compile_repeated_blocks does to each block
    assert any("torch.compile" in f for f in pipe.describe()["diffusers_features"])


@pytest.mark.slow
def test_a_torch_compiled_transformer_is_routed(caplog):
    components = tiny_components(0)
    reference = FluxFillPipeline(**components)
    components["transformer"] = torch.compile(components["transformer"], backend="eager")
    ours = helpers.build_pipes(components)[1]
    helpers.disable_progress(reference)
    expected = reference(**helpers.call_kwargs()).images
    with caplog.at_level(logging.WARNING, logger="fluxfill_engine.pipeline"):
        helpers.assert_close(ours(**helpers.call_kwargs()).images, expected)
    assert_routed(ours, caplog, "torch.compile")


def _cpu_offload_without_a_device_index(monkeypatch):
    """diffusers' ``enable_sequential_cpu_offload`` gives accelerate ``cpu:0``; with that indexed CPU
    device accelerate (1.15, torch 2.13) leaves plain tensors where parameters were and its next hook
    fails to make parameters of them again, in diffusers' own pipeline too. The hooks are otherwise
    diffusers': only the index is dropped."""
    cpu_offload = accelerate.cpu_offload

    def without_index(model, execution_device=None, *args, **kwargs):
        if execution_device is not None and torch.device(execution_device).type == "cpu":
            execution_device = torch.device("cpu")
        return cpu_offload(model, execution_device, *args, **kwargs)

    monkeypatch.setattr(accelerate, "cpu_offload", without_index)


def test_sequential_cpu_offload_gives_diffusers_images(pipes, monkeypatch, caplog):
    """``pipe.enable_sequential_cpu_offload`` with the CPU as the execution device (what a CPU-only
    machine allows): the transformer's weights are on the meta device, loaded layer by layer by
    accelerate's hooks. CLIP is kept out of the offload: accelerate cannot offload it on the CPU
    ("Tensor on device cpu is not on the expected device meta!", diffusers' pipeline too)."""
    reference, ours = pipes
    expected = helpers.build_pipes(tiny_components(0))[0](**helpers.call_kwargs()).images
    _cpu_offload_without_a_device_index(monkeypatch)
    ours._exclude_from_cpu_offload = ["text_encoder"]
    ours.enable_sequential_cpu_offload(device="cpu")
    assert ours.transformer.device.type == "meta"
    with caplog.at_level(logging.WARNING, logger="fluxfill_engine.pipeline"):
        helpers.assert_close(ours(**helpers.call_kwargs()).images, expected)
        helpers.assert_close(ours(**helpers.call_kwargs()).images, expected)
    helpers.assert_close(reference(**helpers.call_kwargs()).images, expected)  # diffusers, same hooks
    assert_routed(ours, caplog, "enable_sequential_cpu_offload")
    assert ours.transformer.device.type == "meta"

    ours.remove_all_hooks()  # accelerate puts the weights back: the engine runs again
    assert ours.describe()["transformer_path"] == "engine"
    helpers.assert_close(ours(**helpers.call_kwargs()).images, expected)


def test_pipeline_group_offload_gives_diffusers_images(pipes, caplog):
    reference, ours = pipes
    expected = reference(**helpers.call_kwargs()).images
    ours.enable_group_offload(onload_device=torch.device("cpu"), offload_type="leaf_level")
    with caplog.at_level(logging.WARNING, logger="fluxfill_engine.pipeline"):
        helpers.assert_close(ours(**helpers.call_kwargs()).images, expected)
    assert_routed(ours, caplog, "enable_group_offload")


@pytest.mark.slow
@pytest.mark.parametrize(
    "switch",
    [
        pytest.param(lambda p: p.enable_attention_slicing(1), id="attention-slicing"),
        pytest.param(lambda p: p.set_attention_slice(2), id="attention-slice"),
        pytest.param(lambda p: p.transformer.enable_gradient_checkpointing(), id="gradient-checkpointing"),
        pytest.param(lambda p: p.transformer.set_attn_processor(FluxAttnProcessor()), id="default-processor"),
        pytest.param(
            lambda p: (p.transformer.fuse_qkv_projections(), p.transformer.unfuse_qkv_projections()),
            id="fuse-then-unfuse-qkv",
        ),
        pytest.param(
            lambda p: (
                p.transformer.set_attention_backend("native"),
                p.transformer.reset_attention_backend(),
            ),
            id="reset-attention-backend",
        ),
    ],
)
def test_features_without_effect_on_inference_run_on_the_engine(pipes, switch):
    """No Fill component has ``set_attention_slice`` (slicing is a no-op in diffusers' pipeline too);
    gradient checkpointing acts only with gradients on; the default processor, unfused QKV and a reset
    backend are the engine's own computation."""
    reference, ours = pipes
    expected = reference(**helpers.call_kwargs()).images
    switch(ours)
    assert ours.describe()["transformer_path"] == "engine"
    helpers.assert_close(ours(**helpers.call_kwargs()).images, expected)
    helpers.assert_close(reference(**helpers.call_kwargs()).images, expected)


def test_textual_inversion_converts_prompts_as_diffusers_does(pipes):
    reference, ours = pipes
    prompt = "a <toy> on the table"
    before = ours(**helpers.call_kwargs(prompt=prompt)).images  # "<toy>" is an unknown word yet
    vectors = torch.randn(2, 32, generator=torch.Generator().manual_seed(0))  # two tokens: <toy>, <toy>_1
    ours.load_textual_inversion({"<toy>": vectors}, token="<toy>")
    assert ours.maybe_convert_prompt(prompt, ours.tokenizer) == "a <toy> <toy>_1 on the table"
    expected = reference(**helpers.call_kwargs(prompt=prompt)).images
    actual = ours(**helpers.call_kwargs(prompt=prompt)).images
    helpers.assert_close(actual, expected)
    assert helpers.max_abs_diff(actual, before) > 1e-4
    assert ours.describe()["transformer_path"] == "engine"


def test_without_features_the_engine_runs(pipe):
    described = pipe.describe()
    assert described["transformer_path"] == "engine" and described["diffusers_features"] == []


@pytest.mark.parametrize("quant", ["int8", "int8-weight"])
def test_the_engines_own_quantized_layers_are_not_a_diffusers_feature(pipe, quant):
    pipe.configure(EngineConfig(quant=quant, quant_backend="native"))
    pipe(**helpers.call_kwargs())
    assert pipe.describe()["diffusers_features"] == []


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
