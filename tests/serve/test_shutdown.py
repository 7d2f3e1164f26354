"""The graceful stop without a process: ``TaskService.drain`` (the running task's grace, then its cancel
with a closing event; queued tasks left queued) and the app refusing new requests once it stops (503,
WaveSpeed's shape under ``/api/v3/``, WebSockets closed 1012). With a real process and SIGTERM:
test_serve_restart.py."""

from __future__ import annotations

import time

import pytest
from fastapi.testclient import TestClient
from starlette.websockets import WebSocketDisconnect

from fluxfill_engine.serve.service import SHUT_DOWN
from fluxfill_engine.serve.store import CANCELED, COMPLETED, QUEUED
from tests.serve.test_service import event_names, running, spec
from tests.support.serve import InstantEngine, SlowSteps, body, make_app

STEP_S = 0.2


def _wait_running(service, task_id: str) -> None:
    deadline = time.monotonic() + 30
    while service.get(task_id).status != "running":
        assert time.monotonic() < deadline
        time.sleep(0.01)


@pytest.mark.parametrize("grace", [0.0, 30.0])
def test_drain_gives_the_running_task_its_grace_then_cancels_it(tmp_path, grace):
    steps = 6  # STEP_S each: ~1.2 s, far inside the long grace
    with running(tmp_path, SlowSteps(InstantEngine(), STEP_S)) as (service, loaded):
        loaded.set()
        first, _ = service.submit(spec(num_inference_steps=steps), "native")
        _wait_running(service, first.id)
        queued, _ = service.submit(spec(), "native")
        started = time.monotonic()
        service.drain(grace)
        took = time.monotonic() - started
        ran, waiting = service.get(first.id), service.get(queued.id)
        assert waiting.status == QUEUED and event_names(service, queued.id) == ["task_queue"]
        if grace:
            assert ran.status == COMPLETED and took < steps * STEP_S + 5
        else:
            assert (ran.status, ran.error) == (CANCELED, SHUT_DOWN) and took < 1.0
            names = event_names(service, first.id)
            assert names[-1] == "task_cancel" and names.count("task_cancel") == 1
            time.sleep(3 * STEP_S)  # the pass stops at its next step and writes nothing more
            assert event_names(service, first.id) == names


def test_a_stopping_app_refuses_new_requests(tmp_path):
    app = make_app(tmp_path, InstantEngine(), shutdown_grace_s=0.0)
    with TestClient(app) as client:
        assert client.get("/healthz").status_code == 200
        app.state.shutdown.begin()
        native = client.post("/v1/tasks", json=body())
        assert native.status_code == 503 and "shutting down" in native.json()["error"]
        assert int(native.headers["Retry-After"]) > 0
        wavespeed = client.post("/api/v3/wavespeed-ai/flux-fill-dev", json=body())
        assert wavespeed.status_code == 503 and wavespeed.json()["code"] == 503
        assert client.get("/healthz").status_code == 503
        with pytest.raises(WebSocketDisconnect) as closed, client.websocket_connect("/v1/socket") as socket:
            socket.receive_json()
        assert closed.value.code == 1012
