"""``fluxfill serve`` against a real server on loopback (uvicorn in a thread, the tiny engine).

Both APIs end to end with images equal to the engine's; events in order and replayed; the WebSocket;
multipart uploads and idempotency keys; cancel of queued and running tasks; 429 with ``Retry-After``; API
keys; 413; refusals naming the field and leaving no task; URL inputs aimed at private addresses refused;
a failing task that does not stop the worker; warm-up; output and task retention; add-ons; a signed
webhook; queued tasks that fit run as one batch; a backlog shared among replicas; the flags."""

from __future__ import annotations

import asyncio
import io
import json
import sqlite3
import threading
import time

import httpx
import numpy as np
import PIL.Image
import pytest
import websockets

from fluxfill_engine.serve.app import ServerConfig, create_app
from fluxfill_engine.serve.inputs import ServerOptions
from fluxfill_engine.serve.service import ServiceSettings
from fluxfill_engine.serve.urlguard import UrlPolicy
from tests.support.serve import (
    FAST,
    LIFECYCLE,
    SlowSteps,
    body,
    data_url,
    fetched_image,
    inputs,
    make_app,
    png_bytes,
    server_in_thread,
    solo_image,
    sse_events,
    wait_status,
)


@pytest.fixture
def server(tmp_path, shared_engine):
    with server_in_thread(make_app(tmp_path, shared_engine)) as base:
        yield base


def test_wavespeed_submit_poll_and_files(server, shared_engine):
    image, mask = inputs()
    request = {
        "prompt": "a white paper cup",
        "image": data_url(image),
        "mask_image": data_url(mask).split(",", 1)[1],  # plain base64, as WaveSpeed also takes
        "size": "256*256",
        "num_inference_steps": 2,
        "seed": 7,
        "guidance_scale": 30,
        "num_images": 2,
        "output_format": "jpeg",
        "max_megapixels": 0.065,
    }
    answer = httpx.post(f"{server}/api/v3/wavespeed-ai/flux-fill-dev", json=request)
    assert answer.status_code == 200
    reply = answer.json()
    assert reply["code"] == 200 and reply["message"] == "success"
    data = reply["data"]
    assert (
        data["status"] == "created"
        and data["outputs"] == []
        and data["model"] == "wavespeed-ai/flux-fill-dev"
    )
    deadline = time.monotonic() + 60
    while True:
        result = httpx.get(data["urls"]["get"]).json()["data"]
        if result["status"] in ("completed", "failed") or time.monotonic() > deadline:
            break
        assert result["status"] in ("created", "processing")
        time.sleep(0.05)
    assert result["status"] == "completed", result
    assert result["error"] == "" and result["seed"] == 7 and result["timings"]["inference"] >= 0
    # No safety check asked for: no flags (a [False] would claim a check that did not run).
    assert len(result["outputs"]) == 2 and result["has_nsfw_contents"] == []
    assert result["safety_checker"] == "off"
    pictures = [fetched_image(server, url) for url in result["outputs"]]
    assert all(p.format == "JPEG" and p.size == (256, 256) for p in pictures)


def test_wavespeed_sync_mode_and_base64_output(server, shared_engine):
    image, mask = inputs()
    request = {"prompt": "a cup", "image": data_url(image), "mask_image": data_url(mask), "seed": 3}
    request |= {"enable_sync_mode": True, "enable_base64_output": True, **FAST}
    data = httpx.post(f"{server}/api/v3/wavespeed-ai/flux-fill-dev", json=request, timeout=60).json()["data"]
    assert data["status"] == "completed"
    (output,) = data["outputs"]
    assert output.startswith("data:image/png;base64,")
    picture = np.asarray(PIL.Image.open(io.BytesIO(__import__("base64").b64decode(output.split(",", 1)[1]))))
    np.testing.assert_array_equal(picture, solo_image(shared_engine, 3, prompt="a cup").astype(np.uint8))


def test_native_task_events_in_order_and_replayed(server, shared_engine):
    task = httpx.post(f"{server}/v1/tasks", json=body(seed=11)).json()
    assert task["status"] == "queued" and task["seed"] == 11
    live = sse_events(server, task["id"])
    assert [name for name, _ in live] == LIFECYCLE
    assert [data["seq"] for _, data in live] == list(range(1, len(LIFECYCLE) + 1))
    outputs = [data for name, data in live if name == "task_output"]
    assert [(o["step"], o["total"]) for o in outputs] == [(1, 2), (2, 2)] and outputs[-1]["eta_seconds"] == 0
    replay = sse_events(server, task["id"])  # a late subscriber gets the whole story
    assert replay == live
    resumed = []
    with httpx.stream("GET", f"{server}/v1/tasks/{task['id']}/events", headers={"Last-Event-ID": "7"}) as s:
        resumed = [line.split(": ", 1)[1] for line in s.iter_lines() if line.startswith("event: ")]
    assert resumed == LIFECYCLE[7:]
    done = httpx.get(f"{server}/v1/tasks/{task['id']}").json()
    assert done["status"] == "completed" and done["progress"] == {"step": 2, "total": 2}
    assert live[-1][1]["outputs"] == done["outputs"]
    picture = np.asarray(fetched_image(server, done["outputs"][0]), dtype=np.float32)
    np.testing.assert_array_equal(picture, solo_image(shared_engine, 11))


def test_multipart_upload_and_idempotency_key(server):
    image, mask = inputs()
    files = {
        "image": ("in.png", png_bytes(image), "image/png"),
        "mask": ("m.png", png_bytes(mask), "image/png"),
    }
    form = {
        "prompt": "123",
        "num_inference_steps": "2",
        "max_megapixels": "0.065",
        "outpaint": '{"right": 16}',
    }
    headers = {"Idempotency-Key": "order-42"}
    first = httpx.post(f"{server}/v1/tasks", data=form, files=files, headers=headers)
    assert first.status_code == 201, first.text
    task = first.json()
    assert task["request"]["prompt"] == "123" and task["request"]["outpaint"]["right"] == 16
    again = httpx.post(f"{server}/v1/tasks", data=form, files=files, headers=headers)
    assert again.status_code == 200 and again.json()["id"] == task["id"]
    done = wait_status(server, task["id"], {"completed"})
    assert fetched_image(server, done["outputs"][0]).size == (256 + 16, 256)


def test_websocket_wiro_protocol(server):
    task = httpx.post(f"{server}/v1/tasks", json=body(seed=5)).json()

    async def follow() -> list[dict]:
        async with websockets.connect(server.replace("http", "ws") + "/v1/socket") as socket:
            assert json.loads(await socket.recv())["type"] == "connected"
            await socket.send(json.dumps({"type": "task_info", "tasktoken": "no-such-task"}))
            assert json.loads(await socket.recv())["type"] == "error"
            await socket.send(json.dumps({"type": "task_info", "tasktoken": task["id"]}))
            messages = []
            while not messages or messages[-1]["type"] != "task_postprocess_end":
                messages.append(json.loads(await asyncio.wait_for(socket.recv(), 60)))
            return messages

    messages = asyncio.run(follow())
    assert [m["type"] for m in messages] == LIFECYCLE
    assert all(m["id"] == task["id"] and m["tasktoken"] == task["id"] for m in messages)
    assert messages[-1]["message"]["outputs"][0].startswith(f"/v1/files/{task['id']}/")


@pytest.fixture
def slow_server(tmp_path, shared_engine):
    """One slow step (0.3 s) per step; a queue of 2."""
    with server_in_thread(make_app(tmp_path, SlowSteps(shared_engine, 0.3), max_queue=2)) as base:
        yield base


def test_cancel_running_and_queued_tasks(slow_server):
    running = httpx.post(f"{slow_server}/v1/tasks", json=body(num_inference_steps=50)).json()
    queued = httpx.post(f"{slow_server}/v1/tasks", json=body(seed=2, num_inference_steps=50)).json()
    wait_status(slow_server, running["id"], {"running"})
    canceled = httpx.post(f"{slow_server}/v1/tasks/{queued['id']}/cancel")
    assert canceled.status_code == 200 and canceled.json()["status"] == "canceled"
    with httpx.stream("GET", f"{slow_server}/v1/tasks/{running['id']}/events", timeout=60) as stream:
        for line in stream.iter_lines():
            if line == "event: task_output":
                break
    answer = httpx.post(f"{slow_server}/v1/tasks/{running['id']}/cancel").json()
    assert answer["cancel_requested"] is True
    final = wait_status(slow_server, running["id"], {"canceled", "completed", "failed"}, timeout=10)
    assert final["status"] == "canceled" and final["error"] == "canceled"
    assert final["progress"]["step"] < 50  # it stopped at a step, not at the end
    names = [name for name, _ in sse_events(slow_server, running["id"])]
    assert (
        names[-1] == "task_cancel" and "task_postprocess_end" not in names and names.count("task_cancel") == 1
    )
    assert [name for name, _ in sse_events(slow_server, queued["id"])] == ["task_queue", "task_cancel"]
    assert httpx.post(f"{slow_server}/v1/tasks/{queued['id']}/cancel").status_code == 409
    # The worker goes on: the next task completes.
    after = httpx.post(f"{slow_server}/v1/tasks", json=body()).json()
    assert wait_status(slow_server, after["id"], {"completed", "failed"})["status"] == "completed"


def test_full_queue_answers_429_with_retry_after(slow_server):
    first = httpx.post(f"{slow_server}/v1/tasks", json=body(num_inference_steps=30)).json()
    wait_status(slow_server, first["id"], {"running"})
    accepted = [httpx.post(f"{slow_server}/v1/tasks", json=body(seed=s)) for s in (2, 3)]
    assert [a.status_code for a in accepted] == [201, 201]
    refused = httpx.post(f"{slow_server}/v1/tasks", json=body(seed=4))
    assert refused.status_code == 429 and int(refused.headers["Retry-After"]) >= 1
    assert "queue is full" in refused.json()["error"]
    wavespeed = httpx.post(f"{slow_server}/api/v3/wavespeed-ai/flux-fill-dev", json=body(seed=5))
    assert wavespeed.status_code == 429 and wavespeed.json()["code"] == 429
    health = httpx.get(f"{slow_server}/healthz").json()
    assert health["queue_depth"] == 2 and health["running"] == 1
    for task in (first, *(a.json() for a in accepted)):
        httpx.post(f"{slow_server}/v1/tasks/{task['id']}/cancel")


def test_api_keys(tmp_path, shared_engine):
    app = make_app(tmp_path, shared_engine, api_keys=("key-one", "key-two"))
    with server_in_thread(app) as base:
        assert httpx.get(f"{base}/healthz").status_code == 200  # health stays open for probes
        assert httpx.post(f"{base}/v1/tasks", json=body()).status_code == 401
        wrong = httpx.post(f"{base}/v1/tasks", json=body(), headers={"Authorization": "Bearer key-three"})
        assert wrong.status_code == 401 and wrong.headers["WWW-Authenticate"] == "Bearer"
        assert httpx.get(f"{base}/metrics").status_code == 401
        assert httpx.post(f"{base}/api/v3/wavespeed-ai/flux-fill-dev", json=body()).json()["code"] == 401
        task = httpx.post(f"{base}/v1/tasks", json=body(), headers={"Authorization": "Bearer key-two"}).json()
        events = sse_events(base, task["id"], headers={"Authorization": "Bearer key-two"})
        assert events[-1][0] == "task_postprocess_end"
        by_query = httpx.get(f"{base}/v1/tasks/{task['id']}/events?token=key-two")  # EventSource's way
        assert by_query.status_code == 200 and "task_postprocess_end" in by_query.text
        # A task is its key's: another key is answered as if it did not exist (test_serve_hostile.py).
        assert httpx.get(f"{base}/v1/tasks/{task['id']}/events?token=key-one").status_code == 404
        assert (
            httpx.get(f"{base}/v1/tasks/{task['id']}?token=key-two").status_code == 401
        )  # headers elsewhere

        async def socket_refused() -> bool:
            try:
                async with websockets.connect(base.replace("http", "ws") + "/v1/socket") as socket:
                    await socket.recv()
            except websockets.exceptions.ConnectionClosed as closed:
                return closed.rcvd is not None and closed.rcvd.code == 1008
            except websockets.exceptions.InvalidStatus:
                return True
            return False

        assert asyncio.run(socket_refused())


def test_refusals_name_the_field_and_leave_no_task(server, tmp_path):
    cases = [
        (dict(num_inference_steps=0), 422, "num_inference_steps"),
        (dict(guidance_scale="high"), 422, "guidance_scale"),
        (dict(size="big"), 422, "size"),
        (dict(output_format="gif"), 422, "output_format"),
        (dict(image="not an image at all"), 400, "image"),
        (dict(mask=data_url(PIL.Image.new("L", (128, 256)))), 422, "mask"),
        (dict(stepz=3), 422, "stepz"),
        (dict(loras=[{"path": "style.safetensors"}]), 422, "loras"),
        (dict(image="https://example.com/cat.png"), 422, "image"),  # URL inputs are off by default
        (dict(webhook="https://example.com/hook"), 422, "webhook"),
        (dict(enhance_prompt=True), 422, "enhance_prompt"),
    ]
    for fields, status, field in cases:
        answer = httpx.post(f"{server}/v1/tasks", json=body(**fields))
        assert answer.status_code == status, (fields, answer.text)
        assert answer.json()["field"] == field, (fields, answer.json())
        assert "Traceback" not in answer.text
    bad_json = httpx.post(
        f"{server}/v1/tasks", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert bad_json.status_code == 400 and "JSON" in bad_json.json()["error"]
    assert httpx.post(f"{server}/v1/tasks", json={"image": "x"}).json()["field"] == "prompt"
    assert httpx.get(f"{server}/v1/tasks/nope").status_code == 404
    assert httpx.get(f"{server}/v1/files/nope/0.png").status_code == 404
    with sqlite3.connect(tmp_path / "tasks.sqlite3") as db:
        assert db.execute("SELECT COUNT(*) FROM tasks").fetchone()[0] == 0
    assert not (tmp_path / "inputs").exists() or not any((tmp_path / "inputs").iterdir())


def test_request_size_limit_answers_413(tmp_path, shared_engine):
    with server_in_thread(make_app(tmp_path, shared_engine, max_request_bytes=4096)) as base:
        answer = httpx.post(f"{base}/v1/tasks", json=body(prompt="x" * 5000))
        assert answer.status_code == 413 and "limit" in answer.json()["error"]

        def chunks():
            for _ in range(10):
                yield b"x" * 1000

        chunked = httpx.post(
            f"{base}/v1/tasks", content=chunks(), headers={"content-type": "application/json"}
        )
        assert chunked.status_code == 413


def test_url_inputs_aimed_at_private_addresses_are_refused(tmp_path, shared_engine):
    options = ServerOptions(url_policy=UrlPolicy(allow=True))
    with server_in_thread(make_app(tmp_path, shared_engine, options=options)) as base:
        for url in (
            f"{base}/v1/files/x/0.png",  # this very server, on loopback
            "http://localhost:9/x.png",
            "http://10.0.0.7/x.png",
            "http://192.168.1.1/x.png",
            "http://169.254.169.254/latest/meta-data/",
            "http://[::1]/x.png",
            "file:///etc/passwd",
        ):
            answer = httpx.post(f"{base}/v1/tasks", json=body(image=url))
            assert answer.status_code == 422, (url, answer.text)
            assert answer.json()["field"] == "image"


def test_failing_task_does_not_stop_the_worker(tmp_path, shared_engine):
    class FailsOnPrompt(SlowSteps):
        def run(self, request, on_event=None):
            if request.prompt == "boom":
                raise RuntimeError("the GPU caught fire")
            return super().run(request, on_event)

    with server_in_thread(make_app(tmp_path, FailsOnPrompt(shared_engine, 0.0))) as base:
        bad = httpx.post(f"{base}/v1/tasks", json=body(prompt="boom")).json()
        good = httpx.post(f"{base}/v1/tasks", json=body()).json()
        failed = wait_status(base, bad["id"], {"failed", "completed"})
        assert failed["status"] == "failed" and failed["error"] == "RuntimeError: the GPU caught fire"
        assert sse_events(base, bad["id"])[-1] == (
            "task_error",
            {
                "error": "RuntimeError: the GPU caught fire",
                "seq": pytest.approx(0, abs=100),
                "time": pytest.approx(0, abs=1e10),
            },
        )
        assert wait_status(base, good["id"], {"failed", "completed"})["status"] == "completed"
        result = httpx.get(f"{base}/api/v3/predictions/{bad['id']}/result").json()["data"]
        assert result["status"] == "failed" and "fire" in result["error"]
        metrics = httpx.get(f"{base}/metrics").text
        assert 'fluxfill_tasks_total{outcome="failed"} 1.0' in metrics
        assert 'fluxfill_tasks_total{outcome="completed"} 1.0' in metrics
        assert 'fluxfill_stage_seconds_count{stage="denoise"} 1.0' in metrics


def test_playground_page_is_served(server):
    page = httpx.get(f"{server}/")
    assert page.status_code == 200 and 'data-testid="mask-canvas"' in page.text


def test_warming_until_the_engine_is_loaded(tmp_path, shared_engine):
    release = threading.Event()

    def slow_factory():
        release.wait(30)
        return shared_engine

    config = ServerConfig(service=ServiceSettings(data_dir=tmp_path))
    app = create_app(config, slow_factory)
    import uvicorn

    from tests.support.serve import free_port

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(100):
            try:
                health = httpx.get(f"{base}/healthz")
                break
            except httpx.HTTPError:
                time.sleep(0.1)
        assert health.status_code == 503 and health.json()["status"] == "warming"
        task = httpx.post(f"{base}/v1/tasks", json=body()).json()  # accepted while warming
        release.set()
        assert wait_status(base, task["id"], {"completed", "failed"})["status"] == "completed"
        assert httpx.get(f"{base}/healthz").json()["status"] == "ready"
    finally:
        release.set()
        server.should_exit = True
        thread.join(30)


def test_expired_outputs_are_deleted(tmp_path, shared_engine):
    app = make_app(tmp_path, shared_engine, retention_hours=1e-6)
    with server_in_thread(app) as base:
        task = httpx.post(f"{base}/v1/tasks", json=body()).json()
        done = wait_status(base, task["id"], {"completed"})
        file_url = done["outputs"][0]
        time.sleep(0.01)
        app.state.service.delete_expired()
        after = httpx.get(f"{base}/v1/tasks/{task['id']}").json()
        assert after["outputs"] == [] and after["outputs_expired"] is True and after["status"] == "completed"
        assert httpx.get(base + file_url).status_code == 404
        assert not (tmp_path / "files" / task["id"]).exists()


def test_an_idle_server_cleans_up_on_its_own(tmp_path, shared_engine):
    """The workers delete what retention expired every ``cleanup_every_s``, also with nothing queued."""
    app = make_app(
        tmp_path, shared_engine, retention_hours=1e-6, task_retention_days=1e-9, cleanup_every_s=0.2
    )
    with server_in_thread(app) as base:
        task = httpx.post(f"{base}/v1/tasks", json=body()).json()
        # No wait for "completed": retention this short can delete the task before a poll sees it
        # finished; only a finished task is ever deleted, so the 404 below shows both.
        deadline = time.monotonic() + 60
        while httpx.get(f"{base}/v1/tasks/{task['id']}").status_code != 404 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert httpx.get(f"{base}/v1/tasks/{task['id']}").status_code == 404
        assert not (tmp_path / "files" / task["id"]).exists()


@pytest.mark.slow
def test_old_tasks_are_forgotten(tmp_path, shared_engine):
    """Past --task-retention-days a finished task is deleted with its events and files; a queued or
    running one never is."""
    app = make_app(tmp_path, SlowSteps(shared_engine, 0.3), task_retention_days=1e-9)
    with server_in_thread(app) as base:
        old = httpx.post(f"{base}/v1/tasks", json=body()).json()
        wait_status(base, old["id"], {"completed"})
        running = httpx.post(f"{base}/v1/tasks", json=body(num_inference_steps=8)).json()
        wait_status(base, running["id"], {"running"})
        time.sleep(0.01)
        app.state.service.delete_expired()
        assert httpx.get(f"{base}/v1/tasks/{old['id']}").status_code == 404
        assert httpx.get(f"{base}/v1/tasks/{old['id']}/events").status_code == 404
        assert (
            not (tmp_path / "files" / old["id"]).exists() and not (tmp_path / "inputs" / old["id"]).exists()
        )
        assert wait_status(base, running["id"], {"completed"})["status"] == "completed"
    with sqlite3.connect(tmp_path / "tasks.sqlite3") as db:
        assert db.execute("SELECT count(*) FROM events WHERE task_id = ?", (old["id"],)).fetchone()[0] == 0


def test_prompt_enhancer_and_safety_checker(tmp_path, shared_engine):
    from fluxfill_engine.serve.enhance import PromptEnhancer
    from fluxfill_engine.serve.safety import SafetyChecker
    from tests.support.addon_models import save_tiny_checker, save_tiny_lm

    enhancer = PromptEnhancer.from_folder(save_tiny_lm(tmp_path / "lm"))
    checker = SafetyChecker.from_folder(save_tiny_checker(tmp_path / "checker", concept=-2.0))  # flags all
    config = ServerConfig(service=ServiceSettings(data_dir=tmp_path / "data"))
    app = create_app(config, lambda: shared_engine, enhancer=enhancer, safety_checker=checker)
    with server_in_thread(app) as base:
        task = httpx.post(
            f"{base}/v1/tasks", json=body(enhance_prompt=True, enable_safety_checker=True)
        ).json()
        done = wait_status(base, task["id"], {"completed", "failed"})
        assert done["status"] == "completed", done
        assert done["request"]["enhanced_prompt"] == enhancer.enhance("a white paper cup")
        assert done["has_nsfw_contents"] == [True]
        assert np.asarray(fetched_image(base, done["outputs"][0])).max() == 0  # blacked out
        plain = httpx.post(f"{base}/v1/tasks", json=body()).json()
        plain = wait_status(base, plain["id"], {"completed", "failed"})
        assert plain["has_nsfw_contents"] == [] and "enhanced_prompt" not in plain["request"]
        assert done["safety_checker"] == "on" and plain["safety_checker"] == "off"
        assert np.asarray(fetched_image(base, plain["outputs"][0])).max() > 0


def test_url_inputs_from_a_trusted_network_and_a_signed_webhook(tmp_path, shared_engine):
    """With --allow-url-inputs and --url-allow-network 127.0.0.1/32: an image URL is fetched, and the
    finished task is posted to its webhook, signed (Standard Webhooks)."""
    import http.server

    standardwebhooks = pytest.importorskip("standardwebhooks")
    image, mask = inputs()
    received: list[tuple[dict, bytes]] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            data = png_bytes(image if self.path == "/image.png" else mask)
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_POST(self):
            received.append((dict(self.headers), self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args):
            pass

    files = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=files.serve_forever, daemon=True).start()
    origin = f"http://127.0.0.1:{files.server_address[1]}"
    secret = "whsec_" + __import__("base64").b64encode(b"0123456789abcdef0123456789abcdef").decode()
    policy = UrlPolicy(allow=True, trusted_networks=("127.0.0.1/32",))
    app = make_app(
        tmp_path,
        shared_engine,
        options=ServerOptions(url_policy=policy),
        webhook_secret=secret,
        public_url="https://fill.example.com",
    )
    try:
        with server_in_thread(app) as base:
            request = body(image=f"{origin}/image.png", mask=f"{origin}/mask.png", webhook=f"{origin}/hook")
            task = httpx.post(f"{base}/v1/tasks", json=request).json()
            assert wait_status(base, task["id"], {"completed", "failed"})["status"] == "completed"
            deadline = time.monotonic() + 30
            while not received and time.monotonic() < deadline:
                time.sleep(0.05)
    finally:
        files.shutdown()
    ((headers, payload),) = received
    headers = {key.lower(): value for key, value in headers.items()}
    message = standardwebhooks.Webhook(secret).verify(payload, headers)
    assert message["type"] == "task.completed" and message["data"]["id"] == task["id"]
    assert message["data"]["outputs"] == [f"https://fill.example.com/v1/files/{task['id']}/0.png"]


@pytest.mark.slow
def test_queued_tasks_that_fit_together_run_as_one_batch(tmp_path, shared_engine):
    app = make_app(tmp_path, SlowSteps(shared_engine, 0.2), max_batch_images=4)
    with server_in_thread(app) as base:
        first = httpx.post(f"{base}/v1/tasks", json=body(seed=1, num_inference_steps=4)).json()
        wait_status(base, first["id"], {"running"})
        fitting = [
            httpx.post(f"{base}/v1/tasks", json=body(prompt=f"cup {s}", seed=s)).json() for s in (2, 3, 4)
        ]
        other = httpx.post(f"{base}/v1/tasks", json=body(seed=5, num_inference_steps=3)).json()
        for task in (first, *fitting, other):
            assert wait_status(base, task["id"], {"completed", "failed"})["status"] == "completed"
        accepted = {
            task["id"]: dict(sse_events(base, task["id"]))["task_accept"] for task in (*fitting, other)
        }
        assert [accepted[task["id"]]["batch_size"] for task in fitting] == [3, 3, 3]
        assert accepted[other["id"]]["batch_size"] == 1  # other steps: not with them
        for seed, task in zip((2, 3, 4), fitting, strict=True):
            done = httpx.get(f"{base}/v1/tasks/{task['id']}").json()
            picture = np.asarray(fetched_image(base, done["outputs"][0]), dtype=np.float32)
            difference = np.abs(picture - solo_image(shared_engine, seed, prompt=f"cup {seed}"))
            assert difference.max() <= 1, difference.max()  # the batch gives each request its solo image


def test_a_backlog_is_shared_among_idle_replicas(tmp_path, shared_engine):
    """Four tasks that fit together, queued while the engine loads, with two replicas: each worker
    takes its share (2 + 2), not one batch of 4 on one replica while the other idles."""
    loaded = threading.Event()
    engine = SlowSteps(shared_engine, 0.0)
    engine.replicas = 2

    def factory():
        assert loaded.wait(60)
        return engine

    config = ServerConfig(service=ServiceSettings(data_dir=tmp_path, max_batch_images=4))
    with server_in_thread(create_app(config, factory), ready=False) as base:
        tasks = [httpx.post(f"{base}/v1/tasks", json=body(seed=seed)).json() for seed in range(4)]
        assert httpx.get(f"{base}/healthz").json()["queue_depth"] == 4
        loaded.set()
        for task in tasks:
            assert wait_status(base, task["id"], {"completed", "failed"})["status"] == "completed"
        sizes = [dict(sse_events(base, task["id"]))["task_accept"]["batch_size"] for task in tasks]
    assert sizes == [2, 2, 2, 2]


def test_warm_up_runs_before_ready(tmp_path, shared_engine):
    config = ServerConfig(service=ServiceSettings(data_dir=tmp_path, warmup_sizes=[(256, 256), (320, 256)]))
    with server_in_thread(create_app(config, lambda: shared_engine)) as base:
        health = httpx.get(f"{base}/healthz").json()
    assert health["status"] == "ready" and set(health["warmup_seconds"]) == {"256x256", "320x256"}


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--port", "0"], "--port"),
        (["--max-queue", "0"], "--max-queue"),
        (["--replicas", "2"], "need --ray"),
        (["--lora-dir", "/no/such/folder"], "--lora-dir"),
        (["--url-allow-network", "10.0.0.0/8"], "--allow-url-inputs"),
        (["--api-key", " "], "--api-key"),
        (["--model", "/no/such/model"], "--model"),
        (["--task-retention-days", "0"], "--task-retention-days"),
        (["--admin-key", ""], "--admin-key"),
        (["--shutdown-grace-s", "-1"], "--shutdown-grace-s"),
    ],
)
def test_serve_flags_are_checked_before_anything_loads(flags, message, capsys):
    from fluxfill_engine.cli import main

    assert main(["serve", *flags]) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: ") and message in error and "Traceback" not in error


@pytest.mark.parametrize("flags", [["--warmup", "big"], ["--autoscale", "3,1"], ["--url-allow-network", "x"]])
def test_malformed_serve_flags_are_usage_errors(flags, capsys):
    from fluxfill_engine.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["serve", *flags])
    assert exit_info.value.code == 2 and flags[0] in capsys.readouterr().err
