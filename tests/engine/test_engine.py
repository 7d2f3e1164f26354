"""FluxFillEngine: request validation, events, seeds, prompt cache, timings."""

import numpy as np
import PIL.Image
import pytest
import torch

from fluxfill_engine import EngineConfig, Event, FillRequest, FluxFillEngine
from fluxfill_engine.testing.tiny import tiny_components
from tests.support import helpers

SIZE = 256


@pytest.fixture(scope="module")
def engine():
    return helpers.tiny_engine(EngineConfig.preset("reference"))


def make_inputs(width=SIZE, height=SIZE):
    gen = torch.Generator().manual_seed(7)
    image = PIL.Image.fromarray((torch.rand(height, width, 3, generator=gen).numpy() * 255).astype(np.uint8))
    mask = np.zeros((height, width), np.float32)
    mask[height // 4 : height // 2, width // 4 : width // 2] = 1.0
    return image, mask


def request(**overrides):
    image, mask = make_inputs()
    # A working size of 256x256 for the 256x256 inputs (the default would work at one megapixel).
    fields = dict(
        prompt="a white paper cup",
        image=image,
        mask=mask,
        num_inference_steps=2,
        seed=0,
        max_megapixels=0.065,
    )
    fields.update(overrides)
    return FillRequest(**fields)


def pixels(result):
    return [np.asarray(image, dtype=np.int16) for image in result.images]


@pytest.mark.slow
def test_event_order_and_result(engine):
    events = []
    result = engine.run(request(num_inference_steps=3, num_images=2), on_event=events.append)
    assert all(isinstance(e, Event) for e in events)
    assert [e.type for e in events] == [
        "accepted",
        "preprocess_start",
        "preprocess_end",
        "step",
        "step",
        "step",
        "decode_start",
        "decode_end",
        "done",
    ]
    assert [(e.step, e.total) for e in events if e.type == "step"] == [(1, 3), (2, 3), (3, 3)]
    assert len(result.images) == 2 and result.images[0].size == (SIZE, SIZE)
    assert set(result.timings) == {"text_encode", "vae_encode", "denoise", "decode", "total"}
    assert all(v >= 0 for v in result.timings.values())
    assert result.timings["total"] >= result.timings["denoise"]
    assert result.stats["image_seq_len"] == (SIZE // 16) ** 2
    assert result.stats["working_size"] == result.stats["output_size"] == (SIZE, SIZE)


@pytest.mark.slow
def test_same_seed_same_images_and_random_seed_reported(engine):
    first, second = engine.run(request(seed=11)), engine.run(request(seed=11))
    assert all(np.array_equal(a, b) for a, b in zip(pixels(first), pixels(second), strict=True))
    other = engine.run(request(seed=12))
    assert not np.array_equal(pixels(first)[0], pixels(other)[0])
    chosen = engine.run(request(seed=None))
    assert isinstance(chosen.seed, int) and chosen.seed >= 0
    replay = engine.run(request(seed=chosen.seed))
    assert np.array_equal(pixels(chosen)[0], pixels(replay)[0])


def test_engine_matches_drop_in_pipeline(engine):
    """The engine is the pipeline with a CPU generator seeded with the request's seed."""
    image, mask = make_inputs()
    result = engine.run(request(seed=5, guidance_scale=12.5, paste_back=False))
    expected = engine.pipeline(
        prompt="a white paper cup",
        image=image,
        mask_image=PIL.Image.fromarray((mask * 255).astype(np.uint8)),
        height=SIZE,
        width=SIZE,
        num_inference_steps=2,
        guidance_scale=12.5,
        generator=torch.Generator("cpu").manual_seed(5),
    ).images[0]
    assert np.array_equal(pixels(result)[0], np.asarray(expected, dtype=np.int16))


@pytest.mark.slow
def test_prompt_cache_hits():
    engine = helpers.tiny_engine(EngineConfig.preset("reference", prompt_cache_size=1))
    assert engine.run(request(prompt="red cat")).stats["prompt_cache_hit"] is False
    assert engine.run(request(prompt="red cat")).stats["prompt_cache_hit"] is True
    assert engine.run(request(prompt="blue dog")).stats["prompt_cache_hit"] is False
    # size 1: "red cat" was evicted by "blue dog"
    assert engine.run(request(prompt="red cat")).stats["prompt_cache_hit"] is False
    uncached = helpers.tiny_engine(EngineConfig.preset("reference", prompt_cache_size=0))
    uncached.run(request(prompt="red cat"))
    assert uncached.run(request(prompt="red cat")).stats["prompt_cache_hit"] is False


@pytest.mark.slow
def test_cached_prompt_gives_the_same_images():
    engine = helpers.tiny_engine()
    first = engine.run(request(seed=3))
    second = engine.run(request(seed=3))
    assert second.stats["prompt_cache_hit"]
    assert np.array_equal(pixels(first)[0], pixels(second)[0])


@pytest.mark.parametrize(
    ("overrides", "error", "match"),
    [
        ({"width": 255}, ValueError, "width"),
        ({"width": 1537}, ValueError, "width"),
        ({"height": 100}, ValueError, "height"),
        ({"width": 300.0}, ValueError, "width"),
        ({"num_inference_steps": 0}, ValueError, "num_inference_steps"),
        ({"num_inference_steps": 101}, ValueError, "num_inference_steps"),
        ({"guidance_scale": float("nan")}, ValueError, "guidance_scale"),
        ({"guidance_scale": float("inf")}, ValueError, "guidance_scale"),
        ({"guidance_scale": -1.0}, ValueError, "guidance_scale"),
        ({"guidance_scale": 100.5}, ValueError, "guidance_scale"),
        ({"num_images": 0}, ValueError, "num_images"),
        ({"num_images": 9}, ValueError, "num_images"),
        ({"seed": -1}, ValueError, "seed"),
        ({"seed": 1.5}, ValueError, "seed"),
        ({"seed": True}, ValueError, "seed"),
        ({"image": None}, ValueError, "image"),
        ({"mask": None}, ValueError, "mask"),
        ({"prompt": 3}, TypeError, "prompt"),
        ({"image": 42}, TypeError, "image"),
        ({"mask": {"a": 1}}, TypeError, "mask"),
        ({"image": "/nonexistent/in.png"}, FileNotFoundError, "image"),
        ({"mask": np.full((SIZE, SIZE), 2.0, np.float32)}, ValueError, "mask"),
        ({"mask": np.full((SIZE, SIZE), np.nan, np.float32)}, ValueError, "mask"),
        ({"image": np.zeros((SIZE, SIZE, 5), np.float32)}, ValueError, "image"),
    ],
)
def test_invalid_requests_are_rejected_with_an_error_event(engine, overrides, error, match):
    events = []
    with pytest.raises(error, match=match) as refused:
        engine.run(request(**overrides), on_event=events.append)
    assert refused.value.field == match
    assert [e.type for e in events] == ["error"]
    assert match in events[0].message


@pytest.mark.slow
def test_the_output_has_the_asked_size_or_the_input_size(engine):
    result = engine.run(request(width=300, height=270))
    assert result.images[0].size == (300, 270) and result.stats["working_size"] == (288, 256)
    image, mask = make_inputs(width=280, height=264)
    result = engine.run(request(image=image, mask=mask))
    assert result.images[0].size == (280, 264) and result.stats["output_size"] == (280, 264)
    assert result.stats["working_size"] == (272, 256)  # about max_megapixels (0.065 x 1024^2), aspect kept


@pytest.mark.slow
def test_mask_inputs_are_converted_to_one_channel(engine):
    image, mask = make_inputs()
    as_rgb = np.repeat(mask[..., None], 3, axis=-1)
    as_pil = PIL.Image.fromarray((mask * 255).astype(np.uint8)).convert("RGB")
    as_tensor = torch.from_numpy(mask)[None]
    outputs = [pixels(engine.run(request(mask=m)))[0] for m in (mask, as_rgb, as_pil, as_tensor)]
    assert all(np.array_equal(outputs[0], other) for other in outputs[1:])


def test_error_during_run_emits_error_and_reraises():
    engine = helpers.tiny_engine()

    def broken(*args, **kwargs):
        raise RuntimeError("decoder exploded")

    engine.pipeline.vae.decode = broken
    events = []
    with pytest.raises(RuntimeError, match="decoder exploded"):
        engine.run(request(), on_event=events.append)
    assert events[-1].type == "error" and "decoder exploded" in events[-1].message
    assert "done" not in [e.type for e in events]


def test_engine_requires_our_pipeline():
    import diffusers

    with pytest.raises(TypeError, match="pipeline"):
        FluxFillEngine(diffusers.FluxFillPipeline(**tiny_components()))


def test_describe(engine):
    info = engine.describe()
    transformer = engine.pipeline.transformer
    assert info["config"] == EngineConfig.preset("reference").describe()
    assert info["device"] == "cpu" and info["transformer_dtype"] == "float32"
    assert info["transformer_parameters"] == sum(p.numel() for p in transformer.parameters())
    assert (info["attention"], info["fused_kernels"]) == ("sdpa", False)
    assert info["quantization"] is None and info["compiled"] is False
    assert info["compile_cache_loaded"] is None

    quantized = helpers.tiny_engine(EngineConfig(quant="int8-weight", fused_kernels=True)).describe()
    assert quantized["quantization"]["mode"] == "int8-weight"
    assert quantized["quantization"]["backend"] == "native" and quantized["quantization"]["why"]
    assert quantized["fused_kernels"] is True and quantized["config"]["quant"] == "int8-weight"


def test_describe_records_what_auto_attention_chose_and_dropped():
    from fluxfill_engine.attention import AutoAttention, resolve_attention, sdpa_attention

    def broken(qkv, rope):
        raise RuntimeError("the kernel failed to compile")

    def timer(attend, qkv, rope):
        attend(qkv, rope)
        return 1.0

    engine = helpers.tiny_engine(EngineConfig.preset("reference"))
    fill = engine.pipeline.engine_transformer()
    # On a CPU ``auto`` is sdpa alone; a GPU's candidates, one of them failing, stand in here.
    fill.attention = AutoAttention({"triton": broken, "sdpa": sdpa_attention(False)}, timer=timer)
    resolve_attention(fill.attention, [5, 7], 1, 2, 16, torch.float32, torch.device("cpu"))
    info = engine.describe()
    assert list(info["auto_attention_choices"].values()) == ["sdpa"]
    assert info["auto_attention_dropped"] == {"triton": "RuntimeError: the kernel failed to compile"}
