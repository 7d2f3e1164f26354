"""The native API: tasks (submit, get, cancel) and their events as Server-Sent Events
(docs/serving.md)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool

from ..views import native_task
from .deps import Options, Service, require_key, require_key_or_token
from .following import follow
from .submission import submit

router = APIRouter(prefix="/v1/tasks", tags=["native"])


@router.post("", dependencies=[Depends(require_key)])
async def create_task(request: Request, service: Service, options: Options) -> JSONResponse:
    """Queue a task (JSON or multipart); 201 when new, 200 for the task of a known Idempotency-Key."""
    submitted = await submit(request, service, options, "native")
    view = native_task(submitted.task, service.files, service.cancel_requested(submitted.task.id))
    return JSONResponse(view, status_code=201 if submitted.created else 200)


@router.get("/{task_id}", dependencies=[Depends(require_key)])
async def get_task(task_id: str, service: Service) -> JSONResponse:
    task = service.get(task_id)
    return JSONResponse(native_task(task, service.files, service.cancel_requested(task_id)))


@router.post("/{task_id}/cancel", dependencies=[Depends(require_key)])
async def cancel_task(task_id: str, service: Service) -> JSONResponse:
    """Cancel a queued task now, a running one at its next step; 409 for a finished one."""
    task = await run_in_threadpool(service.cancel, task_id)
    return JSONResponse(native_task(task, service.files, service.cancel_requested(task_id)))


@router.get("/{task_id}/events", dependencies=[Depends(require_key_or_token)])
async def task_events(task_id: str, request: Request, service: Service) -> StreamingResponse:
    """The task's events from the start (or after ``Last-Event-ID``), live until its closing event."""
    service.get(task_id)
    last = request.headers.get("last-event-id", "0")
    after = int(last) if last.isdigit() else 0

    async def stream() -> AsyncIterator[str]:
        async for event in follow(service, task_id, after):
            if event is None:
                yield ": ping\n\n"
                continue
            payload = {**event.data, "seq": event.seq, "time": event.time}
            yield f"id: {event.seq}\nevent: {event.name}\ndata: {json.dumps(payload)}\n\n"

    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return StreamingResponse(stream(), media_type="text/event-stream", headers=headers)
