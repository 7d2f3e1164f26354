"""Everything a ``fluxfill serve`` server is started with, as one value (:func:`.app.create_app` takes it)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from .inputs import ServerOptions
from .service import ServiceSettings


@dataclass
class ServerConfig:
    """Everything ``fluxfill serve`` was started with."""

    service: ServiceSettings
    options: ServerOptions = field(default_factory=ServerOptions)
    api_keys: Sequence[str] = ()  # every key accepted; create_app adds the admin keys
    admin_keys: Sequence[str] = ()  # keys that see every task (docs/serving.md, "Security")
    shutdown_grace_s: float = 30.0  # SIGTERM: how long the running tasks may still run
    max_request_bytes: int = 64 * 2**20
    body_timeout_s: float = 30.0  # a request body must arrive within this (slowloris: 408)
    max_inflight_bytes: int = 256 * 2**20  # request bodies read at once, together (then 503)
    url_fetches: int = 8  # requests with URL inputs checked at once (the others wait)
    model: str = "tiny"
    preset: str = "reference"
    device: str = "cpu"
    tiny_model: bool = True
    webhook_secret: str | None = None
