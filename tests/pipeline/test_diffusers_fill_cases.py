"""diffusers' own FluxFill test cases, written for our suite: the ``PipelineTesterMixin`` cases of
diffusers' ``tests/pipelines/test_pipelines_common.py`` that apply to a Fill pipeline, and the cases of
``tests/pipelines/flux/test_pipeline_flux_fill.py``, run against our ``FluxFillPipeline`` on components
shaped as that file's ``get_dummy_components`` (built here: its tokenizers and T5 config come from the
Hub there). Where a case computes images, they are also compared with ``diffusers.FluxFillPipeline`` on
the same components. ``scripts/run_diffusers_fill_tests.py`` runs diffusers' file itself, from a checkout.

Not written here, as in diffusers' file: xformers (the Fill file sets ``test_xformers_attention =
False``), ``StableDiffusionMixin`` (Flux is not one). Cases diffusers runs on an accelerator only are
marked ``gpu`` (sequential offload, float16, moving between devices); model CPU offload and group
offloading run here with the CPU as the execution device.
"""

from __future__ import annotations

import inspect
import json
import logging
import os
import random
import string
import subprocess
import sys
from pathlib import Path

import diffusers
import numpy as np
import pytest
import torch
from diffusers.hooks import apply_group_offloading
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, T5Config, T5EncoderModel, T5Tokenizer

from fluxfill_engine import FluxFillPipeline

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
PARAMS = frozenset(["prompt", "height", "width", "guidance_scale", "prompt_embeds", "pooled_prompt_embeds"])
BATCH_PARAMS = frozenset(["prompt"])
REQUIRED_OPTIONAL_PARAMS = frozenset(
    ["num_inference_steps", "num_images_per_prompt", "generator", "latents", "output_type", "return_dict"]
)
CHARACTERS = list(string.ascii_letters + string.digits + string.punctuation)


# ---- diffusers' dummy components and inputs, built here ------------------------------------------------


def _tokenizers() -> tuple[CLIPTokenizer, T5Tokenizer]:
    """Character-level stand-ins for ``hf-internal-testing/tiny-random-clip`` and ``-t5``: a BPE
    ``CLIPTokenizer`` (ids < 1000, the test's CLIP vocabulary) and a ``T5Tokenizer`` with 100 extra ids."""
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for token in CHARACTERS + [c + "</w>" for c in CHARACTERS]:
        vocab[token] = len(vocab)
    clip = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [(c, -3.0) for c in CHARACTERS] + [("\u2581" + c, -3.0) for c in CHARACTERS]
    pieces += [(f"<extra_id_{i}>", 0.0) for i in reversed(range(100))]
    return clip, T5Tokenizer(vocab=pieces, extra_ids=100, model_max_length=512)


def dummy_components() -> dict:
    """diffusers' ``FluxFillPipelineFastTests.get_dummy_components``: 20 input channels (2 latent
    channels packed to 8, the masked image's 8, the mask's 4), a one-block VAE (scale factor 1)."""
    torch.manual_seed(0)
    transformer = diffusers.FluxTransformer2DModel(
        patch_size=1,
        in_channels=20,
        out_channels=8,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        axes_dims_rope=[4, 4, 8],
    )
    clip_config = CLIPTextConfig(
        bos_token_id=0,
        eos_token_id=2,
        hidden_size=32,
        intermediate_size=37,
        layer_norm_eps=1e-05,
        num_attention_heads=4,
        num_hidden_layers=5,
        pad_token_id=1,
        vocab_size=1000,
        hidden_act="gelu",
        projection_dim=32,
    )
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(clip_config)
    tokenizer, tokenizer_2 = _tokenizers()
    torch.manual_seed(0)
    t5_config = T5Config(
        vocab_size=len(tokenizer_2),
        d_model=32,
        d_ff=37,
        d_kv=8,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        is_encoder_decoder=False,
        pad_token_id=0,
        eos_token_id=1,
    )
    text_encoder_2 = T5EncoderModel(t5_config)
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(
        sample_size=32,
        in_channels=3,
        out_channels=3,
        block_out_channels=(4,),
        layers_per_block=1,
        latent_channels=2,
        norm_num_groups=1,
        use_quant_conv=False,
        use_post_quant_conv=False,
        shift_factor=0.0609,
        scaling_factor=1.5035,
    )
    for module in (text_encoder, text_encoder_2):
        module.eval()
    return {
        "scheduler": diffusers.FlowMatchEulerDiscreteScheduler(),
        "text_encoder": text_encoder,
        "text_encoder_2": text_encoder_2,
        "tokenizer": tokenizer,
        "tokenizer_2": tokenizer_2,
        "transformer": transformer,
        "vae": vae,
    }


def dummy_inputs(seed: int = 0, device: str = DEVICE) -> dict:
    """diffusers' ``get_dummy_inputs``: a random image, an all-white mask, 2 steps at 32x32."""
    rng = random.Random(seed)
    image = torch.tensor([rng.random() for _ in range(3 * 32 * 32)], dtype=torch.float32).view(1, 3, 32, 32)
    return {
        "prompt": "A painting of a squirrel eating a burger",
        "image": image.to(device),
        "mask_image": torch.ones((1, 1, 32, 32)).to(device),
        "generator": torch.Generator(device="cpu").manual_seed(seed),
        "num_inference_steps": 2,
        "guidance_scale": 5.0,
        "height": 32,
        "width": 32,
        "max_sequence_length": 48,
        "output_type": "np",
    }


def pipelines(components: dict | None = None) -> tuple[FluxFillPipeline, diffusers.FluxFillPipeline]:
    """Ours and diffusers' on the same components (ours fuses QKV in place: the values are unchanged)."""
    components = components or dummy_components()
    ours, theirs = FluxFillPipeline(**components), diffusers.FluxFillPipeline(**components)
    for pipe in (ours, theirs):
        pipe.to(DEVICE)
        pipe.set_progress_bar_config(disable=True)
    return ours, theirs


def to_np(images) -> np.ndarray:
    return images.detach().cpu().numpy() if isinstance(images, torch.Tensor) else np.asarray(images)


def max_diff(a, b) -> float:
    return float(np.abs(to_np(a) - to_np(b)).max())


def assert_mean_pixel_difference(image, expected, threshold: float = 10.0) -> None:
    image = np.asarray(diffusers.DiffusionPipeline.numpy_to_pil(to_np(image)[None])[0], dtype=np.float32)
    expected = np.asarray(
        diffusers.DiffusionPipeline.numpy_to_pil(to_np(expected)[None])[0], dtype=np.float32
    )
    assert np.abs(image - expected).mean() < threshold


def batched(inputs: dict, batch_size: int) -> dict:
    """diffusers' batching of ``batch_params``: prompts of unequal length, the last one very long."""
    out = dict(inputs)
    prompt = inputs["prompt"]
    out["prompt"] = [prompt[: len(prompt) // i] for i in range(1, batch_size + 1)]
    out["prompt"][-1] = 100 * "very long"
    out["generator"] = [torch.Generator("cpu").manual_seed(i) for i in range(batch_size)]
    return out


# ---- PipelineTesterMixin ------------------------------------------------------------------------------


def test_pipeline_call_signature():
    parameters = inspect.signature(FluxFillPipeline.__call__).parameters
    assert not PARAMS - set(parameters)
    optional = {name for name, p in parameters.items() if p.default is not inspect.Parameter.empty}
    assert not REQUIRED_OPTIONAL_PARAMS - optional
    theirs = inspect.signature(diffusers.FluxFillPipeline.__call__).parameters
    assert [(n, p.default) for n, p in parameters.items()] == [(n, p.default) for n, p in theirs.items()]


def test_components_function():
    components = dummy_components()
    pipe = FluxFillPipeline(**components)
    assert set(pipe.components) == set(components)
    assert FluxFillPipeline._optional_components == diffusers.FluxFillPipeline._optional_components == []


def test_save_load_local(tmp_path):
    ours, theirs = pipelines()
    output = ours(**dummy_inputs()).images
    assert ours.describe()["transformer_path"] == "engine"  # these components run on the engine
    assert max_diff(output, theirs(**dummy_inputs()).images) < 1e-4
    ours.save_pretrained(tmp_path, safe_serialization=False)
    records: list[str] = []
    handler = logging.Handler(logging.INFO)
    handler.emit = lambda record: records.append(record.getMessage())
    logger = logging.getLogger("diffusers.pipelines.pipeline_utils")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        loaded = FluxFillPipeline.from_pretrained(tmp_path)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    assert type(loaded) is FluxFillPipeline
    log = "\n".join(records)
    assert all(name in log for name in loaded.components)
    loaded.to(DEVICE).set_progress_bar_config(disable=True)
    assert max_diff(loaded(**dummy_inputs()).images, output) < 5e-4


def test_inference_batch_consistent():
    ours, _ = pipelines()
    inputs = dummy_inputs()
    inputs["generator"] = torch.Generator("cpu").manual_seed(0)
    assert len(ours(**batched(inputs, 2)).images) == 2


def test_inference_batch_single_identical():
    # The Fill file runs diffusers' check with expected_max_diff=1e-3 and its default batch of 2.
    ours, theirs = pipelines()
    inputs = dummy_inputs()
    inputs["generator"] = torch.Generator("cpu").manual_seed(0)
    single = ours(**inputs).images
    batch = ours(**batched(inputs, 2)).images
    assert batch.shape[0] == 2
    assert max_diff(batch[0], single[0]) < 1e-3
    assert max_diff(batch, theirs(**batched(inputs, 2)).images) < 1e-4


def test_dict_tuple_outputs_equivalent():
    ours, _ = pipelines()
    output = ours(**dummy_inputs(0, "cpu"))[0]
    output_tuple = ours(**dummy_inputs(0, "cpu"), return_dict=False)[0]
    assert max_diff(output, output_tuple) < 1e-4


def test_save_load_optional_components():
    # diffusers returns at once for a pipeline without optional components: so does the Fill pipeline.
    assert not FluxFillPipeline._optional_components


def test_to_dtype():
    components = dummy_components()
    pipe = FluxFillPipeline(**components)
    modules = [c for c in components.values() if getattr(c, "dtype", None)]
    assert all(m.dtype == torch.float32 for m in modules)
    pipe.to(dtype=torch.float16)
    assert all(m.dtype == torch.float16 for m in modules)


def test_attention_slicing_forward_pass():
    ours, theirs = pipelines()
    without = ours(**dummy_inputs(0, "cpu")).images
    ours.enable_attention_slicing(slice_size=1)
    sliced_1 = ours(**dummy_inputs(0, "cpu")).images
    ours.enable_attention_slicing(slice_size=2)
    sliced_2 = ours(**dummy_inputs(0, "cpu")).images
    assert max(max_diff(sliced_1, without), max_diff(sliced_2, without)) < 1e-3
    assert_mean_pixel_difference(sliced_1[0], without[0])
    assert_mean_pixel_difference(sliced_2[0], without[0])
    assert max_diff(sliced_2, theirs(**dummy_inputs(0, "cpu")).images) < 1e-4


def test_num_images_per_prompt():
    ours, _ = pipelines()
    for batch_size in (1, 2):
        for num_images_per_prompt in (1, 2):
            inputs = dummy_inputs()
            inputs["prompt"] = batch_size * [inputs["prompt"]]
            images = ours(**inputs, num_images_per_prompt=num_images_per_prompt)[0]
            assert images.shape[0] == batch_size * num_images_per_prompt


def test_cfg():
    ours, theirs = pipelines()
    inputs = dummy_inputs()
    inputs["guidance_scale"] = 1.0
    no_cfg = ours(**inputs)[0]
    inputs["guidance_scale"] = 7.5
    inputs["generator"] = torch.Generator("cpu").manual_seed(0)
    cfg = ours(**inputs)[0]
    assert cfg.shape == no_cfg.shape
    inputs["generator"] = torch.Generator("cpu").manual_seed(0)
    assert max_diff(cfg, theirs(**inputs)[0]) < 1e-4


def test_callback_inputs():
    ours, _ = pipelines()
    assert ours._callback_tensor_inputs == diffusers.FluxFillPipeline._callback_tensor_inputs

    def subset(pipe, i, t, callback_kwargs):
        assert all(name in pipe._callback_tensor_inputs for name in callback_kwargs)
        return callback_kwargs

    def everything(pipe, i, t, callback_kwargs):
        assert all(name in callback_kwargs for name in pipe._callback_tensor_inputs)
        return subset(pipe, i, t, callback_kwargs)

    def zero_at_the_end(pipe, i, t, callback_kwargs):
        if i == pipe.num_timesteps - 1:
            callback_kwargs["latents"] = torch.zeros_like(callback_kwargs["latents"])
        return callback_kwargs

    inputs = dummy_inputs()
    inputs["output_type"] = "latent"
    ours(**inputs, callback_on_step_end=subset, callback_on_step_end_tensor_inputs=["latents"])
    for callback in (everything, zero_at_the_end):
        inputs["generator"] = torch.Generator("cpu").manual_seed(0)
        output = ours(
            **inputs,
            callback_on_step_end=callback,
            callback_on_step_end_tensor_inputs=ours._callback_tensor_inputs,
        )[0]
    assert output.abs().sum() == 0


def test_callback_cfg():
    ours, _ = pipelines()

    def increase_guidance(pipe, i, t, callback_kwargs):
        pipe._guidance_scale += 1.0
        return callback_kwargs

    inputs = dummy_inputs()
    inputs["guidance_scale"] = 2.0
    ours(
        **inputs,
        callback_on_step_end=increase_guidance,
        callback_on_step_end_tensor_inputs=ours._callback_tensor_inputs,
    )
    assert ours.guidance_scale == inputs["guidance_scale"] + ours.num_timesteps


def test_serialization_with_variants(tmp_path):
    pipe = FluxFillPipeline(**dummy_components())
    models = [name for name, c in pipe.components.items() if isinstance(c, torch.nn.Module)]
    pipe.save_pretrained(tmp_path, variant="fp16", safe_serialization=False)
    config = json.loads((tmp_path / "model_index.json").read_text())
    for name in models:
        folder = tmp_path / name
        assert folder.is_dir() and name in config
        assert any(f.split(".")[1].startswith("fp16") for f in os.listdir(folder))


def test_loading_with_variants(tmp_path):
    pipe = FluxFillPipeline(**dummy_components())
    pipe.save_pretrained(tmp_path, variant="fp16", safe_serialization=False)
    loaded = FluxFillPipeline.from_pretrained(tmp_path, variant="fp16")
    for name, component in pipe.components.items():
        if not isinstance(component, torch.nn.Module):
            continue
        loaded_parameters = dict(loaded.components[name].named_parameters())
        for key, parameter in component.named_parameters():
            if key in loaded_parameters:  # tied weights are not saved with variants (transformers v5)
                assert torch.equal(parameter, loaded_parameters[key])


def test_loading_with_incorrect_variants_raises_error(tmp_path):
    FluxFillPipeline(**dummy_components()).save_pretrained(tmp_path, safe_serialization=False)
    with pytest.raises(ValueError, match="You are trying to load the model files of the `variant=fp16`"):
        FluxFillPipeline.from_pretrained(tmp_path, variant="fp16")


def test_encode_prompt_works_in_isolation():
    components = dummy_components()
    text_only = {k: (v if "text" in k or "tokenizer" in k else None) for k, v in components.items()}
    encoder = FluxFillPipeline(**text_only).to(DEVICE)
    inputs = dummy_inputs()
    with torch.no_grad():
        prompt_embeds, pooled_prompt_embeds, _ = encoder.encode_prompt(
            prompt=inputs.pop("prompt"),
            prompt_2=None,
            device=torch.device(DEVICE),
            max_sequence_length=inputs.pop("max_sequence_length"),
        )
    no_text = {k: (None if "text" in k or "tokenizer" in k else v) for k, v in components.items()}
    pipe = FluxFillPipeline(**no_text).to(DEVICE)
    pipe.set_progress_bar_config(disable=True)
    output = pipe(**inputs, prompt_embeds=prompt_embeds, pooled_prompt_embeds=pooled_prompt_embeds)[0]
    full, theirs = pipelines(components)
    expected = full(**dummy_inputs())[0]
    assert np.allclose(output, expected, atol=1e-4, rtol=1e-4)
    assert max_diff(expected, theirs(**dummy_inputs())[0]) < 1e-4


def test_layerwise_casting_inference():
    ours, theirs = pipelines()
    ours.to(DEVICE, dtype=torch.bfloat16)
    ours.transformer.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.bfloat16)
    output = ours(**dummy_inputs())[0]
    assert np.isfinite(output).all()
    assert ours.describe()["transformer_path"] == "diffusers"
    assert max_diff(output, theirs(**dummy_inputs())[0]) < 1e-4  # the same components: diffusers' numerics


@pytest.mark.parametrize(
    "offload",
    [{"offload_type": "block_level", "num_blocks_per_group": 1}, {"offload_type": "leaf_level"}],
    ids=["block-level", "leaf-level"],
)
def test_group_offloading_inference(offload):
    """diffusers runs this on an accelerator; here the CPU is the onload device (the hooks still run)."""
    torch.manual_seed(0)
    expected = pipelines()[0](**dummy_inputs())[0]
    torch.manual_seed(0)
    pipe, theirs = pipelines()
    for name in ("text_encoder", "text_encoder_2", "transformer"):
        component = getattr(pipe, name)
        if hasattr(component, "enable_group_offload"):
            component.enable_group_offload(torch.device(DEVICE), **offload)
        else:
            apply_group_offloading(component, onload_device=torch.device(DEVICE), **offload)
        hooks = [m._diffusers_hook for m in component.modules() if hasattr(m, "_diffusers_hook")]
        assert hooks and all(h.get_hook("group_offloading") is not None for h in hooks)
    torch.manual_seed(0)
    output = pipe(**dummy_inputs())[0]
    assert np.allclose(expected, output, atol=1e-4)
    assert max_diff(output, theirs(**dummy_inputs())[0]) < 1e-4


def test_dtype_dict(tmp_path):
    components = dummy_components()
    FluxFillPipeline(**components).save_pretrained(tmp_path, safe_serialization=False)
    first = next(iter(components))
    dtypes = {first: torch.bfloat16, "default": torch.float16}
    loaded = FluxFillPipeline.from_pretrained(tmp_path, dtype=dtypes)
    for name, component in loaded.components.items():
        if isinstance(component, torch.nn.Module) and hasattr(component, "dtype"):
            assert component.dtype == dtypes.get(name, dtypes["default"]), name


def test_dtype_alias(tmp_path):
    FluxFillPipeline(**dummy_components()).save_pretrained(tmp_path, safe_serialization=False)
    loaded = FluxFillPipeline.from_pretrained(tmp_path, dtype=torch.float16)
    for name, component in loaded.components.items():
        if isinstance(component, torch.nn.Module) and hasattr(component, "dtype"):
            assert component.dtype == torch.float16, name


def test_pipeline_with_accelerator_device_map(tmp_path):
    ours, _ = pipelines()
    inputs = dummy_inputs()
    inputs["generator"] = torch.manual_seed(0)
    output = ours(**inputs)[0]
    ours.save_pretrained(tmp_path)
    loaded = FluxFillPipeline.from_pretrained(tmp_path, device_map=DEVICE)
    loaded.set_progress_bar_config(disable=True)
    inputs["generator"] = torch.manual_seed(0)
    assert max_diff(loaded(**inputs)[0], output) < 1e-4


def test_pipeline_level_group_offloading_inference():
    components = dummy_components()
    ours, _ = pipelines(components)
    inputs = dummy_inputs()
    inputs["generator"] = torch.manual_seed(0)
    output = ours(**inputs)[0]
    pipe = FluxFillPipeline(**components)
    pipe.enable_group_offload(onload_device=DEVICE, offload_device="cpu", offload_type="leaf_level")
    pipe.set_progress_bar_config(disable=True)
    inputs["generator"] = torch.manual_seed(0)
    assert max_diff(pipe(**inputs)[0], output) < 1e-4


@pytest.mark.parametrize("twice", [False, True], ids=["once", "twice"])
def test_model_cpu_offload_forward_pass(twice):
    """diffusers runs this on an accelerator; with the CPU as the execution device the hooks still
    run and the components must stay on the CPU with ``CpuOffload`` hooks."""
    import accelerate

    components = dummy_components()
    expected = pipelines(components)[0](**dummy_inputs(0, "cpu"))[0]
    pipe = FluxFillPipeline(**components)
    pipe.set_progress_bar_config(disable=True)
    for _ in range(2 if twice else 1):
        pipe.enable_model_cpu_offload(device=DEVICE)
        assert pipe._execution_device.type == DEVICE
        torch.manual_seed(0)
        assert max_diff(pipe(**dummy_inputs(0, "cpu"))[0], expected) < 2e-4
    offloaded = {k: v for k, v in pipe.components.items() if isinstance(v, torch.nn.Module)}
    assert all(v.device.type == "cpu" for v in offloaded.values())
    assert all(
        isinstance(getattr(v, "_hf_hook", None), accelerate.hooks.CpuOffload) for v in offloaded.values()
    )
    assert pipe.describe()["transformer_path"] == "engine"


@pytest.mark.gpu(reason="diffusers' sequential offload needs an accelerator (see test_diffusers_features)")
@pytest.mark.parametrize("twice", [False, True], ids=["once", "twice"])
def test_sequential_cpu_offload_forward_pass(twice):
    import accelerate

    components = dummy_components()
    ours, theirs = pipelines(components)
    expected = ours(**dummy_inputs(0, "cpu"))[0]
    for _ in range(2 if twice else 1):
        ours.enable_sequential_cpu_offload(device=DEVICE)
        assert ours._execution_device.type == DEVICE
        torch.manual_seed(0)
        output = ours(**dummy_inputs(0, "cpu"))[0]
        assert max_diff(output, expected) < 1e-4
    assert ours.describe()["transformer_path"] == "diffusers"
    assert max_diff(output, theirs(**dummy_inputs(0, "cpu"))[0]) < 1e-4  # diffusers, same hooks
    offloaded = {k: v for k, v in ours.components.items() if isinstance(v, torch.nn.Module)}
    assert all(v.device.type == "meta" for v in offloaded.values())
    for module in offloaded.values():
        hook = module._hf_hook
        hooks = hook.hooks if isinstance(hook, accelerate.hooks.SequentialHook) else [hook]
        assert all(isinstance(h, accelerate.hooks.AlignDevicesHook) for h in hooks)


@pytest.mark.gpu(reason="float16 inference and moving between devices need an accelerator in diffusers' file")
def test_to_device_and_float16():
    components = dummy_components()
    pipe = FluxFillPipeline(**components)
    pipe.set_progress_bar_config(disable=True)
    pipe.to("cpu")
    assert not np.isnan(to_np(pipe(**dummy_inputs(0, "cpu"))[0])).any()
    pipe.to(DEVICE)
    assert all(c.device.type == DEVICE for c in components.values() if getattr(c, "device", None) is not None)
    output = pipe(**dummy_inputs())[0]
    assert not np.isnan(to_np(output)).any()
    half, theirs = pipelines(dummy_components())
    half.to(DEVICE, torch.float16)
    theirs.to(DEVICE, torch.float16)
    output_fp16 = half(**dummy_inputs())[0]
    # diffusers' bound (cosine distance to fp32 < 5e-2), for ours and against diffusers' fp16 images
    assert cosine_distance(output, output_fp16) < 5e-2
    assert cosine_distance(theirs(**dummy_inputs())[0], output_fp16) < 5e-2


def cosine_distance(a, b) -> float:
    a, b = to_np(a).flatten().astype(np.float64), to_np(b).flatten().astype(np.float64)
    return float(1.0 - np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))


# ---- the Fill file's own cases ----------------------------------------------------------------------


def test_flux_fill_different_prompts():
    ours, theirs = pipelines()
    same = ours(**dummy_inputs()).images[0]
    inputs = dummy_inputs()
    inputs["prompt_2"] = "a different prompt"
    different = ours(**inputs).images[0]
    assert np.abs(same - different).max() > 1e-6
    inputs["generator"] = torch.Generator("cpu").manual_seed(0)
    assert max_diff(different, theirs(**inputs).images[0]) < 1e-4


@pytest.mark.slow
def test_flux_image_output_shape():
    ours, theirs = pipelines()
    inputs = dummy_inputs()
    for height, width in [(32, 32), (72, 57)]:
        expected = (
            height - height % (ours.vae_scale_factor * 2),
            width - width % (ours.vae_scale_factor * 2),
        )
        inputs.update({"height": height, "width": width, "generator": torch.Generator("cpu").manual_seed(0)})
        image = ours(**inputs).images[0]
        assert image.shape[:2] == expected
        inputs["generator"] = torch.Generator("cpu").manual_seed(0)
        assert max_diff(image, theirs(**inputs).images[0]) < 1e-4


def test_the_dummy_components_are_the_fill_files_shapes():
    pipe = FluxFillPipeline(**dummy_components())
    assert pipe.vae_scale_factor == 1 and pipe.transformer.config.in_channels == 20
    assert max(pipe.tokenizer.get_vocab().values()) < pipe.text_encoder.config.vocab_size
    assert max(pipe.tokenizer_2.get_vocab().values()) < pipe.text_encoder_2.config.vocab_size


# ---- diffusers' file itself, through scripts/run_diffusers_fill_tests.py ---------------------------------

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "run_diffusers_fill_tests.py"


@pytest.mark.slow
def test_the_scripts_stand_ins_load_offline(tmp_path):
    """The script's redirect: the three Hub loads of diffusers' Fill file read local stand-ins."""
    code = f"""
import os, sys
sys.path.insert(0, {str(SCRIPT.parent)!r})
os.environ["FLUXFILL_LOCAL_HUB"] = {str(tmp_path)!r}
os.environ["HF_HUB_OFFLINE"] = "1"
import run_diffusers_fill_tests as runner
from transformers import AutoConfig, AutoTokenizer, CLIPTokenizer, T5EncoderModel
runner.redirect_hub()
config = AutoConfig.from_pretrained("hf-internal-testing/tiny-random-t5")
t5 = AutoTokenizer.from_pretrained("hf-internal-testing/tiny-random-t5")
clip = CLIPTokenizer.from_pretrained("hf-internal-testing/tiny-random-clip")
ids = t5("A painting of a squirrel", return_tensors="pt").input_ids
T5EncoderModel(config)(ids)
assert max(clip("A painting").input_ids) < 1000 and config.d_model == 32
try:
    AutoConfig.from_pretrained("hf-internal-testing/tiny-random-bert")
except OSError as error:
    assert "no stand-in" in str(error)
else:
    raise AssertionError("an unknown Hub id was loaded")
print("ok")
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-2000:]


@pytest.mark.skipif(
    not os.environ.get("FLUXFILL_DIFFUSERS_CHECKOUT"),
    reason="set FLUXFILL_DIFFUSERS_CHECKOUT to a diffusers checkout (needs parameterized, requests-mock)",
)
def test_diffusers_own_fill_file_passes():
    checkout = os.environ["FLUXFILL_DIFFUSERS_CHECKOUT"]
    command = [sys.executable, str(SCRIPT), checkout, "-q", "-p", "no:cacheprovider"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stdout[-4000:]
    assert " failed" not in result.stdout.splitlines()[-1]
