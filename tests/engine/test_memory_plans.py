"""Memory plans: each placement gives the resident run's images, the weights really move, and the
estimate and chooser (on the meta device, at the real FLUX.1 Fill size) behave as documented."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import pytest
import torch

from fluxfill_engine import EngineConfig, FluxFillEngine, FluxFillPipeline
from fluxfill_engine.memory_plan import (
    GIB,
    PLANS,
    PLANS_BY_NAME,
    LiveBytes,
    ModelConfigs,
    choose_memory_plan,
    estimate_config,
    estimate_memory,
    meta_step_bytes,
    parse_memory_size,
    peak_bytes_of,
    plan_of,
    step_bytes,
    weight_bytes,
)
from fluxfill_engine.metrics import sqnr_db
from fluxfill_engine.model import FillTransformer
from fluxfill_engine.offload import (
    STREAMER_ATTR,
    MemoryPlacement,
    OffloadedModule,
    module_tensors,
    repoint_storages,
)
from fluxfill_engine.quantization import QuantizedLinear, QuantPlan
from fluxfill_engine.quantization import weight_bytes as real_weight_bytes
from fluxfill_engine.testing.tiny import tiny_components
from tests.engine.test_engine import request

CPU = torch.device("cpu")
PLACEMENTS = {
    "cpu_offload": dict(cpu_offload=True),
    "text_encoders_on_cpu": dict(text_encoders_on_cpu=True),
    "block_streaming": dict(block_streaming=True),
    "all": dict(cpu_offload=True, text_encoders_on_cpu=True, block_streaming=True),
}


def engine(**fields: Any) -> FluxFillEngine:
    return FluxFillEngine(FluxFillPipeline(**tiny_components(0)), EngineConfig(**fields), device="cpu")


def images(result) -> list[np.ndarray]:
    return [np.asarray(image) for image in result.images]


@pytest.fixture(scope="module")
def resident_images() -> dict[bool, list[np.ndarray]]:
    """The all-on-the-device run's images, with T5 unquantized and quantized."""
    return {
        quantized: images(engine(quantize_text_encoder=quantized).run(request()))
        for quantized in (False, True)
    }


# ---- the placements run the resident math ------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(PLACEMENTS))
def test_each_placement_gives_the_resident_images_bit_for_bit(name, resident_images):
    placed = engine(**PLACEMENTS[name])
    assert placed.pipeline.memory_placement is not None
    result = placed.run(request())
    for ours, reference in zip(images(result), resident_images[False], strict=True):
        np.testing.assert_array_equal(ours, reference)


@pytest.mark.slow
@pytest.mark.parametrize("plan", [p for p in PLANS if p.quantize_text_encoder], ids=lambda p: p.name)
def test_plans_with_quantized_t5_equal_the_resident_quantized_run(plan, resident_images):
    config = plan.apply(EngineConfig())
    result = FluxFillEngine(FluxFillPipeline(**tiny_components(0)), config, device="cpu").run(request())
    for ours, reference in zip(images(result), resident_images[True], strict=True):
        np.testing.assert_array_equal(ours, reference)


@pytest.mark.slow
@pytest.mark.parametrize(("quant", "bound_db"), [("none", 35.0), ("fp8-weight", 25.0)])
def test_quantized_t5_stays_within_its_sqnr_bound(quant, bound_db):
    """The lossy part of a plan: T5 int8 (with quant 'none') or fp8 weights, against T5 unquantized."""
    plain = FluxFillPipeline(**tiny_components(0))
    quantized = FluxFillPipeline(**tiny_components(0))
    quantized.configure(EngineConfig(quant=quant, quantize_text_encoder=True))
    reference = plain.encode_prompt("a white paper cup", device=CPU)[0]
    ours = quantized.encode_prompt("a white paper cup", device=CPU)[0]
    sqnr = sqnr_db(reference, ours)
    assert sqnr is not None and sqnr >= bound_db, sqnr


# ---- the weights really move, and come back ----------------------------------------------------


@pytest.mark.slow
def test_block_streaming_copies_each_block_ahead_and_restores_the_host_weights():
    streamed = engine(block_streaming=True)
    fill = streamed.pipeline.engine_transformer()
    host = {id(t): t.data_ptr() for block in fill.blocks() for t in module_tensors(block)}
    seen: list[set[int]] = []
    for block in fill.blocks():  # registered after the streamer's hooks: sees the swapped weights
        block.register_forward_pre_hook(
            lambda module, args: seen.append({t.data_ptr() for t in module_tensors(module)})
        )
    steps = 2
    streamed.run(request(num_inference_steps=steps))
    blocks = len(fill.blocks())
    assert len(seen) == steps * blocks
    assert all(not (ptrs & set(host.values())) for ptrs in seen)  # every block ran on copies
    streamer = fill.__dict__[STREAMER_ATTR]
    # the first block fetched when needed, every later one prefetched while the one before ran
    assert streamer.copies_made == 1 + steps * blocks
    after = {id(t): t.data_ptr() for block in fill.blocks() for t in module_tensors(block)}
    assert after == host and fill.is_in_sync()


@pytest.mark.slow
def test_a_stale_prefetched_block_is_fetched_again():
    """A weight written in place between steps (a merged LoRA) must not run from an old copy."""
    streamed = engine(block_streaming=True)
    fill = streamed.pipeline.engine_transformer()
    first = streamed.run(request())
    with torch.no_grad():
        module_tensors(fill.blocks()[0])[0].mul_(1.0)  # same values, a new version: the prefetch is stale
    streamer = fill.__dict__[STREAMER_ATTR]
    before = streamer.copies_made
    second = streamed.run(request())
    assert streamer.copies_made == before + 1 + 2 * len(fill.blocks())  # one refetch, then as usual
    np.testing.assert_array_equal(images(first)[0], images(second)[0])


def test_offloaded_module_runs_on_copies_and_restores_even_after_an_error():
    layer = torch.nn.Linear(4, 3)
    host = layer.weight.data_ptr()
    offloaded = OffloadedModule(layer, CPU)
    during = []
    layer.register_forward_pre_hook(lambda module, args: during.append(layer.weight.data_ptr()))
    out = layer(torch.ones(2, 4))
    assert during[0] != host and layer.weight.data_ptr() == host
    torch.testing.assert_close(out, torch.ones(2, 4) @ layer.weight.T + layer.bias, rtol=0, atol=0)
    with pytest.raises(RuntimeError):
        layer(torch.ones(2, 5))
    assert layer.weight.data_ptr() == host
    offloaded.remove()
    layer(torch.ones(1, 4))
    assert during[-1] == host


@pytest.mark.slow
def test_quantize_on_cpu_moves_only_quantized_weights(monkeypatch):
    """The transformer and T5 wait in host memory until quantized; the images are the usual ones."""
    moved = []
    settle = MemoryPlacement.settle

    def spy(placement: MemoryPlacement) -> None:
        for module in placement.deferred:
            moved.append(any(isinstance(m, QuantizedLinear) for m in module.modules()))
        settle(placement)

    monkeypatch.setattr(MemoryPlacement, "settle", spy)
    fields = dict(quant="int8-weight", quantize_text_encoder=True)
    on_host = engine(**fields, quantize_on_cpu=True)
    assert moved == [True, True] and on_host.pipeline.memory_placement is not None
    assert not on_host.pipeline.memory_placement.deferred
    usual = engine(**fields)
    np.testing.assert_array_equal(images(on_host.run(request()))[0], images(usual.run(request()))[0])


@pytest.mark.slow
def test_moving_the_pipeline_takes_the_plan_off(resident_images):
    streamed = engine(block_streaming=True, cpu_offload=True)
    fill = streamed.pipeline.engine_transformer()
    streamed.pipeline.to("cpu")
    assert streamed.pipeline.memory_placement is None and STREAMER_ATTR not in fill.__dict__
    assert not streamed.pipeline.vae.encoder._forward_pre_hooks
    np.testing.assert_array_equal(images(streamed.run(request()))[0], resident_images[False][0])


@pytest.mark.slow
def test_prompt_cache_still_hits_with_offloaded_text_encoders():
    offloaded = engine(cpu_offload=True)
    offloaded.run(request())
    assert offloaded.run(request()).stats["prompt_cache_hit"] is True


@pytest.mark.slow
def test_repointed_storages_keep_the_fused_views_shared():
    """What pinning does to the blocks (with CUDA): new host memory, every view following its storage."""
    pipe = FluxFillPipeline(**tiny_components(0))
    fill = pipe.engine_transformer()
    tensors = [t for block in fill.blocks() for t in module_tensors(block)] + module_tensors(pipe.transformer)
    before = {id(t): t.data_ptr() for t in tensors}
    moved = repoint_storages(tensors, pin=False)
    assert moved > 0 and all(t.data_ptr() != before[id(t)] for t in tensors)
    assert fill.is_in_sync() and pipe.engine_transformer() is fill


def test_block_streaming_refuses_compile():
    with pytest.raises(ValueError, match="compile=False"):
        EngineConfig(block_streaming=True, compile=True)
    with pytest.raises(TypeError, match="cpu_offload"):
        EngineConfig(cpu_offload="yes")  # type: ignore[arg-type]


@pytest.mark.slow
def test_describe_records_the_estimate_and_the_placement():
    described = engine(cpu_offload=True, quantize_text_encoder=True).describe()["memory"]
    assert described["plan"] == "offload-encoders-vae"
    assert described["placement"]["vae"] == "offloaded"
    assert described["peak_bytes"] == max(described["stage_bytes"].values())


# ---- the estimate ------------------------------------------------------------------------------


def test_live_bytes_counts_allocations_views_and_frees():
    def run() -> torch.Tensor:
        a = torch.empty(1000, device="meta")  # 4000 bytes
        b = a * 2  # 8000 live
        view = b.view(10, 100)
        del a, b  # the view keeps b's storage: 4000 live
        c = torch.cat([view, view])  # 8000 more: 12000, the peak
        del view  # 8000 live
        d = c + 1  # 16000: a new peak
        return d

    assert peak_bytes_of(run) == 4 * (1000 + 1000 + 2000)
    tracker = LiveBytes()
    with tracker:
        kept = torch.empty(10, device="meta")
        gone = torch.empty(20, device="meta")
        del gone
    assert tracker.live == 40 and kept.shape == (10,)


@pytest.mark.slow
@pytest.mark.parametrize("quant", ["none", "int8-weight"])
def test_the_meta_step_allocates_what_a_real_step_does(quant):
    """The activation estimate's meta run against the same step run for real on the CPU (tiny model):
    the same live bytes at the peak, unquantized and quantized."""
    pipe = FluxFillPipeline(**tiny_components(0))
    fill = FillTransformer.from_diffusers(pipe.transformer)
    if quant != "none":
        fill.quantize(QuantPlan(quant, "native", "test"))
    tokens = (256 // 16) ** 2
    real = step_bytes(fill, dict(pipe.transformer.config), torch.float32, 1, tokens, CPU)
    meta = meta_step_bytes(ModelConfigs.of_pipeline(pipe), torch.float32, quant, 1, (16, 16))
    assert real == meta > 0


@pytest.mark.slow
def test_weights_counted_on_meta_equal_the_loaded_models():
    """The estimate's weight bytes (counted on meta from the configs) against a real tiny model's,
    unquantized and with the transformer and T5 quantized."""
    pipe = FluxFillPipeline(**tiny_components(0))
    configs = ModelConfigs.of_pipeline(pipe)
    counted = weight_bytes(configs, 4, False, False)
    assert counted.transformer == real_weight_bytes([pipe.transformer])
    assert counted.t5 == real_weight_bytes([pipe.text_encoder_2])
    assert counted.vae_encoder + counted.vae_decoder == real_weight_bytes([pipe.vae])
    pipe.configure(EngineConfig(quant="int8-weight", quantize_text_encoder=True))
    quantized = weight_bytes(configs, 4, True, True)
    assert quantized.transformer == real_weight_bytes([pipe.transformer])
    assert quantized.t5 == real_weight_bytes([pipe.text_encoder_2])


def test_plan_of_names_a_configs_plan():
    for plan in PLANS:
        assert plan_of(plan.apply(EngineConfig.preset("fast"))) == plan
    assert plan_of(EngineConfig(cpu_offload=True)).name == "custom"
    assert PLANS_BY_NAME["block-streaming"].apply(EngineConfig.preset("fast")).compile is False


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("16GB", 16 * GIB),
        ("24 GiB", 24 * GIB),
        ("800MB", 800 * 10**6),
        ("1.5GiB", int(1.5 * GIB)),
        ("4096", 4096),
    ],
)
def test_parse_memory_size(text, size):
    assert parse_memory_size(text) == size


@pytest.mark.parametrize("text", ["", "lots", "16 parsecs", "0GB", "-3GB"])
def test_parse_memory_size_refuses_nonsense(text):
    with pytest.raises(ValueError, match="--max-vram"):
        parse_memory_size(text)


# ---- the real FLUX.1 Fill at 1024x1024 (meta device) -------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("quant", ["fp8", "none"])
@pytest.mark.parametrize("card_gib", [24, 16])
def test_the_chosen_plan_fits_24_and_16_gb_for_the_real_model(card_gib, quant):
    budget = card_gib * GIB
    plan, estimate = choose_memory_plan(budget, 1024, 1024, quant=quant)
    print(f"{card_gib} GiB, quant={quant}: {plan.name}, {estimate.describe()}")
    assert estimate.peak_bytes <= budget
    assert estimate == estimate_memory(plan, 1024, 1024, quant)
    faster = PLANS[: PLANS.index(plan)]
    assert all(estimate_memory(p, 1024, 1024, quant).peak_bytes > budget for p in faster)


@pytest.mark.slow
@pytest.mark.parametrize("quant", ["fp8", "none"])
def test_a_larger_budget_never_picks_a_slower_plan(quant):
    chosen = []
    for gib in range(4, 82, 2):
        try:
            plan, _ = choose_memory_plan(gib * GIB, 1024, 1024, quant=quant)
        except ValueError:
            chosen.append(len(PLANS))
            continue
        chosen.append(PLANS.index(plan))
    assert chosen == sorted(chosen, reverse=True) and chosen[-1] == 0


@pytest.mark.slow
def test_an_impossible_budget_names_the_smallest_plans_need():
    need = min((estimate_memory(p, 1024, 1024, "fp8") for p in PLANS), key=lambda e: e.peak_bytes)
    with pytest.raises(ValueError, match=f"'{need.plan}', needs about .*\\({need.peak_bytes} bytes\\)"):
        choose_memory_plan(GIB, 1024, 1024, quant="fp8")


@pytest.mark.slow
def test_the_estimate_grows_with_the_size_and_the_batch():
    small = estimate_memory("resident", 512, 512, "fp8")
    large = estimate_memory("resident", 1024, 1024, "fp8")
    batch = estimate_memory("resident", 1024, 1024, "fp8", batch=2)
    assert small.resident_weight_bytes == large.resident_weight_bytes == batch.resident_weight_bytes
    assert small.peak_bytes < large.peak_bytes < batch.peak_bytes
    config = dataclasses.replace(PLANS_BY_NAME["block-streaming"].apply(EngineConfig.preset("fast")))
    assert estimate_config(config).peak_bytes == estimate_memory("block-streaming", quant="fp8").peak_bytes
