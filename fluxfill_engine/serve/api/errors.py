"""Every refusal of the HTTP API, answered in one place: the exception handlers turn the service's and the
request checks' exceptions into a status, a message and the field it is about, in the shape of the API
the route belongs to:

- native: ``{"error": message, "field": name}``;
- WaveSpeed (routes tagged :data:`WAVESPEED`): ``{"code": status, "message": message, "data": null}``;
- OpenAI (routes tagged :data:`OPENAI`): ``{"error": {"message", "type", "param", "code"}}``, a value not
  allowed answered 400 as OpenAI does (its SDK then raises ``BadRequestError``).

Routes raise and never catch: :class:`ApiError` for what only a route knows (a missing file, a wrong key),
the service's ``QueueFull`` / ``NotFound`` / ``AlreadyFinished``, and ``InputError`` (``RequestError``
carries its own status) from the checks. A ``RecursionError`` can only come from a client's input nested
too deeply to read (JSON 100,000 levels deep): 400, never 500.
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
OPENAI = "openai"  # the tag of the OpenAI-compatible routes: their errors take OpenAI's shape
# Request fields by their OpenAI names, for the ``param`` of an OpenAI error.
_OPENAI_PARAMS = {"num_images": "n", "width": "size", "height": "size"}
_OPENAI_KINDS = {
    401: ("invalid_request_error", "invalid_api_key"),
    404: ("invalid_request_error", "not_found"),
    413: ("invalid_request_error", "request_too_large"),
    429: ("requests", "rate_limit_exceeded"),
}


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
    if isinstance(exc, RecursionError):
        return Refusal(400, "the request is nested too deeply to read (JSON nesting)")
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


def openai_error_response(
    status: int, message: str, field: str | None = None, headers: Mapping[str, str] | None = None
) -> JSONResponse:
    """An OpenAI API error: 422 answered 400; ``param`` the field by its OpenAI name."""
    status = 400 if status == 422 else status
    param = _OPENAI_PARAMS.get(field, field) if field else None
    if param != field and field:
        message = message.replace(f"`{field}`", f"`{param}` ({field})")
    fallback = ("server_error", None) if status >= 500 else ("invalid_request_error", None)
    kind, code = _OPENAI_KINDS.get(status, fallback)
    if code is None and status == 400 and param:
        code = "invalid_value"
    error = {"message": message, "type": kind, "param": param, "code": code}
    return JSONResponse({"error": error}, status_code=status, headers=headers)


def _api_of(request: Request) -> str | None:
    route = request.scope.get("route")  # set by the router once it matched the request
    tags = getattr(route, "tags", ())
    return WAVESPEED if WAVESPEED in tags else OPENAI if OPENAI in tags else None


async def _refused(request: Request, exc: Exception) -> JSONResponse:
    answer = refusal(exc)
    api = _api_of(request)
    if api == WAVESPEED:
        return wavespeed_error_response(answer.status, answer.message, answer.headers)
    if api == OPENAI:
        return openai_error_response(*answer)
    return error_response(*answer)


async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
    logger.exception("unhandled error on %s", request.url.path, exc_info=exc)
    message = "internal error (see the server log)"
    api = _api_of(request)
    if api == WAVESPEED:
        return wavespeed_error_response(500, message)
    if api == OPENAI:
        return openai_error_response(500, message)
    return error_response(500, message)


def install_error_handlers(app: FastAPI) -> None:
    """Answer the API's refusals as :func:`refusal` says, anything else as a 500 (logged)."""
    refused = (
        ApiError,
        InputError,
        QueueFull,
        NotFound,
        AlreadyFinished,
        StarletteHTTPException,
        RecursionError,
    )
    for kind in refused:
        app.add_exception_handler(kind, _refused)
    app.add_exception_handler(Exception, _internal_error)
