"""A test agent that talks to the cluster the way Creatio's browser client does.

Frames are built as ``Terrasoft.MsgCommandInfo`` serialises them: ``command`` + ``parameters``,
with ``connectionParams`` and ``commandExecutor`` as JSON strings inside the JSON, and an
empty ``commandUId``. The sequence after every (re)connect is the client's: LoadLibrary,
then OpenConnection on LIBRARY_INITIALIZED, then QueryActiveCallSnapshot. Like the real client
(a singleton provider), the agent keeps ``libraryInstanceUId`` and ``connectionUId`` across
reconnects and sends them in every command, LoadLibrary included.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
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
PUT_HOLD_ACTION = 8
END_HOLD_ACTION = 9
ACTIVE_CALL_SNAPSHOT = 10
LINE_STATE_CHANGED = 11
AGENT_STATE_CHANGED = 12
ABONENT_BUSY = 13
DISCONNECTED = 14
CALL_SAVED_IN_DB = 15
CALL_INFO_CHANGED = 17
DTMF_ENTERED = 18

CALL_EXECUTOR_TYPE = "Terrasoft.Messaging.Common.Call, Terrasoft.Messaging.Common"


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
    def __init__(
        self,
        url: str,
        line: str,
        *,
        origin: str | None = None,
        user_uid: str | None = None,
        connection_params: dict[str, Any] | None = None,
    ) -> None:
        self.url = url
        self.line = line
        self.origin = origin
        #: Terrasoft.SysValue.CURRENT_USER.value: a GUID
        self.user_uid = user_uid if user_uid is not None else str(uuid.uuid4())
        #: sessionServiceParams.UserContactUId: the contact call records are saved for
        self.contact_uid = str(uuid.uuid4())
        self.connection_params: dict[str, Any] = {"ExtensionName": line, "OriginateContext": "", "debugMode": False}
        self.connection_params.update(connection_params or {})
        self.ws: Any = None
        self.events: list[Received] = []
        self.connection_uid = ""
        self.library_instance_uid = ""
        self._new = asyncio.Condition()
        self._reader: asyncio.Task[None] | None = None
        #: index in ``events`` of the first event after the last CONNECTION_CREATED
        self.opened_at = 0

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
            "commandUId": "",
            "command": command,
            "libraryInstanceUId": self.library_instance_uid,
            "connectionUId": self.connection_uid,
            "commandExecutorId": "",
            "commandExecutorType": "",
        }
        if executor is not None:
            body["commandExecutorId"] = executor.get("id", "")
            body["commandExecutorType"] = CALL_EXECUTOR_TYPE
            body["commandExecutor"] = json.dumps(executor)
        if parameters is not None:
            body["parameters"] = parameters
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
        """LoadLibrary -> OpenConnection -> QueryActiveCallSnapshot; returns the snapshot.

        As the client does, the snapshot is asked for as soon as CONNECTION_CREATED arrives.
        """
        mark = len(self.events)
        await self.send("LoadLibrary", {"AssemblyName": "Terrasoft.Messaging.Asterisk"})
        library = await self.wait_for(LIBRARY_INITIALIZED, timeout=timeout, after=mark)
        self.library_instance_uid = str(library.envelope["content"])
        await self.send(
            "OpenConnection",
            {
                "connectionParams": json.dumps(self.connection_params),
                "sessionServiceParams": json.dumps(
                    {"UserUId": self.user_uid, "UserContactUId": self.contact_uid, "ServiceUrl": "http://creatio"}
                ),
            },
        )
        created = await self.wait_for(CONNECTION_CREATED, timeout=timeout, after=mark)
        self.connection_uid = str(created.envelope.get("connectionUId") or "")
        self.opened_at = len(self.events)
        await self.send("QueryActiveCallSnapshot")
        return await self.wait_for(ACTIVE_CALL_SNAPSHOT, timeout=timeout, after=self.opened_at)

    async def reconnect(self, timeout: float = 10.0) -> Received:
        """What the client's reconnect timer does: a new socket to the same URL, then ``open``."""
        await self.close()
        await self.connect(timeout)
        return await self.open(timeout)

    async def call_command(self, command: str, call: dict[str, Any], parameters: dict[str, Any] | None = None) -> None:
        """A call command as ``postCallCommand`` sends it: the call serialised as the executor."""
        await self.send(command, parameters, executor=call)

    def of_type(self, event_type: int, after: int = 0) -> list[Received]:
        return [e for e in self.events[after:] if e.event_type == event_type]

    async def close(self) -> None:
        if self.ws is not None:
            await self.ws.close()
        if self._reader is not None:
            await asyncio.gather(self._reader, return_exceptions=True)


def calls_in_snapshot(snapshot: Received) -> list[dict[str, Any]]:
    content = snapshot.content or {}
    calls = content.get("ActiveCalls") or []
    return [decode_content(c) for c in calls]
