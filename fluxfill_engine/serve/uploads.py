"""Files a client uploads before a request names them by URL (WaveSpeed's media uploads), kept under
``--data-dir/uploads/ID/``: ``meta.json`` (owner, name, size, times) and ``content`` (the bytes).

Two ways in, as WaveSpeed serves them: a ticket (``POST /api/v3/media/uploads`` declares the name and
size, the answer says where to ``PUT`` the bytes: a URL holding a one-time random token, as the SDK
sends no key with the PUT) and a multipart ``POST /api/v3/media/upload/binary``. Either way the file
gets a download URL on this server, ``/v1/uploads/ID/NAME``; a request that names it as ``image`` or
``mask_image`` reads it from here (:meth:`UploadStore.fetcher`), never over the network, so it works
without ``--allow-url-inputs``.

An upload belongs to the key that made it (its ``owner``): another key neither reads it nor uses it
(404, as if it did not exist). Uploads are kept as long as outputs (``--retention-hours``); a ticket
whose bytes did not come within :data:`TICKET_SECONDS` is dropped.
"""

from __future__ import annotations

import hashlib
import hmac
import io
import json
import re
import secrets
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .inputs import RequestError
from .urlguard import UrlPolicy, UrlRefused, fetch

TICKET_SECONDS = 3600.0  # how long a ticket waits for its PUT
# The end of a download URL of this server (any host: behind a proxy the host and a path prefix differ).
_DOWNLOAD_PATH = re.compile(r"^https?://[^/?#]+(?:/[^?#]*)?/v1/uploads/([0-9a-f]{32})/([^/?#]+)$")
_UNSAFE_NAME = re.compile(r"[^A-Za-z0-9._-]+")
_IMAGE_TYPES = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp", "GIF": "image/gif"}


@dataclass
class Upload:
    """One upload: ``stored`` once its bytes are there (a ticket's wait for its PUT until then)."""

    id: str
    owner: str
    filename: str
    size: int
    content_type: str
    created_at: float
    token_sha256: str = ""  # the PUT token's hash (a ticket's)
    stored: bool = False


def safe_filename(name: Any) -> str:
    """A file name fit for a URL path: letters, digits, ``._-`` (others replaced), 100 characters."""
    text = _UNSAFE_NAME.sub("_", Path(str(name or "")).name).strip("._")[:100]
    return text or "upload"


def image_type(data: bytes, field: str) -> str:
    """The MIME type of image file bytes (from the header only). Raises ``RequestError`` (400)."""
    import PIL.Image

    try:
        with PIL.Image.open(io.BytesIO(data)) as opened:
            kind = opened.format or ""
    except (OSError, PIL.UnidentifiedImageError, SyntaxError):
        kind = ""
    if not kind:
        raise RequestError(
            f"`{field}`: not an image file this server reads (PNG, JPEG, WebP, ...)", 400, field
        )
    return _IMAGE_TYPES.get(kind, f"image/{kind.lower()}")


class UploadStore:
    """The uploads of one data folder; thread-safe. ``max_bytes``: the largest file (the request limit);
    ``retention_hours``: how long a file is kept."""

    def __init__(self, folder: Path, max_bytes: int, retention_hours: float) -> None:
        self.folder = folder
        self.max_bytes = max_bytes
        self.retention_hours = retention_hours
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ making uploads

    def ticket(self, owner: str, filename: Any, size: Any, content_type: Any = None) -> tuple[Upload, str]:
        """A ticket for a file of ``size`` bytes: the upload (waiting) and the token its PUT must carry.
        Raises ``RequestError`` (422 a bad size, 413 over the limit)."""
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise RequestError(f"`size` must be the file's size in bytes (>= 1), got {size!r}", 422, "size")
        self._check_size(size, "size")
        token = secrets.token_urlsafe(24)
        kind = content_type if isinstance(content_type, str) and content_type else "application/octet-stream"
        upload = self._new(owner, filename, size, kind)
        upload.token_sha256 = hashlib.sha256(token.encode()).hexdigest()
        self._write_meta(upload)
        return upload, token

    def put(self, upload_id: str, name: str, token: str, data: bytes) -> Upload:
        """Store a ticket's bytes (once). Raises ``RequestError``: 404 no such ticket or a wrong token,
        409 already stored, 400 not the declared size or not an image."""
        with self._lock:
            upload = self._load(upload_id)
            given = hashlib.sha256(token.encode()).hexdigest()
            if (
                upload is None
                or upload.filename != name
                or not hmac.compare_digest(given, upload.token_sha256)
            ):
                raise RequestError("no such upload ticket (or a wrong upload_token)", 404, "upload_token")
            if upload.stored:
                raise RequestError(
                    f"upload {upload_id} has its file already; ask for a new ticket", 409, "id"
                )
            if len(data) != upload.size:
                raise RequestError(f"the ticket was for {upload.size} bytes; {len(data)} came", 400, "size")
            upload.content_type = image_type(data, "file")
            self._store(upload, data)
            return upload

    def add(self, owner: str, filename: Any, data: bytes) -> Upload:
        """Store a file uploaded whole (the binary upload). Raises ``RequestError`` (400, 413)."""
        if not data:
            raise RequestError("`file` is empty", 400, "file")
        self._check_size(len(data), "file")
        upload = self._new(owner, filename, len(data), image_type(data, "file"))
        with self._lock:
            self._store(upload, data)
        return upload

    # ------------------------------------------------------------------ reading them

    def get(self, upload_id: str, name: str, owner: str | None) -> tuple[Upload, Path]:
        """A stored upload and its file; ``owner`` ``None``: any owner (a server without keys).
        Raises ``RequestError`` 404 (unknown, expired, not stored yet, or another key's)."""
        upload = self._load(upload_id) if re.fullmatch(r"[0-9a-f]{32}", upload_id) else None
        if (
            upload is None
            or not upload.stored
            or upload.filename != name
            or (owner is not None and not hmac.compare_digest(upload.owner, owner))
            or self._expired(upload, time.time())
        ):
            raise RequestError(f"no upload {upload_id}/{name} (or it expired)", 404, "id")
        return upload, self.folder / upload.id / "content"

    def fetcher(self, owner: str | None, fallback: Callable[..., bytes] = fetch) -> Callable[..., bytes]:
        """A URL fetcher for ``inputs.parse_task``: a download URL of this server is read from the
        owner's uploads; any other URL goes to ``fallback`` (the URL guard's fetch, which refuses URLs
        unless ``--allow-url-inputs``)."""

        def fetch_input(url: str, policy: UrlPolicy, field: str) -> bytes:
            found = _DOWNLOAD_PATH.match(url.strip())
            if found is None:
                return fallback(url, policy, field)
            try:
                _, path = self.get(found.group(1), found.group(2), owner)
            except RequestError:
                raise UrlRefused(f"`{field}`: no upload at {url} for this API key (or it expired)") from None
            return path.read_bytes()

        return fetch_input

    # ------------------------------------------------------------------ expiry

    def delete_expired(self, now: float | None = None) -> int:
        """Delete the uploads past their retention and the tickets that waited too long; how many."""
        return delete_expired_uploads(self.folder, self.retention_hours, now)

    def _expired(self, upload: Upload, now: float) -> bool:
        return _expired(upload, self.retention_hours, now)

    # ------------------------------------------------------------------ files

    def _check_size(self, size: int, field: str) -> None:
        if size > self.max_bytes:
            raise RequestError(
                f"`{field}`: {size} bytes, over the server's limit of {self.max_bytes} bytes (--max-request-mb)",
                413,
                field,
            )

    def _new(self, owner: str, filename: Any, size: int, content_type: str) -> Upload:
        self.delete_expired()  # an upload is when the folder grows: clean it up then too
        upload_id = secrets.token_hex(16)
        return Upload(upload_id, owner, safe_filename(filename), size, content_type, time.time())

    def _store(self, upload: Upload, data: bytes) -> None:
        folder = self.folder / upload.id
        folder.mkdir(parents=True, exist_ok=True)
        partial = folder / "content.part"
        partial.write_bytes(data)
        partial.replace(folder / "content")
        upload.stored = True  # the token's hash stays: a second PUT with it answers 409, not 404
        self._write_meta(upload)

    def _write_meta(self, upload: Upload) -> None:
        folder = self.folder / upload.id
        folder.mkdir(parents=True, exist_ok=True)
        partial = folder / "meta.json.part"
        partial.write_text(json.dumps(asdict(upload)))
        partial.replace(folder / "meta.json")

    def _load(self, upload_id: str) -> Upload | None:
        return _load(self.folder, upload_id)


def _load(folder: Path, upload_id: str) -> Upload | None:
    try:
        return Upload(**json.loads((folder / upload_id / "meta.json").read_text()))
    except (OSError, ValueError, TypeError):
        return None


def _expired(upload: Upload, retention_hours: float, now: float) -> bool:
    keep = retention_hours * 3600 if upload.stored else TICKET_SECONDS
    return now - upload.created_at > keep


def delete_expired_uploads(folder: Path, retention_hours: float, now: float | None = None) -> int:
    """Delete the uploads under ``folder`` kept over ``retention_hours`` and the tickets that waited over
    :data:`TICKET_SECONDS` for their bytes (the service's clean-up calls it with the outputs'); how many."""
    now = time.time() if now is None else now
    if not folder.is_dir():
        return 0
    deleted = 0
    for entry in folder.iterdir():
        upload = _load(folder, entry.name)
        if upload is None or _expired(upload, retention_hours, now):
            shutil.rmtree(entry, ignore_errors=True)
            deleted += 1
    return deleted
