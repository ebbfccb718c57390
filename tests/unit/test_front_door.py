"""The node's front door: which connections Autobahn takes straight away, and that it takes nothing
twisted.web would have answered otherwise; deadlines kept across the handover. No sockets."""

from __future__ import annotations

from typing import Any

import pytest
from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from ws_node.front_door import MAX_HEAD_BYTES, FrontDoorFactory, Route, route_request
from ws_node.http_deadline import SLOW_REQUESTS, BoundedHTTPChannel

RESERVED = frozenset({b"health", b"metrics", b"console", b"static", b"status"})
UPGRADE = b"Host: node\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n" \
          b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"


def head(target: bytes = b"/", headers: bytes = UPGRADE, method: bytes = b"GET", version: bytes = b"HTTP/1.1") -> bytes:
    return method + b" " + target + b" " + version + b"\r\n" + headers + b"\r\n"


@pytest.mark.parametrize(("data", "route"), [
    (head(), Route.WEBSOCKET),  # Creatio 7.x: ws://host:2013
    (head(b"/?key=abc"), Route.WEBSOCKET),
    (head(b"/hubs/telephony?id=tok"), Route.WEBSOCKET),  # SignalR after negotiate
    (head(headers=UPGRADE.replace(b"websocket", b"WebSocket")), Route.WEBSOCKET),
    (head(headers=UPGRADE + b"Content-Length: 0\r\n"), Route.HTTP),  # twisted.web refuses two of them
    (head()[:-2], Route.MORE),  # the blank line has not come yet
    (b"GE", Route.MORE),
    (head(b"/health"), Route.HTTP),  # reserved paths are twisted.web's, upgrade or not
    (head(b"/metrics/"), Route.HTTP),
    (head(b"/status?x=1"), Route.HTTP),
    (head(b"/hub/negotiate"), Route.HTTP),
    (head(b"/hub/negotiate/"), Route.HTTP),
    (head(b"/%68ealth"), Route.HTTP),  # twisted.web unquotes before it looks the child up
    (head(b"http://node/"), Route.HTTP),  # absolute form
    (head(method=b"POST"), Route.HTTP),
    (head(version=b"HTTP/1.0"), Route.HTTP),
    (head(headers=b"Host: node\r\n"), Route.HTTP),  # no upgrade: twisted.web answers 426
    (head(headers=UPGRADE + b"Upgrade: h2c\r\n"), Route.HTTP),  # the last one counts, as in getHeader
    (head(headers=b"Upgrade: h2c\r\n" + UPGRADE), Route.WEBSOCKET),
    (head(headers=UPGRADE.replace(b"websocket", b"websocket, h2c")), Route.HTTP),
    (head(headers=UPGRADE + b"Content-Length: 5\r\n"), Route.HTTP),  # a body: not frames
    (head(headers=UPGRADE + b"Transfer-Encoding: chunked\r\n"), Route.HTTP),
    (head(headers=UPGRADE + b" folded\r\n"), Route.HTTP),
    (head(headers=UPGRADE + b"NoColon\r\n"), Route.HTTP),
    (head(headers=UPGRADE + b"Bad Name : x\r\n"), Route.HTTP),
    (b"GET / HTTP/1.1\nUpgrade: websocket\n\n", Route.HTTP),  # bare LF: Autobahn wants CRLF
    (b"GET / HTTP/1.1\r\n" + b"X: " + b"y" * MAX_HEAD_BYTES, Route.HTTP),  # oversized, never ended
    (head(headers=UPGRADE + b"X: y\r\n" * 501), Route.HTTP),  # more header lines than twisted.web takes
])
def test_route(data: bytes, route: Route) -> None:
    assert route_request(data, RESERVED) is route


def test_bytes_after_the_head_go_with_it() -> None:
    # a client that sends its first frame without waiting for the 101: Autobahn gets it too
    assert route_request(head() + b"\x81\x85" + b"x" * 9, RESERVED) is Route.WEBSOCKET


# ---- agreement with twisted.web: what we send to Autobahn, twisted.web sent there too ----------


class _Decision(Resource):
    """Records what ``web.AgentEndpoint`` would do with the request (and under which child)."""

    isLeaf = True

    def __init__(self, log: list[tuple[str, bytes]], child: bytes) -> None:
        super().__init__()
        self.log, self.child = log, child

    def render(self, request: Request) -> bytes:
        upgrade = request.getHeader(b"upgrade") or b""
        negotiate = request.path.rstrip(b"/").endswith(b"/negotiate")
        kind = "websocket" if upgrade.lower() == b"websocket" and not negotiate and not self.child else "other"
        self.log.append((kind, request.method))
        return b""


class _Root(Resource):
    def __init__(self, log: list[tuple[str, bytes]]) -> None:
        super().__init__()
        self.endpoint = _Decision(log, b"")
        for name in RESERVED:
            self.putChild(name, _Decision(log, name))

    def getChild(self, path: bytes, request: Request) -> Resource:
        return self.endpoint


def twisted_web_decision(data: bytes) -> list[tuple[str, bytes]]:
    log: list[tuple[str, bytes]] = []
    site = Site(_Root(log), reactor=MemoryReactorClock())
    channel = site.buildProtocol(None)
    channel.makeConnection(StringTransport())
    channel.dataReceived(data)
    return log


_paths = st.sampled_from([b"/", b"/hub", b"/health", b"/health/x", b"/a/negotiate", b"/a/negotiate/",
                          b"/%68ealth", b"/x%2Fy", b"//health", b"/?id=1", b"/hub?negotiate=1", b"*", b"/status"])
_header_lines = st.lists(st.sampled_from([
    b"Upgrade: websocket", b"Upgrade:websocket", b"upgrade: WEBSOCKET ", b"Upgrade: h2c", b"Upgrade: websocket, x",
    b"Connection: Upgrade", b"Host: node", b"Content-Length: 0", b"Content-Length: 3", b"Transfer-Encoding: chunked",
    b"X-Forwarded-For: 10.0.0.1", b" folded", b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
]), max_size=6)


@settings(max_examples=500, deadline=None)
@given(method=st.sampled_from([b"GET"] * 4 + [b"POST", b"HEAD", b"get"]), path=_paths, lines=_header_lines,
       version=st.sampled_from([b"HTTP/1.1"] * 3 + [b"HTTP/1.0"]), at=st.integers(min_value=0, max_value=6))
def test_what_goes_to_autobahn_would_have_gone_to_its_resource(
    method: bytes, path: bytes, lines: list[bytes], version: bytes, at: int
) -> None:
    lines.insert(at, b"Upgrade: websocket")  # most heads are upgrades: the cases worth checking
    data = method + b" " + path + b" " + version + b"\r\n" + b"".join(line + b"\r\n" for line in lines) + b"\r\n"
    if route_request(data, RESERVED) is Route.WEBSOCKET:
        assert twisted_web_decision(data) == [("websocket", b"GET")]


@settings(max_examples=200, deadline=None)
@given(cuts=st.lists(st.integers(min_value=1, max_value=len(head()) - 1), max_size=5, unique=True))
def test_a_head_in_pieces_routes_as_a_whole(cuts: list[int]) -> None:
    data = head()
    pieces = [data[a:b] for a, b in zip([0, *sorted(cuts)], [*sorted(cuts), len(data)], strict=True)]
    seen = b""
    for piece in pieces[:-1]:
        seen += piece
        assert route_request(seen, RESERVED) is Route.MORE
    assert route_request(seen + pieces[-1], RESERVED) is Route.WEBSOCKET


# ---- the protocol: handover and deadlines ----------------------------------------------------


class _Health(Resource):
    isLeaf = True

    def render_GET(self, request: Request) -> bytes:
        return b"healthy"


class _Echo(WebSocketServerProtocol):  # type: ignore[misc]
    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        self.sendMessage(payload, isBinary)


class _Transport(StringTransport):  # type: ignore[misc]
    protocol: Any = None


def front(deadline: float = 10.0) -> tuple[FrontDoorFactory, MemoryReactorClock]:
    clock = MemoryReactorClock()
    root = Resource()
    root.putChild(b"health", _Health())
    site = Site(root, reactor=clock)
    site_any: Any = site
    site_any.protocol = lambda: BoundedHTTPChannel(deadline)
    websocket = WebSocketServerFactory("ws://node")
    websocket.protocol = _Echo
    return FrontDoorFactory(websocket, site, reserved=[b"health"], request_deadline=deadline,
                            clock=clock.seconds, call_later=clock.callLater), clock


def connect(factory: FrontDoorFactory) -> tuple[Any, _Transport]:
    protocol = factory.buildProtocol(None)
    transport = _Transport()
    transport.protocol = protocol
    protocol.makeConnection(transport)
    return protocol, transport


def test_an_upgrade_is_handed_to_autobahn_which_answers_it() -> None:
    factory, _clock = front()
    _door, transport = connect(factory)
    transport.protocol.dataReceived(head()[:20])
    transport.protocol.dataReceived(head()[20:])
    assert isinstance(transport.protocol, _Echo)
    assert transport.value().startswith(b"HTTP/1.1 101 Switching Protocols\r\n")


def test_health_is_handed_to_twisted_web() -> None:
    factory, _clock = front()
    _door, transport = connect(factory)
    transport.protocol.dataReceived(b"GET /health HTTP/1.1\r\nHost: node\r\n\r\n")
    assert isinstance(transport.protocol, BoundedHTTPChannel)
    assert b"200 OK" in transport.value() and transport.value().endswith(b"healthy")


def test_a_head_that_never_ends_is_cut_at_the_deadline_and_counted() -> None:
    factory, clock = front(10.0)
    _door, transport = connect(factory)
    before = SLOW_REQUESTS._value.get()
    for _ in range(9):  # a header line a second
        clock.advance(1)
        transport.protocol.dataReceived(b"X-Slow: y\r\n")
    assert not transport.disconnecting
    clock.advance(1.1)
    assert transport.disconnecting
    assert SLOW_REQUESTS._value.get() == before + 1


def test_twisted_web_gets_only_what_is_left_of_the_deadline() -> None:
    factory, clock = front(10.0)
    _door, transport = connect(factory)
    clock.advance(6)
    # a complete head, then a body dribbled: the deadline still ends 10 s after the connection opened
    transport.protocol.dataReceived(b"POST /health HTTP/1.1\r\nHost: node\r\nContent-Length: 100\r\n\r\n")
    assert isinstance(transport.protocol, BoundedHTTPChannel)
    clock.advance(3.9)
    assert not transport.disconnecting
    clock.advance(0.2)
    assert transport.disconnecting


def test_an_upgraded_connection_has_no_request_deadline_left() -> None:
    factory, clock = front(10.0)
    _door, transport = connect(factory)
    transport.protocol.dataReceived(head())
    assert not clock.getDelayedCalls() or all(
        call.getTime() != 10.0 for call in clock.getDelayedCalls()
    )  # the door's own timer is gone; Autobahn's handshake timers are its own
    clock.advance(11)
    assert not transport.disconnecting


def test_a_connection_closed_before_its_head_leaves_no_timer() -> None:
    factory, clock = front(10.0)
    door, transport = connect(factory)
    transport.protocol.dataReceived(b"GET / HTT")
    door.connectionLost(None)
    assert clock.getDelayedCalls() == []
