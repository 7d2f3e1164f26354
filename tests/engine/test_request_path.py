"""One typed request path: PipelineCall -> FluxFillPipeline.generate -> PipelineResult, read by the
drop-in, the engine and the benchmark alike.

The drop-in's call signature is diffusers' and each of its arguments a ``PipelineCall`` field; the stages
run in order; threads sharing a pipeline each get their own stats; a refused call runs no stage."""

import copy
import dataclasses
import inspect
import threading

import diffusers
import numpy as np
import pytest

from fluxfill_engine import FluxFillPipeline, PipelineCall, PipelineResult
from fluxfill_engine.call import STAGES
from tests.support import helpers


def test_the_call_signature_is_diffusers_and_every_argument_is_a_pipeline_call_field():
    ours = inspect.signature(FluxFillPipeline.__call__).parameters
    theirs = inspect.signature(diffusers.FluxFillPipeline.__call__).parameters
    assert list(ours) == list(theirs)
    for name, parameter in theirs.items():
        assert ours[name].default == parameter.default, name
    fields = {f.name: f for f in dataclasses.fields(PipelineCall)}
    assert set(ours) - {"self", "return_dict"} == set(fields)
    defaults = PipelineCall()
    for name in fields:
        assert getattr(defaults, name) == ours[name].default, name


def test_generate_returns_what_the_drop_in_returns_plus_latents_stats_and_timings(pipe):
    kwargs = helpers.call_kwargs(num_images_per_prompt=2)
    expected = pipe(**kwargs).images
    result = pipe.generate(PipelineCall(**helpers.call_kwargs(num_images_per_prompt=2)))
    assert isinstance(result, PipelineResult)
    helpers.assert_close(result.images, expected, atol=0)
    assert result.latents.shape == (2, (helpers.HEIGHT // 16) * (helpers.WIDTH // 16), 64)
    assert set(result.timings) == {*STAGES, "total"} and all(t >= 0 for t in result.timings.values())
    assert result.timings["total"] >= sum(result.timings[stage] for stage in STAGES) * 0.99
    stats = result.stats
    assert (stats["width"], stats["height"]) == (helpers.WIDTH, helpers.HEIGHT)
    assert stats["num_steps"] == stats["steps_full"] == helpers.STEPS and stats["steps_cached"] == 0
    assert stats["prompt_cache_hit"] is True  # the drop-in call before encoded this prompt
    assert pipe.last_stats["prompt_cache_hit"] is False  # that call's own stats


def test_stage_hook_order(pipe):
    seen = []
    pipe.generate(
        PipelineCall(**helpers.call_kwargs(num_inference_steps=3)),
        on_stage=lambda name, step=None, total=None: seen.append((name, step, total)),
    )
    names = [name for name, _, _ in seen]
    assert names == [
        "total_start",
        "preprocess_start",
        "text_encode_start",
        "text_encode_end",
        "vae_encode_start",
        "vae_encode_end",
        "preprocess_end",
        "denoise_start",
        "step",
        "step",
        "step",
        "denoise_end",
        "decode_start",
        "decode_end",
        "total_end",
    ]
    assert [(step, total) for name, step, total in seen if name == "step"] == [(0, 3), (1, 3), (2, 3)]


def test_given_prompt_embeddings_report_no_cache_use(pipe):
    embeds, pooled, _ = pipe.encode_prompt(helpers.PROMPT, max_sequence_length=helpers.MAX_SEQ)
    call = PipelineCall(**helpers.call_kwargs(prompt=None, prompt_embeds=embeds, pooled_prompt_embeds=pooled))
    assert pipe.generate(call).stats["prompt_cache_hit"] is None


@pytest.mark.slow
def test_threads_sharing_a_pipeline_each_get_their_own_stats(pipe):
    steps = [1, 2, 3, 4]
    sequential = {n: pipe.generate(PipelineCall(**helpers.call_kwargs(num_inference_steps=n))) for n in steps}
    results: dict[int, PipelineResult] = {}

    def run(n: int) -> None:
        results[n] = pipe.generate(PipelineCall(**helpers.call_kwargs(num_inference_steps=n)))

    threads = [threading.Thread(target=run, args=(n,)) for n in steps]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for n in steps:
        assert results[n].stats["num_steps"] == n
        np.testing.assert_array_equal(results[n].images, sequential[n].images)


def test_a_copied_transformer_builds_its_own_engine_transformer(components):
    pipe = FluxFillPipeline(**components)
    helpers.disable_progress(pipe)
    before = pipe(**helpers.call_kwargs()).images
    fill = pipe.engine_transformer()
    clone = copy.deepcopy(pipe.transformer)
    other = FluxFillPipeline(**dict(components, transformer=clone))
    helpers.disable_progress(other)
    assert other.runtime is not pipe.runtime and other.runtime.current is None
    helpers.assert_close(other(**helpers.call_kwargs()).images, before, atol=0)
    assert other.engine_transformer() is not fill and pipe.engine_transformer() is fill


@pytest.mark.parametrize("field", ["height", "num_inference_steps", "output_type"])
def test_a_refused_call_is_refused_before_any_stage(pipe, field):
    bad = {"height": -1, "num_inference_steps": 0, "output_type": "jpeg"}[field]
    seen = []
    with pytest.raises(ValueError, match=field):
        pipe.generate(
            PipelineCall(**helpers.call_kwargs(**{field: bad})), on_stage=lambda *a, **k: seen.append(a)
        )
    assert seen == [] and pipe.runtime.current is None
