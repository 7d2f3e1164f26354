"""Scale-out with Ray Serve: a local Ray cluster on CPU, 2 replicas of the tiny model behind one
``fluxfill serve`` ingress (a real server on loopback).

The replicas share the tasks with images equal to one engine's; a batch runs as one pass on one replica;
cancel reaches the replica; requests with a LoRA set go to the replica holding it; ``--autoscale 1,2``
starts a second replica under a sustained backlog; the ``fluxfill serve --ray`` command and the
``serve run`` application behind Ray's proxy."""

from __future__ import annotations

import time

import httpx
import numpy as np
import pytest

from tests.support.serve import (
    body,
    fetched_image,
    make_app,
    server_in_thread,
    solo_image,
    sse_events,
    wait_ready,
    wait_status,
)

ray = pytest.importorskip("ray", reason="the ray extra is not installed")
# One worker for the whole module: its tests start, share and shut down one local Ray cluster.
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("ray")]


@pytest.fixture(scope="module")
def ray_engine():
    from fluxfill_engine.serve.ray_backend import EngineSpec, deploy, shutdown, start_ray

    start_ray(num_cpus=2, include_dashboard=False)
    try:
        yield deploy(EngineSpec(), replicas=2)
    finally:
        shutdown()


def test_two_replicas_share_the_tasks(tmp_path, ray_engine, shared_engine):
    local = shared_engine
    with server_in_thread(make_app(tmp_path, ray_engine)) as base:
        health = httpx.get(f"{base}/healthz").json()
        assert health["replicas"] == 2 and "ray" in health["device"]
        tasks = [httpx.post(f"{base}/v1/tasks", json=body(seed=seed)).json() for seed in range(8)]
        replicas = set()
        for task in tasks:
            done = wait_status(base, task["id"], {"completed", "failed"}, timeout=300)
            assert done["status"] == "completed", done
            events = sse_events(base, task["id"])
            names = [name for name, _ in events]
            assert names.count("task_postprocess_end") == 1 and "task_error" not in names
            assert [name for name in names if name == "task_output"] == ["task_output"] * 2  # relayed steps
            replicas.add(dict(events)["task_end"]["replica"])
            picture = np.asarray(fetched_image(base, done["outputs"][0]), dtype=np.float32)
            # The same image as one local engine, up to rounding: a replica computes with another
            # thread count, so a few uint8 values land one step apart.
            difference = np.abs(picture - solo_image(local, task["seed"]))
            assert difference.max() <= 1 and difference.mean() < 0.01
        assert len(replicas) == 2, replicas  # both replicas worked


def test_a_batch_runs_as_one_pass_on_one_replica(ray_engine, shared_engine):
    """RayEngine.run_batch: the requests go to one replica as one pass (its engine's run_batch), each
    with its solo image; the batch key is the local engine's."""
    from fluxfill_engine import FillRequest
    from tests.support.serve import FAST, inputs

    local = shared_engine
    image, mask = inputs()
    requests = [
        FillRequest(prompt=f"cup {seed}", image=image, mask=mask, seed=seed, **FAST) for seed in (3, 4, 5)
    ]
    keys = {ray_engine.batch_key(request.validated()) for request in requests}
    assert keys == {local.batch_key(requests[0].validated())} and None not in keys
    events = []
    results = ray_engine.run_batch(requests, on_event=events.append)
    assert len({result.stats["replica"] for result in results}) == 1
    assert [(r.stats["batch_size"], r.stats["batch_requests"]) for r in results] == [(3, 3)] * 3
    assert [e.type for e in events].count("step") == FAST["num_inference_steps"]  # one pass
    for seed, result in zip((3, 4, 5), results, strict=True):
        picture = np.asarray(result.images[0], dtype=np.float32)
        assert np.abs(picture - solo_image(local, seed, prompt=f"cup {seed}")).max() <= 1
    bad = FillRequest(prompt="x", image=image, mask=mask, num_inference_steps=0)
    with pytest.raises(ValueError, match=r"requests\[1\]: .*num_inference_steps"):
        ray_engine.run_batch([requests[0], bad])


def test_cancel_reaches_the_replica(tmp_path, ray_engine):
    with server_in_thread(make_app(tmp_path, ray_engine)) as base:
        task = httpx.post(f"{base}/v1/tasks", json=body(num_inference_steps=100, max_megapixels=1.0)).json()
        with httpx.stream("GET", f"{base}/v1/tasks/{task['id']}/events", timeout=120) as stream:
            for line in stream.iter_lines():
                if line == "event: task_output":
                    break
        httpx.post(f"{base}/v1/tasks/{task['id']}/cancel")
        final = wait_status(base, task["id"], {"canceled", "completed", "failed"}, timeout=60)
        assert final["status"] == "canceled" and final["progress"]["step"] < 100
        after = httpx.post(f"{base}/v1/tasks", json=body()).json()
        assert wait_status(base, after["id"], {"completed", "failed"}, timeout=120)["status"] == "completed"


def test_requests_with_a_lora_set_go_to_the_replica_that_holds_it(tmp_path, ray_engine):
    from fluxfill_engine.serve.inputs import ServerOptions
    from tests.support import lora as lora_helpers

    loras = tmp_path / "loras"
    lora_helpers.peft_lora(loras / "a", 0)
    lora_helpers.peft_lora(loras / "b", 1, rank=2)
    app = make_app(tmp_path / "data", ray_engine, options=ServerOptions(lora_dir=loras))
    with server_in_thread(app) as base:
        for name in ("a", "b"):
            ran_on = set()
            for seed in range(4):
                task = httpx.post(f"{base}/v1/tasks", json=body(seed=seed, loras=[{"path": name}])).json()
                done = wait_status(base, task["id"], {"completed", "failed"}, timeout=300)
                assert done["status"] == "completed", done
                ran_on.add(dict(sse_events(base, task["id"]))["task_end"]["replica"])
            assert len(ran_on) == 1, ran_on  # every request of the set went where the set is loaded


def test_autoscaling_adds_a_replica_under_load(tmp_path, ray_engine):
    """``--autoscale 1,2``: one replica while idle; a sustained backlog makes Ray Serve start the
    second (after its upscale delay, 30 s by default), and tasks then run on both. Replaces the
    module's deployment: it runs after the tests that use it."""
    from ray import serve

    from fluxfill_engine.serve.ray_backend import DEPLOYMENT, EngineSpec, deploy

    serve.delete("fluxfill")  # a fresh deployment: autoscaled from its minimum
    engine = deploy(EngineSpec(), replicas=1, autoscale=(1, 2))
    assert engine.replicas == 2  # the ingress runs a worker for each replica it may get

    def running() -> int:
        deployment = serve.status().applications["fluxfill"].deployments[DEPLOYMENT]
        return deployment.replica_states.get("RUNNING", 0)

    assert running() == 1
    with server_in_thread(make_app(tmp_path, engine, max_batch_images=1)) as base:
        tasks, ran_on, deadline = [], set(), time.monotonic() + 240
        while len(ran_on) < 2 and time.monotonic() < deadline:
            while sum(t["status"] in ("queued", "running") for t in tasks) < 4:  # keep a backlog
                tasks.append(httpx.post(f"{base}/v1/tasks", json=body(num_inference_steps=40)).json())
            time.sleep(0.5)
            tasks = [httpx.get(f"{base}/v1/tasks/{t['id']}").json() for t in tasks]
            ran_on |= {
                dict(sse_events(base, t["id"]))["task_end"]["replica"]
                for t in tasks
                if t["status"] == "completed"
            }
        assert running() == 2 and len(ran_on) == 2, (running(), ran_on)
        for task in tasks:
            final = wait_status(base, task["id"], {"completed", "failed", "canceled"}, timeout=300)
            assert final["status"] == "completed", final


def test_fluxfill_serve_ray_command(tmp_path):
    """`fluxfill serve --ray --replicas 2` as a user starts it: its own local Ray cluster."""
    from tests.support.serve import server_process

    ray.shutdown()  # the command starts its own cluster in its own process
    with server_process(tmp_path, "--ray", "--replicas", "2") as (base, _):
        assert httpx.get(f"{base}/healthz").json()["replicas"] == 2
        task = httpx.post(f"{base}/v1/tasks", json=body()).json()
        assert wait_status(base, task["id"], {"completed", "failed"}, timeout=300)["status"] == "completed"


def test_serve_run_application(tmp_path):
    """The application a user deploys with `serve run ...ray_backend:build` on an existing cluster:
    Ray's own HTTP proxy in front of the ingress deployment, 2 engine replicas."""
    from ray import serve

    from fluxfill_engine.serve.ray_backend import build, start_ray
    from tests.support.serve import free_port

    ray.shutdown()
    start_ray(num_cpus=2, include_dashboard=False)
    port = free_port()
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build({"replicas": "2", "data_dir": str(tmp_path)}), name="fluxfill", route_prefix="/")
        base = f"http://127.0.0.1:{port}"
        health = wait_ready(base, 240)
        assert health["replicas"] == 2
        task = httpx.post(f"{base}/v1/tasks", json=body()).json()
        assert wait_status(base, task["id"], {"completed", "failed"}, timeout=300)["status"] == "completed"
        names = [name for name, _ in sse_events(base, task["id"])]
        assert names[0] == "task_queue" and names[-1] == "task_postprocess_end"
        assert (tmp_path / "tasks.sqlite3").exists()  # the ingress keeps the store
    finally:
        serve.shutdown()
        ray.shutdown()


def test_a_local_start_that_timed_out_is_tried_once_more(monkeypatch):
    """Ray's fixed 30-s wait for a new raylet can run out on a busy machine: one more local start;
    an address to join, or any other error, is not retried."""
    from fluxfill_engine.serve.ray_backend import start_ray

    calls = []

    def init(address=None, **kwargs):
        calls.append(address)
        if len(calls) == 1 or address:
            raise Exception("The current node timed out during startup. This could happen ...")

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", init)
    monkeypatch.setattr(ray, "shutdown", lambda: None)
    start_ray()
    assert calls == [None, None]
    calls.clear()
    with pytest.raises(Exception, match="timed out during startup"):
        start_ray("ray://head:10001")
    assert calls == ["ray://head:10001"]

    def broken(address=None, **kwargs):
        calls.append(address)
        raise ValueError("bad num_cpus")

    calls.clear()
    monkeypatch.setattr(ray, "init", broken)
    with pytest.raises(ValueError, match="bad num_cpus"):
        start_ray()
    assert calls == [None]


def test_shutdown_without_a_cluster_starts_none(monkeypatch):
    """Ray Serve's own shutdown connects (starting a local cluster) just to stop; ours does nothing."""
    from ray import serve

    from fluxfill_engine.serve.ray_backend import shutdown

    calls = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda *args, **kwargs: calls.append("init"))
    monkeypatch.setattr(serve, "shutdown", lambda: calls.append("serve.shutdown"))
    shutdown()
    assert calls == []
