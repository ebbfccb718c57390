"""Autobahn/Twisted edge of the node: one protocol instance per browser connection.

The protocol only moves text frames between the socket and an :class:`AgentSession` (the
framework-neutral protocol logic) and implements the session's environment: following a line
through the :class:`LineFeed`, reading snapshots, submitting commands. Coroutines are run on
the shared asyncio loop (the reactor is Twisted's asyncio reactor).

Flow control: the protocol registers itself as a streaming producer on its transport. When
the kernel buffer is full Twisted calls ``pauseProducing``; frames then wait in a bounded
per-connection queue; a client that stays stuck past that bound is disconnected rather than
allowed to grow the node's memory.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
import uuid
from collections.abc import Callable
from typing import Any

from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.websocket.types import ConnectionDeny, ConnectionRequest
from prometheus_client import Counter, Gauge, Histogram
from twisted.internet.defer import Deferred

from services.line_state import LineSnapshot
from services.wire import Command, CommandResult, LineEvent
from ws_node.agent_session import AgentSession, FrameMemo
from ws_node.line_feed import LineFeed

log = logging.getLogger(__name__)

CLIENTS = Gauge("cms_node_clients", "Agent connections open on this node", ["transport"])
FRAMES_SENT = Counter("cms_node_frames_sent_total", "Frames sent to agents")
FRAMES_DROPPED = Counter("cms_node_frames_dropped_total", "Frames not sent because the client was gone or stuck")
SLOW_CLIENT_DISCONNECTS = Counter("cms_node_slow_client_disconnects_total", "Clients dropped for not reading")
BAD_REQUESTS = Counter("cms_node_rejected_connections_total", "Connections refused at the handshake", ["reason"])
END_TO_END = Histogram(
    "cms_end_to_end_latency_seconds",
    "From AMI bytes received by the gateway to the WebSocket frame handed to the socket",
    buckets=(0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
)


def run_coroutine(coro: Any) -> Deferred[Any]:
    return Deferred.fromFuture(asyncio.ensure_future(coro))


class AgentProtocol(WebSocketServerProtocol):  # type: ignore[misc]
    factory: AgentServerFactory

    def __init__(self) -> None:
        super().__init__()
        self.conn_id = uuid.uuid4().hex[:12]
        self.session: AgentSession | None = None
        self._lines: set[str] = set()
        self._paused = False
        self._backlog: collections.deque[bytes] = collections.deque()
        self._closing = False

    # ---- handshake ---------------------------------------------------------------------------

    def onConnect(self, request: ConnectionRequest) -> None:
        problem = self.factory.admission(request)
        if problem is not None:
            BAD_REQUESTS.labels(reason=problem[1]).inc()
            raise ConnectionDeny(problem[0], problem[1])

    def onOpen(self) -> None:
        transport: Any = self.transport
        if getattr(transport, "producer", None) is not None:
            # twisted.web's HTTPChannel stays registered after the upgrade; the connection is ours now.
            transport.unregisterProducer()
        transport.registerProducer(self, True)
        self.session = AgentSession(self, frame_memo=self.factory.frame_memo, **self.factory.session_options)
        self.factory.connections.add(self)
        CLIENTS.labels(transport="websocket").inc()
        log.debug("agent connected", extra={"conn": self.conn_id})

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        if self.session is None:
            return
        if isBinary:
            try:
                text = payload.decode("utf-8")
            except UnicodeDecodeError:
                text = "\ufffd"
        else:
            text = payload.decode("utf-8", errors="replace")
        self.session.on_text(text)

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        if self in self.factory.connections:
            self.factory.connections.discard(self)
            CLIENTS.labels(transport="websocket").dec()
        session, self.session = self.session, None
        if session is not None:
            session.on_disconnect()
        for line in list(self._lines):
            self.release_line(session, line)  # type: ignore[arg-type]

    # ---- producer (flow control) -------------------------------------------------------------

    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        self._paused = False
        while self._backlog and not self._paused:
            self.sendMessage(self._backlog.popleft(), isBinary=False)

    def stopProducing(self) -> None:
        self._backlog.clear()

    # ---- SessionEnvironment ------------------------------------------------------------------

    def send_frame(self, text: str) -> None:
        if self._closing or self.state != WebSocketServerProtocol.STATE_OPEN:
            FRAMES_DROPPED.inc()
            return
        data = text.encode("utf-8")
        if self._paused:
            self._backlog.append(data)
            if len(self._backlog) > self.factory.max_backlog_frames:
                SLOW_CLIENT_DISCONNECTS.inc()
                FRAMES_DROPPED.inc(len(self._backlog))
                self._backlog.clear()
                log.warning("client does not read; disconnecting", extra={"conn": self.conn_id})
                self._closing = True
                self.dropConnection(abort=True)
            return
        self.sendMessage(data, isBinary=False)
        FRAMES_SENT.inc()

    def claim_line(self, session: AgentSession, line: str) -> None:
        self._lines.add(line)
        run_coroutine(self._follow(session, line))

    async def _follow(self, session: AgentSession, line: str) -> None:
        try:
            snapshot = await self.factory.feed.follow(self, line)
        except Exception as exc:  # Redis down: the session still gets live events
            log.warning("line %s: no snapshot at claim (%s)", line, exc, extra={"conn": self.conn_id})
            return
        if self.session is session:
            session.on_calls_known(list(snapshot.calls))

    def release_line(self, session: AgentSession, line: str) -> None:
        if line in self._lines:
            self._lines.discard(line)
            run_coroutine(self.factory.feed.unfollow(self, line))

    def request_snapshot(self, session: AgentSession, line: str) -> None:
        run_coroutine(self._snapshot(session, line))

    async def _snapshot(self, session: AgentSession, line: str) -> None:
        try:
            snapshot = await self.factory.feed.reader.snapshot(line)
        except Exception as exc:
            log.warning("line %s: snapshot failed (%s)", line, exc, extra={"conn": self.conn_id})
            if self.session is session:
                session.on_snapshot_failed(f"call state store unavailable: {exc.__class__.__name__}")
            return
        if self.session is session:
            session.on_snapshot(list(snapshot.calls), snapshot.agent)

    def submit_command(self, session: AgentSession, command: Command) -> None:
        run_coroutine(self._command(session, command))

    async def _command(self, session: AgentSession, command: Command) -> None:
        result: CommandResult = await self.factory.feed.send_command(command)
        if self.session is session:
            session.on_command_result(result, command)

    def close(self, code: int, reason: str) -> None:
        self._closing = True
        self.sendClose(code=code, reason=reason)

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


class AgentServerFactory(WebSocketServerFactory):  # type: ignore[misc]
    protocol = AgentProtocol  # type: ignore[assignment]

    def __init__(
        self,
        feed: LineFeed,
        *,
        url: str,
        deployment_key: str = "",
        allowed_origins: tuple[str, ...] = (),
        max_message_bytes: int = 64 * 1024,
        max_backlog_frames: int = 2000,
        session_options: dict[str, Any] | None = None,
        is_draining: Callable[[], bool] = lambda: False,
    ) -> None:
        super().__init__(url)
        self.feed = feed
        self.deployment_key = deployment_key
        self.allowed_origins = allowed_origins
        self.max_backlog_frames = max_backlog_frames
        self.session_options = session_options or {}
        self.connections: set[AgentProtocol] = set()
        # One event's frames are encoded once per node and shared by every tab of the line.
        self.frame_memo = FrameMemo()
        self.is_draining = is_draining
        self.setProtocolOptions(
            maxFramePayloadSize=max_message_bytes,
            maxMessagePayloadSize=max_message_bytes,
            autoPingInterval=30,
            autoPingTimeout=15,
            openHandshakeTimeout=10,
            closeHandshakeTimeout=3,
            failByDrop=False,
        )

    def admission(self, request: ConnectionRequest) -> tuple[int, str] | None:
        if self.is_draining():
            return 503, "node draining"
        if self.deployment_key:
            given = (request.params.get("key") or [""])[0]
            if given != self.deployment_key:
                return 403, "bad key"
        if self.allowed_origins and request.origin and request.origin not in ("null",):
            if request.origin not in self.allowed_origins:
                return 403, "origin not allowed"
        return None

    def close_all(self, code: int = 1001, reason: str = "server going away") -> None:
        for protocol in list(self.connections):
            protocol.close(code, reason)
