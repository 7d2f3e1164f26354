"""LoRA on the drop-in: diffusers' LoRA mixin (load_lora_weights, set_adapters, scale, fuse, unload,
hotswap, ...) runs on the engine with diffusers' numerics, and the engine's own LoRA sets (every format
diffusers reads) give what diffusers gives with the same adapters and weights. fp32, 1e-4 in pixels."""

import diffusers
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from fluxfill_engine import EngineConfig, FluxFillPipeline
from fluxfill_engine.lora import LoraLinear, LoraSpec
from fluxfill_engine.testing.tiny import tiny_components
from tests.support import helpers
from tests.support import lora as lora_helpers

# A LoRA on the tiny model moves the output by ~0.1-0.6 in pixels: far above the 1e-4 parity tolerance,
# so a LoRA the engine ignored (or applied twice) fails every parity test below.
VISIBLE = 1e-2


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("loras")
    return {
        "a": lora_helpers.peft_lora(root / "a", 0),
        "b": lora_helpers.peft_lora(root / "b", 1, rank=2, alpha=3, targets=lora_helpers.ATTENTION_TARGETS),
        "c": lora_helpers.peft_lora(root / "c", 2, rank=8, alpha=None, metadata=False),
        "dev": lora_helpers.peft_lora(root / "dev", 3, in_channels=64),
        "kohya": lora_helpers.kohya_lora(root / "kohya.safetensors", 4),
        "alphas": _with_network_alphas(root / "alphas.safetensors", lora_helpers.peft_lora(root / "d", 5)),
    }


def _with_network_alphas(path, folder):
    """The peft file without metadata, with per-module ``.alpha`` keys (two values: diffusers makes the
    common one ``lora_alpha`` and the other an ``alpha_pattern``)."""
    tensors = load_file(str(folder / "pytorch_lora_weights.safetensors"))
    modules = sorted({k[: -len(".lora_A.weight")] for k in tensors if k.endswith(".lora_A.weight")})
    for index, module in enumerate(modules):
        tensors[f"{module}.alpha"] = torch.tensor(2.0 if index % 3 else 12.0)
    return lora_helpers.raw_lora(path, tensors)


def run(pipe, **overrides):
    return pipe(**helpers.call_kwargs(**overrides)).images


# ---- diffusers' mixin on the drop-in ---------------------------------------------------------------


def test_one_adapter_runs_with_diffusers_numerics(pipes, files):
    reference, ours = pipes
    base = run(ours)
    ours.load_lora_weights(files["a"], adapter_name="a")
    expected, got = run(reference), run(ours)
    helpers.assert_close(got, expected)
    assert helpers.max_abs_diff(got, base) > VISIBLE
    stats = ours.last_stats["loras"]
    assert stats["source"] == "diffusers" and stats["strategy"] == "side"
    assert [a["name"] for a in stats["adapters"]] == ["a"]


@pytest.mark.slow
def test_three_adapters_with_weights(pipes, files):
    reference, ours = pipes
    for name in ("a", "b", "c"):
        ours.load_lora_weights(files[name], adapter_name=name)
    ours.set_adapters(["a", "b", "c"], [0.7, -0.4, 1.3])
    helpers.assert_close(run(ours), run(reference))
    ours.set_adapters(["b", "c"], [1.0, 0.5])  # an adapter left out is off
    helpers.assert_close(run(ours), run(reference))


def test_joint_attention_scale(pipes, files):
    reference, ours = pipes
    ours.load_lora_weights(files["a"], adapter_name="a")
    full = run(ours)
    scaled = {"joint_attention_kwargs": {"scale": 0.4}}
    got = run(ours, **scaled)
    helpers.assert_close(got, run(reference, **scaled))
    assert helpers.max_abs_diff(got, full) > VISIBLE


@pytest.mark.slow
def test_fuse_and_unfuse(pipes, files):
    reference, ours = pipes
    ours.load_lora_weights(files["a"], adapter_name="a")
    ours.load_lora_weights(files["b"], adapter_name="b")
    ours.set_adapters(["a", "b"], [0.6, 1.0])
    unfused = run(ours)
    ours.fuse_lora(lora_scale=0.8)  # writes into the base weights, which the engine shares
    fused = run(ours)
    helpers.assert_close(fused, run(reference))
    assert helpers.max_abs_diff(fused, unfused) > VISIBLE
    ours.unfuse_lora()  # (diffusers keeps fuse_lora's lora_scale in the adapters' scaling afterwards)
    helpers.assert_close(run(ours), run(reference))


def test_flux_dev_lora_on_fill(pipes, files):
    """A FLUX.1 [dev] LoRA's input projection reads 64 channels; diffusers zero-pads it to Fill's 384."""
    reference, ours = pipes
    ours.load_lora_weights(files["dev"], adapter_name="dev")
    assert ours.transformer.x_embedder.lora_A["dev"].weight.shape[1] == 384
    helpers.assert_close(run(ours), run(reference))


@pytest.mark.slow
def test_disable_enable_unload_and_delete(pipes, files):
    reference, ours = pipes
    base = run(ours)
    ours.load_lora_weights(files["a"], adapter_name="a")
    ours.load_lora_weights(files["b"], adapter_name="b")
    ours.set_adapters(["a", "b"])  # (loading activates the adapter just loaded)
    both = run(ours)
    ours.disable_lora()
    assert np.array_equal(run(ours), base)  # the side path never touched the base weights
    ours.enable_lora()
    assert np.array_equal(run(ours), both)
    ours.delete_adapters("a")
    only_b = run(ours)
    helpers.assert_close(only_b, run(reference))
    assert helpers.max_abs_diff(only_b, both) > VISIBLE
    ours.unload_lora_weights()
    assert not getattr(ours.transformer, "peft_config", None)
    assert np.array_equal(run(ours), base)  # bit for bit
    assert ours.last_stats["loras"]["adapters"] == []


def test_hotswap(pipes, files):
    reference, ours = pipes
    ours.enable_lora_hotswap(target_rank=8)
    ours.load_lora_weights(files["a"], adapter_name="x")
    first = run(ours)
    helpers.assert_close(first, run(reference))
    ours.load_lora_weights(files["c"], adapter_name="x", hotswap=True)  # weights replaced in place
    second = run(ours)
    helpers.assert_close(second, run(reference))
    assert helpers.max_abs_diff(first, second) > VISIBLE


@pytest.mark.slow
def test_adapters_loaded_after_a_call(pipes, files):
    """An engine built (and a prompt cached) before the adapters were loaded runs them from then on."""
    reference, ours = pipes
    run(ours)
    ours.load_lora_weights(files["a"], adapter_name="a")
    helpers.assert_close(run(ours), run(reference))


def test_diffusers_adapters_and_quantization_refused(files):
    pipe = FluxFillPipeline(**tiny_components())
    pipe.load_lora_weights(files["a"], adapter_name="a")
    with pytest.raises(ValueError, match="unload_lora_weights.*set_engine_loras"):
        pipe.configure(EngineConfig(quant="int8-weight"))


def test_diffusers_adapters_and_engine_loras_at_once_refused(pipe, files):
    pipe.set_engine_loras([files["b"]])
    pipe.load_lora_weights(files["a"], adapter_name="a")
    with pytest.raises(ValueError, match="at once"):
        run(pipe)
    pipe.set_engine_loras(None)
    run(pipe)


# ---- the engine's own LoRA sets against diffusers + peft ---------------------------------------------


def diffusers_with(files, names, weights):
    reference = diffusers.FluxFillPipeline(**tiny_components())
    helpers.disable_progress(reference)
    for name in names:
        reference.load_lora_weights(files[name], adapter_name=name)
    reference.set_adapters(list(names), list(weights))
    return reference


@pytest.mark.parametrize("strategy", ["merge", "side"])
def test_engine_set_of_three_matches_diffusers(files, strategy):
    names, weights = ("a", "b", "c"), (0.7, -0.4, 1.3)
    reference = diffusers_with(files, names, weights)
    ours = FluxFillPipeline(**tiny_components()).configure(EngineConfig(lora_strategy=strategy))
    helpers.disable_progress(ours)
    base = run(ours)
    ours.set_engine_loras([{"path": files[n], "scale": w} for n, w in zip(names, weights, strict=True)])
    got = run(ours)
    helpers.assert_close(got, run(reference))
    assert helpers.max_abs_diff(got, base) > VISIBLE
    stats = ours.last_stats["loras"]
    assert stats["source"] == "request" and stats["strategy"] == strategy
    assert [a["scale"] for a in stats["adapters"]] == list(weights)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["kohya", "dev", "c", "alphas"])
@pytest.mark.parametrize("strategy", ["merge", "side"])
def test_engine_reads_every_format_as_diffusers_does(files, name, strategy):
    reference = diffusers_with(files, [name], [0.8])
    ours = FluxFillPipeline(**tiny_components()).configure(EngineConfig(lora_strategy=strategy))
    helpers.disable_progress(ours)
    ours.set_engine_loras([LoraSpec(files[name], 0.8)])
    helpers.assert_close(run(ours), run(reference))


def test_engine_set_with_a_call_scale(files):
    reference = diffusers_with(files, ["a"], [1.0])
    ours = FluxFillPipeline(**tiny_components())
    helpers.disable_progress(ours)
    ours.set_engine_loras([files["a"]])
    scaled = {"joint_attention_kwargs": {"scale": 0.5}}
    helpers.assert_close(run(ours, **scaled), run(reference, **scaled))


def test_kohya_text_encoder_part_is_reported_not_applied(tmp_path, caplog):
    path = lora_helpers.kohya_lora(tmp_path / "te.safetensors", 0, text_encoder=True)
    pipe = FluxFillPipeline(**tiny_components())
    helpers.disable_progress(pipe)
    pipe.set_engine_loras([path])
    assert "text_encoder weights are not applied" in caplog.text
    run(pipe)
    assert pipe.last_stats["loras"]["adapters"][0]["ignored"] == ["text_encoder"]


# ---- the side path module --------------------------------------------------------------------------


def test_side_path_with_per_sample_scales_runs_two_sets_in_one_batch():
    """Scales of shape [batch, columns]: sample 0 runs adapter 0 only, sample 1 both at other weights,
    each equal to its own single-sample run."""
    torch.manual_seed(0)
    base = torch.nn.Linear(16, 24)
    rows = [(0, 8), (8, 24)]
    layer = LoraLinear(base, rows)
    downs = torch.randn(12, 16)  # source 0: ranks 2 + 4, source 1: ranks 2 + 4
    ups = [torch.randn(8, 6), torch.randn(16, 6)]
    per_sample = torch.tensor(
        [[1.0] * 2 + [0.0] * 4 + [1.0] * 2 + [0.0] * 4, [0.5] * 2 + [2.0] * 4 + [0.5] * 2 + [2.0] * 4]
    )
    layer.set_exact(downs, ups, [6, 6], per_sample)
    layer.active = True
    x = torch.randn(2, 5, 16)
    batched = layer(x)
    for sample in range(2):
        layer.set_exact(downs, ups, [6, 6], per_sample[sample])
        torch.testing.assert_close(batched[sample : sample + 1], layer(x[sample : sample + 1]))
    expected = base(x[:1]) + torch.cat(
        [
            (x[:1] @ downs[:2].T) @ ups[0][:, :2].T,
            (x[:1] @ downs[6:8].T) @ ups[1][:, :2].T,
        ],
        dim=-1,
    )
    torch.testing.assert_close(batched[:1], expected)
