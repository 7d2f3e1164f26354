"""How ``fluxfill bench variants`` builds each variant's pipeline and times one call of it.

Every run is bracketed by device synchronisation. Stage boundaries are CUDA events on a GPU (read once
the run has finished, so nothing waits in between) and host clocks on a CPU. The engine reports its
stage times in the :class:`~fluxfill_engine.call.PipelineResult` of ``FluxFillPipeline.generate`` (the
same clocks); diffusers' pipeline is timed with forward hooks on its text encoders and transformer
(:class:`~.measure.ForwardIntervals`), and both pipelines' final latents are captured at the entry of
``vae.decode``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..call import STAGES, PipelineCall, PipelineResult
from ..testing.pictures import picture_and_mask
from ..timing import Clock
from .catalog import DEFAULT_PROMPT, VariantSpec
from .measure import ForwardIntervals, MemoryMeter, jsonable


@dataclass
class BenchInputs:
    """The one request every variant runs."""

    prompt: str
    image: Any
    mask: Any
    width: int
    height: int
    steps: int
    guidance_scale: float
    seed: int
    max_sequence_length: int

    @classmethod
    def picture(
        cls,
        width: int,
        height: int,
        steps: int,
        seed: int,
        max_sequence_length: int,
        prompt: str = DEFAULT_PROMPT,
        guidance_scale: float = 30.0,
    ) -> BenchInputs:
        """The benchmarks' request: a textured picture with a centred mask (seeded), ``prompt``."""
        image, mask = picture_and_mask(width, height, seed)
        return cls(prompt, image, mask, width, height, steps, guidance_scale, seed, max_sequence_length)

    def call(self) -> PipelineCall:
        """The request as diffusers' call arguments (a fresh generator each time)."""
        return PipelineCall(
            prompt=self.prompt,
            image=self.image,
            mask_image=self.mask,
            height=self.height,
            width=self.width,
            num_inference_steps=self.steps,
            guidance_scale=self.guidance_scale,
            generator=torch.Generator("cpu").manual_seed(self.seed),
            output_type="np",
            max_sequence_length=self.max_sequence_length,
        )

    def diffusers_kwargs(self) -> dict[str, Any]:
        """:meth:`call` as keyword arguments of ``diffusers.FluxFillPipeline.__call__``."""
        call = self.call()
        return {f.name: getattr(call, f.name) for f in dataclasses.fields(call)}


@dataclass
class RunResult:
    """One timed call of one variant."""

    e2e_s: float
    stages_s: dict[str, float]
    transformer_s_per_step: float
    memory_extra_bytes: int
    memory_peak_bytes: int
    image: np.ndarray
    latents: torch.Tensor
    stats: dict[str, Any] | None = None


@contextlib.contextmanager
def decode_input(vae: Any) -> Iterator[list[torch.Tensor]]:
    """Capture the latents of the first ``vae.decode`` call inside the block (both pipelines decode
    through it); the VAE's own ``decode`` is back afterwards."""
    captured: list[torch.Tensor] = []
    own = vars(vae).get("decode")
    original = vae.decode

    @functools.wraps(original)
    def decode(z: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if not captured:
            captured.append(z.detach().clone())
        return original(z, *args, **kwargs)

    vae.decode = decode
    try:
        yield captured
    finally:
        if own is None:
            del vae.decode
        else:
            vae.decode = own


def _unpacked_latents(captured: list[torch.Tensor], vae: Any) -> torch.Tensor:
    if not captured:
        raise RuntimeError("the pipeline did not call vae.decode: no final latents were captured")
    z = captured[0].to(torch.float64)
    return ((z - vae.config.shift_factor) * vae.config.scaling_factor).cpu()


class VariantRunner:
    """A built variant: its pipeline and how to time one call of it."""

    def __init__(self, spec: VariantSpec, pipe: Any, device: torch.device, setup_s: float) -> None:
        self.spec = spec
        self.pipe = pipe
        self.device = device
        self.setup_s = setup_s
        self.clock = Clock(device)
        self.keep_prompt_cache = False
        pipe.set_progress_bar_config(disable=True)

    @property
    def precision(self) -> tuple[torch.dtype, str | None]:
        """``(compute dtype, quantized matmul mode or None)`` of the transformer."""
        raise NotImplementedError

    def weight_bytes(self) -> int:
        from ..quantization import weight_bytes

        pipe = self.pipe
        return weight_bytes([pipe.transformer, pipe.text_encoder, pipe.text_encoder_2, pipe.vae])

    def run(self, inputs: BenchInputs) -> RunResult:
        meter = MemoryMeter(self.device)
        self._before_run()
        meter.start()
        self.clock.sync()
        with ForwardIntervals(self.clock) as forwards, decode_input(self.pipe.vae) as decoded:
            self._watch(forwards)
            try:
                start = time.perf_counter()
                call_start = self.clock.mark()
                images = self._call(inputs)
                call_end = self.clock.mark()
                self.clock.sync()
                e2e = time.perf_counter() - start
            finally:
                extra = meter.stop()
        stages, per_step = self._stage_times(forwards, call_start, call_end)
        return RunResult(
            e2e_s=e2e,
            stages_s=stages,
            transformer_s_per_step=per_step,
            memory_extra_bytes=extra,
            memory_peak_bytes=meter.peak_bytes,
            image=np.asarray(images, dtype=np.float32),
            latents=_unpacked_latents(decoded, self.pipe.vae),
            stats=self._stats(),
        )

    def _before_run(self) -> None:
        pass

    def _watch(self, forwards: ForwardIntervals) -> None:
        pass

    def _call(self, inputs: BenchInputs) -> Any:
        raise NotImplementedError

    def _stage_times(
        self, forwards: ForwardIntervals, call_start: Any, call_end: Any
    ) -> tuple[dict[str, float], float]:
        raise NotImplementedError

    def _stats(self) -> dict[str, Any] | None:
        return None


@dataclass
class CacheDecisions:
    """The steps diffusers' first-block cache computed and skipped, as read from its state."""

    computed: int = 0
    skipped: int = 0


class DiffusersRunner(VariantRunner):
    """``diffusers.FluxFillPipeline`` (eager, compiled, fp8 or first-block cache)."""

    def __init__(self, spec: VariantSpec, pipe: Any, device: torch.device, setup_s: float) -> None:
        super().__init__(spec, pipe, device, setup_s)
        self.dtype = pipe.transformer.dtype
        self.cache_decisions: CacheDecisions | None = None  # set when the cache's state can be read

    @property
    def precision(self) -> tuple[torch.dtype, str | None]:
        return self.dtype, "fp8" if self.spec.base == "diffusers-fp8-compile" else None

    def _before_run(self) -> None:
        if self.cache_decisions is not None:
            self.cache_decisions.computed = self.cache_decisions.skipped = 0

    def _watch(self, forwards: ForwardIntervals) -> None:
        forwards.watch(self.pipe.text_encoder, "text_encode").watch(self.pipe.text_encoder_2, "text_encode")
        forwards.watch(self.pipe.transformer, "transformer")

    def _call(self, inputs: BenchInputs) -> Any:
        return self.pipe(**inputs.diffusers_kwargs()).images

    def _stage_times(
        self, forwards: ForwardIntervals, call_start: Any, call_end: Any
    ) -> tuple[dict[str, float], float]:
        seconds = self.clock.seconds
        text = forwards.intervals["text_encode"]
        calls = forwards.intervals["transformer"]
        if not calls:
            raise RuntimeError(f"{self.spec.name}: the transformer was never called")
        text_end = text[-1][1] if text else call_start
        stages = {
            "text_encode": seconds(call_start, text_end),
            "vae_encode": seconds(text_end, calls[0][0]),
            "denoise": seconds(calls[0][0], calls[-1][1]),
            "decode": seconds(calls[-1][1], call_end),
        }
        return stages, forwards.total_seconds("transformer") / len(calls)

    def _stats(self) -> dict[str, Any] | None:
        if self.spec.base != "diffusers-fbcache":
            return None
        decisions = self.cache_decisions
        return {
            "fbcache_threshold": self.spec.options["threshold"],
            "steps_computed": None if decisions is None else decisions.computed,
            "steps_skipped": None if decisions is None else decisions.skipped,
        }


class EngineRunner(VariantRunner):
    """``fluxfill_engine.FluxFillPipeline`` configured with an :class:`EngineConfig`."""

    def __init__(self, spec: VariantSpec, pipe: Any, device: torch.device, setup_s: float) -> None:
        super().__init__(spec, pipe, device, setup_s)
        fill = pipe.engine_transformer()
        self.dtype = fill.dtype
        self.last_result: PipelineResult | None = None
        self.quant_plan = fill.quant_plan

    @property
    def precision(self) -> tuple[torch.dtype, str | None]:
        plan = self.quant_plan
        return self.dtype, plan.mode if plan is not None else None

    def describe_engine(self) -> dict[str, Any]:
        plan = self.quant_plan
        return {
            "transformer_dtype": str(self.dtype).replace("torch.", ""),
            "quantization": None
            if plan is None
            else {"mode": plan.mode, "backend": plan.backend, "why": plan.reason},
        }

    def _before_run(self) -> None:
        if not self.keep_prompt_cache:
            self.pipe.prompt_cache.clear()  # every run encodes its prompt, as diffusers does

    def _call(self, inputs: BenchInputs) -> Any:
        result = self.last_result = self.pipe.generate(inputs.call())
        return result.images

    def _stage_times(
        self, forwards: ForwardIntervals, call_start: Any, call_end: Any
    ) -> tuple[dict[str, float], float]:
        result = self.last_result
        assert result is not None  # the call has run
        stages = {stage: result.timings[stage] for stage in STAGES}
        return stages, result.timings["denoise"] / result.stats["num_steps"]

    def _stats(self) -> dict[str, Any] | None:
        return None if self.last_result is None else jsonable(self.last_result.stats)


# ---- building ---------------------------------------------------------------------------------------


def first_block_cache(transformer: Any, threshold: float) -> CacheDecisions | None:
    """diffusers' first-block cache, with the cache context its FluxFillPipeline does not set.

    Returns the counter of computed/skipped steps (read from the cache's state), or ``None`` where
    that state cannot be read.
    """
    from diffusers import FirstBlockCacheConfig

    transformer.enable_cache(FirstBlockCacheConfig(threshold=threshold))
    leader: Any = None
    try:
        from diffusers.hooks import HookRegistry
        from diffusers.hooks.first_block_cache import _FBC_LEADER_BLOCK_HOOK

        registry = HookRegistry.check_if_exists_or_initialize(transformer.transformer_blocks[0])
        leader = registry.get_hook(_FBC_LEADER_BLOCK_HOOK)
    except (ImportError, AttributeError):  # skip counts are a nicety; the cache works without them
        pass
    decisions = None if leader is None else CacheDecisions()
    original = transformer.forward

    @functools.wraps(original)
    def forward(*args: Any, **kwargs: Any) -> Any:
        with transformer.cache_context("cond"):
            output = original(*args, **kwargs)
            if decisions is not None and leader is not None:  # counts exist only with a leader
                if leader.state_manager.get_state().should_compute:
                    decisions.computed += 1
                else:
                    decisions.skipped += 1
        return output

    transformer.forward = forward
    return decisions


def torchao_fp8(transformer: Any) -> bool | None:
    """torchao's fp8 W8A8 (dynamic row-wise activations) on every linear layer, as diffusers users
    quantize it (torchao's defaults otherwise). Returns whether its products use fast accumulation
    (torchao's row-wise default; ``None`` when this torchao does not say)."""
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_

    # Without set_inductor_config=False torchao would switch on coordinate descent tuning (and more)
    # for the whole process: every other compiled variant would be compiled differently too.
    config = Float8DynamicActivationFloat8WeightConfig(granularity=PerRow(), set_inductor_config=False)
    quantize_(transformer, config)
    fast_accum = getattr(getattr(config, "mm_config", None), "use_fast_accum", None)
    return None if fast_accum is None else bool(fast_accum)


def build_runners(
    specs: Sequence[VariantSpec],
    components: dict[str, Any],
    device: torch.device,
    on_built: Callable[[VariantSpec], None] | None = None,
) -> list[VariantRunner]:
    """One pipeline per variant on ``components`` (built once), sharing weights wherever that is safe.

    The ``reference`` engine runs on the original transformer (its lossless QKV fusion happens in place
    first) and so does eager ``diffusers`` (diffusers' forward on the fused views gives the same
    values). Every other variant gets a
    :func:`~fluxfill_engine.testing.random_models.shared_clone`: no weight is copied until the variant
    changes it (dtype cast, QKV fusion, quantization). Text encoders and the VAE are shared (a variant
    that quantizes T5 gets its own clone).
    """
    import diffusers

    from ..pipeline import FluxFillPipeline
    from ..testing.random_models import shared_clone

    base = components["transformer"]
    ordered = sorted(specs, key=lambda s: not s.is_reference)  # the reference fuses the base first
    built: dict[str, VariantRunner] = {}
    owner_taken = False
    clones: dict[str, Any] = {}
    for spec in ordered:  # all clones before any variant installs hooks or compiles
        if spec.is_reference and not owner_taken:
            owner_taken = True
            start = time.perf_counter()
            assert spec.config is not None  # an engine variant
            pipe = FluxFillPipeline(**_components_for(components, base))
            pipe.configure(spec.config)
            pipe.engine_transformer()
            built[spec.name] = EngineRunner(spec, pipe, device, time.perf_counter() - start)
            if on_built:
                on_built(spec)
        elif not (spec.kind == "diffusers" and spec.base == "diffusers"):
            start = time.perf_counter()
            clones[spec.name] = (shared_clone(base), time.perf_counter() - start)
    for spec in ordered:
        if spec.name in built:
            continue
        start = time.perf_counter()
        transformer, clone_s = clones.get(spec.name, (base, 0.0))
        parts = _components_for(components, transformer)
        if spec.kind == "diffusers":
            if spec.base == "diffusers-fp8-compile":
                torchao_fp8(transformer)
            if spec.base in ("diffusers-compile", "diffusers-fp8-compile"):
                transformer.compile_repeated_blocks(fullgraph=True)
            decisions = None
            if spec.base == "diffusers-fbcache":
                decisions = first_block_cache(transformer, spec.options["threshold"])
            diffusers_runner = DiffusersRunner(spec, diffusers.FluxFillPipeline(**parts), device, 0.0)
            diffusers_runner.cache_decisions = decisions
            runner: VariantRunner = diffusers_runner
        else:
            assert spec.config is not None
            if spec.config.quantize_text_encoder:
                parts["text_encoder_2"] = shared_clone(parts["text_encoder_2"])
            pipe = FluxFillPipeline(**parts)
            pipe.configure(spec.config)
            runner = EngineRunner(spec, pipe, device, 0.0)
        runner.setup_s = clone_s + time.perf_counter() - start
        built[spec.name] = runner
        if on_built:
            on_built(spec)
    return [built[spec.name] for spec in specs]


def _components_for(components: dict[str, Any], transformer: Any) -> dict[str, Any]:
    from diffusers import FlowMatchEulerDiscreteScheduler

    parts = dict(components)
    parts["transformer"] = transformer
    # Schedulers keep per-call state (timesteps, step index): each pipeline gets its own.
    parts["scheduler"] = FlowMatchEulerDiscreteScheduler.from_config(components["scheduler"].config)
    return parts


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")
