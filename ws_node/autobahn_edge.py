"""Every place the node reaches past Autobahn's public API, in one module.

Three measured costs made us do it (docs/performance.md); each function says what Autobahn does
instead and why that is too slow or wrong for us. :func:`missing_internals` lists what of Autobahn's
insides these functions rely on that a given Autobahn no longer has; tests/unit/test_autobahn_edge.py
runs it, and checks the bytes written, against the installed Autobahn, so an upgrade that changes
them fails there rather than in production.
"""

from __future__ import annotations

from pprint import pformat
from typing import Any

import txaio
from autobahn.websocket import protocol as _protocol_module

__all__ = ["defer_debug_formatting", "missing_internals", "stop_auto_ping", "write_prepared"]

_txaio: Any = txaio  # untyped at run time (framework chosen by autobahn.twisted)
_autobahn_protocol: Any = _protocol_module

#: attributes of an open WebSocketProtocol that write_prepared and stop_auto_ping read or write
PROTOCOL_INTERNALS = ("_perMessageCompress", "send_queue", "logOctets", "trafficStats", "autoPingInterval",
                      "autoPingPendingCall")


def _pformat_if_debugging(obj: object, *args: Any, **kwargs: Any) -> str:
    """Autobahn's ``pformat`` for its debug lines, done only when debug logging is on."""
    if _txaio.get_global_log_level() in ("debug", "trace"):
        return pformat(obj, *args, **kwargs)
    return "(not formatted: autobahn debug logging is off)"


def defer_debug_formatting() -> None:
    """``WebSocketProtocol._connectionMade`` pretty-prints its ~40 options for a debug line on every
    connection, and ``startHandshake`` its transport details, before the logger can decide to drop the
    line: about a tenth of a handshake's CPU with debug logging off. Replaces the ``pformat`` of
    Autobahn's protocol module with one that formats only when debugging (idempotent)."""
    if _autobahn_protocol.pformat is pformat:
        _autobahn_protocol.pformat = _pformat_if_debugging


def write_prepared(protocol: Any, message: Any) -> None:
    """Send a ``PreparedMessage`` on an open connection.

    What ``sendPreparedMessage`` -> ``sendData`` does for an unqueued, uncompressed frame, without its
    debug line: that one formats the method name and the peer eagerly for every frame (a sizeable share
    of fan-out CPU) even with debug logging off. Anything else (compression, a send queue, octet
    logging) goes through Autobahn."""
    if protocol._perMessageCompress is None and not protocol.send_queue and not protocol.logOctets:
        data = message.payloadHybi
        protocol.transport.write(data)
        protocol.trafficStats.outgoingOctetsWireLevel += len(data)
    else:
        protocol.sendPreparedMessage(message)


def stop_auto_ping(protocol: Any) -> None:
    """Turn off WebSocket-level pings on an open connection (SignalR's own pings keep it alive, and both
    would only double the idle traffic). Autobahn sets them per factory, before the connection exists."""
    protocol.autoPingInterval = 0
    if protocol.autoPingPendingCall is not None:
        protocol.autoPingPendingCall.cancel()
        protocol.autoPingPendingCall = None


def missing_internals(protocol: Any, message: Any) -> list[str]:
    """What of the above an open ``protocol`` and a ``PreparedMessage`` of this Autobahn lack."""
    missing = [f"protocol.{name}" for name in PROTOCOL_INTERNALS if not hasattr(protocol, name)]
    if hasattr(protocol, "trafficStats") and not hasattr(protocol.trafficStats, "outgoingOctetsWireLevel"):
        missing.append("protocol.trafficStats.outgoingOctetsWireLevel")
    if not hasattr(message, "payloadHybi"):
        missing.append("PreparedMessage.payloadHybi")
    if not callable(getattr(_autobahn_protocol, "pformat", None)):
        missing.append("autobahn.websocket.protocol.pformat")
    return missing
