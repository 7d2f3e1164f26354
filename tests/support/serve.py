"""Real ``fluxfill serve`` servers for the tests: in this process (uvicorn on a loopback port, in a
thread) or as a subprocess (for restarts and ``kill -9``); request bodies; event readers; the image a
request gives when the engine runs it alone."""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import io
import json
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

import httpx
import numpy as np
import PIL.Image

from fluxfill_engine.bench import serve_load

if TYPE_CHECKING:
    from fluxfill_engine import Event, FillResult

# Small inputs at the smallest working resolution: a task takes a fraction of a second on a CPU.
FAST = {"num_inference_steps": 2, "max_megapixels": 0.065}
# The events of a task of FAST's two steps, in order, from submission to its outputs.
LIFECYCLE = [
    "task_queue",
    "task_accept",
    "task_preprocess_start",
    "task_preprocess_end",
    "task_start",
    "task_output",
    "task_output",
    "task_end",
    "task_postprocess_start",
    "task_postprocess_end",
]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def png_bytes(image: PIL.Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def data_url(image: PIL.Image.Image) -> str:
    return "data:image/png;base64," + base64.b64encode(png_bytes(image)).decode()


def inputs(width: int = 256, height: int = 256, seed: int = 0) -> tuple[PIL.Image.Image, PIL.Image.Image]:
    """A coloured image and a mask with a white box in the middle."""
    image = PIL.Image.new("RGB", (width, height), (40 + seed * 20 % 200, 120, 200))
    mask = PIL.Image.new("L", (width, height), 0)
    mask.paste(255, (width // 4, height // 4, 3 * width // 4, 3 * height // 4))
    return image, mask


def body(prompt: str = "a white paper cup", seed: int = 1, **fields: Any) -> dict[str, Any]:
    image, mask = inputs()
    return {
        "prompt": prompt,
        "image": data_url(image),
        "mask": data_url(mask),
        "seed": seed,
        **FAST,
        **fields,
    }


def make_app(data_dir: Path, engine: Any, **overrides: Any) -> Any:
    """The app of a server on ``engine`` with its data in ``data_dir``; ``overrides`` are fields of
    :class:`ServiceSettings` or :class:`ServerConfig` (``options`` a :class:`ServerOptions`)."""
    from fluxfill_engine.serve.app import ServerConfig, create_app
    from fluxfill_engine.serve.inputs import ServerOptions
    from fluxfill_engine.serve.service import ServiceSettings

    service_fields = {field.name for field in dataclasses.fields(ServiceSettings)}
    service = ServiceSettings(
        data_dir=data_dir, **{name: overrides.pop(name) for name in list(overrides) if name in service_fields}
    )
    options = overrides.pop("options", ServerOptions())
    return create_app(ServerConfig(service=service, options=options, **overrides), lambda: engine)


def solo_image(engine: Any, seed: int, **fields: Any) -> np.ndarray:
    """The image :func:`body`'s request gives run alone on ``engine`` (float32 pixels)."""
    from fluxfill_engine import FillRequest

    image, mask = inputs()
    request = FillRequest(
        prompt=fields.pop("prompt", "a white paper cup"), image=image, mask=mask, seed=seed, **FAST
    )
    return np.asarray(engine.run(request).images[0], dtype=np.float32)


def fetched_image(base: str, url: str) -> PIL.Image.Image:
    """An output image by its URL (absolute, or a path on the server at ``base``)."""
    answer = httpx.get(url if url.startswith("http") else base + url)
    assert answer.status_code == 200
    return PIL.Image.open(io.BytesIO(answer.content))


class InstantEngine:
    """Every step reported at once, a grey image per requested image; requests with equal steps fit in one
    pass; a pass holding the prompt ``"boom"`` fails. ``passes`` lists the prompts of every pass."""

    device = SimpleNamespace(type="cpu")

    def __init__(self) -> None:
        self.passes: list[list[str]] = []

    def batch_key(self, request: Any) -> Any:
        return request.num_inference_steps

    def run(self, request: Any, on_event: Callable[[Event], None] | None = None) -> FillResult:
        return self.run_batch([request], on_event)[0]

    def run_batch(
        self, requests: list[Any], on_event: Callable[[Event], None] | None = None
    ) -> list[FillResult]:
        from fluxfill_engine import Event, FillResult

        self.passes.append([request.prompt for request in requests])
        if any(request.prompt == "boom" for request in requests):
            raise RuntimeError("the GPU caught fire")
        emit = on_event or (lambda event: None)
        steps = requests[0].num_inference_steps
        emit(Event("preprocess_end"))
        for step in range(1, steps + 1):
            emit(Event("step", step=step, total=steps))
        emit(Event("done"))
        return [
            FillResult(
                images=[PIL.Image.new("RGB", (32, 32), (128, 128, 128))] * request.num_images,
                seed=request.seed,
                timings={"denoise": 0.01, "total": 0.02},
                stats={},
            )
            for request in requests
        ]


class SlowSteps:
    """An engine whose every step takes at least ``seconds`` (through the event handler it is given),
    so tests can cancel, fill the queue or kill while a task runs. Everything else is the engine's."""

    def __init__(self, engine: Any, seconds: float) -> None:
        self._engine = engine
        self.seconds = seconds

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)

    def _slowed(self, on_event: Any) -> Any:
        def handler(event: Any) -> None:
            if event.type == "step":
                time.sleep(self.seconds)
            if on_event is not None:
                on_event(event)

        return handler

    def run(self, request: Any, on_event: Any = None) -> Any:
        return self._engine.run(request, on_event=self._slowed(on_event))

    def run_batch(self, requests: Any, on_event: Any = None) -> Any:
        return self._engine.run_batch(requests, on_event=self._slowed(on_event))


@contextlib.contextmanager
def server_in_thread(app: Any, timeout: float = 120.0, ready: bool = True) -> Iterator[str]:
    """Run ``app`` with uvicorn on a free loopback port; yields its base URL once /healthz is 200
    (``ready=False``: once the server answers, its engine maybe still loading)."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    try:
        if ready:
            wait_ready(base, timeout)
        else:
            deadline = time.monotonic() + timeout
            while not server.started and time.monotonic() < deadline:
                time.sleep(0.02)
        yield base
    finally:
        server.should_exit = True
        thread.join(30)


def wait_ready(base: str, timeout: float = 120.0, process: subprocess.Popen | None = None) -> dict[str, Any]:
    return serve_load.wait_ready(base, process, timeout)


@contextlib.contextmanager
def server_process(
    data_dir: Path, *flags: str, port: int | None = None
) -> Iterator[tuple[str, subprocess.Popen]]:
    """``fluxfill serve`` as a real subprocess on the built-in tiny model."""
    port = port or free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(
        serve_load.serve_command(data_dir, port, flags),
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(base, 180, process)
        yield base, process
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def sse_events(
    base: str, task_id: str, timeout: float = 120.0, headers: dict[str, str] | None = None
) -> list[tuple[str, dict]]:
    """All events of a task as ``(name, data)`` pairs, read from its SSE stream until it closes."""
    found, name = [], None
    with httpx.stream("GET", f"{base}/v1/tasks/{task_id}/events", timeout=timeout, headers=headers) as stream:
        assert stream.status_code == 200, stream.read()
        for line in stream.iter_lines():
            if line.startswith("event: "):
                name = line[len("event: ") :]
            elif line.startswith("data: "):
                found.append((name, json.loads(line[len("data: ") :])))
    return found


def wait_status(
    base: str, task_id: str, statuses: set[str], timeout: float = 120.0, **kwargs: Any
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        task = httpx.get(f"{base}/v1/tasks/{task_id}", **kwargs).json()
        if task["status"] in statuses:
            return task
        time.sleep(0.05)
    raise TimeoutError(f"task {task_id} stayed {task['status']}")
