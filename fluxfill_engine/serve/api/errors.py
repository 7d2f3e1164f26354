"""Every refusal of the HTTP API, answered in one place: the exception handlers turn the service's and the
request checks' exceptions into a status, a message and the field it is about, in the shape of the API
the route belongs to:

- native: ``{"error": message, "field": name}``;
- WaveSpeed (routes tagged :data:`WAVESPEED`): ``{"code": status, "message": message, "data": null}``.

Routes raise and never catch: :class:`ApiError` for what only a route knows (a missing file, a wrong key),
the service's ``QueueFull`` / ``NotFound`` / ``AlreadyFinished``, and ``InputError`` (``RequestError``
carries its own status) from the checks.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import NamedTuple

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ...errors import InputError
from ..inputs import RequestError
from ..service import AlreadyFinished, NotFound, QueueFull

logger = logging.getLogger(__name__)
WAVESPEED = "wavespeed"  # the tag of the WaveSpeed-compatible routes: their errors take WaveSpeed's shape


class ApiError(Exception):
    """A refusal only a route can tell: ``status``, the message, the ``field`` it is about."""

    def __init__(
        self, status: int, message: str, field: str | None = None, headers: Mapping[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.field = field
        self.headers = headers


class Refusal(NamedTuple):
    status: int
    message: str
    field: str | None = None
    headers: Mapping[str, str] | None = None


def refusal(exc: Exception) -> Refusal:
    """What the API answers to ``exc``, one of the exceptions :func:`install_error_handlers` handles."""
    if isinstance(exc, ApiError):
        return Refusal(exc.status, str(exc), exc.field, exc.headers)
    if isinstance(exc, RequestError):
        return Refusal(exc.status, str(exc), exc.field)
    if isinstance(exc, InputError):
        return Refusal(422, str(exc), exc.field)
    if isinstance(exc, QueueFull):
        return Refusal(429, str(exc), None, {"Retry-After": str(exc.retry_after)})
    if isinstance(exc, NotFound):
        return Refusal(404, f"no task {exc.task_id!r}", "id")
    if isinstance(exc, AlreadyFinished):
        return Refusal(409, f"task {exc.task_id!r} has finished ({exc.status}); nothing to cancel", "id")
    if isinstance(exc, StarletteHTTPException):
        return Refusal(exc.status_code, str(exc.detail), None, exc.headers)
    raise TypeError(f"no answer for {type(exc).__name__}")


def error_response(
    status: int, message: str, field: str | None = None, headers: Mapping[str, str] | None = None
) -> JSONResponse:
    """A native API error."""
    return JSONResponse({"error": message, "field": field}, status_code=status, headers=headers)


def wavespeed_error_response(
    status: int, message: str, headers: Mapping[str, str] | None = None
) -> JSONResponse:
    return JSONResponse(
        {"code": status, "message": message, "data": None}, status_code=status, headers=headers
    )


def _is_wavespeed(request: Request) -> bool:
    route = request.scope.get("route")  # set by the router once it matched the request
    return WAVESPEED in getattr(route, "tags", ())


async def _refused(request: Request, exc: Exception) -> JSONResponse:
    answer = refusal(exc)
    if _is_wavespeed(request):
        return wavespeed_error_response(answer.status, answer.message, answer.headers)
    return error_response(*answer)


async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
    logger.exception("unhandled error on %s", request.url.path, exc_info=exc)
    message = "internal error (see the server log)"
    if _is_wavespeed(request):
        return wavespeed_error_response(500, message)
    return error_response(500, message)


def install_error_handlers(app: FastAPI) -> None:
    """Answer the API's refusals as :func:`refusal` says, anything else as a 500 (logged)."""
    for kind in (ApiError, InputError, QueueFull, NotFound, AlreadyFinished, StarletteHTTPException):
        app.add_exception_handler(kind, _refused)
    app.add_exception_handler(Exception, _internal_error)
