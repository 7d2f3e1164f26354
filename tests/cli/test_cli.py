"""``fluxfill inpaint`` on the built-in tiny model and on a saved folder: PNGs of the requested size,
several images; every bad option is refused before a model loads, as one line naming it, exit code 2."""

import subprocess
import sys

import numpy as np
import PIL.Image
import pytest

from fluxfill_engine import FillRequest
from fluxfill_engine.cli import main
from fluxfill_engine.errors import InputError, InputTypeError
from fluxfill_engine.testing.demo import demo_inputs
from fluxfill_engine.testing.tiny import save_tiny_model


@pytest.mark.slow
def test_inpaint_writes_png_of_requested_size(tmp_path, capsys):
    out = tmp_path / "out.png"
    assert (
        main(
            ["inpaint", "--steps", "2", "--width", "320", "--height", "256", "--seed", "1", "--out", str(out)]
        )
        == 0
    )
    with PIL.Image.open(out) as image:
        assert image.size == (320, 256) and image.mode == "RGB"
    printed = capsys.readouterr().out
    assert "tiny random-weight model" in printed and "timings:" in printed and "seed 1" in printed


@pytest.mark.slow
def test_inpaint_with_files_model_folder_and_several_images(tmp_path):
    image, mask = demo_inputs(288, 256)
    image.save(tmp_path / "in.png")
    mask.save(tmp_path / "mask.png")
    model = save_tiny_model(tmp_path / "model")
    args = ["inpaint", "--image", str(tmp_path / "in.png"), "--mask", str(tmp_path / "mask.png")]
    args += ["--model", str(model), "--steps", "1", "--num-images", "2", "--out", str(tmp_path / "o.png")]
    assert main(args) == 0
    outputs = [tmp_path / "o-0.png", tmp_path / "o-1.png"]
    sizes = [PIL.Image.open(path).size for path in outputs]
    assert sizes == [(288, 256), (288, 256)]
    first, second = (np.asarray(PIL.Image.open(path)) for path in outputs)
    assert not np.array_equal(first, second)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--steps", "0"], "num_inference_steps"),
        (["--width", "100"], "width"),
        (["--image", "/nonexistent.png", "--mask", "/nonexistent.png"], "image"),
    ],
)
def test_bad_arguments_exit_2_with_a_message(tmp_path, capsys, args, message):
    assert main(["inpaint", "--out", str(tmp_path / "x.png"), *args]) == 2
    assert message in capsys.readouterr().err


def test_help_runs_as_a_module():
    result = subprocess.run(
        [sys.executable, "-m", "fluxfill_engine", "inpaint", "--help"], capture_output=True, text=True
    )
    assert result.returncode == 0
    assert "--preset" in result.stdout and "--model" in result.stdout


@pytest.mark.parametrize(
    ("error", "printed"),
    [
        (InputError("must be at most 100", field="guidance_scale"), "error: --guidance: must be at most 100"),
        (InputTypeError("must be a number", field="loras[1].scale"), "error: --lora: must be a number"),
        (InputError("no option sets this", field=None), "error: no option sets this"),
    ],
)
def test_a_refused_value_names_the_option_of_its_field(monkeypatch, tmp_path, capsys, error, printed):
    def refuse(self, *args, **kwargs):
        raise error

    monkeypatch.setattr(FillRequest, "validated", refuse)
    assert main(["inpaint", "--device", "cpu", "--out", str(tmp_path / "o.png")]) == 2
    assert capsys.readouterr().err.strip() == printed
