"""Parity with ``diffusers.FluxFillPipeline`` in fp32: same inputs and seeds give the same images.

Both pipelines run on the same tiny random components (see ``conftest.py``); every comparison is the
maximum absolute difference of output pixels in [0, 1] (``output_type="np"`` unless stated), bound 1e-4.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from fluxfill_engine.conditioning import latent_image_ids
from fluxfill_engine.model import FillTransformer
from tests.support import helpers


def run_both(pipes: Any, **overrides: Any) -> tuple[Any, Any]:
    """Run diffusers' pipeline and ours with identical (freshly built) arguments; return both outputs."""
    reference, ours = pipes
    expected = reference(**helpers.call_kwargs(**overrides)).images
    actual = ours(**helpers.call_kwargs(**overrides)).images
    return expected, actual


# ---- sizes -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("height", "width"),
    [
        (32, 32),  # square
        (64, 64),  # square, more tokens
        (32, 48),  # landscape
        (48, 32),  # portrait
        (16, 80),  # a single row of latent patches
        (16, 16),  # a single latent patch: L = 1
        (40, 56),  # not multiples of 16: rounded down to 32x48
        (50, 35),  # not multiples of 16, odd: rounded down to 48x32
    ],
)
def test_sizes(pipes, height, width):
    expected, actual = run_both(pipes, height=height, width=width)
    assert expected.shape == (1, height // 16 * 16, width // 16 * 16, 3)
    helpers.assert_close(expected, actual)


# ---- batching and generators -----------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, [11, 12, 13, 14]], ids=["one-generator", "generator-list"])
def test_batch_of_prompts_with_num_images_per_prompt(pipes, seed):
    expected, actual = run_both(
        pipes, seed=seed, prompt=["a red cat", "a blue car on the road"], num_images_per_prompt=2
    )
    assert expected.shape[0] == 4
    helpers.assert_close(expected, actual)


@pytest.mark.slow
@pytest.mark.parametrize("strength", [1.0, 0.6], ids=["strength-1", "strength-0.6"])
def test_list_of_generators(pipes, strength):
    # One image, three generators: diffusers draws the init-image VAE sample from generator 0 only.
    expected, actual = run_both(
        pipes, seed=[5, 6, 7], num_images_per_prompt=3, strength=strength, num_inference_steps=5
    )
    assert expected.shape[0] == 3
    helpers.assert_close(expected, actual)


@pytest.mark.slow
def test_batch_of_images_with_list_of_generators(pipes):
    images = torch.cat([helpers.image_tensor(seed=1), helpers.image_tensor(seed=2)])
    masks = torch.cat([helpers.mask_tensor(), 1 - helpers.mask_tensor()])
    expected, actual = run_both(
        pipes,
        seed=[3, 4],
        prompt=["a cat", "a dog"],
        image=images,
        mask_image=masks,
        strength=0.8,
        num_inference_steps=4,
    )
    helpers.assert_close(expected, actual)


# ---- schedule ----------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(
    ("strength", "steps"), [(0.6, 5), (0.5, 4), (0.99, 3)], ids=["0.6x5", "0.5x4", "0.99x3"]
)
def test_strength_below_one(pipes, strength, steps):
    expected, actual = run_both(pipes, strength=strength, num_inference_steps=steps)
    helpers.assert_close(expected, actual)
    reference, ours = pipes
    assert ours.num_timesteps == reference.num_timesteps


@pytest.mark.parametrize(
    "sigmas",
    [
        [1.0, 0.75, 0.5, 0.25],
        [0.9, 0.5, 0.2],  # does not start at 1: the init image is VAE-encoded and noised
        np.array([1.0, 0.6, 0.3], dtype=np.float32),
    ],
    ids=["from-1", "from-0.9", "numpy"],
)
def test_custom_sigmas(pipes, sigmas):
    expected, actual = run_both(pipes, sigmas=sigmas)
    helpers.assert_close(expected, actual)


def test_custom_sigmas_with_strength(pipes):
    expected, actual = run_both(pipes, sigmas=[1.0, 0.8, 0.6, 0.4, 0.2], strength=0.7)
    helpers.assert_close(expected, actual)


def test_one_step(pipes):
    expected, actual = run_both(pipes, num_inference_steps=1)
    helpers.assert_close(expected, actual)


@pytest.mark.parametrize("guidance_scale", [0.0, 3.5, 30])
def test_guidance_scale(pipes, guidance_scale):
    expected, actual = run_both(pipes, guidance_scale=guidance_scale)
    helpers.assert_close(expected, actual)


# ---- prompts -----------------------------------------------------------------------------------------


def test_prompt_2(pipes):
    expected, actual = run_both(pipes, prompt_2="a green tree in front of a house")
    helpers.assert_close(expected, actual)
    # prompt_2 really reaches T5: the images differ from the prompt-only ones.
    _, without = run_both(pipes)
    assert helpers.max_abs_diff(actual, without) > 1e-3


@pytest.mark.parametrize(
    ("prompt", "prompt_2", "num_images_per_prompt"),
    [
        ("a cat", None, 1),
        (["a cat", "a small dog"], None, 2),
        (["a cat", "a small dog"], ["sky", "sea with sun"], 3),
    ],
)
def test_encode_prompt(pipes, prompt, prompt_2, num_images_per_prompt):
    reference, ours = pipes
    kwargs = dict(
        prompt=prompt, prompt_2=prompt_2, num_images_per_prompt=num_images_per_prompt, max_sequence_length=20
    )
    expected = reference.encode_prompt(**kwargs)
    for _ in range(2):  # the second time from our prompt cache
        actual = ours.encode_prompt(**kwargs)
        for e, a in zip(expected, actual, strict=True):
            assert e.shape == a.shape and e.dtype == a.dtype
            helpers.assert_close(e, a, atol=1e-6)


@pytest.mark.parametrize("encoder", ["ours", "diffusers"])
def test_prompt_embeds(pipes, encoder):
    reference, ours = pipes
    source = ours if encoder == "ours" else reference
    prompt_embeds, pooled_prompt_embeds, _ = source.encode_prompt(
        ["a cat", "a dog"], max_sequence_length=helpers.MAX_SEQ
    )
    expected, actual = run_both(
        pipes,
        prompt=None,
        prompt_embeds=prompt_embeds,
        pooled_prompt_embeds=pooled_prompt_embeds,
    )
    assert expected.shape[0] == 2
    helpers.assert_close(expected, actual)
    # ... and the same as passing the prompts themselves.
    from_prompts = ours(**helpers.call_kwargs(prompt=["a cat", "a dog"])).images
    helpers.assert_close(from_prompts, actual)


def test_prompt_embeds_with_num_images_per_prompt(pipes):
    reference, ours = pipes
    prompt_embeds, pooled_prompt_embeds, _ = ours.encode_prompt("a cat", max_sequence_length=helpers.MAX_SEQ)
    expected, actual = run_both(
        pipes,
        prompt=None,
        prompt_embeds=prompt_embeds,
        pooled_prompt_embeds=pooled_prompt_embeds,
        num_images_per_prompt=2,
    )
    assert expected.shape[0] == 2
    helpers.assert_close(expected, actual)


# ---- outputs -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("output_type", ["pil", "np", "pt", "latent"])
def test_output_types(pipes, output_type):
    expected, actual = run_both(pipes, output_type=output_type, num_images_per_prompt=2)
    assert type(expected) is type(actual)
    if output_type == "pil":
        a, b = helpers.as_array(expected), helpers.as_array(actual)
        assert a.shape == b.shape == (2, helpers.HEIGHT, helpers.WIDTH, 3)
        # 8-bit rounding can flip a value sitting on a rounding boundary by one level when the float
        # images differ by ~1e-6; allow that (one level, on a negligible fraction of values), nothing more.
        diff = np.abs(a - b)
        assert diff.max() <= 1 / 255 + 1e-9
        assert (diff > 0).mean() <= 1e-3
    else:
        helpers.assert_close(expected, actual)


# ---- input types ---------------------------------------------------------------------------------------


def _image_inputs(kind: str) -> dict[str, Any]:
    image, mask = helpers.image_tensor(), helpers.mask_tensor()
    if kind == "tensor":
        return {"image": image, "mask_image": mask}
    if kind == "tensor-3d":
        return {"image": image[0], "mask_image": mask[0]}
    if kind == "pil":
        return {"image": helpers.to_pil(image), "mask_image": helpers.to_pil(mask)}
    if kind == "pil-list":
        return {"image": [helpers.to_pil(image)], "mask_image": [helpers.to_pil(mask)]}
    if kind == "numpy":
        return {"image": helpers.to_numpy(image), "mask_image": helpers.to_numpy(mask)}
    if kind == "numpy-hwc":
        return {"image": helpers.to_numpy(image)[0], "mask_image": helpers.to_numpy(mask)[0, :, :, 0]}
    raise AssertionError(kind)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["tensor", "tensor-3d", "pil", "pil-list", "numpy", "numpy-hwc"])
def test_image_input_types(pipes, kind):
    expected, actual = run_both(pipes, **_image_inputs(kind))
    helpers.assert_close(expected, actual)


def test_pil_inputs_are_resized(pipes):
    # A 96x64 PIL image and mask for a 32x48 request: both pipelines resize the same way.
    image = helpers.to_pil(helpers.image_tensor(64, 96))
    mask = helpers.to_pil(helpers.mask_tensor(64, 96))
    expected, actual = run_both(pipes, image=image, mask_image=mask)
    helpers.assert_close(expected, actual)


def test_latents_given(pipes):
    latents = torch.randn(1, 6, 64, generator=torch.Generator().manual_seed(9))
    expected, actual = run_both(pipes, latents=latents.clone(), num_inference_steps=3)
    helpers.assert_close(expected, actual)


# ---- callbacks -----------------------------------------------------------------------------------------


@pytest.mark.slow
def test_callback_edits_latents(pipes):
    def shrink_latents_at_step_0(pipe, step, timestep, kwargs):
        return {"latents": kwargs["latents"] * 0.9} if step == 0 else {}

    expected, actual = run_both(pipes, num_inference_steps=3, callback_on_step_end=shrink_latents_at_step_0)
    helpers.assert_close(expected, actual)
    _, unedited = run_both(pipes, num_inference_steps=3)
    assert helpers.max_abs_diff(actual, unedited) > 1e-3  # the edit took effect


@pytest.mark.slow
def test_callback_edits_prompt_embeds(pipes):
    def scale_prompt_embeds_at_step_0(pipe, step, timestep, kwargs):
        return {"prompt_embeds": kwargs["prompt_embeds"] * 0.5} if step == 0 else {}

    expected, actual = run_both(
        pipes,
        num_inference_steps=3,
        callback_on_step_end=scale_prompt_embeds_at_step_0,
        callback_on_step_end_tensor_inputs=["latents", "prompt_embeds"],
    )
    helpers.assert_close(expected, actual)
    _, unedited = run_both(pipes, num_inference_steps=3)
    assert helpers.max_abs_diff(actual, unedited) > 1e-3


def test_callback_sees_same_steps_and_timesteps(pipes):
    reference, ours = pipes
    seen: dict[str, list[tuple[int, float]]] = {"reference": [], "ours": []}

    def recorder(name):
        def callback(pipe, step, timestep, kwargs):
            seen[name].append((step, float(timestep)))
            return {}

        return callback

    kwargs = dict(num_inference_steps=5, strength=0.6)
    reference(**helpers.call_kwargs(**kwargs, callback_on_step_end=recorder("reference")))
    ours(**helpers.call_kwargs(**kwargs, callback_on_step_end=recorder("ours")))
    assert [s for s, _ in seen["ours"]] == [0, 1, 2]
    np.testing.assert_allclose(
        [t for _, t in seen["ours"]], [t for _, t in seen["reference"]], rtol=0, atol=1e-3
    )


def test_interrupt(pipes):
    def interrupt_after_step_1(pipe, step, timestep, kwargs):
        if step == 1:
            pipe._interrupt = True
        return {}

    expected, actual = run_both(pipes, num_inference_steps=4, callback_on_step_end=interrupt_after_step_1)
    helpers.assert_close(expected, actual)


# ---- the transformer alone ---------------------------------------------------------------------------


@pytest.mark.parametrize("ids", ["flux", "random"])
def test_fill_transformer_matches_diffusers_forward(components, ids):
    """``FillTransformer`` vs ``FluxTransformer2DModel.forward``: odd L and S, batch 2, two timesteps."""
    transformer = components["transformer"]
    batch, grid_h, grid_w, text_len = 2, 5, 7, 13
    seq_len = grid_h * grid_w  # 35 image tokens
    gen = torch.Generator().manual_seed(123)
    latents = torch.randn(batch, seq_len, 64, generator=gen)
    cond = torch.randn(batch, seq_len, 320, generator=gen)
    prompt_embeds = torch.randn(batch, text_len, 32, generator=gen)
    pooled = torch.randn(batch, 32, generator=gen)
    img_ids = latent_image_ids(grid_h, grid_w, "cpu", torch.float32)
    txt_ids = torch.zeros(text_len, 3)
    if ids == "random":  # arbitrary positions on every RoPE axis, text included
        txt_ids = torch.randint(0, 30, (text_len, 3), generator=gen).float()
        img_ids = img_ids + torch.randint(0, 30, (seq_len, 3), generator=gen).float()
    timesteps = torch.tensor([1000.0, 437.25])  # sigma * 1000, one per step
    guidance = 30.0

    def reference_forward(step):
        return transformer(
            hidden_states=torch.cat([latents, cond], dim=2),
            timestep=timesteps[step].expand(batch) / 1000,
            guidance=torch.full([batch], guidance),
            pooled_projections=pooled,
            encoder_hidden_states=prompt_embeds,
            txt_ids=txt_ids,
            img_ids=img_ids,
            return_dict=False,
        )[0]

    with torch.no_grad():
        state_before = {k: v.clone() for k, v in transformer.state_dict().items()}
        expected = [reference_forward(step) for step in range(2)]
        fill = FillTransformer.from_diffusers(transformer)
        inputs = fill.prepare(
            cond, prompt_embeds, pooled, timesteps, guidance, txt_ids, img_ids, torch.float32
        )
        actual = [fill(latents, step, inputs) for step in range(2)]
        after_fusion = [reference_forward(step) for step in range(2)]

    # Fusing QKV in place changes no value of the diffusers module.
    state_after = transformer.state_dict()
    assert state_after.keys() == state_before.keys()
    for key, value in state_before.items():
        assert torch.equal(state_after[key], value), key

    assert not torch.allclose(expected[0], expected[1])  # the two timesteps really differ
    for e, a, f in zip(expected, actual, after_fusion, strict=True):
        assert a.shape == e.shape == (batch, seq_len, 64)
        scale = e.abs().max()
        assert (a - e).abs().max() / scale <= 1e-5
        assert (f - e).abs().max() / scale <= 1e-5
