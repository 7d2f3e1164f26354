"""Every input a user can send is read as a viewer shows it, or refused clearly before any work.

Through the public entry points (the engine, the drop-in, the command line), with the files made here.
Each refused request is followed by a good one that must give the image the engine gave before.
"""

from __future__ import annotations

import logging
import struct
import threading
import zlib
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch

from fluxfill_engine import EngineConfig, Event, FillRequest, PipelineCall
from fluxfill_engine.cli import main
from tests.support import helpers

SIZE = 256
ORIENTATION = 0x0112


def photo(width: int = SIZE, height: int = SIZE) -> np.ndarray:
    """A deterministic RGB picture, uint8 ``[H, W, 3]``."""
    gen = np.random.default_rng(3)
    ys, xs = np.mgrid[0:height, 0:width]
    base = np.stack([xs / width, ys / height, (xs + ys) / (width + height)], axis=-1)
    return np.round((0.7 * base + 0.3 * gen.random((height, width, 3))) * 255).astype(np.uint8)


def box_mask(width: int = SIZE, height: int = SIZE, value: int = 255) -> np.ndarray:
    mask = np.zeros((height, width), np.uint8)
    mask[height // 4 : height // 2, width // 3 : 2 * width // 3] = value
    return mask


def pixels(result) -> list[np.ndarray]:
    return [np.asarray(image) for image in result.images]


@pytest.fixture(scope="module")
def engine():
    return helpers.tiny_engine()


def fill(engine, image, mask, **fields):
    fields = {"num_inference_steps": 2, "seed": 0, "max_megapixels": 0.065, **fields}
    return pixels(engine.run(FillRequest("a red cup", image, mask, **fields)))


@pytest.fixture(scope="module")
def baseline(engine):
    """The engine's image for the plain 8-bit photo and box mask: what a good request must give."""
    return fill(engine, PIL.Image.fromarray(photo()), PIL.Image.fromarray(box_mask()))


def assert_engine_unchanged(engine, baseline):
    again = fill(engine, PIL.Image.fromarray(photo()), PIL.Image.fromarray(box_mask()))
    np.testing.assert_array_equal(again[0], baseline[0])


# ---- images read as a viewer shows them ------------------------------------------------------------


def save_16bit_grey(path: Path, values: np.ndarray) -> Path:
    PIL.Image.fromarray(values.astype(np.uint16)).save(path)
    assert PIL.Image.open(path).mode.startswith("I")  # really a 16-bit file
    return path


@pytest.mark.slow
def test_16bit_masks_are_scaled_not_clipped(engine, baseline, tmp_path):
    image = PIL.Image.fromarray(photo())
    faint = save_16bit_grey(
        tmp_path / "faint.png", box_mask(value=1).astype(np.uint32) * 655
    )  # 1% grey: keep
    empty = fill(engine, image, PIL.Image.fromarray(box_mask(value=0)))
    np.testing.assert_array_equal(fill(engine, image, faint)[0], empty[0])
    strong = save_16bit_grey(
        tmp_path / "strong.png", box_mask(value=1).astype(np.uint32) * 60000
    )  # 92%: repaint
    np.testing.assert_array_equal(fill(engine, image, strong)[0], baseline[0])


@pytest.mark.slow
def test_16bit_photos_are_scaled_not_clipped(engine, tmp_path):
    grey = photo()[..., 0]
    path = save_16bit_grey(tmp_path / "photo16.png", grey.astype(np.uint32) * 257)  # 8 bits -> 16 bits
    mask = PIL.Image.fromarray(box_mask())
    from_8bit = fill(engine, PIL.Image.fromarray(grey).convert("RGB"), mask)
    np.testing.assert_array_equal(fill(engine, path, mask)[0], from_8bit[0])


def test_16bit_mask_through_the_drop_in(pipe, tmp_path):
    kwargs = helpers.call_kwargs(output_type="np")
    height, width = helpers.HEIGHT, helpers.WIDTH
    sixteen = np.zeros((height, width), np.uint32)
    sixteen[8:24, 12:36] = 60000
    path = save_16bit_grey(tmp_path / "mask16.png", sixteen)
    expected = pipe(**kwargs).images  # the same box as a float mask
    helpers.assert_close(pipe(**helpers.call_kwargs(mask_image=path)).images, expected, atol=0)


def save_with_orientation(path: Path, image: PIL.Image.Image, orientation: int) -> Path:
    exif = PIL.Image.Exif()
    exif[ORIENTATION] = orientation
    image.save(path, exif=exif.tobytes())
    return path


@pytest.mark.slow
def test_exif_rotated_photo_is_upright_and_the_mask_drawn_on_it_fits(engine, tmp_path):
    upright = PIL.Image.fromarray(photo(256, 384))  # portrait, as a viewer shows it
    mask = PIL.Image.fromarray(box_mask(256, 384))  # drawn on the photo as shown
    stored = upright.transpose(PIL.Image.Transpose.ROTATE_90)  # what the camera wrote: landscape
    path = save_with_orientation(tmp_path / "phone.png", stored, 6)  # "rotate 90 clockwise to view"
    expected = fill(engine, upright, mask)
    result = fill(engine, path, mask)
    assert result[0].shape == (384, 256, 3)
    np.testing.assert_array_equal(result[0], expected[0])


def test_a_mask_on_a_transparent_layer_is_its_alpha(engine, baseline):
    strokes = np.zeros((SIZE, SIZE, 4), np.uint8)
    strokes[..., :3] = 40  # the strokes' colour does not matter: their opacity does
    strokes[..., 3] = box_mask()
    image = PIL.Image.fromarray(photo())
    np.testing.assert_array_equal(fill(engine, image, PIL.Image.fromarray(strokes, "RGBA"))[0], baseline[0])


def test_a_coloured_mask_repaints_where_any_channel_is_bright(engine, baseline):
    red = np.zeros((SIZE, SIZE, 3), np.uint8)
    red[..., 0] = box_mask()
    image = PIL.Image.fromarray(photo())
    np.testing.assert_array_equal(fill(engine, image, PIL.Image.fromarray(red))[0], baseline[0])


def test_a_mask_of_another_aspect_ratio_is_refused(engine, baseline):
    image = PIL.Image.fromarray(photo())
    with pytest.raises(ValueError, match=r"`mask` is 256x384 but the image is 256x256"):
        fill(engine, image, PIL.Image.fromarray(box_mask(256, 384)))
    assert_engine_unchanged(engine, baseline)


def test_a_smaller_mask_of_the_same_aspect_is_scaled_with_a_warning(engine, caplog):
    image = PIL.Image.fromarray(photo())
    with caplog.at_level(logging.WARNING, logger="fluxfill_engine.images"):
        result = fill(engine, image, PIL.Image.fromarray(box_mask(128, 128)))
    assert "mask is 128x128 and the image 256x256" in caplog.text and result[0].shape == (256, 256, 3)


# ---- decompression bombs and huge images -----------------------------------------------------------


def png_claiming(path: Path, width: int, height: int) -> Path:
    """A tiny valid PNG whose header claims ``width x height`` (what a decompression bomb looks like)."""
    small = path.with_suffix(".small.png")
    PIL.Image.new("L", (4, 4)).save(small)
    data = bytearray(small.read_bytes())
    ihdr = data.index(b"IHDR")
    data[ihdr + 4 : ihdr + 12] = struct.pack(">II", width, height)
    data[ihdr + 17 : ihdr + 21] = struct.pack(">I", zlib.crc32(bytes(data[ihdr : ihdr + 17])))
    path.write_bytes(bytes(data))
    return path


def test_a_bomb_header_is_refused_before_decoding(engine, baseline, tmp_path, monkeypatch):
    bomb = png_claiming(tmp_path / "bomb.png", 50000, 50000)
    decoded = []
    monkeypatch.setattr(PIL.ImageFile.ImageFile, "load", lambda self: decoded.append(self))
    with pytest.raises(
        ValueError, match=r"`image` .* is 2500.0 megapixels by its header, above the limit of 40"
    ):
        fill(engine, bomb, PIL.Image.fromarray(box_mask()))
    assert decoded == []
    monkeypatch.undo()
    assert_engine_unchanged(engine, baseline)


def test_a_bomb_on_the_command_line_is_one_line_and_exit_2(tmp_path, capsys):
    bomb = png_claiming(tmp_path / "bomb.png", 50000, 50000)
    mask = tmp_path / "mask.png"
    PIL.Image.fromarray(box_mask()).save(mask)
    code = main(["inpaint", "--image", str(bomb), "--mask", str(mask), "--out", str(tmp_path / "o.png")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("error: --image: `image`") and "2500.0 megapixels" in err[-1]
    assert "Traceback" not in "\n".join(err)


def test_a_large_real_image_is_refused_from_its_header(engine, tmp_path, monkeypatch):
    large = tmp_path / "large.png"
    PIL.Image.new("L", (8000, 6000)).save(large)  # 48 megapixels, compresses to little
    decoded = []
    monkeypatch.setattr(PIL.ImageFile.ImageFile, "load", lambda self: decoded.append(self))
    with pytest.raises(ValueError, match=r"`mask` is 8000x6000 = 48.0 megapixels, above the limit of 40"):
        fill(engine, PIL.Image.fromarray(photo()), large)
    assert decoded == []


def test_the_input_size_limit_is_configurable(baseline):
    small_limit = helpers.tiny_engine(EngineConfig(max_input_megapixels=0.05))
    with pytest.raises(ValueError, match=r"`image` is 256x256 = 0.1 megapixels.*limit of 0.05"):
        fill(small_limit, PIL.Image.fromarray(photo()), PIL.Image.fromarray(box_mask()))
    with pytest.raises(ValueError, match="max_input_megapixels"):
        EngineConfig(max_input_megapixels=float("inf"))


def test_the_drop_in_refuses_huge_arrays_before_any_work(pipe):
    pipe.configure(EngineConfig(max_input_megapixels=0.001))
    with pytest.raises(ValueError, match=r"`image` is 48x32 .* above the limit"):
        pipe(**helpers.call_kwargs())
    assert len(pipe.prompt_cache) == 0


# ---- text ------------------------------------------------------------------------------------------


def test_a_lone_surrogate_prompt_is_refused_up_front(engine, baseline, pipe):
    broken = "a cup \udcff on the table"  # what undecodable bytes in argv become
    image, mask = PIL.Image.fromarray(photo()), PIL.Image.fromarray(box_mask())
    with pytest.raises(ValueError, match=r"`prompt` is not valid text.*surrogate"):
        engine.run(FillRequest(broken, image, mask, num_inference_steps=2, seed=0))
    with pytest.raises(ValueError, match=r"`prompt_2` is not valid text"):
        pipe(**helpers.call_kwargs(prompt_2=broken))
    assert_engine_unchanged(engine, baseline)


def test_a_huge_prompt_is_refused_and_a_long_one_logs_a_short_line(engine, baseline, caplog):
    image, mask = PIL.Image.fromarray(photo()), PIL.Image.fromarray(box_mask())
    with pytest.raises(ValueError, match=r"`prompt` has 1000000 characters; at most 10000"):
        engine.run(FillRequest("cup " * 250_000, image, mask, num_inference_steps=2, seed=0))
    with caplog.at_level(logging.WARNING, logger="fluxfill_engine.text"):
        engine.run(
            FillRequest("red cup " * 1200, image, mask, num_inference_steps=1, seed=0, max_megapixels=0.065)
        )
    truncated = [r.getMessage() for r in caplog.records if "truncated" in r.getMessage()]
    assert truncated and all(len(message) < 400 for message in truncated)
    assert_engine_unchanged(engine, baseline)


# ---- the drop-in: non-finite tensors and deep errors ----------------------------------------------


def _embeds(pipe):
    return pipe.encode_prompt(helpers.PROMPT, max_sequence_length=helpers.MAX_SEQ)[:2]


@pytest.mark.parametrize("name", ["latents", "prompt_embeds", "pooled_prompt_embeds", "masked_image_latents"])
def test_non_finite_tensors_are_refused(pipe, name):
    embeds, pooled = _embeds(pipe)
    tensors = {
        "latents": torch.zeros(1, 6, 64),
        "prompt_embeds": embeds.clone(),
        "pooled_prompt_embeds": pooled.clone(),
        "masked_image_latents": torch.zeros(1, 6, 320),
    }
    tensors[name].view(-1)[3] = float("nan")
    overrides = {name: tensors[name]}
    if name in ("prompt_embeds", "pooled_prompt_embeds"):
        overrides = {
            "prompt": None,
            "prompt_embeds": tensors["prompt_embeds"],
            "pooled_prompt_embeds": tensors["pooled_prompt_embeds"],
        }
    if name == "masked_image_latents":
        overrides.update(image=None, mask_image=None)
    with pytest.raises(ValueError, match=f"`{name}` contains NaN or infinite values"):
        pipe(**helpers.call_kwargs(**overrides))


def test_a_callback_writing_nan_stops_with_the_step(pipe):
    def poison(p, step, timestep, kwargs):
        if step == 1:
            kwargs["latents"].fill_(float("nan"))
        return kwargs

    with pytest.raises(ValueError, match="non-finite latents at step 1"):
        pipe(**helpers.call_kwargs(num_inference_steps=3, callback_on_step_end=poison))


def test_a_callback_returning_none_is_a_type_error(pipe):
    with pytest.raises(TypeError, match=r"`callback_on_step_end` must return a dict.*NoneType at step 0"):
        pipe(**helpers.call_kwargs(callback_on_step_end=lambda *args: None))


DEEP_ERRORS = {
    "height-str": (dict(height="256"), ValueError, "`height` must be a positive int"),
    "generator-int": (dict(generator=0), TypeError, "`generator` must be a torch.Generator"),
    "prompt-2-count": (dict(prompt_2=["a cat", "a dog"]), ValueError, "`prompt_2` holds 2 prompts for 1"),
    "embeds-width": (
        dict(prompt=None, embeds_width=64),
        ValueError,
        "`prompt_embeds` must be T5 embeddings of width 32",
    ),
    "pooled-width": (dict(prompt=None, pooled_width=8), ValueError, "`pooled_prompt_embeds` must be CLIP"),
    "height-huge": (dict(height=200000), ValueError, r"`height` must be in \[16, 8192\]"),
    "steps-huge": (
        dict(num_inference_steps=10**9),
        ValueError,
        r"`num_inference_steps` must be an int in \[1, 1000\]",
    ),
    "images-huge": (
        dict(num_images_per_prompt=10**7),
        ValueError,
        r"10000000 images in one call; at most 64",
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(DEEP_ERRORS), ids=list(DEEP_ERRORS))
def test_deep_errors_become_clear_ones_before_any_work(pipe, case):
    overrides, error, match = DEEP_ERRORS[case]
    overrides = dict(overrides)
    embeds_width, pooled_width = overrides.pop("embeds_width", None), overrides.pop("pooled_width", None)
    if embeds_width or pooled_width:
        embeds, pooled = _embeds(pipe)
        pipe.prompt_cache.clear()
        embeds = torch.zeros(1, 8, embeds_width) if embeds_width else embeds
        pooled = torch.zeros(1, pooled_width) if pooled_width else pooled
        overrides.update(prompt_embeds=embeds, pooled_prompt_embeds=pooled)
    with pytest.raises(error, match=match):
        pipe(**helpers.call_kwargs(**overrides))
    assert len(pipe.prompt_cache) == 0
    expected = helpers.call_kwargs()
    assert np.isfinite(pipe(**expected).images).all()  # the pipeline still works


# ---- the command line: everything checked before the model loads ----------------------------------


@pytest.fixture
def no_model(monkeypatch):
    """Fail the test if the command line gets as far as building a model."""

    def refuse(*args, **kwargs):
        raise AssertionError("the model was built before the arguments were checked")

    monkeypatch.setattr("fluxfill_engine.testing.demo.tiny_engine", refuse)


def cli_error(capsys, *args: str) -> str:
    code = main(["inpaint", "--steps", "1", *args])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2, lines
    assert len([line for line in lines if line.startswith("error:")]) == 1 and "Traceback" not in lines
    return lines[-1]


def test_cli_output_path_problems_before_any_work(tmp_path, capsys, no_model):
    (tmp_path / "a-file").write_text("x")
    (tmp_path / "folder.png").mkdir()
    assert "is a folder" in cli_error(capsys, "--out", str(tmp_path / "folder.png"))
    assert "is a file, so" in cli_error(capsys, "--out", str(tmp_path / "a-file" / "out.png"))
    assert "extension '.xyz'" in cli_error(capsys, "--out", str(tmp_path / "out.xyz"))
    assert "no extension" in cli_error(capsys, "--out", str(tmp_path / "out"))
    assert cli_error(capsys, "--out", str(tmp_path / "folder.png")).startswith("error: --out:")


def test_cli_devices_before_any_work(tmp_path, capsys, no_model):
    out = str(tmp_path / "o.png")
    assert cli_error(capsys, "--device", "bogus", "--out", out) == (
        "error: --device: 'bogus' is not a device; use cpu or cuda[:N]"
    )
    if not torch.cuda.is_available():
        assert "no CUDA GPU is available" in cli_error(capsys, "--device", "cuda", "--out", out)


def test_cli_request_errors_name_the_option(tmp_path, capsys, no_model):
    out = str(tmp_path / "o.png")
    assert cli_error(capsys, "--guidance", "nan", "--out", out).startswith("error: --guidance: ")
    assert cli_error(capsys, "--width", "100", "--out", out).startswith("error: --width: ")
    assert cli_error(capsys, "--image", str(tmp_path / "none.png"), "--mask", out, "--out", out).startswith(
        "error: --image: no such image file"
    )


# ---- concurrency -----------------------------------------------------------------------------------


@pytest.mark.slow
def test_four_threads_on_one_engine_get_their_own_images_and_stats(engine):
    image, mask = PIL.Image.fromarray(photo()), PIL.Image.fromarray(box_mask())
    requests = [
        FillRequest(prompt, image, mask, num_inference_steps=steps, seed=seed, max_megapixels=0.065)
        for prompt, steps, seed in [("red cup", 1, 1), ("blue dog", 2, 2), ("red cup", 3, 3), ("a cat", 2, 4)]
    ]
    sequential = [engine.run(request) for request in requests]
    results: dict[int, object] = {}
    threads = [
        threading.Thread(target=lambda i=i: results.update({i: engine.run(requests[i])})) for i in range(4)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for i, request in enumerate(requests):
        assert results[i].stats["num_steps"] == request.num_inference_steps
        assert results[i].stats["steps_full"] == request.num_inference_steps
        np.testing.assert_array_equal(pixels(results[i])[0], pixels(sequential[i])[0])


def test_an_interrupt_in_one_thread_does_not_stop_another(pipe):
    expected = pipe(**helpers.call_kwargs(num_inference_steps=3)).images
    interrupted, other_done = threading.Event(), threading.Event()

    def interrupt_at_step_0(p, step, timestep, kwargs):
        p._interrupt = True
        interrupted.set()
        other_done.wait(timeout=60)
        return kwargs

    first = threading.Thread(
        target=lambda: pipe(
            **helpers.call_kwargs(num_inference_steps=3, callback_on_step_end=interrupt_at_step_0)
        )
    )
    first.start()
    assert interrupted.wait(timeout=60)
    try:
        other = pipe(**helpers.call_kwargs(num_inference_steps=3)).images  # runs while the first is paused
    finally:
        other_done.set()
        first.join()
    helpers.assert_close(other, expected, atol=0)


# ---- on_event --------------------------------------------------------------------------------------


def events_of(
    engine, handler_at: str, raise_: BaseException
) -> tuple[list[str], BaseException | None, object]:
    seen: list[str] = []

    def handler(event: Event) -> None:
        seen.append(event.type)
        if event.type == handler_at:
            raise raise_

    image, mask = PIL.Image.fromarray(photo()), PIL.Image.fromarray(box_mask())
    try:
        result = engine.run(
            FillRequest("a red cup", image, mask, num_inference_steps=2, seed=0, max_megapixels=0.065),
            on_event=handler,
        )
    except BaseException as err:  # noqa: BLE001 - the test inspects what escaped
        return seen, err, None
    return seen, None, result


@pytest.mark.parametrize(
    "raised", [KeyboardInterrupt(), SystemExit(3), RuntimeError("handler broke")], ids=repr
)
@pytest.mark.parametrize("at", ["accepted", "step", "preprocess_end"])
def test_a_handler_raising_mid_request_gets_one_closing_error_event(engine, baseline, raised, at):
    seen, escaped, _ = events_of(engine, at, raised)
    assert type(escaped) is type(raised)
    assert seen[-1] == "error" and seen.count("error") == 1 and "done" not in seen
    assert_engine_unchanged(engine, baseline)


@pytest.mark.parametrize("raised", [RuntimeError("handler broke"), ValueError("nope")], ids=repr)
def test_a_handler_raising_at_done_keeps_the_finished_result(engine, baseline, raised, caplog):
    with caplog.at_level(logging.ERROR, logger="fluxfill_engine.engine"):
        seen, escaped, result = events_of(engine, "done", raised)
    assert escaped is None and seen.count("done") == 1 and "error" not in seen
    np.testing.assert_array_equal(pixels(result)[0], baseline[0])
    assert "on_event raised on the `done` event" in caplog.text


def test_a_non_callable_on_event_is_a_type_error(engine, baseline):
    image, mask = PIL.Image.fromarray(photo()), PIL.Image.fromarray(box_mask())
    with pytest.raises(TypeError, match="`on_event` must be callable"):
        engine.run(FillRequest("a red cup", image, mask, num_inference_steps=2, seed=0), on_event=5)
    assert_engine_unchanged(engine, baseline)


def test_generate_with_a_bad_call_leaves_the_pipeline_usable(pipe):
    expected = pipe(**helpers.call_kwargs()).images
    with pytest.raises(TypeError, match="generator"):
        pipe.generate(PipelineCall(**helpers.call_kwargs(generator=7)))
    helpers.assert_close(pipe(**helpers.call_kwargs()).images, expected, atol=0)
