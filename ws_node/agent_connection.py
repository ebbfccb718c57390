"""One agent connection, independent of its transport (raw WebSocket or SignalR).

A transport adapter owns the socket and gives this class a :class:`FrameSink`; this class
implements the :class:`SessionEnvironment` the sans-I/O :class:`AgentSession` needs (follow a
line through the :class:`LineFeed`, snapshots from Redis, commands to the gateway) and the
:class:`LineSubscriber` the feed delivers to. Coroutines run on the shared asyncio loop.

Flow control lives here too, so both transports behave the same: while the sink reports it
cannot take more (the kernel buffer is full and Twisted paused us), frames wait in a bounded
backlog; a client still stuck when the backlog is full is disconnected instead of growing the
node's memory.

Reconnects lose no call: every event handed to a session is noted in the node's
:class:`DeliveryLog` (a dict update; written to Redis in batches). When a line is claimed, the
connection reads where that agent stood when it left (on whatever node), reads the line's
history from there to the current snapshot and hands both to the session, which replays the
calls that ended in the gap before the snapshot. When the history no longer covers the gap,
that is logged and counted and the agent gets the snapshot alone.

Who may open a line (``services.line_access``) is decided before the line is followed, so a
refused user gets nothing of it: the administrator's assignments first, then first come, first
served across the cluster (:class:`~ws_node.line_holders.LineHolders` in Redis). A line the
administrator marked shared, or assigned to several users, is let in with a warning and
``cms_node_shared_line_claims_total``. Every refusal is logged and counted
(``cms_node_line_refusals_total``). Commands are held to per-line and per-user budgets, the
node's own (:class:`~ws_node.admission.CommandLimiter`) and the cluster's
(:class:`~ws_node.command_quota.CommandQuota`, in Redis), before they reach the gateway.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
import uuid
from typing import Protocol

import redis.asyncio as aioredis
from prometheus_client import Counter, Gauge, Histogram

from services.delivery_log import AgentKey, DeliveryLog, RedisDeliveryStore
from services.infra_metrics import EVENT_LATENCY_BUCKETS
from services.line_access import SecurityConfig, Verdict, decide
from services.line_state import HistoryUnavailable, LineSnapshot
from services.tasks import background
from services.wire import Command, CommandResult, LineEvent, StreamPosition, WireError
from ws_node.admission import CommandLimiter
from ws_node.agent_session import AgentSession, FrameMemo, SessionOptions
from ws_node.command_quota import CommandQuota
from ws_node.line_feed import LineFeed
from ws_node.line_holders import HOLDER_STORE_ERRORS, LineHolders
from ws_node.line_router import plan_catch_up

log = logging.getLogger(__name__)

CLIENTS = Gauge("cms_node_clients", "Agent connections open on this node", ["transport"])
for _transport in ("websocket", "signalr"):
    CLIENTS.labels(transport=_transport)
FRAMES_SENT = Counter("cms_node_frames_sent_total", "Frames sent to agents")
FRAMES_DROPPED = Counter("cms_node_frames_dropped_total", "Frames not sent because the client was gone or stuck")
SLOW_CLIENT_DISCONNECTS = Counter("cms_node_slow_client_disconnects_total", "Clients dropped for not reading")
CATCH_UPS = Counter(
    "cms_node_reconnect_catchups_total",
    "Lines claimed by an agent, by what its gap since it last left looked like",
    ["outcome"],
)
SNAPSHOTS_REUSED = Counter(
    "cms_node_snapshots_reused_total",
    "Snapshot queries answered with the snapshot read when the line was claimed (no event on the line since)",
)
#: how long the claim's snapshot may answer the panel's first query (Creatio asks at once after CONNECTION_CREATED)
CLAIM_SNAPSHOT_SECONDS = 2.0
REPLAYED_EVENTS = Counter("cms_node_replayed_events_total", "Missed call events replayed to reconnecting agents")
SHARED_LINE_CLAIMS = Counter(
    "cms_node_shared_line_claims_total", "Lines claimed by a Creatio user while another user held them"
)
LINE_REFUSALS = Counter(
    "cms_node_line_refusals_total", "OpenConnection refused: the user may not open that line", ["reason"]
)
for _reason in ("assigned_to_other", "not_your_line", "unassigned", "held_by_other"):
    LINE_REFUSALS.labels(reason=_reason)
END_TO_END = Histogram(
    "cms_end_to_end_latency_seconds",
    "From AMI bytes received by the gateway to the WebSocket frame handed to the socket",
    buckets=EVENT_LATENCY_BUCKETS,
)


class FrameSink(Protocol):
    """What a transport offers: write one text message, close, and abort."""

    def write_text(self, text: str) -> None: ...

    def close(self, code: int, reason: str) -> None: ...

    def abort(self) -> None: ...


class ConnectionHub:
    """Node-wide state the connections share: the feed, the frame memo, the open connections."""

    def __init__(
        self,
        feed: LineFeed,
        redis_client: aioredis.Redis,
        prefix: str,
        *,
        max_backlog_frames: int = 2000,
        session_options: SessionOptions | None = None,
        delivery_log: DeliveryLog | None = None,
        security: SecurityConfig | None = None,
        command_limiter: CommandLimiter | None = None,
    ) -> None:
        self.feed = feed
        self.security = security or SecurityConfig()
        self.command_limiter = command_limiter or CommandLimiter(clock=time.monotonic)
        #: the same budgets, shared by every node (the node's own above still hold without Redis)
        self.command_quota = CommandQuota(redis_client, prefix, self.command_limiter.limits)
        self.holders = LineHolders(redis_client, prefix, ttl_seconds=self.security.holder_ttl_seconds)
        feed.before_stop.append(self.holders.close)
        self.max_backlog_frames = max_backlog_frames
        self.session_options = session_options or SessionOptions()
        # One event's frames are encoded once per node and shared by every tab of the line.
        self.frame_memo = FrameMemo()
        self.connections: set[AgentConnection] = set()
        self.delivery_log = delivery_log or DeliveryLog(RedisDeliveryStore(redis_client, prefix))
        feed.before_stop.append(self.delivery_log.close)

    def close_all(self, code: int = 1001, reason: str = "server going away") -> None:
        for connection in list(self.connections):
            connection.close(code, reason)


class AgentConnection:
    # A node holds thousands of these: no per-instance dict, and the backlog exists only while
    # the client is not reading.
    __slots__ = ("hub", "sink", "transport", "conn_id", "session", "_lines", "_agents", "_paused", "_closing",
                 "_backlog", "_claims", "_command_lock", "_claim_snapshot")

    def __init__(self, hub: ConnectionHub, sink: FrameSink, transport: str) -> None:
        self.hub = hub
        self.sink = sink
        self.transport = transport
        self.conn_id = uuid.uuid4().hex[:12]
        self.session: AgentSession | None = AgentSession(self, frame_memo=hub.frame_memo, options=hub.session_options)
        self._lines: set[str] = set()
        #: the delivery-log identity of each followed line, once the line is caught up
        self._agents: dict[str, AgentKey] = {}
        self._paused = False
        self._closing = False
        self._backlog: collections.deque[str] | None = None
        #: line -> this connection's entry in the line's holder set
        self._claims: dict[str, str] = {}
        self._command_lock: asyncio.Lock | None = None
        #: (line, monotonic time, snapshot) read when the line was claimed: the panel's own snapshot query comes
        #: right after, and nothing on the line since means it is still the answer (one Redis read fewer for
        #: every agent that connects; a reconnect storm is thousands at once)
        self._claim_snapshot: tuple[str, float, LineSnapshot] | None = None
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
            self._forget(line)
            background(self.hub.feed.unfollow(self, line))
        self._backlog = None

    def pause(self) -> None:
        self._paused = True

    def resume(self) -> None:
        self._paused = False
        backlog = self._backlog
        while backlog and not self._paused:
            self.sink.write_text(backlog.popleft())
            FRAMES_SENT.inc()
        if backlog is not None and not backlog and self._backlog is backlog:
            self._backlog = None

    # ---- SessionEnvironment ------------------------------------------------------------------

    def send_frame(self, text: str) -> None:
        if self._closing or self.session is None:
            FRAMES_DROPPED.inc()
            return
        if self._paused:
            backlog = self._backlog
            if backlog is None:
                backlog = self._backlog = collections.deque()
            backlog.append(text)
            if len(backlog) > self.hub.max_backlog_frames:
                SLOW_CLIENT_DISCONNECTS.inc()
                FRAMES_DROPPED.inc(len(backlog))
                self._backlog = None
                log.warning("client does not read; disconnecting", extra={"conn": self.conn_id})
                self._closing = True
                self.sink.abort()
            return
        self.sink.write_text(text)
        FRAMES_SENT.inc()

    def claim_line(self, session: AgentSession, line: str) -> None:
        self._lines.add(line)
        background(self._follow(session, line))

    async def _admitted(self, session: AgentSession, line: str) -> str | None:
        """Why ``session``'s user may open ``line`` (holding it if first come), or ``None`` when it
        may not (the session has been told)."""
        user = session.user_uid
        decision = decide(self.hub.security, line, user)
        if decision.verdict is not Verdict.REFUSE:
            exclusive = decision.verdict is Verdict.FIRST_COME
            try:
                claim_id, other = await self.hub.holders.claim(line, user, exclusive=exclusive)
            except (OSError, aioredis.RedisError) as exc:
                # Redis down: live events still flow; first come cannot be checked meanwhile.
                HOLDER_STORE_ERRORS.inc()
                log.warning("line %s user %s: holders unknown (%s); admitted", line, user or "-", exc,
                            extra={"conn": self.conn_id})
                return "holders_unknown"
            if other is None:
                if self.session is session and line in self._lines:
                    self._claims[line] = claim_id
                    return decision.reason
                background(self.hub.holders.release(claim_id))
                return None
            decision = decide(self.hub.security, line, user, holders=[other])
        LINE_REFUSALS.labels(reason=decision.reason).inc()
        log.warning("line %s refused to user %s (%s): %s", line, user or "-", decision.reason, decision.message,
                    extra={"conn": self.conn_id, "line": line})
        if self.session is session and line in self._lines:
            self._lines.discard(line)
            session.on_line_refused(line, decision.message)
        return None

    async def _follow(self, session: AgentSession, line: str) -> None:
        admitted = await self._admitted(session, line)
        if admitted is None:
            return
        agent = session.agent_key
        try:
            snapshot = await self.hub.feed.follow(self, line)
        except (OSError, aioredis.RedisError, WireError) as exc:  # Redis down: live events still flow
            log.warning("line %s: no snapshot at claim (%s)", line, exc, extra={"conn": self.conn_id})
            CATCH_UPS.labels(outcome="error").inc()
            if self.session is session:
                session.on_claimed(())
            return
        missed: list[LineEvent] = []
        if agent is not None:
            missed = await self._arrive(agent, snapshot, warn=admitted in ("shared", "assigned"))
        if self.session is not session or line not in self._lines:
            return
        self._claim_snapshot = (line, time.monotonic(), snapshot)
        session.on_claimed(list(snapshot.calls), missed, epoch=snapshot.epoch)
        REPLAYED_EVENTS.inc(session.replayed)
        if agent is not None:
            # Everything up to the snapshot, and whatever the feed delivered since (held back
            # during the catch-up, now sent), has reached the session.
            self._agents[line] = agent
            self.hub.delivery_log.attach(agent, snapshot.position)
            delivered = self.hub.feed.router.position(line)
            if delivered is not None and delivered.epoch:
                self.hub.delivery_log.note(agent, delivered)

    async def _arrive(self, agent: AgentKey, snapshot: LineSnapshot, *, warn: bool) -> list[LineEvent]:
        """The line's events between where ``agent`` last stood and ``snapshot``. The user is noted in the
        delivery log's holders (same round trip); on a line several users may hold, says so when another
        one is there (first come has already refused a second user elsewhere)."""
        try:
            last, others = await self.hub.delivery_log.arrive(agent)
        except (OSError, aioredis.RedisError, WireError) as exc:
            return self._catch_up_failed(agent, exc)
        if others and warn:
            SHARED_LINE_CLAIMS.inc()
            log.warning("line %s claimed by user %s while held by %s; both get its events",
                        agent.line, agent.user, ", ".join(others), extra={"conn": self.conn_id})
        return await self._missed(agent, last, snapshot)

    def _catch_up_failed(self, agent: AgentKey, exc: Exception) -> list[LineEvent]:
        CATCH_UPS.labels(outcome="error").inc()
        log.warning("line %s: catch-up failed (%s); sending the snapshot only", agent.line, exc,
                    extra={"conn": self.conn_id})
        return []

    async def _missed(self, agent: AgentKey, last: StreamPosition | None, snapshot: LineSnapshot) -> list[LineEvent]:
        try:
            if last is None:
                CATCH_UPS.labels(outcome="first_time").inc()
                return []
            if last >= snapshot.position:
                CATCH_UPS.labels(outcome="nothing_missed").inc()
                return []
            # Across epochs too: a gateway restart while the agent was away starts a new epoch at
            # seq 1, which continues the old one (see line_router); a hole means history is gone.
            history = await self.hub.feed.reader.history_since(agent.line, last)
            plan = plan_catch_up(last, history.events, history.anchored, history.snapshot.position)
            if plan.resync_at is not None:
                raise HistoryUnavailable(f"line {agent.line}: history after {last.encode()} is incomplete")
            events = list(plan.events)
        except HistoryUnavailable as exc:
            CATCH_UPS.labels(outcome="history_gone").inc()
            log.warning(
                "line %s user %s: the history no longer covers the gap since %s (%s); sending the snapshot only",
                agent.line, agent.user or "-", last.encode() if last else "?", exc, extra={"conn": self.conn_id},
            )
            return []
        except (OSError, aioredis.RedisError, WireError) as exc:
            return self._catch_up_failed(agent, exc)
        gap = [e for e in events if e.position <= snapshot.position]
        CATCH_UPS.labels(outcome="replayed").inc()
        log.info("line %s user %s: %d events missed since %s", agent.line, agent.user or "-", len(gap),
                 last.encode(), extra={"conn": self.conn_id})
        return gap

    def _forget(self, line: str) -> None:
        claim_id = self._claims.pop(line, None)
        if claim_id is not None:
            background(self.hub.holders.release(claim_id))
        agent = self._agents.pop(line, None)
        if agent is not None:
            self.hub.delivery_log.detach(agent)

    def release_line(self, session: AgentSession, line: str) -> None:
        self._claim_snapshot = None
        if line in self._lines:
            self._lines.discard(line)
            self._forget(line)
            background(self.hub.feed.unfollow(self, line))

    def request_snapshot(self, session: AgentSession, line: str) -> None:
        background(self._snapshot(session, line))

    def _unchanged_claim_snapshot(self, line: str) -> LineSnapshot | None:
        """The snapshot read when ``line`` was claimed, if it is recent and no event of the line reached this node
        since (taken once)."""
        claimed, self._claim_snapshot = self._claim_snapshot, None
        if claimed is None:
            return None
        claimed_line, at, snapshot = claimed
        if (claimed_line != line or time.monotonic() - at > CLAIM_SNAPSHOT_SECONDS
                or self.hub.feed.router.position(line) != snapshot.position):
            return None
        return snapshot

    async def _snapshot(self, session: AgentSession, line: str) -> None:
        reused = self._unchanged_claim_snapshot(line)
        if reused is not None:
            SNAPSHOTS_REUSED.inc()
            if self.session is session:
                session.on_snapshot(list(reused.calls), reused.agent, epoch=reused.epoch)
            return
        try:
            snapshot = await self.hub.feed.snapshot(line)
        except Exception as exc:
            log.warning("line %s: snapshot failed (%s)", line, exc, extra={"conn": self.conn_id})
            if self.session is session:
                session.on_snapshot_failed("call state store unavailable, try again shortly")
            return
        if self.session is session:
            session.on_snapshot(list(snapshot.calls), snapshot.agent, epoch=snapshot.epoch,
                                behind=self.hub.feed.behind(line, snapshot))

    def request_agent_state(self, session: AgentSession, line: str) -> None:
        background(self._agent_state(session, line))

    async def _agent_state(self, session: AgentSession, line: str) -> None:
        try:
            snapshot = await self.hub.feed.reader.snapshot(line)
        except (OSError, aioredis.RedisError, WireError) as exc:
            log.warning("line %s: agent state unavailable (%s)", line, exc, extra={"conn": self.conn_id})
            return
        if self.session is session:
            session.on_agent_state(snapshot.agent)

    def submit_command(self, session: AgentSession, command: Command) -> None:
        refusal = self.hub.command_limiter.check(command.line, session.user_uid, command.name)
        if refusal is not None:
            log.warning("line %s user %s: %s refused: %s", command.line, session.user_uid or "-",
                        command.name.value, refusal, extra={"conn": self.conn_id, "line": command.line})
            session.on_command_result(CommandResult(command.id, ok=False, error=refusal), command)
            return
        background(self._command(session, command))

    async def _command(self, session: AgentSession, command: Command) -> None:
        # The cluster-wide budget, one check at a time per connection so its commands reach the
        # gateway in the order they were sent (three DTMF digits stay "123").
        lock = self._command_lock
        if lock is None:
            lock = self._command_lock = asyncio.Lock()
        async with lock:
            refusal = await self.hub.command_quota.check(command.line, session.user_uid, command.name)
        if refusal is not None:
            log.warning("line %s user %s: %s refused: %s", command.line, session.user_uid or "-",
                        command.name.value, refusal, extra={"conn": self.conn_id, "line": command.line})
            if self.session is session:
                session.on_command_result(CommandResult(command.id, ok=False, error=refusal), command)
            return
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
        agent = self._agents.get(event.line)
        if agent is not None:
            self.hub.delivery_log.note(agent, event.position)
        if event.ami_received_at:
            END_TO_END.observe(max(0.0, time.time() - event.ami_received_at))

    def resync(self, snapshot: LineSnapshot) -> None:
        if self.session is not None:
            self.session.on_snapshot(list(snapshot.calls), snapshot.agent, epoch=snapshot.epoch)
            agent = self._agents.get(snapshot.line)
            if agent is not None:
                self.hub.delivery_log.note(agent, snapshot.position)
