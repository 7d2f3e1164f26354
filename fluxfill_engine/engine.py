"""The serving-facing API: load and configure once, then run many validated requests.

``FluxFillEngine.run(FillRequest(...), on_event=...)`` returns a :class:`~.request.FillResult` with the
images, the seed used, per-stage timings and stats, and reports lifecycle :class:`~.request.Event`
objects on the way:
``accepted``, ``preprocess_start``, ``preprocess_end``, ``step`` (one per step), ``decode_start``,
``decode_end``, ``done`` -- or ``error`` with the message, after which the exception is re-raised.

``FluxFillEngine.run_batch([...])`` runs requests with equal ``batch_key`` as one pass of the model
(the server's batching): one result per request, the batch's events once. The request types live in
:mod:`.request` and are exported here too.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import threading
import time
from collections.abc import Hashable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import PIL.Image
import torch

from .call import PipelineCall
from .config import EngineConfig, parse_dtype
from .diffusers_path import diffusers_cache_enabled
from .errors import InputError, InputFileNotFound, InputTypeError
from .framing import Frame, frame_working_size, make_frame
from .limits import MAX_CALL_BATCH, MAX_SEQUENCE_LENGTH
from .lora.spec import LoraSpec
from .pipeline import FluxFillPipeline
from .request import Event, EventHandler, FillRequest, FillResult
from .startup import StartReport

if TYPE_CHECKING:
    from .lora.adapters import AdapterSet
    from .stats import FillStats

__all__ = [
    "Event",
    "EventHandler",
    "FillRequest",
    "FillResult",
    "FluxFillEngine",
    "batch_fields",
    "load_pipeline",
    "naming_errors",
]

logger = logging.getLogger(__name__)


def _closing_error(emit: EventHandler, err: BaseException) -> None:
    """Send the request's ``error`` event; a handler failing on it too cannot hide ``err``."""
    message = str(err) if isinstance(err, (ValueError, TypeError, FileNotFoundError)) else None
    message = message or f"{type(err).__name__}: {err}".rstrip(": ")
    try:
        emit(Event("error", message=message))
    except BaseException:
        logger.exception("on_event raised on the `error` event of a request that failed with %r", err)


def _diffusers_folder(path: Path, name: str) -> Path:
    if not (path / "model_index.json").is_file():
        raise InputFileNotFound(
            f"`{name}`: {str(path)!r} is not a diffusers folder (no model_index.json)", name
        )
    return path


def load_pipeline(
    model: str | Path, base: str | Path | None = None, dtype: torch.dtype | None = None
) -> FluxFillPipeline:
    """A :class:`FluxFillPipeline` from a diffusers folder, or a single-file transformer + ``base`` folder."""
    path = Path(model)
    dtype_kwargs = {"dtype": dtype} if dtype is not None else {}
    if path.is_dir():
        return FluxFillPipeline.from_pretrained(_diffusers_folder(path, "model"), **dtype_kwargs)
    if not path.is_file():
        raise InputFileNotFound(f"`model`: no such folder or checkpoint file: {str(path)!r}", "model")
    if base is None:
        raise InputError(
            "`base` is required with a single-file `model`: a diffusers FLUX.1 Fill folder that provides "
            "the text encoders, VAE, scheduler and the transformer's config",
            "base",
        )
    from diffusers import FluxTransformer2DModel

    base = _diffusers_folder(Path(base), "base")
    transformer = FluxTransformer2DModel.from_single_file(
        str(path), config=str(base), subfolder="transformer", local_files_only=True, torch_dtype=dtype
    )
    return FluxFillPipeline.from_pretrained(base, transformer=transformer, **dtype_kwargs)


class FluxFillEngine:
    """Loads and configures the model once, then serves :class:`FillRequest` objects.

    Build it with :meth:`from_pretrained` (a diffusers folder) or from a :class:`FluxFillPipeline`
    (``FluxFillEngine(FluxFillPipeline(**components))``).

    Calls from several threads run one at a time (a lock around the model's pass of :meth:`run` and
    :meth:`run_batch`; :meth:`batch_key` says which requests may share a pass): one engine holds one
    model on one device, where concurrent requests would only contend; each request's results and
    stats are its own.
    """

    def __init__(
        self,
        pipeline: FluxFillPipeline,
        config: EngineConfig | None = None,
        device: str | torch.device | None = None,
        progress: bool = False,
    ) -> None:
        if not isinstance(pipeline, FluxFillPipeline):
            raise InputTypeError(
                f"`pipeline` must be a fluxfill_engine.FluxFillPipeline, got {type(pipeline).__name__}",
                "pipeline",
            )
        self.config = config or EngineConfig.preset("reference")
        self.pipeline = pipeline
        if device is not None and self.pipeline.place(self.config, device) is None:  # a memory plan places
            self.pipeline.to(device)
        build_start = time.perf_counter()
        self.pipeline.configure(self.config)
        self.pipeline.set_progress_bar_config(disable=not progress)
        self.pipeline.engine_transformer()  # build now: fails fast on an unavailable backend
        self.start_report = StartReport(seconds={"build": time.perf_counter() - build_start})
        self._lock = threading.Lock()

    @classmethod
    def from_pretrained(
        cls,
        model: str | Path,
        config: EngineConfig | None = None,
        device: str | torch.device | None = None,
        torch_dtype: str | torch.dtype | None = None,
        progress: bool = False,
        base: str | Path | None = None,
    ) -> FluxFillEngine:
        """Load a model; ``torch_dtype`` defaults to the config's ``dtype``.

        ``model`` is a diffusers FLUX Fill folder, or a single-file transformer checkpoint (BFL's
        ``flux1-fill-dev.safetensors`` or a diffusers-format file) together with ``base``, a diffusers
        folder that provides the other components and the transformer's config.

        ``model`` may also be a saved engine (:meth:`save`, ``fluxfill prepare``; ``config`` then
        defaults to the saved one) or a community fp8 single file (BFL layout, ``float8_e4m3fn``) with
        ``base``: both load their weights as the engine runs them (see :mod:`.saved_engine`).
        ``engine.start_report`` says where the start went (:mod:`.startup`).
        """
        from .saved_engine import is_saved_engine, load_prepared

        read_start = time.perf_counter()
        prepared = load_prepared(model, base, config, device, torch_dtype)
        if prepared is not None:
            pipeline, config = prepared
            source = "saved engine" if is_saved_engine(model) else "fp8 single file"
        else:
            config = config or EngineConfig.preset("reference")
            dtype = parse_dtype(torch_dtype, "torch_dtype") or config.torch_dtype
            pipeline = load_pipeline(model, base=base, dtype=dtype)
            source = "diffusers folder" if Path(model).is_dir() else "single file"
        read_weights = time.perf_counter() - read_start
        engine = cls(pipeline, config=config, device=device, progress=progress)
        engine.start_report.source = source
        engine.start_report.seconds = {"read_weights": read_weights, **engine.start_report.seconds}
        logger.info("engine loaded: %s", engine.start_report.line())
        return engine

    def save(self, directory: str | Path) -> dict[str, Any]:
        """Save this engine for a fast start (:mod:`.saved_engine`): the transformer's weights as they
        run (fused, quantized), a manifest, the compile cache (warm up first to fill it) and the other
        components; :meth:`from_pretrained` loads it. Returns the manifest."""
        from .saved_engine import save_engine

        with self._lock:
            return save_engine(self.pipeline, directory)

    @property
    def device(self) -> torch.device:
        return self.pipeline._execution_device

    def warmup(
        self,
        sizes: Sequence[tuple[int, int]] = ((1024, 1024),),
        num_inference_steps: int = 2,
        loras: Sequence[LoraSpec | dict[str, Any]] | None = None,
    ) -> dict[str, Any]:
        """Run one short request per ``(width, height)`` so compilation (and ``auto`` attention timing)
        happens before the first real request; then save the compile cache if one is configured.
        With ``loras`` (any set), each size also runs with it, then without, so a compiled engine has
        compiled its LoRA side path too (switching sets later compiles nothing).

        Returns ``{"seconds": {"WxH": s, ...}, "compile_cache": what was saved or None}``.
        """
        seconds = {}
        with self.start_report.phase("warm_up"):
            for width, height in sizes:
                image = PIL.Image.new("RGB", (width, height), (128, 128, 128))
                mask = PIL.Image.new("L", (width, height), 0)
                mask.paste(255, (width // 4, height // 4, 3 * width // 4, 3 * height // 4))
                request = FillRequest("warm-up", image, mask, width, height, num_inference_steps, seed=0)
                start = time.perf_counter()
                self.run(request)
                if loras:
                    self.run(dataclasses.replace(request, loras=loras))
                    self.run(request)
                seconds[f"{width}x{height}"] = time.perf_counter() - start
        logger.info("engine warmed up: %s", self.start_report.line())
        saved = None
        if self.config.compile and self.config.compile_cache_dir is not None:
            saved = self.pipeline.save_compile_cache()
        return {"seconds": seconds, "compile_cache": saved}

    def memory_report(self) -> dict[str, dict[str, int]]:
        """Bytes of weights per component, before and after quantization (see the pipeline's)."""
        return self.pipeline.memory_report()

    def memory_estimate(self, width: int = 1024, height: int = 1024, batch: int = 1) -> dict[str, Any]:
        """The device-memory estimate of this engine's memory plan for one request at ``width`` x
        ``height`` (:func:`~.memory_plan.estimate_config`, counted on the meta device for this model's
        architecture), and where the components are placed; for checking against measured peaks."""
        from .memory_plan import ModelConfigs, estimate_config

        dtype = self.config.dtype or str(self.pipeline.transformer.dtype).replace("torch.", "")
        config = dataclasses.replace(self.config, dtype=dtype)
        placement = self.pipeline.memory_placement
        where = {"placement": None if placement is None else placement.describe()}
        try:
            estimate = estimate_config(config, width, height, batch, ModelConfigs.of_pipeline(self.pipeline))
        except (ValueError, TypeError, RuntimeError) as err:  # a model the estimate cannot rebuild on meta
            return {"error": f"no estimate: {type(err).__name__}: {err}", **where}
        return {**estimate.describe(), **where}

    def describe(self) -> dict[str, Any]:
        """What is running: the configuration, device, dtypes and model sizes, the memory plan's
        estimated peak at 1024x1024 (``memory``), and with ``auto`` attention what it chose per shape
        (``auto_attention_choices``) and the candidates it dropped with their reasons
        (``auto_attention_dropped``)."""
        from fluxfill_kernels import native

        from .attention import AutoAttention

        transformer = self.pipeline.transformer
        fill = self.pipeline.engine_transformer()
        plan = fill.quant_plan
        info = {
            "config": self.config.describe(),
            "quantization": None
            if plan is None
            else {"mode": plan.mode, "backend": plan.backend, "why": plan.reason},
            "compiled": fill.compile_settings is not None,
            "compile_cache_loaded": self.pipeline.compile_cache,
            "device": str(self.device),
            "transformer_dtype": str(transformer.dtype).replace("torch.", ""),
            "transformer_parameters": sum(p.numel() for p in transformer.parameters()),
            "transformer": "fluxfill FillTransformer (fused QKV, split input projection)",
            **{key: value for key, value in self.pipeline.describe().items() if key != "config"},
            "attention": self.config.attention,
            "fused_kernels": self.config.fused_kernels,
            "native_kernels_loaded": native.available("fill_cond", "cpu"),
            "native_kernels_unavailable": native.unavailable_reason(),
            "memory": self.memory_estimate(),
        }
        if isinstance(fill.attention, AutoAttention):
            info["auto_attention_choices"] = {str(k): v for k, v in fill.attention.choices.items()}
            # A candidate that failed to compile or launch is gone for good: the record says which and why.
            info["auto_attention_dropped"] = dict(fill.attention.dropped)
        return info

    def run(self, request: FillRequest, on_event: EventHandler | None = None) -> FillResult:
        """Run one request; ``on_event`` receives its events (see :class:`Event`).

        Every request ends with exactly one ``done`` or ``error`` event. An invalid request raises
        before any work (after its ``error`` event) and leaves the engine as it was. An exception (or
        ``KeyboardInterrupt``) raised by ``on_event`` stops the request with an ``error`` event and is
        re-raised, except at ``done``: the result is finished then, so it is returned and the handler's
        exception is logged.
        """
        return self._serve([request], on_event, batch=False)[0]

    def run_batch(
        self, requests: Sequence[FillRequest], on_event: EventHandler | None = None
    ) -> list[FillResult]:
        """Run several requests as one pass of the model: one call whose batch is all their images
        (``sum(num_images)``, at most 64); one :class:`FillResult` per request, in order.

        The requests may differ in everything but their :meth:`batch_key` (prompts, images, masks,
        seeds, ``num_images``, ``paste_back``, ``mask_grow``, ``mask_blur``, ...). Each request is
        prepared as alone (its prompt through the prompt cache, its own seed's generator drawn in the
        same order), so its images are those :meth:`run` gives it up to the GEMMs' rounding for
        another batch size: on a CPU in fp32 the decoded images agree to ~1e-6 before their 8-bit
        rounding, so about 1 value in 1e5 differs by one level (tested: ``tests/engine/test_engine_batch.py``);
        a batch of one is :meth:`run` exactly. On a GPU the kernels chosen per shape differ too
        (not measured yet).

        Every request is validated before any work; an invalid one, or one whose batch key differs
        from ``requests[0]``'s, raises ``ValueError``/``TypeError``/``FileNotFoundError`` naming
        ``requests[i]`` and the field. ``on_event`` gets the batch's events, once, as :meth:`run`'s
        (``accepted``, ``preprocess_*``, one ``step`` per step, ``decode_*``, then ``done`` or
        ``error``); an exception it raises stops the whole batch (``error``, then re-raised).

        Each result has its own images, seed and stats (with ``batch_size``: the images in the pass,
        and ``batch_requests``); the stage timings (``text_encode``, ``vae_encode``, ``denoise``,
        ``decode``) are the batch's, the same in every result, and ``total`` runs to that request's
        images being composed.
        """
        return self._serve(requests, on_event, batch=True)

    def batch_key(self, request: FillRequest) -> Hashable | None:
        """For a validated request (:meth:`FillRequest.validated`): requests with equal keys can run
        together in :meth:`run_batch`; ``None``: the request must run alone.

        The key holds what one pass of the model shares: the working size (computed as the framing
        does, from sizes and, with ``crop_to_mask``, the mask's box; the model does not run), which
        ``width``/``height``, ``max_megapixels``, ``crop_to_mask``, ``crop_padding``, ``mask_grow``,
        ``mask_blur`` and ``outpaint`` decide; ``num_inference_steps``; ``guidance_scale``;
        ``soft_mask``; the LoRAs (paths and scales, in order). With the engine's step cache each
        request of a batch decides its own steps, as alone (the remaining blocks run on the rows of the
        requests that compute a step). Every request runs alone (``None``) while diffusers' cache is on
        the transformer: its decision is one for the whole pass.
        """
        if self._runs_alone():
            return None
        return tuple(batch_fields(request).items())

    def _runs_alone(self) -> bool:
        return diffusers_cache_enabled(self.pipeline.transformer)

    def _serve(
        self, requests: Sequence[FillRequest], on_event: EventHandler | None, batch: bool
    ) -> list[FillResult]:
        """:meth:`run` (one request, its own messages) and :meth:`run_batch` (``requests[i]: ...``)."""
        if on_event is not None and not callable(on_event):
            raise InputTypeError(
                f"`on_event` must be callable (it receives Event objects), got {on_event!r}", "on_event"
            )
        emit = on_event or (lambda event: None)
        try:
            requests, loras = self._accepted(requests, batch)  # checked and files read: no work yet
            emit(Event("accepted"))
            results = self._run(requests, emit, loras)
        except BaseException as err:
            _closing_error(emit, err)
            raise
        try:
            emit(Event("done"))
        except Exception:
            logger.exception("on_event raised on the `done` event; the finished result is returned")
        return results

    def _accepted(
        self, requests: Sequence[FillRequest], batch: bool
    ) -> tuple[list[FillRequest], AdapterSet | None]:
        """The validated requests and their LoRA set; in a batch, errors name ``requests[i]``."""
        if batch and (isinstance(requests, FillRequest) or not isinstance(requests, Sequence)):
            raise InputTypeError(
                f"`requests` must be a non-empty list of FillRequest objects, got {requests!r}", "requests"
            )
        if batch and not requests:
            raise InputError("`requests` is empty: a batch needs at least one FillRequest", "requests")
        checked = []
        for index, request in enumerate(requests):
            with naming_errors(f"requests[{index}]" if batch else None):
                if batch and not isinstance(request, FillRequest):
                    raise InputTypeError(f"a FillRequest was expected, got {type(request).__name__}")
                checked.append(request.validated(self.config.max_input_megapixels, self.config.max_loras))
        if self.config.context_parallel > 1:
            from .parallel import broadcast_seed

            for given, request in zip(requests, checked, strict=True):
                if given.seed is None:  # a seed drawn per rank would give every rank other noise
                    request.seed = broadcast_seed(request.seed)
        total = sum(request.num_images for request in checked)
        if total > MAX_CALL_BATCH:
            raise InputError(
                f"the requests ask for {total} images in one batch; at most {MAX_CALL_BATCH}",
                "requests" if batch else "num_images",
            )
        if batch and len(checked) > 1:
            if self._runs_alone():
                raise ValueError(
                    "requests run alone while diffusers' cache is on the transformer (batch_key is None): "
                    "one at a time"
                )
            first = batch_fields(checked[0])
            for index, request in enumerate(checked[1:], start=1):
                for name, value in batch_fields(request).items():
                    if value != first[name]:
                        raise InputError(
                            f"requests[{index}]: `{name}` is {value!r} but requests[0] has {first[name]!r}; "
                            "requests in one batch must have equal batch keys (FluxFillEngine.batch_key)",
                            f"requests[{index}].{name}",
                        )
        with naming_errors("requests[0]" if batch else None):  # one LoRA set: the batch keys are equal
            loras = self.pipeline.load_engine_loras(checked[0].loras)
        return checked, loras

    def _run(
        self, requests: Sequence[FillRequest], emit: EventHandler, loras: AdapterSet | None = None
    ) -> list[FillResult]:
        public = {"preprocess_start", "preprocess_end", "decode_start", "decode_end"}

        def on_stage(name: str, step: int | None = None, total: int | None = None) -> None:
            if name == "step" and step is not None:
                emit(Event("step", step=step + 1, total=total))
            elif name in public:
                emit(Event(name))

        start = time.perf_counter()
        frames = [make_frame(request.image, request.mask, *_frame_options(request)) for request in requests]
        sizes = {frame.working_size for frame in frames}
        if len(sizes) > 1:  # batch_key computes the same working sizes: a bug if this is ever seen
            raise ValueError(
                f"the requests' working sizes differ ({sorted(sizes)}); they cannot share a batch"
            )
        calls = [_pipeline_call(request, frame) for request, frame in zip(requests, frames, strict=True)]
        with self._lock:
            self.pipeline.set_engine_loras(loras)
            results = self.pipeline.generate_batch(calls, on_stage=on_stage, soft_mask=requests[0].soft_mask)
        batch_size = sum(request.num_images for request in requests)
        finished = []
        for request, frame, result in zip(requests, frames, results, strict=True):
            images = frame.compose(result.images, request.paste_back, request.mask_blur)
            timings = {**result.timings, "total": time.perf_counter() - start}
            stats: FillStats = {
                **result.stats,
                "working_size": frame.working_size,
                "output_size": frame.canvas.size,
                "region": frame.region,
                "num_inference_steps": request.num_inference_steps,
                "num_images": request.num_images,
                "batch_size": batch_size,
                "batch_requests": len(requests),
                "preset_fields": self.config.describe(),
            }
            finished.append(FillResult(images=images, seed=_seed(request), timings=timings, stats=stats))
        return finished


def batch_fields(request: FillRequest) -> dict[str, Any]:
    """What one pass of the model shares, for a validated request: the fields of
    :meth:`FluxFillEngine.batch_key` by name (its working size computed as the framing does)."""
    specs = [spec for spec in request.loras or () if isinstance(spec, LoraSpec)]
    validated = isinstance(request.image, PIL.Image.Image) and (
        request.mask is None or isinstance(request.mask, PIL.Image.Image)
    )
    if not validated or len(specs) != len(request.loras or ()):
        raise InputTypeError("batch_key needs a validated request (FillRequest.validated(...))", "request")
    return {
        "working_size": frame_working_size(request.image.size, request.mask, *_frame_options(request)),
        "num_inference_steps": request.num_inference_steps,
        "guidance_scale": float(request.guidance_scale),
        "soft_mask": request.soft_mask,
        "loras": tuple((str(spec.path), float(spec.scale)) for spec in specs),
    }


def _seed(request: FillRequest) -> int:
    """The seed of a validated request (validation draws one when none was given)."""
    if request.seed is None:
        raise RuntimeError("a validated request has a seed")
    return request.seed


def _frame_options(request: FillRequest) -> tuple[Any, ...]:
    """:func:`~.framing.make_frame`'s arguments after the image and mask, from a validated request."""
    size = None if request.width is None else (request.width, request.height)
    return (
        size,
        request.outpaint,
        request.mask_grow,
        request.mask_blur,
        request.crop_to_mask,
        request.crop_padding,
        request.max_megapixels,
        request.soft_mask,
    )


def _pipeline_call(request: FillRequest, frame: Frame) -> PipelineCall:
    """The call for one framed request: the region at the working size, its own seed's generator."""
    image, mask = frame.model_inputs()
    width, height = frame.working_size
    return PipelineCall(
        prompt=request.prompt,
        image=image,
        mask_image=mask,
        height=height,
        width=width,
        num_inference_steps=request.num_inference_steps,
        guidance_scale=float(request.guidance_scale),
        num_images_per_prompt=request.num_images,
        generator=torch.Generator("cpu").manual_seed(_seed(request)),
        max_sequence_length=MAX_SEQUENCE_LENGTH,
    )


@contextlib.contextmanager
def naming_errors(prefix: str | None) -> Iterator[None]:
    """Input errors raised inside are placed under ``prefix`` (``requests[2]``): their message starts
    with ``prefix: ``, their field is ``prefix.<field>`` (:meth:`~.errors.InputError.within`); a plain
    ``ValueError``/``TypeError``/``FileNotFoundError`` becomes the :class:`~.errors.InputError` of its
    kind with the field ``prefix``. ``None``: unchanged."""
    try:
        yield
    except (ValueError, TypeError, FileNotFoundError) as err:
        if prefix is None:
            raise
        if isinstance(err, InputError):
            raise err.within(prefix) from err
        kinds = (
            (FileNotFoundError, InputFileNotFound),
            (TypeError, InputTypeError),
            (ValueError, InputError),
        )
        kind = next(ours for theirs, ours in kinds if isinstance(err, theirs))
        raise kind(f"{prefix}: {err}", prefix) from err
