"""``fluxfill bench crop`` (full frame vs crop-to-mask), on the tiny model at a small size."""

import json

import pytest

from fluxfill_engine.cli import main


@pytest.mark.slow
def test_crop_compare_writes_its_record(tmp_path, capsys):
    out = tmp_path / "crop.json"
    assert (
        main(
            [
                "bench",
                "crop",
                "--size",
                "768",
                "--mask-size",
                "64",
                "--steps",
                "1",
                "--repeats",
                "1",
                "--max-megapixels",
                "0.065",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    record = json.loads(out.read_text())
    full, crop = record["requests"]["full-frame"], record["requests"]["crop-to-mask"]
    assert full["working_size"] == [768, 768] and full["image_tokens"] == (768 // 16) ** 2
    assert crop["working_size"] == [256, 256] and crop["image_tokens"] == 256
    assert crop["region"] == [288, 288, 480, 480]  # the 64-pixel mask with 64 pixels of context
    assert record["speedup"]["e2e"] > 0 and "crop-to-mask" in capsys.readouterr().out
    assert out.with_suffix(".md").read_text().startswith("# Full frame vs crop-to-mask")
