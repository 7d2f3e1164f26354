"""A saved engine (``engine.save`` / ``FluxFillEngine.from_pretrained(dir)``): images equal bit for bit
to the engine that saved it, the weights read as they run, a mismatched manifest refused by name."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from fluxfill_engine import EngineConfig, FillRequest, FluxFillEngine
from fluxfill_engine.quantization import QuantizedLinear, weight_bytes
from fluxfill_engine.saved_engine import MANIFEST, WEIGHTS, is_saved_engine
from fluxfill_engine.testing.pictures import picture_and_mask
from fluxfill_engine.testing.tiny import save_tiny_model
from tests.support import helpers


def request() -> FillRequest:
    image, mask = picture_and_mask(256, 256)
    return FillRequest("a white paper cup", image, mask, 256, 256, 2, seed=3)


def pixels(engine: FluxFillEngine) -> np.ndarray:
    return np.asarray(engine.run(request()).images[0])


def small_images(engine: FluxFillEngine) -> np.ndarray:
    """The drop-in call at the tests' small size (the engine's request path needs 256 pixels)."""
    engine.pipeline.set_progress_bar_config(disable=True)
    return helpers.as_array(engine.pipeline(**helpers.call_kwargs(seed=3))[0])


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny") / "base")


@pytest.mark.parametrize("quant", ["none", "int8", "fp8-weight"])
def test_a_saved_engine_gives_the_same_images_bit_for_bit(base, tmp_path, quant):
    engine = FluxFillEngine.from_pretrained(base, config=EngineConfig(quant=quant))
    before = small_images(engine)

    manifest = engine.save(tmp_path / "saved")
    loaded = FluxFillEngine.from_pretrained(tmp_path / "saved")

    assert is_saved_engine(tmp_path / "saved")
    assert np.array_equal(small_images(loaded), before)
    assert loaded.config == engine.config
    assert loaded.start_report.source == "saved engine"
    assert manifest["config"]["quant"] == quant and manifest["device_kind"] == "cpu"
    plan = loaded.pipeline.engine_transformer().quant_plan
    assert (plan is None) == (quant == "none")
    assert manifest["quant_plan"] == (
        None if plan is None else {"mode": plan.mode, "backend": "native", "reason": plan.reason}
    )


def test_the_weights_are_read_as_they_run(base, tmp_path):
    engine = FluxFillEngine.from_pretrained(base, config=EngineConfig(quant="int8"))
    engine.save(tmp_path / "int8")
    FluxFillEngine.from_pretrained(base).save(tmp_path / "exact")

    loaded = FluxFillEngine.from_pretrained(tmp_path / "int8")

    fill = loaded.pipeline.engine_transformer()
    file_bytes = (tmp_path / "int8" / WEIGHTS).stat().st_size
    exact_bytes = (tmp_path / "exact" / WEIGHTS).stat().st_size
    quantized = [m for m in fill.modules() if isinstance(m, QuantizedLinear)]
    assert quantized and all(m.weight_bits.dtype == torch.int8 for m in quantized)
    # Each quantized weight: 1 byte instead of 4, plus a 4-byte scale per row; the rest is unchanged.
    saved = sum(3 * m.weight_bits.numel() - 4 * m.out_features for m in quantized)
    assert abs((exact_bytes - file_bytes) - saved) < 16 * 1024  # the headers differ
    # What the transformer holds is the file's tensors, once (no float copy of the quantized layers
    # beside them, nothing left on meta); the header is the only difference.
    held = weight_bytes([loaded.pipeline.transformer])
    assert file_bytes - 64 * 1024 < held <= file_bytes
    assert all(not t.is_meta for t in loaded.pipeline.transformer.state_dict().values())
    assert fill.is_in_sync()


def test_a_mismatched_manifest_is_refused_naming_what_differs(base, tmp_path):
    saved = tmp_path / "saved"
    FluxFillEngine.from_pretrained(base, config=EngineConfig(quant="int8")).save(saved)

    with pytest.raises(ValueError, match=r"quant: saved 'int8', asked 'none'"):
        FluxFillEngine.from_pretrained(saved, config=EngineConfig())
    with pytest.raises(ValueError, match=r"torch_dtype: saved 'float32'"):
        FluxFillEngine.from_pretrained(saved, torch_dtype="bfloat16")
    # Runtime fields may change at load.
    changed = FluxFillEngine.from_pretrained(saved, config=EngineConfig(quant="int8", prompt_cache_size=2))
    assert changed.config.prompt_cache_size == 2

    manifest = json.loads((saved / MANIFEST).read_text())
    (saved / MANIFEST).write_text(json.dumps({**manifest, "device_kind": "cuda NVIDIA H100 sm90"}))
    with pytest.raises(
        ValueError, match=r"device kind: prepared for 'cuda NVIDIA H100 sm90', loading on 'cpu'"
    ):
        FluxFillEngine.from_pretrained(saved)
    (saved / MANIFEST).write_text(json.dumps({**manifest, "format_version": 99}))
    with pytest.raises(ValueError, match="format version 99"):
        FluxFillEngine.from_pretrained(saved)
    (saved / MANIFEST).write_text(json.dumps({**manifest, "model": {**manifest["model"], "num_layers": 3}}))
    with pytest.raises(ValueError, match="does not fit the model's config: missing"):
        FluxFillEngine.from_pretrained(saved)


def test_saving_refuses_what_it_cannot_keep(base, tmp_path):
    engine = FluxFillEngine.from_pretrained(base)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    with pytest.raises(ValueError, match="not an empty folder"):
        engine.save(tmp_path / "full")
    quantized_t5 = FluxFillEngine.from_pretrained(base, config=EngineConfig(quantize_text_encoder=True))
    with pytest.raises(ValueError, match="quantize_text_encoder=False"):
        quantized_t5.save(tmp_path / "t5")
    assert not (tmp_path / "t5").exists()


@pytest.mark.slow
def test_a_saved_engine_runs_requests_as_the_engine_that_saved_it(base, tmp_path):
    engine = FluxFillEngine.from_pretrained(base, config=EngineConfig(quant="int8"))
    before = pixels(engine)
    engine.save(tmp_path / "saved")
    assert np.array_equal(pixels(FluxFillEngine.from_pretrained(tmp_path / "saved")), before)


@pytest.mark.slow
def test_a_compiled_engine_saves_its_compile_cache_and_loads_it(base, tmp_path):
    config = EngineConfig(quant="int8", compile=True)
    engine = FluxFillEngine.from_pretrained(base, config=config)
    engine.warmup(sizes=[(256, 256)], num_inference_steps=2)
    before = pixels(engine)

    manifest = engine.save(tmp_path / "saved")
    loaded = FluxFillEngine.from_pretrained(tmp_path / "saved")

    assert manifest["compile_cache"] is not None and manifest["compile_cache"]["bytes"] > 0
    assert loaded.pipeline.compile_cache is not None  # loaded before compiling
    assert np.array_equal(pixels(loaded), before)


def test_fluxfill_prepare_writes_a_saved_engine(tmp_path, capsys):
    from fluxfill_engine.cli import main

    out = tmp_path / "prepared"
    assert main(["prepare", "--out", str(out), "--preset", "reference", "--device", "cpu"]) == 0
    assert f"saved engine: {out}" in capsys.readouterr().out
    engine = FluxFillEngine.from_pretrained(out)
    assert engine.start_report.source == "saved engine" and engine.config.dtype == "float32"
    assert main(["prepare", "--out", str(out)]) == 2
    assert "--out" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("quant", ["none", "int8"])  # a merged LoRA, a side-path LoRA
def test_a_saved_engine_runs_loras_as_the_engine_that_saved_it(base, tmp_path, quant):
    from tests.support.lora import kohya_lora

    lora = kohya_lora(tmp_path / "lora.safetensors", seed=1)
    with_lora = dataclasses.replace(request(), loras=[{"path": str(lora), "scale": 0.8}])
    engine = FluxFillEngine.from_pretrained(base, config=EngineConfig(quant=quant))
    before = np.asarray(engine.run(with_lora).images[0])
    engine.save(tmp_path / "saved")  # the merged set is taken out of the saved weights
    loaded = FluxFillEngine.from_pretrained(tmp_path / "saved")
    assert np.array_equal(np.asarray(loaded.run(with_lora).images[0]), before)
    assert np.array_equal(
        pixels(loaded), pixels(FluxFillEngine.from_pretrained(base, config=EngineConfig(quant=quant)))
    )
