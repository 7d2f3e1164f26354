"""The HTTP layer of ``fluxfill serve``: one router per API (:mod:`.native`, :mod:`.wavespeed`,
:mod:`.uploads`, :mod:`.openai_images`, :mod:`.socket`, :mod:`.operations`), the API key as a dependency
(:mod:`.deps`), refusals answered once by exception handlers (:mod:`.errors`), the body limit as middleware
(:mod:`.middleware`). Routes parse, call the :class:`~fluxfill_engine.serve.service.TaskService` and
render; they never catch."""

from __future__ import annotations

from fastapi import FastAPI

from . import native, openai_images, operations, socket, uploads, wavespeed
from .errors import install_error_handlers
from .middleware import BodyLimit

ROUTERS = (
    operations.router,
    native.router,
    socket.router,
    wavespeed.router,
    uploads.wavespeed_router,
    uploads.files_router,
    openai_images.router,
    wavespeed.unknown_router,  # last: every other path under /api/v3/
)


def install(app: FastAPI, max_request_bytes: int) -> None:
    """Give ``app`` the routers, the error handlers and the middleware of the API."""
    app.add_middleware(BodyLimit, limit=max_request_bytes)
    install_error_handlers(app)
    for router in ROUTERS:
        app.include_router(router)
