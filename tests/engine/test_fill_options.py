"""Fill options of the engine: paste-back, any input size, crop-to-mask, outpainting, soft masks.

Exact where exactness is the promise (pixels outside the mask, sizes); each option also runs with
several images per request and with the step cache on. Pixels outside the grown and feathered mask equal
the input's; the output has the input's size for odd and large inputs; a crop keeps the input outside it
at a far smaller working size; outpainting grows the canvas and keeps the original; soft masks change
what the model gets and leave a binary mask's result unchanged; the CLI flags.
"""

from __future__ import annotations

import numpy as np
import PIL.Image
import pytest

from fluxfill_engine import EngineConfig, FillRequest
from fluxfill_engine.framing import working_size
from tests.support import helpers

FAST = 0.065  # megapixels: a 256x256 working size keeps the tiny model quick


def photo(width: int, height: int, seed: int = 0) -> PIL.Image.Image:
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:height, 0:width]
    base = np.stack([xs / width, ys / height, np.full_like(xs, 0.5, dtype=float)], axis=-1)
    return PIL.Image.fromarray(
        np.round((0.6 * base + 0.4 * rng.random((height, width, 3))) * 255).astype(np.uint8)
    )


def box(width: int, height: int, box: tuple[int, int, int, int], value: int = 255) -> PIL.Image.Image:
    mask = np.zeros((height, width), np.uint8)
    left, top, right, bottom = box
    mask[top:bottom, left:right] = value
    return PIL.Image.fromarray(mask)


@pytest.fixture(scope="module", params=["plain", "step-cache"])
def engine(request):
    config = EngineConfig() if request.param == "plain" else EngineConfig(step_cache_threshold=1e9)
    return helpers.tiny_engine(config)


def run(engine, image, mask, **fields):
    fields = {"num_inference_steps": 3, "seed": 0, "max_megapixels": FAST, **fields}
    return engine.run(FillRequest("a red cup", image, mask, **fields))


def outside(box: tuple[int, int, int, int], margin: int, size: tuple[int, int]) -> np.ndarray:
    """``[H, W]`` True where a pixel is farther than ``margin`` from ``box``."""
    width, height = size
    left, top, right, bottom = box
    keep = np.ones((height, width), bool)
    keep[max(top - margin, 0) : bottom + margin, max(left - margin, 0) : right + margin] = False
    return keep


# ---- paste-back ------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(("grow", "blur"), [(0, 0), (5, 0), (0, 6), (4, 3)])
def test_paste_back_keeps_every_pixel_outside_the_grown_and_feathered_mask(engine, grow, blur):
    image = photo(256, 256)
    mask_box = (80, 60, 170, 150)
    result = run(engine, image, box(256, 256, mask_box), mask_grow=grow, mask_blur=blur, num_images=2)
    keep = outside(mask_box, grow + blur, image.size)
    original = np.asarray(image)
    for picture in result.images:
        output = np.asarray(picture)
        np.testing.assert_array_equal(output[keep], original[keep])
        assert np.abs(output[~keep].astype(int) - original[~keep]).mean() > 1  # the inside was repainted


@pytest.mark.slow
def test_without_paste_back_the_model_picture_is_returned(engine):
    image = photo(256, 256)
    mask = box(256, 256, (80, 60, 170, 150))
    pasted = np.asarray(run(engine, image, mask).images[0])
    raw = np.asarray(run(engine, image, mask, paste_back=False).images[0])
    keep = outside((80, 60, 170, 150), 0, image.size)
    assert not np.array_equal(raw[keep], np.asarray(image)[keep])  # the model changes the unmasked part
    np.testing.assert_array_equal(pasted[~keep], raw[~keep])  # and paints the same inside


# ---- any input size --------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("size", [(300, 210), (1600, 1200), (257, 263)], ids=str)
def test_the_output_has_the_input_size_whatever_it_is(engine, size):
    width, height = size
    mask_box = (width // 3, height // 3, width // 2, height // 2)
    result = run(engine, photo(width, height), box(width, height, mask_box), num_images=2)
    assert [picture.size for picture in result.images] == [size, size]
    assert result.stats["output_size"] == size
    work_w, work_h = result.stats["working_size"]
    assert work_w % 16 == 0 and work_h % 16 == 0 and min(work_w, work_h) >= 256
    keep = outside(mask_box, 0, size)
    np.testing.assert_array_equal(np.asarray(result.images[0])[keep], np.asarray(photo(width, height))[keep])


def test_the_working_size_is_about_the_asked_megapixels_with_the_aspect_kept():
    assert working_size((1024, 1024), 1.0) == (1024, 1024)  # FLUX's own resolution
    assert working_size((4032, 3024), 1.0) == (1184, 880)  # a phone photo, 4:3
    assert working_size((8000, 100), 1.0) == (1536, 256)  # clamped to the model's range
    for size in [(640, 480), (1920, 1080), (333, 777), (300, 210), (4032, 3024)]:
        width, height = working_size(size, 1.0)
        assert width % 16 == 0 and height % 16 == 0
        assert abs(width * height / 1024**2 - 1.0) < 0.05
        assert abs(width / height - size[0] / size[1]) < 0.05 * size[0] / size[1]


def test_an_asked_output_size_is_exact(engine):
    result = run(engine, photo(256, 256), box(256, 256, (64, 64, 128, 128)), width=300, height=270)
    assert result.images[0].size == (300, 270) and result.stats["working_size"] == (288, 256)


# ---- crop to mask ----------------------------------------------------------------------------------


@pytest.mark.slow
def test_crop_to_mask_works_on_a_region_and_keeps_the_rest(engine):
    size = (1536, 1536)
    image, mask_box = photo(*size), (700, 800, 828, 928)  # a 128x128 mask
    mask = box(*size, mask_box)
    full = run(engine, image, mask, width=1536, height=1536, max_megapixels=1.0, num_inference_steps=1)
    cropped = run(engine, image, mask, crop_to_mask=True, crop_padding=40, paste_back=False, num_images=2)
    assert cropped.stats["region"] == (660, 760, 868, 968)
    region_area = np.prod(cropped.stats["working_size"])
    assert region_area < np.prod(full.stats["working_size"]) / 30
    left, top, right, bottom = cropped.stats["region"]
    keep = np.ones(size[::-1], bool)
    keep[top:bottom, left:right] = False
    for picture in cropped.images:
        assert picture.size == size
        np.testing.assert_array_equal(np.asarray(picture)[keep], np.asarray(image)[keep])


def test_crop_padding_covers_the_feathered_seam(engine):
    size = (512, 512)
    result = run(
        engine,
        photo(*size),
        box(*size, (200, 200, 260, 260)),
        crop_to_mask=True,
        crop_padding=4,
        mask_blur=10,
    )
    assert result.stats["region"] == (190, 190, 270, 270)  # padded by the blur, not less


# ---- outpainting -----------------------------------------------------------------------------------


@pytest.mark.slow
def test_outpaint_grows_the_canvas_and_keeps_the_original(engine):
    image = photo(256, 256)
    margins = {"left": 64, "top": 0, "right": 32, "bottom": 16}
    result = run(engine, image, None, outpaint=margins, mask_grow=8, num_images=2)
    assert result.stats["output_size"] == (352, 272)
    original = np.asarray(image)
    for picture in result.images:
        output = np.asarray(picture)
        assert output.shape == (272, 352, 3)
        kept = output[0 : 256 - 8, 64 + 8 : 64 + 256 - 8]  # the original, less the repainted overlap
        np.testing.assert_array_equal(kept, original[0 : 256 - 8, 8 : 256 - 8])
        assert np.abs(output[:, :48].astype(int) - original[:, :1].astype(int).mean()).mean() > 1


def test_outpaint_with_a_mask_repaints_both(engine):
    image = photo(256, 256)
    result = run(engine, image, box(256, 256, (100, 100, 150, 150)), outpaint={"right": 64})
    output, original = np.asarray(result.images[0]), np.asarray(image)
    assert output.shape == (256, 320, 3)
    keep = outside((100, 100, 150, 150), 0, (256, 256))
    np.testing.assert_array_equal(output[:, :256][keep], original[keep])


# ---- soft masks ------------------------------------------------------------------------------------


@pytest.mark.slow
def test_soft_masks_give_the_model_grey_levels(engine):
    image = photo(256, 256)
    grey = box(256, 256, (64, 64, 192, 192), value=90)  # 35%: a hard mask would keep all of it
    hard = run(engine, image, grey, paste_back=False)
    soft = run(engine, image, grey, paste_back=False, soft_mask=True)
    empty = run(engine, image, box(256, 256, (0, 0, 0, 0)), paste_back=False)
    np.testing.assert_array_equal(np.asarray(hard.images[0]), np.asarray(empty.images[0]))
    assert not np.array_equal(np.asarray(soft.images[0]), np.asarray(hard.images[0]))


@pytest.mark.slow
def test_a_binary_mask_is_the_same_soft_or_not(engine):
    image, mask = photo(256, 256), box(256, 256, (64, 64, 192, 192))
    hard = run(engine, image, mask, num_images=2)
    soft = run(engine, image, mask, soft_mask=True, num_images=2)
    for a, b in zip(hard.images, soft.images, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# ---- validation ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "error", "match", "field"),
    [
        (dict(mask_grow=-1), ValueError, "mask_grow", "mask_grow"),
        (dict(mask_blur=1000), ValueError, "mask_blur", "mask_blur"),
        (dict(paste_back="yes"), TypeError, "paste_back", "paste_back"),
        (dict(soft_mask=1), TypeError, "soft_mask", "soft_mask"),
        (dict(max_megapixels=10.0), ValueError, "max_megapixels", "max_megapixels"),
        (dict(crop_padding=-5), ValueError, "crop_padding", "crop_padding"),
        (dict(outpaint={"up": 10}), ValueError, "outpaint", "outpaint"),
        (dict(outpaint={"left": -1}), ValueError, "outpaint", "outpaint.left"),
        (dict(outpaint=[1, 2, 3, 4]), TypeError, "outpaint", "outpaint"),
        (dict(width=512), ValueError, "`width` and `height`", "width"),
        (dict(mask=None), ValueError, "optional with `outpaint`", "mask"),
    ],
)
def test_fill_options_are_checked_up_front(fields, error, match, field):
    request = {"prompt": "a cup", "image": photo(256, 256), "mask": box(256, 256, (1, 1, 9, 9)), **fields}
    with pytest.raises(error, match=match) as refused:
        FillRequest(**request).validated()
    assert refused.value.field == field


@pytest.mark.slow
def test_the_cli_flags(tmp_path):
    from fluxfill_engine.cli import main

    image, mask, out = tmp_path / "in.png", tmp_path / "mask.png", tmp_path / "out.png"
    photo(300, 210).save(image)
    box(300, 210, (100, 50, 200, 150)).save(mask)
    args = [
        "inpaint",
        "--image",
        str(image),
        "--mask",
        str(mask),
        "--out",
        str(out),
        "--steps",
        "1",
        "--seed",
        "0",
    ]
    assert main([*args, "--mask-grow", "4", "--mask-blur", "2", "--max-megapixels", "0.07"]) == 0
    assert PIL.Image.open(out).size == (300, 210)
    assert (
        main(
            [
                *args,
                "--crop-to-mask",
                "--crop-padding",
                "8",
                "--soft-mask",
                "--no-paste-back",
                "--max-megapixels",
                "0.07",
            ]
        )
        == 0
    )
    no_mask = [
        "inpaint",
        "--image",
        str(image),
        "--out",
        str(out),
        "--steps",
        "1",
        "--max-megapixels",
        "0.07",
    ]
    assert main([*no_mask, "--outpaint", "10,0,30,6"]) == 0
    assert PIL.Image.open(out).size == (340, 216)


@pytest.mark.parametrize("pixels", [0, 1, 2, 5, 13, 40])
def test_grow_mask_equals_repeated_3x3_dilation(pixels):
    from fluxfill_engine.framing import grow_mask

    rng = np.random.default_rng(pixels)
    values = rng.integers(1, 255, (37, 53)).astype(np.uint8) * (rng.random((37, 53)) > 0.97)
    expected = values.astype(np.uint8)
    for _ in range(pixels):  # the definition: one pixel of growth per 3x3 maximum
        padded = np.pad(expected, 1, mode="edge")
        rows = np.maximum(np.maximum(padded[:-2], padded[1:-1]), padded[2:])
        expected = np.maximum(np.maximum(rows[:, :-2], rows[:, 1:-1]), rows[:, 2:])
    grown = grow_mask(PIL.Image.fromarray(values.astype(np.uint8)), pixels)
    np.testing.assert_array_equal(np.asarray(grown), expected)
