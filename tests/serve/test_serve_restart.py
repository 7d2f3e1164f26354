"""A restart, graceful or ``kill -9``, of a real ``fluxfill serve`` process loses no task; SIGTERM with
clients connected (an event stream, a sync-mode WaveSpeed request) exits within the grace and leaves every
task final or queued."""

from __future__ import annotations

import signal
import sqlite3
import threading
import time

import httpx
import pytest

from fluxfill_engine.serve.service import SHUT_DOWN
from tests.support.serve import body, free_port, server_process, sse_events, wait_status

pytestmark = pytest.mark.slow

# Long enough at the tiny model's full working resolution to still run when the process is killed.
LONG = {"num_inference_steps": 100, "max_megapixels": 1.0}


def _start_long_task(base: str) -> dict:
    long = httpx.post(f"{base}/v1/tasks", json=body(seed=2, **LONG)).json()
    with httpx.stream("GET", f"{base}/v1/tasks/{long['id']}/events", timeout=120) as stream:
        for line in stream.iter_lines():
            if line == "event: task_output":
                break
    return long


def test_restart_after_kill_9_keeps_every_task(tmp_path):
    with server_process(tmp_path, "--warmup", "256x256") as (base, process):
        assert list(httpx.get(f"{base}/healthz").json()["warmup_seconds"]) == ["256x256"]
        done = httpx.post(f"{base}/v1/tasks", json=body(seed=1)).json()
        done = wait_status(base, done["id"], {"completed"})
        long = _start_long_task(base)
        keyed = httpx.post(f"{base}/v1/tasks", json=body(seed=3), headers={"Idempotency-Key": "k-1"}).json()
        plain = httpx.post(f"{base}/v1/tasks", json=body(seed=4)).json()
        assert httpx.get(f"{base}/v1/tasks/{long['id']}").json()["status"] == "running"
        assert httpx.get(f"{base}/v1/tasks/{keyed['id']}").json()["status"] == "queued"
        process.send_signal(signal.SIGKILL)
        process.wait(60)
    with server_process(tmp_path, port=free_port()) as (base, _):
        again = httpx.get(f"{base}/v1/tasks/{done['id']}").json()
        assert again["status"] == "completed" and again["outputs"] == done["outputs"]
        assert httpx.get(base + again["outputs"][0]).status_code == 200
        for task in (long, plain):
            lost = httpx.get(f"{base}/v1/tasks/{task['id']}").json()
            assert lost["status"] == "failed" and lost["error"] == "interrupted by restart", lost
            names = [name for name, _ in sse_events(base, task["id"])]
            assert names[-1] == "task_error" and names.count("task_error") == 1
        rerun = wait_status(base, keyed["id"], {"completed", "failed"})
        assert rerun["status"] == "completed" and rerun["seed"] == 3
        events = sse_events(base, keyed["id"])
        assert [name for name, data in events if name == "task_queue"] == ["task_queue", "task_queue"]
        assert events[1][1]["requeued"] == "restart" and events[-1][0] == "task_postprocess_end"
        same = httpx.post(f"{base}/v1/tasks", json=body(seed=3), headers={"Idempotency-Key": "k-1"})
        assert same.status_code == 200 and same.json()["id"] == keyed["id"]
        assert not (tmp_path / "inputs" / keyed["id"]).exists()  # inputs go once the task is done


def test_sigterm_with_clients_connected_exits_within_the_grace(tmp_path):
    grace = 3.0
    with server_process(tmp_path, "--shutdown-grace-s", str(grace)) as (base, process):
        long = _start_long_task(base)
        keyed = httpx.post(f"{base}/v1/tasks", json=body(seed=3), headers={"Idempotency-Key": "k-1"}).json()
        answers: dict[str, object] = {}

        def stream() -> None:
            answers["events"] = sse_events(base, long["id"])

        def sync_request() -> None:
            request = body(seed=5, enable_sync_mode=True)
            answers["sync"] = httpx.post(
                f"{base}/api/v3/wavespeed-ai/flux-fill-dev", json=request, timeout=120
            )

        clients = [threading.Thread(target=stream), threading.Thread(target=sync_request)]
        for client in clients:
            client.start()
        time.sleep(1.0)  # both connected, waiting
        signaled = time.monotonic()
        process.send_signal(signal.SIGTERM)
        process.wait(grace + 30)
        took = time.monotonic() - signaled
        for client in clients:
            client.join(10)
        assert took < grace + 10, f"exited {took:.1f} s after SIGTERM (grace {grace} s)"
        with pytest.raises(httpx.TransportError):  # no longer accepting
            httpx.get(f"{base}/healthz", timeout=2)
    events = answers["events"]
    assert isinstance(events, list) and events[-1] == ("task_cancel", events[-1][1])
    assert events[-1][1]["error"] == SHUT_DOWN
    sync = answers["sync"]
    assert isinstance(sync, httpx.Response) and sync.status_code == 200
    assert sync.json()["data"]["status"] == "created"  # answered as it was: queued, never run
    with sqlite3.connect(tmp_path / "tasks.sqlite3") as db:
        statuses = dict(db.execute("SELECT id, status FROM tasks"))
    assert "running" not in statuses.values() and statuses[long["id"]] == "canceled", statuses
    assert statuses[keyed["id"]] == "queued"
    with server_process(tmp_path, port=free_port()) as (base, _):
        canceled = httpx.get(f"{base}/v1/tasks/{long['id']}").json()
        assert (canceled["status"], canceled["error"]) == ("canceled", SHUT_DOWN)
        assert [name for name, _ in sse_events(base, long["id"])].count("task_cancel") == 1
        assert wait_status(base, keyed["id"], {"completed", "failed"})["status"] == "completed"
