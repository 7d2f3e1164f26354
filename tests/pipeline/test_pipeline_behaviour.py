"""Pipeline behaviour that diffusers' ``PipelineTesterMixin`` checks, on our pipeline, plus engine state.

Saving and loading, ``from_pipe``, batch consistency, output shapes and types, ``return_dict``, callbacks,
progress bars, ``configure``, ``to``, and that the engine's cached state (fused transformer, prompt cache)
never makes a call differ from what diffusers would give for the pipeline's current modules.
"""

from __future__ import annotations

import diffusers
import numpy as np
import PIL.Image
import pytest
import torch
from diffusers.pipelines.flux.pipeline_output import FluxPipelineOutput
from torch import nn

from fluxfill_engine import EngineConfig, FluxFillPipeline
from fluxfill_engine.testing.tiny import tiny_components
from tests.support import helpers

# ---- save / load / from_pipe -------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("run_before_saving", [True, False], ids=["fused", "unfused"])
def test_save_and_reload(pipe, tmp_path, run_before_saving):
    before = pipe(**helpers.call_kwargs()).images if run_before_saving else None
    pipe.save_pretrained(tmp_path)
    if before is None:
        before = pipe(**helpers.call_kwargs()).images
    assert (tmp_path / "model_index.json").is_file()

    loaded = FluxFillPipeline.from_pretrained(tmp_path)
    assert type(loaded) is FluxFillPipeline
    assert loaded.engine_config == EngineConfig.preset("reference")
    helpers.disable_progress(loaded)
    helpers.assert_close(loaded(**helpers.call_kwargs()).images, before)


def test_diffusers_loads_a_folder_saved_by_our_pipeline(pipe, tmp_path):
    before = pipe(**helpers.call_kwargs()).images
    pipe.save_pretrained(tmp_path)
    loaded = diffusers.FluxFillPipeline.from_pretrained(tmp_path)
    assert type(loaded) is diffusers.FluxFillPipeline
    helpers.disable_progress(loaded)
    helpers.assert_close(loaded(**helpers.call_kwargs()).images, before)


def test_our_pipeline_loads_a_folder_saved_by_diffusers(pipes, tmp_path):
    reference, _ = pipes
    expected = reference(**helpers.call_kwargs()).images
    reference.save_pretrained(tmp_path)
    loaded = FluxFillPipeline.from_pretrained(tmp_path)
    helpers.disable_progress(loaded)
    helpers.assert_close(loaded(**helpers.call_kwargs()).images, expected)


@pytest.mark.parametrize("source", ["diffusers", "ours"])
def test_from_pipe(pipes, source):
    reference, ours = pipes
    expected = reference(**helpers.call_kwargs()).images
    new = FluxFillPipeline.from_pipe(reference if source == "diffusers" else ours)
    assert type(new) is FluxFillPipeline
    assert new.transformer is reference.transformer
    helpers.disable_progress(new)
    helpers.assert_close(new(**helpers.call_kwargs()).images, expected)


def test_from_pipe_with_model_components_passed_explicitly(pipes):
    reference, _ = pipes
    expected = reference(**helpers.call_kwargs()).images
    new = FluxFillPipeline.from_pipe(reference, vae=reference.vae, transformer=reference.transformer)
    assert type(new) is FluxFillPipeline
    assert new.text_encoder is reference.text_encoder
    helpers.disable_progress(new)
    helpers.assert_close(new(**helpers.call_kwargs()).images, expected)


def test_diffusers_from_pipe_of_our_pipeline(pipes):
    reference, ours = pipes
    expected = ours(**helpers.call_kwargs()).images
    new = diffusers.FluxFillPipeline.from_pipe(ours)
    assert type(new) is diffusers.FluxFillPipeline
    helpers.disable_progress(new)
    helpers.assert_close(new(**helpers.call_kwargs()).images, expected)


# ---- batching ------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("strength", [1.0, 0.75])
def test_batch_consistency(pipe, strength):
    """A batch of 2 identical requests with generators (s0, s1) == two single runs seeded s0 and s1.

    The image and mask are batched too: with one image and a list of generators, diffusers (and so the
    engine) draw the init image's VAE sample from generator 0 only, which shifts generator 1's stream.
    """
    image, mask = helpers.image_tensor(), helpers.mask_tensor()
    common = dict(strength=strength, num_inference_steps=4)
    batched = pipe(
        **helpers.call_kwargs(
            seed=[21, 22],
            prompt=[helpers.PROMPT] * 2,
            image=torch.cat([image, image]),
            mask_image=torch.cat([mask, mask]),
            **common,
        )
    ).images
    singles = [
        pipe(**helpers.call_kwargs(seed=s, image=image, mask_image=mask, **common)).images[0]
        for s in (21, 22)
    ]
    assert batched.shape[0] == 2
    for i in range(2):
        helpers.assert_close(batched[i], singles[i])
    assert helpers.max_abs_diff(batched[0], batched[1]) > 1e-3  # the seeds matter


def test_num_images_per_prompt_with_one_generator_repeats_prompts(pipe):
    images = pipe(**helpers.call_kwargs(prompt=["a cat", "a dog"], num_images_per_prompt=2)).images
    assert images.shape[0] == 4
    # every image gets its own noise
    for i in range(4):
        for j in range(i + 1, 4):
            assert helpers.max_abs_diff(images[i], images[j]) > 1e-3


@pytest.mark.parametrize("num_prompts", [1, 2])
@pytest.mark.parametrize("num_images_per_prompt", [1, 2, 3])
def test_num_images_per_prompt_shapes(pipe, num_prompts, num_images_per_prompt):
    prompt = helpers.PROMPT if num_prompts == 1 else ["a cat", "a dog"]
    images = pipe(
        **helpers.call_kwargs(
            prompt=prompt, num_images_per_prompt=num_images_per_prompt, num_inference_steps=1
        )
    ).images
    assert images.shape == (num_prompts * num_images_per_prompt, helpers.HEIGHT, helpers.WIDTH, 3)


# ---- outputs -------------------------------------------------------------------------------------------


def test_output_type_pil(pipe):
    images = pipe(**helpers.call_kwargs(output_type="pil", num_images_per_prompt=2)).images
    assert isinstance(images, list) and len(images) == 2
    for image in images:
        assert isinstance(image, PIL.Image.Image)
        assert image.size == (helpers.WIDTH, helpers.HEIGHT) and image.mode == "RGB"


def test_output_type_np(pipe):
    images = pipe(**helpers.call_kwargs(output_type="np", num_images_per_prompt=2)).images
    assert isinstance(images, np.ndarray)
    assert images.shape == (2, helpers.HEIGHT, helpers.WIDTH, 3) and images.dtype == np.float32
    assert images.min() >= 0 and images.max() <= 1


def test_output_type_pt(pipe):
    images = pipe(**helpers.call_kwargs(output_type="pt", num_images_per_prompt=2)).images
    assert isinstance(images, torch.Tensor)
    assert images.shape == (2, 3, helpers.HEIGHT, helpers.WIDTH) and images.dtype == torch.float32
    assert images.min() >= 0 and images.max() <= 1


def test_output_type_latent(pipe):
    latents = pipe(**helpers.call_kwargs(output_type="latent", num_images_per_prompt=2)).images
    seq_len = (helpers.HEIGHT // 16) * (helpers.WIDTH // 16)
    assert isinstance(latents, torch.Tensor)
    assert latents.shape == (2, seq_len, 64) and torch.isfinite(latents).all()


def test_output_types_agree(pipe):
    as_np = pipe(**helpers.call_kwargs(output_type="np")).images
    as_pt = pipe(**helpers.call_kwargs(output_type="pt")).images
    as_pil = pipe(**helpers.call_kwargs(output_type="pil")).images
    helpers.assert_close(as_pt.permute(0, 2, 3, 1), as_np, atol=1e-6)
    assert helpers.max_abs_diff(as_pil, as_np) <= 0.5 / 255 + 1e-6  # 8-bit rounding only


def test_return_dict(pipe):
    output = pipe(**helpers.call_kwargs())
    assert isinstance(output, FluxPipelineOutput)
    as_tuple = pipe(**helpers.call_kwargs(), return_dict=False)
    assert isinstance(as_tuple, tuple) and len(as_tuple) == 1
    helpers.assert_close(as_tuple[0], output.images, atol=0)


def test_repeated_calls_are_deterministic(pipe):
    first = pipe(**helpers.call_kwargs()).images
    second = pipe(**helpers.call_kwargs()).images
    helpers.assert_close(first, second, atol=0)
    assert helpers.max_abs_diff(first, pipe(**helpers.call_kwargs(seed=1)).images) > 1e-3


# ---- callbacks -----------------------------------------------------------------------------------------


def test_callback_receives_the_requested_tensor_inputs(pipe):
    assert set(pipe._callback_tensor_inputs) == {"latents", "prompt_embeds"}
    calls = []

    def callback(p, step, timestep, kwargs):
        assert p is pipe
        calls.append((step, float(timestep), {k: tuple(v.shape) for k, v in kwargs.items()}))
        return kwargs

    pipe(
        **helpers.call_kwargs(
            num_inference_steps=3,
            num_images_per_prompt=2,
            callback_on_step_end=callback,
            callback_on_step_end_tensor_inputs=list(pipe._callback_tensor_inputs),
        )
    )
    seq_len = (helpers.HEIGHT // 16) * (helpers.WIDTH // 16)
    assert [step for step, _, _ in calls] == [0, 1, 2]
    timesteps = [t for _, t, _ in calls]
    assert timesteps == sorted(timesteps, reverse=True) and timesteps[0] == pytest.approx(1000.0)
    for _, _, shapes in calls:
        assert shapes == {"latents": (2, seq_len, 64), "prompt_embeds": (2, helpers.MAX_SEQ, 32)}


def test_callback_gets_only_the_listed_inputs(pipe):
    keys = []

    def callback(p, step, timestep, kwargs):
        keys.append(sorted(kwargs))
        return {}

    pipe(**helpers.call_kwargs(callback_on_step_end=callback))
    assert keys == [["latents"], ["latents"]]  # the default is ["latents"]
    keys.clear()
    pipe(
        **helpers.call_kwargs(
            callback_on_step_end=callback, callback_on_step_end_tensor_inputs=["prompt_embeds"]
        )
    )
    assert keys == [["prompt_embeds"], ["prompt_embeds"]]


def test_callback_returning_its_inputs_changes_nothing(pipe):
    expected = pipe(**helpers.call_kwargs()).images
    actual = pipe(
        **helpers.call_kwargs(
            callback_on_step_end=lambda p, i, t, kwargs: kwargs,
            callback_on_step_end_tensor_inputs=["latents", "prompt_embeds"],
        )
    ).images
    helpers.assert_close(actual, expected, atol=0)


def test_callback_with_unknown_tensor_input_raises(pipe):
    with pytest.raises(ValueError, match="callback_on_step_end_tensor_inputs"):
        pipe(
            **helpers.call_kwargs(
                callback_on_step_end=lambda *a: {}, callback_on_step_end_tensor_inputs=["noise"]
            )
        )


# ---- progress bar, configure, to -----------------------------------------------------------------------


def test_set_progress_bar_config(pipe, capsys):
    capsys.readouterr()
    pipe(**helpers.call_kwargs())
    assert "denoising-now" not in capsys.readouterr().err

    pipe.set_progress_bar_config(disable=False, desc="denoising-now")
    pipe(**helpers.call_kwargs(num_inference_steps=3))
    err = capsys.readouterr().err
    assert "denoising-now" in err and "3/3" in err

    pipe.set_progress_bar_config(disable=True)
    pipe(**helpers.call_kwargs())
    assert capsys.readouterr().err == ""


def test_configure_returns_the_pipeline(pipe):
    before = pipe(**helpers.call_kwargs()).images
    config = EngineConfig.preset("reference")
    assert pipe.configure(config) is pipe
    assert pipe.engine_config == config
    helpers.assert_close(pipe(**helpers.call_kwargs()).images, before, atol=0)
    assert pipe.configure(EngineConfig(prompt_cache_size=0)).engine_config.prompt_cache_size == 0
    helpers.assert_close(pipe(**helpers.call_kwargs()).images, before, atol=0)


def test_configure_rejects_other_objects(pipe):
    with pytest.raises(TypeError, match="config"):
        pipe.configure({"attention": "sdpa"})


def test_to_cpu_after_a_call(pipe):
    before = pipe(**helpers.call_kwargs()).images
    assert pipe.to("cpu") is pipe
    helpers.assert_close(pipe(**helpers.call_kwargs()).images, before, atol=0)
    assert pipe.to(torch.device("cpu"), torch.float32) is pipe
    helpers.assert_close(pipe(**helpers.call_kwargs()).images, before, atol=0)


def _engine_tensors_the_diffusers_tree_does_not_move(pipe):
    """Engine parameters/buffers a ``.to()`` of the diffusers transformer would leave behind.

    ``Module.to`` moves what its module tree owns: tensors of modules in the tree, and Parameter objects
    of the tree (updated in place). Anything else the engine holds would stay on the old device.
    """
    tree_modules = {id(m) for m in pipe.transformer.modules()}
    tree_params = {id(p) for p in pipe.transformer.parameters()}
    left = []
    for name, module in pipe.engine_transformer().named_modules():
        if id(module) in tree_modules:
            continue
        left += [f"{name}.{k}" for k, p in module._parameters.items() if id(p) not in tree_params]
        left += [f"{name}.{k}" for k in module._buffers]
    return left


@pytest.mark.slow
@pytest.mark.parametrize("quant", ["none", "int8-weight", "int8"])
def test_model_cpu_offload_runs_the_engine(components, quant):
    """``enable_model_cpu_offload`` (executing on the CPU here: the hooks run, nothing moves).

    Unquantized, the engine's fused QKV is not part of the diffusers tree the hook moves, so it is
    dropped after every call; a quantized engine is made of the diffusers tree's own modules and kept.
    """
    config = EngineConfig(quant=quant)
    expected = FluxFillPipeline(**tiny_components()).configure(config)
    helpers.disable_progress(expected)
    expected = expected(**helpers.call_kwargs()).images
    pipe = FluxFillPipeline(**components)
    helpers.disable_progress(pipe)
    pipe.enable_model_cpu_offload(device="cpu")
    pipe.configure(config)
    for _ in range(2):
        helpers.assert_close(pipe(**helpers.call_kwargs()).images, expected, atol=0)
        kept = pipe.runtime.current
        assert (kept is not None) == (quant != "none")
    if quant != "none":
        assert _engine_tensors_the_diffusers_tree_does_not_move(pipe) == []


def test_unquantized_engine_holds_fused_weights_outside_the_diffusers_tree(pipe):
    # Why the unquantized engine is dropped before a move (the check above is not vacuous).
    left = _engine_tensors_the_diffusers_tree_does_not_move(pipe)
    assert "double_blocks.0.img_qkv.weight" in left and "single_blocks.0.qkv_mlp.weight" in left


def test_quantization_is_resolved_for_the_offload_execution_device(pipe, monkeypatch):
    seen = []

    def fake_resolve(mode, backend, device):
        seen.append(device)
        raise ValueError("stop")

    monkeypatch.setattr("fluxfill_engine.runtime.resolve", fake_resolve)
    pipe.enable_model_cpu_offload(device="cpu")
    pipe.transformer._hf_hook.execution_device = torch.device("meta")  # stands for "cuda"
    with pytest.raises(ValueError, match="stop"):
        pipe.configure(EngineConfig(quant="fp8"))
    assert seen == [torch.device("meta")]  # not the CPU the weights wait on


def test_attention_and_compile_target_the_offload_execution_device(pipe, monkeypatch):
    # configure() builds the engine while offloaded weights wait on the CPU: the attention backend
    # (auto timing, xformers) and compilation must still be chosen for the device it will run on.
    seen = {}
    monkeypatch.setattr(
        "fluxfill_engine.model.make_attention",
        lambda name, device, fused, fp8=False: seen.update(attention=device),
    )
    monkeypatch.setattr(
        "fluxfill_engine.model.compile_blocks", lambda blocks, mode, dyn, device: seen.update(compile=device)
    )
    pipe.enable_model_cpu_offload(device="cpu")
    pipe.transformer._hf_hook.execution_device = torch.device("meta")  # stands for "cuda"
    pipe.configure(EngineConfig(quant="int8-weight", compile=True))
    assert seen == {"attention": torch.device("meta"), "compile": torch.device("meta")}


def test_engine_transformer_is_reused_between_calls(pipe):
    pipe(**helpers.call_kwargs())
    fill = pipe.engine_transformer()
    pipe(**helpers.call_kwargs(prompt="another prompt"))
    assert pipe.engine_transformer() is fill


# ---- the engine follows changes to the diffusers modules -----------------------------------------------


def _replace_to_q_parameter(transformer):
    to_q = transformer.transformer_blocks[0].attn.to_q
    to_q.weight = nn.Parameter(to_q.weight.detach() * 1.5)


def _replace_proj_mlp_data(transformer):
    proj_mlp = transformer.single_transformer_blocks[1].proj_mlp
    proj_mlp.weight.data = proj_mlp.weight.detach() * -1.0


def _edit_fused_weight_in_place(transformer):
    transformer.single_transformer_blocks[0].attn.to_v.weight.mul_(2.0)


def _edit_x_embedder_in_place(transformer):
    transformer.x_embedder.weight.mul_(2.0)


def _load_other_state_dict(transformer):
    transformer.load_state_dict(tiny_components(1)["transformer"].state_dict())


def _load_other_state_dict_assign(transformer):
    transformer.load_state_dict(tiny_components(1)["transformer"].state_dict(), assign=True)


def _replace_norm_parameter(transformer):
    norm_q = transformer.transformer_blocks[0].attn.norm_q
    norm_q.weight = nn.Parameter(norm_q.weight.detach() * 3.0 + 0.5)


@pytest.mark.parametrize(
    "change",
    [
        _replace_to_q_parameter,
        _replace_proj_mlp_data,
        _edit_fused_weight_in_place,
        _edit_x_embedder_in_place,
        _load_other_state_dict,
        _load_other_state_dict_assign,
        _replace_norm_parameter,
    ],
    ids=lambda f: f.__name__.strip("_"),
)
def test_engine_follows_changes_to_the_transformer(pipes, change):
    reference, ours = pipes
    before = ours(**helpers.call_kwargs()).images  # builds and caches the engine's transformer
    with torch.no_grad():
        change(ours.transformer)
    expected = reference(**helpers.call_kwargs()).images
    assert helpers.max_abs_diff(expected, before) > 1e-3  # the change matters
    helpers.assert_close(ours(**helpers.call_kwargs()).images, expected)


def test_prompt_cache_serves_repeated_prompts(pipe):
    first = pipe(**helpers.call_kwargs())
    hits = pipe.prompt_cache.hits
    second = pipe(**helpers.call_kwargs())
    assert pipe.prompt_cache.hits == hits + 1
    helpers.assert_close(first.images, second.images, atol=0)


def test_prompt_cache_is_not_corrupted_by_in_place_edits(pipe):
    expected = pipe(**helpers.call_kwargs()).images
    embeds, pooled, _ = pipe.encode_prompt(helpers.PROMPT, max_sequence_length=helpers.MAX_SEQ)
    embeds.mul_(0.0)
    pooled.mul_(0.0)

    def zero_prompt_embeds(p, step, timestep, kwargs):
        kwargs["prompt_embeds"].mul_(0.0)
        kwargs["latents"].mul_(1.0)
        return {}

    pipe(
        **helpers.call_kwargs(
            callback_on_step_end=zero_prompt_embeds,
            callback_on_step_end_tensor_inputs=["latents", "prompt_embeds"],
        )
    )
    helpers.assert_close(pipe(**helpers.call_kwargs()).images, expected, atol=0)


@pytest.mark.slow
@pytest.mark.parametrize("encoder", ["text_encoder", "text_encoder_2"])
def test_prompt_cache_follows_text_encoder_weights(pipes, encoder):
    reference, ours = pipes
    before = ours(**helpers.call_kwargs()).images  # fills the prompt cache
    with torch.no_grad():
        getattr(ours, encoder).load_state_dict(tiny_components(1)[encoder].state_dict())
    expected = reference(**helpers.call_kwargs()).images
    assert helpers.max_abs_diff(expected, before) > 1e-3
    helpers.assert_close(ours(**helpers.call_kwargs()).images, expected)


def test_to_clears_the_prompt_cache(pipe):
    pipe(**helpers.call_kwargs())
    assert len(pipe.prompt_cache) == 1
    pipe.to("cpu")
    assert len(pipe.prompt_cache) == 0


# ---- a failed call leaves no trace ---------------------------------------------------------------------


def _raise_in_callback(p, step, timestep, kwargs):
    raise RuntimeError("callback failed")


BAD_CALLS = {
    "nan-mask": dict(mask_image=torch.full((1, 1, 32, 48), float("nan"))),
    "generator-list-length": dict(seed=[1, 2, 3]),
    "no-steps-left": dict(strength=0.0),
    "output-type": dict(output_type="jpeg"),
    "latents-shape": dict(latents=torch.zeros(1, 5, 64)),
    "joint-attention-kwargs": dict(joint_attention_kwargs={"ip_adapter_image_embeds": 1}),
    "callback-raises": dict(callback_on_step_end=_raise_in_callback),
    "other-prompt-then-error": dict(prompt="a dog", guidance_scale=float("inf")),
}


@pytest.mark.parametrize("bad", list(BAD_CALLS.values()), ids=list(BAD_CALLS))
def test_rejected_call_leaves_the_pipeline_as_it_was(pipe, bad):
    good = pipe(**helpers.call_kwargs(num_images_per_prompt=2)).images
    with pytest.raises((ValueError, TypeError, RuntimeError)):
        pipe(**helpers.call_kwargs(**bad))
    helpers.assert_close(pipe(**helpers.call_kwargs(num_images_per_prompt=2)).images, good, atol=0)


def test_interrupted_call_does_not_interrupt_the_next(pipe):
    good = pipe(**helpers.call_kwargs(num_inference_steps=3)).images

    def interrupt(p, step, timestep, kwargs):
        p._interrupt = True
        return {}

    interrupted = pipe(**helpers.call_kwargs(num_inference_steps=3, callback_on_step_end=interrupt)).images
    assert helpers.max_abs_diff(interrupted, good) > 1e-3
    helpers.assert_close(pipe(**helpers.call_kwargs(num_inference_steps=3)).images, good, atol=0)
