"""The variants ``fluxfill bench`` compares, and how one run of each is timed.

A variant is a way to run the same model on the same request:

- ``diffusers``: ``diffusers.FluxFillPipeline``, eager.
- ``diffusers-compile``: the same with diffusers' regional compile
  (``transformer.compile_repeated_blocks(fullgraph=True)``).
- ``diffusers-fp8-compile``: torchao fp8 W8A8 (dynamic row-wise activations) on every linear layer,
  then the regional compile; needs a GPU with fp8 tensor cores.
- ``diffusers-fbcache``: diffusers' ``FirstBlockCacheConfig`` (``diffusers-fbcache:threshold=0.1``).
- every engine preset of :data:`fluxfill_engine.config.PRESETS` by name, with optional field overrides
  (``balanced:attention=sdpa``), and ``engine:FIELD=VALUE,...``: the ``reference`` preset with the
  given :class:`~fluxfill_engine.config.EngineConfig` fields changed.

Timing: every run is bracketed by device synchronisation. Stage boundaries are CUDA events on a GPU
(read once the run has finished, so nothing waits in between) and host clocks on a CPU. The engine
reports its stage times in the :class:`~fluxfill_engine.call.PipelineResult` of
``FluxFillPipeline.generate`` (the same clocks); diffusers' pipeline is timed
with forward hooks on its text encoders and transformer, and both pipelines' final latents are
captured at the entry of ``vae.decode``.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import threading
import time
import types
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..call import STAGES, PipelineCall, PipelineResult
from ..compilation import compile_unavailable_reason
from ..config import PRESETS, EngineConfig
from ..timing import Clock
from .catalog import DIFFUSERS_VARIANTS, ENGINE_PREFIX, BenchError, known_variants

DEFAULT_FBCACHE_THRESHOLD = 0.05  # diffusers' FirstBlockCacheConfig default


# ---- variant specs ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class VariantSpec:
    """One variant: its display ``name``, whose pipeline runs it and how it is configured."""

    name: str
    kind: str  # "diffusers" or "engine"
    base: str  # a DIFFUSERS_VARIANTS name, or the engine preset the config starts from
    config: EngineConfig | None = None
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def is_reference(self) -> bool:
        """The engine with every optimization off: the drift reference."""
        return self.kind == "engine" and self.config == PRESETS["reference"]

    def describe(self) -> dict[str, Any]:
        info: dict[str, Any] = {"kind": self.kind, "base": self.base}
        if self.kind == "diffusers":
            info["description"] = DIFFUSERS_VARIANTS[self.base]
        if self.config is not None:
            info["engine_config"] = self.config.describe()
        if self.options:
            info["options"] = dict(self.options)
        return info


def split_variant_list(text: str) -> list[str]:
    """Split a comma list of variants; ``KEY=VALUE`` items continue the ``NAME:...`` before them.

    ``"diffusers,engine:quant=fp8,compile=1,fast"`` -> ``["diffusers", "engine:quant=fp8,compile=1",
    "fast"]``.
    """
    items: list[str] = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        if "=" in part and ":" not in part:
            if not items or ":" not in items[-1]:
                raise BenchError(
                    f"variant option {part!r} has no variant before it; write NAME:{part} "
                    f"(e.g. engine:{part})"
                )
            items[-1] = f"{items[-1]},{part}"
        else:
            items.append(part)
    return items


def _engine_field_types() -> dict[str, Any]:
    return typing.get_type_hints(EngineConfig)


def _convert(field_name: str, hint: Any, raw: str) -> Any:
    """``raw`` as the type of EngineConfig field ``field_name`` (bool, int, float, str or None)."""
    args = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    text = raw.strip()
    if type(None) in args and text.lower() in ("none", "null"):
        return None
    for kind in (bool, int, float, str):
        if kind not in args:
            continue
        if kind is bool:
            lowered = text.lower()
            if lowered in ("1", "true", "yes", "on"):
                return True
            if lowered in ("0", "false", "no", "off"):
                return False
            continue
        try:
            return kind(text)
        except ValueError:
            continue
    names = " or ".join(getattr(a, "__name__", str(a)) for a in args)
    raise BenchError(f"engine field {field_name!r} expects {names}, got {raw!r}")


def parse_engine_overrides(text: str) -> dict[str, Any]:
    """``"quant=fp8,compile=1"`` -> ``{"quant": "fp8", "compile": True}``, typed by EngineConfig."""
    hints = _engine_field_types()
    valid = [f.name for f in dataclasses.fields(EngineConfig)]
    overrides: dict[str, Any] = {}
    for item in (p.strip() for p in text.split(",")):
        if not item:
            continue
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep:
            raise BenchError(f"engine option {item!r} must be FIELD=VALUE; valid fields: {valid}")
        if key not in hints:
            raise BenchError(f"unknown EngineConfig field {key!r}; valid fields: {valid}")
        overrides[key] = _convert(key, hints[key], value)
    return overrides


def parse_variant(token: str) -> VariantSpec:
    """One variant from its name (``fast``, ``diffusers-fbcache:threshold=0.1``, ``engine:quant=fp8``)."""
    token = token.strip()
    head, _, options = token.partition(":")
    head = head.strip()
    if head in DIFFUSERS_VARIANTS:
        opts: dict[str, Any] = {}
        if head == "diffusers-fbcache":
            opts["threshold"] = DEFAULT_FBCACHE_THRESHOLD
        for item in (p.strip() for p in options.split(",") if options):
            if not item:
                continue
            key, sep, value = item.partition("=")
            if head != "diffusers-fbcache" or key.strip() != "threshold" or not sep:
                allowed = "threshold=FLOAT" if head == "diffusers-fbcache" else "none"
                raise BenchError(f"variant {head!r} does not take option {item!r} (options: {allowed})")
            try:
                opts["threshold"] = float(value)
            except ValueError as err:
                raise BenchError(f"{head}: threshold must be a number, got {value!r}") from err
        return VariantSpec(name=token, kind="diffusers", base=head, options=opts)
    if head == ENGINE_PREFIX or head in PRESETS:
        base = "reference" if head == ENGINE_PREFIX else head
        overrides = parse_engine_overrides(options)
        try:
            config = dataclasses.replace(PRESETS[base], **overrides)
        except (TypeError, ValueError) as err:
            raise BenchError(f"variant {token!r}: {err}") from err
        return VariantSpec(name=token, kind="engine", base=base, config=config)
    raise BenchError(
        f"unknown variant {token!r}; known variants: {known_variants()}, or "
        f"'{ENGINE_PREFIX}:FIELD=VALUE,...' / 'PRESET:FIELD=VALUE,...' with EngineConfig fields "
        f"{[f.name for f in dataclasses.fields(EngineConfig)]}"
    )


def unavailable_reason(spec: VariantSpec, device: torch.device) -> str | None:
    """Why ``spec`` cannot run on ``device`` (hardware or a missing package), or ``None``."""
    if spec.kind == "diffusers":
        if spec.base in ("diffusers-compile", "diffusers-fp8-compile"):
            reason = compile_unavailable_reason(device)
            if reason:
                return reason
        if spec.base == "diffusers-fp8-compile":
            from ..quantization import has_fp8_tensor_cores

            if importlib.util.find_spec("torchao") is None:
                return "needs torchao (pip install 'fluxfill-engine[quant]')"
            if not has_fp8_tensor_cores(device):
                return f"needs a CUDA GPU with fp8 tensor cores (compute capability >= 8.9), not {device}"
        if spec.base == "diffusers-fbcache":
            try:
                from diffusers import FirstBlockCacheConfig  # noqa: F401
            except ImportError:
                return "this diffusers has no FirstBlockCacheConfig"
        return None
    from ..attention import backend_unavailable_reason
    from ..quantization import resolve

    config = spec.config
    assert config is not None
    reason = backend_unavailable_reason(config.attention, device)
    if reason:
        return f"attention={config.attention!r}: {reason}"
    if config.quant != "none":
        try:
            resolve(config.quant, config.quant_backend, device)
        except ValueError as err:
            return str(err)
    if config.compile:
        reason = compile_unavailable_reason(device)
        if reason:
            return f"compile: {reason}"
    return None


def resolve_variants(
    requested: Sequence[str] | None, device: torch.device, include_baselines: bool = True
) -> tuple[list[VariantSpec], dict[str, str]]:
    """The variants to run, and the known variants that cannot run here (with the reason).

    Explicitly requested variants that cannot run raise :class:`BenchError` naming why and listing
    what can. With ``include_baselines``, ``diffusers`` (the speed baseline) and ``reference`` (the
    drift reference) are added at the front when missing.
    """
    skipped: dict[str, str] = {}
    for name in known_variants():
        reason = unavailable_reason(parse_variant(name), device)
        if reason is not None:
            skipped[name] = reason
    if requested is None:
        specs = [parse_variant(name) for name in known_variants() if name not in skipped]
    else:
        specs = [parse_variant(token) for token in requested]
        problems = {s.name: r for s in specs if (r := unavailable_reason(s, device)) is not None}
        if problems:
            runnable = [n for n in known_variants() if n not in skipped]
            detail = "; ".join(f"{name}: {reason}" for name, reason in problems.items())
            raise BenchError(f"cannot run on {device}: {detail}. Variants that run here: {runnable}")
    names = [s.name for s in specs]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise BenchError(f"variants listed twice: {duplicates}")
    if include_baselines:
        front = []
        if not any(s.kind == "diffusers" and s.base == "diffusers" and not s.options for s in specs):
            front.append(parse_variant("diffusers"))
        if not any(s.is_reference for s in specs):
            front.append(parse_variant("reference"))
        specs = front + specs
    if not specs:
        raise BenchError("no variant to run")
    return specs, skipped


# ---- clocks, recorders, memory ---------------------------------------------------------------------


class RunRecorder:
    """What one run records: named marks, intervals per key, the decoder's input latents."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.marks: dict[str, Any] = {}
        self.intervals: dict[str, list[tuple[Any, Any]]] = {}
        self._open: dict[str, Any] = {}
        self.decode_input: torch.Tensor | None = None
        self.counters: dict[str, int] = {}

    def mark(self, name: str) -> None:
        self.marks[name] = self.clock.mark()

    def open(self, key: str) -> None:
        self._open[key] = self.clock.mark()

    def close(self, key: str) -> None:
        start = self._open.pop(key, None)
        if start is not None:
            self.intervals.setdefault(key, []).append((start, self.clock.mark()))

    def count(self, key: str, amount: int = 1) -> None:
        self.counters[key] = self.counters.get(key, 0) + amount

    def span(self, start: str, end: str) -> float:
        return self.clock.seconds(self.marks[start], self.marks[end])


_ACTIVE: list[RunRecorder] = []  # the recorder of the run in progress (at most one)


def active_recorder() -> RunRecorder | None:
    return _ACTIVE[-1] if _ACTIVE else None


def _instrument_forward(module: torch.nn.Module, key: str) -> None:
    """Record every forward of ``module`` as an interval ``key`` of the active run (once per module)."""
    marker = f"_fluxfill_bench_{key}"
    if getattr(module, marker, False):
        return

    def pre(_module: Any, _args: Any) -> None:
        recorder = active_recorder()
        if recorder is not None:
            recorder.open(key)

    def post(_module: Any, _args: Any, _output: Any) -> None:
        recorder = active_recorder()
        if recorder is not None:
            recorder.close(key)

    module.register_forward_pre_hook(pre)
    module.register_forward_hook(post)
    setattr(module, marker, True)


def _instrument_decode(vae: torch.nn.Module) -> None:
    """Capture the latents given to ``vae.decode`` (both pipelines decode through it) in the active run."""
    if getattr(vae, "_fluxfill_bench_decode", False):
        return
    original = vae.decode

    @functools.wraps(original)
    def decode(z: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        recorder = active_recorder()
        if recorder is not None and recorder.decode_input is None:
            recorder.decode_input = z.detach().clone()
        return original(z, *args, **kwargs)

    vae.decode = decode
    vae._fluxfill_bench_decode = True


class MemoryMeter:
    """Peak memory of one run above what was allocated when it started.

    CUDA: the caching allocator's ``max_memory_allocated`` (reset per run). CPU: the process's resident
    set size, sampled every ``interval`` seconds from ``/proc/self/statm`` by a background thread
    (``ru_maxrss`` where there is no ``/proc``: then only new process-wide highs show).
    """

    def __init__(self, device: torch.device, interval: float = 0.005) -> None:
        self.device = device
        self.interval = interval
        self.kind = "cuda_allocator" if device.type == "cuda" else "rss"
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._start_bytes = 0
        self._peak = 0

    @staticmethod
    def rss_bytes() -> int | None:
        try:
            with open("/proc/self/statm") as statm:
                return int(statm.read().split()[1]) * _page_size()
        except (OSError, ValueError, IndexError):
            return None

    @staticmethod
    def process_peak_bytes(device: torch.device) -> int:
        if device.type == "cuda":
            return int(torch.cuda.max_memory_allocated(device))
        import resource

        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024

    def start(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start_bytes = int(torch.cuda.memory_allocated(self.device))
            return
        rss = self.rss_bytes()
        if rss is None:
            self._start_bytes = self.process_peak_bytes(self.device)
            return
        self._start_bytes = self._peak = rss
        self._stop.clear()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            rss = self.rss_bytes()
            if rss is not None and rss > self._peak:
                self._peak = rss

    def stop(self) -> int:
        """Peak bytes above the start of the run (the absolute peak is left in :attr:`peak_bytes`)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self._peak = int(torch.cuda.max_memory_allocated(self.device))
        elif self._thread is None:
            self._peak = self.process_peak_bytes(self.device)
        else:
            self._stop.set()
            self._thread.join()
            self._thread = None
            self._peak = max(self._peak, self.rss_bytes() or 0)
        return max(0, self._peak - self._start_bytes)

    @property
    def peak_bytes(self) -> int:
        """The whole process's peak during the run: allocator bytes (CUDA) or resident set size."""
        return self._peak


@functools.cache
def _page_size() -> int:
    import os

    return os.sysconf("SC_PAGE_SIZE")


# ---- runners ---------------------------------------------------------------------------------------


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


def _unpacked_latents(recorder: RunRecorder, vae: Any) -> torch.Tensor:
    if recorder.decode_input is None:
        raise RuntimeError("the pipeline did not call vae.decode: no final latents were captured")
    z = recorder.decode_input.to(torch.float64)
    return ((z - vae.config.shift_factor) * vae.config.scaling_factor).cpu()


def _jsonable(value: Any) -> Any:
    """Stats as plain JSON values (tensors to lists/numbers, unknown objects to strings)."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, torch.Tensor):
        return _jsonable(value.tolist()) if value.numel() <= 64 else f"tensor{tuple(value.shape)}"
    if isinstance(value, (np.generic,)):
        return value.item()
    if isinstance(value, float):
        return value if np.isfinite(value) else None
    if value is None or isinstance(value, (bool, int, str)):
        return value
    return str(value)


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
        for name in ("text_encoder", "text_encoder_2"):
            _instrument_forward(getattr(pipe, name), "text_encode")
        _instrument_decode(pipe.vae)

    @property
    def precision(self) -> tuple[torch.dtype, str | None]:
        """``(compute dtype, quantized matmul mode or None)`` of the transformer."""
        raise NotImplementedError

    def weight_bytes(self) -> int:
        from ..quantization import weight_bytes

        pipe = self.pipe
        return weight_bytes([pipe.transformer, pipe.text_encoder, pipe.text_encoder_2, pipe.vae])

    def run(self, inputs: BenchInputs) -> RunResult:
        recorder = RunRecorder(self.clock)
        meter = MemoryMeter(self.device)
        self._before_run()
        meter.start()
        self.clock.sync()
        _ACTIVE.append(recorder)
        try:
            start = time.perf_counter()
            recorder.mark("call_start")
            images = self._call(inputs, recorder)
            recorder.mark("call_end")
            self.clock.sync()
            e2e = time.perf_counter() - start
        finally:
            _ACTIVE.remove(recorder)
            extra = meter.stop()
        stages, per_step = self._stage_times(recorder, inputs.steps)
        return RunResult(
            e2e_s=e2e,
            stages_s=stages,
            transformer_s_per_step=per_step,
            memory_extra_bytes=extra,
            memory_peak_bytes=meter.peak_bytes,
            image=np.asarray(images, dtype=np.float32),
            latents=_unpacked_latents(recorder, self.pipe.vae),
            stats=self._stats(recorder),
        )

    def _before_run(self) -> None:
        pass

    def _call(self, inputs: BenchInputs, recorder: RunRecorder) -> Any:
        raise NotImplementedError

    def _stage_times(self, recorder: RunRecorder, steps: int) -> tuple[dict[str, float], float]:
        raise NotImplementedError

    def _stats(self, recorder: RunRecorder) -> dict[str, Any] | None:
        return None


class DiffusersRunner(VariantRunner):
    """``diffusers.FluxFillPipeline`` (eager, compiled, fp8 or first-block cache)."""

    def __init__(self, spec: VariantSpec, pipe: Any, device: torch.device, setup_s: float) -> None:
        super().__init__(spec, pipe, device, setup_s)
        _instrument_forward(pipe.transformer, "transformer")
        self.dtype = pipe.transformer.dtype
        self.counts_skips = False  # set when the first-block cache's decisions can be read

    @property
    def precision(self) -> tuple[torch.dtype, str | None]:
        return self.dtype, "fp8" if self.spec.base == "diffusers-fp8-compile" else None

    def _call(self, inputs: BenchInputs, recorder: RunRecorder) -> Any:
        call = inputs.call()
        return self.pipe(**{f.name: getattr(call, f.name) for f in dataclasses.fields(call)}).images

    def _stage_times(self, recorder: RunRecorder, steps: int) -> tuple[dict[str, float], float]:
        seconds = recorder.clock.seconds
        text = recorder.intervals.get("text_encode", [])
        calls = recorder.intervals.get("transformer", [])
        if not calls:
            raise RuntimeError(f"{self.spec.name}: the transformer was never called")
        start, end = recorder.marks["call_start"], recorder.marks["call_end"]
        text_end = text[-1][1] if text else start
        stages = {
            "text_encode": seconds(start, text_end),
            "vae_encode": seconds(text_end, calls[0][0]),
            "denoise": seconds(calls[0][0], calls[-1][1]),
            "decode": seconds(calls[-1][1], end),
        }
        per_step = sum(seconds(a, b) for a, b in calls) / len(calls)
        return stages, per_step

    def _stats(self, recorder: RunRecorder) -> dict[str, Any] | None:
        if self.spec.base != "diffusers-fbcache":
            return None
        counters = recorder.counters
        computed = counters.get("fbcache_computed", 0) if self.counts_skips else None
        skipped = counters.get("fbcache_skipped", 0) if self.counts_skips else None
        return {
            "fbcache_threshold": self.spec.options["threshold"],
            "steps_computed": computed,
            "steps_skipped": skipped,
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

    def _call(self, inputs: BenchInputs, recorder: RunRecorder) -> Any:
        self.last_result = self.pipe.generate(inputs.call())
        return self.last_result.images

    def _stage_times(self, recorder: RunRecorder, steps: int) -> tuple[dict[str, float], float]:
        result: PipelineResult = self.last_result
        stages = {stage: result.timings[stage] for stage in STAGES}
        return stages, result.timings["denoise"] / result.stats["num_steps"]

    def _stats(self, recorder: RunRecorder) -> dict[str, Any] | None:
        return _jsonable(self.last_result.stats)


# ---- building ---------------------------------------------------------------------------------------


def _fbcache(transformer: Any, threshold: float) -> bool:
    """diffusers' first-block cache, with the cache context its FluxFillPipeline does not set.

    Returns whether computed/skipped steps can be counted (they are read from the cache's state).
    """
    from diffusers import FirstBlockCacheConfig

    transformer.enable_cache(FirstBlockCacheConfig(threshold=threshold))
    leader = None
    try:
        from diffusers.hooks import HookRegistry
        from diffusers.hooks.first_block_cache import _FBC_LEADER_BLOCK_HOOK

        registry = HookRegistry.check_if_exists_or_initialize(transformer.transformer_blocks[0])
        leader = registry.get_hook(_FBC_LEADER_BLOCK_HOOK)
    except (ImportError, AttributeError):  # skip counts are a nicety; the cache works without them
        leader = None
    original = transformer.forward

    @functools.wraps(original)
    def forward(*args: Any, **kwargs: Any) -> Any:
        with transformer.cache_context("cond"):
            output = original(*args, **kwargs)
            recorder = active_recorder()
            if leader is not None and recorder is not None:
                computed = bool(leader.state_manager.get_state().should_compute)
                recorder.count("fbcache_computed" if computed else "fbcache_skipped")
        return output

    transformer.forward = forward
    return leader is not None


def _torchao_fp8(transformer: Any) -> None:
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_

    # Without set_inductor_config=False torchao would switch on coordinate descent tuning (and more)
    # for the whole process: every other compiled variant would be compiled differently too.
    config = Float8DynamicActivationFloat8WeightConfig(granularity=PerRow(), set_inductor_config=False)
    quantize_(transformer, config)


def build_runners(
    specs: Sequence[VariantSpec],
    components: dict[str, Any],
    device: torch.device,
    on_built: Callable[[VariantSpec], None] | None = None,
) -> list[VariantRunner]:
    """One pipeline per variant on ``components`` (built once), sharing weights wherever that is safe.

    The ``reference`` engine runs on the original transformer (its lossless QKV fusion happens in place
    first) and so does eager ``diffusers`` (diffusers' forward on the fused views gives the same
    values). Every other variant gets a :func:`~fluxfill_engine.bench.models.shared_clone`: no weight
    is copied until the variant changes it (dtype cast, QKV fusion, quantization). Text encoders and
    the VAE are shared (a variant that quantizes T5 gets its own clone).
    """
    import diffusers

    from ..pipeline import FluxFillPipeline
    from .models import shared_clone

    base = components["transformer"]
    ordered = sorted(specs, key=lambda s: not s.is_reference)  # the reference fuses the base first
    built: dict[str, VariantRunner] = {}
    owner_taken = False
    clones: dict[str, Any] = {}
    for spec in ordered:  # all clones before any variant installs hooks or compiles
        if spec.is_reference and not owner_taken:
            owner_taken = True
            start = time.perf_counter()
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
                _torchao_fp8(transformer)
            if spec.base in ("diffusers-compile", "diffusers-fp8-compile"):
                transformer.compile_repeated_blocks(fullgraph=True)
            counts = spec.base == "diffusers-fbcache" and _fbcache(transformer, spec.options["threshold"])
            pipe = diffusers.FluxFillPipeline(**parts)
            runner: VariantRunner = DiffusersRunner(spec, pipe, device, 0.0)
            runner.counts_skips = counts
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
