"""Webhook delivery as Standard Webhooks (https://www.standardwebhooks.com) describes it.

Each message is a JSON POST ``{"type", "timestamp", "data"}`` with the ``webhook-id``,
``webhook-timestamp`` and ``webhook-signature`` headers (``v1,<base64 HMAC-SHA256>`` of
``"{id}.{timestamp}.{body}"``), sent from a background thread through :mod:`.urlguard` (so a webhook
never reaches a private address) and retried with backoff on connection errors, timeouts, 5xx and 429.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import logging
import secrets
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .urlguard import UrlFailed, UrlPolicy, UrlRefused, request

log = logging.getLogger(__name__)

_PREFIX = "whsec_"


def _key(secret: str) -> bytes:
    """The HMAC key: the base64 after ``whsec_`` (Standard Webhooks' form), else the text's UTF-8."""
    if secret.startswith(_PREFIX):
        try:
            # Extra padding is ignored by b64decode, and makes unpadded secrets decode as well.
            key = base64.b64decode(secret[len(_PREFIX) :] + "==")
        except (binascii.Error, ValueError):
            raise ValueError("webhook secret: whsec_ must be followed by base64") from None
    else:
        key = secret.encode()
    if not key:
        raise ValueError("webhook secret: empty")
    return key


def sign(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    """The ``webhook-signature`` value of a message: ``v1,`` and the base64 HMAC-SHA256 of
    ``f"{msg_id}.{timestamp}."`` followed by ``body``, keyed by ``secret`` (``whsec_<base64>`` or raw text)."""
    digest = hmac.new(_key(secret), f"{msg_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode("ascii")


def generate_secret() -> str:
    """A new random secret (32 bytes) in the ``whsec_<base64>`` form."""
    return _PREFIX + base64.b64encode(secrets.token_bytes(32)).decode("ascii")


def stored_secret(data_dir: Path) -> str:
    """The signing secret kept in the data folder (made on first use), so signatures verify across
    restarts."""
    path = data_dir / "webhook_secret"
    if not path.exists():
        path.write_text(generate_secret())
        path.chmod(0o600)
    return path.read_text().strip()


class WebhookSender:
    """Sends signed webhooks, each on its own daemon thread, retried after each of ``delays`` (seconds).

    ``on_result(msg_id, result)`` is called once per message with its final outcome
    ``{"delivered", "attempts", "status", "error"}``. Messages whose URL the policy refuses are not sent
    (nor retried): ``attempts`` 1, ``status`` None and the refusal as ``error``.
    """

    def __init__(
        self,
        secret: str,
        policy: UrlPolicy,
        delays: Sequence[float] = (1, 2, 4, 8, 16),
        on_result: Callable[[str, dict], None] | None = None,
    ) -> None:
        _key(secret)  # a bad secret fails at startup, not at the first delivery
        self.secret, self.policy, self.delays, self.on_result = secret, policy, tuple(delays), on_result
        self._threads: set[threading.Thread] = set()
        self._lock = threading.Lock()
        self._closed = False

    def send(self, url: str, event_type: str, payload: dict) -> str:
        """Queue ``payload`` as an ``event_type`` message to ``url``; returns its id (``msg_...``) at once."""
        msg_id = f"msg_{uuid.uuid4().hex}"
        stamp = datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")
        body = json.dumps({"type": event_type, "timestamp": stamp, "data": payload}, separators=(",", ":"))
        thread = threading.Thread(
            target=self._deliver, args=(url, msg_id, body.encode()), name=f"webhook-{msg_id}", daemon=True
        )
        with self._lock:
            if self._closed:
                raise RuntimeError("WebhookSender is closed")
            self._threads.add(thread)
        thread.start()
        return msg_id

    def _attempt(self, url: str, msg_id: str, body: bytes) -> tuple[int | None, str | None, bool]:
        """One POST: (status, error, worth retrying)."""
        timestamp = int(time.time())  # per attempt, signed again: receivers refuse stale timestamps
        headers = {
            "content-type": "application/json",
            "webhook-id": msg_id,  # the same on every attempt: receivers deduplicate on it
            "webhook-timestamp": str(timestamp),
            "webhook-signature": sign(self.secret, msg_id, timestamp, body),
        }
        try:
            status, _, _ = request("POST", url, self.policy, "webhook", body=body, headers=headers)
        except UrlRefused as err:
            return None, str(err), False
        except UrlFailed as err:
            return None, str(err), True
        if 200 <= status < 300:
            return status, None, False
        return status, f"HTTP {status}", status >= 500 or status == 429

    def _deliver(self, url: str, msg_id: str, body: bytes) -> None:
        result: dict[str, Any] = {"delivered": False, "attempts": 0, "status": None, "error": None}
        try:
            for delay in (*self.delays, None):
                result["attempts"] += 1
                status, error, retry = self._attempt(url, msg_id, body)
                result.update(delivered=error is None, status=status, error=error)
                if not retry or delay is None:
                    break
                time.sleep(delay)
        except Exception as err:  # a bug must still end in one on_result, not a silent dead thread
            log.exception("webhook %s to %s", msg_id, url)
            result.update(delivered=False, error=f"{type(err).__name__}: {err}")
        try:
            if not result["delivered"]:
                log.warning(
                    "webhook %s: not delivered (%d attempts): %s", msg_id, result["attempts"], result["error"]
                )
            if self.on_result is not None:
                self.on_result(msg_id, result)
        except Exception:
            log.exception("webhook on_result for %s", msg_id)
        finally:  # last, so that close() also waits for on_result
            with self._lock:
                self._threads.discard(threading.current_thread())

    def close(self, timeout: float | None = None) -> bool:
        """Refuse new messages and wait (up to ``timeout`` seconds in all) for those under way; True when
        all of them finished."""
        end = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            self._closed = True
            threads = list(self._threads)
        for thread in threads:
            thread.join(None if end is None else max(end - time.monotonic(), 0.0))
        return not any(t.is_alive() for t in threads)
