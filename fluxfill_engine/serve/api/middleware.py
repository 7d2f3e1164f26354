"""ASGI middleware around the whole API, run before any route: what a request may cost before it is read.

For a request with a body (POST, PUT, PATCH), in this order, each refusal answered without reading the
rest of the body (the connection is then closed):

1. the API key, from the headers alone (401), for the routes that need it (those depending on
   :func:`.deps.require_key` or :func:`.deps.require_key_or_token`, and any path no route serves), with
   the key settings of :mod:`.deps`: an unauthenticated client cannot make the server read, buffer or
   parse anything. A route without the key (an upload ticket's PUT, whose URL's token is its
   permission) has its body read under the limits below, then checks its own permission;
2. a declared ``Content-Length`` over ``--max-request-mb`` (413);
3. the bytes of all bodies in flight together (``--max-inflight-mb``): a body whose declared length
   would take them over answers 503 with ``Retry-After`` (a declared length is reserved whole at once,
   so that concurrent bodies are admitted or refused whole, not all cut off halfway); a body without
   a length is counted as it arrives and refused (503) at the byte that would take them over;
4. the body read under a deadline (``--body-timeout-s``, from its first byte asked to its last): a
   client that sends it too slowly (slowloris) gets 408.

The body is then replayed to the app, which reads it as usual; its bytes count as in flight until the
route has answered.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from starlette.datastructures import Headers
from starlette.routing import Match

from .deps import key_is_valid, require_key, require_key_or_token
from .errors import error_response, openai_error_response, wavespeed_error_response

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

_BODY_METHODS = ("POST", "PUT", "PATCH")
_WAVESPEED_PREFIX = "/api/v3/"  # its refusals take WaveSpeed's shape, as its routes' do
_OPENAI_PREFIX = "/v1/images/"  # and these OpenAI's
_UPLOAD_PREFIX = "/v1/uploads/"
_KEY_CHECKS = (require_key, require_key_or_token)
BODY_TIMEOUT_S = 30.0  # --body-timeout-s
MAX_INFLIGHT_BYTES = 256 * 2**20  # --max-inflight-mb


class _Refused(Exception):
    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.headers = headers


class BodyLimit:
    """The checks of the module docstring. ``limit``: the largest body, in bytes; the key settings, the
    deadline and the in-flight bound come from the app's ``state.config`` (``api_keys``,
    ``body_timeout_s``, ``max_inflight_bytes``) when it has them, else the defaults above."""

    def __init__(self, app: Callable[[Scope, Receive, Send], Awaitable[None]], limit: int) -> None:
        self.app = app
        self.limit = limit
        self.inflight = 0  # bytes of the bodies read and not yet answered (one event loop: no lock)
        self.refused_unread = 0  # requests refused before their body was read (a figure for the load test)
        self._keyed: dict[int, bool] = {}  # route id -> whether it needs the key

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in _BODY_METHODS:
            await self.app(scope, receive, send)
            return
        config = getattr(getattr(scope.get("app"), "state", None), "config", None)
        headers = Headers(scope=scope)
        try:
            declared = self._check_headers(config, headers, scope)
        except _Refused as refusal:
            self.refused_unread += 1
            await self._answer(scope, receive, send, refusal)
            return
        timeout = float(getattr(config, "body_timeout_s", BODY_TIMEOUT_S))
        bound = int(getattr(config, "max_inflight_bytes", MAX_INFLIGHT_BYTES))
        held = _Held()
        held.bytes = declared  # reserved now, before any await: concurrent requests see it
        self.inflight += declared
        try:
            try:
                body = await asyncio.wait_for(self._read(receive, bound, held), timeout)
            except TimeoutError:
                message = f"the request body took over {timeout:g} s to arrive (--body-timeout-s)"
                await self._answer(scope, receive, send, _Refused(408, message))
                return
            except _Refused as refusal:
                await self._answer(scope, receive, send, refusal)
                return
            except _ClientGone:
                return
            replayed = False

            async def replay() -> Message:
                nonlocal replayed
                if not replayed:
                    replayed = True
                    return {"type": "http.request", "body": body, "more_body": False}
                return await receive()

            await self.app(scope, replay, send)
        finally:
            self.inflight -= held.bytes

    def _check_headers(self, config: Any, headers: Headers, scope: Scope) -> int:
        """The declared body length (0 when none is declared), once the headers pass; else raises."""
        keys = getattr(config, "api_keys", ())
        if keys and self._needs_key(scope) and not key_is_valid(keys, headers, None):
            raise _Refused(
                401, "missing or wrong API key (Authorization: Bearer KEY)", {"WWW-Authenticate": "Bearer"}
            )
        declared = headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            raise _Refused(
                413, f"the request body is over the limit of {self.limit} bytes (--max-request-mb)"
            )
        bound = int(getattr(config, "max_inflight_bytes", MAX_INFLIGHT_BYTES))
        length = int(declared) if declared is not None and declared.isdigit() else 0
        if self.inflight + length > bound:
            raise self._busy(bound)
        return length

    def _needs_key(self, scope: Scope) -> bool:
        """Whether the route ``scope`` goes to checks the key (a path no route serves: as if it did)."""
        if scope["method"] == "PUT" and scope["path"].startswith(_UPLOAD_PREFIX):
            return False  # an upload ticket's PUT (the SDK sends no key): the route checks its URL's token
        routes = getattr(getattr(scope.get("app"), "router", None), "routes", ())
        partial = None
        for route in routes:
            match, _ = route.matches(scope)
            if match is Match.FULL:
                return self._route_needs_key(route)
            if match is Match.PARTIAL and partial is None:
                partial = route  # the path with another method: 405 after the key
        return True if partial is None else self._route_needs_key(partial)

    def _route_needs_key(self, route: Any) -> bool:
        """Whether ``route`` depends on a key check, directly, through its router or a sub-dependency."""
        if id(route) not in self._keyed:
            pending, found = [getattr(route, "dependant", None)], False
            while pending and not found:
                dependant = pending.pop()
                if dependant is None:
                    continue
                found = getattr(dependant, "call", None) in _KEY_CHECKS
                pending.extend(dependant.dependencies)
            self._keyed[id(route)] = found or not hasattr(route, "dependant")
        return self._keyed[id(route)]

    def _busy(self, bound: int) -> _Refused:
        return _Refused(
            503,
            f"the server is reading {self.inflight} bytes of request bodies, at its limit of {bound} "
            "(--max-inflight-mb); retry later",
            {"Retry-After": "1"},
        )

    async def _read(self, receive: Receive, bound: int, held: _Held) -> bytes:
        """The whole body; bytes beyond what ``held`` reserved (a body without Content-Length) are counted
        in flight as they arrive, in ``held`` too, for the caller to give back."""
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise _ClientGone()
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.limit:
                raise _Refused(
                    413, f"the request body is over the limit of {self.limit} bytes (--max-request-mb)"
                )
            extra = size - held.bytes
            if extra > 0:
                if self.inflight + extra > bound:
                    raise self._busy(bound)
                self.inflight += extra
                held.bytes = size
            chunks.append(chunk)
            more = message.get("more_body", False)
        return b"".join(chunks)

    async def _answer(self, scope: Scope, receive: Receive, send: Send, refusal: _Refused) -> None:
        headers = {**(refusal.headers or {}), "Connection": "close"}  # the unread rest is not waited for
        if scope["path"].startswith(_WAVESPEED_PREFIX):
            response = wavespeed_error_response(refusal.status, str(refusal), headers)
        elif scope["path"].startswith(_OPENAI_PREFIX):
            response = openai_error_response(refusal.status, str(refusal), None, headers)
        else:
            response = error_response(refusal.status, str(refusal), None, headers)
        await response(scope, receive, send)


class _Held:
    """The bytes one request counts in flight."""

    bytes = 0


class _ClientGone(Exception):
    """The client closed the connection while sending its body."""
