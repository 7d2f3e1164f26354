"""LoRA files downloaded from URLs (``--allow-url-inputs``), kept in a folder of the data dir under a bound
in bytes (``--lora-cache-mb``), least recently used out.

A file is named by its URL's hash, so a URL asked again is not downloaded again (its use counts as
recent). Files that queued or running tasks still name (``in_use``) are never deleted: with many of
them the folder may stay over its bound until those tasks end.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

LORA_CACHE_BYTES = 2 * 2**30  # --lora-cache-mb's default


class LoraCache:
    """The download folder ``folder`` bounded to ``max_bytes``; ``in_use()``: the paths (as strings) that
    must stay. Thread-safe."""

    def __init__(
        self, folder: Path, max_bytes: int = LORA_CACHE_BYTES, in_use: Callable[[], set[str]] | None = None
    ) -> None:
        if max_bytes <= 0:
            raise ValueError(f"LoraCache: max_bytes must be > 0, got {max_bytes}")
        self.folder = folder
        self.max_bytes = max_bytes
        self.in_use = in_use or set
        self.downloads = 0  # files fetched (a cached URL asked again is not one)
        self._lock = threading.Lock()

    def path_for(self, url: str) -> Path:
        return self.folder / f"{hashlib.sha256(url.encode()).hexdigest()[:32]}.safetensors"

    def get(self, url: str, download: Callable[[], bytes]) -> Path:
        """The local file of ``url``: the cached one (marked as just used), else ``download()``'s bytes
        written there, then the least recently used others deleted while the folder is over its bound."""
        target = self.path_for(url)
        with self._lock:
            if target.is_file():
                os.utime(target)
                return target
        data = download()  # outside the lock: other requests' LoRAs are not held up by this one
        with self._lock:
            self.folder.mkdir(parents=True, exist_ok=True)
            partial = target.with_suffix(f".part{threading.get_ident()}")
            partial.write_bytes(data)
            partial.replace(target)  # whole or absent, never half-written
            self.downloads += 1
            self._evict(keep=target)
        return target

    def _evict(self, keep: Path) -> None:
        files = sorted(self._files(), key=lambda path: path.stat().st_mtime)
        total = sum(path.stat().st_size for path in files)
        protected = self.in_use() | {str(keep)}
        for path in files:
            if total <= self.max_bytes:
                return
            if str(path) in protected:
                continue
            size = path.stat().st_size
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
                total -= size

    def _files(self) -> list[Path]:
        return [path for path in self.folder.glob("*.safetensors") if path.is_file()]

    def register_metrics(self, registry: Any) -> None:
        """Gauges of the folder in a Prometheus ``registry``: ``fluxfill_lora_cache_bytes``,
        ``fluxfill_lora_cache_files``, and the counter of downloads."""
        from prometheus_client import Gauge

        Gauge(
            "fluxfill_lora_cache_bytes", "Bytes of downloaded LoRA files kept", registry=registry
        ).set_function(lambda: self.usage()[1])
        Gauge("fluxfill_lora_cache_files", "Downloaded LoRA files kept", registry=registry).set_function(
            lambda: self.usage()[0]
        )
        Gauge(
            "fluxfill_lora_downloads", "LoRA files downloaded since the start", registry=registry
        ).set_function(lambda: self.downloads)

    def usage(self) -> tuple[int, int]:
        """(files, bytes) in the folder now."""
        with self._lock:
            if not self.folder.is_dir():
                return 0, 0
            files = self._files()
            return len(files), sum(path.stat().st_size for path in files)


def lora_files_of(requests: Iterable[Any]) -> set[str]:
    """The LoRA files that stored tasks name (their ``request["lora_files"]``), as ``in_use`` wants them."""
    return {str(item["path"]) for task in requests for item in task.request.get("lora_files") or ()}
