"""Task lifecycle event names (Wiro's) and the hub that wakes subscribers when a task has news.

Events themselves live in the :class:`~.store.TaskStore` (so a late subscriber, or one after a
restart, gets them replayed); the hub only tells waiting coroutines on the server's event loop
that there is something new to read, from whichever thread wrote it.
"""

from __future__ import annotations

import asyncio
import threading
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager

TASK_QUEUE = "task_queue"
TASK_ACCEPT = "task_accept"
TASK_PREPROCESS_START = "task_preprocess_start"
TASK_PREPROCESS_END = "task_preprocess_end"
TASK_START = "task_start"
TASK_OUTPUT = "task_output"
TASK_END = "task_end"
TASK_POSTPROCESS_START = "task_postprocess_start"
TASK_POSTPROCESS_END = "task_postprocess_end"
TASK_ERROR = "task_error"
TASK_CANCEL = "task_cancel"
CLOSING_EVENTS = frozenset({TASK_POSTPROCESS_END, TASK_ERROR, TASK_CANCEL})


class EventHub:
    """Wakes coroutines waiting on a task (:meth:`wait`) when :meth:`notify` is called for it."""

    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._waiters: dict[str, set[asyncio.Event]] = defaultdict(set)
        self._lock = threading.Lock()

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        """Bind to the server's event loop (at startup)."""
        self._loop = loop

    def notify(self, task_id: str) -> None:
        """Called from any thread after a task's events or state changed."""
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        with self._lock:
            waiters = list(self._waiters.get(task_id, ()))
        for waiter in waiters:
            loop.call_soon_threadsafe(waiter.set)

    @contextmanager
    def subscription(self, task_id: str) -> Iterator[asyncio.Event]:
        """An ``asyncio.Event`` set on every :meth:`notify` for ``task_id`` while the block runs.

        Clear it *before* reading the store, then wait on it: news that lands in between sets it
        again, so nothing is missed.
        """
        news = asyncio.Event()
        with self._lock:
            self._waiters[task_id].add(news)
        try:
            yield news
        finally:
            with self._lock:
                waiters = self._waiters.get(task_id)
                if waiters is not None:
                    waiters.discard(news)
                    if not waiters:
                        del self._waiters[task_id]
