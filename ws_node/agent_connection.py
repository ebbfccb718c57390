"""One agent connection, independent of its transport (raw WebSocket or SignalR).

A transport adapter owns the socket and gives this class a :class:`FrameSink`; this class
implements the :class:`SessionEnvironment` the sans-I/O :class:`AgentSession` needs (follow a
line through the :class:`LineFeed`, snapshots from Redis, commands to the gateway) and the
:class:`LineSubscriber` the feed delivers to. Coroutines run on the shared asyncio loop.

Flow control lives here too, so both transports behave the same: while the sink reports it
cannot take more (the kernel buffer is full and Twisted paused us), frames wait in a bounded
backlog; a client still stuck when the backlog is full is disconnected instead of growing the
node's memory.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
import uuid
from collections.abc import Coroutine
from typing import Any, Protocol

from prometheus_client import Counter, Gauge, Histogram

from services.line_state import LineSnapshot
from services.wire import Command, CommandResult, LineEvent
from ws_node.agent_session import AgentSession, FrameMemo
from ws_node.line_feed import LineFeed

log = logging.getLogger(__name__)

CLIENTS = Gauge("cms_node_clients", "Agent connections open on this node", ["transport"])
FRAMES_SENT = Counter("cms_node_frames_sent_total", "Frames sent to agents")
FRAMES_DROPPED = Counter("cms_node_frames_dropped_total", "Frames not sent because the client was gone or stuck")
SLOW_CLIENT_DISCONNECTS = Counter("cms_node_slow_client_disconnects_total", "Clients dropped for not reading")
END_TO_END = Histogram(
    "cms_end_to_end_latency_seconds",
    "From AMI bytes received by the gateway to the WebSocket frame handed to the socket",
    buckets=(0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
)


class FrameSink(Protocol):
    """What a transport offers: write one text message, close, and abort."""

    def write_text(self, text: str) -> None: ...

    def close(self, code: int, reason: str) -> None: ...

    def abort(self) -> None: ...


class ConnectionHub:
    """Node-wide state the connections share: the feed, the frame memo, the open connections."""

    def __init__(
        self, feed: LineFeed, *, max_backlog_frames: int = 2000, session_options: dict[str, Any] | None = None
    ) -> None:
        self.feed = feed
        self.max_backlog_frames = max_backlog_frames
        self.session_options = session_options or {}
        # One event's frames are encoded once per node and shared by every tab of the line.
        self.frame_memo = FrameMemo()
        self.connections: set[AgentConnection] = set()

    def close_all(self, code: int = 1001, reason: str = "server going away") -> None:
        for connection in list(self.connections):
            connection.close(code, reason)


def spawn(coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
    return asyncio.ensure_future(coro)


class AgentConnection:
    def __init__(self, hub: ConnectionHub, sink: FrameSink, transport: str) -> None:
        self.hub = hub
        self.sink = sink
        self.transport = transport
        self.conn_id = uuid.uuid4().hex[:12]
        self.session: AgentSession | None = AgentSession(self, frame_memo=hub.frame_memo, **hub.session_options)
        self._lines: set[str] = set()
        self._paused = False
        self._closing = False
        self._backlog: collections.deque[str] = collections.deque()
        hub.connections.add(self)
        CLIENTS.labels(transport=transport).inc()

    # ---- from the transport ------------------------------------------------------------------

    def received(self, text: str) -> None:
        if self.session is not None:
            self.session.on_text(text)

    def lost(self) -> None:
        """The socket is gone (any reason). Idempotent."""
        if self in self.hub.connections:
            self.hub.connections.discard(self)
            CLIENTS.labels(transport=self.transport).dec()
        session, self.session = self.session, None
        if session is not None:
            session.on_disconnect()
        for line in list(self._lines):
            self._lines.discard(line)
            spawn(self.hub.feed.unfollow(self, line))
        self._backlog.clear()

    def pause(self) -> None:
        self._paused = True

    def resume(self) -> None:
        self._paused = False
        while self._backlog and not self._paused:
            self.sink.write_text(self._backlog.popleft())
            FRAMES_SENT.inc()

    # ---- SessionEnvironment ------------------------------------------------------------------

    def send_frame(self, text: str) -> None:
        if self._closing or self.session is None:
            FRAMES_DROPPED.inc()
            return
        if self._paused:
            self._backlog.append(text)
            if len(self._backlog) > self.hub.max_backlog_frames:
                SLOW_CLIENT_DISCONNECTS.inc()
                FRAMES_DROPPED.inc(len(self._backlog))
                self._backlog.clear()
                log.warning("client does not read; disconnecting", extra={"conn": self.conn_id})
                self._closing = True
                self.sink.abort()
            return
        self.sink.write_text(text)
        FRAMES_SENT.inc()

    def claim_line(self, session: AgentSession, line: str) -> None:
        self._lines.add(line)
        spawn(self._follow(session, line))

    async def _follow(self, session: AgentSession, line: str) -> None:
        try:
            snapshot = await self.hub.feed.follow(self, line)
        except Exception as exc:  # Redis down: the session still gets live events
            log.warning("line %s: no snapshot at claim (%s)", line, exc, extra={"conn": self.conn_id})
            return
        if self.session is session:
            session.on_calls_known(list(snapshot.calls))

    def release_line(self, session: AgentSession, line: str) -> None:
        if line in self._lines:
            self._lines.discard(line)
            spawn(self.hub.feed.unfollow(self, line))

    def request_snapshot(self, session: AgentSession, line: str) -> None:
        spawn(self._snapshot(session, line))

    async def _snapshot(self, session: AgentSession, line: str) -> None:
        try:
            snapshot = await self.hub.feed.reader.snapshot(line)
        except Exception as exc:
            log.warning("line %s: snapshot failed (%s)", line, exc, extra={"conn": self.conn_id})
            if self.session is session:
                session.on_snapshot_failed(f"call state store unavailable: {exc.__class__.__name__}")
            return
        if self.session is session:
            session.on_snapshot(list(snapshot.calls), snapshot.agent)

    def submit_command(self, session: AgentSession, command: Command) -> None:
        spawn(self._command(session, command))

    async def _command(self, session: AgentSession, command: Command) -> None:
        result: CommandResult = await self.hub.feed.send_command(command)
        if self.session is session:
            session.on_command_result(result, command)

    def close(self, code: int, reason: str) -> None:
        if not self._closing:
            self._closing = True
            self.sink.close(code, reason)

    # ---- LineSubscriber ----------------------------------------------------------------------

    def deliver_event(self, event: LineEvent) -> None:
        session = self.session
        if session is None:
            return
        session.on_line_event(event)
        if event.ami_received_at:
            END_TO_END.observe(max(0.0, time.time() - event.ami_received_at))

    def resync(self, snapshot: LineSnapshot) -> None:
        if self.session is not None:
            self.session.on_snapshot(list(snapshot.calls), snapshot.agent)
