"""What operators and browsers use beside the APIs: the playground page, health, Prometheus metrics, the
API's docs and schema (behind the key), and the output files (served without a key: their paths hold the
task's random 128-bit id)."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import quote

from fastapi import APIRouter, Depends, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response

from .deps import Config, Service, require_key, require_key_or_token
from .errors import ApiError

router = APIRouter(tags=["operations"])
STATIC_DIR = Path(__file__).parent.parent / "static"


@router.get("/", include_in_schema=False)
async def playground() -> FileResponse:
    page = STATIC_DIR / "index.html"
    if not page.is_file():
        raise ApiError(404, "the playground page is not installed")
    return FileResponse(page, media_type="text/html")


@router.get("/healthz")
async def healthz(service: Service, config: Config) -> JSONResponse:
    """200 when the engine is ready; 503 while it warms up or after it failed to load."""
    engine = service.engine
    body = {
        "status": service.state,
        "model": config.model,
        "preset": config.preset,
        "device": str(engine.device) if engine is not None else config.device,
        "tiny_model": config.tiny_model,
        "queue_depth": service.queue_depth(),
        "running": service.running(),
        "replicas": service.replicas,
        "warmup_seconds": service.warmup,
    }
    start_report = getattr(engine, "start_report", None)  # where the start went (fluxfill_engine.startup)
    if start_report is not None:
        body["start"] = start_report.as_dict()
    if service.load_error:
        body["error"] = service.load_error
    return JSONResponse(body, status_code=200 if service.state == "ready" else 503)


@router.get("/metrics", dependencies=[Depends(require_key)])
async def metrics(service: Service) -> Response:
    return Response(service.metrics.render(), media_type="text/plain; version=0.0.4")


@router.get("/v1/files/{task_id}/{name}")
async def output_file(task_id: str, name: str, service: Service) -> FileResponse:
    task = service.store.get(task_id)
    if task is None or name not in task.outputs or task.files_deleted:
        raise ApiError(404, "no such file (or it expired)", "name")
    return FileResponse(service.files.output(task_id, name))


@router.get("/openapi.json", include_in_schema=False, dependencies=[Depends(require_key_or_token)])
async def openapi_schema(request: Request) -> JSONResponse:
    """The OpenAPI schema, behind the key like the API it describes (``?token=`` for the docs page)."""
    return JSONResponse(request.app.openapi())


@router.get("/docs", include_in_schema=False, dependencies=[Depends(require_key_or_token)])
async def docs_page(request: Request) -> HTMLResponse:
    """Swagger UI; opened as ``/docs?token=KEY`` it fetches the schema with that key."""
    token = request.query_params.get("token")
    schema = "/openapi.json" + (f"?token={quote(token, safe='')}" if token else "")
    return get_swagger_ui_html(openapi_url=schema, title="fluxfill serve API")
