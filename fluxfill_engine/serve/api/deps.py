"""What routes take from the application (``app.state``, set by ``create_app``): the task
service, the server's configuration and request options, and the API key check.

Keys travel as ``Authorization: Bearer KEY``; the events stream, the WebSocket and the API's own docs,
which browsers open without custom headers, also take ``?token=KEY``. Elsewhere a key in the URL would only
end up in access logs, so it is not read there.

Tenancy: a task belongs to the key that made it (:class:`Owner`, a hash of the key); routes look tasks up
with :func:`owned_task`, so another key's task is answered as unknown (404). Admin keys
(``ServerConfig.admin_keys``) see every task; without keys everyone is admin.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request, WebSocket, WebSocketException, status
from starlette.requests import HTTPConnection

from ..inputs import ServerOptions
from ..service import NotFound, TaskService
from ..settings import ServerConfig
from ..store import Task
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


def given_key(headers: Mapping[str, str], query: Mapping[str, str] | None) -> str:
    """The key a request carries: ``Authorization: Bearer KEY``, else (``query`` given) ``?token=KEY``."""
    given = headers.get("authorization", "")
    token = given[7:].strip() if given.lower().startswith("bearer ") else ""
    if not token and query is not None:
        token = query.get("token", "")
    return token


def _matches(token: str, keys: Sequence[str]) -> bool:
    # Every key is compared (no early exit), each in constant time.
    matches = [hmac.compare_digest(token.encode(), key.encode()) for key in keys]
    return bool(token) and any(matches)


def key_is_valid(
    api_keys: Sequence[str], headers: Mapping[str, str], query: Mapping[str, str] | None
) -> bool:
    """Whether the request carries one of ``api_keys`` (always, when there are none); ``query`` only where
    the key may come as ``?token=``."""
    return not api_keys or _matches(given_key(headers, query), api_keys)


@dataclass(frozen=True)
class Owner:
    """Who a request acts for: ``id`` is stored with the tasks it makes (a hash of its key, ``""`` on a
    server without keys); an ``admin`` sees every task."""

    id: str
    admin: bool = False

    def sees(self, task: Task) -> bool:
        return self.admin or hmac.compare_digest(task.owner, self.id)


def owner_id(key: str) -> str:
    """The owner id stored for ``key``: a hash, so the database never holds a key."""
    return hashlib.sha256(b"fluxfill-serve owner\0" + key.encode("utf-8", "surrogatepass")).hexdigest()


def owner_of(connection: HTTPConnection) -> Owner:
    """The owner of a request whose key was checked already (header, else ``?token=``)."""
    config = get_config(connection)
    if not config.api_keys:
        return Owner("", admin=True)
    token = given_key(connection.headers, connection.query_params)
    return Owner(owner_id(token), admin=_matches(token, config.admin_keys))


CurrentOwner = Annotated[Owner, Depends(owner_of)]
_TASK_ID = re.compile(r"[0-9a-f]{32}")  # uuid4().hex, what TaskService.submit gives


def is_task_id(text: object) -> bool:
    """Whether ``text`` has the form of a task id (anything else is looked up nowhere)."""
    return isinstance(text, str) and _TASK_ID.fullmatch(text) is not None


def find_owned_task(service: TaskService, task_id: str, owner: Owner) -> Task | None:
    """The task ``task_id`` if ``owner`` sees it; None when it is unknown or another key's."""
    task = service.store.get(task_id) if is_task_id(task_id) else None
    return task if task is not None and owner.sees(task) else None


def owned_task(service: TaskService, task_id: str, owner: Owner) -> Task:
    """:func:`find_owned_task`, raising ``NotFound`` (404) instead of returning None."""
    task = find_owned_task(service, task_id, owner)
    if task is None:
        raise NotFound(task_id)
    return task


def public_base(connection: HTTPConnection) -> str:
    """The server's address for URLs in answers: ``--public-url``, else the address the connection came
    in on (never the request's ``Host`` header, which the client chooses)."""
    public = get_config(connection).service.public_url
    if public:
        return public.rstrip("/")
    server = connection.scope.get("server")
    scheme = "https" if connection.scope.get("scheme") in ("https", "wss") else "http"
    if not server:
        return ""
    host, port = server[0], server[1]
    host = f"[{host}]" if ":" in str(host) else host
    default = {"http": 80, "https": 443}[scheme]
    return f"{scheme}://{host}" if port in (None, default) else f"{scheme}://{host}:{port}"


def _refuse() -> ApiError:
    return ApiError(401, f"{_WRONG_KEY} (Authorization: Bearer KEY)", headers={"WWW-Authenticate": "Bearer"})


def require_key(request: Request) -> None:
    """Refuse (401) a request without a valid key in its ``Authorization`` header."""
    if not key_is_valid(get_config(request).api_keys, request.headers, None):
        raise _refuse()


def require_key_or_token(request: Request) -> None:
    """:func:`require_key`, the key also taken from ``?token=`` (the events stream: EventSource; the docs
    page)."""
    if not key_is_valid(get_config(request).api_keys, request.headers, request.query_params):
        raise _refuse()


def require_socket_key(websocket: WebSocket) -> None:
    """Close a WebSocket without a valid key (header or ``?token=``) before accepting it (1008)."""
    if not key_is_valid(get_config(websocket).api_keys, websocket.headers, websocket.query_params):
        raise WebSocketException(code=status.WS_1008_POLICY_VIOLATION, reason=_WRONG_KEY)
