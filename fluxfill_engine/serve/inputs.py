"""Request bodies (native JSON or multipart, WaveSpeed JSON) -> a checked :class:`TaskSpec`.

Everything is checked here, at submission: a request the server answers 400/422 leaves no task.
Images arrive as data URLs, plain base64, uploads, or (when allowed) URLs fetched through the
:mod:`.urlguard`; they are decoded with the engine's own image rules and limits.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

from ..errors import InputError
from .lora_cache import LORA_CACHE_BYTES, LoraCache
from .task_files import OUTPUT_FORMATS
from .urlguard import UrlPolicy, UrlRefused, check_url, fetch

if TYPE_CHECKING:
    import PIL.Image

    from ..engine import FillRequest
    from ..lora import LoraSpec

FILL_FIELDS = (  # the engine's request fields the native API takes as they are
    "prompt",
    "num_inference_steps",
    "guidance_scale",
    "num_images",
    "paste_back",
    "mask_grow",
    "mask_blur",
    "soft_mask",
    "max_megapixels",
    "crop_to_mask",
    "crop_padding",
    "outpaint",
)
_SERVER_FIELDS = (
    "image",
    "mask",
    "mask_image",
    "size",
    "width",
    "height",
    "seed",
    "loras",
    "output_format",
    "enable_base64_output",
    "enable_sync_mode",
    "webhook",
    "enhance_prompt",
    "enable_safety_checker",
)
NATIVE_FIELDS = frozenset(FILL_FIELDS + _SERVER_FIELDS)
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_DATA_URL = re.compile(r"^data:[\w/+.-]*(;[\w=.-]+)*;base64,", re.ASCII)


class RequestError(InputError):
    """A refused request: ``status`` 400 (malformed) or 422 (a value not allowed), naming ``field``."""

    def __init__(self, message: str, status: int = 422, field: str | None = None) -> None:
        super().__init__(message, field)
        self.status = status


@dataclass
class ServerOptions:
    """What the server allows requests to ask for (from the ``fluxfill serve`` flags)."""

    url_policy: UrlPolicy = field(default_factory=UrlPolicy)
    lora_dir: Path | None = None
    lora_cache: LoraCache | None = None  # where LoRA URLs are downloaded (the data folder's)
    lora_cache_bytes: int = LORA_CACHE_BYTES  # its bound (--lora-cache-mb)
    max_input_megapixels: float = 40.0
    max_loras: int = 3
    has_enhancer: bool = False
    has_safety_checker: bool = False


@dataclass
class TaskSpec:
    """A checked request: the engine's validated :class:`FillRequest` plus what the server does
    around it. ``public`` is the request as stored and echoed (no image data)."""

    request: FillRequest
    public: dict[str, Any]
    output_format: str = "png"
    base64_output: bool = False
    sync: bool = False
    webhook: str | None = None
    enhance_prompt: bool = False
    safety_checker: bool = False

    @property
    def cost(self) -> float:
        """What the task weighs in the queue: its input's megapixels times ``num_images``."""
        width, height = self.public["image_size"]
        return width * height / 1e6 * self.request.num_images

    def with_inputs(self, image: PIL.Image.Image, mask: PIL.Image.Image | None) -> TaskSpec:
        """This task with other input images: the same pixels decoded again when it runs, or stand-ins
        of the same size (:meth:`.task_files.TaskFiles.input_headers`) while it waits."""
        return dataclasses.replace(self, request=dataclasses.replace(self.request, image=image, mask=mask))

    def waiting(self, image: PIL.Image.Image, mask: PIL.Image.Image | None) -> TaskSpec:
        """This task as it waits in the queue, given stand-ins of its images: those in place of the
        decoded ones, except a ``crop_to_mask`` request's mask, whose pixels decide its batch."""
        return self.with_inputs(image, self.request.mask if self.request.crop_to_mask else mask)


def checked_loras(request: FillRequest) -> list[LoraSpec]:
    """The LoRAs of a checked request: ``FillRequest.validated`` turns each into a ``LoraSpec`` (the
    request's type also allows the dicts it was given)."""
    from ..lora import LoraSpec

    loras = list(request.loras or ())
    specs = [spec for spec in loras if isinstance(spec, LoraSpec)]
    if len(specs) != len(loras):
        raise RuntimeError(f"a checked request holds unchecked LoRAs: {loras!r}")
    return specs


def decode_image(
    value: Any, name: str, policy: UrlPolicy, max_megapixels: float, fetcher: Callable[..., bytes] = fetch
) -> PIL.Image.Image:
    """An image field (upload bytes, data URL, plain base64 or an allowed URL) as a PIL image.

    Raises :class:`RequestError` 400 for what cannot be decoded, 422 for a refused URL or size.
    """
    from ..images import open_image_bytes

    if isinstance(value, str):
        text = value.strip()
        if _URL.match(text):  # any scheme: the guard refuses all but http(s) by name
            try:
                data = fetcher(text, policy, name)
            except UrlRefused as err:
                raise RequestError(str(err), 422, name) from None
            except ValueError as err:  # UrlFailed: unreachable, an error status, a broken transfer
                raise RequestError(str(err), 400, name) from None
        else:
            found = _DATA_URL.match(text)
            payload = text[found.end() :] if found else text
            if not found and text.startswith("data:"):
                raise RequestError(
                    f"`{name}`: a data URL must be base64 (data:image/png;base64,...)", 400, name
                )
            try:
                data = base64.b64decode("".join(payload.split()), validate=True)
            except (binascii.Error, ValueError):
                raise RequestError(
                    f"`{name}` is neither a data URL, base64 image data, nor an http(s) URL", 400, name
                ) from None
    elif isinstance(value, (bytes, bytearray)):
        data = bytes(value)
    else:
        raise RequestError(
            f"`{name}` must be a string (data URL, base64 or URL) or an uploaded file, got {type(value).__name__}",
            422,
            name,
        )
    if not data:
        raise RequestError(f"`{name}` is empty", 400, name)
    try:
        return open_image_bytes(data, name, max_megapixels)
    except ValueError as err:
        status = 422 if "megapixels" in str(err) else 400
        raise RequestError(str(err), status, name) from None


def names_urls(body: Mapping[str, Any]) -> bool:
    """Whether checking ``body`` may fetch URLs (an image, a mask or a LoRA given as one)."""
    images = (body.get(name) for name in ("image", "mask", "mask_image"))
    if any(isinstance(value, str) and _URL.match(value.strip()) for value in images):
        return True
    loras = body.get("loras")
    return isinstance(loras, list) and any(
        isinstance(item, Mapping) and isinstance(item.get("path"), str) and _URL.match(item["path"])
        for item in loras
    )


def parse_size(value: Any) -> tuple[int, int]:
    """WaveSpeed's ``size``: ``"W*H"`` (``"WxH"`` also accepted)."""
    found = re.fullmatch(r"\s*(\d{1,5})\s*[*xX]\s*(\d{1,5})\s*", value) if isinstance(value, str) else None
    if found is None:
        raise RequestError(f'`size` must be "WIDTH*HEIGHT" such as "1024*1024", got {value!r}', 422, "size")
    return int(found.group(1)), int(found.group(2))


def _lora_path(index: int, path: Any, options: ServerOptions) -> str:
    """A LoRA ``path`` checked without any download: a file under ``--lora-dir``, or an allowed URL (kept
    as it is: :func:`_download_loras` fetches it once the whole request has passed)."""
    name = f"loras[{index}].path"
    if not isinstance(path, str) or not path:
        raise RequestError(f"`{name}` must be a non-empty string, got {path!r}", 422, "loras")
    if path.startswith(("http://", "https://")):
        if options.lora_cache is None:
            raise RequestError(f"`{name}`: LoRA URLs need a data folder", 422, "loras")
        try:
            check_url(path, options.url_policy, name)
        except UrlRefused as err:
            raise RequestError(str(err), 422, "loras") from None
        return path
    if options.lora_dir is None:
        raise RequestError(
            f"`{name}`: local LoRA files are off (start the server with --lora-dir DIR)", 422, "loras"
        )
    relative = PurePosixPath(path)
    if relative.is_absolute() or ".." in relative.parts or "\\" in path:
        raise RequestError(
            f"`{name}` must be a path relative to the LoRA folder, without '..', got {path!r}", 422, "loras"
        )
    root = options.lora_dir.resolve()
    target = (root / relative).resolve()
    if not target.is_relative_to(root) or not target.exists():
        raise RequestError(f"`{name}`: no LoRA {path!r} in the LoRA folder", 422, "loras")
    return str(target)


def _loras(value: Any, options: ServerOptions) -> list[dict[str, Any]] | None:
    if value is None:
        return None
    if not isinstance(value, list):
        raise RequestError(
            f'`loras` must be a list of {{"path", "scale"}} objects, got {value!r}', 422, "loras"
        )
    if len(value) > options.max_loras:
        raise RequestError(f"`loras`: {len(value)} given, at most {options.max_loras}", 422, "loras")
    loras = []
    for index, item in enumerate(value):
        if not isinstance(item, Mapping) or set(item) - {"path", "scale"}:
            raise RequestError(
                f'`loras[{index}]` must be {{"path": ..., "scale": ...}}, got {item!r}', 422, "loras"
            )
        loras.append({"path": _lora_path(index, item.get("path"), options), "scale": item.get("scale", 1.0)})
    return loras or None


def _download_loras(
    request: FillRequest, options: ServerOptions, fetcher: Callable[..., bytes]
) -> FillRequest:
    """``request`` (checked) with its LoRA URLs replaced by their files in the download cache."""
    from ..lora import LoraSpec

    specs = checked_loras(request)
    if not any(str(spec.path).startswith(("http://", "https://")) for spec in specs):
        return request
    assert options.lora_cache is not None  # _lora_path refused URLs without one
    local = []
    for index, spec in enumerate(specs):
        url = str(spec.path)
        if not url.startswith(("http://", "https://")):
            local.append(spec)
            continue
        name = f"loras[{index}].path"
        try:
            path = options.lora_cache.get(
                url, lambda url=url, name=name: fetcher(url, options.url_policy, name)
            )
        except UrlRefused as err:
            raise RequestError(str(err), 422, "loras") from None
        except ValueError as err:  # UrlFailed
            raise RequestError(str(err), 400, "loras") from None
        local.append(LoraSpec(str(path), spec.scale))
    return dataclasses.replace(request, loras=local)


def _flag(body: Mapping[str, Any], name: str, default: bool = False) -> bool:
    value = body.get(name, default)
    if not isinstance(value, bool):
        raise RequestError(f"`{name}` must be true or false, got {value!r}", 422, name)
    return value


def parse_task(
    body: Mapping[str, Any],
    options: ServerOptions,
    api: str = "native",
    fetcher: Callable[..., bytes] = fetch,
    admit: Callable[[TaskSpec], None] | None = None,
) -> TaskSpec:
    """Check a request body (``api`` ``"native"`` or ``"wavespeed"``) and build its :class:`TaskSpec`.

    LoRA URLs are downloaded last, once the whole request has passed its checks and ``admit`` (the
    queue's: raises when the task would not be taken) has accepted its spec.

    Native requests refuse unknown fields (a typo would otherwise be ignored silently); WaveSpeed
    requests ignore them, as WaveSpeed's clients send fields of other models too.
    Raises :class:`RequestError`.
    """
    from ..engine import FillRequest

    if not isinstance(body, Mapping):
        raise RequestError("the request body must be a JSON object", 400, None)
    if api == "native":
        unknown = sorted(set(body) - NATIVE_FIELDS)
        if unknown:
            raise RequestError(
                f"`{unknown[0]}` is not a request field; allowed: {', '.join(sorted(NATIVE_FIELDS))}",
                422,
                unknown[0],
            )
    if "prompt" not in body:
        raise RequestError("`prompt` is required", 422, "prompt")
    if "image" not in body:
        raise RequestError("`image` is required", 422, "image")
    if "mask" in body and "mask_image" in body:
        raise RequestError("`mask` and `mask_image` are the same field; give one", 422, "mask")
    # WaveSpeed's field is mask_image: a missing mask is named so there.
    wavespeed_name = api == "wavespeed" and "mask" not in body
    mask_name = "mask_image" if "mask_image" in body or wavespeed_name else "mask"
    width, height = body.get("width"), body.get("height")
    if body.get("size") is not None:
        if width is not None or height is not None:
            raise RequestError("`size`: give either size or width and height", 422, "size")
        width, height = parse_size(body["size"])
    seed = body.get("seed")
    if seed == -1:
        seed = None
    output_format = body.get("output_format", "png")
    output_format = "jpeg" if output_format == "jpg" else output_format
    if output_format not in OUTPUT_FORMATS:
        raise RequestError(
            f"`output_format` must be one of {list(OUTPUT_FORMATS)}, got {output_format!r}",
            422,
            "output_format",
        )
    webhook = body.get("webhook")
    if webhook is not None:
        if not isinstance(webhook, str):
            raise RequestError(f"`webhook` must be a URL string, got {webhook!r}", 422, "webhook")
        try:
            check_url(webhook, options.url_policy, "webhook")
        except UrlRefused as err:
            raise RequestError(str(err), 422, "webhook") from None
    enhance, safety = _flag(body, "enhance_prompt"), _flag(body, "enable_safety_checker")
    if enhance and not options.has_enhancer:
        raise RequestError(
            "`enhance_prompt`: no prompt enhancer (start with --prompt-enhancer DIR)", 422, "enhance_prompt"
        )
    # WaveSpeed's clients send enable_safety_checker: true by default: there it runs unchecked and says so
    # (the task's `safety_checker`); the native API refuses a check it cannot make.
    unchecked = safety and not options.has_safety_checker and api != "native"
    safety = safety and not unchecked
    if safety and not options.has_safety_checker:
        raise RequestError(
            "`enable_safety_checker`: no safety checker (start with --safety-checker DIR)",
            422,
            "enable_safety_checker",
        )
    fill = {name: body[name] for name in FILL_FIELDS if name in body}
    image = decode_image(body["image"], "image", options.url_policy, options.max_input_megapixels, fetcher)
    mask = body.get(mask_name)
    if mask is not None:
        mask = decode_image(mask, mask_name, options.url_policy, options.max_input_megapixels, fetcher)
    loras = _loras(body.get("loras"), options)
    request = FillRequest(image=image, mask=mask, width=width, height=height, seed=seed, loras=loras, **fill)
    try:
        request = request.validated(options.max_input_megapixels, options.max_loras)
    except (ValueError, TypeError, FileNotFoundError) as err:
        field = err.field if isinstance(err, InputError) else None
        message = str(err).replace("`mask`", f"`{mask_name}`")
        raise RequestError(message, 422, mask_name if field == "mask" else field) from None
    public = {
        **fill,
        "prompt": request.prompt,
        "width": width,
        "height": height,
        "seed": request.seed,
        "loras": body.get("loras"),
        "output_format": output_format,
        "enable_base64_output": _flag(body, "enable_base64_output"),
        "enhance_prompt": enhance,
        "enable_safety_checker": safety,
        "safety_checker": "on" if safety else "not configured" if unchecked else "off",
        "webhook": webhook,
        "image_size": list(image.size),
        "has_mask": mask is not None,
    }
    spec = TaskSpec(
        request=request,
        public=public,
        output_format=output_format,
        base64_output=public["enable_base64_output"],
        sync=_flag(body, "enable_sync_mode"),
        webhook=webhook,
        enhance_prompt=enhance,
        safety_checker=safety,
    )
    if admit is not None:
        admit(spec)
    spec.request = _download_loras(request, options, fetcher)
    public["lora_files"] = [{"path": str(s.path), "scale": s.scale} for s in checked_loras(spec.request)]
    return spec


def restore_task(public: Mapping[str, Any], image: PIL.Image.Image, mask: PIL.Image.Image | None) -> TaskSpec:
    """The :class:`TaskSpec` of a stored task (its ``public`` fields and saved input images), to run it
    again after a restart; checked again, as the LoRA files may have gone."""
    from ..engine import FillRequest

    fill = {name: public[name] for name in FILL_FIELDS if name in public}
    request = FillRequest(
        image=image,
        mask=mask,
        width=public.get("width"),
        height=public.get("height"),
        seed=public["seed"],
        loras=public.get("lora_files") or None,
        **fill,
    ).validated()
    return TaskSpec(
        request=request,
        public=dict(public),
        output_format=public.get("output_format", "png"),
        base64_output=bool(public.get("enable_base64_output")),
        webhook=public.get("webhook"),
        enhance_prompt=bool(public.get("enhance_prompt")),
        safety_checker=bool(public.get("enable_safety_checker")),
    )
