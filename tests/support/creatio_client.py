"""A test agent that talks to the cluster the way Creatio's browser client does.

Frames are built as ``Terrasoft.MsgCommandInfo`` serialises them: ``command`` + ``parameters``,
with ``connectionParams`` and ``commandExecutor`` as JSON strings inside the JSON, and an
empty ``commandUId``. The sequence after every (re)connect is the client's: LoadLibrary,
then OpenConnection on LIBRARY_INITIALIZED, then QueryActiveCallSnapshot.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import websockets

LIBRARY_INITIALIZED = 1
CONNECTION_CREATED = 2
ERROR = 3
RING_STARTED = 5
RING_FINISHED = 6
COMMUTATION_STARTED = 7
ACTIVE_CALL_SNAPSHOT = 10


@dataclass
class Received:
    event_type: int
    content: Any
    envelope: dict[str, Any]
    at: float


def decode_content(raw: Any) -> Any:
    if isinstance(raw, str):
        try:
            return json.loads(raw)
        except ValueError:
            return raw
    return raw


class CreatioAgent:
    def __init__(self, url: str, line: str, *, origin: str | None = None) -> None:
        self.url = url
        self.line = line
        self.origin = origin
        self.ws: Any = None
        self.events: list[Received] = []
        self.connection_uid = ""
        self._new = asyncio.Condition()
        self._reader: asyncio.Task[None] | None = None

    async def connect(self, timeout: float = 10.0) -> None:
        headers = {"Origin": self.origin} if self.origin else None
        self.ws = await websockets.connect(self.url, additional_headers=headers, open_timeout=timeout,
                                           max_size=2**22)
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        try:
            async for frame in self.ws:
                envelope = json.loads(frame)
                item = Received(int(envelope["eventType"]), decode_content(envelope.get("content")), envelope,
                                time.monotonic())
                async with self._new:
                    self.events.append(item)
                    self._new.notify_all()
        except websockets.ConnectionClosed:
            pass
        finally:
            async with self._new:
                self._new.notify_all()

    @property
    def closed(self) -> bool:
        return self.ws is None or self._reader is None or self._reader.done()

    async def send(self, command: str, parameters: dict[str, Any] | None = None,
                   executor: dict[str, Any] | None = None) -> None:
        body: dict[str, Any] = {
            "command": command,
            "parameters": parameters or {},
            "commandUId": "",
            "connectionUId": self.connection_uid,
        }
        if executor is not None:
            body["commandExecutor"] = json.dumps(executor)
        await self.ws.send(json.dumps(body))

    async def wait_for(self, event_type: int, predicate: Callable[[Received], bool] = lambda r: True,
                       timeout: float = 10.0, after: int = 0) -> Received:
        deadline = time.monotonic() + timeout
        async with self._new:
            while True:
                for item in self.events[after:]:
                    if item.event_type == event_type and predicate(item):
                        return item
                remaining = deadline - time.monotonic()
                if remaining <= 0 or (self._reader is not None and self._reader.done()):
                    seen = [(e.event_type, e.content) for e in self.events[-10:]]
                    raise AssertionError(f"line {self.line}: no event {event_type} within {timeout}s; last: {seen}")
                try:
                    await asyncio.wait_for(self._new.wait(), remaining)
                except TimeoutError:
                    pass

    async def open(self, timeout: float = 10.0) -> Received:
        """LoadLibrary -> OpenConnection -> QueryActiveCallSnapshot; returns the snapshot."""
        mark = len(self.events)
        await self.send("LoadLibrary", {"libraryName": "Asterisk"})
        await self.wait_for(LIBRARY_INITIALIZED, timeout=timeout, after=mark)
        await self.send(
            "OpenConnection",
            {"connectionParams": json.dumps({"ExtensionName": self.line, "OriginateContext": "", "debugMode": False})},
        )
        created = await self.wait_for(CONNECTION_CREATED, timeout=timeout, after=mark)
        self.connection_uid = str(created.envelope.get("connectionUId") or "")
        mark = len(self.events)
        await self.send("QueryActiveCallSnapshot", {})
        return await self.wait_for(ACTIVE_CALL_SNAPSHOT, timeout=timeout, after=mark)

    async def close(self) -> None:
        if self.ws is not None:
            await self.ws.close()
        if self._reader is not None:
            await asyncio.gather(self._reader, return_exceptions=True)


def calls_in_snapshot(snapshot: Received) -> list[dict[str, Any]]:
    content = snapshot.content or {}
    calls = content.get("ActiveCalls") or []
    return [decode_content(c) for c in calls]
