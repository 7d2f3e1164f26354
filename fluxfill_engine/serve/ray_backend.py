"""Scale-out over a Ray cluster: N engine replicas (Ray Serve deployments, one GPU each) behind one
``fluxfill serve`` ingress.

The ingress (this process: the HTTP API, the task store, the events) stays as it is; its engine is a
:class:`RayEngine`, whose ``run`` sends the checked request to a replica and relays the replica's
progress events back as they happen (a streaming Ray Serve call). The service runs one worker thread
per replica, so N passes run at once; queued tasks that fit together go to one replica as a batch
(``RayEngine.run_batch``: ``FluxFillEngine.run_batch`` there), a backlog shared among the idle workers.

LoRA-aware routing: a request's LoRA set is its multiplexed model id (``@serve.multiplexed``), so Ray
Serve sends it to a replica that has that set loaded when there is one; each replica keeps a few sets.
LoRA paths and ``--model`` must name the same files on every machine (shared storage).

Ray Serve because it already does what a home-made pool would have to: replicas placed on the GPUs
of a cluster's machines, restarted when they die, autoscaled on queue length, and routed by model id.
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
from collections.abc import AsyncIterator, Callable, Hashable, Sequence
from dataclasses import asdict, dataclass
from typing import Any, TypeVar, cast

from ray import serve

from ..config import EngineConfig
from ..engine import Event, FillRequest, FillResult, batch_fields, naming_errors
from .engines import EngineSpec, build_engine
from .inputs import checked_loras

DEPLOYMENT = "FluxFillReplica"

_Loader = TypeVar("_Loader", bound=Callable[..., Any])


def _multiplexed(max_models: int) -> Callable[[_Loader], _Loader]:
    """``serve.multiplexed(max_num_models_per_replica=max_models)``, typed as the decorator it is here:
    Ray leaves its return unannotated, inferred as the union of its two forms (the decorator, or the
    decorated loader when given one), which cannot be called as the loader."""
    return cast("Callable[[_Loader], _Loader]", serve.multiplexed(max_num_models_per_replica=max_models))


def lora_key(request: FillRequest) -> str:
    """The multiplexed model id of a checked request: its LoRA set (``""``: none)."""
    if not request.loras:
        return ""
    specs = [{"path": str(spec.path), "scale": float(spec.scale)} for spec in checked_loras(request)]
    return json.dumps(specs, sort_keys=True)


class _Stop(Exception):
    """The ingress stopped listening (canceled task): end the replica's pass at its next step."""


@serve.deployment(name=DEPLOYMENT, max_ongoing_requests=2)
class FillReplica:
    """One engine on one device; runs one pass at a time (the engine's lock): a request, or a batch
    of requests the ingress put together."""

    def __init__(self, spec: EngineSpec) -> None:
        self.engine = build_engine(spec)
        self.replica = f"{os.uname().nodename}:{os.getpid()}"

    @_multiplexed(max_models=4)
    async def lora_set(self, key: str) -> Any:
        """Load (and keep) a LoRA set: Ray Serve then routes requests with this key here."""
        loras = [dict(item) for item in json.loads(key)]
        return await asyncio.to_thread(self.engine.pipeline.load_engine_loras, loras)

    async def run(self, request: FillRequest) -> AsyncIterator[dict[str, Any]]:
        """Stream ``{"event": ...}`` dicts while the request runs, then ``{"results": [result]}``."""
        async for item in self._stream(lambda on_event: [self.engine.run(request, on_event=on_event)]):
            yield item

    async def run_batch(self, requests: list[FillRequest]) -> AsyncIterator[dict[str, Any]]:
        """:meth:`run` for requests with equal batch keys, as one pass (``engine.run_batch``)."""
        async for item in self._stream(lambda on_event: self.engine.run_batch(requests, on_event=on_event)):
            yield item

    async def _stream(self, work: Any) -> AsyncIterator[dict[str, Any]]:
        """Run ``work(on_event)`` on a thread, streaming its events, then its results."""
        key = serve.get_multiplexed_model_id()
        if key:
            await self.lora_set(key)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        stop = threading.Event()

        def on_event(event: Event) -> None:
            if stop.is_set() and event.type not in ("error", "done"):
                raise _Stop()
            loop.call_soon_threadsafe(queue.put_nowait, ("event", event))

        def run() -> None:
            try:
                results = work(on_event)
                loop.call_soon_threadsafe(queue.put_nowait, ("results", results))
            except BaseException as err:
                loop.call_soon_threadsafe(queue.put_nowait, ("error", err))

        worker = threading.Thread(target=run, daemon=True)
        worker.start()
        try:
            while True:
                kind, item = await queue.get()
                if kind == "event":
                    yield {"event": asdict(item)}
                elif kind == "results":
                    for result in item:
                        result.stats["replica"] = self.replica
                    yield {"results": item}
                    return
                else:
                    raise item
        finally:
            stop.set()  # canceled by the ingress, or done: either way nothing more to do


class RayEngine:
    """What the task service needs of an engine, served by Ray Serve replicas."""

    def __init__(
        self, handle: Any, replicas: int, spec: EngineSpec, max_input_megapixels: float, max_loras: int
    ) -> None:
        self.handle = handle.options(stream=True)
        self.replicas = replicas
        self.spec = spec
        self.device = _Device(spec.device)
        self.max_input_megapixels = max_input_megapixels
        self.max_loras = max_loras

    def run(self, request: FillRequest, on_event: Any = None) -> FillResult:
        """Run ``request`` on a replica; ``on_event`` gets its events here, and raising from it
        cancels the replica's pass."""
        request = self._validated(request)
        return self._call("run", request, lora_key(request), on_event)[0]

    def run_batch(self, requests: Sequence[FillRequest], on_event: Any = None) -> list[FillResult]:
        """Run requests with equal :meth:`batch_key` as one pass on one replica
        (``FluxFillEngine.run_batch`` there); ``on_event`` as :meth:`run`'s."""
        checked = []
        for index, request in enumerate(requests):
            with naming_errors(f"requests[{index}]"):
                checked.append(self._validated(request))
        return self._call("run_batch", checked, lora_key(checked[0]), on_event)

    def warmup(self, sizes: Sequence[tuple[int, int]]) -> dict[str, Any]:
        """Nothing to do here: each replica warms up as it starts (``EngineSpec.warmup_sizes``)."""
        return {"seconds": {}, "compile_cache": None}

    def batch_key(self, request: FillRequest) -> Hashable:
        """As ``FluxFillEngine.batch_key`` for the replicas' engine, for a validated request."""
        return tuple(batch_fields(request).items())

    def _validated(self, request: FillRequest) -> FillRequest:
        return request.validated(self.max_input_megapixels, self.max_loras)

    def _call(self, method: str, payload: Any, lora_set: str, on_event: Any) -> list[FillResult]:
        responses = getattr(self.handle.options(multiplexed_model_id=lora_set), method).remote(payload)
        try:
            for item in responses:
                if "results" in item:
                    return item["results"]
                if on_event is not None:
                    on_event(Event(**item["event"]))
        except BaseException:
            responses.cancel()
            raise
        raise RuntimeError("the replica ended without a result")


@dataclass(frozen=True)
class _Device:
    """``engine.device`` for /healthz and metrics: the replicas' device kind."""

    name: str

    @property
    def type(self) -> str:
        return self.name.split(":")[0]

    def __str__(self) -> str:
        return f"{self.name} (ray replicas)"


_LOCAL_START_TIMEOUT = "timed out during startup"


def start_ray(address: str | None = None, **init_kwargs: Any) -> None:
    """Join the cluster at ``address``, or start a local one, unless this process already has one.

    Ray waits a fixed 30 s for a new local node's raylet to register; on a busy machine (a few cores,
    other work running) that can run out, so a local start that timed out is tried once more."""
    import ray

    if ray.is_initialized():
        return
    init_kwargs.setdefault("log_to_driver", False)
    tries = 1 if address else 2
    for attempt in range(tries):
        try:
            ray.init(address=address, **init_kwargs)
            return
        except Exception as error:  # Ray raises a bare Exception for this
            if _LOCAL_START_TIMEOUT not in str(error) or attempt == tries - 1:
                raise
            ray.shutdown()


def deploy(
    spec: EngineSpec,
    replicas: int,
    address: str | None = None,
    autoscale: tuple[int, int] | None = None,
    max_input_megapixels: float = 40.0,
    max_loras: int = 3,
) -> RayEngine:
    """Start (or join, with ``address``) a Ray cluster, deploy the replicas, and return the engine
    the ingress uses. ``autoscale`` = (min, max) replicas instead of a fixed count."""
    start_ray(address)
    gpus = 1 if spec.device.startswith("cuda") else 0
    options: dict[str, Any] = {"ray_actor_options": {"num_gpus": gpus, "num_cpus": 1}}
    if autoscale is not None:
        low, high = autoscale
        options["autoscaling_config"] = {
            "min_replicas": low,
            "max_replicas": high,
            "target_ongoing_requests": 1,
        }
        replicas = high
    else:
        options["num_replicas"] = replicas
    serve.start(http_options={"location": "NoServer"})  # the ingress is ours: no Ray HTTP proxies
    application = FillReplica.options(**options).bind(spec)
    handle = serve.run(application, name="fluxfill", route_prefix=None)
    return RayEngine(handle, replicas, spec, max_input_megapixels, max_loras)


def shutdown() -> None:
    """Stop Ray Serve and leave the cluster; nothing when this process has no cluster (Ray Serve's
    own shutdown would start one just to stop it)."""
    import ray

    if ray.is_initialized():
        serve.shutdown()
        ray.shutdown()


def build(args: dict[str, str]) -> Any:
    """The Ray Serve application for an existing cluster: ``serve run`` deploys the whole service
    (the ingress with the HTTP API, task store and events; the engine replicas)::

        serve run fluxfill_engine.serve.ray_backend:build model=/models/FLUX.1-Fill-dev replicas=4 \\
            device=cuda preset=fast data_dir=/shared/fluxfill api_keys=K1,K2

    Arguments (all optional): ``model`` (default: the tiny model), ``base``, ``preset``, ``device``
    (``cuda`` gives each replica one GPU), ``dtype``, ``replicas`` or ``autoscale=MIN,MAX``,
    ``data_dir`` (the ingress's task store and files; default ``fluxfill-data``), ``max_queue``,
    ``max_batch``, ``retention_hours``, ``task_retention_days``, ``api_keys`` (comma-separated), ``lora_dir``, ``warmup`` (``WxH,...``).
    """
    from pathlib import Path

    from .app import ServerConfig, create_app
    from .inputs import ServerOptions
    from .service import ServiceSettings

    unknown = sorted(set(args) - set(_BUILD_ARGS))
    if unknown:
        raise ValueError(f"unknown argument(s) {unknown}; allowed: {sorted(_BUILD_ARGS)}")
    device = args.get("device", "cpu")
    dtype = args.get("dtype", "bfloat16" if device.startswith("cuda") else "float32")
    preset = args.get("preset", "reference")
    engine_config = EngineConfig.preset(preset, dtype=dtype)
    warmup = tuple(_size(size) for size in args.get("warmup", "").split(",") if size)
    spec = EngineSpec(args.get("model"), args.get("base"), preset, device, dtype, warmup)
    autoscale = tuple(int(n) for n in args["autoscale"].split(",")) if "autoscale" in args else None
    replicas = autoscale[1] if autoscale else int(args.get("replicas", 1))
    options: dict[str, Any] = {
        "ray_actor_options": {"num_gpus": 1 if device.startswith("cuda") else 0, "num_cpus": 1}
    }
    if autoscale:
        options["autoscaling_config"] = {
            "min_replicas": autoscale[0],
            "max_replicas": autoscale[1],
            "target_ongoing_requests": 1,
        }
    else:
        options["num_replicas"] = replicas
    config = ServerConfig(
        service=ServiceSettings(
            data_dir=Path(args.get("data_dir", "fluxfill-data")),
            max_queue=int(args.get("max_queue", 64)),
            max_batch_images=int(args.get("max_batch", 4)),
            retention_hours=float(args.get("retention_hours", 24.0)),
            task_retention_days=float(args.get("task_retention_days", 30.0)),
        ),
        options=ServerOptions(
            lora_dir=Path(args["lora_dir"]) if "lora_dir" in args else None,
            max_input_megapixels=engine_config.max_input_megapixels,
            max_loras=engine_config.max_loras,
        ),
        api_keys=tuple(key for key in args.get("api_keys", "").split(",") if key),
        model=args.get("model", "tiny"),
        preset=preset,
        device=device,
        tiny_model="model" not in args,
    )
    limits = (engine_config.max_input_megapixels, engine_config.max_loras)

    def asgi_app() -> Any:  # runs on the ingress replica
        app_name = serve.get_replica_context().app_name
        handle = serve.get_deployment_handle(DEPLOYMENT, app_name=app_name)
        return create_app(config, lambda: RayEngine(handle, replicas, spec, *limits))

    ingress = serve.deployment(serve.ingress(asgi_app)(_Ingress), name="FluxFillIngress", num_replicas=1)
    return ingress.options(ray_actor_options={"num_cpus": 0}).bind(FillReplica.options(**options).bind(spec))


class _Ingress:
    """The ingress deployment; it holds the replicas' deployment so ``serve run`` deploys both."""

    def __init__(self, replicas: Any) -> None:
        self.replicas = replicas


_BUILD_ARGS = (
    "model",
    "base",
    "preset",
    "device",
    "dtype",
    "replicas",
    "autoscale",
    "data_dir",
    "max_queue",
    "max_batch",
    "retention_hours",
    "task_retention_days",
    "api_keys",
    "lora_dir",
    "warmup",
)


def _size(text: str) -> tuple[int, int]:
    """``"WxH"`` as ``(W, H)``."""
    width, height = (int(side) for side in text.lower().split("x"))
    return width, height
