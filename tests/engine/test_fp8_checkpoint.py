"""Community fp8 single files (BFL key layout) load straight into the engine's fp8 layers.

The files are written here from tiny models: the engine's own state put in BFL's layout
(:func:`~fluxfill_engine.checkpoints.engine_to_bfl`), each block linear cast to ``float8_e4m3fn`` with a
per-tensor scale as community files store it (ComfyUI's ``.scale_weight`` with its ``scaled_fp8`` marker
and ``model.diffusion_model.`` prefix, ``.weight_scale``, or no scale at all). The key mapping itself
is checked against diffusers' own BFL converter at FLUX.1's width (on the meta device: no memory).
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from fluxfill_engine import EngineConfig, FillRequest, FluxFillEngine, FluxFillPipeline
from fluxfill_engine.checkpoints import engine_to_bfl, is_fp8_checkpoint
from fluxfill_engine.metrics import sqnr_db as metrics_sqnr_db
from fluxfill_engine.model import FillTransformer
from fluxfill_engine.quantization import FP8, FP8_MAX, QuantizedLinear
from fluxfill_engine.testing.pictures import picture_and_mask
from fluxfill_engine.testing.step_inputs import StepInputs
from fluxfill_engine.testing.tiny import TINY_TRANSFORMER_CONFIG, tiny_components

COMFY = "model.diffusion_model."


def sqnr_db(reference: torch.Tensor, output: torch.Tensor) -> float:
    value = metrics_sqnr_db(reference, output)
    return float("inf") if value is None else value


# Another width and depth than the tiny model's: 3 heads of 8 (width 24), 1 double + 3 single blocks.
OTHER_CONFIG = {
    **TINY_TRANSFORMER_CONFIG,
    "num_layers": 1,
    "num_single_layers": 3,
    "num_attention_heads": 3,
    "attention_head_dim": 8,
    "axes_dims_rope": (2, 2, 4),
}


def exact_state(config: dict) -> dict[str, torch.Tensor]:
    """The engine transformer's unquantized state for ``config`` (seed 0, as the base folder's)."""
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    return FillTransformer.from_diffusers(FluxTransformer2DModel(**config).eval()).state_dict()


def base_folder(tmp_path, config: dict):
    """A diffusers folder of the tiny pipeline whose transformer is ``config`` (seed 0)."""
    from diffusers import FluxTransformer2DModel

    components = tiny_components()
    torch.manual_seed(0)
    components["transformer"] = FluxTransformer2DModel(**config).eval()
    path = tmp_path / "base"
    FluxFillPipeline(**components).save_pretrained(path)
    return path


def write_fp8_file(
    path, state: dict[str, torch.Tensor], layout: str
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``state`` as a BFL fp8 file in ``layout``; returns each block linear's (fp8 values, scale)."""
    prefix = COMFY if layout == "comfy" else ""
    out: dict[str, torch.Tensor] = {"scaled_fp8": torch.zeros(0, dtype=FP8)} if layout == "comfy" else {}
    quantized = {}
    for key, tensor in engine_to_bfl(state).items():
        if "blocks." in key and key.endswith(".weight") and tensor.ndim == 2:
            layer = key[: -len(".weight")]
            scale = tensor.abs().amax() / FP8_MAX if layout != "unscaled" else torch.tensor(1.0)
            values = (tensor / scale).to(FP8)
            out[prefix + key] = values
            if layout == "comfy":
                out[prefix + layer + ".scale_weight"] = scale.reshape(1)
                out[prefix + layer + ".scale_input"] = torch.ones(1)  # static activation scale: unused
            elif layout == "weight_scale":
                out[prefix + layer + ".weight_scale"] = scale.reshape(())
            quantized[layer] = (values, scale)
        else:
            out[prefix + key] = tensor.contiguous()
    save_file(out, str(path))
    return quantized


def velocity(engine: FluxFillEngine, config: dict) -> torch.Tensor:
    fill = engine.pipeline.engine_transformer()
    inputs = StepInputs.random(config, 64, 64, 8, torch.device("cpu"), torch.float32)
    with torch.no_grad():
        return fill(inputs.latents, 0, inputs.prepare(fill, 30.0))


def test_the_bfl_mapping_agrees_with_diffusers_converter_at_flux_width():
    from diffusers import FluxTransformer2DModel
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers

    flux = {
        "in_channels": 384,
        "out_channels": 64,
        "num_layers": 2,
        "num_single_layers": 2,
        "attention_head_dim": 128,
        "num_attention_heads": 24,
        "joint_attention_dim": 4096,
        "pooled_projection_dim": 768,
        "guidance_embeds": True,
        "axes_dims_rope": (16, 56, 56),
    }
    with torch.device("meta"):
        transformer = FluxTransformer2DModel(**flux)
    bfl = engine_to_bfl(FillTransformer.from_diffusers(transformer).state_dict())
    converted = convert_flux_transformer_checkpoint_to_diffusers(dict(bfl))
    with torch.device("meta"):
        expected = FluxTransformer2DModel(**flux).state_dict()
    assert {k: tuple(v.shape) for k, v in converted.items()} == {
        k: tuple(v.shape) for k, v in expected.items()
    }


@pytest.mark.parametrize("layout", ["comfy", "weight_scale", "unscaled"])
def test_an_fp8_file_loads_into_the_fp8_layers_and_runs(tmp_path, layout):
    base = base_folder(tmp_path, TINY_TRANSFORMER_CONFIG)
    path = tmp_path / "flux1-fill-fp8.safetensors"
    state = exact_state(TINY_TRANSFORMER_CONFIG)
    written = write_fp8_file(path, state, layout)
    assert is_fp8_checkpoint(path) and not is_fp8_checkpoint(base / "transformer" / "config.json")
    config = EngineConfig(quant="fp8-weight")

    loaded = FluxFillEngine.from_pretrained(path, base=base, config=config)

    fill = loaded.pipeline.engine_transformer()
    assert loaded.start_report.source == "fp8 single file"
    assert fill.quant_plan is not None and fill.quant_plan.mode == "fp8-weight"
    # The file's fp8 bytes are the layer's, as stored: no dequantize-requantize round trip.
    layers = dict(fill.named_modules())
    checked = 0
    for layer, (values, scale) in written.items():
        kind, index, *rest = layer.split(".")
        mine = {
            "img_attn.qkv": "img_qkv",
            "linear1": "qkv_mlp",
            "linear2": "out",
            "modulation.lin": "mod",
        }.get(".".join(rest))
        if mine is None:
            continue
        module = layers[f"{kind}.{index}.{mine}"]
        assert isinstance(module, QuantizedLinear)
        assert torch.equal(module.weight_bits, values.view(torch.uint8))
        assert torch.equal(module.weight_scale, scale.float().reshape(1, 1).expand_as(module.weight_scale))
        checked += 1
    assert checked == 2 * 3 + 2  # img qkv of 2 double blocks, 3 layers of 2 single blocks
    # Against the exact (unquantized) engine, as close as the engine's own fp8 path, by SQNR.
    exact = velocity(FluxFillEngine.from_pretrained(base), TINY_TRANSFORMER_CONFIG)
    own = velocity(FluxFillEngine.from_pretrained(base, config=config), TINY_TRANSFORMER_CONFIG)
    from_file = velocity(loaded, TINY_TRANSFORMER_CONFIG)
    own_db = sqnr_db(exact, own)
    assert sqnr_db(exact, from_file) > own_db - 6 if layout != "unscaled" else sqnr_db(exact, from_file) > 20
    assert sqnr_db(own, from_file) > 20


@pytest.mark.slow
def test_an_fp8_file_runs_a_request(tmp_path):
    base = base_folder(tmp_path, TINY_TRANSFORMER_CONFIG)
    path = tmp_path / "f.safetensors"
    write_fp8_file(path, exact_state(TINY_TRANSFORMER_CONFIG), "comfy")
    engine = FluxFillEngine.from_pretrained(path, base=base, config=EngineConfig(quant="fp8-weight"))
    image, mask = picture_and_mask(256, 256)
    result = engine.run(FillRequest("a cup", image, mask, 256, 256, 2, seed=0))
    assert result.images[0].size == (256, 256)


def test_the_mapping_works_at_another_width_and_depth(tmp_path):
    base = base_folder(tmp_path, OTHER_CONFIG)
    path = tmp_path / "other.safetensors"
    state = exact_state(OTHER_CONFIG)
    written = write_fp8_file(path, state, "comfy")

    engine = FluxFillEngine.from_pretrained(path, base=base, config=EngineConfig(quant="fp8-weight"))

    loaded = engine.pipeline.engine_transformer().state_dict()
    for key, tensor in state.items():  # the layers kept in the compute dtype arrive exactly
        if key in loaded:
            assert torch.equal(loaded[key], tensor), key
    assert len(written) == 10 + 3 * 3
    exact = velocity(FluxFillEngine.from_pretrained(base), OTHER_CONFIG)
    assert sqnr_db(exact, velocity(engine, OTHER_CONFIG)) > 25


def test_fp8_without_fp8_tensor_cores_runs_the_files_bytes_weight_only(tmp_path):
    from fluxfill_engine.quantization import has_fp8_tensor_cores

    base = base_folder(tmp_path, TINY_TRANSFORMER_CONFIG)
    path = tmp_path / "f.safetensors"
    write_fp8_file(path, exact_state(TINY_TRANSFORMER_CONFIG), "comfy")
    engine = FluxFillEngine.from_pretrained(path, base=base, config=EngineConfig(quant="fp8"))
    plan = engine.pipeline.engine_transformer().quant_plan
    assert plan is not None
    # auto would run int8 weights here; the file's fp8 bytes are kept instead.
    assert plan.mode == ("fp8" if has_fp8_tensor_cores(engine.device) else "fp8-weight")


def test_what_cannot_load_is_refused_by_name(tmp_path):
    base = base_folder(tmp_path, TINY_TRANSFORMER_CONFIG)
    path = tmp_path / "f.safetensors"
    write_fp8_file(path, exact_state(TINY_TRANSFORMER_CONFIG), "comfy")
    with pytest.raises(ValueError, match="holds fp8 weights.*quant='fp8'"):
        FluxFillEngine.from_pretrained(path, base=base)
    with pytest.raises(ValueError, match="`base` is required"):
        FluxFillEngine.from_pretrained(path, config=EngineConfig(quant="fp8-weight"))
    other = tmp_path / "other.safetensors"
    write_fp8_file(other, exact_state(OTHER_CONFIG), "comfy")
    with pytest.raises(ValueError, match="does not fit the model's config"):
        FluxFillEngine.from_pretrained(other, base=base, config=EngineConfig(quant="fp8-weight"))
    extra = tmp_path / "extra.safetensors"
    write_fp8_file(extra, exact_state(TINY_TRANSFORMER_CONFIG), "weight_scale")
    from safetensors.torch import load_file

    tensors = load_file(str(extra))
    save_file({**tensors, "vae.decoder.conv_in.weight": torch.zeros(2)}, str(extra))
    with pytest.raises(ValueError, match="keys the FLUX Fill transformer does not use"):
        FluxFillEngine.from_pretrained(extra, base=base, config=EngineConfig(quant="fp8-weight"))
    e5m2 = tmp_path / "e5m2.safetensors"
    save_file({k: v.to(torch.float8_e5m2) if v.dtype == FP8 else v for k, v in tensors.items()}, str(e5m2))
    with pytest.raises(ValueError, match="float8_e5m2"):
        FluxFillEngine.from_pretrained(e5m2, base=base, config=EngineConfig(quant="fp8-weight"))
    assert json.loads((base / "transformer" / "config.json").read_text())["num_layers"] == 2
