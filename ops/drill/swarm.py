"""Simulated Creatio agents for the drill: each behaves like Creatio's communication panel.

On connect: LoadLibrary, OpenConnection (connectionParams as a JSON string with the line),
QueryActiveCallSnapshot. After a drop: wait (Creatio waits about 5 s before its first retry),
then the same again, backing off while the cluster refuses. Every event received is recorded
with its call id so the drill can compare with the simulator's ground truth.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from dataclasses import dataclass, field
from typing import Any

import websockets

from ops.drill.truth import SeenCall
from ws_node.creatio_protocol import MsgEventType


@dataclass(slots=True)
class Outage:
    dropped_at: float
    first_retry_at: float = 0.0
    ready_at: float = 0.0
    snapshot_ids: tuple[str, ...] = ()
    snapshot_at: float = 0.0
    attempts: int = 0
    #: when each retry began (the chaos agents record them: a verdict times an agent from its first retry that
    #: found the cluster serving, not from one its backoff made while it was down)
    retry_times: list[float] = field(default_factory=list)


@dataclass
class DrillAgent:
    url: str
    line: str
    reconnect_delay: float = 5.0
    seen: dict[str, SeenCall] = field(default_factory=dict)
    outages: list[Outage] = field(default_factory=list)
    connected: asyncio.Event = field(default_factory=asyncio.Event)
    frames: int = 0
    _stop: bool = False

    async def run(self) -> None:
        backoff = self.reconnect_delay
        outage: Outage | None = None
        while not self._stop:
            try:
                async with websockets.connect(self.url, open_timeout=10, max_size=2**22, ping_interval=None) as ws:
                    if outage is not None:
                        outage.attempts += 1
                    snapshot = await self._open(ws)
                    if outage is not None:
                        outage.ready_at = time.time()
                        outage.snapshot_ids = snapshot
                        outage.snapshot_at = outage.ready_at
                        self.outages.append(outage)
                        outage = None
                    backoff = self.reconnect_delay
                    self.connected.set()
                    async for frame in ws:
                        self._record(frame)
                    # the server closed the connection
            except (OSError, websockets.WebSocketException, TimeoutError):
                if outage is not None:
                    outage.attempts += 1
            if self._stop:
                break
            self.connected.clear()
            now = time.time()
            if outage is None:
                outage = Outage(dropped_at=now)
                delay = self.reconnect_delay * random.uniform(0.9, 1.1)
                outage.first_retry_at = now + delay
            else:
                delay = backoff
                backoff = min(backoff * 1.5, 30.0)
            await asyncio.sleep(delay)

    async def _open(self, ws: Any) -> tuple[str, ...]:
        await ws.send(json.dumps({"command": "LoadLibrary", "parameters": {"libraryName": "Asterisk"}}))
        await self._until(ws, MsgEventType.LIBRARY_INITIALIZED)
        params = json.dumps({"ExtensionName": self.line, "debugMode": False})
        await ws.send(json.dumps({"command": "OpenConnection", "parameters": {"connectionParams": params}}))
        await self._until(ws, MsgEventType.CONNECTION_CREATED)
        await ws.send(json.dumps({"command": "QueryActiveCallSnapshot", "parameters": {}}))
        content = await self._until(ws, MsgEventType.ACTIVE_CALL_SNAPSHOT)
        calls = (content or {}).get("ActiveCalls") or []
        ids = []
        for call in calls:
            if isinstance(call, str):
                call = json.loads(call)
            ids.append(str(call.get("id")))
            self._note(call, MsgEventType.ACTIVE_CALL_SNAPSHOT)
        return tuple(ids)

    async def _until(self, ws: Any, event_type: int) -> Any:
        while True:
            async with asyncio.timeout(15):
                frame = await ws.recv()
            envelope, content = self._record(frame)
            if envelope.get("eventType") == event_type:
                return content

    def _record(self, frame: str | bytes) -> tuple[dict[str, Any], Any]:
        self.frames += 1
        envelope = json.loads(frame)
        content = envelope.get("content")
        if isinstance(content, str):
            try:
                content = json.loads(content)
            except ValueError:
                pass
        event_type = int(envelope.get("eventType", 0))
        if event_type in (5, 6, 7, 8, 9, 13, 17) and isinstance(content, dict):
            self._note(content, event_type)
        return envelope, content

    def _note(self, call: dict[str, Any], event_type: int) -> None:
        call_id = str(call.get("id", ""))
        if not call_id:
            return
        seen = self.seen.setdefault(call_id, SeenCall())
        seen.event_types.append(event_type)
        seen.arrived.append(time.time())
        caller = call.get("callerId")
        if caller and not seen.caller:
            seen.caller = str(caller)

    def stop(self) -> None:
        self._stop = True
