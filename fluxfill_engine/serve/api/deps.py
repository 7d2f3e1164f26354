"""What routes take from the application (``app.state``, set by ``create_app``): the task
service, the server's configuration and request options, and the API key check.

Keys travel as ``Authorization: Bearer KEY``; the events stream and the WebSocket, which browsers open
without custom headers, also take ``?token=KEY``. Elsewhere a key in the URL would only end up in access
logs, so it is not read there.
"""

from __future__ import annotations

import hmac
from collections.abc import Mapping, Sequence
from typing import Annotated

from fastapi import Depends, Request, WebSocket, WebSocketException, status
from starlette.requests import HTTPConnection

from ..inputs import ServerOptions
from ..service import TaskService
from ..settings import ServerConfig
from .errors import ApiError

_WRONG_KEY = "missing or wrong API key"


def get_service(connection: HTTPConnection) -> TaskService:
    return connection.app.state.service


def get_config(connection: HTTPConnection) -> ServerConfig:
    return connection.app.state.config


def get_options(connection: HTTPConnection) -> ServerOptions:
    """The request options of this server (its data folder's LoRA cache, its add-ons included)."""
    return connection.app.state.options


Service = Annotated[TaskService, Depends(get_service)]
Config = Annotated[ServerConfig, Depends(get_config)]
Options = Annotated[ServerOptions, Depends(get_options)]


def key_is_valid(
    api_keys: Sequence[str], headers: Mapping[str, str], query: Mapping[str, str] | None
) -> bool:
    """Whether the request carries one of ``api_keys`` (always, when there are none); ``query`` only where
    the key may come as ``?token=``."""
    if not api_keys:
        return True
    given = headers.get("authorization", "")
    token = given[7:].strip() if given.lower().startswith("bearer ") else ""
    if not token and query is not None:
        token = query.get("token", "")
    # Every key is compared (no early exit), each in constant time.
    matches = [hmac.compare_digest(token.encode(), key.encode()) for key in api_keys]
    return bool(token) and any(matches)


def _refuse() -> ApiError:
    return ApiError(401, f"{_WRONG_KEY} (Authorization: Bearer KEY)", headers={"WWW-Authenticate": "Bearer"})


def require_key(request: Request) -> None:
    """Refuse (401) a request without a valid key in its ``Authorization`` header."""
    if not key_is_valid(get_config(request).api_keys, request.headers, None):
        raise _refuse()


def require_key_or_token(request: Request) -> None:
    """:func:`require_key`, the key also taken from ``?token=`` (the events stream: EventSource)."""
    if not key_is_valid(get_config(request).api_keys, request.headers, request.query_params):
        raise _refuse()


def require_socket_key(websocket: WebSocket) -> None:
    """Close a WebSocket without a valid key (header or ``?token=``) before accepting it (1008)."""
    if not key_is_valid(get_config(websocket).api_keys, websocket.headers, websocket.query_params):
        raise WebSocketException(code=status.WS_1008_POLICY_VIOLATION, reason=_WRONG_KEY)
