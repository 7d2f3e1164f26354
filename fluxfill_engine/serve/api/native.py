"""The native API: tasks (submit, get, cancel) and their events as Server-Sent Events
(docs/serving.md). A task is seen only by the key that made it (:func:`.deps.owned_task`)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool

from ..views import native_task
from .deps import CurrentOwner, Options, Service, owned_task, require_key, require_key_or_token
from .errors import ApiError
from .following import follow
from .submission import submit

router = APIRouter(prefix="/v1/tasks", tags=["native"])
MAX_EVENT_ID_DIGITS = 18  # a sequence number SQLite's 64-bit integers always hold


@router.post("", dependencies=[Depends(require_key)])
async def create_task(request: Request, service: Service, options: Options) -> JSONResponse:
    """Queue a task (JSON or multipart); 201 when new, 200 for the task of a known Idempotency-Key."""
    submitted = await submit(request, service, options, "native")
    view = native_task(submitted.task, service.files, service.cancel_requested(submitted.task.id))
    return JSONResponse(view, status_code=201 if submitted.created else 200)


@router.get("/{task_id}", dependencies=[Depends(require_key)])
async def get_task(task_id: str, service: Service, owner: CurrentOwner) -> JSONResponse:
    task = owned_task(service, task_id, owner)
    return JSONResponse(native_task(task, service.files, service.cancel_requested(task_id)))


@router.post("/{task_id}/cancel", dependencies=[Depends(require_key)])
async def cancel_task(task_id: str, service: Service, owner: CurrentOwner) -> JSONResponse:
    """Cancel a queued task now, a running one at its next step; 409 for a finished one."""
    owned_task(service, task_id, owner)
    task = await run_in_threadpool(service.cancel, task_id)
    return JSONResponse(native_task(task, service.files, service.cancel_requested(task_id)))


@router.get("/{task_id}/events", dependencies=[Depends(require_key_or_token)])
async def task_events(
    task_id: str, request: Request, service: Service, owner: CurrentOwner
) -> StreamingResponse:
    """The task's events from the start (or after ``Last-Event-ID``), live until its closing event."""
    owned_task(service, task_id, owner)
    after = last_event_id(request.headers.get("last-event-id"))

    async def stream() -> AsyncIterator[str]:
        async for event in follow(service, task_id, after):
            if event is None:
                yield ": ping\n\n"
                continue
            payload = {**event.data, "seq": event.seq, "time": event.time}
            yield f"id: {event.seq}\nevent: {event.name}\ndata: {json.dumps(payload)}\n\n"

    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return StreamingResponse(stream(), media_type="text/event-stream", headers=headers)


def last_event_id(header: str | None) -> int:
    """The sequence number of a ``Last-Event-ID`` header (0 when absent). Raises ``ApiError`` (400) for
    anything but ASCII digits that fit SQLite's integers."""
    if header is None or not header.strip():
        return 0
    text = header.strip()
    if not (text.isascii() and text.isdigit() and len(text) <= MAX_EVENT_ID_DIGITS):
        raise ApiError(
            400,
            f"Last-Event-ID must be an event's sequence number (ASCII digits, at most "
            f"{MAX_EVENT_ID_DIGITS}), got {text[:40]!r}",
            "Last-Event-ID",
        )
    return int(text)
