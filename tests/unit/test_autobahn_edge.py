"""ws_node/autobahn_edge.py against the installed Autobahn: fails when an upgrade moves what it relies on."""

from __future__ import annotations

import base64
import os
from pprint import pformat
from typing import Any

from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.websocket import protocol as autobahn_protocol
from twisted.internet.testing import StringTransport

from ws_node.autobahn_edge import defer_debug_formatting, missing_internals, stop_auto_ping, write_prepared


def open_connection() -> tuple[Any, StringTransport, Any]:
    """A real Autobahn server protocol after a real opening handshake, writing to memory."""
    factory = WebSocketServerFactory("ws://127.0.0.1:9000")
    factory.setProtocolOptions(autoPingInterval=30, autoPingTimeout=15)
    protocol: Any = WebSocketServerProtocol()
    protocol.factory = factory
    transport = StringTransport()
    protocol.makeConnection(transport)
    key = base64.b64encode(os.urandom(16)).decode()
    protocol.dataReceived(
        "GET / HTTP/1.1\r\nHost: 127.0.0.1:9000\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
    )
    assert protocol.state == WebSocketServerProtocol.STATE_OPEN
    transport.clear()
    return protocol, transport, factory


def test_nothing_we_rely_on_is_missing() -> None:
    protocol, _, factory = open_connection()
    assert missing_internals(protocol, factory.prepareMessage(b"x", isBinary=False)) == []
    stop_auto_ping(protocol)


def test_the_fast_write_puts_autobahns_own_bytes_on_the_wire() -> None:
    protocol, transport, factory = open_connection()
    message = factory.prepareMessage("événement".encode(), isBinary=False)
    protocol.sendPreparedMessage(message)
    autobahns, counted = transport.value(), protocol.trafficStats.outgoingOctetsWireLevel
    transport.clear()
    write_prepared(protocol, message)
    assert transport.value() == autobahns == b"\x81\x0b" + "événement".encode()
    assert protocol.trafficStats.outgoingOctetsWireLevel == 2 * counted
    stop_auto_ping(protocol)


def test_stop_auto_ping_cancels_the_pending_ping() -> None:
    protocol, _, _ = open_connection()
    pending = protocol.autoPingPendingCall
    assert pending is not None  # Autobahn armed it at open, as configured
    stop_auto_ping(protocol)
    assert protocol.autoPingInterval == 0 and protocol.autoPingPendingCall is None


def test_debug_formatting_is_deferred_once() -> None:
    original = autobahn_protocol.pformat
    try:
        autobahn_protocol.pformat = pformat
        defer_debug_formatting()
        replaced = autobahn_protocol.pformat
        assert replaced is not pformat
        assert replaced({"a": 1}) == "(not formatted: autobahn debug logging is off)"
        defer_debug_formatting()
        assert autobahn_protocol.pformat is replaced
    finally:
        autobahn_protocol.pformat = original
