"""Simulated Creatio agents for the drill: each behaves like Creatio's communication panel.

On connect: LoadLibrary, OpenConnection (connectionParams as a JSON string with the line),
QueryActiveCallSnapshot. After a drop: wait (Creatio waits about 5 s before its first retry),
then the same again, backing off while the cluster refuses. Every event received is recorded
with its call id so the drill can compare with the simulator's ground truth.

Two pools of such agents, one interface (:class:`AgentPool`), the same records (:class:`AgentLog`):

* :class:`InProcessAgents` (here): one ``websockets`` client per agent in the drill's own loop, the closest to
  a browser's client; what ``make drill`` and the e2e tests run;
* ``ops.drill.workers.WorkerAgents``: lean asyncio clients (bench/wsproto.py framing) in worker processes, so a
  storm of thousands of agents is not timed by a saturated client (the storm stage of ``make bench``).
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import websockets

from ops.drill.truth import SeenCall
from ws_node.creatio_protocol import MsgEventType

#: events whose content is one call (the agent keeps each with its call id)
CALL_EVENTS = frozenset({5, 6, 7, 8, 9, 13, 17})
#: Creatio's panel backs off by half again after each refused retry, up to this
MAX_BACKOFF = 30.0


def decode_frame(frame: str | bytes) -> tuple[dict[str, Any], int, Any]:
    """A Creatio frame from the server: its envelope, its event type, and its content (decoded when it is JSON
    carried in a string, as Creatio's events are)."""
    envelope = json.loads(frame)
    content = envelope.get("content")
    if isinstance(content, str):
        try:
            content = json.loads(content)
        except ValueError:
            pass
    return envelope, int(envelope.get("eventType", 0)), content


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
class AgentLog:
    """One agent's record and reconnect schedule, without I/O: what it saw of each call (``seen``), its outages
    (each closed when a snapshot made it ready again), and how long to wait after a drop. Both pools drive it
    with the same calls in the same places, so the drill judges them alike.

    Life of an agent: :meth:`attempt` (a (re)connect begins), :meth:`reached` (the server took the connection),
    :meth:`record` for every frame, :meth:`snapshot` + :meth:`ready` on the snapshot; :meth:`failed` when an
    attempt or a connection broke, then :meth:`dropped` says how long to wait before the next attempt: the
    first retry after ``reconnect_delay`` x 0.9-1.1, each later one backing off x1.5 up to :data:`MAX_BACKOFF`.
    """

    line: str
    reconnect_delay: float = 5.0
    seen: dict[str, SeenCall] = field(default_factory=dict)
    outages: list[Outage] = field(default_factory=list)
    #: ready (snapshot received) and not dropped since
    connected: bool = False
    frames: int = 0
    clock: Callable[[], float] = time.time
    uniform: Callable[[float, float], float] = random.uniform
    _outage: Outage | None = None
    _backoff: float = -1.0

    def __post_init__(self) -> None:
        self._backoff = self.reconnect_delay

    def attempt(self) -> None:
        if self._outage is not None:
            self._outage.retry_times.append(self.clock())

    def reached(self) -> None:
        if self._outage is not None:
            self._outage.attempts += 1

    def failed(self) -> None:
        if self._outage is not None:
            self._outage.attempts += 1

    def ready(self, snapshot_ids: tuple[str, ...]) -> None:
        outage = self._outage
        if outage is not None:
            outage.ready_at = self.clock()
            outage.snapshot_ids = snapshot_ids
            outage.snapshot_at = outage.ready_at
            self.outages.append(outage)
            self._outage = None
        self._backoff = self.reconnect_delay
        self.connected = True

    def dropped(self) -> float:
        """The connection (or the attempt) is gone: the seconds to wait before the next attempt."""
        self.connected = False
        now = self.clock()
        if self._outage is None:
            self._outage = Outage(dropped_at=now)
            delay = self.reconnect_delay * self.uniform(0.9, 1.1)
            self._outage.first_retry_at = now + delay
            return delay
        delay = self._backoff
        self._backoff = min(self._backoff * 1.5, MAX_BACKOFF)
        return delay

    def record(self, frame: str | bytes) -> tuple[dict[str, Any], Any]:
        """One frame from the server: its envelope and its content (decoded when it is JSON in a string)."""
        self.frames += 1
        envelope, event_type, content = decode_frame(frame)
        if event_type in CALL_EVENTS and isinstance(content, dict):
            self._note(content, event_type)
        return envelope, content

    def snapshot(self, content: Any) -> tuple[str, ...]:
        """The call ids of an ACTIVE_CALL_SNAPSHOT's content; each call is noted as seen."""
        calls = (content or {}).get("ActiveCalls") or []
        ids = []
        for call in calls:
            if isinstance(call, str):
                call = json.loads(call)
            ids.append(str(call.get("id")))
            self._note(call, MsgEventType.ACTIVE_CALL_SNAPSHOT)
        return tuple(ids)

    def _note(self, call: dict[str, Any], event_type: int) -> None:
        call_id = str(call.get("id", ""))
        if not call_id:
            return
        seen = self.seen.setdefault(call_id, SeenCall())
        seen.event_types.append(event_type)
        seen.arrived.append(self.clock())
        caller = call.get("callerId")
        if caller and not seen.caller:
            seen.caller = str(caller)


class AgentPool(Protocol):
    """What the drill needs of its agents, wherever they run."""

    async def start(self, url: str, lines: Sequence[str], reconnect_delay: float) -> None:
        """One agent per line; returns once every one is connected (raises ``TimeoutError`` if not in time)."""

    async def all_connected(self) -> bool:
        """Every agent is connected (ready) now."""

    async def stop(self) -> list[AgentLog]:
        """Stop every agent; their records, one per line."""


@dataclass
class DrillAgent:
    url: str
    line: str
    reconnect_delay: float = 5.0
    log: AgentLog = field(init=False)
    connected: asyncio.Event = field(default_factory=asyncio.Event)
    _stop: bool = False

    def __post_init__(self) -> None:
        self.log = AgentLog(self.line, self.reconnect_delay)

    async def run(self) -> None:
        log = self.log
        while not self._stop:
            log.attempt()
            try:
                async with websockets.connect(self.url, open_timeout=10, max_size=2**22, ping_interval=None) as ws:
                    log.reached()
                    log.ready(await self._open(ws))
                    self.connected.set()
                    async for frame in ws:
                        log.record(frame)
                    # the server closed the connection
            except (OSError, websockets.WebSocketException, TimeoutError):
                log.failed()
            if self._stop:
                break
            self.connected.clear()
            await asyncio.sleep(log.dropped())

    async def _open(self, ws: Any) -> tuple[str, ...]:
        await ws.send(json.dumps({"command": "LoadLibrary", "parameters": {"libraryName": "Asterisk"}}))
        await self._until(ws, MsgEventType.LIBRARY_INITIALIZED)
        params = json.dumps({"ExtensionName": self.line, "debugMode": False})
        await ws.send(json.dumps({"command": "OpenConnection", "parameters": {"connectionParams": params}}))
        await self._until(ws, MsgEventType.CONNECTION_CREATED)
        await ws.send(json.dumps({"command": "QueryActiveCallSnapshot", "parameters": {}}))
        return self.log.snapshot(await self._until(ws, MsgEventType.ACTIVE_CALL_SNAPSHOT))

    async def _until(self, ws: Any, event_type: int) -> Any:
        while True:
            async with asyncio.timeout(15):
                frame = await ws.recv()
            envelope, content = self.log.record(frame)
            if envelope.get("eventType") == event_type:
                return content

    def stop(self) -> None:
        self._stop = True


class InProcessAgents:
    """Every agent a ``websockets`` client in the caller's event loop (:class:`AgentPool`)."""

    #: agents connected at a time at the start: a burst of handshakes is its own test
    WAVE = 50

    def __init__(self) -> None:
        self.agents: list[DrillAgent] = []
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self, url: str, lines: Sequence[str], reconnect_delay: float) -> None:
        self.agents = [DrillAgent(url, line, reconnect_delay=reconnect_delay) for line in lines]
        for begin in range(0, len(self.agents), self.WAVE):
            batch = self.agents[begin:begin + self.WAVE]
            self._tasks += [asyncio.create_task(a.run()) for a in batch]
            async with asyncio.timeout(60):
                await asyncio.gather(*(a.connected.wait() for a in batch))

    async def all_connected(self) -> bool:
        return all(a.connected.is_set() for a in self.agents)

    async def stop(self) -> list[AgentLog]:
        for agent in self.agents:
            agent.stop()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        return [a.log for a in self.agents]
