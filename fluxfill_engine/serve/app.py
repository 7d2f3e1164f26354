"""The ``fluxfill serve`` application: :func:`create_app` wires a :class:`ServerConfig` and an engine
factory into a FastAPI app (the task store, the service and its worker, webhooks, the routers of
:mod:`.api`). The API is documented in docs/serving.md.

FastAPI (on Starlette and uvicorn) because it gives HTTP, Server-Sent Events (streaming
responses), WebSockets, multipart uploads and a lifespan for the worker in one small, well-known
dependency set; request bodies are parsed by :mod:`.inputs`, not by pydantic models, so that every
refusal names the field in the engine's own words.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI
from starlette.concurrency import run_in_threadpool

from . import api
from .lora_cache import LoraCache, lora_files_of
from .service import TaskService
from .settings import ServerConfig
from .shutdown import GracefulShutdown, RefuseWhileStopping
from .store import QUEUED, RUNNING, TaskStore

if TYPE_CHECKING:
    from .engines import ServingEngine

__all__ = ["ServerConfig", "create_app"]


def create_app(config: ServerConfig, engine_factory: Callable[[], ServingEngine], **addons: Any) -> FastAPI:
    """The application: ``engine_factory`` runs on the worker thread at startup; ``addons`` are the
    optional ``enhancer`` and ``safety_checker`` objects (see :mod:`.enhance`, :mod:`.safety`).

    ``app.state`` holds the ``service``, the ``config``, the request ``options`` the routes use and the
    ``shutdown`` (:class:`.shutdown.GracefulShutdown`: ``fluxfill serve`` begins it on SIGTERM)."""
    # An admin key is a key too: every check of "a valid key" reads api_keys alone.
    keys = tuple(dict.fromkeys([*config.api_keys, *config.admin_keys]))
    config = dataclasses.replace(config, api_keys=keys)
    data_dir = config.service.data_dir
    data_dir.mkdir(parents=True, exist_ok=True)
    store = TaskStore(data_dir / "tasks.sqlite3")
    webhooks = None
    if config.options.url_policy.allow:
        from .webhooks import WebhookSender, stored_secret

        webhooks = WebhookSender(config.webhook_secret or stored_secret(data_dir), config.options.url_policy)
    enhancer, safety_checker = addons.get("enhancer"), addons.get("safety_checker")
    options = dataclasses.replace(
        config.options,
        lora_cache=LoraCache(
            data_dir / "lora-cache",
            config.options.lora_cache_bytes,
            in_use=lambda: lora_files_of(store.by_status(QUEUED, RUNNING)),
        ),
        has_enhancer=enhancer is not None,
        has_safety_checker=safety_checker is not None,
    )
    service = TaskService(
        store,
        config.service,
        engine_factory,
        enhancer=enhancer,
        safety_checker=safety_checker,
        webhooks=webhooks,
    )
    assert options.lora_cache is not None
    options.lora_cache.register_metrics(service.metrics.registry)
    shutdown = GracefulShutdown(service, config.shutdown_grace_s)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        service.hub.attach(asyncio.get_running_loop())
        shutdown.attach(asyncio.get_running_loop())
        service.start()
        try:
            yield
        finally:
            await shutdown.finish()
            await run_in_threadpool(service.stop)
            if webhooks is not None:
                await run_in_threadpool(webhooks.close, 5.0)
            store.close()

    # The docs and the schema are routes of api.operations, behind the key like the API they describe.
    app = FastAPI(
        title="fluxfill serve",
        version="1",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    app.state.service = service
    app.state.config = config
    app.state.options = options
    app.state.shutdown = shutdown
    api.install(app, config.max_request_bytes)
    app.add_middleware(RefuseWhileStopping, shutdown=shutdown)  # added last: runs first
    return app
