"""Autobahn/Twisted adapter for both agent transports on one WebSocket endpoint.

* Raw WebSocket (Creatio 7.x, ``ws://host:2013``): one JSON text frame per message.
* SignalR (Creatio 8.x, ``http://host:2013``): after ``POST /negotiate`` the client opens the
  socket with ``?id=<token>``; with ``skipNegotiation`` it comes without one and its first
  message is the handshake record. The protocol itself lives in :mod:`ws_node.signalr`.

A socket with a valid ``id`` is SignalR from the start; any other is decided by its first message
(a handshake record ends with 0x1E, a Creatio command never does). Either way the socket then
drives an :class:`AgentConnection`, with this class as its :class:`FrameSink`; Twisted's producer
calls (``pauseProducing`` when the kernel buffer is full) are relayed so the connection applies
its bounded backlog, whatever the transport.

Admission (key, Origin, connection cap, size and rate limits) is :mod:`ws_node.admission`; one
node-wide sweep, not a timer per socket, enforces handshake deadlines and SignalR keep-alives.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import time
from collections.abc import Callable
from typing import Any

import txaio
from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.websocket.types import ConnectionDeny, ConnectionRequest
from twisted.internet.task import LoopingCall

from ws_node import signalr
from ws_node.admission import (
    OVERSIZED,
    PROTOCOL_VIOLATIONS,
    REFUSED,
    AdmissionPolicy,
    RateGuard,
    RateVerdict,
    admit,
)
from ws_node.agent_connection import AgentConnection, ConnectionHub
from ws_node.autobahn_edge import defer_debug_formatting, stop_auto_ping, write_prepared
from ws_node.creatio_protocol import MsgErrorType, error_frame
from ws_node.signalr_token import ConnectionTokens

log = logging.getLogger(__name__)
_txaio: Any = txaio  # untyped at run time (framework chosen by autobahn.twisted)

CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 1001
CLOSE_PROTOCOL_ERROR = 1002
CLOSE_UNSUPPORTED_DATA = 1003
CLOSE_POLICY_VIOLATION = 1008
CLOSE_MESSAGE_TOO_BIG = 1009

#: frames whose prepared bytes are kept per transport: a few events' worth
PREPARED_CACHE_SIZE = 64

RATE_WARNING = "too many messages: slow down (messages over the limit are dropped)"
#: from a flooder's close frame to dropping its socket
FLOODER_DROP_SECONDS = 1.0


def _close_reason(reason: str) -> bytes | None:
    """A close frame's reason is at most 123 bytes of UTF-8; cut on a character boundary."""
    if not reason:
        return None
    return reason.encode("utf-8")[:123].decode("utf-8", errors="ignore").encode("utf-8")


class Mode(enum.Enum):
    UNDECIDED = "undecided"
    RAW = "websocket"
    SIGNALR = "signalr"


class AgentProtocol(WebSocketServerProtocol):  # type: ignore[misc]
    factory: AgentServerFactory

    def __init__(self) -> None:
        super().__init__()
        self.connection: AgentConnection | None = None
        self.mode = Mode.UNDECIDED
        self.hub_protocol: signalr.HubConnection | None = None
        self.keepalive: signalr.KeepAlive | None = None
        self.rate: RateGuard | None = None
        self.opened_at = 0.0
        self._transport_paused = False

    # ---- handshake ---------------------------------------------------------------------------

    def onConnect(self, request: ConnectionRequest) -> None:
        factory = self.factory
        key = (request.params.get("key") or [None])[0]
        refusal = admit(
            factory.policy, key=key, origin=request.headers.get("origin"),
            open_connections=len(factory.live), draining=factory.is_draining(),
        )
        if refusal is not None:
            raise ConnectionDeny(refusal.status, refusal.reason)
        token = (request.params.get("id") or [None])[0]
        if token is not None:
            if not factory.tokens.verify(token, factory.wall_clock()):
                REFUSED.labels(reason="bad_connection_token").inc()
                # What ASP.NET answers for an unknown id; the client negotiates again.
                raise ConnectionDeny(404, "No Connection with that ID")
            self.mode = Mode.SIGNALR

    def onOpen(self) -> None:
        transport: Any = self.transport
        if getattr(transport, "producer", None) is not None:
            # twisted.web's HTTPChannel stays registered after the upgrade; the connection is ours now.
            transport.unregisterProducer()
        transport.registerProducer(self, True)
        self.opened_at = self.factory.clock()
        self.rate = RateGuard(self.factory.policy, self.factory.clock)
        self.factory.admit_socket(self)
        if self.mode is Mode.SIGNALR:
            self._start_signalr()

    def _start_signalr(self) -> None:
        self.mode = Mode.SIGNALR
        stop_auto_ping(self)
        self.hub_protocol = signalr.HubConnection(max_record_chars=self.factory.policy.max_message_bytes)
        self.keepalive = signalr.KeepAlive(
            self.factory.clock(), ping_interval=self.factory.ping_interval, client_timeout=self.factory.client_timeout
        )

    def _attach(self, transport_name: str) -> AgentConnection:
        connection = AgentConnection(self.factory.hub, self, transport_name)
        if self._transport_paused:
            connection.pause()
        self.connection = connection
        return connection

    # ---- inbound -----------------------------------------------------------------------------

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        if self.state != WebSocketServerProtocol.STATE_OPEN:
            return
        if isBinary:
            PROTOCOL_VIOLATIONS.labels(kind="binary").inc()
            self._close_with_error(CLOSE_UNSUPPORTED_DATA, "binary frames are not supported")
            return
        # Autobahn has validated the UTF-8 of text frames (invalid ones are closed with 1007).
        text = payload.decode("utf-8", errors="replace")
        if self.mode is Mode.UNDECIDED:
            if signalr.looks_like_handshake(text):
                self._start_signalr()
            else:
                self.mode = Mode.RAW
                self._attach("websocket")
        if self.mode is Mode.SIGNALR:
            self._signalr_text(text)
        else:
            self._raw_text(text)

    def _raw_text(self, text: str) -> None:
        verdict = self._rate_verdict()
        if verdict is RateVerdict.ACCEPT:
            if self.connection is not None:
                self.connection.received(text)

    def onPing(self, payload: bytes) -> None:
        # WebSocket pings are client messages too: each is answered, so each is counted.
        if self.state == WebSocketServerProtocol.STATE_OPEN and self._rate_verdict() is RateVerdict.ACCEPT:
            self.sendPong(payload)

    def onPong(self, payload: bytes) -> None:
        if self.state == WebSocketServerProtocol.STATE_OPEN:
            self._rate_verdict()

    def _rate_verdict(self, cost: int = 1) -> RateVerdict:
        verdict = self.rate.check(cost) if self.rate is not None else RateVerdict.ACCEPT
        if verdict is RateVerdict.REFUSE_AND_WARN and self.connection is not None:
            self.connection.send_frame(error_frame(MsgErrorType.GENERAL_ERROR, RATE_WARNING))
        elif verdict is RateVerdict.DISCONNECT:
            log.warning("client floods; disconnecting", extra={"conn": self._conn_id()})
            self._close_with_error(CLOSE_POLICY_VIOLATION, "too many messages")
            self._stop_reading_and_drop()
        return verdict

    def _stop_reading_and_drop(self) -> None:
        """Read nothing more from a flooder (Autobahn would unmask and validate everything it keeps
        sending until the close handshake times out: a tenfold rise in other agents' latency was
        measured), and drop it once the close frame has had time to leave."""
        transport: Any = self.transport
        if transport is None:
            return
        transport.pauseProducing()
        _txaio.call_later(FLOODER_DROP_SECONDS, self.dropConnection, True)

    def _signalr_text(self, text: str) -> None:
        hub, keepalive = self.hub_protocol, self.keepalive
        if hub is None or keepalive is None:
            return
        keepalive.received(self.factory.clock())
        # Every record counts (pings, any invocation, the handshake), before any is parsed: a
        # message batching thousands of records costs its sender thousands of messages.
        records = text.count(signalr.RECORD_SEPARATOR)
        verdict = self._rate_verdict(max(1, records))
        if verdict is RateVerdict.DISCONNECT:
            return
        refused = verdict is not RateVerdict.ACCEPT
        if refused and records > 1:
            return  # dropped unread
        for event in hub.receive_text(text):
            if self.state != WebSocketServerProtocol.STATE_OPEN:
                return
            if isinstance(event, signalr.HandshakeCompleted):
                self._send_record(signalr.HANDSHAKE_OK)
                self._attach("signalr")
            elif isinstance(event, signalr.Invocation):
                if not refused:
                    self._invoke(event)
                elif event.invocation_id is not None:  # the client waits for an answer to each invoke
                    self._send_record(signalr.completion(event.invocation_id, error=RATE_WARNING))
            elif isinstance(event, signalr.HandshakeFailed):
                PROTOCOL_VIOLATIONS.labels(kind="signalr_handshake").inc()
                self._send_record(signalr.handshake_error(event.message))
                self._send_close(CLOSE_PROTOCOL_ERROR, "handshake failed")
            elif isinstance(event, signalr.ProtocolViolation):
                PROTOCOL_VIOLATIONS.labels(kind="signalr_record").inc()
                self._close_with_error(CLOSE_PROTOCOL_ERROR, event.message)
            elif isinstance(event, signalr.CloseReceived):
                self._send_close(CLOSE_NORMAL, "")
            # PingReceived: the keep-alive clock is already updated.

    def _invoke(self, invocation: signalr.Invocation) -> None:
        call = signalr.dispatch(invocation)
        if call.session_text is not None and self.connection is not None:
            self.connection.received(call.session_text)
        if call.reply is not None and self.state == WebSocketServerProtocol.STATE_OPEN:
            self._send_record(call.reply)

    def _max_message_size_exceeded(self, msg_size: int, max_msg_size: int, reason: str) -> None:
        # Autobahn closes with 1009 here; a SignalR client is told why first, in its own terms.
        OVERSIZED.inc()
        if self.mode is Mode.SIGNALR and self.state == WebSocketServerProtocol.STATE_OPEN:
            error = f"Connection closed with an error. A message is over {max_msg_size} bytes."
            self._send_record(signalr.close_record(error))
        super()._max_message_size_exceeded(msg_size, max_msg_size, reason)

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        self.factory.forget(self)
        connection, self.connection = self.connection, None
        if connection is not None:
            connection.lost()

    # ---- the node-wide sweep -------------------------------------------------------------------

    def sweep(self, now: float) -> None:
        if self.state != WebSocketServerProtocol.STATE_OPEN:
            return
        if self.connection is None:
            # No first message (raw) or no handshake record (SignalR) yet.
            limit = self.factory.policy.handshake_timeout_seconds
            if limit and now - self.opened_at > limit:
                PROTOCOL_VIOLATIONS.labels(kind="handshake_timeout").inc()
                self._close_with_error(CLOSE_POLICY_VIOLATION, "handshake timeout")
            return
        if self.keepalive is not None:
            verdict = self.keepalive.check(now)
            if verdict is signalr.KeepAliveVerdict.TIMED_OUT:
                log.info("SignalR client silent for %.0fs; closing", now - self.keepalive.last_received,
                         extra={"conn": self._conn_id()})
                self._close_with_error(CLOSE_GOING_AWAY, "client timeout", allow_reconnect=True)
            elif verdict is signalr.KeepAliveVerdict.SEND_PING:
                self._send_record(signalr.PING_RECORD)

    # ---- outbound ------------------------------------------------------------------------------

    def _send_record(self, record: str) -> None:
        if self.state == WebSocketServerProtocol.STATE_OPEN:
            self.sendMessage(record.encode("utf-8"), isBinary=False)
            if self.keepalive is not None:
                self.keepalive.sent(self.factory.clock())

    def _close_with_error(self, code: int, message: str, *, allow_reconnect: bool = False) -> None:
        if self.mode is Mode.SIGNALR and self.hub_protocol is not None:
            self._send_record(
                signalr.close_record(f"Connection closed with an error. {message}", allow_reconnect=allow_reconnect)
            )
        self._send_close(code, message)

    def _send_close(self, code: int, reason: str) -> None:
        # Autobahn's sendClose() only lets applications use 1000 and 3000-4999; the standard codes
        # a server owes its clients (1001 going away, 1008 policy, 1009 too big...) go this way.
        if self.state == WebSocketServerProtocol.STATE_OPEN:
            self.sendCloseFrame(code=code, reasonUtf8=_close_reason(reason), isReply=False)

    def _conn_id(self) -> str:
        return self.connection.conn_id if self.connection is not None else "-"

    # ---- IPushProducer, relayed to the connection ----------------------------------------------

    def pauseProducing(self) -> None:
        self._transport_paused = True
        if self.connection is not None:
            self.connection.pause()

    def resumeProducing(self) -> None:
        self._transport_paused = False
        if self.connection is not None:
            self.connection.resume()

    def stopProducing(self) -> None:
        pass

    # ---- FrameSink -----------------------------------------------------------------------------

    def write_text(self, text: str) -> None:
        if self.state != WebSocketServerProtocol.STATE_OPEN:
            return
        write_prepared(self, self.factory.prepared_for(text, self.mode))
        if self.keepalive is not None:
            self.keepalive.sent(self.factory.clock())

    def close(self, code: int, reason: str) -> None:
        if self.mode is Mode.SIGNALR and self.hub_protocol is not None:
            error = None if code in (CLOSE_NORMAL, CLOSE_GOING_AWAY) else reason
            self._send_record(signalr.close_record(error, allow_reconnect=code == CLOSE_GOING_AWAY))
        self._send_close(code, reason)

    def abort(self) -> None:
        self.dropConnection(abort=True)


class AgentServerFactory(WebSocketServerFactory):  # type: ignore[misc]
    protocol = AgentProtocol  # type: ignore[assignment]

    def __init__(
        self,
        hub: ConnectionHub,
        *,
        url: str,
        policy: AdmissionPolicy,
        tokens: ConnectionTokens,
        is_draining: Callable[[], bool] = lambda: False,
        ping_interval: float = 15.0,
        client_timeout: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        super().__init__(url)
        defer_debug_formatting()
        self.hub = hub
        self.policy = policy
        self.tokens = tokens
        self.is_draining = is_draining
        self.ping_interval = ping_interval
        self.client_timeout = client_timeout
        self.clock = clock
        self.wall_clock = wall_clock
        #: open sockets of either transport, including those not past their first message yet
        self.live: set[AgentProtocol] = set()
        # Deadlines and keep-alives are checked by one sweep, not a timer per socket, and each
        # tick visits one slice of the sockets, so idle sockets cost a few microseconds every few
        # seconds. Each socket is visited once per ``sweep_period``: short enough for the
        # tightest timing configured.
        timings = [t for t in (ping_interval / 3, client_timeout / 6, policy.handshake_timeout_seconds / 3) if t > 0]
        self.sweep_tick = 0.1 if min(timings, default=1.0) < 1.0 else 0.5
        self.sweep_period = max(self.sweep_tick, min([5.0, *timings]))
        slices = max(1, round(self.sweep_period / self.sweep_tick))
        self._slices: list[set[AgentProtocol]] = [set() for _ in range(slices)]
        self._next_slice = 0
        self._next_slot = 0
        self._sweeper = LoopingCall(self.sweep)
        self._emptied: asyncio.Future[None] | None = None
        #: per transport: frame text -> prepared message (see prepared_for)
        self._prepared: dict[Mode, dict[str, Any]] = {mode: {} for mode in Mode}
        self.setProtocolOptions(
            maxFramePayloadSize=policy.max_message_bytes,
            maxMessagePayloadSize=policy.max_message_bytes,
            autoPingInterval=30,
            autoPingTimeout=15,
            openHandshakeTimeout=10,
            closeHandshakeTimeout=3,
            failByDrop=False,
        )

    def admit_socket(self, protocol: AgentProtocol) -> None:
        self.live.add(protocol)
        self._slices[self._next_slot % len(self._slices)].add(protocol)
        self._next_slot += 1

    def sweep(self) -> None:
        """One tick: the next slice of sockets."""
        now = self.clock()
        chosen = self._slices[self._next_slice % len(self._slices)]
        self._next_slice += 1
        for protocol in list(chosen):
            try:
                protocol.sweep(now)
            except Exception:  # one broken socket must not stop keep-alives and deadlines for all
                log.exception("sweep failed for one socket", extra={"conn": protocol._conn_id()})

    def prepared_for(self, text: str, mode: Mode) -> Any:
        """One frame's bytes on the wire (an Autobahn ``PreparedMessage``) for one transport.

        A line event reaches every tab of the line one after another, as the same string objects
        (the session's :class:`FrameMemo`), so the SignalR wrapping, the UTF-8 encoding and the
        WebSocket framing are done once per frame per node, not once per agent. The cache is keyed
        by content (a string's hash is computed once and kept on the object) and only needs to
        outlive one event's fan-out, so it is small."""
        cache = self._prepared[mode]
        message = cache.get(text)
        if message is None:
            wire = signalr.server_message(text) if mode is Mode.SIGNALR else text
            message = self.prepareMessage(wire.encode("utf-8"), isBinary=False)
            cache[text] = message
            if len(cache) > PREPARED_CACHE_SIZE:
                del cache[next(iter(cache))]
        return message

    def forget(self, protocol: AgentProtocol) -> None:
        self.live.discard(protocol)
        for bucket in self._slices:
            bucket.discard(protocol)
        if not self.live and self._emptied is not None and not self._emptied.done():
            self._emptied.set_result(None)

    async def wait_until_empty(self, timeout: float) -> None:
        """Until every socket has closed, or ``timeout`` seconds (on drain)."""
        if not self.live:
            return
        self._emptied = asyncio.get_running_loop().create_future()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self._emptied

    def close_unattached(self, code: int, reason: str) -> None:
        """Sockets still before their first message or handshake: not in the hub, closed here on drain."""
        for protocol in list(self.live):
            if protocol.connection is None and protocol.state == WebSocketServerProtocol.STATE_OPEN:
                protocol._send_close(code, reason)

    def start_sweeping(self) -> None:
        if not self._sweeper.running:
            self._sweeper.start(self.sweep_tick, now=False)

    def stop_sweeping(self) -> None:
        if self._sweeper.running:
            self._sweeper.stop()
