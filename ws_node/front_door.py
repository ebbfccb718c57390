"""The node's listening socket: each new connection's request head decides who takes it.

An agent's WebSocket upgrade goes straight to Autobahn, which parses the head once. Through
twisted.web it was parsed twice (``HTTPChannel`` into a ``Request``, then Autobahn's
``WebSocketResource`` serialised it again for Autobahn to parse) and cost a ``Request`` with its
header objects, timers and producer registration: 13.6 % of the survivor node's CPU in a
reconnect storm (docs/performance.md). Everything else (``/health``, ``/metrics``, the console,
the status page, SignalR's negotiate, and any head this module does not fully understand) goes to
twisted.web as before, with the bytes already read.

:func:`route_request` is the decision, pure and tested without sockets. It sends to Autobahn only
what twisted.web's ``AgentEndpoint`` would have sent there too, and only in the plainest form (a
``GET`` over HTTP/1.1, an origin-form path without percent escapes, no body, no folded header
lines); for anything else the old path answers, so no request gets a different answer than before.

The whole-request deadline (slowloris, ``http_deadline.py``) starts when the connection opens, here;
a head handed to twisted.web keeps what is left of it.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Collection
from typing import Any

from twisted.internet.protocol import Protocol, ServerFactory

from ws_node.http_deadline import BoundedHTTPChannel, abort_slow_request, cancel

#: twisted.web's own limits on a request head (``HTTPChannel.totalHeadersSize``, ``maxHeaders``): a
#: head past them goes to twisted.web, which refuses it as it always did
MAX_HEAD_BYTES = 16384
MAX_HEADER_LINES = 500


class Route(enum.Enum):
    MORE = "more"  # the head is not complete yet
    WEBSOCKET = "websocket"  # an agent socket: Autobahn takes the connection
    HTTP = "http"  # twisted.web takes the connection


def route_request(buffer: bytes, reserved: Collection[bytes]) -> Route:
    """Where the connection whose first bytes are ``buffer`` goes. ``reserved`` are the first path
    segments twisted.web serves itself (``health``, ``metrics``...)."""
    end = buffer.find(b"\r\n\r\n")
    if end < 0:
        if b"\n\n" in buffer or len(buffer) > MAX_HEAD_BYTES:
            return Route.HTTP  # a bare-LF head (Autobahn wants CRLF) or an oversized one
        return Route.MORE
    if end > MAX_HEAD_BYTES:
        return Route.HTTP
    lines = buffer[:end].split(b"\r\n")
    if len(lines) > MAX_HEADER_LINES + 1:
        return Route.HTTP
    parts = lines[0].split(b" ")
    if len(parts) != 3 or parts[0] != b"GET" or parts[2] != b"HTTP/1.1":
        return Route.HTTP
    path = parts[1].split(b"?", 1)[0]
    # twisted.web unquotes path segments before it looks up a child: leave escapes to it
    if not path.startswith(b"/") or b"%" in path:
        return Route.HTTP
    if path[1:].split(b"/", 1)[0] in reserved or path.rstrip(b"/").endswith(b"/negotiate"):
        return Route.HTTP
    upgrade: bytes | None = None
    for line in lines[1:]:
        name, colon, value = line.partition(b":")
        if not colon or not name or name[:1] in (b" ", b"\t") or name != name.rstrip():
            return Route.HTTP  # folded or malformed: twisted.web decides what that means
        name = name.lower()
        if name == b"upgrade":
            upgrade = value.strip()  # the last one counts, as with twisted's Request.getHeader
        elif name in (b"transfer-encoding", b"content-length"):
            # a body after the head is not frames; an upgrade has none, and twisted.web judges odd ones
            return Route.HTTP
    if upgrade is None or upgrade.lower() != b"websocket":
        return Route.HTTP
    return Route.WEBSOCKET


class FrontDoor(Protocol):
    """Holds a new connection until its request head is complete, then hands it over."""

    def __init__(self, factory: FrontDoorFactory) -> None:
        self.front = factory
        self._buffer = b""
        self._opened = 0.0
        self._deadline: Any = None

    def connectionMade(self) -> None:
        front = self.front
        self._opened = front.clock()
        if front.request_deadline > 0:
            self._deadline = front.call_later(front.request_deadline, self._expired)

    def dataReceived(self, data: bytes) -> None:
        buffer = self._buffer + data if self._buffer else data
        route = route_request(buffer, self.front.reserved)
        if route is Route.MORE:
            self._buffer = buffer
            return
        self._buffer = b""
        self._disarm()
        transport: Any = self.transport
        if route is Route.WEBSOCKET:
            self._hand_over(self.front.websocket.buildProtocol(transport.getPeer()), buffer)
        else:
            channel: Any = self.front.site.buildProtocol(transport.getPeer())
            if isinstance(channel, BoundedHTTPChannel):
                # the deadline started when the connection opened, not now
                elapsed = self.front.clock() - self._opened
                channel.first_deadline = max(0.001, channel.deadline_seconds - elapsed)
            self._hand_over(channel, buffer)

    def _hand_over(self, protocol: Any, buffer: bytes) -> None:
        transport: Any = self.transport
        if protocol is None:  # a factory that refuses (none of ours does)
            transport.abortConnection()
            return
        # The reactor calls whatever ``transport.protocol`` is: from here on it is the new owner.
        transport.protocol = protocol
        self.transport = None
        protocol.makeConnection(transport)
        protocol.dataReceived(buffer)

    def connectionLost(self, reason: Any = None) -> None:
        self._disarm()
        self._buffer = b""

    def _disarm(self) -> None:
        call, self._deadline = self._deadline, None
        cancel(call)

    def _expired(self) -> None:
        self._deadline = None
        abort_slow_request(self.transport, "request head", self.front.request_deadline)


class FrontDoorFactory(ServerFactory):
    """What the node listens with: agent upgrades to ``websocket`` (Autobahn's server factory),
    everything else to ``site`` (twisted.web, with its own deadline and idle timeout per request)."""

    noisy = False

    def __init__(
        self,
        websocket: Any,
        site: Any,
        *,
        reserved: Collection[bytes],
        request_deadline: float,
        clock: Callable[[], float] | None = None,
        call_later: Callable[..., Any] | None = None,
    ) -> None:
        from twisted.internet import reactor

        reactor_any: Any = reactor
        self.websocket = websocket
        self.site = site
        self.reserved = frozenset(reserved)
        self.request_deadline = request_deadline
        self.clock: Callable[[], float] = clock if clock is not None else reactor_any.seconds
        self.call_later: Callable[..., Any] = call_later if call_later is not None else reactor_any.callLater

    def buildProtocol(self, addr: Any) -> FrontDoor:
        return FrontDoor(self)

    def startFactory(self) -> None:
        # twisted.web's factory is never listened with now; it still needs its start (its access log)
        self.site.doStart()

    def stopFactory(self) -> None:
        self.site.doStop()
