"""``TaskService`` driven directly, without HTTP: a store on a tmp SQLite file and an instant fake engine
whose loading waits for the test, so tasks can be queued first. The same behaviour through a real server
on the tiny engine is tests/serve/test_serve.py."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fluxfill_engine.serve.inputs import ServerOptions, TaskSpec, parse_task
from fluxfill_engine.serve.service import AlreadyFinished, NotFound, QueueFull, ServiceSettings, TaskService
from fluxfill_engine.serve.store import INTERRUPTED, TaskStore
from tests.support.serve import LIFECYCLE, InstantEngine, body


def spec(prompt: str = "a white paper cup", **fields: Any) -> TaskSpec:
    return parse_task(body(prompt=prompt, **fields), ServerOptions())


@contextlib.contextmanager
def running(data_dir: Path, engine: Any, **settings: Any) -> Iterator[tuple[TaskService, threading.Event]]:
    """A started service whose engine loads once the yielded event is set (tasks submitted before then
    wait in the queue together)."""
    loaded = threading.Event()

    def factory() -> Any:
        assert loaded.wait(30)
        return engine

    store = TaskStore(data_dir / "tasks.sqlite3")
    service = TaskService(store, ServiceSettings(data_dir=data_dir, **settings), factory)
    service.start()
    try:
        yield service, loaded
    finally:
        loaded.set()
        service.stop()
        store.close()


def finished(service: TaskService, task_id: str, timeout: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout
    while not service.get(task_id).finished:
        assert time.monotonic() < deadline, service.get(task_id)
        time.sleep(0.01)
    return service.get(task_id)


def event_names(service: TaskService, task_id: str) -> list[str]:
    return [event.name for event in service.store.events(task_id)]


def test_a_task_runs_to_its_closing_event(tmp_path):
    with running(tmp_path, InstantEngine()) as (service, loaded):
        task, created = service.submit(spec(seed=11, num_images=2), "native")
        assert created and task.status == "queued" and task.seed == 11
        assert sorted(path.name for path in (tmp_path / "inputs" / task.id).iterdir()) == [
            "image.png",
            "mask.png",
        ]
        assert service.queue_depth() == 1 and service.state == "warming"
        loaded.set()
        done = finished(service, task.id)
        assert service.state == "ready"
        names = event_names(service, task.id)
    assert done.status == "completed" and done.outputs == ["0.png", "1.png"] and done.seed == 11
    assert done.progress_step == 2 and done.timings == {"denoise": 0.01, "total": 0.02}
    assert names == LIFECYCLE
    assert all((tmp_path / "files" / task.id / name).is_file() for name in done.outputs)
    assert not (tmp_path / "inputs" / task.id).exists()  # inputs are kept only until the task ends
    metrics = service.metrics.render().decode()
    assert 'fluxfill_tasks_total{outcome="completed"} 1.0' in metrics


def test_an_idempotency_key_names_one_task(tmp_path):
    with running(tmp_path, InstantEngine()) as (service, _):
        first, created = service.submit(spec(), "native", idempotency_key="order-42")
        again, created_again = service.submit(spec(prompt="another"), "native", idempotency_key="order-42")
        assert created and not created_again and again.id == first.id and service.queue_depth() == 1


def test_a_full_queue_refuses_with_a_retry_time_and_keeps_nothing(tmp_path):
    with running(tmp_path, InstantEngine(), max_queue=2) as (service, _):
        kept = [service.submit(spec(seed=seed), "native")[0].id for seed in (1, 2)]
        with pytest.raises(QueueFull) as full:
            service.submit(spec(seed=3), "native")
        assert full.value.retry_after >= 1 and "queue is full" in str(full.value)
        assert sorted(path.name for path in (tmp_path / "inputs").iterdir()) == sorted(kept)
        assert service.store.count("queued") == 2


def test_cancel_of_a_queued_a_finished_and_an_unknown_task(tmp_path):
    engine = InstantEngine()
    with running(tmp_path, engine) as (service, loaded):
        task, _ = service.submit(spec(), "native")
        canceled = service.cancel(task.id)
        assert canceled.status == "canceled" and canceled.error == "canceled"
        assert event_names(service, task.id) == ["task_queue", "task_cancel"]
        with pytest.raises(AlreadyFinished) as again:
            service.cancel(task.id)
        assert again.value.status == "canceled" and again.value.task_id == task.id
        with pytest.raises(NotFound):
            service.cancel("nope")
        with pytest.raises(NotFound):
            service.get("nope")
        loaded.set()
        after, _ = service.submit(spec(prompt="after"), "native")
        assert finished(service, after.id).status == "completed"
    assert engine.passes == [["after"]]  # the canceled task never ran


def test_tasks_that_fit_run_as_one_pass_and_a_failing_pass_is_retried_task_by_task(tmp_path):
    engine = InstantEngine()
    with running(tmp_path, engine, max_batch_images=4) as (service, loaded):
        tasks = [service.submit(spec(prompt=prompt), "native")[0] for prompt in ("a", "boom", "c")]
        other, _ = service.submit(spec(prompt="d", num_inference_steps=3), "native")
        loaded.set()
        results = {task.id: finished(service, task.id) for task in (*tasks, other)}
        events = {task.id: service.store.events(task.id) for task in tasks}
    assert engine.passes == [["a", "boom", "c"], ["a"], ["boom"], ["c"], ["d"]]
    assert [results[task.id].status for task in tasks] == ["completed", "failed", "completed"]
    assert results[tasks[1].id].error == "RuntimeError: the GPU caught fire"
    assert results[other.id].status == "completed"  # the worker goes on after a failure
    accepted = [events[task.id][1] for task in tasks]
    assert [(event.name, event.data["batch_size"]) for event in accepted] == [("task_accept", 3)] * 3
    retried = [event for event in events[tasks[0].id] if event.data.get("retry_alone")]
    assert [event.name for event in retried] == ["task_preprocess_start"]
    assert events[tasks[1].id][-1].name == "task_error"


def test_a_restart_queues_keyed_tasks_again_and_fails_the_others(tmp_path):
    store = TaskStore(tmp_path / "tasks.sqlite3")
    before = TaskService(store, ServiceSettings(data_dir=tmp_path), InstantEngine)  # never started
    keyed, _ = before.submit(spec(prompt="keyed"), "native", idempotency_key="k")
    plain, _ = before.submit(spec(prompt="plain"), "native")
    store.close()
    engine = InstantEngine()
    with running(tmp_path, engine) as (service, loaded):
        lost = service.get(plain.id)
        assert lost.status == "failed" and lost.error == INTERRUPTED
        assert event_names(service, plain.id) == ["task_queue", "task_error"]
        assert not (tmp_path / "inputs" / plain.id).exists()
        requeued = service.store.events(keyed.id)[-1]
        assert (requeued.name, requeued.data) == ("task_queue", {"position": 1, "requeued": "restart"})
        loaded.set()
        assert finished(service, keyed.id).status == "completed"
    assert engine.passes == [["keyed"]]


def test_retention_deletes_outputs_then_tasks(tmp_path):
    with running(tmp_path, InstantEngine(), retention_hours=1e-9) as (service, loaded):
        loaded.set()
        task, _ = service.submit(spec(), "native")
        finished(service, task.id)
        time.sleep(0.01)
        service.delete_expired()
        expired = service.get(task.id)
        assert expired.files_deleted and expired.outputs == ["0.png"]
        assert not (tmp_path / "files" / task.id).exists()
        service.settings.task_retention_days = 1e-12
        service.delete_expired()
        with pytest.raises(NotFound):
            service.get(task.id)
        assert service.store.events(task.id) == []
