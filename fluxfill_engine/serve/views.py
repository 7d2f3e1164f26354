"""How a task is shown: the native API's task object (also the webhooks' payload), WaveSpeed's
prediction, and the URLs of its outputs (relative, absolute, or inline data URLs)."""

from __future__ import annotations

import base64
import mimetypes
from datetime import datetime, timezone
from typing import Any, TypedDict

from .store import CANCELED, COMPLETED, FAILED, QUEUED, RUNNING, Task
from .task_files import TaskFiles

WAVESPEED_MODEL = "wavespeed-ai/flux-fill-dev"
_WAVESPEED_STATUS = {QUEUED: "created", RUNNING: "processing", COMPLETED: "completed", FAILED: "failed"}


class Progress(TypedDict):
    step: int
    total: int


class TaskUrls(TypedDict):
    get: str
    events: str
    cancel: str


class TaskSummary(TypedDict):
    """A task as the native API and the webhooks show it (docs/serving.md)."""

    id: str
    status: str
    created_at: float
    started_at: float | None
    finished_at: float | None
    progress: Progress
    outputs: list[str]
    outputs_expired: bool
    seed: int | None
    timings: dict[str, float]
    error: str | None
    has_nsfw_contents: list[bool]  # one flag per output where a safety checker ran, else empty
    safety_checker: str  # "on" | "off" | "not configured" (asked for, none on this server: unchecked)
    request: dict[str, Any]
    urls: TaskUrls


class NativeTask(TaskSummary):
    """The native API's answer: the summary and whether a cancel is pending."""

    cancel_requested: bool


class WavespeedTimings(TypedDict):
    inference: int | None  # milliseconds


class WavespeedPrediction(TypedDict):
    """WaveSpeed's ``data`` object of a prediction."""

    id: str
    model: str
    status: str
    outputs: list[str]
    urls: dict[str, str]
    has_nsfw_contents: list[bool]  # one flag per output where a safety checker ran, else empty
    safety_checker: str  # "on" | "off" | "not configured" (asked for, none on this server: unchecked)
    created_at: str | None
    error: str
    timings: WavespeedTimings
    seed: int | None


def files_url(task_id: str, name: str, base: str = "") -> str:
    return f"{base}/v1/files/{task_id}/{name}"


def task_summary(task: Task, base: str = "") -> TaskSummary:
    """A task as the native API shows it; URLs relative, or under ``base`` (``https://host``)."""
    return {
        "id": task.id,
        "status": task.status,
        "created_at": task.created_at,
        "started_at": task.started_at,
        "finished_at": task.finished_at,
        "progress": {"step": task.progress_step, "total": task.progress_total},
        "outputs": [] if task.files_deleted else [files_url(task.id, name, base) for name in task.outputs],
        "outputs_expired": task.files_deleted,
        "seed": task.seed,
        "timings": task.timings,
        "error": task.error,
        "has_nsfw_contents": task.nsfw,
        "safety_checker": safety_checker(task),
        "request": {key: value for key, value in task.request.items() if key != "lora_files"},
        "urls": {
            "get": f"{base}/v1/tasks/{task.id}",
            "events": f"{base}/v1/tasks/{task.id}/events",
            "cancel": f"{base}/v1/tasks/{task.id}/cancel",
        },
    }


def output_urls(task: Task, files: TaskFiles, base: str = "", inline: bool = False) -> list[str]:
    """The URLs of a task's outputs under ``base``, or (``inline``) the files themselves as data URLs."""
    if task.files_deleted:
        return []
    if not inline:
        return [files_url(task.id, name, base) for name in task.outputs]
    urls = []
    for name in task.outputs:
        data = files.output(task.id, name).read_bytes()
        kind = mimetypes.guess_type(name)[0] or "application/octet-stream"
        urls.append(f"data:{kind};base64,{base64.b64encode(data).decode()}")
    return urls


def native_task(task: Task, files: TaskFiles, cancel_requested: bool) -> NativeTask:
    """The native API's task object: outputs inline when the request asked for base64 output."""
    view: NativeTask = {**task_summary(task), "cancel_requested": cancel_requested}
    if task.request.get("enable_base64_output"):
        view["outputs"] = output_urls(task, files, inline=True)
    return view


def wavespeed_prediction(task: Task, files: TaskFiles, base: str) -> WavespeedPrediction:
    """WaveSpeed's view of a task, its URLs under ``base`` (the server's address as the client used it)."""
    inference = task.timings.get("total")
    inline = bool(task.request.get("enable_base64_output"))
    return {
        "id": task.id,
        "model": WAVESPEED_MODEL,
        "status": _WAVESPEED_STATUS.get(task.status, "failed"),
        "outputs": output_urls(task, files, base, inline) if task.status == COMPLETED else [],
        "urls": {"get": f"{base}/api/v3/predictions/{task.id}/result"},
        "has_nsfw_contents": task.nsfw,
        "safety_checker": safety_checker(task),
        "created_at": iso_time(task.created_at),
        "error": task.error or ("canceled" if task.status == CANCELED else ""),
        "timings": {"inference": None if inference is None else round(inference * 1000)},
        "seed": task.seed,
    }


def safety_checker(task: Task) -> str:
    """Whether the task's outputs are checked: ``"on"``, ``"off"``, or ``"not configured"`` (asked for on
    a server without ``--safety-checker``: they are not)."""
    asked = task.request.get("enable_safety_checker")
    return task.request.get("safety_checker") or ("on" if asked else "off")


def iso_time(seconds: float | None) -> str | None:
    """Unix seconds as ISO 8601 in UTC with milliseconds (``2026-01-02T03:04:05.678Z``)."""
    if seconds is None:
        return None
    return (
        datetime.fromtimestamp(seconds, timezone.utc)
        .isoformat(timespec="milliseconds")
        .replace("+00:00", "Z")
    )
