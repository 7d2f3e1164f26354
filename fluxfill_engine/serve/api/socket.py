"""The WebSocket API, Wiro's protocol: the server says ``{"type": "connected"}``; the client sends
``{"type": "task_info", "tasktoken": ID}`` for every task it follows; the server sends each event of
those tasks (replayed, then live) as ``{"type": name, "id", "tasktoken", "seq", "time", "message",
"result"}``."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from fastapi import APIRouter, Depends, WebSocket, WebSocketDisconnect

from .. import events as ev
from ..service import TaskService
from .deps import Service, require_socket_key
from .following import follow

router = APIRouter(tags=["socket"])
_ASK = 'send {"type": "task_info", "tasktoken": TASK_ID}'


@router.websocket("/v1/socket", dependencies=[Depends(require_socket_key)])
async def socket(websocket: WebSocket, service: Service) -> None:
    await websocket.accept()
    await websocket.send_json({"type": "connected", "version": "1.0"})
    sending = asyncio.Lock()  # one message at a time from the followers and the reader below
    followers: list[asyncio.Task] = []

    async def send(message: dict[str, Any]) -> None:
        async with sending:
            await websocket.send_json(message)

    try:
        while True:
            try:
                message = await websocket.receive_json()
            except (json.JSONDecodeError, UnicodeDecodeError, KeyError):
                await send({"type": "error", "message": "messages must be JSON objects"})
                continue
            token = message.get("tasktoken") if isinstance(message, dict) else None
            if (
                not isinstance(message, dict)
                or message.get("type") != "task_info"
                or not isinstance(token, str)
            ):
                await send({"type": "error", "message": _ASK})
            elif service.store.get(token) is None:
                await send({"type": "error", "tasktoken": token, "message": "no such task"})
            else:
                followers.append(asyncio.create_task(_relay(service, token, send)))
    except WebSocketDisconnect:
        pass
    finally:
        for follower in followers:
            follower.cancel()


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
