"""Task lifecycle event names (Wiro's) and the hub that wakes subscribers when a task has news.

Events themselves live in the :class:`~.store.TaskStore` (so a late subscriber, or one after a
restart, gets them replayed); the hub only tells waiting coroutines on the server's event loop
that there is something new to read, from whichever thread wrote it, and, once the server stops
(:meth:`EventHub.close`), that there will be nothing more.
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
    """Wakes coroutines waiting on a task (:meth:`subscription`) when :meth:`notify` is called for it,
    and all of them when the hub is closed (the server stops: followers end)."""

    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._waiters: dict[str, set[asyncio.Event]] = defaultdict(set)
        self._lock = threading.Lock()
        self._closed = False
        self._closing: asyncio.Event | None = None

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        """Bind to the server's event loop (at startup; call it on that loop)."""
        self._loop = loop
        self._closing = asyncio.Event()

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called: followers stop after what the store holds now."""
        return self._closed

    def close(self) -> None:
        """The server stops: wake every waiter for good (from any thread)."""
        self._closed = True
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        with self._lock:
            waiters = [waiter for task_waiters in self._waiters.values() for waiter in task_waiters]
        for waiter in waiters:
            loop.call_soon_threadsafe(waiter.set)
        if self._closing is not None:
            loop.call_soon_threadsafe(self._closing.set)

    async def wait_closed(self) -> None:
        """Return once :meth:`close` was called (on the attached loop)."""
        if self._closing is None:
            raise RuntimeError("EventHub.wait_closed before attach")
        await self._closing.wait()

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
        if self._closed:
            news.set()
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
