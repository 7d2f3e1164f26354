"""The WaveSpeed-compatible API: submit a prediction, poll its result (docs/serving.md). Its errors take
WaveSpeed's shape (the :data:`~.errors.WAVESPEED` tag)."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse

from ..service import TaskService
from ..store import Task
from ..views import WAVESPEED_MODEL, wavespeed_prediction
from .deps import Options, Service, require_key
from .errors import WAVESPEED, ApiError
from .following import wait_finished
from .submission import submit

router = APIRouter(prefix="/api/v3", tags=[WAVESPEED], dependencies=[Depends(require_key)])
SYNC_MODE_TIMEOUT = 600.0  # seconds enable_sync_mode waits for the task before answering as it is then


def _answer(task: Task, request: Request, service: TaskService) -> JSONResponse:
    data = wavespeed_prediction(task, service.files, str(request.base_url).rstrip("/"))
    return JSONResponse({"code": 200, "message": "success", "data": data})


@router.post(f"/{WAVESPEED_MODEL}")
async def submit_prediction(request: Request, service: Service, options: Options) -> JSONResponse:
    """Queue a task; with ``enable_sync_mode``, answer once it has finished."""
    task, _, spec = await submit(request, service, options, "wavespeed")
    if spec is not None and spec.sync:
        task = await wait_finished(service, task.id, SYNC_MODE_TIMEOUT)
    return _answer(task, request, service)


@router.get("/predictions/{task_id}/result")
async def prediction_result(task_id: str, request: Request, service: Service) -> JSONResponse:
    task = service.store.get(task_id)
    if task is None:
        raise ApiError(404, f"no prediction {task_id!r}", "id")
    return _answer(task, request, service)
