"""Bad input raises ``ValueError``/``TypeError`` (``FileNotFoundError`` for a missing path) naming the
parameter, before any work is done; file-path inputs work like the images they contain."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import torch

from tests.support import helpers

NAN = float("nan")
INF = float("inf")


def _nan_image() -> torch.Tensor:
    image = torch.rand(1, 3, 32, 48, generator=torch.Generator().manual_seed(0))
    image[0, 1, 5, 7] = NAN
    return image


def _mask(value: float, numpy: bool = False) -> Any:
    mask = torch.zeros(1, 1, 32, 48)
    mask[..., 8:24, 12:36] = value
    return mask.permute(0, 2, 3, 1).numpy() if numpy else mask


# (overrides of a valid call, expected exception, regex the message must match: the parameter's name)
BAD_INPUTS: dict[str, tuple[dict[str, Any], type[Exception], str]] = {
    "steps-0": (dict(num_inference_steps=0), ValueError, "num_inference_steps"),
    "steps-negative": (dict(num_inference_steps=-1), ValueError, "num_inference_steps"),
    "steps-float": (dict(num_inference_steps=2.5), ValueError, "num_inference_steps"),
    "steps-bool": (dict(num_inference_steps=True), ValueError, "num_inference_steps"),
    "guidance-nan": (dict(guidance_scale=NAN), ValueError, "guidance_scale"),
    "guidance-inf": (dict(guidance_scale=INF), ValueError, "guidance_scale"),
    "guidance-minus-inf": (dict(guidance_scale=-INF), ValueError, "guidance_scale"),
    "guidance-str": (dict(guidance_scale="30"), ValueError, "guidance_scale"),
    "image-nan": (dict(image=_nan_image()), ValueError, "`image`"),
    "image-inf": (dict(image=torch.full((1, 3, 32, 48), INF)), ValueError, "`image`"),
    "image-nan-numpy": (dict(image=_nan_image().permute(0, 2, 3, 1).numpy()), ValueError, "`image`"),
    "image-nan-in-list": (dict(image=[_nan_image()[0]]), ValueError, "`image`"),
    "mask-nan": (dict(mask_image=_mask(NAN)), ValueError, "`mask_image`"),
    "mask-above-1": (dict(mask_image=_mask(2.0)), ValueError, "`mask_image`"),
    "mask-below-0": (dict(mask_image=_mask(-0.5)), ValueError, "`mask_image`"),
    "mask-above-1-numpy": (dict(mask_image=_mask(2.0, numpy=True)), ValueError, "`mask_image`"),
    "images-per-prompt-0": (dict(num_images_per_prompt=0), ValueError, "num_images_per_prompt"),
    "images-per-prompt-negative": (dict(num_images_per_prompt=-2), ValueError, "num_images_per_prompt"),
    "images-per-prompt-float": (dict(num_images_per_prompt=1.5), ValueError, "num_images_per_prompt"),
    "height-negative": (dict(height=-32), ValueError, "height"),
    "width-negative": (dict(width=-1), ValueError, "width"),
    "height-float": (dict(height=32.5), ValueError, "height"),
    "height-too-small": (dict(height=8), ValueError, "height"),
    "width-too-small": (dict(width=15), ValueError, "width"),
    "output-type-jpeg": (dict(output_type="jpeg"), ValueError, "output_type"),
    "image-int": (dict(image=3), TypeError, "`image`"),
    "image-dict": (dict(image={"pixels": [0, 1]}), TypeError, "`image`"),
    "image-list-of-int": (dict(image=[1, 2]), TypeError, "`image`"),
    "image-empty-list": (dict(image=[]), ValueError, "`image`"),
    "mask-dict": (dict(mask_image={"mask": 1}), TypeError, "`mask_image`"),
    "strength-1.5": (dict(strength=1.5), ValueError, "strength"),
    "strength-negative": (dict(strength=-0.1), ValueError, "strength"),
    "strength-nan": (dict(strength=NAN), ValueError, "strength"),
    "strength-no-steps-left": (dict(strength=0.0), ValueError, "strength"),
    "prompt-and-prompt-embeds": (
        dict(prompt_embeds=torch.zeros(1, 48, 32), pooled_prompt_embeds=torch.zeros(1, 32)),
        ValueError,
        "prompt_embeds",
    ),
    "no-prompt": (dict(prompt=None), ValueError, "prompt"),
    "prompt-empty-list": (dict(prompt=[]), ValueError, "prompt"),
    "prompt-not-strings": (dict(prompt=["a cat", 3]), ValueError, "prompt"),
    "prompt-embeds-without-pooled": (
        dict(prompt=None, prompt_embeds=torch.zeros(1, 48, 32)),
        ValueError,
        "pooled_prompt_embeds",
    ),
    "pooled-batch-mismatch": (
        dict(prompt=None, prompt_embeds=torch.zeros(2, 48, 32), pooled_prompt_embeds=torch.zeros(1, 32)),
        ValueError,
        "pooled_prompt_embeds",
    ),
    "no-image": (dict(image=None, mask_image=None), ValueError, "image"),
    "image-without-mask": (dict(mask_image=None), ValueError, "mask_image"),
    "generator-list-too-short": (dict(seed=[1], num_images_per_prompt=2), ValueError, "generator"),
    "generator-list-too-long": (dict(seed=[1, 2, 3]), ValueError, "generator"),
    "max-sequence-length-600": (dict(max_sequence_length=600), ValueError, "max_sequence_length"),
    "max-sequence-length-0": (dict(max_sequence_length=0), ValueError, "max_sequence_length"),
    "latents-wrong-shape": (dict(latents=torch.zeros(1, 5, 64)), ValueError, "latents"),
    "latents-wrong-batch": (dict(latents=torch.zeros(2, 6, 64)), ValueError, "latents"),
    "latents-unpacked": (dict(latents=torch.zeros(1, 16, 4, 6)), ValueError, "latents"),
    "latents-not-a-tensor": (dict(latents=np.zeros((1, 6, 64))), ValueError, "latents"),
    "masked-image-latents-wrong-shape": (
        dict(image=None, mask_image=None, masked_image_latents=torch.zeros(1, 6, 64)),
        ValueError,
        "masked_image_latents",
    ),
    "joint-attention-kwargs-unknown-key": (
        dict(joint_attention_kwargs={"attention_mask": None}),
        ValueError,
        "joint_attention_kwargs",
    ),
    "sigmas-empty": (dict(sigmas=[]), ValueError, "sigmas"),
    "sigmas-above-1": (dict(sigmas=[1.5, 0.5]), ValueError, "sigmas"),
    "sigmas-zero": (dict(sigmas=[1.0, 0.0]), ValueError, "sigmas"),
    "sigmas-nan": (dict(sigmas=[1.0, NAN]), ValueError, "sigmas"),
    "callback-not-callable": (dict(callback_on_step_end="print"), TypeError, "callback_on_step_end"),
    "callback-unknown-tensor-input": (
        dict(callback_on_step_end=lambda *a: {}, callback_on_step_end_tensor_inputs=["noise_pred"]),
        ValueError,
        "callback_on_step_end_tensor_inputs",
    ),
}


# Refused by diffusers' own check_inputs (its messages, no field); the rest by the engine's checks.
DIFFUSERS_CHECKS = {
    "strength-1.5",
    "strength-negative",
    "prompt-and-prompt-embeds",
    "image-without-mask",
    "callback-unknown-tensor-input",
}


@pytest.mark.parametrize("case", list(BAD_INPUTS), ids=list(BAD_INPUTS))
def test_bad_input_is_rejected_before_any_work(pipe, monkeypatch, case):
    overrides, error, match = BAD_INPUTS[case]
    vae_calls = []
    monkeypatch.setattr(pipe.vae, "encode", lambda *a, **k: vae_calls.append("encode"))
    monkeypatch.setattr(pipe.vae, "decode", lambda *a, **k: vae_calls.append("decode"))
    with pytest.raises(error, match=match) as refused:
        pipe(**helpers.call_kwargs(**overrides))
    assert getattr(refused.value, "field", None) == (None if case in DIFFUSERS_CHECKS else match.strip("`"))
    # Nothing ran: no prompt was encoded, the VAE was not used.
    assert pipe.prompt_cache.misses == 0 and len(pipe.prompt_cache) == 0
    assert vae_calls == []


@pytest.mark.parametrize("name", ["height", "width"])
def test_zero_height_or_width_is_rejected(pipe, name):
    with pytest.raises(ValueError, match=name):
        pipe(**helpers.call_kwargs(**{name: 0}, num_inference_steps=1))


def test_missing_image_path(pipe, tmp_path):
    with pytest.raises(FileNotFoundError, match="`image`"):
        pipe(**helpers.call_kwargs(image=str(tmp_path / "missing.png")))
    with pytest.raises(FileNotFoundError, match="`mask_image`"):
        pipe(**helpers.call_kwargs(mask_image=tmp_path / "missing-mask.png"))
    with pytest.raises(FileNotFoundError, match="`image`"):
        pipe(**helpers.call_kwargs(image=str(tmp_path)))  # a directory is not an image file


def test_file_that_is_not_an_image(pipe, tmp_path):
    not_an_image = tmp_path / "notes.png"
    not_an_image.write_text("this is not a PNG")
    with pytest.raises(ValueError, match="`image`"):
        pipe(**helpers.call_kwargs(image=str(not_an_image)))
    with pytest.raises(ValueError, match="`mask_image`"):
        pipe(**helpers.call_kwargs(mask_image=not_an_image))


@pytest.mark.parametrize("as_str", [True, False], ids=["str", "pathlib"])
def test_image_and_mask_file_paths(pipe, tmp_path, as_str):
    image = helpers.to_pil(helpers.image_tensor())
    mask = helpers.to_pil(helpers.mask_tensor())
    image.save(tmp_path / "image.png")
    mask.save(tmp_path / "mask.png")
    image_path, mask_path = tmp_path / "image.png", tmp_path / "mask.png"
    if as_str:
        image_path, mask_path = str(image_path), str(mask_path)

    from_pil = pipe(**helpers.call_kwargs(image=image, mask_image=mask)).images
    from_paths = pipe(**helpers.call_kwargs(image=image_path, mask_image=mask_path)).images
    helpers.assert_close(from_paths, from_pil, atol=0)
    from_path_list = pipe(**helpers.call_kwargs(image=[image_path], mask_image=[mask_path])).images
    helpers.assert_close(from_path_list, from_pil, atol=0)


def test_rgba_and_palette_files_are_converted(pipe, tmp_path):
    image = helpers.to_pil(helpers.image_tensor())
    image.convert("RGBA").save(tmp_path / "image.png")
    helpers.to_pil(helpers.mask_tensor()).save(tmp_path / "mask.png")
    images = pipe(
        **helpers.call_kwargs(image=tmp_path / "image.png", mask_image=tmp_path / "mask.png")
    ).images
    assert images.shape == (1, helpers.HEIGHT, helpers.WIDTH, 3) and np.isfinite(images).all()


@pytest.mark.slow
def test_edge_values_are_accepted(pipe):
    # Boundary values that are valid: strength 1, mask all 0 / all 1, max_sequence_length 512.
    full = torch.ones(1, 1, helpers.HEIGHT, helpers.WIDTH)
    for overrides in (
        dict(mask_image=full),
        dict(mask_image=torch.zeros_like(full)),
        dict(strength=1.0, sigmas=[1.0]),
        dict(max_sequence_length=512, num_inference_steps=1),
        dict(joint_attention_kwargs={"scale": 1.0}),
        dict(num_inference_steps=np.int64(2), height=np.int64(helpers.HEIGHT)),
    ):
        images = pipe(**helpers.call_kwargs(**overrides)).images
        assert images.shape == (1, helpers.HEIGHT, helpers.WIDTH, 3), overrides
        assert np.isfinite(images).all(), overrides


@pytest.mark.slow
def test_numpy_float_scalars_are_accepted(pipes):
    reference, ours = pipes
    kwargs = dict(guidance_scale=np.float32(3.5), strength=np.float32(0.75), num_inference_steps=4)
    expected = reference(**helpers.call_kwargs(**kwargs)).images
    helpers.assert_close(ours(**helpers.call_kwargs(**kwargs)).images, expected)


def test_validation_messages_show_the_bad_value(pipe):
    with pytest.raises(ValueError, match=r"num_inference_steps.*2\.5"):
        pipe(**helpers.call_kwargs(num_inference_steps=2.5))
    with pytest.raises(ValueError, match="guidance_scale.*nan"):
        pipe(**helpers.call_kwargs(guidance_scale=math.nan))
    with pytest.raises(ValueError, match="output_type.*jpeg"):
        pipe(**helpers.call_kwargs(output_type="jpeg"))
    with pytest.raises(ValueError, match=r"generator.*list of 3.*effective batch size.*2"):
        pipe(**helpers.call_kwargs(seed=[1, 2, 3], num_images_per_prompt=2))


def test_boolean_mask_equals_float_mask(pipe):
    """A bool mask (True = repaint) is accepted and means the same as the 0/1 float mask."""
    float_kwargs = helpers.call_kwargs()
    bool_kwargs = helpers.call_kwargs(mask_image=float_kwargs["mask_image"] > 0.5)
    assert bool_kwargs["mask_image"].dtype == torch.bool
    helpers.assert_close(pipe(**float_kwargs).images, pipe(**bool_kwargs).images, atol=0.0)
