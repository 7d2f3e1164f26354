"""The HTTP layer in process (FastAPI's TestClient, an instant fake engine): which routes need the API key,
and every refusal in the shape of the API it belongs to. End to end on a real server: test_serve.py."""

from __future__ import annotations

import re
import time

import pytest
from fastapi.routing import APIRoute, APIWebSocketRoute
from fastapi.testclient import TestClient
from starlette.websockets import WebSocketDisconnect

from fluxfill_engine.serve.api import ROUTERS
from tests.support.serve import InstantEngine, body, make_app

OPEN_PATHS = {"/", "/healthz", "/v1/files/{task_id}/{name}"}  # docs/serving.md, "Security"
# Routes with a permission of their own instead of the key: an upload ticket's one-time token.
OPEN_ROUTES = {("PUT", "/v1/uploads/{upload_id}/{name}")}
WAVESPEED_SUBMIT = "/api/v3/wavespeed-ai/flux-fill-dev"


@pytest.fixture
def client(tmp_path):
    with TestClient(make_app(tmp_path, InstantEngine()), raise_server_exceptions=False) as client:
        yield client


def test_every_route_but_the_open_ones_needs_the_key(tmp_path):
    app = make_app(tmp_path, InstantEngine(), api_keys=("key-one",))
    routes = [route for router in ROUTERS for route in router.routes]
    assert {route.path for route in routes} >= OPEN_PATHS | {"/v1/tasks", "/v1/socket", WAVESPEED_SUBMIT}
    with TestClient(app) as client:
        for route in routes:
            path = re.sub(r"\{[^}]+\}", "x", route.path.replace("{name}", "0.png"))
            if isinstance(route, APIWebSocketRoute):
                with pytest.raises(WebSocketDisconnect) as closed, client.websocket_connect(path) as socket:
                    socket.receive_json()
                assert closed.value.code == 1008
                continue
            assert isinstance(route, APIRoute)
            for method in route.methods - {"HEAD"}:
                answer = client.request(method, path)
                if route.path in OPEN_PATHS or (method, route.path) in OPEN_ROUTES:
                    assert answer.status_code != 401, (method, path)
                else:
                    assert answer.status_code == 401, (method, path, answer.text)
                    assert answer.headers["WWW-Authenticate"] == "Bearer"
        keyed = client.get("/v1/tasks/x", headers={"Authorization": "Bearer key-one"})
        assert keyed.status_code == 404


def test_native_refusals_name_the_field(client):
    assert client.get("/v1/tasks/x").json() == {"error": "no task 'x'", "field": "id"}
    refused = client.post("/v1/tasks", json=body(num_inference_steps=0))
    assert refused.status_code == 422 and refused.json()["field"] == "num_inference_steps"
    header = client.post("/v1/tasks", json=body(), headers={"Idempotency-Key": "k" * 256})
    assert header.status_code == 400 and header.json()["field"] == "Idempotency-Key"
    task = client.post("/v1/tasks", json=body()).json()
    client.post(f"/v1/tasks/{task['id']}/cancel")
    while client.get(f"/v1/tasks/{task['id']}").json()["status"] in ("queued", "running"):
        time.sleep(0.01)
    finished = client.post(f"/v1/tasks/{task['id']}/cancel")
    assert finished.status_code == 409 and finished.json()["field"] == "id"
    file = client.get(f"/v1/files/{task['id']}/9.png")
    assert file.status_code == 404 and file.json()["field"] == "name"
    unknown_route = client.get("/v2/nothing")
    assert unknown_route.status_code == 404 and unknown_route.json()["field"] is None


def test_wavespeed_refusals_take_wavespeeds_shape(client):
    unknown = client.get("/api/v3/predictions/x/result").json()
    assert (unknown["code"], unknown["data"]) == (404, None) and "'x'" in unknown["message"]
    refused = client.post(WAVESPEED_SUBMIT, json=body(size="big"))
    assert refused.status_code == 422
    assert (
        refused.json()["code"] == 422
        and "size" in refused.json()["message"]
        and refused.json()["data"] is None
    )


def test_an_unexpected_error_is_a_500_in_the_apis_shape(client, monkeypatch):
    service = client.app.state.service

    def broken(task_id: str) -> None:
        raise RuntimeError("the disk is gone")

    monkeypatch.setattr(service, "get", broken)
    monkeypatch.setattr(service.store, "get", broken)
    some_id = "0" * 32  # the form of a task id: looked up (odd ids are 404 without a lookup)
    native = client.get(f"/v1/tasks/{some_id}")
    assert native.status_code == 500
    assert native.json() == {"error": "internal error (see the server log)", "field": None}
    wavespeed = client.get(f"/api/v3/predictions/{some_id}/result")
    assert wavespeed.status_code == 500 and wavespeed.json()["code"] == 500
    assert "disk" not in native.text + wavespeed.text
