"""The WaveSpeed-compatible API: submit a prediction, poll its result (docs/serving.md); its media uploads
are in :mod:`.uploads`. Its errors take WaveSpeed's shape (the :data:`~.errors.WAVESPEED` tag), also for
a path under ``/api/v3/`` that names no model of this server (:data:`unknown_router`, installed last).

A sync-mode request that outlasts :data:`SYNC_MODE_TIMEOUT` is answered as WaveSpeed answers a sync
timeout (``data.code`` 5004, an ``error`` starting "Sync mode timed out"): the ``wavespeed`` SDK then
tells its user to query the result later; the task goes on.
"""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse

from ..service import TaskService
from ..store import Task
from ..views import WAVESPEED_MODEL, wavespeed_prediction
from .deps import Options, Service, owned_task, owner_of, public_base, require_key
from .errors import WAVESPEED, ApiError
from .following import wait_finished
from .submission import submit

router = APIRouter(prefix="/api/v3", tags=[WAVESPEED], dependencies=[Depends(require_key)])
unknown_router = APIRouter(prefix="/api/v3", tags=[WAVESPEED], dependencies=[Depends(require_key)])
SYNC_MODE_TIMEOUT = 600.0  # seconds enable_sync_mode waits for the task before answering a sync timeout
SYNC_TIMEOUT_CODE = 5004  # WaveSpeed's code for it, in ``data.code``
SAFETY_HEADER = "X-Safety-Checker"  # "not-configured": enable_safety_checker was asked, nothing checked


def _answer(task: Task, request: Request, service: TaskService, **extra: object) -> JSONResponse:
    data: dict[str, object] = {**wavespeed_prediction(task, service.files, public_base(request)), **extra}
    message = "success" if "code" not in extra else str(extra["error"])
    headers = {}
    if task.request.get("safety_checker") == "not configured":
        headers[SAFETY_HEADER] = "not-configured"
    return JSONResponse({"code": 200, "message": message, "data": data}, headers=headers)


@router.post(f"/{WAVESPEED_MODEL}")
async def submit_prediction(request: Request, service: Service, options: Options) -> JSONResponse:
    """Queue a task; with ``enable_sync_mode``, answer once it has finished (or the sync timeout)."""
    task, _, spec = await submit(request, service, options, "wavespeed")
    if spec is None or not spec.sync:
        return _answer(task, request, service)
    task = await wait_finished(service, task.id, SYNC_MODE_TIMEOUT)
    if task.finished:
        return _answer(task, request, service)
    waited = "the server is stopping" if service.hub.closed else f"after {SYNC_MODE_TIMEOUT:g} s"
    error = f"Sync mode timed out ({waited}); the task goes on: query its result later"
    return _answer(task, request, service, code=SYNC_TIMEOUT_CODE, error=error)


@router.get("/predictions/{task_id}/result")
async def prediction_result(task_id: str, request: Request, service: Service) -> JSONResponse:
    return _answer(owned_task(service, task_id, owner_of(request)), request, service)


@unknown_router.api_route(
    "/{path:path}", methods=["GET", "POST", "PUT", "DELETE", "PATCH"], include_in_schema=False
)
async def unknown_model(path: str) -> JSONResponse:
    """Any other path under ``/api/v3/``: a model this server does not serve (404, WaveSpeed's shape)."""
    raise ApiError(404, f"no model or endpoint {path!r} on this server; it serves {WAVESPEED_MODEL}", "model")
