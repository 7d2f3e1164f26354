"""The WebSocket API, Wiro's protocol: the server says ``{"type": "connected"}``; the client sends
``{"type": "task_info", "tasktoken": ID}`` for every task it follows; the server sends each event of
those tasks (replayed, then live) as ``{"type": name, "id", "tasktoken", "seq", "time", "message",
"result"}``.

Bad messages are answered ``{"type": "error", "message": ...}`` and the socket stays open; a task is
followed once however often it is asked for; a socket may send :data:`MAX_SUBSCRIPTIONS` messages, then it
is told so and closed (1008). Another key's task is "no such task". The server's stop closes sockets (1012).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Any

from fastapi import APIRouter, Depends, WebSocket, WebSocketDisconnect, status
from starlette.concurrency import run_in_threadpool

from .. import events as ev
from ..service import TaskService
from .deps import CurrentOwner, Owner, Service, find_owned_task, is_task_id, require_socket_key
from .following import follow

router = APIRouter(tags=["socket"])
_ASK = 'send {"type": "task_info", "tasktoken": TASK_ID}'
MAX_SUBSCRIPTIONS = 1000  # messages one socket may send (task_info requests, repeats included)
MAX_MESSAGE_BYTES = 4096  # a task_info message is ~80 bytes; anything longer is refused unread
_LIMIT = f"subscription limit: one socket may send at most {MAX_SUBSCRIPTIONS} messages (task_info requests)"
_STOPPING = "the server is shutting down"


@router.websocket("/v1/socket", dependencies=[Depends(require_socket_key)])
async def socket(websocket: WebSocket, service: Service, owner: CurrentOwner) -> None:
    await websocket.accept()
    await websocket.send_json({"type": "connected", "version": "1.0"})
    session = _Session(websocket, service, owner)
    reader = asyncio.ensure_future(session.read())
    stopping = asyncio.ensure_future(service.hub.wait_closed())
    try:
        await asyncio.wait({reader, stopping}, return_when=asyncio.FIRST_COMPLETED)
        if stopping.done():
            await session.close(status.WS_1012_SERVICE_RESTART, _STOPPING)
    finally:
        for task in (reader, stopping, *session.followers.values()):
            task.cancel()
        await asyncio.wait({reader})


class _Session:
    """One socket's subscriptions: a follower per task, sends one at a time."""

    def __init__(self, websocket: WebSocket, service: TaskService, owner: Owner) -> None:
        self.websocket = websocket
        self.service = service
        self.owner = owner
        self.followers: dict[str, asyncio.Future[None]] = {}
        self.asked = 0
        self._sending = asyncio.Lock()  # one message at a time from the followers and the reader

    async def send(self, message: dict[str, Any]) -> None:
        async with self._sending:
            await self.websocket.send_json(message)

    async def close(self, code: int, reason: str) -> None:
        async with self._sending:
            with contextlib.suppress(RuntimeError, WebSocketDisconnect):
                await self.websocket.close(code, reason)

    async def read(self) -> None:
        """Answer the client's messages until it leaves or passes the subscription limit."""
        while True:
            try:
                text = await self.websocket.receive_text()
            except WebSocketDisconnect:
                return
            except KeyError:  # a binary frame
                await self.send({"type": "error", "message": "messages must be JSON text"})
                continue
            self.asked += 1
            if self.asked > MAX_SUBSCRIPTIONS:
                await self.send({"type": "error", "message": _LIMIT})
                await self.close(status.WS_1008_POLICY_VIOLATION, "subscription limit")
                return
            message = _parsed(text)
            if not isinstance(message, dict) or message.get("type") != "task_info":
                await self.send({"type": "error", "message": _ASK})
                continue
            await self._subscribe(message.get("tasktoken"))

    async def _subscribe(self, token: object) -> None:
        if not is_task_id(token):  # also keeps odd text (a lone surrogate) out of the store and replies
            await self.send({"type": "error", "message": f"no such task; {_ASK}"})
            return
        assert isinstance(token, str)
        if token in self.followers:  # followed already: its events are not sent twice
            return
        task = await run_in_threadpool(find_owned_task, self.service, token, self.owner)
        if task is None:
            await self.send({"type": "error", "tasktoken": token, "message": "no such task"})
            return
        self.followers[token] = asyncio.ensure_future(_relay(self.service, token, self.send))


def _parsed(text: str) -> Any:
    """A client's message as JSON, or None when it is not (too long, malformed, nested too deeply)."""
    if len(text) > MAX_MESSAGE_BYTES:
        return None
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        return None


async def _relay(service: TaskService, task_id: str, send: Any) -> None:
    async for event in follow(service, task_id):
        if event is None:
            continue
        await send(
            {
                "type": event.name,
                "id": task_id,
                "tasktoken": task_id,
                "seq": event.seq,
                "time": event.time,
                "message": event.data,
                "result": event.name != ev.TASK_ERROR,
            }
        )
