"""Part 4, ``e2e``: one whole call (text encoders, VAE, all steps) of diffusers eager and the engine's
``fast`` preset (compiled for the call's one size, static shapes, as the latency part's headline row),
cut into stages the same way for both (forward hooks, device time)."""

from __future__ import annotations

import contextlib
import dataclasses
import time
from typing import Any

import torch

from ...testing.pictures import picture_and_mask
from ...testing.random_models import ComponentConfigs, full_configs, random_components, reduced_configs
from ..measure import ForwardIntervals, free_memory
from .budget import Deadline, overrun_in, time_limit, too_late
from .latency import auto_attention_record
from .profiles import GUIDANCE, Profile
from .record import Run


def component_configs(profile: Profile) -> ComponentConfigs:
    """The real seven components, or the same classes at toy widths for the dry run."""
    if profile.transformer_config is None:
        return full_configs()
    return dataclasses.replace(reduced_configs(), transformer=dict(profile.transformer_config))


def call_stages(forwards: ForwardIntervals, start: Any, end: Any) -> dict[str, Any]:
    """A pipeline call's stages from its forward hooks: text encoding ends with the last text-encoder
    forward, denoising spans the first to the last transformer forward, decoding follows it to the end
    of the call. Both pipelines are timed the same way."""
    seconds = forwards.clock.seconds
    steps = forwards.intervals["transformer"]
    if not steps:
        raise RuntimeError("no transformer forward was observed: the stage hooks see nothing")
    text = forwards.intervals["text"]
    text_end = text[-1][1] if text else start
    return {
        "text_encode_s": seconds(start, text_end) if text else None,
        "prepare_and_vae_encode_s": seconds(text_end, steps[0][0]),
        "denoise_s": seconds(steps[0][0], steps[-1][1]),
        "decode_s": seconds(steps[-1][1], end),
        "total_s": seconds(start, end),
        "transformer_calls": len(steps),
        "transformer_ms_per_call": 1000 * forwards.total_seconds("transformer") / len(steps),
        "text_encoder_calls": len(text),
    }


def timed_call(run: Run, pipe: Any, transformer: Any, steps: int, prompt: str) -> tuple[dict[str, Any], Any]:
    """One pipeline call with its stage times; returns the record and the images."""
    profile = run.profile
    image, mask = picture_and_mask(profile.width, profile.height)
    with ForwardIntervals(run.timer) as forwards:
        forwards.watch(pipe.text_encoder, "text").watch(pipe.text_encoder_2, "text")
        forwards.watch(transformer, "transformer")
        run.timer.sync()
        wall = time.perf_counter()
        start = run.timer.mark()
        images = pipe(
            prompt=prompt,
            image=image,
            mask_image=mask,
            height=profile.height,
            width=profile.width,
            num_inference_steps=steps,
            guidance_scale=GUIDANCE,
            max_sequence_length=profile.text_tokens,
            generator=torch.Generator("cpu").manual_seed(0),
            output_type="np",
        ).images
        end = run.timer.mark()
        run.timer.sync()
        wall = time.perf_counter() - wall
    return {"steps": steps, "wall_s": wall, **call_stages(forwards, start, end)}, images


def part_e2e(run: Run, deadline: Deadline, record: dict[str, Any]) -> None:
    import diffusers

    from ... import FluxFillPipeline
    from ...config import PRESETS
    from ...metrics import psnr_db

    profile = run.profile
    components, build_s = run.timer.wall_s(
        lambda: random_components(component_configs(profile), device=run.device, dtype=profile.dtype, seed=0)
    )
    record["build_s"] = build_s
    record["weights_gib"] = run.memory.allocated_gib()
    # Different prompts for warm-up and timed call: the engine's prompt cache must miss, as diffusers
    # (which has none) always does.
    warm_prompt, prompt = "a photo of a cat", "a white paper cup on the table"
    images: dict[str, Any] = {}

    def parts() -> dict[str, Any]:
        # Schedulers keep per-call state: each pipeline gets its own.
        scheduler = components["scheduler"]
        return {**components, "scheduler": type(scheduler).from_config(scheduler.config)}

    def diffusers_eager() -> dict[str, Any]:
        pipe = diffusers.FluxFillPipeline(**parts())
        pipe.set_progress_bar_config(disable=True)
        _, warm_s = run.timer.wall_s(
            lambda: timed_call(run, pipe, pipe.transformer, profile.e2e_warmup_steps, warm_prompt)
        )
        run.memory.reset_peak()
        result, images["diffusers"] = timed_call(run, pipe, pipe.transformer, profile.e2e_steps, prompt)
        return {**result, "warmup_call_s": warm_s, "peak_gib": run.memory.peak_gib()}

    def engine_fast() -> dict[str, Any]:
        # `fast` quantizes the shared transformer in place: diffusers ran on it before, never after.
        pipe = FluxFillPipeline(**parts())
        pipe.set_progress_bar_config(disable=True)
        config = dataclasses.replace(PRESETS["fast"], compile_dynamic=False)
        _, configure_s = run.timer.wall_s(lambda: pipe.configure(config))
        fill = pipe.engine_transformer()
        plan = fill.quant_plan
        stance = (
            contextlib.nullcontext()
            if profile.compiles("e2e/fast")
            else torch.compiler.set_stance("force_eager")
        )
        with stance:
            _, warm_s = run.timer.wall_s(
                lambda: timed_call(run, pipe, fill, profile.e2e_warmup_steps, warm_prompt)
            )
            run.memory.reset_peak()
            result, images["fast"] = timed_call(run, pipe, fill, profile.e2e_steps, prompt)
        out = {
            **result,
            "engine_config": "fast, compile_dynamic=False (one size)",
            "configure_s": configure_s,
            "warmup_call_s": warm_s,
            "warmup_note": "the warm-up call includes compiling the blocks",
            "quantization": None if plan is None else dataclasses.asdict(plan),
            "peak_gib": run.memory.peak_gib(),
            **auto_attention_record(fill.attention),
        }
        if "diffusers" in images:
            out["image_psnr_vs_diffusers_db"] = psnr_db(images["diffusers"], images["fast"])
        if not profile.compiles("e2e/fast"):
            out["note"] = "dry run: compiled blocks ran under torch.compiler.set_stance('force_eager')"
        return out

    run.item(record, "diffusers", diffusers_eager)
    free_memory(run.device)

    def engine_fast_in_time() -> dict[str, Any]:
        # Its own limit is what is left of the part: a slow compile cannot overrun into the next part.
        try:
            with time_limit(deadline.left(), "engine fast end to end"):
                return engine_fast()
        except Exception as error:
            overrun = overrun_in(error)  # a compiler may wrap what interrupted it
            if overrun is None:
                raise
            free_memory(run.device, compiled=True)
            return {"status": "timed_out", "reason": str(overrun)}

    if deadline.fits(35.0):
        run.item(record, "fast", engine_fast_in_time)
    else:
        record["items"]["fast"] = too_late("engine fast end to end", 35.0, deadline)
    images.clear()  # the part's weights go when it returns; run_part then frees the memory
