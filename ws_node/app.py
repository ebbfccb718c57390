"""The node process: Twisted's asyncio reactor, so Autobahn, aio-pika and redis.asyncio share
one loop. Start: Redis client, line feed (broker), HTTP+WebSocket listener; ready once the
broker is connected. Stop (SIGTERM): drain first: /health turns 503 and new sockets and
negotiations are refused, so HAProxy sends no new agents; open connections are closed at once
with 1001 (SignalR: a close record without error), so their clients reconnect elsewhere. Closing
at once matters: HAProxy cuts the tunnels of a server it marks down (on-marked-down
shutdown-sessions), about two health checks later, and a cut tunnel gives the client no close
frame. Then the node waits, up to ``drain_seconds``, for the close handshakes, and stops."""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis
from prometheus_client import Gauge

from services.config import Settings, redact_url
from services.topology import Topology
from ws_node.admission import AdmissionPolicy
from ws_node.agent_connection import ConnectionHub
from ws_node.agent_session import SessionOptions
from ws_node.client_logs import ClientLogStore
from ws_node.line_feed import LineFeed
from ws_node.signalr_token import ConnectionTokens, derive_secret
from ws_node.web import NegotiateResource, build_site
from ws_node.websocket import AgentServerFactory

log = logging.getLogger(__name__)

NODE_READY = Gauge("cms_node_ready", "1 when the node accepts agents (broker connected, not draining)")


@dataclass(frozen=True, slots=True)
class NodeOptions:
    host: str = "127.0.0.1"
    port: int = 2013
    node_id: str = ""
    admission: AdmissionPolicy = AdmissionPolicy()
    #: shared by every node of the cluster, so a SignalR token from one node is accepted by all
    signalr_token_secret: str = ""
    signalr_token_lifetime: float = 300.0
    signalr_ping_interval: float = 15.0
    signalr_client_timeout: float = 30.0
    max_backlog_frames: int = 2000
    drain_seconds: float = 3.0
    #: folder for agents' ProcessLogs/SetLogFilePath; empty = those commands are refused
    client_log_dir: str = ""

    def __repr__(self) -> str:  # the token secret never reaches a log through a repr
        return (
            f"NodeOptions(host={self.host!r}, port={self.port}, node_id={self.node_id!r}, "
            f"admission={self.admission!r}, token_secret={'set' if self.signalr_token_secret else 'derived'})"
        )


class Node:
    def __init__(self, settings: Settings, options: NodeOptions) -> None:
        self.settings = settings
        self.options = options
        self.node_id = options.node_id or uuid.uuid4().hex[:8]
        self.redis = aioredis.from_url(settings.cluster.redis_url)
        self.feed = LineFeed(
            self.node_id,
            settings.cluster.amqp_url,
            self.redis,
            Topology(settings.cluster.prefix),
            command_ttl_seconds=settings.cluster.command_ttl_seconds,
        )
        self.draining = False
        self.hub = ConnectionHub(
            self.feed,
            max_backlog_frames=options.max_backlog_frames,
            session_options={
                "originate_context": settings.asterisk.originate_context,
                "options": SessionOptions(
                    client_logs=bool(options.client_log_dir),
                    agent_codes=settings.agent_states,
                    line_protocols=tuple(t.strip() for t in settings.asterisk.protocol.split(",") if t.strip()),
                ),
            },
            client_logs=ClientLogStore(Path(options.client_log_dir)) if options.client_log_dir else None,
        )
        self.tokens = ConnectionTokens(
            derive_secret(options.signalr_token_secret, options.admission.deployment_key),
            lifetime_seconds=options.signalr_token_lifetime,
        )
        self.factory = AgentServerFactory(
            self.hub,
            url=f"ws://{options.host}:{options.port}",
            policy=options.admission,
            tokens=self.tokens,
            is_draining=lambda: self.draining,
            ping_interval=options.signalr_ping_interval,
            client_timeout=options.signalr_client_timeout,
        )
        self.negotiate = NegotiateResource(
            options.admission,
            self.tokens,
            open_connections=lambda: len(self.factory.live),
            is_draining=lambda: self.draining,
        )
        self._port: Any = None

    def health(self) -> tuple[bool, dict[str, Any]]:
        ok = self.feed.connected.is_set() and not self.draining
        NODE_READY.set(1 if ok else 0)
        return ok, {
            "node": self.node_id,
            "broker": "connected" if self.feed.connected.is_set() else "down",
            "draining": self.draining,
            "clients": len(self.hub.connections),
            "sockets": len(self.factory.live),
        }

    async def start(self) -> None:
        from twisted.internet import reactor as _reactor

        reactor: Any = _reactor

        await self.feed.start()
        site = build_site(self.factory, self.health, self.negotiate)
        self._port = reactor.listenTCP(self.options.port, site, interface=self.options.host)
        self.factory.start_sweeping()
        log.info(
            "node %s listening on %s:%d (broker %s)",
            self.node_id, self.options.host, self.listening_port, redact_url(self.settings.cluster.amqp_url),
        )

    @property
    def listening_port(self) -> int:
        return int(self._port.getHost().port) if self._port is not None else self.options.port

    async def drain_and_stop(self) -> None:
        self.draining = True
        NODE_READY.set(0)
        log.info("node %s draining: %d agents", self.node_id, len(self.hub.connections))
        self.hub.close_all(1001, "node restarting, reconnect")
        self.factory.close_unattached(1001, "node restarting, reconnect")
        await self.factory.wait_until_empty(max(0.5, self.options.drain_seconds))
        self.factory.stop_sweeping()
        if self._port is not None:
            await self._port.stopListening()
        await self.feed.stop()
        await self.redis.aclose()
