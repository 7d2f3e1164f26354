"""``TaskStore`` on a SQLite file of its own, without a server: rows and events, idempotency keys, exactly
one closing state, retention, and what a reopened file (a restart) still holds."""

from __future__ import annotations

import dataclasses
import sqlite3
import threading

import pytest

from fluxfill_engine.serve.store import (
    COMPLETED,
    FAILED,
    QUEUED,
    RUNNING,
    DuplicateKey,
    Task,
    TaskStore,
)


@pytest.fixture
def store(tmp_path):
    store = TaskStore(tmp_path / "db" / "tasks.sqlite3")
    yield store
    store.close()


def _task(task_id: str, created_at: float = 1.0, key: str | None = None) -> Task:
    return Task(
        id=task_id,
        status=QUEUED,
        api="native",
        created_at=created_at,
        request={"prompt": "a cup", "loras": None},
        idempotency_key=key,
    )


def test_a_task_and_its_first_event_round_trip(store):
    store.create(_task("a"), ("task_queue", {"position": 1}))
    task = store.get("a")
    assert task == _task("a")
    assert task.outputs == [] and task.timings == {} and task.files_deleted is False and not task.finished
    (event,) = store.events("a")
    assert (event.task_id, event.seq, event.name, event.data) == ("a", 1, "task_queue", {"position": 1})
    assert store.get("nope") is None and store.events("nope") == []


def test_updates_set_fields_and_append_numbered_events(store):
    store.create(_task("a"), ("task_queue", {}))
    assert store.update("a", ("task_accept", {"batch_size": 2}), status=RUNNING, started_at=5.0) == 2
    assert store.update("a", timings={"total": 1.5}, outputs=["0.png"]) is None  # fields only, no event
    assert store.update("a", ("task_output", {"step": 1})) == 3
    task = store.get("a")
    assert (task.status, task.started_at, task.timings, task.outputs) == (
        RUNNING,
        5.0,
        {"total": 1.5},
        ["0.png"],
    )
    assert [event.name for event in store.events("a")] == ["task_queue", "task_accept", "task_output"]
    assert [event.seq for event in store.events("a", after=1)] == [2, 3]
    assert store.count(RUNNING) == 1 and store.count(QUEUED) == 0


def test_an_idempotency_key_names_one_task(store):
    store.create(_task("a", key="order-42"), ("task_queue", {}))
    with pytest.raises(DuplicateKey) as duplicate:
        store.create(_task("b", key="order-42"), ("task_queue", {}))
    assert duplicate.value.task.id == "a"
    assert store.get("b") is None and store.events("b") == []  # the refused insert left nothing
    assert store.by_key("order-42").id == "a" and store.by_key("other") is None


def test_idempotency_keys_are_scoped_per_owner(store):
    alice = dataclasses.replace(_task("a", key="order-42"), owner="alice-hash")
    bob = dataclasses.replace(_task("b", key="order-42"), owner="bob-hash")
    store.create(alice, ("task_queue", {}))
    store.create(bob, ("task_queue", {}))  # the same key, another owner: a task of its own
    assert store.by_key("order-42", "alice-hash").id == "a" and store.by_key("order-42", "bob-hash").id == "b"
    assert store.by_key("order-42") is None  # the owner "" (no keys) has none
    assert store.get("a").owner == "alice-hash"
    with pytest.raises(DuplicateKey) as duplicate:
        store.create(dataclasses.replace(_task("c", key="order-42"), owner="bob-hash"), ("task_queue", {}))
    assert duplicate.value.task.id == "b"


# The tasks table as stores before owners made it (idempotency keys unique over all tasks).
_TABLE_BEFORE_OWNERS = """
CREATE TABLE tasks (
    id TEXT PRIMARY KEY, status TEXT NOT NULL, api TEXT NOT NULL, created_at REAL NOT NULL,
    started_at REAL, finished_at REAL, idempotency_key TEXT UNIQUE, request TEXT NOT NULL, seed INTEGER,
    outputs TEXT NOT NULL DEFAULT '[]', nsfw TEXT NOT NULL DEFAULT '[]', timings TEXT NOT NULL DEFAULT '{}',
    error TEXT, progress_step INTEGER NOT NULL DEFAULT 0, progress_total INTEGER NOT NULL DEFAULT 0,
    files_deleted INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX tasks_status ON tasks (status, created_at);
CREATE TABLE events (task_id TEXT NOT NULL, seq INTEGER NOT NULL, name TEXT NOT NULL, data TEXT NOT NULL,
    time REAL NOT NULL, PRIMARY KEY (task_id, seq));
"""


def test_a_data_folder_from_before_owners_is_migrated(tmp_path):
    path = tmp_path / "tasks.sqlite3"
    with sqlite3.connect(path) as db:
        db.executescript(_TABLE_BEFORE_OWNERS)
        db.execute(
            "INSERT INTO tasks (id, status, api, created_at, idempotency_key, request, seed) "
            "VALUES ('old', 'completed', 'native', 1.0, 'k', '{\"prompt\": \"a cup\"}', 9)"
        )
        db.execute("INSERT INTO events VALUES ('old', 1, 'task_queue', '{}', 1.0)")
    db.close()
    for opening in range(2):  # the second open finds the table migrated already
        store = TaskStore(path)
        try:
            old = store.get("old")
            assert (old.owner, old.status, old.seed, old.request) == ("", COMPLETED, 9, {"prompt": "a cup"})
            assert store.by_key("k").id == "old" and [event.seq for event in store.events("old")] == [1]
            with pytest.raises(DuplicateKey):  # the owner "" still holds its key
                store.create(_task("again", key="k"), ("task_queue", {}))
            mine = dataclasses.replace(_task(f"new-{opening}", key="k"), owner=f"owner-{opening}")
            store.create(mine, ("task_queue", {}))  # the old key is no longer global
            assert store.by_key("k", mine.owner).id == mine.id
        finally:
            store.close()


def test_a_task_finishes_once_whatever_races(store):
    """Many threads closing one task (a cancel racing the end): exactly one closing event and state."""
    store.create(_task("a"), ("task_queue", {}))
    outcomes: list[bool] = []
    start = threading.Barrier(8)

    def close(index: int) -> None:
        start.wait()
        status = COMPLETED if index % 2 else FAILED
        outcomes.append(
            store.finish_if_unfinished("a", (f"closing_{index}", {}), status=status, finished_at=9.0)
        )

    threads = [threading.Thread(target=close, args=(index,)) for index in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(outcomes) == [False] * 7 + [True]
    names = [event.name for event in store.events("a")]
    assert len(names) == 2 and names[1].startswith("closing_")
    assert store.get("a").status == (COMPLETED if int(names[1][-1]) % 2 else FAILED)
    assert not store.finish_if_unfinished("nope", ("task_error", {}), status=FAILED)


def test_by_status_oldest_first(store):
    for task_id, created_at in (("late", 3.0), ("early", 1.0), ("middle", 2.0)):
        store.create(_task(task_id, created_at), ("task_queue", {}))
    store.update("middle", status=RUNNING)
    store.update("late", status=COMPLETED)
    assert [task.id for task in store.by_status(QUEUED, RUNNING)] == ["early", "middle"]
    assert [task.id for task in store.by_status(COMPLETED)] == ["late"]


def test_retention_forgets_finished_tasks_and_lists_expired_files(store):
    store.create(_task("old"), ("task_queue", {}))
    store.create(_task("recent"), ("task_queue", {}))
    store.create(_task("running"), ("task_queue", {}))
    store.finish_if_unfinished("old", ("task_postprocess_end", {}), status=COMPLETED, finished_at=10.0)
    store.finish_if_unfinished("recent", ("task_postprocess_end", {}), status=COMPLETED, finished_at=20.0)
    store.update("running", status=RUNNING)
    assert [task.id for task in store.expired(15.0)] == ["old"]
    store.update("old", files_deleted=1)
    assert store.expired(15.0) == [] and store.get("old").files_deleted is True
    assert store.forget(15.0) == ["old"]
    assert store.get("old") is None and store.events("old") == []
    assert {task.id for task in store.by_status(COMPLETED, RUNNING)} == {"recent", "running"}
    assert store.forget(1e12) == ["recent"]  # an unfinished task is never forgotten
    assert store.get("running") is not None


def test_a_reopened_file_holds_everything(tmp_path):
    path = tmp_path / "tasks.sqlite3"
    first = TaskStore(path)
    first.create(_task("a", key="k"), ("task_queue", {"position": 1}))
    first.update("a", ("task_accept", {}), status=RUNNING, seed=7)
    first.close()
    again = TaskStore(path)
    try:
        task = again.get("a")
        assert (task.status, task.seed, task.idempotency_key) == (RUNNING, 7, "k")
        assert [event.name for event in again.events("a")] == ["task_queue", "task_accept"]
        assert again.update("a", ("task_output", {})) == 3  # numbering goes on
    finally:
        again.close()
