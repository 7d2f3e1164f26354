"""The OpenAI images API's edit endpoint, ``POST /v1/images/edits``, as the ``openai`` SDK's
``client.images.edit(...)`` sends it: multipart ``image``, ``mask``, ``prompt``, ``n``, ``size``,
``response_format`` (``b64_json``, the default, or ``url``), ``model`` and ``user``; answered
``{"created", "data": [{"b64_json"} | {"url"}], "output_format", "size"}`` once the images are made, its
errors in OpenAI's shape (the :data:`~.errors.OPENAI` tag).

OpenAI's mask is a PNG whose fully transparent pixels (alpha 0) mark the area to edit; FLUX's is white
where it repaints: :func:`flux_mask` turns one into the other. Without a mask the image's own transparent
pixels are the area (OpenAI's rule); a mask or image without an alpha channel is refused, saying so.
The fill options of the native API (``num_inference_steps``, ``guidance_scale``, ``seed``, ...) may come
as extra form fields (the SDK's ``extra_body``); ``loras`` and ``outpaint`` as JSON text.
"""

from __future__ import annotations

import base64
import contextlib
import io
import time
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from ...errors import InputError
from ..inputs import FILL_FIELDS, RequestError, parse_task
from ..service import AlreadyFinished
from ..store import COMPLETED
from ..views import output_urls
from .deps import Options, Service, owner_of, public_base, require_key
from .errors import OPENAI, ApiError
from .following import wait_finished
from .submission import form_value
from .uploads import get_uploads, upload_owner

if TYPE_CHECKING:
    import PIL.Image

router = APIRouter(prefix="/v1/images", tags=[OPENAI], dependencies=[Depends(require_key)])
EDIT_TIMEOUT = 600.0  # seconds an edit waits for its images before it answers 504 (and is canceled)
# OpenAI parameters taken and not used: which model, who asks, and the GPT image models' own knobs.
_IGNORED = frozenset(
    {"model", "user", "quality", "background", "input_fidelity", "output_compression", "safety_identifier"}
)
# The native API's fill options an edit may carry as extra form fields (prompt and n are OpenAI's own).
_FILL_OPTIONS = (frozenset(FILL_FIELDS) - {"prompt", "num_images"}) | {"seed", "loras", "output_format"}
_JSON_OPTIONS = ("outpaint", "loras")
_RESPONSE_FORMATS = ("b64_json", "url")


def flux_mask(mask: PIL.Image.Image, field: str = "mask") -> PIL.Image.Image:
    """OpenAI's mask (fully transparent = edit) as FLUX's (white = repaint, black = keep), one channel.
    Raises ``RequestError`` (400) for an image without an alpha channel."""
    has_alpha = mask.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in mask.info
    if not has_alpha:
        raise RequestError(
            f"`{field}` has no alpha channel ({mask.mode}): OpenAI's mask is a PNG whose fully transparent "
            "pixels mark the area to edit",
            400,
            field,
        )
    alpha = mask.convert("RGBA").getchannel("A")
    return alpha.point(lambda value: 255 if value == 0 else 0, "L")


def _png(image: PIL.Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def edit_body(
    image: bytes, mask: bytes | None, fields: dict[str, str], max_megapixels: float
) -> dict[str, Any]:
    """The native request of an edit: its image, FLUX's mask, its fields by the native names. Raises
    ``RequestError``."""
    from ...images import open_image_bytes

    try:
        picture = open_image_bytes(image, "image", max_megapixels)
        stencil = open_image_bytes(mask, "mask", max_megapixels) if mask is not None else None
    except InputError as err:
        raise RequestError(str(err), 422 if "megapixels" in str(err) else 400, err.field) from None
    if stencil is None:
        try:
            flux = flux_mask(picture, "image")
        except RequestError:
            raise RequestError(
                "`mask` is missing and `image` has no transparent pixels to edit: send a mask (a PNG whose "
                "fully transparent pixels mark the area to edit) or an image with transparent pixels",
                400,
                "mask",
            ) from None
    else:
        if stencil.size != picture.size:
            raise RequestError(
                f"`mask` is {stencil.width}x{stencil.height}; it must have the image's size, "
                f"{picture.width}x{picture.height}",
                400,
                "mask",
            )
        flux = flux_mask(stencil)
    body: dict[str, Any] = {"prompt": fields.get("prompt"), "image": _png(picture.convert("RGB"))}
    body["mask"] = _png(flux)
    if "prompt" not in fields:
        raise RequestError("`prompt` is required", 400, "prompt")
    n = form_value(fields.get("n", "1"))
    body["num_images"] = n
    size = fields.get("size", "auto")
    if size not in ("auto", ""):
        body["size"] = size
    for name, value in fields.items():
        if name in _FILL_OPTIONS:
            body[name] = _option(name, value)
    return body


def _option(name: str, value: str) -> Any:
    if name not in _JSON_OPTIONS:
        return form_value(value)
    import json

    try:
        return json.loads(value)
    except json.JSONDecodeError:
        raise RequestError(f"`{name}` must be JSON text in a form field", 400, name) from None


async def _read_form(request: Request) -> tuple[bytes, bytes | None, dict[str, str]]:
    """The image, the mask and the text fields of an edit's multipart form. Raises ``RequestError``."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind != "multipart/form-data":
        raise RequestError("send the edit as multipart/form-data (image, mask, prompt, ...)", 400, None)
    form = await request.form(max_files=4, max_fields=64)
    images: list[bytes] = []
    mask: bytes | None = None
    fields: dict[str, str] = {}
    for name, value in form.multi_items():
        if isinstance(value, str):
            if name in fields:
                raise RequestError(f"`{name}` is given twice", 400, name)
            fields[name] = value
        elif name in ("image", "image[]"):
            images.append(await value.read())
        elif name == "mask":
            mask = await value.read()
        else:
            raise RequestError(f"`{name}`: only `image` and `mask` may be files", 400, name)
    if not images:
        raise RequestError("`image` is required (a file)", 400, "image")
    if len(images) > 1:
        raise RequestError(f"`image`: {len(images)} images given; this server edits one", 400, "image")
    for name in fields:
        allowed = name in _FILL_OPTIONS or name in _IGNORED or name in ("prompt", "n", "size")
        if not allowed and name not in ("response_format", "stream", "partial_images"):
            raise RequestError(f"Unknown parameter: '{name}'.", 400, name)
    if form_value(fields.get("stream", "false")) is not False:
        raise RequestError("`stream`: streamed edits are not served; leave it out", 400, "stream")
    return images[0], mask, fields


@router.post("/edits")
async def edit_image(request: Request, service: Service, options: Options) -> JSONResponse:
    """Edit an image (OpenAI's images API): the answer comes once the images are made."""
    image, mask, fields = await _read_form(request)
    response_format = fields.get("response_format") or "b64_json"
    if response_format not in _RESPONSE_FORMATS:
        raise RequestError(
            f"`response_format` must be one of {list(_RESPONSE_FORMATS)}, got {response_format!r}",
            400,
            "response_format",
        )
    body = await run_in_threadpool(edit_body, image, mask, fields, options.max_input_megapixels)
    fetcher = get_uploads(request).fetcher(upload_owner(request))
    spec = await run_in_threadpool(parse_task, body, options, "openai", fetcher, service.admit)
    owner = owner_of(request)
    task, _ = await run_in_threadpool(service.submit, spec, "openai", None, owner.id)
    task = await wait_finished(service, task.id, EDIT_TIMEOUT)
    no_retry = {"x-should-retry": "false"}  # the SDK would submit the edit again
    if not task.finished:
        with contextlib.suppress(AlreadyFinished):  # it ended meanwhile: canceled or not, it is not sent
            await run_in_threadpool(service.cancel, task.id)
        if service.hub.closed:
            raise ApiError(503, "the server is stopping; the edit was canceled", None, no_retry)
        raise ApiError(504, f"the edit took over {EDIT_TIMEOUT:g} s; it was canceled", None, no_retry)
    if task.status != COMPLETED:
        raise ApiError(500, f"the edit failed: {task.error or task.status}", None, no_retry)
    if response_format == "url":
        data = [{"url": url} for url in output_urls(task, service.files, public_base(request))]
    else:
        data = [
            {"b64_json": base64.b64encode(service.files.output(task.id, name).read_bytes()).decode()}
            for name in task.outputs
        ]
    first = task.outputs[0] if task.outputs else ""
    return JSONResponse(
        {
            "created": int(task.created_at or time.time()),
            "data": data,
            "output_format": spec.output_format,
            "size": _size_of(service.files.output(task.id, first)) if first else None,
        }
    )


def _size_of(path: Any) -> str:
    import PIL.Image

    with PIL.Image.open(path) as picture:
        return f"{picture.width}x{picture.height}"
