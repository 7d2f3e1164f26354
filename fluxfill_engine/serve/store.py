"""Tasks and their events in one SQLite file (WAL), so a restart of the server loses nothing.

SQLite is the embedded default: nothing to install or run beside the server, transactions that
survive ``kill -9`` (WAL with ``synchronous=NORMAL`` loses at most the last commits on power loss,
never on a process crash), and one writer at a time, which is what one worker per GPU needs.

Every task belongs to an ``owner``: a hash of the API key that made it (never the key itself; ``""``
when the server had no keys, or for tasks stored before tenancy). Idempotency keys are unique per
owner. A data folder from before owners is migrated when it is opened.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

QUEUED, RUNNING, COMPLETED, FAILED, CANCELED = "queued", "running", "completed", "failed", "canceled"
FINISHED = frozenset({COMPLETED, FAILED, CANCELED})
INTERRUPTED = "interrupted by restart"

_TASKS_TABLE = """
CREATE TABLE IF NOT EXISTS tasks (
    id TEXT PRIMARY KEY,
    status TEXT NOT NULL,
    api TEXT NOT NULL,
    created_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL,
    owner TEXT NOT NULL DEFAULT '',
    idempotency_key TEXT,
    request TEXT NOT NULL,
    seed INTEGER,
    outputs TEXT NOT NULL DEFAULT '[]',
    nsfw TEXT NOT NULL DEFAULT '[]',
    timings TEXT NOT NULL DEFAULT '{}',
    error TEXT,
    progress_step INTEGER NOT NULL DEFAULT 0,
    progress_total INTEGER NOT NULL DEFAULT 0,
    files_deleted INTEGER NOT NULL DEFAULT 0,
    UNIQUE (owner, idempotency_key)
);
"""
_SCHEMA = """
CREATE INDEX IF NOT EXISTS tasks_status ON tasks (status, created_at);
CREATE TABLE IF NOT EXISTS events (
    task_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    name TEXT NOT NULL,
    data TEXT NOT NULL,
    time REAL NOT NULL,
    PRIMARY KEY (task_id, seq)
);
"""
_JSON_COLUMNS = ("request", "outputs", "nsfw", "timings")


@dataclass
class Task:
    """One row of ``tasks``; ``request`` holds the request's fields as the client sent them (images
    by their stored file names)."""

    id: str
    status: str
    api: str
    created_at: float
    request: dict[str, Any]
    started_at: float | None = None
    finished_at: float | None = None
    idempotency_key: str | None = None
    seed: int | None = None
    outputs: list[str] = field(default_factory=list)
    nsfw: list[bool] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    error: str | None = None
    progress_step: int = 0
    progress_total: int = 0
    files_deleted: bool = False
    owner: str = ""  # a hash of the API key that made it (``""``: no keys, or made before owners)

    @property
    def finished(self) -> bool:
        return self.status in FINISHED


@dataclass(frozen=True)
class StoredEvent:
    task_id: str
    seq: int
    name: str
    data: dict[str, Any]
    time: float


class DuplicateKey(Exception):
    """A task with this idempotency key exists already (``task`` is it)."""

    def __init__(self, task: Task) -> None:
        super().__init__(task.id)
        self.task = task


class TaskStore:
    """Thread-safe access to the task database at ``path`` (created if missing)."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        self._lock = threading.Lock()
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._add_owners()
            self._db.executescript(_TASKS_TABLE + _SCHEMA)

    def _add_owners(self) -> None:
        """Migrate a ``tasks`` table from before owners: every old task gets the owner ``""`` and
        idempotency keys become unique per owner (SQLite cannot drop a UNIQUE constraint in place, so
        the table is copied)."""
        columns = [row["name"] for row in self._db.execute("PRAGMA table_info(tasks)")]
        if not columns or "owner" in columns:
            return
        listed = ", ".join(columns)
        self._db.execute("BEGIN IMMEDIATE")
        try:
            self._db.execute("ALTER TABLE tasks RENAME TO tasks_before_owners")
            self._db.execute("DROP INDEX IF EXISTS tasks_status")
            self._db.execute(_TASKS_TABLE)
            self._db.execute(f"INSERT INTO tasks ({listed}) SELECT {listed} FROM tasks_before_owners")
            self._db.execute("DROP TABLE tasks_before_owners")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    @staticmethod
    def _task(row: sqlite3.Row) -> Task:
        values = dict(row)
        for column in _JSON_COLUMNS:
            values[column] = json.loads(values[column])
        values["files_deleted"] = bool(values["files_deleted"])
        return Task(**values)

    def create(self, task: Task, first_event: tuple[str, dict[str, Any]]) -> Task:
        """Insert ``task`` with its first event, atomically. Raises :class:`DuplicateKey` when its
        owner has a task with its idempotency key."""
        with self._transaction() as db:
            if task.idempotency_key is not None:
                row = db.execute(
                    "SELECT * FROM tasks WHERE owner = ? AND idempotency_key = ?",
                    (task.owner, task.idempotency_key),
                ).fetchone()
                if row is not None:
                    raise DuplicateKey(self._task(row))
            db.execute(
                "INSERT INTO tasks (id, status, api, created_at, owner, idempotency_key, request) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    task.id,
                    task.status,
                    task.api,
                    task.created_at,
                    task.owner,
                    task.idempotency_key,
                    json.dumps(task.request),
                ),
            )
            self._insert_event(db, task.id, *first_event)
        return task

    def get(self, task_id: str) -> Task | None:
        with self._lock:
            row = self._db.execute("SELECT * FROM tasks WHERE id = ?", (task_id,)).fetchone()
        return None if row is None else self._task(row)

    def by_key(self, key: str, owner: str = "") -> Task | None:
        """The task ``owner`` created with idempotency key ``key``, if any."""
        with self._lock:
            row = self._db.execute(
                "SELECT * FROM tasks WHERE owner = ? AND idempotency_key = ?", (owner, key)
            ).fetchone()
        return None if row is None else self._task(row)

    def by_status(self, *statuses: str) -> list[Task]:
        """Tasks in any of ``statuses``, oldest first."""
        marks = ",".join("?" * len(statuses))
        with self._lock:
            rows = self._db.execute(
                f"SELECT * FROM tasks WHERE status IN ({marks}) ORDER BY created_at", statuses
            ).fetchall()
        return [self._task(row) for row in rows]

    def count(self, status: str) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM tasks WHERE status = ?", (status,)).fetchone()[0]

    def update(
        self, task_id: str, event: tuple[str, dict[str, Any]] | None = None, **fields: Any
    ) -> int | None:
        """Set ``fields`` of a task and append ``event`` to it in one transaction; returns the event's
        sequence number."""
        for column in _JSON_COLUMNS:
            if column in fields:
                fields[column] = json.dumps(fields[column])
        with self._transaction() as db:
            if fields:
                assignments = ", ".join(f"{name} = ?" for name in fields)
                db.execute(f"UPDATE tasks SET {assignments} WHERE id = ?", (*fields.values(), task_id))
            return None if event is None else self._insert_event(db, task_id, *event)

    def finish_if_unfinished(self, task_id: str, event: tuple[str, dict[str, Any]], **fields: Any) -> bool:
        """Move a task to a finished state unless it is finished already (cancel racing completion):
        exactly one closing event per task."""
        with self._transaction() as db:
            status = db.execute("SELECT status FROM tasks WHERE id = ?", (task_id,)).fetchone()
            if status is None or status[0] in FINISHED:
                return False
            for column in _JSON_COLUMNS:
                if column in fields:
                    fields[column] = json.dumps(fields[column])
            assignments = ", ".join(f"{name} = ?" for name in fields)
            db.execute(f"UPDATE tasks SET {assignments} WHERE id = ?", (*fields.values(), task_id))
            self._insert_event(db, task_id, *event)
            return True

    @staticmethod
    def _insert_event(db: sqlite3.Connection, task_id: str, name: str, data: dict[str, Any]) -> int:
        seq = db.execute(
            "SELECT COALESCE(MAX(seq), 0) + 1 FROM events WHERE task_id = ?", (task_id,)
        ).fetchone()[0]
        db.execute(
            "INSERT INTO events (task_id, seq, name, data, time) VALUES (?, ?, ?, ?, ?)",
            (task_id, seq, name, json.dumps(data), time.time()),
        )
        return seq

    def events(self, task_id: str, after: int = 0) -> list[StoredEvent]:
        with self._lock:
            rows = self._db.execute(
                "SELECT * FROM events WHERE task_id = ? AND seq > ? ORDER BY seq", (task_id, after)
            ).fetchall()
        return [
            StoredEvent(row["task_id"], row["seq"], row["name"], json.loads(row["data"]), row["time"])
            for row in rows
        ]

    def forget(self, finished_before: float) -> list[str]:
        """Delete the tasks finished before ``finished_before``, with their events, in one
        transaction; returns their ids."""
        with self._transaction() as db:
            ids = [
                row["id"]
                for row in db.execute(
                    "SELECT id FROM tasks WHERE finished_at IS NOT NULL AND finished_at < ?",
                    (finished_before,),
                )
            ]
            db.executemany("DELETE FROM events WHERE task_id = ?", [(i,) for i in ids])
            db.executemany("DELETE FROM tasks WHERE id = ?", [(i,) for i in ids])
        return ids

    def expired(self, finished_before: float) -> list[Task]:
        """Finished tasks whose files are still on disk and older than ``finished_before``."""
        with self._lock:
            rows = self._db.execute(
                "SELECT * FROM tasks WHERE files_deleted = 0 AND finished_at IS NOT NULL AND finished_at < ?",
                (finished_before,),
            ).fetchall()
        return [self._task(row) for row in rows]
