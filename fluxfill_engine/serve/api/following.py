"""Waiting on a task from the event loop: its events as they come (the SSE stream, the WebSocket), or its
end (WaveSpeed's sync mode). The store holds the events; the service's ``EventHub`` only
says when there is news, so a late follower gets the same sequence replayed. When the server stops (the
hub is closed) followers end after what the store holds then, so no connection outlives the server."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from starlette.concurrency import run_in_threadpool

from .. import events as ev
from ..service import TaskService
from ..store import StoredEvent, Task

PING_SECONDS = 15.0  # how long a follower waits for news before it is handed a keep-alive


async def follow(service: TaskService, task_id: str, after: int = 0) -> AsyncIterator[StoredEvent | None]:
    """A task's events after sequence number ``after``, then live ones until its closing event or the
    server's stop; ``None`` when nothing happened for :data:`PING_SECONDS` (time for a keep-alive)."""
    with service.hub.subscription(task_id) as news:
        while True:
            news.clear()
            # SQLite waits on the worker's writes: off the event loop, so other streams go on.
            for event in await run_in_threadpool(service.store.events, task_id, after):
                after = event.seq
                yield event
                if event.name in ev.CLOSING_EVENTS:
                    return
            if service.hub.closed:
                return
            try:
                await asyncio.wait_for(news.wait(), PING_SECONDS)
            except asyncio.TimeoutError:
                yield None


async def wait_finished(service: TaskService, task_id: str, timeout: float) -> Task:
    """The task once it has finished, or as it is after ``timeout`` seconds or when the server stops."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    with service.hub.subscription(task_id) as news:
        while True:
            news.clear()
            task = await run_in_threadpool(service.get, task_id)
            if task.finished or loop.time() > deadline or service.hub.closed:
                return task
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(news.wait(), max(0.01, deadline - loop.time()))
