"""Uploads over HTTP (:mod:`..uploads`): WaveSpeed's two media-upload endpoints, and the file itself at its
download URL.

- ``POST /api/v3/media/uploads`` ``{"filename", "size", "content_type"}``: a ticket,
  ``{"code": 200, "data": {"id", "upload": {"method": "PUT", "url", "headers"}, "download_url", ...}}``
  (the exchange of the ``wavespeed`` SDK's ``upload``);
- ``PUT /v1/uploads/{id}/{name}?upload_token=T``: the ticket's bytes (the SDK sends no key with it: the
  one-time token in the URL is the permission);
- ``POST /api/v3/media/upload/binary``, multipart ``file``:
  ``{"code": 200, "data": {"type": "image", "download_url", "filename", "size"}}``;
- ``GET /v1/uploads/{id}/{name}``: the file, to the key that uploaded it.
"""

from __future__ import annotations

import json
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import FileResponse, JSONResponse
from starlette.requests import HTTPConnection

from ..inputs import RequestError
from ..uploads import Upload, UploadStore
from .deps import get_config, owner_of, public_base, require_key
from .errors import WAVESPEED

wavespeed_router = APIRouter(prefix="/api/v3/media", tags=[WAVESPEED], dependencies=[Depends(require_key)])
files_router = APIRouter(prefix="/v1/uploads", tags=["uploads"])


def get_uploads(connection: HTTPConnection) -> UploadStore:
    """The server's upload store (``app.state.uploads``, made on first use from the configuration)."""
    state = connection.app.state
    store = getattr(state, "uploads", None)
    if store is None:
        config = get_config(connection)
        store = UploadStore(
            config.service.data_dir / "uploads", config.max_request_bytes, config.service.retention_hours
        )
        state.uploads = store
    return store


def upload_owner(connection: HTTPConnection) -> str | None:
    """Whose uploads a request sees: its key's, or (``None``) everyone's for an admin key or a server
    without keys."""
    owner = owner_of(connection)
    return None if owner.admin else owner.id


def download_url(upload: Upload, base: str) -> str:
    return f"{base}/v1/uploads/{upload.id}/{upload.filename}"


async def _json_object(request: Request) -> dict[str, Any]:
    try:
        body = json.loads(await request.body() or b"null")
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as err:
        raise RequestError(f"the request body is not valid JSON: {err}", 400, None) from None
    if not isinstance(body, dict):
        raise RequestError('the request body must be a JSON object {"filename", "size"}', 400, None)
    return body


@wavespeed_router.post("/uploads")
async def upload_ticket(request: Request) -> JSONResponse:
    """A ticket: where to PUT the file's bytes, and the URL it will then have."""
    body = await _json_object(request)
    owner = owner_of(request)
    upload, token = get_uploads(request).ticket(
        owner.id, body.get("filename"), body.get("size"), body.get("content_type")
    )
    base = public_base(request)
    put_url = f"{download_url(upload, base)}?upload_token={token}"
    data = {
        "id": upload.id,
        "filename": upload.filename,
        "size": upload.size,
        "upload": {"method": "PUT", "url": put_url, "headers": {"Content-Type": upload.content_type}},
        "download_url": download_url(upload, base),
    }
    return JSONResponse({"code": 200, "message": "success", "data": data})


@wavespeed_router.post("/upload/binary")
async def upload_binary(request: Request) -> JSONResponse:
    """A file uploaded whole, as multipart ``file``."""
    form = await request.form(max_files=1, max_fields=8)
    sent = form.get("file")
    if sent is None or isinstance(sent, str):
        raise RequestError("send the file as multipart/form-data field `file`", 400, "file")
    data = await sent.read()
    filename = sent.filename or "upload"
    upload = get_uploads(request).add(owner_of(request).id, filename, data)
    answer = {
        "type": "image",
        "download_url": download_url(upload, public_base(request)),
        "filename": upload.filename,
        "size": upload.size,
    }
    return JSONResponse({"code": 200, "message": "success", "data": answer})


@files_router.put("/{upload_id}/{name}")
async def put_upload(upload_id: str, name: str, request: Request, upload_token: str = "") -> JSONResponse:
    """A ticket's bytes; the one-time ``upload_token`` of the ticket is the permission."""
    upload = get_uploads(request).put(upload_id, name, upload_token, await request.body())
    return JSONResponse({"id": upload.id, "size": upload.size, "content_type": upload.content_type})


@files_router.get("/{upload_id}/{name}", dependencies=[Depends(require_key)])
async def get_upload(upload_id: str, name: str, request: Request) -> FileResponse:
    upload, path = get_uploads(request).get(upload_id, name, upload_owner(request))
    return FileResponse(path, media_type=upload.content_type)
