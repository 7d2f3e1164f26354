"""``EngineConfig.precompute_modulation``: every block's AdaLN vectors for all steps in ``prepare``.

The vectors depend only on the timestep, guidance and pooled text, so computing them once per request is
the same arithmetic batched over the steps: the outputs equal the per-step path to fp32 rounding, and the
modulation linears run once per request instead of once per step.
"""

import pytest
import torch
from torch import nn

from fluxfill_engine import EngineConfig, FluxFillPipeline
from fluxfill_engine.model import FillTransformer
from fluxfill_engine.testing.step_inputs import StepInputs
from fluxfill_engine.testing.tiny import tiny_components
from tests.support import helpers

STEPS = 4
GUIDANCE = 30.0


def modulation_layers(fill: FillTransformer) -> list[nn.Module]:
    layers = []
    for block in fill.blocks():
        names = ("img_mod", "txt_mod") if hasattr(block, "img_mod") else ("mod",)
        layers += [getattr(block, name) for name in names]
    return layers


def count_calls(layers: list[nn.Module]) -> list[int]:
    calls = [0]

    def hook(*_: object) -> None:
        calls[0] += 1

    for layer in layers:
        layer.register_forward_hook(hook)
    return calls


def run_steps(fill: FillTransformer, inputs: StepInputs, cache=None) -> list[torch.Tensor]:
    prepared = inputs.prepare(fill, GUIDANCE)
    return [fill(inputs.latents, step, prepared, cache) for step in range(inputs.timesteps.shape[0])]


@pytest.fixture
def fill() -> FillTransformer:
    transformer = tiny_components(0)["transformer"]
    return FillTransformer.from_diffusers(transformer)


def test_precomputed_modulation_equals_per_step(fill: FillTransformer) -> None:
    inputs = StepInputs.random(fill.source[0].config, 48, 32, 8, torch.device("cpu"), torch.float32, STEPS)
    inputs = inputs.batched(2)
    layers = modulation_layers(fill)
    calls = count_calls(layers)
    per_step = run_steps(fill, inputs)
    per_step_calls = calls[0]

    fill.precompute_modulation = True
    calls[0] = 0
    ahead = run_steps(fill, inputs)

    assert per_step_calls == STEPS * len(layers)
    assert calls[0] == len(layers)  # once per request, all steps in one product
    for expected, got in zip(per_step, ahead, strict=True):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


class RowsCache:
    """What a batch step cache does when only some requests compute a step: the remaining blocks run
    on those rows (here row 1), the others keep the first block's output."""

    def apply(self, step, img, first_img, remaining, shard=None):
        out = first_img.clone()
        rows = torch.tensor([1])
        out[rows] = remaining(rows)
        return out


def test_precomputed_modulation_follows_the_computing_rows(fill: FillTransformer) -> None:
    inputs = StepInputs.random(fill.source[0].config, 48, 48, 8, torch.device("cpu"), torch.float32, STEPS)
    inputs = inputs.batched(2)
    inputs.latents[1] += 0.5  # rows differ, so a row mix-up shows
    per_step = run_steps(fill, inputs, RowsCache())
    fill.precompute_modulation = True
    ahead = run_steps(fill, inputs, RowsCache())
    for expected, got in zip(per_step, ahead, strict=True):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_engine_option_reaches_the_transformer_and_images_match() -> None:
    pipes = [FluxFillPipeline(**tiny_components(0)) for _ in range(2)]
    helpers.disable_progress(*pipes)
    pipes[1].configure(EngineConfig(precompute_modulation=True))
    assert pipes[1].engine_transformer().precompute_modulation
    assert not pipes[0].engine_transformer().precompute_modulation
    expected = pipes[0](**helpers.call_kwargs(num_inference_steps=3)).images
    got = pipes[1](**helpers.call_kwargs(num_inference_steps=3)).images
    helpers.assert_close(got, expected, atol=1e-5)


def test_option_is_validated() -> None:
    with pytest.raises(TypeError, match="precompute_modulation must be a bool"):
        EngineConfig(precompute_modulation=1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="precompute_modulation reads every block's weights"):
        EngineConfig(precompute_modulation=True, block_streaming=True)


def test_pipeline_default_is_off() -> None:
    pipe = FluxFillPipeline(**tiny_components(0))
    assert pipe.engine_config.precompute_modulation is False


@pytest.mark.slow
def test_compiled_blocks_take_the_precomputed_vectors(fill: FillTransformer) -> None:
    """fullgraph compile of the blocks with the vectors handed in (the GPU run's compiled lever row)."""
    inputs = StepInputs.random(fill.source[0].config, 32, 32, 8, torch.device("cpu"), torch.float32, 2)
    fill.precompute_modulation = True
    eager = run_steps(fill, inputs)[:2]
    torch._dynamo.reset()
    fill.set_compile(("default", False), torch.device("cpu"))
    prepared = inputs.prepare(fill, GUIDANCE)
    compiled = [fill(inputs.latents, step, prepared) for step in range(2)]
    for expected, got in zip(eager, compiled, strict=True):
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
