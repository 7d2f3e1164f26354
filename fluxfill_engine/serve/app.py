"""The HTTP layer of ``fluxfill serve`` (FastAPI): parse, call the :class:`~.service.TaskService`,
render. The API is documented in docs/serving.md.

FastAPI (on Starlette and uvicorn) because it gives HTTP, Server-Sent Events (streaming
responses), WebSockets, multipart uploads and a lifespan for the worker in one small, well-known
dependency set; request bodies are parsed by :mod:`.inputs`, not by pydantic models, so that every
refusal names the field in the engine's own words.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hmac
import json
import logging
import mimetypes
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request, WebSocket, WebSocketDisconnect
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from . import events as ev
from .inputs import RequestError, ServerOptions, TaskSpec, parse_task
from .metrics import ServeMetrics
from .service import AlreadyFinished, NotFound, QueueFull, ServiceSettings, TaskService, task_summary
from .store import CANCELED, COMPLETED, FAILED, QUEUED, RUNNING, Task, TaskStore

if TYPE_CHECKING:
    from ..engine import FluxFillEngine

logger = logging.getLogger(__name__)
STATIC_DIR = Path(__file__).parent / "static"
WAVESPEED_MODEL = "wavespeed-ai/flux-fill-dev"
_WAVESPEED_STATUS = {QUEUED: "created", RUNNING: "processing", COMPLETED: "completed", FAILED: "failed"}
_SSE_PING_SECONDS = 15.0
_SYNC_MODE_TIMEOUT = 600.0


@dataclass
class ServerConfig:
    """Everything ``fluxfill serve`` was started with."""

    service: ServiceSettings
    options: ServerOptions = field(default_factory=ServerOptions)
    api_keys: Sequence[str] = ()
    max_request_bytes: int = 64 * 2**20
    model: str = "tiny"
    preset: str = "reference"
    device: str = "cpu"
    tiny_model: bool = True
    webhook_secret: str | None = None


class _BodyLimit:
    """ASGI middleware: request bodies over ``limit`` bytes answer 413 before any parsing (also for
    chunked uploads, which carry no Content-Length)."""

    def __init__(self, app: Any, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            await self._refuse(send)
            return
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.limit:
                await self._refuse(send)
                return
            chunks.append(chunk)
            more = message.get("more_body", False)
        body = b"".join(chunks)
        replayed = False

        async def replay() -> dict:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _refuse(self, send: Callable) -> None:
        message = json.dumps(
            {"error": f"the request body is over the limit of {self.limit} bytes", "field": None}
        ).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [(b"content-type", b"application/json")],
            }
        )
        await send({"type": "http.response.body", "body": message})


def _error(
    status: int, message: str, field: str | None = None, headers: dict[str, str] | None = None
) -> JSONResponse:
    return JSONResponse({"error": message, "field": field}, status_code=status, headers=headers)


def _wavespeed_error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(
        {"code": status, "message": message, "data": None}, status_code=status, headers=headers
    )


def _iso(seconds: float | None) -> str | None:
    if seconds is None:
        return None
    return (
        datetime.fromtimestamp(seconds, timezone.utc)
        .isoformat(timespec="milliseconds")
        .replace("+00:00", "Z")
    )


def create_app(config: ServerConfig, engine_factory: Callable[[], FluxFillEngine], **addons: Any) -> FastAPI:
    """The application: ``engine_factory`` runs on the worker thread at startup; ``addons`` are the
    optional ``enhancer`` and ``safety_checker`` objects (see :mod:`.enhance`, :mod:`.safety`)."""
    data_dir = config.service.data_dir
    data_dir.mkdir(parents=True, exist_ok=True)
    store = TaskStore(data_dir / "tasks.sqlite3")
    hub = ev.EventHub()
    service_ref: dict[str, TaskService] = {}

    def gpu_memory() -> float:
        engine = service_ref["service"].engine if service_ref else None
        if engine is None or engine.device.type != "cuda":
            return 0.0
        import torch

        return float(torch.cuda.memory_allocated(engine.device))

    metrics = ServeMetrics(queue_depth=lambda: service_ref["service"].queue_depth(), gpu_memory=gpu_memory)
    webhooks = None
    if config.options.url_policy.allow:
        from .webhooks import WebhookSender, generate_secret

        secret = config.webhook_secret or _stored_secret(data_dir, generate_secret)
        webhooks = WebhookSender(secret, config.options.url_policy)
    options = ServerOptions(
        **{
            **config.options.__dict__,
            "lora_cache_dir": data_dir / "lora-cache",
            "has_enhancer": addons.get("enhancer") is not None,
            "has_safety_checker": addons.get("safety_checker") is not None,
        }
    )
    service = TaskService(
        store,
        config.service,
        engine_factory,
        hub,
        metrics=metrics,
        webhooks=webhooks,
        enhancer=addons.get("enhancer"),
        safety_checker=addons.get("safety_checker"),
    )
    service_ref["service"] = service

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        hub.attach(asyncio.get_running_loop())
        service.start()
        try:
            yield
        finally:
            await run_in_threadpool(service.stop)
            if webhooks is not None:
                await run_in_threadpool(webhooks.close, 5.0)
            store.close()

    app = FastAPI(title="fluxfill serve", version="1", lifespan=lifespan, docs_url="/docs", redoc_url=None)
    app.add_middleware(_BodyLimit, limit=config.max_request_bytes)
    app.state.service = service
    app.state.config = config

    def authorized(headers: Any, query: Any = None) -> bool:
        """``query`` is given only where clients cannot set headers (EventSource, browser WebSockets):
        elsewhere a key in the URL would only end up in access logs."""
        if not config.api_keys:
            return True
        given = headers.get("authorization", "")
        token = given[7:].strip() if given.lower().startswith("bearer ") else ""
        if not token and query is not None:
            token = query.get("token", "")
        # Every key is compared (no early exit), each in constant time.
        matches = [hmac.compare_digest(token.encode(), key.encode()) for key in config.api_keys]
        return bool(token) and any(matches)

    def needs_key(request: Request, query_token: bool = False) -> JSONResponse | None:
        if authorized(request.headers, request.query_params if query_token else None):
            return None
        return _error(
            401,
            "missing or wrong API key (Authorization: Bearer KEY)",
            headers={"WWW-Authenticate": "Bearer"},
        )

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _error(exc.status_code, str(exc.detail))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error on %s", request.url.path)
        return _error(500, "internal error (see the server log)")

    def outputs_of(task: Task, base_url: str, inline: bool) -> list[str]:
        if task.files_deleted:
            return []
        if not inline:
            return [f"{base_url}/v1/files/{task.id}/{name}" for name in task.outputs]
        urls = []
        for name in task.outputs:
            data = (service.files_dir / task.id / name).read_bytes()
            kind = mimetypes.guess_type(name)[0] or "application/octet-stream"
            urls.append(f"data:{kind};base64,{base64.b64encode(data).decode()}")
        return urls

    def native_view(task: Task, request: Request) -> dict[str, Any]:
        view = task_summary(task)
        view["cancel_requested"] = service.cancel_requested(task.id)
        if task.request.get("enable_base64_output"):
            view["outputs"] = outputs_of(task, "", inline=True)
        return view

    def wavespeed_view(task: Task, request: Request) -> dict[str, Any]:
        base = str(request.base_url).rstrip("/")
        status = _WAVESPEED_STATUS.get(task.status, "failed")
        inference = task.timings.get("total")
        return {
            "id": task.id,
            "model": WAVESPEED_MODEL,
            "status": status,
            "outputs": outputs_of(task, base, bool(task.request.get("enable_base64_output")))
            if task.status == COMPLETED
            else [],
            "urls": {"get": f"{base}/api/v3/predictions/{task.id}/result"},
            "has_nsfw_contents": task.nsfw,
            "created_at": _iso(task.created_at),
            "error": task.error or ("canceled" if task.status == CANCELED else ""),
            "timings": {"inference": None if inference is None else round(inference * 1000)},
            "seed": task.seed,
        }

    async def parse_body(request: Request) -> dict[str, Any]:
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if kind == "multipart/form-data":
            form = await request.form()
            body: dict[str, Any] = {}
            for name, value in form.multi_items():
                if hasattr(value, "read"):
                    body[name] = await value.read()
                elif name in ("loras", "outpaint"):
                    try:
                        body[name] = json.loads(value)
                    except json.JSONDecodeError:
                        raise RequestError(f"`{name}` must be JSON text in a form field", 400, name) from None
                else:
                    body[name] = value if name == "prompt" else _form_value(value)
            return body
        raw = await request.body()
        try:
            body = json.loads(raw or b"null")
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise RequestError(f"the request body is not valid JSON: {err}", 400, None) from None
        if not isinstance(body, dict):
            raise RequestError("the request body must be a JSON object", 400, None)
        return body

    async def submit(request: Request, api: str) -> tuple[Task, bool, TaskSpec | None]:
        key = request.headers.get("idempotency-key")
        if key is not None and not 1 <= len(key) <= 255:
            raise RequestError("the Idempotency-Key header must be 1-255 characters", 400, "Idempotency-Key")
        if key is not None:
            existing = service.store.by_key(key)
            if existing is not None:
                return existing, False, None
        body = await parse_body(request)
        spec = await run_in_threadpool(parse_task, body, options, api)
        task, created = await run_in_threadpool(service.submit, spec, api, key)
        return task, created, spec

    async def wait_finished(task_id: str, timeout: float) -> Task:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        with hub.subscription(task_id) as news:
            while True:
                news.clear()
                task = await run_in_threadpool(service.get, task_id)
                if task.finished or loop.time() > deadline:
                    return task
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(news.wait(), max(0.01, deadline - loop.time()))

    # ------------------------------------------------------------ native API

    @app.get("/", include_in_schema=False)
    async def playground() -> Response:
        page = STATIC_DIR / "index.html"
        if not page.is_file():
            return _error(404, "the playground page is not installed")
        return FileResponse(page, media_type="text/html")

    @app.get("/healthz")
    async def healthz() -> JSONResponse:
        engine = service.engine
        body = {
            "status": service.state,
            "model": config.model,
            "preset": config.preset,
            "device": str(engine.device) if engine is not None else config.device,
            "tiny_model": config.tiny_model,
            "queue_depth": service.queue_depth(),
            "running": service.running(),
            "replicas": service.replicas,
            "warmup_seconds": service.warmup,
        }
        if service.load_error:
            body["error"] = service.load_error
        return JSONResponse(body, status_code=200 if service.state == "ready" else 503)

    @app.get("/metrics")
    async def metrics_page(request: Request) -> Response:
        refused = needs_key(request)
        if refused is not None:
            return refused
        return Response(metrics.render(), media_type="text/plain; version=0.0.4")

    @app.post("/v1/tasks")
    async def create_task(request: Request) -> JSONResponse:
        refused = needs_key(request)
        if refused is not None:
            return refused
        try:
            task, created, _ = await submit(request, "native")
        except RequestError as err:
            return _error(err.status, str(err), err.field)
        except QueueFull as err:
            return _error(429, str(err), headers={"Retry-After": str(err.retry_after)})
        return JSONResponse(native_view(task, request), status_code=201 if created else 200)

    @app.get("/v1/tasks/{task_id}")
    async def get_task(task_id: str, request: Request) -> JSONResponse:
        refused = needs_key(request)
        if refused is not None:
            return refused
        try:
            task = service.get(task_id)
        except NotFound:
            return _error(404, f"no task {task_id!r}", "id")
        return JSONResponse(native_view(task, request))

    @app.post("/v1/tasks/{task_id}/cancel")
    async def cancel_task(task_id: str, request: Request) -> JSONResponse:
        refused = needs_key(request)
        if refused is not None:
            return refused
        try:
            task = await run_in_threadpool(service.cancel, task_id)
        except NotFound:
            return _error(404, f"no task {task_id!r}", "id")
        except AlreadyFinished as err:
            return _error(409, f"task {task_id!r} has finished ({err}); nothing to cancel", "id")
        return JSONResponse(native_view(task, request))

    @app.get("/v1/tasks/{task_id}/events")
    async def task_events(task_id: str, request: Request) -> Response:
        refused = needs_key(request, query_token=True)
        if refused is not None:
            return refused
        try:
            service.get(task_id)
        except NotFound:
            return _error(404, f"no task {task_id!r}", "id")
        last = request.headers.get("last-event-id", "0")
        after = int(last) if last.isdigit() else 0

        async def stream() -> AsyncIterator[str]:
            async for event in follow(task_id, after):
                if event is None:
                    yield ": ping\n\n"
                    continue
                payload = {**event.data, "seq": event.seq, "time": event.time}
                yield f"id: {event.seq}\nevent: {event.name}\ndata: {json.dumps(payload)}\n\n"

        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        return StreamingResponse(stream(), media_type="text/event-stream", headers=headers)

    async def follow(task_id: str, after: int) -> AsyncIterator[Any]:
        """A task's events after ``after``, then live ones until its closing event; ``None`` now and
        then while nothing happens (for keep-alives)."""
        with hub.subscription(task_id) as news:
            while True:
                news.clear()
                # SQLite waits on the worker's writes: off the event loop, so other streams go on.
                for event in await run_in_threadpool(service.store.events, task_id, after):
                    after = event.seq
                    yield event
                    if event.name in ev.CLOSING_EVENTS:
                        return
                try:
                    await asyncio.wait_for(news.wait(), _SSE_PING_SECONDS)
                except asyncio.TimeoutError:
                    yield None

    @app.websocket("/v1/socket")
    async def socket(websocket: WebSocket) -> None:
        if not authorized(websocket.headers, websocket.query_params):
            await websocket.close(code=1008, reason="missing or wrong API key")
            return
        await websocket.accept()
        await websocket.send_json({"type": "connected", "version": "1.0"})
        sending = asyncio.Lock()
        followers: list[asyncio.Task] = []

        async def relay(task_id: str) -> None:
            async for event in follow(task_id, 0):
                if event is None:
                    continue
                message = {
                    "type": event.name,
                    "id": task_id,
                    "tasktoken": task_id,
                    "seq": event.seq,
                    "time": event.time,
                    "message": event.data,
                    "result": event.name != ev.TASK_ERROR,
                }
                async with sending:
                    await websocket.send_json(message)

        try:
            while True:
                try:
                    message = await websocket.receive_json()
                except (json.JSONDecodeError, UnicodeDecodeError, KeyError):
                    async with sending:
                        await websocket.send_json(
                            {"type": "error", "message": "messages must be JSON objects"}
                        )
                    continue
                token = message.get("tasktoken") if isinstance(message, dict) else None
                if (
                    not isinstance(message, dict)
                    or message.get("type") != "task_info"
                    or not isinstance(token, str)
                ):
                    async with sending:
                        await websocket.send_json(
                            {"type": "error", "message": 'send {"type": "task_info", "tasktoken": TASK_ID}'}
                        )
                    continue
                if service.store.get(token) is None:
                    async with sending:
                        await websocket.send_json(
                            {"type": "error", "tasktoken": token, "message": "no such task"}
                        )
                    continue
                followers.append(asyncio.create_task(relay(token)))
        except WebSocketDisconnect:
            pass
        finally:
            for follower in followers:
                follower.cancel()

    @app.get("/v1/files/{task_id}/{name}")
    async def output_file(task_id: str, name: str) -> Response:
        task = service.store.get(task_id)
        if task is None or name not in task.outputs or task.files_deleted:
            return _error(404, "no such file (or it expired)", "name")
        return FileResponse(service.files_dir / task_id / name)

    # ------------------------------------------------------------ WaveSpeed-compatible API

    @app.post(f"/api/v3/{WAVESPEED_MODEL}")
    async def wavespeed_submit(request: Request) -> JSONResponse:
        if not authorized(request.headers):
            return _wavespeed_error(401, "missing or wrong API key (Authorization: Bearer KEY)")
        try:
            task, _, spec = await submit(request, "wavespeed")
        except RequestError as err:
            return _wavespeed_error(err.status, str(err))
        except QueueFull as err:
            return _wavespeed_error(429, str(err), headers={"Retry-After": str(err.retry_after)})
        if spec is not None and spec.sync:
            task = await wait_finished(task.id, _SYNC_MODE_TIMEOUT)
        return JSONResponse({"code": 200, "message": "success", "data": wavespeed_view(task, request)})

    @app.get("/api/v3/predictions/{task_id}/result")
    async def wavespeed_result(task_id: str, request: Request) -> JSONResponse:
        if not authorized(request.headers):
            return _wavespeed_error(401, "missing or wrong API key (Authorization: Bearer KEY)")
        task = service.store.get(task_id)
        if task is None:
            return _wavespeed_error(404, f"no prediction {task_id!r}")
        return JSONResponse({"code": 200, "message": "success", "data": wavespeed_view(task, request)})

    return app


def _form_value(value: str) -> Any:
    """A multipart text field as the JSON value it spells (numbers, booleans), else the text."""
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError:
        return value
    return parsed if isinstance(parsed, (int, float, bool)) or parsed is None else value


def _stored_secret(data_dir: Path, generate: Callable[[], str]) -> str:
    """The webhook signing secret kept in the data folder, so signatures verify across restarts."""
    path = data_dir / "webhook_secret"
    if not path.exists():
        path.write_text(generate())
        path.chmod(0o600)
    return path.read_text().strip()
