"""Quantization: per-layer and per-forward SQNR bounds for every backend, memory, errors, end to end.

The contracts of the CUDA kernels the native layers call (``torch._int_mm``: more than 16 rows;
``torch._scaled_mm``: a bias only with a bf16/fp16 output) are emulated on the CPU at several row counts;
torchao's backend leaves the global Inductor settings alone."""

import importlib.util
import logging

import numpy as np
import pytest
import torch
from diffusers import FluxTransformer2DModel
from torch import nn

from fluxfill_engine import EngineConfig, FillRequest, FluxFillPipeline
from fluxfill_engine.conditioning import latent_image_ids
from fluxfill_engine.model import FillTransformer
from fluxfill_engine.quantization import QuantizedLinear, QuantPlan, quantize_linear, resolve, weight_bytes
from fluxfill_engine.testing.tiny import tiny_components
from tests.support import helpers

CPU = torch.device("cpu")
# The bounds per transformer forward (docs/optimizations.md, "Quantization"); per layer the same bounds
# apply a fortiori.
SQNR_BOUND = {"fp8": 25.0, "fp8-weight": 25.0, "int8": 25.0, "int8-weight": 35.0}
# The optional backends come with the `quant` extra (and `dev`); a lean install skips their cases.
BACKEND_PACKAGES = {"quanto": "optimum", "torchao": "torchao"}


def backend_case(*values: str, backend: str) -> object:
    """A parameter set that is skipped, with the reason, when ``backend``'s package is not installed."""
    package = BACKEND_PACKAGES.get(backend)
    missing = package is not None and importlib.util.find_spec(package) is None
    reason = (
        f"quant_backend={backend!r} needs {package}, not installed (pip install 'fluxfill-engine[quant]')"
    )
    return pytest.param(*values, marks=pytest.mark.skipif(missing, reason=reason))


VALID = [
    backend_case(mode, backend, backend=backend)
    for mode, backend in [
        ("fp8", "native"),
        ("fp8-weight", "native"),
        ("int8", "native"),
        ("int8-weight", "native"),
        ("fp8-weight", "quanto"),
        ("int8-weight", "quanto"),
        ("fp8-weight", "torchao"),
        ("int8", "torchao"),
        ("int8-weight", "torchao"),
    ]
]


@pytest.mark.parametrize(("mode", "backend"), VALID)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantized_linear_against_fp32_matmul(mode, backend, dtype):
    torch.manual_seed(0)
    linear = nn.Linear(256, 192).to(dtype)
    x = torch.randn(2, 37, 256).to(dtype)
    reference = nn.functional.linear(x.double(), linear.weight.double(), linear.bias.double())
    quantized = quantize_linear(linear, resolve(mode, backend, CPU))
    assert helpers.sqnr(reference, quantized(x)) >= SQNR_BOUND[mode]
    assert linear.weight.dtype == dtype  # the original layer is left as it was


def _with_cuda_matmul_checks(monkeypatch):
    """Make the CPU ``_int_mm`` / ``_scaled_mm`` refuse what their CUDA kernels refuse.

    CUDA's ``_int_mm`` needs more than 16 rows; CUDA's ``_scaled_mm`` fuses a bias only into a bf16 or
    fp16 output. The CPU kernels accept both, so without this the tests here could not see either.
    """
    int_mm, scaled_mm = torch._int_mm, torch._scaled_mm

    def checked_int_mm(a, b):
        assert a.shape[0] > 16, f"_int_mm on CUDA needs more than 16 rows, got {a.shape[0]}"
        return int_mm(a, b)

    def checked_scaled_mm(a, b, *args, bias=None, out_dtype=None, **kwargs):
        assert bias is None or out_dtype in (torch.bfloat16, torch.float16), "bias with a fp32 output"
        return scaled_mm(a, b, *args, bias=bias, out_dtype=out_dtype, **kwargs)

    monkeypatch.setattr(torch, "_int_mm", checked_int_mm)
    monkeypatch.setattr(torch, "_scaled_mm", checked_scaled_mm)


@pytest.mark.parametrize("mode", ["fp8", "int8"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 256), (2, 1, 256), (16, 256), (3, 7, 256)], ids=str)
def test_w8a8_keeps_the_cuda_kernels_contracts_at_any_row_count(monkeypatch, mode, dtype, shape):
    # The modulation layers run on one row per image; fp32 pipelines run fp8 with an fp32 output.
    torch.manual_seed(0)
    linear = nn.Linear(256, 192).to(dtype)
    x = torch.randn(shape).to(dtype)
    quantized = quantize_linear(linear, resolve(mode, "native", CPU))
    _with_cuda_matmul_checks(monkeypatch)
    out = quantized(x)
    assert out.shape == (*shape[:-1], 192) and out.dtype == dtype
    reference = nn.functional.linear(x.double(), linear.weight.double(), linear.bias.double())
    assert helpers.sqnr(reference, out) >= SQNR_BOUND[mode]


def transformer(width_heads: int, head_dim: int, double: int, single: int, dtype: torch.dtype):
    torch.manual_seed(0)
    axes = (head_dim // 4, 3 * head_dim // 8, 3 * head_dim // 8)
    model = FluxTransformer2DModel(
        in_channels=384,
        out_channels=64,
        num_layers=double,
        num_single_layers=single,
        attention_head_dim=head_dim,
        num_attention_heads=width_heads,
        joint_attention_dim=64,
        pooled_projection_dim=64,
        guidance_embeds=True,
        axes_dims_rope=axes,
    )
    return model.eval().to(dtype) if dtype != torch.float32 else model.eval()


def forward_inputs(model: FillTransformer, latent_hw=(6, 8), text=11):
    gen = torch.Generator().manual_seed(1)
    seq = (latent_hw[0] // 2) * (latent_hw[1] // 2)
    latents = torch.randn(1, seq, 64, generator=gen)
    cond = torch.randn(1, seq, 320, generator=gen)
    prompt = torch.randn(1, text, 64, generator=gen)
    pooled = torch.randn(1, 64, generator=gen)
    ids = latent_image_ids(latent_hw[0] // 2, latent_hw[1] // 2, "cpu", torch.float32)
    inputs = model.prepare(
        cond, prompt, pooled, torch.tensor([800.0]), 30.0, torch.zeros(text, 3), ids, torch.float32
    )
    return latents, inputs


MODELS = {"tiny": (2, 16, 2, 2), "mid": (4, 64, 2, 4)}


@pytest.mark.slow
@pytest.mark.parametrize("size", sorted(MODELS))
@pytest.mark.parametrize(("mode", "backend"), VALID)
def test_transformer_forward_sqnr(size, mode, backend):
    with torch.no_grad():
        exact = FillTransformer.from_diffusers(transformer(*MODELS[size], torch.float32))
        latents, inputs = forward_inputs(exact)
        reference = exact(latents, 0, inputs)
        quantized = FillTransformer.from_diffusers(transformer(*MODELS[size], torch.float32))
        quantized.quantize(resolve(mode, backend, CPU))
        output = quantized(latents, 0, forward_inputs(quantized)[1])
    assert helpers.sqnr(reference, output) >= SQNR_BOUND[mode]


@pytest.mark.parametrize("mode", ["fp8", "int8", "int8-weight", "fp8-weight"])
def test_block_linears_quantize_to_about_half_their_bf16_bytes(mode):
    model = transformer(*MODELS["mid"], torch.bfloat16)
    fill = FillTransformer.from_diffusers(model)
    blocks = [*fill.double_blocks, *fill.single_blocks]
    linears = [getattr(block, name) for block in blocks for name in block.linear_sources]
    before = weight_bytes(linears)
    fill.quantize(resolve(mode, "native", CPU))
    after = weight_bytes([getattr(block, name) for block in blocks for name in block.linear_sources])
    # 1 byte per value + an fp32 scale per row + the bf16 bias, against 2 bytes per value + bias.
    assert after <= 0.51 * before
    # and nothing else was duplicated: both module trees hold the one quantized copy
    assert weight_bytes([model, fill]) == weight_bytes([model])


def test_real_architecture_transformer_bytes_at_most_0_52_of_bf16():
    """The real 11.9B transformer (meta device: shapes only) with the measured per-layer storage."""
    from fluxfill_engine.architecture import meta_transformer

    model = meta_transformer()
    total = sum(p.numel() for p in model.parameters())
    assert 11.8e9 < total < 12.0e9
    # What the engine quantizes: every linear layer inside the 57 blocks.
    block_linears = [
        module
        for blocks in (model.transformer_blocks, model.single_transformer_blocks)
        for module in blocks.modules()
        if isinstance(module, nn.Linear)
    ]
    in_block_linears = {id(p) for linear in block_linears for p in linear.parameters()}
    after = 2 * sum(p.numel() for p in model.parameters() if id(p) not in in_block_linears)
    for linear in block_linears:
        after += linear.weight.numel() * 1 + linear.out_features * 4 + linear.bias.numel() * 2
    assert after <= 0.52 * (2 * total)


@pytest.mark.parametrize("quant", ["fp8", "fp8-weight", "int8", "int8-weight"])
def test_engine_end_to_end_with_each_quant_mode(quant):
    engine = helpers.tiny_engine(EngineConfig(quant=quant, quantize_text_encoder=True))
    image = torch.rand(3, 256, 256)
    mask = torch.zeros(256, 256)
    mask[64:192, 64:192] = 1
    result = engine.run(
        FillRequest("a red cup", image, mask, num_inference_steps=2, seed=0, max_megapixels=0.065)
    )
    assert result.images[0].size == (256, 256)
    report = engine.pipeline.memory_report()
    assert report["transformer"]["after"] < 0.6 * report["transformer"]["before"]
    assert report["text_encoder_2"]["after"] < report["text_encoder_2"]["before"]
    assert report["vae"]["after"] == report["vae"]["before"]
    assert engine.describe()["quantization"]["mode"] == resolve(quant, "auto", CPU).mode


def test_memory_report_unquantized_is_unchanged():
    pipe = FluxFillPipeline(**tiny_components())
    report = pipe.memory_report()
    assert set(report) == {"transformer", "text_encoder", "text_encoder_2", "vae"}
    assert all(entry["before"] == entry["after"] > 0 for entry in report.values())


@pytest.mark.parametrize(
    ("mode", "backend", "match"),
    [
        backend_case("fp8", "quanto", "quant='fp8' with quant_backend='quanto'", backend="quanto"),
        backend_case("int8", "quanto", "quant='int8' with quant_backend='quanto'", backend="quanto"),
        backend_case("fp8", "torchao", "fp8 tensor cores", backend="torchao"),
        ("int4", "native", "quant must be one of"),
        ("int8", "bitsandbytes", "quant_backend must be one of"),
    ],
)
def test_unsupported_combinations_name_the_combination(mode, backend, match):
    with pytest.raises(ValueError, match=match):
        resolve(mode, backend, CPU)


def test_auto_backend_reports_its_choice():
    plan = resolve("int8", "auto", CPU)
    assert (plan.mode, plan.backend) == ("int8", "native") and plan.reason


def test_module_to_dtype_moves_but_never_casts_quantized_values():
    layer = QuantizedLinear(nn.Linear(32, 16), "fp8")
    values, scale = layer.weight_values.clone(), layer.weight_scale.clone()
    layer.to(torch.bfloat16)
    assert torch.equal(layer.weight_values.view(torch.uint8), values.view(torch.uint8))
    assert torch.equal(layer.weight_scale, scale) and layer.weight_scale.dtype == torch.float32
    assert layer.bias.dtype == torch.bfloat16


def test_quantization_cannot_be_changed_in_place():
    pipe = FluxFillPipeline(**tiny_components()).configure(EngineConfig(quant="int8"))
    with pytest.raises(ValueError, match="already quantized"):
        pipe.configure(EngineConfig(quant="fp8"))
    with pytest.raises(ValueError, match="already quantized"):
        pipe.configure(EngineConfig())
    assert pipe.configure(EngineConfig(quant="int8", fused_kernels=True)) is pipe  # other switches may change


def test_quantized_engine_moves_with_the_pipeline():
    pipe = FluxFillPipeline(**tiny_components()).configure(EngineConfig(quant="int8-weight"))
    helpers.disable_progress(pipe)
    fill = pipe.engine_transformer()
    qkv = fill.double_blocks[0].img_qkv
    pipe.to(torch.bfloat16)  # a real move of the diffusers tree: every float tensor is replaced
    assert pipe.engine_transformer() is fill and fill.is_in_sync()  # kept: it cannot be rebuilt
    assert fill.dtype == torch.bfloat16 and qkv.bias.dtype == torch.bfloat16  # moved with the tree
    assert qkv.weight_bits.dtype == torch.int8 and qkv.weight_scale.dtype == torch.float32  # never cast
    images = pipe(**helpers.call_kwargs(output_type="np")).images
    assert images.shape == (1, helpers.HEIGHT, helpers.WIDTH, 3) and np.isfinite(images).all()


def test_auto_fp8_without_fp8_tensor_cores_runs_int8_weight():
    plan = resolve("fp8", "auto", CPU)
    assert (plan.mode, plan.backend) == ("int8-weight", "native") and "tensor cores" in plan.reason


def test_moving_a_pipeline_quantized_for_another_device_warns(monkeypatch, caplog):
    pipe = FluxFillPipeline(**tiny_components()).configure(EngineConfig(quant="fp8"))
    assert pipe.engine_transformer().quant_plan.mode == "int8-weight"  # auto on a CPU
    # What resolve says for a GPU with fp8 tensor cores (none here to move to).
    monkeypatch.setattr(
        "fluxfill_engine.runtime.resolve", lambda mode, backend, device: QuantPlan(mode, "native", "native")
    )
    with caplog.at_level(logging.WARNING, logger="fluxfill_engine.runtime"):
        pipe.runtime.warn_if_quantized_for_another_device(pipe.engine_config, torch.device("cuda"))
    assert "quantized before the move, as int8-weight" in caplog.text
    assert "there it would run fp8 (native)" in caplog.text and "configure after moving" in caplog.text
    caplog.clear()
    monkeypatch.undo()
    with caplog.at_level(logging.WARNING, logger="fluxfill_engine.runtime"):
        pipe.runtime.warn_if_quantized_for_another_device(
            pipe.engine_config, torch.device("cpu")
        )  # same choice: nothing to say
    assert caplog.text == ""


@pytest.mark.parametrize(
    "mode", [backend_case(m, backend="torchao") for m in ("int8", "int8-weight", "fp8-weight")]
)
def test_torchao_backend_leaves_global_inductor_settings_alone(mode):
    # torchao's default would switch on coordinate descent tuning (and more) for every later compile.
    import torch._inductor.config as inductor_config

    before = inductor_config.save_config()
    quantize_linear(nn.Linear(64, 32), resolve(mode, "torchao", CPU))
    assert inductor_config.save_config() == before


@pytest.mark.parametrize(("backend", "package"), [("quanto", "optimum"), ("torchao", "torchao")])
def test_a_missing_backend_package_is_named_with_the_extra_to_install(monkeypatch, backend, package):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == package else real_find_spec(name, *a)
    )
    with pytest.raises(ValueError, match=r"not installed \(pip install 'fluxfill-engine\[quant\]'\)"):
        resolve("int8-weight", backend, CPU)
