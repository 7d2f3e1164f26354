"""Submitting a task over HTTP, for the native and the WaveSpeed routes: the ``Idempotency-Key``, the
body (JSON or a multipart form), its checks (``inputs.parse_task``, in a thread pool: images are
decoded, URLs fetched), then the service's queue.

A request that names URLs is checked in threads of its own, at most ``url_fetches`` (the server's
``--url-fetches``) at once, the others waiting their turn: slow downloads never take the threads
that check every other request.
"""

from __future__ import annotations

import functools
import json
from typing import Any, NamedTuple

import anyio
import anyio.to_thread
from fastapi import Request
from starlette.concurrency import run_in_threadpool

from ..inputs import RequestError, ServerOptions, TaskSpec, names_urls, parse_task
from ..service import TaskService
from ..store import Task
from .deps import owner_of
from .uploads import get_uploads, upload_owner

_JSON_FORM_FIELDS = ("loras", "outpaint")  # form fields that hold JSON text
URL_FETCHES = 8  # requests with URLs checked at once (--url-fetches)


class Submitted(NamedTuple):
    task: Task
    created: bool  # False: the task of the same Idempotency-Key, already there
    spec: TaskSpec | None  # None when the task was already there (the body was not read)


async def submit(request: Request, service: TaskService, options: ServerOptions, api: str) -> Submitted:
    """Check the request and queue its task (``api``: ``"native"`` or ``"wavespeed"``). Raises
    ``RequestError``, ``QueueFull``."""
    key = request.headers.get("idempotency-key")
    if key is not None and not 1 <= len(key) <= 255:
        raise RequestError("the Idempotency-Key header must be 1-255 characters", 400, "Idempotency-Key")
    owner = owner_of(request)  # a task, and its idempotency key, belong to the API key that made it
    if key is not None:
        existing = service.store.by_key(key, owner.id)
        if existing is not None:
            return Submitted(existing, False, None)
    body = await read_body(request)
    fetcher = get_uploads(request).fetcher(upload_owner(request))  # this server's uploads: read, not fetched
    parse = functools.partial(parse_task, body, options, api, fetcher, admit=service.admit)
    limiter = url_limiter(request) if names_urls(body) else None
    spec = await anyio.to_thread.run_sync(parse, limiter=limiter)
    task, created = await run_in_threadpool(service.submit, spec, api, key, owner.id)
    return Submitted(task, created, spec)


def url_limiter(request: Request) -> anyio.CapacityLimiter:
    """The app's bound on requests with URLs checked at once (made on first use, in the event loop)."""
    state = request.app.state
    limiter = getattr(state, "url_limiter", None)
    if limiter is None:
        tokens = getattr(getattr(state, "config", None), "url_fetches", URL_FETCHES)
        limiter = state.url_limiter = anyio.CapacityLimiter(tokens)
    return limiter


async def read_body(request: Request) -> dict[str, Any]:
    """The request's fields: a JSON object, or a multipart form (files as bytes, JSON-valued fields
    parsed, numbers and booleans as such). Raises ``RequestError`` (400)."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind == "multipart/form-data":
        form = await request.form()
        body: dict[str, Any] = {}
        for name, value in form.multi_items():
            if not isinstance(value, str):  # an uploaded file
                body[name] = await value.read()
            elif name in _JSON_FORM_FIELDS:
                try:
                    body[name] = json.loads(value)
                except json.JSONDecodeError:
                    raise RequestError(f"`{name}` must be JSON text in a form field", 400, name) from None
            else:
                body[name] = value if name == "prompt" else form_value(value)
        return body
    raw = await request.body()
    try:
        parsed = json.loads(raw or b"null")
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise RequestError(f"the request body is not valid JSON: {err}", 400, None) from None
    if not isinstance(parsed, dict):
        raise RequestError("the request body must be a JSON object", 400, None)
    return parsed


def form_value(value: str) -> Any:
    """A multipart text field as the JSON value it spells (numbers, booleans, null), else the text."""
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError:
        return value
    return parsed if isinstance(parsed, (int, float, bool)) or parsed is None else value
