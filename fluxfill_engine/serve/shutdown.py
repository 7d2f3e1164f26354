"""A graceful stop of ``fluxfill serve`` with clients connected (SIGTERM, Ctrl-C).

:meth:`GracefulShutdown.begin`, called from the signal handler, starts it; from then on:

1. new requests are answered 503 (:class:`RefuseWhileStopping`; uvicorn also stops listening);
2. no new pass starts; the running tasks get ``grace_s`` seconds, then are canceled with their closing
   event (:meth:`.service.TaskService.drain`); queued tasks stay queued for the next start;
3. the event hub closes: event streams, WebSockets and sync-mode waits end, so no connection holds the
   process; then the lifespan ends (:meth:`GracefulShutdown.finish`) and the process exits.

A stop without a signal (the lifespan ending on its own, as in tests) drains with no grace.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from starlette.concurrency import run_in_threadpool

from .api.errors import error_response, wavespeed_error_response
from .service import TaskService

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
STOPPING = "the server is shutting down; retry after its restart"
RETRY_AFTER_S = 10  # what a refused client is told to wait: a restart of the process


class GracefulShutdown:
    """Drains ``service`` once: a grace of ``grace_s`` seconds when a signal began it (:meth:`begin`),
    none when the lifespan simply ends (:meth:`finish`)."""

    def __init__(self, service: TaskService, grace_s: float) -> None:
        self.service = service
        self.grace_s = grace_s
        self.draining = False  # set from the signal handler: new requests are refused from then on
        self._loop: asyncio.AbstractEventLoop | None = None
        self._drained: asyncio.Future[None] | None = None

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        """Bind to the server's event loop (at startup)."""
        self._loop = loop

    def begin(self) -> None:
        """Start the graceful stop (safe from a signal handler or any thread)."""
        self.draining = True
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self._start, self.grace_s)

    def _start(self, grace_s: float) -> None:
        if self._drained is None:
            self.draining = True
            self._drained = asyncio.ensure_future(self._drain(grace_s))

    async def _drain(self, grace_s: float) -> None:
        try:
            await run_in_threadpool(self.service.drain, grace_s)
        finally:
            self.service.hub.close()

    async def finish(self) -> None:
        """The lifespan's end: wait for the drain a signal began, or drain now without grace."""
        self._start(0.0)
        assert self._drained is not None
        await self._drained


class RefuseWhileStopping:
    """ASGI middleware: once the server is stopping, HTTP requests are answered 503 (WaveSpeed's shape
    under ``/api/v3/``) and WebSockets are refused before they open."""

    def __init__(self, app: Callable[[Scope, Receive, Send], Awaitable[None]], shutdown: GracefulShutdown):
        self.app = app
        self.shutdown = shutdown

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if not self.shutdown.draining or scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1012, "reason": STOPPING})
            return
        headers = {"Retry-After": str(RETRY_AFTER_S), "Connection": "close"}
        if str(scope.get("path", "")).startswith("/api/v3/"):
            refusal = wavespeed_error_response(503, STOPPING, headers)
        else:
            refusal = error_response(503, STOPPING, None, headers)
        await refusal(scope, receive, send)
