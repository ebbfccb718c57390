"""Autobahn/Twisted adapter for the raw-WebSocket transport (Creatio 7.x: ``ws://host:2013``).

It only admits or refuses the handshake, moves text frames between the socket and an
:class:`AgentConnection`, and relays Twisted's producer calls (``pauseProducing`` when the
kernel buffer is full) so the connection can apply its bounded backlog.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.websocket.types import ConnectionDeny, ConnectionRequest
from prometheus_client import Counter

from ws_node.agent_connection import AgentConnection, ConnectionHub

log = logging.getLogger(__name__)

BAD_REQUESTS = Counter("cms_node_rejected_connections_total", "Connections refused at the handshake", ["reason"])


class AgentProtocol(WebSocketServerProtocol):  # type: ignore[misc]
    factory: AgentServerFactory

    def __init__(self) -> None:
        super().__init__()
        self.connection: AgentConnection | None = None

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
        self.connection = AgentConnection(self.factory.hub, self, "websocket")

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        if self.connection is None:
            return
        self.connection.received(payload.decode("utf-8", errors="replace"))

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        connection, self.connection = self.connection, None
        if connection is not None:
            connection.lost()

    # ---- IPushProducer, relayed to the connection ----------------------------------------------

    def pauseProducing(self) -> None:
        if self.connection is not None:
            self.connection.pause()

    def resumeProducing(self) -> None:
        if self.connection is not None:
            self.connection.resume()

    def stopProducing(self) -> None:
        pass

    # ---- FrameSink -----------------------------------------------------------------------------

    def write_text(self, text: str) -> None:
        if self.state == WebSocketServerProtocol.STATE_OPEN:
            self.sendMessage(text.encode("utf-8"), isBinary=False)

    def close(self, code: int, reason: str) -> None:
        self.sendClose(code=code, reason=reason)

    def abort(self) -> None:
        self.dropConnection(abort=True)


class AgentServerFactory(WebSocketServerFactory):  # type: ignore[misc]
    protocol = AgentProtocol  # type: ignore[assignment]

    def __init__(
        self,
        hub: ConnectionHub,
        *,
        url: str,
        deployment_key: str = "",
        allowed_origins: tuple[str, ...] = (),
        max_message_bytes: int = 64 * 1024,
        is_draining: Callable[[], bool] = lambda: False,
    ) -> None:
        super().__init__(url)
        self.hub = hub
        self.deployment_key = deployment_key
        self.allowed_origins = allowed_origins
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
        if self.allowed_origins and request.origin and request.origin != "null":
            if request.origin not in self.allowed_origins:
                return 403, "origin not allowed"
        return None
