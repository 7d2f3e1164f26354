"""Batching: FluxFillEngine.batch_key and run_batch (one pass of the model for several requests), the
pipeline's generate_batch under it, and the cheap working size the batch key uses.

Parity is the point: each request's images from a batch are the images it gets alone. Here (CPU, fp32)
the decoded images agree to ~1e-6 before their rounding to 8 bits; the per-sample GEMMs (modulation,
time and text embedders: M = batch) round differently for another M, so a PIL value can differ by one
level (measured: about 1 value in 1e5). Everything token-level is bit-equal across batch sizes.
With the step cache (plain and mask-aware) each request of a batch skips exactly the steps it skips alone.
"""

import types

import numpy as np
import PIL.Image
import pytest
import torch

from fluxfill_engine import EngineConfig, FillRequest, FluxFillPipeline, PipelineCall
from fluxfill_engine.framing import crop_box, frame_working_size, make_frame
from tests.support import helpers
from tests.support import lora as lora_helpers

SIZE = 256
FLOAT_ATOL = 1e-4  # the decoded images, 0..1, before the 8-bit rounding
MAX_FLIPPED = 1e-3  # the share of 8-bit values that may differ, by one level only


@pytest.fixture(scope="module")
def engine():
    return helpers.tiny_engine()


def inputs(seed=7, offset=0, width=SIZE, height=SIZE):
    gen = torch.Generator().manual_seed(seed)
    image = PIL.Image.fromarray((torch.rand(height, width, 3, generator=gen).numpy() * 255).astype(np.uint8))
    mask = np.zeros((height, width), np.uint8)
    mask[height // 4 + offset : height // 2 + offset, width // 4 : width // 2] = 255
    return image, PIL.Image.fromarray(mask, "L")


def request(seed=0, offset=0, **overrides):
    image, mask = inputs(seed + 7, offset)
    fields = dict(
        prompt="a white paper cup",
        image=image,
        mask=mask,
        num_inference_steps=2,
        seed=seed,
        max_megapixels=0.065,
    )
    fields.update(overrides)
    return FillRequest(**fields)


def mixed_requests():
    """Four requests that share a batch key and differ in everything else."""
    photo, _ = inputs(3, width=192)
    return [
        request(seed=1, prompt="a red cat"),
        request(seed=2, offset=40, prompt="a blue dog on a mat", num_images=2, paste_back=False),
        request(seed=3, offset=80, prompt="a red cat", mask_grow=5, mask_blur=4),
        # A square crop and an outpainted 192-pixel-wide photo: both work at 256x256 too.
        request(seed=4, crop_to_mask=True, crop_padding=32, prompt="a green lamp"),
        request(seed=5, prompt="sky", image=photo, mask=None, outpaint={"left": 32, "right": 32}),
    ]


def levels(result):
    return [np.asarray(image, dtype=np.int16) for image in result.images]


def record_decoded(monkeypatch, pipe):
    """Every decode's images as floats in [0, 1] (before the 8-bit rounding), in call order."""
    decoded = []
    original = FluxFillPipeline._decode

    def decode(self, latents, grid, output_type):
        decoded.append(original(self, latents, grid, "np"))
        return original(self, latents, grid, output_type)

    monkeypatch.setattr(pipe, "_decode", types.MethodType(decode, pipe))
    return decoded


def assert_same_images(alone, batched):
    assert len(alone) == len(batched)
    for a, b in zip(alone, batched, strict=True):
        assert a.shape == b.shape
        difference = np.abs(a - b)
        assert difference.max() <= 1, f"8-bit values differ by {difference.max()}"
        assert (difference > 0).mean() <= MAX_FLIPPED


# ---- parity ----------------------------------------------------------------------------------------


@pytest.mark.slow
def test_each_request_of_a_batch_gets_the_images_it_gets_alone(engine, monkeypatch):
    requests = mixed_requests()
    keys = {engine.batch_key(r.validated()) for r in requests}
    assert len(keys) == 1 and None not in keys
    decoded = record_decoded(monkeypatch, engine.pipeline)
    alone = [engine.run(r) for r in requests]
    decoded_alone = list(decoded)
    decoded.clear()
    events = []
    batched = engine.run_batch(requests, on_event=events.append)
    assert len(decoded) == len(requests)  # one decode per request, as alone
    for index, (one, many) in enumerate(zip(alone, batched, strict=True)):
        assert many.seed == one.seed == requests[index].seed
        assert len(many.images) == requests[index].num_images
        assert [im.size for im in many.images] == [im.size for im in one.images]
        assert float(np.abs(decoded[index] - decoded_alone[index]).max()) <= FLOAT_ATOL
        assert_same_images(levels(one), levels(many))
        for name in ("working_size", "output_size", "region", "num_images", "num_inference_steps"):
            assert many.stats[name] == one.stats[name], name
        assert many.stats["batch_size"] == 6 and many.stats["batch_requests"] == 5
        assert one.stats["batch_size"] == one.stats["num_images"] and one.stats["batch_requests"] == 1
    assert [e.type for e in events] == [
        "accepted",
        "preprocess_start",
        "preprocess_end",
        "step",
        "step",
        "decode_start",
        "decode_end",
        "done",
    ]
    assert [(e.step, e.total) for e in events if e.type == "step"] == [(1, 2), (2, 2)]
    # The stage timings are the batch's: the same in every result.
    for name in ("text_encode", "vae_encode", "denoise", "decode"):
        assert len({r.timings[name] for r in batched}) == 1
    assert all(r.timings["total"] >= r.timings["denoise"] for r in batched)


@pytest.mark.slow
def test_the_transformer_latents_agree_and_a_batch_of_one_is_the_solo_run(engine):
    pipe = engine.pipeline
    calls = [
        dict(seed=1, prompt="a red cat", num_images_per_prompt=1),
        dict(seed=2, prompt="a blue dog", num_images_per_prompt=3),
    ]

    def call(seed, prompt, num_images_per_prompt):
        image = helpers.image_tensor(SIZE, SIZE, seed=seed)
        mask = helpers.mask_tensor(SIZE, SIZE).roll(seed * 20, -1)
        kwargs = dict(
            prompt=prompt, num_images_per_prompt=num_images_per_prompt, image=image, mask_image=mask
        )
        return PipelineCall(**helpers.call_kwargs(seed=seed, height=SIZE, width=SIZE, **kwargs))

    alone = [pipe.generate(call(**c)) for c in calls]
    batched = pipe.generate_batch([call(**c) for c in calls])
    for one, many in zip(alone, batched, strict=True):
        assert many.latents.shape == one.latents.shape
        assert float((many.latents - one.latents).abs().max()) <= 1e-5
        helpers.assert_close(many.images, one.images, atol=FLOAT_ATOL)
    # One call through the batch path is the solo path: bit-equal.
    single = pipe.generate_batch([call(**calls[1])])[0]
    np.testing.assert_array_equal(single.images, alone[1].images)
    solo = engine.run(request(seed=9, num_images=2))
    (same,) = engine.run_batch([request(seed=9, num_images=2)])
    assert all(np.array_equal(a, b) for a, b in zip(levels(solo), levels(same), strict=True))


@pytest.mark.slow
def test_the_prompt_cache_serves_batches_per_prompt():
    engine = helpers.tiny_engine()
    batched = engine.run_batch(
        [request(prompt="a"), request(prompt="b", seed=1), request(prompt="a", seed=2)]
    )
    assert [r.stats["prompt_cache_hit"] for r in batched] == [False, False, True]
    assert engine.run(request(prompt="b")).stats["prompt_cache_hit"] is True


@pytest.mark.slow
def test_a_lora_set_shared_by_the_batch(tmp_path, monkeypatch):
    engine = helpers.tiny_engine()
    path = lora_helpers.peft_lora(tmp_path / "style", 0)
    loras = [{"path": str(path), "scale": 0.8}]
    requests = [request(seed=1, loras=loras), request(seed=2, offset=40, num_images=2, loras=loras)]
    keys = {engine.batch_key(r.validated()) for r in requests}
    assert len(keys) == 1
    assert keys != {engine.batch_key(request(seed=1).validated())}
    decoded = record_decoded(monkeypatch, engine.pipeline)
    alone = [engine.run(r) for r in requests]
    decoded_alone = list(decoded)
    decoded.clear()
    base = engine.run(request(seed=1))  # back to the base model in between
    batched = engine.run_batch(requests)
    for index, (one, many) in enumerate(zip(alone, batched, strict=True)):
        assert float(np.abs(decoded[1 + index] - decoded_alone[index]).max()) <= FLOAT_ATOL
        assert_same_images(levels(one), levels(many))
        assert [a["scale"] for a in many.stats["loras"]["adapters"]] == [0.8]
    assert not np.array_equal(levels(base)[0], levels(alone[0])[0])  # the LoRA changes the picture


# ---- the batch key ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "same"),
    [
        ({"prompt": "another prompt", "seed": 3, "num_images": 4}, True),
        ({"paste_back": False, "mask_grow": 7, "mask_blur": 9}, True),
        ({"max_megapixels": 0.065 * 1.01}, True),  # the same working size
        ({"num_inference_steps": 3}, False),
        ({"guidance_scale": 12.0}, False),
        ({"soft_mask": True}, False),
        ({"max_megapixels": 0.2}, False),
        ({"width": 512, "height": 256}, False),
        ({"loras": [{"path": "x.safetensors", "scale": 1.0}]}, False),
    ],
)
def test_the_key_holds_what_one_pass_shares(engine, overrides, same):
    key = engine.batch_key(request().validated())
    assert isinstance(hash(key), int)
    assert (engine.batch_key(request(**overrides).validated()) == key) is same


@pytest.mark.slow
@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"width": 300, "height": 270},
        {"max_megapixels": 0.3},
        {"crop_to_mask": True},
        {"crop_to_mask": True, "mask_grow": 40, "crop_padding": 0},
        {"crop_to_mask": True, "mask_blur": 100, "crop_padding": 8, "max_megapixels": 0.5},
        {"crop_to_mask": True, "soft_mask": True, "width": 384, "height": 320},
        {"outpaint": {"left": 100, "bottom": 50}},
        {"outpaint": {"top": 64}, "mask": None, "crop_to_mask": True},
        {"outpaint": {"right": 40}, "crop_to_mask": True, "mask_grow": 12, "width": 512, "height": 400},
    ],
)
def test_the_keys_working_size_is_the_one_the_request_runs_at(engine, overrides):
    checked = request(**overrides).validated()
    result = engine.run(checked)
    assert dict(engine.batch_key(checked))["working_size"] == result.stats["working_size"]


def test_frame_working_size_equals_the_frames_on_random_options():
    rng = np.random.default_rng(0)
    for _ in range(60):
        width, height = (int(v) for v in rng.integers(64, 700, 2))
        mask = np.zeros((height, width), np.uint8)
        if rng.random() < 0.9:
            top, left = int(rng.integers(0, height)), int(rng.integers(0, width))
            mask[top : top + int(rng.integers(1, 200)), left : left + int(rng.integers(1, 200))] = rng.choice(
                [90, 200, 255]
            )
        mask_image = PIL.Image.fromarray(mask, "L")
        size = None if rng.random() < 0.5 else tuple(int(v) for v in rng.integers(256, 800, 2))
        outpaint = (
            None
            if rng.random() < 0.6
            else {"left": int(rng.integers(0, 90)), "top": 0, "right": 5, "bottom": 0}
        )
        options = (
            size,
            outpaint,
            int(rng.integers(0, 50)),  # mask_grow
            int(rng.integers(0, 40)),  # mask_blur
            bool(rng.random() < 0.7),  # crop_to_mask
            int(rng.integers(0, 100)),  # crop_padding
            float(rng.uniform(0.065, 1.0)),
            bool(rng.random() < 0.3),  # soft_mask
        )
        image = PIL.Image.new("RGB", (width, height))
        frame = make_frame(image, mask_image, *options)
        assert frame_working_size(image.size, mask_image, *options) == frame.working_size
        if options[4]:  # the box of the grown mask is the box grown
            assert frame.region == crop_box(frame.mask, max(options[5], options[3]))


# ---- refusals, events, cancelling ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("index", "overrides", "error", "match", "field"),
    [
        (
            1,
            {"num_inference_steps": 0},
            ValueError,
            r"requests\[1\]: `num_inference_steps`",
            "num_inference_steps",
        ),
        (2, {"image": None}, ValueError, r"requests\[2\]: `image`", "image"),
        (1, {"prompt": 3}, TypeError, r"requests\[1\]: `prompt`", "prompt"),
        (2, {"mask": "/nonexistent/mask.png"}, FileNotFoundError, r"requests\[2\]", "mask"),
        (
            1,
            {"num_inference_steps": 3},
            ValueError,
            r"requests\[1\]: `num_inference_steps` is 3 but",
            "num_inference_steps",
        ),
        (2, {"width": 512, "height": 512}, ValueError, r"requests\[2\]: `working_size`", "working_size"),
        (1, {"soft_mask": True}, ValueError, r"requests\[1\]: `soft_mask`", "soft_mask"),
        (1, {"loras": [{"path": "x.safetensors"}]}, ValueError, r"requests\[1\]: `loras`", "loras"),
    ],
)
def test_a_bad_or_mismatched_request_is_refused_before_any_work(index, overrides, error, match, field):
    engine = helpers.tiny_engine()
    requests = [request(seed=0), request(seed=1), request(seed=2)]
    requests[index] = request(seed=index, **overrides)
    events = []
    with pytest.raises(error, match=match) as refused:
        engine.run_batch(requests, on_event=events.append)
    assert refused.value.field == f"requests[{index}].{field}"
    assert [e.type for e in events] == ["error"] and f"requests[{index}]" in events[0].message
    assert engine.pipeline.prompt_cache.misses == 0 and len(engine.pipeline.prompt_cache) == 0


def test_what_is_not_a_list_of_requests_is_refused(engine):
    with pytest.raises(ValueError, match="empty"):
        engine.run_batch([])
    with pytest.raises(TypeError, match="non-empty list"):
        engine.run_batch(request())
    with pytest.raises(TypeError, match=r"requests\[1\]: a FillRequest was expected, got dict"):
        engine.run_batch([request(), {"prompt": "x"}])
    with pytest.raises(TypeError, match="validated request"):
        engine.batch_key(request(mask=np.zeros((SIZE, SIZE), np.float32)))


def test_more_than_64_images_in_one_batch_are_refused_up_front(engine):
    events = []
    with pytest.raises(ValueError, match="72 images in one batch; at most 64"):
        engine.run_batch([request(seed=i, num_images=8) for i in range(9)], on_event=events.append)
    assert [e.type for e in events] == ["error"]


@pytest.mark.slow
def test_an_event_handler_raising_stops_the_batch_and_the_engine_goes_on(engine):
    events = []

    def cancel(event):
        events.append(event.type)
        if event.type == "step":
            raise KeyboardInterrupt("canceled")

    with pytest.raises(KeyboardInterrupt):
        engine.run_batch([request(seed=1), request(seed=2)], on_event=cancel)
    assert events == ["accepted", "preprocess_start", "preprocess_end", "step", "error"]
    results = engine.run_batch([request(seed=1), request(seed=2)])
    assert [r.seed for r in results] == [1, 2]


def cache_config(threshold, mask_aware):
    return EngineConfig(
        step_cache_threshold=threshold,
        step_cache_warmup=1,
        step_cache_final=1,
        step_cache_mask_aware=mask_aware,
    )


@pytest.mark.slow
@pytest.mark.parametrize("mask_aware", [False, True], ids=["plain", "mask-aware"])
def test_with_the_step_cache_each_request_of_a_batch_decides_its_own_steps(mask_aware, monkeypatch):
    """A threshold between two requests' first measured changes: alone, one skips step 1 and the
    other computes it. In a batch each request skips exactly the steps it skips alone (the remaining
    blocks run on the rows of those that compute) and gets its solo images."""
    steps = 8
    requests = [
        request(seed=1, num_inference_steps=steps),
        request(seed=3, offset=80, num_inference_steps=steps, num_images=2, prompt="a red cat"),
        request(seed=4, offset=20, num_inference_steps=steps),
    ]
    measuring = helpers.tiny_engine(cache_config(0.0, mask_aware))  # never skips: the plain changes
    first = [measuring.run(r).stats["step_cache"]["rel_l1"][1] for r in requests]
    threshold = (min(first) + max(first)) / 2
    engine = helpers.tiny_engine(cache_config(threshold, mask_aware))
    assert engine.batch_key(requests[0].validated()) is not None
    decoded = record_decoded(monkeypatch, engine.pipeline)
    alone = [engine.run(r) for r in requests]
    decoded_alone = list(decoded)
    decoded.clear()
    rows = []
    remaining = type(engine.pipeline.engine_transformer()).remaining_blocks

    def counting(self, img, *args, **kwargs):
        rows.append(img.shape[0])
        return remaining(self, img, *args, **kwargs)

    monkeypatch.setattr(type(engine.pipeline.engine_transformer()), "remaining_blocks", counting)
    batched = engine.run_batch(requests)
    flags = [one.stats["step_cache"]["cached"] for one in alone]
    assert len({flag[1] for flag in flags}) == 2  # step 1: some skip, some compute
    for index, (one, many) in enumerate(zip(alone, batched, strict=True)):
        assert many.stats["step_cache"]["cached"] == one.stats["step_cache"]["cached"], index
        assert many.stats["steps_cached"] == one.stats["steps_cached"]
        assert float(np.abs(decoded[index] - decoded_alone[index]).max()) <= FLOAT_ATOL
        assert_same_images(levels(one), levels(many))
    # Each step's pass ran on the images of the requests computing it, none when all skipped.
    sizes = [r.num_images for r in requests]
    expected = [
        sum(n for n, flag in zip(sizes, step, strict=True) if not flag) for step in zip(*flags, strict=True)
    ]
    assert rows == [count for count in expected if count]


def test_with_diffusers_cache_on_the_transformer_every_request_runs_alone():
    from diffusers.hooks import FirstBlockCacheConfig

    engine = helpers.tiny_engine()
    engine.pipeline.transformer.enable_cache(FirstBlockCacheConfig(threshold=0.5))
    assert engine.batch_key(request().validated()) is None
    with pytest.raises(ValueError, match="diffusers' cache"):
        engine.run_batch([request(seed=1), request(seed=2)])
    assert len(engine.run_batch([request(seed=1)])) == 1


def test_generate_batch_refuses_calls_that_cannot_share_the_loop(engine):
    pipe = engine.pipeline

    def call(**overrides):
        return PipelineCall(**helpers.call_kwargs(**overrides))

    with pytest.raises(ValueError, match=r"calls\[1\]: `num_inference_steps` is 3 but calls\[0\] has 2"):
        pipe.generate_batch([call(), call(num_inference_steps=3)])
    with pytest.raises(ValueError, match=r"calls\[1\]: `sigmas`"):
        pipe.generate_batch([call(sigmas=np.array([1.0, 0.5])), call(sigmas=[1.0, 0.4])])
    same = pipe.generate_batch([call(sigmas=np.array([1.0, 0.5])), call(sigmas=[1.0, 0.5])])
    assert len(same) == 2
    with pytest.raises(ValueError, match=r"calls\[2\]: `height`"):
        pipe.generate_batch([call(), call(), call(height=64)])
    with pytest.raises(ValueError, match=r"calls\[0\]: `callback_on_step_end`"):
        pipe.generate_batch([call(callback_on_step_end=lambda *a: {}), call()])
    with pytest.raises(ValueError, match="at most 64"):
        pipe.generate_batch([call(num_images_per_prompt=40), call(num_images_per_prompt=40)])
    with pytest.raises(ValueError, match="non-empty"):
        pipe.generate_batch([])
