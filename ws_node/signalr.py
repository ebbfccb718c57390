"""ASP.NET Core SignalR, JSON hub protocol over WebSockets, as Creatio 8.x's client speaks it (sans-I/O).

Theory of operation. Every WebSocket text message carries one or more records, each a JSON
object ending with the record separator 0x1E. The first record is the handshake request
``{"protocol":"json","version":N}``; the server answers ``{}`` (or ``{"error": ...}`` and closes).
After it, records have a numeric ``type``: 1 invocation, 3 completion, 6 ping, 7 close (2, 4, 5,
8, 9 exist for streaming and stateful reconnect, which this hub does not offer).

Creatio's channel (``Terrasoft.SignalRChannel``) invokes ``SendRawMessage(string)`` for every
command, ``SendMessage`` and ``Ping`` rarely, always with ``invoke``, so each carries an
``invocationId`` and waits for a completion. The server pushes ``ServerMessage`` with one string
argument: the same JSON event text the raw-WebSocket transport sends as a frame.

Both sides ping (type 6) when they have sent nothing for 15 s; each side drops a peer silent for
30 s. :class:`KeepAlive` decides that from an injected clock; :class:`HubConnection` turns text
into events and never touches a socket, so the adapter in ``websocket.py`` stays thin.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

RECORD_SEPARATOR = "\x1e"
HANDSHAKE_OK = "{}" + RECORD_SEPARATOR
PING_RECORD = '{"type":6}' + RECORD_SEPARATOR
SERVER_METHOD = "ServerMessage"
SUPPORTED_PROTOCOL = "json"
#: 1 is the JSON protocol; 2 only adds stateful-reconnect records, which are never negotiated here
SUPPORTED_VERSIONS = (1, 2)


class MessageType(enum.IntEnum):
    INVOCATION = 1
    STREAM_ITEM = 2
    COMPLETION = 3
    STREAM_INVOCATION = 4
    CANCEL_INVOCATION = 5
    PING = 6
    CLOSE = 7
    ACK = 8
    SEQUENCE = 9


# ---- events out of the parser --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class HandshakeCompleted:
    version: int


@dataclass(frozen=True, slots=True)
class HandshakeFailed:
    """Answer ``{"error": message}`` and close."""

    message: str


@dataclass(frozen=True, slots=True)
class Invocation:
    invocation_id: str | None
    target: str
    arguments: list[Any] = field(default_factory=list)
    streaming: bool = False


@dataclass(frozen=True, slots=True)
class PingReceived:
    pass


@dataclass(frozen=True, slots=True)
class CloseReceived:
    error: str | None


@dataclass(frozen=True, slots=True)
class ProtocolViolation:
    """The peer broke the protocol: send a close record with this error and close the socket."""

    message: str


HubEvent = HandshakeCompleted | HandshakeFailed | Invocation | PingReceived | CloseReceived | ProtocolViolation


class HubState(enum.Enum):
    AWAITING_HANDSHAKE = "awaiting-handshake"
    OPEN = "open"
    CLOSED = "closed"


def looks_like_handshake(text: str) -> bool:
    """Whether a first message on a socket without ``?id=`` is a SignalR handshake (``skipNegotiation``)
    rather than a raw Creatio command: the handshake is the only first message ending in 0x1E."""
    return text.rstrip(" \t\r\n").endswith(RECORD_SEPARATOR) and '"protocol"' in text


class HubConnection:
    """The receiving half of one SignalR connection: text in, :data:`HubEvent` s out.

    Records may span WebSocket messages, so an incomplete tail is kept, at most ``max_record_chars``
    of it; a longer record is a :class:`ProtocolViolation`, never an unbounded buffer.
    """

    def __init__(self, *, max_record_chars: int = 64 * 1024) -> None:
        self.state = HubState.AWAITING_HANDSHAKE
        self.version = 0
        self._max = max_record_chars
        self._tail = ""

    def receive_text(self, text: str) -> list[HubEvent]:
        if self.state is HubState.CLOSED:
            return []
        data = self._tail + text
        *records, self._tail = data.split(RECORD_SEPARATOR)
        if self._max and len(self._tail) > self._max:
            return self._fail(f"a record exceeds {self._max} characters")
        events: list[HubEvent] = []
        for record in records:
            if self._max and len(record) > self._max:
                return [*events, *self._fail(f"a record exceeds {self._max} characters")]
            event = self._handshake(record) if self.state is HubState.AWAITING_HANDSHAKE else self._message(record)
            if event is None:
                continue
            events.append(event)
            if isinstance(event, HandshakeFailed | ProtocolViolation | CloseReceived):
                self.state = HubState.CLOSED
                self._tail = ""
                break
        return events

    def _fail(self, message: str) -> list[HubEvent]:
        self.state = HubState.CLOSED
        self._tail = ""
        return [ProtocolViolation(message)]

    def _handshake(self, record: str) -> HubEvent:
        request = _json_object(record)
        if request is None:
            return HandshakeFailed("Handshake request is not a JSON object.")
        protocol, version = request.get("protocol"), request.get("version")
        if not isinstance(protocol, str) or isinstance(version, bool) or not isinstance(version, int):
            return HandshakeFailed("Handshake request needs a string 'protocol' and an integer 'version'.")
        if protocol != SUPPORTED_PROTOCOL:
            return HandshakeFailed(f"Requested protocol '{protocol[:40]}' is not available.")
        if version not in SUPPORTED_VERSIONS:
            return HandshakeFailed(f"The server does not support version {version} of the 'json' protocol.")
        self.state = HubState.OPEN
        self.version = version
        return HandshakeCompleted(version)

    def _message(self, record: str) -> HubEvent | None:
        message = _json_object(record)
        if message is None:
            return ProtocolViolation("A record is not a JSON object.")
        kind = message.get("type")
        if isinstance(kind, bool) or not isinstance(kind, int):
            return ProtocolViolation("A record has no integer 'type'.")
        if kind in (MessageType.INVOCATION, MessageType.STREAM_INVOCATION):
            target, arguments, invocation_id = message.get("target"), message.get("arguments", []), \
                message.get("invocationId")
            if not isinstance(target, str) or not target:
                return ProtocolViolation("An invocation has no 'target'.")
            if not isinstance(arguments, list):
                return ProtocolViolation("An invocation's 'arguments' is not an array.")
            if invocation_id is not None and not isinstance(invocation_id, str):
                return ProtocolViolation("An invocation's 'invocationId' is not a string.")
            streaming = kind == MessageType.STREAM_INVOCATION or bool(message.get("streamIds"))
            return Invocation(invocation_id, target, arguments, streaming)
        if kind == MessageType.PING:
            return PingReceived()
        if kind == MessageType.CLOSE:
            error = message.get("error")
            return CloseReceived(error if isinstance(error, str) else None)
        # Stream items, cancellations, client results, acks and sequences belong to features this
        # hub never offers; a well-behaved client does not send them, and ignoring them is harmless.
        return None


def _json_object(record: str) -> dict[str, Any] | None:
    try:
        value = json.loads(record)
    except (ValueError, RecursionError):
        return None
    return value if isinstance(value, dict) else None


# ---- records out ---------------------------------------------------------------------------------


def _record(payload: dict[str, Any]) -> str:
    # json.dumps escapes control characters, so 0x1E can never appear inside a record
    return json.dumps(payload, ensure_ascii=False, separators=(",", ":")) + RECORD_SEPARATOR


def handshake_error(message: str) -> str:
    return _record({"error": message})


def server_message(event_text: str) -> str:
    """A non-blocking invocation of the client's ``ServerMessage`` handler with the event as one string."""
    return _record({"type": int(MessageType.INVOCATION), "target": SERVER_METHOD, "arguments": [event_text]})


def completion(invocation_id: str, *, error: str | None = None) -> str:
    """A void method's completion carries no ``result``; a failed one carries ``error``."""
    payload: dict[str, Any] = {"type": int(MessageType.COMPLETION), "invocationId": invocation_id}
    if error is not None:
        payload["error"] = error
    return _record(payload)


def close_record(error: str | None = None, *, allow_reconnect: bool = False) -> str:
    payload: dict[str, Any] = {"type": int(MessageType.CLOSE)}
    if error is not None:
        payload["error"] = error
    if allow_reconnect:
        payload["allowReconnect"] = True
    return _record(payload)


# ---- the hub's methods -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class HubCall:
    """What one invocation amounts to: text for the agent session (if any) and the record to answer."""

    session_text: str | None
    reply: str | None


def dispatch(invocation: Invocation) -> HubCall:
    """The methods Creatio's client invokes. Names match case-insensitively, as in ASP.NET Core."""
    target = invocation.target.lower()
    reply_id = invocation.invocation_id

    def answer(error: str | None = None) -> str | None:
        return completion(reply_id, error=error) if reply_id is not None else None

    if invocation.streaming:
        return HubCall(None, answer(f"Streaming is not supported by method '{invocation.target[:60]}'."))
    if target == "sendrawmessage":
        text = _single_string(invocation.arguments)
        if text is None:
            return HubCall(None, answer("Failed to invoke 'SendRawMessage': it takes one string argument."))
        return HubCall(text, answer())
    if target == "sendmessage":
        if len(invocation.arguments) != 1:
            return HubCall(None, answer("Failed to invoke 'SendMessage': it takes one argument."))
        value = invocation.arguments[0]
        return HubCall(value if isinstance(value, str) else json.dumps(value, ensure_ascii=False), answer())
    if target == "ping":
        return HubCall(None, answer())
    return HubCall(None, answer(f"Unknown hub method '{invocation.target[:60]}'"))


def _single_string(arguments: Sequence[Any]) -> str | None:
    if len(arguments) == 1 and isinstance(arguments[0], str):
        return arguments[0]
    return None


# ---- keep-alive ------------------------------------------------------------------------------------


class KeepAliveVerdict(enum.Enum):
    IDLE = "idle"
    SEND_PING = "send-ping"
    TIMED_OUT = "timed-out"


class KeepAlive:
    """Ping after ``ping_interval`` seconds without sending; give up after ``client_timeout`` of silence."""

    __slots__ = ("ping_interval", "client_timeout", "last_received", "last_sent")  # one per connection

    def __init__(self, now: float, *, ping_interval: float = 15.0, client_timeout: float = 30.0) -> None:
        self.ping_interval = ping_interval
        self.client_timeout = client_timeout
        self.last_received = now
        self.last_sent = now

    def received(self, now: float) -> None:
        self.last_received = now

    def sent(self, now: float) -> None:
        self.last_sent = now

    def check(self, now: float) -> KeepAliveVerdict:
        if self.client_timeout and now - self.last_received >= self.client_timeout:
            return KeepAliveVerdict.TIMED_OUT
        if self.ping_interval and now - self.last_sent >= self.ping_interval:
            return KeepAliveVerdict.SEND_PING
        return KeepAliveVerdict.IDLE
