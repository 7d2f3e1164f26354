"""``fluxfill serve`` against hostile and careless clients, on a real server on loopback (uvicorn in a
thread, an instant engine): tenancy between API keys, odd input answered 4xx (never 500 or a dropped
connection), the WebSocket's subscription limit, the docs behind the key, returned URLs never built from
the ``Host`` header, and an undecodable image's error in words. SIGTERM: test_serve_restart.py."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time

import httpx
import pytest
import websockets

from fluxfill_engine.serve.api.socket import MAX_SUBSCRIPTIONS
from tests.support.serve import InstantEngine, body, make_app, server_in_thread, sse_events, wait_status

WAVESPEED_SUBMIT = "/api/v3/wavespeed-ai/flux-fill-dev"
ALICE, BOB, ADMIN = "alice-key", "bob-key", "admin-key"


def _auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture
def keyed(tmp_path):
    app = make_app(tmp_path, InstantEngine(), api_keys=(ALICE, BOB), admin_keys=(ADMIN,))
    with server_in_thread(app) as base:
        yield base


@pytest.fixture
def open_server(tmp_path):
    with server_in_thread(make_app(tmp_path, InstantEngine())) as base:
        yield base


async def _socket_messages(
    url: str, sends: list[str], until: int = 1, errors: int | None = None, timeout: float = 20.0
) -> list[dict]:
    """Every message the socket at ``url`` sends, after ``sends``, until ``until`` closing events (or
    ``errors`` error messages) came or it closed."""
    received: list[dict] = []
    async with websockets.connect(url, max_queue=None) as socket:
        received.append(json.loads(await socket.recv()))
        for text in sends:
            await socket.send(text)
        closing = 0
        try:
            while closing < until:
                message = json.loads(await asyncio.wait_for(socket.recv(), timeout))
                received.append(message)
                closing += message["type"] in ("task_postprocess_end", "task_error", "task_cancel")
                if errors is not None and sum(item["type"] == "error" for item in received) >= errors:
                    break
        except websockets.ConnectionClosed as closed:
            received.append({"type": "closed", "code": closed.rcvd.code if closed.rcvd else None})
    return received


def test_a_task_belongs_to_the_key_that_made_it(keyed, tmp_path):
    native = httpx.post(f"{keyed}/v1/tasks", json=body(), headers=_auth(ALICE)).json()
    done = wait_status(keyed, native["id"], {"completed"}, headers=_auth(ALICE))
    ws = httpx.post(f"{keyed}{WAVESPEED_SUBMIT}", json=body(), headers=_auth(ALICE)).json()["data"]
    for path in (
        f"/v1/tasks/{native['id']}",
        f"/v1/tasks/{native['id']}/events",
        f"/api/v3/predictions/{ws['id']}/result",
        f"/api/v3/predictions/{native['id']}/result",
    ):
        assert httpx.get(keyed + path, headers=_auth(BOB)).status_code == 404, path
        assert httpx.get(keyed + path, headers=_auth(ALICE)).status_code == 200, path
        assert httpx.get(keyed + path, headers=_auth(ADMIN)).status_code == 200, path
    canceled = httpx.post(f"{keyed}/v1/tasks/{ws['id']}/cancel", headers=_auth(BOB))
    assert canceled.status_code == 404 and canceled.json()["field"] == "id"
    assert sse_events(keyed, native["id"], headers=_auth(ALICE))[-1][0] == "task_postprocess_end"
    # The events stream's ?token= is a key too: Bob's token does not open Alice's task.
    assert httpx.get(f"{keyed}/v1/tasks/{native['id']}/events?token={BOB}").status_code == 404
    # Outputs stay reachable by their unguessable URL, without a key.
    assert httpx.get(keyed + done["outputs"][0]).status_code == 200

    url = keyed.replace("http", "ws") + "/v1/socket"
    ask = json.dumps({"type": "task_info", "tasktoken": native["id"]})
    bob = asyncio.run(_socket_messages(f"{url}?token={BOB}", [ask], errors=1))
    assert bob[1] == {"type": "error", "tasktoken": native["id"], "message": "no such task"}
    alice = asyncio.run(_socket_messages(f"{url}?token={ALICE}", [ask]))
    assert alice[-1]["type"] == "task_postprocess_end"

    # The database holds a hash of the key, never the key.
    stored = b"".join(path.read_bytes() for path in tmp_path.glob("tasks.sqlite3*"))
    assert ALICE.encode() not in stored and BOB.encode() not in stored
    with sqlite3.connect(tmp_path / "tasks.sqlite3") as db:
        owners = {row[0] for row in db.execute("SELECT owner FROM tasks")}
    assert len(owners) == 1 and "" not in owners


def test_idempotency_keys_are_scoped_per_key(keyed):
    header = {"Idempotency-Key": "order-1"}
    first = httpx.post(f"{keyed}/v1/tasks", json=body(prompt="alice's secret"), headers=_auth(ALICE) | header)
    again = httpx.post(f"{keyed}/v1/tasks", json=body(), headers=_auth(ALICE) | header)
    assert (first.status_code, again.status_code) == (201, 200) and again.json()["id"] == first.json()["id"]
    other = httpx.post(f"{keyed}/v1/tasks", json=body(prompt="bob's"), headers=_auth(BOB) | header)
    assert other.status_code == 201 and other.json()["id"] != first.json()["id"]
    assert other.json()["request"]["prompt"] == "bob's"
    repeated = httpx.post(f"{keyed}{WAVESPEED_SUBMIT}", json=body(), headers=_auth(BOB) | header)
    assert repeated.json()["data"]["id"] == other.json()["id"]


def test_json_nested_too_deeply_is_a_400(open_server):
    deep = b"[" * 100_000 + b"]" * 100_000
    for path in ("/v1/tasks", WAVESPEED_SUBMIT):
        answer = httpx.post(open_server + path, content=deep, headers={"content-type": "application/json"})
        assert answer.status_code == 400, (path, answer.text)
        assert "nested too deeply" in answer.text
    assert httpx.get(f"{open_server}/healthz").status_code == 200


def test_odd_last_event_ids_are_a_400(open_server):
    task = httpx.post(f"{open_server}/v1/tasks", json=body()).json()
    wait_status(open_server, task["id"], {"completed"})
    url = f"{open_server}/v1/tasks/{task['id']}/events"
    for header in ("²".encode(), b"1" * 25, b"-1", b"3 4"):
        answer = httpx.get(url, headers=[(b"Last-Event-ID", header)])
        assert answer.status_code == 400, (header, answer.text)
        assert answer.json()["field"] == "Last-Event-ID"
    all_events = sse_events(open_server, task["id"])
    after = sse_events(open_server, task["id"], headers={"Last-Event-ID": "3"})
    assert after == all_events[3:] and len(after) == len(all_events) - 3


def test_odd_websocket_messages_get_protocol_errors(open_server):
    task = httpx.post(f"{open_server}/v1/tasks", json=body()).json()
    url = open_server.replace("http", "ws") + "/v1/socket"
    sends = [
        '{"type": "task_info", "tasktoken": "\\ud800"}',  # a lone surrogate: valid JSON, not valid text
        "[" * 100_000 + "]" * 100_000,
        "not json",
        json.dumps({"type": "task_info", "tasktoken": 12}),
        json.dumps({"type": "task_info", "tasktoken": task["id"]}),
    ]
    messages = asyncio.run(_socket_messages(url, sends))
    errors = [message for message in messages if message["type"] == "error"]
    assert len(errors) == 4 and all("task_info" in error["message"] for error in errors)
    assert [message["type"] for message in messages if message["type"] not in ("error", "connected")][-1] == (
        "task_postprocess_end"
    )


def test_one_socket_subscribing_20000_times_meets_the_limit(open_server):
    task = httpx.post(f"{open_server}/v1/tasks", json=body()).json()
    wait_status(open_server, task["id"], {"completed"})
    events = sse_events(open_server, task["id"])
    url = open_server.replace("http", "ws") + "/v1/socket"
    ask = json.dumps({"type": "task_info", "tasktoken": task["id"]})
    started = time.monotonic()
    messages = asyncio.run(_socket_messages(url, [ask] * 20_000, until=2))
    relayed = [message for message in messages if message["type"] not in ("error", "connected", "closed")]
    assert [message["seq"] for message in relayed] == list(range(1, len(events) + 1))  # each event once
    errors = [message["message"] for message in messages if message["type"] == "error"]
    assert len(errors) == 1 and "subscription limit" in errors[0] and str(MAX_SUBSCRIPTIONS) in errors[0]
    assert messages[-1] == {"type": "closed", "code": 1008}
    health = httpx.get(f"{open_server}/healthz")
    assert health.status_code == 200 and time.monotonic() - started < 30


def test_docs_and_schema_are_behind_the_key(keyed, open_server):
    for path in ("/openapi.json", "/docs"):
        assert httpx.get(keyed + path).status_code == 401, path
        assert httpx.get(keyed + path, headers=_auth(BOB)).status_code == 200, path
        assert httpx.get(open_server + path).status_code == 200, path
    schema = httpx.get(f"{keyed}/openapi.json?token={BOB}").json()
    assert "/v1/tasks" in schema["paths"]
    page = httpx.get(f"{keyed}/docs?token={BOB}").text
    assert f"/openapi.json?token={BOB}" in page


def test_returned_urls_never_come_from_the_host_header(tmp_path, open_server):
    evil = {"Host": "evil.example"}
    sync = body(enable_sync_mode=True)
    answer = httpx.post(f"{open_server}{WAVESPEED_SUBMIT}", json=sync, headers=evil).json()["data"]
    assert answer["status"] == "completed"
    polled = httpx.get(f"{open_server}/api/v3/predictions/{answer['id']}/result", headers=evil).json()["data"]
    for data in (answer, polled):
        urls = [data["urls"]["get"], *data["outputs"]]
        assert all(url.startswith(open_server + "/") for url in urls), urls
        assert "evil" not in json.dumps(data)
    public = "https://fill.example.org"
    with server_in_thread(make_app(tmp_path / "public", InstantEngine(), public_url=public)) as base:
        data = httpx.post(f"{base}{WAVESPEED_SUBMIT}", json=sync, headers=evil).json()["data"]
        assert data["urls"]["get"].startswith(public + "/api/v3/predictions/")
        assert data["outputs"][0].startswith(public + "/v1/files/")


def test_an_undecodable_image_is_refused_in_words(open_server):
    for path in ("/v1/tasks", WAVESPEED_SUBMIT):
        answer = httpx.post(open_server + path, json=body(image="data:image/png;base64,aGVsbG8gd29ybGQ="))
        assert answer.status_code in (400, 422), answer.text
        assert "object at 0x" not in answer.text and "BytesIO" not in answer.text
        assert "not an image format" in answer.text
