"""Simulated Creatio agents for the chaos run, on both transports Creatio uses.

* ``ws``: Creatio 7.x's raw WebSocket, one JSON command or event per text frame;
* ``signalr``: Creatio 8.x's ASP.NET Core SignalR (JSON hub protocol): ``POST /negotiate``, a
  WebSocket at ``?id=<token>``, the handshake record, ``SendRawMessage`` invocations out and
  ``ServerMessage`` invocations in, records ending with 0x1E, pings both ways.

Each agent behaves like Creatio's panel (as ops/drill's agents do): LoadLibrary, OpenConnection,
QueryActiveCallSnapshot after every (re)connect, a first retry about 5 s after a drop, then
backing off. Unlike the drill's, it keeps the time of every event, every snapshot it was given
(the chaos run asks for one every second after a fault, to time when the agent is consistent
again) and every command it managed to send, so verdicts can be computed afterwards from the
simulator's ground truth (ops/chaos/verdict.py).
"""

from __future__ import annotations

import asyncio
import collections
import json
import random
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from typing import Any, Literal

import websockets

from ops.drill.swarm import Outage, decode_frame
from services.tasks import background
from ws_node.creatio_protocol import MsgEventType

Transport = Literal["ws", "signalr"]

#: events that carry one call as their content
CALL_EVENTS = frozenset({5, 6, 7, 8, 9, 13, 17, 18})
RS = "\x1e"
SIGNALR_PING_SECONDS = 10.0
UNANSWERED_SNAPSHOT_SECONDS = 5.0


@dataclass(frozen=True, slots=True)
class Snapshot:
    #: when it was asked for and when the answer was read: the state it shows was true in between
    asked: float
    at: float
    call_ids: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class SentCommand:
    number: str
    at: float


@dataclass
class ChaosAgent:
    url: str
    line: str
    transport: Transport = "ws"
    reconnect_delay: float = 5.0
    #: call id -> [(event type, arrival time)], snapshots excluded
    events: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    callers: dict[str, str] = field(default_factory=dict)
    snapshots: list[Snapshot] = field(default_factory=list)
    outages: list[Outage] = field(default_factory=list)
    commands: list[SentCommand] = field(default_factory=list)
    connected: asyncio.Event = field(default_factory=asyncio.Event)
    _ws: Any = None
    _stop: bool = False
    _invocation: int = 0
    _asked: collections.deque[float] = field(default_factory=collections.deque)

    # ---- connection life ---------------------------------------------------------------------

    async def run(self) -> None:
        backoff = self.reconnect_delay
        outage: Outage | None = None
        while not self._stop:
            if outage is not None:
                outage.retry_times.append(time.time())
            try:
                async with await self._connect() as ws:
                    if outage is not None:
                        outage.attempts += 1
                    self._ws = ws
                    self._asked.clear()
                    snapshot = await self._open()
                    self.connected.set()
                    if outage is not None:
                        outage.ready_at = snapshot.at
                        outage.snapshot_ids = snapshot.call_ids
                        outage.snapshot_at = snapshot.at
                        outage = None
                    backoff = self.reconnect_delay
                    pinger = asyncio.create_task(self._ping()) if self.transport == "signalr" else None
                    try:
                        async for message in ws:
                            now = time.time()
                            for text in self._texts(message):
                                self._record(text, now)
                    finally:
                        if pinger is not None:
                            pinger.cancel()
            except (OSError, websockets.WebSocketException, TimeoutError, ValueError):
                if outage is not None:
                    outage.attempts += 1
            self._ws = None
            if self._stop:
                break
            self.connected.clear()
            now = time.time()
            if outage is None:
                # Recorded at once: an agent that never gets back must count too (its task is
                # cancelled at the end of the run, mid-retry).
                outage = Outage(dropped_at=now)
                self.outages.append(outage)
                delay = self.reconnect_delay * random.uniform(0.9, 1.1)
                outage.first_retry_at = now + delay
            else:
                delay = backoff
                backoff = min(backoff * 1.5, 30.0)
            await asyncio.sleep(delay)

    async def _connect(self) -> Any:
        if self.transport == "ws":
            return websockets.connect(self.url, open_timeout=10, max_size=2**22, ping_interval=None)
        token = await asyncio.to_thread(self._negotiate)
        parts = urllib.parse.urlsplit(self.url)
        query = urllib.parse.urlencode([*urllib.parse.parse_qsl(parts.query), ("id", token)])
        ws_url = urllib.parse.urlunsplit(("ws", parts.netloc, parts.path or "/", query, ""))
        return websockets.connect(ws_url, open_timeout=10, max_size=2**22, ping_interval=None)

    def _negotiate(self) -> str:
        parts = urllib.parse.urlsplit(self.url)
        path = (parts.path.rstrip("/") or "") + "/negotiate"
        query = urllib.parse.urlencode([*urllib.parse.parse_qsl(parts.query), ("negotiateVersion", "1")])
        url = urllib.parse.urlunsplit(("http", parts.netloc, path, query, ""))
        request = urllib.request.Request(url, data=b"", method="POST")
        try:
            with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310 - loopback cluster
                body = json.loads(response.read())
        except urllib.error.URLError as exc:
            raise OSError(f"negotiate failed: {exc}") from exc
        return str(body["connectionToken"])

    async def _open(self) -> Snapshot:
        if self.transport == "signalr":
            await self._ws.send(json.dumps({"protocol": "json", "version": 1}) + RS)
            async with asyncio.timeout(15):
                answer = await self._ws.recv()
            if not str(answer).startswith("{}"):
                raise ValueError(f"SignalR handshake refused: {answer!r}")
        await self._send({"command": "LoadLibrary", "parameters": {"libraryName": "Asterisk"}})
        await self._until(MsgEventType.LIBRARY_INITIALIZED)
        params = json.dumps({"ExtensionName": self.line, "debugMode": False})
        await self._send({"command": "OpenConnection", "parameters": {"connectionParams": params}})
        await self._until(MsgEventType.CONNECTION_CREATED)
        await self._send({"command": "QueryActiveCallSnapshot", "parameters": {}})
        await self._until(MsgEventType.ACTIVE_CALL_SNAPSHOT)
        return self.snapshots[-1]

    async def _until(self, event_type: int) -> None:
        while True:
            async with asyncio.timeout(15):
                message = await self._ws.recv()
            now = time.time()
            found = False
            for text in self._texts(message):
                if self._record(text, now) == event_type:
                    found = True
            if found:
                return

    async def _ping(self) -> None:
        while True:
            await asyncio.sleep(SIGNALR_PING_SECONDS)
            ws = self._ws
            if ws is not None:
                await ws.send('{"type":6}' + RS)

    # ---- frames --------------------------------------------------------------------------------

    async def _send(self, command: dict[str, Any]) -> None:
        body = {"commandUId": "", "connectionUId": "", **command}
        text = json.dumps(body)
        if self.transport == "signalr":
            self._invocation += 1
            text = json.dumps({"type": 1, "invocationId": str(self._invocation), "target": "SendRawMessage",
                               "arguments": [text]}) + RS
        if command["command"] == "QueryActiveCallSnapshot":
            self._asked.append(time.time())  # answers come in order on one connection
        await self._ws.send(text)

    def _texts(self, message: str | bytes) -> list[str]:
        text = message.decode() if isinstance(message, bytes) else message
        if self.transport == "ws":
            return [text]
        events = []
        for record in text.split(RS):
            if not record:
                continue
            item = json.loads(record)
            if item.get("type") == 1 and item.get("target") == "ServerMessage" and item.get("arguments"):
                events.append(str(item["arguments"][0]))
        return events

    def _record(self, text: str, now: float) -> int:
        _, event_type, content = decode_frame(text)
        if event_type == MsgEventType.ACTIVE_CALL_SNAPSHOT:
            ids = []
            for call in (content or {}).get("ActiveCalls") or []:
                if isinstance(call, str):
                    call = json.loads(call)
                call_id = str(call.get("id", ""))
                if call_id:
                    ids.append(call_id)
                    self._note_caller(call_id, call)
            asked = self._asked.popleft() if self._asked else now
            self.snapshots.append(Snapshot(asked, now, tuple(ids)))
        elif event_type in CALL_EVENTS and isinstance(content, dict):
            call_id = str(content.get("id", ""))
            if call_id:
                self.events.setdefault(call_id, []).append((event_type, now))
                self._note_caller(call_id, content)
        return event_type

    def _note_caller(self, call_id: str, call: dict[str, Any]) -> None:
        caller = call.get("callerId")
        if caller and call_id not in self.callers:
            self.callers[call_id] = str(caller)

    # ---- what the harness asks of an agent -----------------------------------------------------

    async def query_snapshot(self) -> bool:
        """Ask for a snapshot (the answer is recorded when it arrives); False when not connected."""
        if self._ws is None or not self.connected.is_set():
            return False
        if self._asked:
            if time.time() - self._asked[0] < UNANSWERED_SNAPSHOT_SECONDS:
                return False  # one question at a time, so each answer is matched to its question
            self._asked.clear()  # never answered: ask again
        try:
            await self._send({"command": "QueryActiveCallSnapshot", "parameters": {}})
        except (OSError, websockets.WebSocketException):
            return False
        return True

    async def make_call(self, number: str) -> bool:
        """Click-to-dial; recorded only if the command left on an open connection."""
        if self._ws is None or not self.connected.is_set():
            return False
        sent_at = time.time()
        try:
            await self._send({"command": "MakeCall", "parameters": {"targetAddress": number}})
        except (OSError, websockets.WebSocketException):
            return False
        self.commands.append(SentCommand(number, sent_at))
        return True

    def stop(self) -> None:
        self._stop = True
        ws = self._ws
        if ws is not None:
            background(ws.close())
