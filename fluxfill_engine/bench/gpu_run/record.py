"""The GPU run's record: its JSON file, shared by the orchestrator and each part's worker, and the
guards around a part and each step inside it (a failure is recorded, then the next one runs)."""

from __future__ import annotations

import datetime as dt
import json
import os
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from ..measure import AllocatorCounters, Timer, free_memory, jsonable
from .budget import PARTS, Deadline, HardStop, skipped
from .profiles import Profile

SCHEMA = "fluxfill-gpu-run/1"

PartFunction = Callable[["Run", Deadline, dict[str, Any]], None]


def error_record(error: BaseException, limit: int = 4000) -> dict[str, Any]:
    """The exception as text (the object itself would keep the failed step's tensors alive)."""
    text = "".join(traceback.format_exception(type(error), error, error.__traceback__))
    return {"type": type(error).__name__, "message": str(error)[:1000], "traceback_tail": text[-limit:]}


class Run:
    """The record, its JSON file and the guards around parts and steps.

    The orchestrating process and each part's worker process share the record through the JSON file:
    a worker loads it, runs its part (rewriting the file after every step) and exits; the orchestrator
    reads it back. Only one of them writes at a time.
    """

    def __init__(
        self, profile: Profile, out_dir: Path, parts: Sequence[str], record: dict | None = None
    ) -> None:
        self.profile = profile
        self.device = torch.device(profile.device)
        self.timer = Timer(self.device)
        self.memory = AllocatorCounters(self.device)
        self.out_dir = out_dir
        self.parts = list(parts)
        self.record: dict[str, Any] = record or {
            "schema": SCHEMA,
            "mode": profile.name,
            "complete": False,
            "started_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "started_epoch_s": time.time(),
            "budget": {"total_s": profile.budget_s, "shares_s": profile.shares, "parts": self.parts},
            "notes": list(profile.notes),
            "parts": {
                name: {"status": "pending"} if name in self.parts else skipped("not selected (--parts)")
                for name in PARTS
            },
        }

    @property
    def path(self) -> Path:
        return self.out_dir / "gpu_run.json"

    @classmethod
    def load(cls, profile: Profile, out_dir: Path) -> Run:
        record = json.loads((out_dir / "gpu_run.json").read_text())
        return cls(profile, out_dir, record["budget"]["parts"], record)

    def save(self) -> None:
        """Rewrite the JSON atomically (a reader never sees half a file)."""
        self.record["elapsed_s"] = time.time() - self.record["started_epoch_s"]
        self.out_dir.mkdir(parents=True, exist_ok=True)
        temporary = self.path.with_suffix(f".json.{os.getpid()}.tmp")
        temporary.write_text(json.dumps(jsonable(self.record), indent=1, allow_nan=False))
        temporary.replace(self.path)

    def part(self, name: str) -> dict[str, Any]:
        return self.record["parts"][name]

    def run_part(self, name: str, part: PartFunction, deadline: Deadline) -> None:
        """Run one part until ``deadline``; whatever it raises is recorded (then the next part runs)."""
        record: dict[str, Any] = {"status": "running", "allowance_s": deadline.left(), "items": {}}
        self.record["parts"][name] = record
        self.save()
        start = time.monotonic()
        try:
            with torch.no_grad():
                part(self, deadline, record)
            failed = [key for key, item in record["items"].items() if item.get("status") == "failed"]
            record["status"] = "partial" if failed else "ok"
            if failed:
                record["failed_items"] = failed
        except HardStop:
            record["status"] = "interrupted"
            record["reason"] = "stopped at its hard time limit"
        except Exception as error:  # noqa: BLE001 (every failure is recorded, then the next part runs)
            record["status"] = "failed"
            record["error"] = error_record(error)
            print(f"   {name} failed: {type(error).__name__}: {str(error)[:300]}", flush=True)
        finally:
            record["seconds"] = time.monotonic() - start
            free_memory(self.device, compiled=True)
            self.save()

    def item(
        self, record: dict[str, Any], key: str, function: Callable[[], dict[str, Any]]
    ) -> dict[str, Any]:
        """One guarded step inside a part: its result dict, or ``failed`` with the error."""
        start = time.monotonic()
        try:
            result = function()
        except HardStop:
            record["items"][key] = {"status": "interrupted", "seconds": time.monotonic() - start}
            raise
        except Exception as error:  # noqa: BLE001
            result = {"status": "failed", "error": error_record(error)}
            print(f"   {key}: failed: {type(error).__name__}: {str(error)[:300]}", flush=True)
        result.setdefault("status", "ok")
        result["seconds"] = time.monotonic() - start
        record["items"][key] = result
        self.save()
        if result["status"] != "failed":
            print(f"   {key}: {result['status']} ({result['seconds']:.1f} s){_brief(result)}", flush=True)
        return result


def _brief(result: dict[str, Any]) -> str:
    if result.get("status") == "skipped":
        return f": {result.get('reason', '')[:160]}"
    for key in ("ms_per_step", "sqnr_db", "within_tolerance"):
        if key in result:
            value = result[key]
            return f": {key}={value:.4g}" if isinstance(value, float) else f": {key}={value}"
    return ""
