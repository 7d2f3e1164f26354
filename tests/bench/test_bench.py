"""``fluxfill bench``: the runner on the tiny model, its JSON record, the FLOP counter, variant parsing,
the weight-sharing clones and the random-weight builder ``gpu-full`` uses (at a reduced size on CPU)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from fluxfill_engine import FluxFillPipeline
from fluxfill_engine.architecture import TRANSFORMER_CONFIG
from fluxfill_engine.bench.catalog import (
    BenchError,
    parse_engine_overrides,
    parse_variant,
    resolve_variants,
    split_variant_list,
)
from fluxfill_engine.bench.flops import device_peak, image_tokens_for, transformer_flops
from fluxfill_engine.bench.models import parameter_counts
from fluxfill_engine.bench.report import plot_speed_vs_drift, render_markdown
from fluxfill_engine.bench.runner import BenchSettings, run_benchmark
from fluxfill_engine.bench.summary import memory_estimate
from fluxfill_engine.cli import main
from fluxfill_engine.config import PRESETS
from fluxfill_engine.metrics import psnr_db, sqnr_db
from fluxfill_engine.testing.random_models import (
    full_configs,
    random_components,
    reduced_configs,
    shared_clone,
)
from fluxfill_engine.testing.tiny import tiny_components

CPU = torch.device("cpu")


def _strict_json(text: str) -> Any:
    def reject(constant: str) -> Any:
        raise ValueError(f"non-standard JSON constant {constant}")

    return json.loads(text, parse_constant=reject)


# ---- the runner, end to end on the tiny model ------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], Path, str]:
    """``fluxfill bench variants`` on cpu-tiny with two variants, through the command line."""
    folder = tmp_path_factory.mktemp("bench")
    out = folder / "results.json"
    code = main(
        [
            "bench",
            "variants",
            "--preset",
            "cpu-tiny",
            "--variants",
            "diffusers,reference",
            "--steps",
            "2",
            "--repeats",
            "3",
            "--warmup",
            "1",
            "--out",
            str(out),
            "--markdown",
            "--no-progress",
        ]
    )
    assert code == 0
    return _strict_json(out.read_text()), folder, (folder / "results.md").read_text()


@pytest.mark.slow
def test_runner_writes_valid_json_with_environment(tiny_run):
    record, _, _ = tiny_run
    assert record["schema"] == "fluxfill-bench/1" and record["complete"] is True
    env = record["environment"]
    for key in ("device", "device_name", "torch", "triton", "diffusers", "git_sha", "date"):
        assert key in env, key
    assert env["torch"] == torch.__version__
    assert env["date"].endswith("+00:00")
    settings = record["settings"]
    assert (settings["steps"], settings["repeats"], settings["warmup"], settings["seed"]) == (2, 3, 1, 0)
    assert [v["name"] for v in record["variants"]] == ["diffusers", "reference"]
    assert record["baseline_variant"] == "diffusers" and record["reference_variant"] == "reference"


@pytest.mark.slow
def test_runner_records_every_measurement_per_variant(tiny_run):
    record, _, _ = tiny_run
    flops = record["model"]["flops_per_step"]["total"]
    for variant in record["variants"]:
        e2e = variant["e2e_s"]
        assert e2e["n"] == 3 and 0 < e2e["p20"] <= e2e["median"] <= e2e["p80"]
        assert e2e["median"] == pytest.approx(float(np.median([r["e2e_s"] for r in variant["runs"]])))
        assert set(variant["stages_s"]) == {"text_encode", "vae_encode", "denoise", "decode"}
        stages = sum(variant["stages_s"][s]["median"] for s in variant["stages_s"])
        assert 0 < stages <= 1.05 * e2e["max"]
        step_ms = variant["transformer_ms_per_step"]["median"]
        assert step_ms > 0
        assert variant["tflops"] == pytest.approx(flops / (step_ms / 1000) / 1e12)
        assert variant["peak_fraction"] is None  # no datasheet peak for a CPU
        memory = variant["memory"]
        assert memory["measure"] == "rss" and memory["weights_bytes"] > 0
        assert memory["standalone_peak_bytes"] == memory["weights_bytes"] + memory["run_peak_extra_bytes"]
        warmup = variant["warmup"]
        assert len(warmup["calls_s"]) == 1 and warmup["cold_s"] == warmup["calls_s"][0]
        assert warmup["warm_s"] == variant["runs"][0]["e2e_s"]
        assert variant["drift"]["against"] == "reference"


@pytest.mark.slow
def test_ratios_are_the_diffusers_median_over_the_variant_median(tiny_run):
    record, _, _ = tiny_run
    by_name = {v["name"]: v for v in record["variants"]}
    base = by_name["diffusers"]
    for variant in record["variants"]:
        ratio = variant["speedup_vs_diffusers"]
        assert ratio["e2e"] == pytest.approx(base["e2e_s"]["median"] / variant["e2e_s"]["median"])
        assert ratio["transformer"] == pytest.approx(
            base["transformer_ms_per_step"]["median"] / variant["transformer_ms_per_step"]["median"]
        )
    assert base["speedup_vs_diffusers"]["e2e"] == 1.0


@pytest.mark.slow
def test_drift_reference_is_exact_and_diffusers_matches_it(tiny_run):
    record, _, _ = tiny_run
    by_name = {v["name"]: v for v in record["variants"]}
    reference = by_name["reference"]["drift"]
    assert reference["exact"] and reference["latent_sqnr_db"] is None and reference["image_psnr_db"] is None
    diffusers = by_name["diffusers"]["drift"]
    # fp32 parity: the engine's reference equals diffusers to rounding
    assert diffusers["latent_sqnr_db"] is None or diffusers["latent_sqnr_db"] > 100
    assert diffusers["image_max_abs_diff"] <= 1e-4


def test_markdown_report_lists_every_variant(tiny_run):
    record, _, markdown = tiny_run
    assert markdown == render_markdown(record)
    assert "| diffusers |" in markdown and "| reference |" in markdown
    assert "exact" in markdown and "2 steps" in markdown


def test_render_rewrites_the_report_from_a_saved_record(tiny_run, capsys):
    record, folder, markdown = tiny_run
    again = folder / "again.md"
    assert (
        main(["bench", "variants", "--render", str(folder / "results.json"), "--markdown", str(again)]) == 0
    )
    assert again.read_text() == markdown
    assert "| reference |" in capsys.readouterr().out


def test_plot_is_written_when_matplotlib_is_installed(tiny_run):
    record, folder, _ = tiny_run
    path = folder / "plot.png"
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert plot_speed_vs_drift(record, path) is False and not path.exists()
    else:
        assert plot_speed_vs_drift(record, path) is True and path.stat().st_size > 1000


@pytest.mark.slow
def test_engine_overrides_fbcache_and_baselines_added():
    """An engine single-switch variant and diffusers' first-block cache; baselines are added."""
    settings = BenchSettings(
        preset="cpu-tiny",
        variants=["engine:dtype=bfloat16", "diffusers-fbcache:threshold=0.5"],
        steps=3,
        repeats=1,
        warmup=0,
        progress=False,
    )
    updates: list[dict[str, Any]] = []
    record = run_benchmark(settings, on_update=updates.append)
    names = [v["name"] for v in record["variants"]]
    assert names == ["diffusers", "reference", "engine:dtype=bfloat16", "diffusers-fbcache:threshold=0.5"]
    assert [u["complete"] for u in updates] == [False, False]  # after warm-ups, after the repeat
    by_name = {v["name"]: v for v in record["variants"]}
    bf16 = by_name["engine:dtype=bfloat16"]
    assert bf16["engine_config"]["dtype"] == "bfloat16" and bf16["precision"] == "bf16"
    assert 10 < bf16["drift"]["latent_sqnr_db"] < 100  # bf16 rounding: lossy, not garbage
    fbcache = by_name["diffusers-fbcache:threshold=0.5"]["stats"]
    assert fbcache["fbcache_threshold"] == 0.5
    assert fbcache["steps_computed"] + fbcache["steps_skipped"] == 3 and fbcache["steps_computed"] >= 1
    assert bf16["warmup"]["warm_s"] is None  # one call only: no warm call to report
    json.dumps(record, allow_nan=False)


# ---- errors and the command line -------------------------------------------------------------------


def test_unknown_variant_is_a_clear_error(capsys):
    code = main(
        ["bench", "variants", "--preset", "cpu-tiny", "--variants", "diffusers,turbo", "--no-progress"]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert "unknown variant 'turbo'" in err and "diffusers-fbcache" in err and "reference" in err


def test_variant_the_hardware_cannot_run_lists_what_can():
    with pytest.raises(BenchError, match="cannot run on cpu: diffusers-fp8-compile") as info:
        resolve_variants(["diffusers-fp8-compile"], CPU)
    assert "Variants that run here" in str(info.value) and "'reference'" in str(info.value)


def test_gpu_preset_without_a_gpu_is_a_clear_error(capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert main(["bench", "variants", "--preset", "gpu-full", "--no-progress"]) == 2
    assert "runs on a CUDA GPU and this machine has none" in capsys.readouterr().err


def test_help_lists_the_options(capsys):
    with pytest.raises(SystemExit):
        main(["bench", "variants", "--help"])
    out = capsys.readouterr().out
    for option in ("--preset", "--variants", "--size", "--steps", "--repeats", "--warmup", "--seed"):
        assert option in out
    for option in ("--out", "--markdown", "--plot", "engine:quant=fp8,compile=1"):
        assert option in out


@pytest.mark.parametrize(
    ("argv", "message"),
    [(["--steps", "0"], "`steps` must be an int >= 1"), (["--size", "100"], "multiple of 16")],
)
def test_bad_settings_are_rejected_before_any_work(argv, message, capsys):
    assert main(["bench", "variants", "--preset", "cpu-tiny", "--no-progress", *argv]) == 2
    assert message in capsys.readouterr().err


def test_default_variants_are_all_that_run_here_and_include_every_preset():
    specs, skipped = resolve_variants(None, CPU)
    names = [s.name for s in specs]
    assert set(PRESETS) <= set(names)  # `fastest` appears here as soon as the preset exists
    assert {"diffusers", "diffusers-compile", "diffusers-fbcache"} <= set(names)
    assert "diffusers-fp8-compile" in skipped and "diffusers-fp8-compile" not in names


# ---- variant parsing -------------------------------------------------------------------------------


def test_variant_list_keeps_engine_options_together():
    text = (
        "diffusers, engine:quant=fp8,compile=1 ,fast,balanced:attention=sdpa,diffusers-fbcache:threshold=0.1"
    )
    assert split_variant_list(text) == [
        "diffusers",
        "engine:quant=fp8,compile=1",
        "fast",
        "balanced:attention=sdpa",
        "diffusers-fbcache:threshold=0.1",
    ]
    with pytest.raises(BenchError, match="no variant before it"):
        split_variant_list("compile=1,diffusers")


def test_engine_overrides_are_typed_by_engine_config():
    overrides = parse_engine_overrides(
        "quant=fp8,compile=1,fused_kernels=false,dtype=none,prompt_cache_size=4"
    )
    assert overrides == {
        "quant": "fp8",
        "compile": True,
        "fused_kernels": False,
        "dtype": None,
        "prompt_cache_size": 4,
    }
    spec = parse_variant("engine:quant=fp8,compile=1")
    assert spec.kind == "engine" and spec.config == PRESETS["reference"].__class__(quant="fp8", compile=True)
    assert parse_variant("balanced:attention=sdpa").config.attention == "sdpa"
    assert parse_variant("reference").is_reference and not parse_variant("balanced").is_reference


def test_engine_override_errors_name_the_valid_fields():
    with pytest.raises(BenchError, match="unknown EngineConfig field 'quantize'") as info:
        parse_variant("engine:quantize=fp8")
    assert "quant_backend" in str(info.value) and "compile" in str(info.value)
    with pytest.raises(BenchError, match="expects bool"):
        parse_variant("engine:compile=maybe")
    with pytest.raises(BenchError, match="EngineConfig.quant must be one of"):
        parse_variant("engine:quant=fp4")
    with pytest.raises(BenchError, match="does not take option"):
        parse_variant("diffusers:threshold=0.1")


# ---- FLOP counter ----------------------------------------------------------------------------------


def test_flops_at_1024_are_74_4_tflop_per_step():
    tokens = image_tokens_for(1024, 1024)
    assert tokens == 4096
    count = transformer_flops(TRANSFORMER_CONFIG, tokens, 512)
    d, n = 3072, 4096 + 512
    assert count.blocks == 57 * (24 * d * d * n + 4 * n * n * d)
    assert count.attention == 57 * 4 * n * n * d
    assert count.total == pytest.approx(74.4e12, rel=0.01)
    assert 0 < count.embeddings < 0.001 * count.total
    assert transformer_flops(TRANSFORMER_CONFIG, tokens, 512, batch=2).total == 2 * count.total


def test_flops_small_hand_count():
    config = {
        "num_layers": 1,
        "num_single_layers": 1,
        "num_attention_heads": 2,
        "attention_head_dim": 4,
        "in_channels": 16,
        "out_channels": 8,
        "joint_attention_dim": 4,
        "pooled_projection_dim": 4,
        "guidance_embeds": False,
    }
    count = transformer_flops(config, image_tokens=4, text_tokens=2)
    # d = 8, N = 6: per block 24*64*6 + 4*36*8 = 9216 + 1152, two blocks
    assert count.blocks == 2 * (9216 + 1152) and count.attention == 2 * 1152
    # x_embedder 2*4*16*8, context 2*2*4*8, time MLP 2*(256*8 + 8*8), pooled MLP 2*(4*8 + 8*8),
    # double AdaLN 2*2*8*48, single AdaLN 2*8*24, norm_out 2*8*16, proj_out 2*4*8*8
    assert count.embeddings == 1024 + 128 + 4224 + 192 + 1536 + 384 + 256 + 512
    assert count.total == 28992


# ---- device peaks, memory estimate, drift metrics --------------------------------------------------


def test_device_peaks_by_name_with_source_and_overrides():
    cuda = torch.device("cuda")
    sxm = device_peak(cuda, device_name="NVIDIA H100 80GB HBM3")
    assert sxm.tflops["bf16"] == 989.4 and sxm.tflops["fp8"] == 1978.9 and "SXM" in sxm.source
    assert device_peak(cuda, device_name="NVIDIA H100 PCIe").tflops["bf16"] == 756.0
    assert device_peak(cuda, device_name="NVIDIA H200").tflops["fp8"] == 1978.9
    cpu = device_peak(CPU, device_name="some cpu")
    assert cpu.for_precision("fp32") is None
    overridden = device_peak(CPU, {"fp32": 2.0}, device_name="some cpu")
    assert overridden.for_precision("fp32") == 2.0 and "overridden" in overridden.source


def test_memory_estimate_of_the_real_model():
    counts = parameter_counts(full_configs())
    assert 11.8e9 < counts["transformer"] < 12.0e9 and 4.7e9 < counts["text_encoder_2"] < 4.8e9
    specs = [parse_variant(n) for n in ("diffusers", "reference", "diffusers-compile", "balanced", "fast")]
    estimate = memory_estimate(specs, counts, torch.bfloat16)
    per = estimate["per_variant_bytes"]
    assert per["diffusers"] == per["reference"] == per["diffusers-compile"] == 0
    assert per["balanced"] == 2 * counts["fused"]  # its own fused QKV copy, bf16
    assert per["fast"] == counts["block_linears"]  # one byte per quantized block weight
    assert estimate["total_bytes"] == estimate["base_bytes"] + per["balanced"] + per["fast"]


def test_sqnr_and_psnr():
    ref = np.array([3.0, 4.0])
    assert sqnr_db(ref, ref) is None and psnr_db(ref / 10, ref / 10) is None
    assert sqnr_db(ref, ref + np.array([0.05, 0.0])) == pytest.approx(20 * math.log10(5 / 0.05))
    assert psnr_db(np.zeros(4), np.full(4, 0.1)) == pytest.approx(20.0)


# ---- weight sharing and the gpu-full builder (reduced, on CPU) -------------------------------------


def test_shared_clone_shares_storage_and_isolates_changes():
    base = tiny_components(0)["transformer"]
    before = {name: p.detach().clone() for name, p in base.named_parameters()}
    pointers = {name: p.data_ptr() for name, p in base.named_parameters()}
    clone = shared_clone(base)
    for (name, p), (_, q) in zip(base.named_parameters(), clone.named_parameters(), strict=True):
        assert p is not q and p.data_ptr() == q.data_ptr(), name
    fill = FluxFillPipeline(**dict(tiny_components(0), transformer=clone)).engine_transformer()  # fuses QKV
    assert fill.source[0] is clone
    clone.to(torch.bfloat16)
    for name, p in base.named_parameters():
        assert p.dtype == torch.float32 and p.data_ptr() == pointers[name]
        assert torch.equal(p, before[name]), name


def test_random_components_materialise_on_the_device_with_finite_outputs():
    components = random_components(reduced_configs(), device="cpu", dtype=torch.float32, seed=3)
    for name in ("transformer", "vae", "text_encoder", "text_encoder_2"):
        module = components[name]
        assert all(p.device.type == "cpu" and p.dtype == torch.float32 for p in module.parameters()), name
        assert all(b.device.type == "cpu" for b in module.buffers()), name
    t5 = components["text_encoder_2"]
    assert t5.shared.weight is t5.encoder.embed_tokens.weight
    (position_ids,) = list(components["text_encoder"].buffers())
    assert torch.equal(position_ids[0], torch.arange(77))  # real buffers, not uninitialised memory
    assert len(components["tokenizer"]) == 49408 and len(components["tokenizer_2"]) == 32100
    ids = components["tokenizer"]("a white paper cup").input_ids
    assert ids[0] == 49406 and ids[-1] == 49407
    # variance-preserving init: a linear weight's std is 1/sqrt(fan_in)
    linear = components["transformer"].transformer_blocks[0].ff.net[2]
    assert linear.weight.std().item() == pytest.approx(linear.in_features**-0.5, rel=0.05)
    assert torch.all(linear.bias == 0)
    again = random_components(reduced_configs(), device="cpu", dtype=torch.float32, seed=3)
    assert torch.equal(linear.weight, again["transformer"].transformer_blocks[0].ff.net[2].weight)

    from PIL import Image

    pipe = FluxFillPipeline(**components)
    pipe.set_progress_bar_config(disable=True)
    image = Image.new("RGB", (64, 64), (90, 140, 200))
    mask = Image.new("L", (64, 64), 255)
    out = pipe(
        prompt="a white paper cup",
        image=image,
        mask_image=mask,
        height=64,
        width=64,
        num_inference_steps=2,
        max_sequence_length=32,
        generator=torch.Generator().manual_seed(0),
        output_type="latent",
    ).images
    assert torch.isfinite(out).all() and 0.1 < out.std().item() < 100


@pytest.mark.slow
def test_gpu_full_preset_path_runs_on_cpu_at_a_reduced_size(monkeypatch):
    """The gpu-full preset's whole path (meta build, materialise, real-vocabulary tokenizers, both
    pipelines) with the real configs swapped for reduced ones, on the CPU."""
    from fluxfill_engine.testing import random_models

    monkeypatch.setattr(random_models, "full_configs", reduced_configs)
    settings = BenchSettings(
        preset="gpu-full",
        device="cpu",
        dtype="float32",
        width=64,
        height=64,
        max_sequence_length=32,
        variants=["diffusers", "reference"],
        steps=2,
        repeats=1,
        warmup=0,
        progress=False,
    )
    record = run_benchmark(settings)
    assert record["model"]["preset"] == "gpu-full" and record["model"]["text_tokens"] == 32
    assert record["model"]["transformer_config"]["num_single_layers"] == 2
    for variant in record["variants"]:
        assert variant["e2e_s"]["median"] > 0 and variant["precision"] == "fp32"
    drift = {v["name"]: v["drift"] for v in record["variants"]}
    assert drift["reference"]["exact"] and drift["diffusers"]["image_max_abs_diff"] <= 1e-4
