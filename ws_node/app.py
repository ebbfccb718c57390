"""The node process: Twisted's asyncio reactor, so Autobahn, aio-pika and redis.asyncio share
one loop. Start: Redis client, line feed (broker), HTTP+WebSocket listener; ready once the
broker is connected for the first time; a broker or Redis outage after that keeps the node
ready (it rides it out, see line_feed). Stop (SIGTERM): drain first: /health turns 503 and new sockets and
negotiations are refused, so HAProxy sends no new agents; open connections are closed at once
with 1001 (SignalR: a close record without error), so their clients reconnect elsewhere. Closing
at once matters: HAProxy cuts the tunnels of a server it marks down (on-marked-down
shutdown-sessions), about two health checks later, and a cut tunnel gives the client no close
frame. Then the node waits, up to ``drain_seconds``, for the close handshakes, and stops."""

from __future__ import annotations

import asyncio
import logging
import socket
import time
import uuid
from dataclasses import dataclass
from typing import Any

from prometheus_client import Gauge

from services.broker import Broker
from services.config import Settings, redact_url
from services.heartbeat import Heartbeat
from services.line_state import LineStateReader
from services.topology import Topology
from ws_node.admission import AdmissionPolicy, CommandLimiter, DebugBudget, parse_command_limits
from ws_node.agent_connection import ConnectionHub
from ws_node.agent_session import SessionOptions
from ws_node.line_feed import LineFeed, RabbitNodeBus
from ws_node.redis_pool import node_redis_client
from ws_node.signalr_token import ConnectionTokens, derive_secret
from ws_node.status_page import StatusCollector, StatusPageResource
from ws_node.web import NegotiateResource, build_front_door, build_site
from ws_node.websocket import AgentServerFactory

log = logging.getLogger(__name__)

NODE_READY = Gauge("cms_node_ready", "1 when the node accepts agents (started and not draining)")


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
    #: /status needs this token when set (else the deployment key, when set)
    admin_token: str = ""
    #: the name other nodes reach this node's /metrics and /health by (default: host, or this
    #: machine's name when listening on every address)
    advertise_host: str = ""
    #: per-line/per-user command budgets over the defaults, ``kind=burst:per_minute,...`` (admission.py)
    command_limits: str = ""
    #: connections the kernel queues until the node accepts them (Twisted's default is 50; the bare server in
    #: bench/ uses 1,024). A killed node's agents arrive through HAProxy by the thousand within a second: past
    #: the backlog their SYNs, HAProxy's health checks among them, are dropped and retried a second later, and
    #: two missed checks make HAProxy cut every agent of this node as well.
    listen_backlog: int = 1024

    def __repr__(self) -> str:  # the token secret never reaches a log through a repr
        return (
            f"NodeOptions(host={self.host!r}, port={self.port}, node_id={self.node_id!r}, "
            f"admission={self.admission!r}, token_secret={'set' if self.signalr_token_secret else 'derived'}, "
            f"admin_token={'set' if self.admin_token else 'none'})"
        )


class Node:
    def __init__(self, settings: Settings, options: NodeOptions) -> None:
        self.settings = settings
        self.options = options
        self.node_id = options.node_id or uuid.uuid4().hex[:8]
        # Bounded waits: a Redis that stops answering (not just refusing) must not freeze the
        # event loop's catch-ups or snapshots; live events never wait for Redis.
        # A reconnect storm asks for hundreds of snapshots at once: they queue for a connection, never fail.
        self.redis = node_redis_client(settings.cluster.redis_url, max_connections=64, pool_wait_seconds=5.0,
                                       socket_timeout=5.0, socket_connect_timeout=3.0)
        self.feed = LineFeed(
            self.node_id,
            RabbitNodeBus(Broker(settings.cluster.broker_urls, name=f"node {self.node_id}"),
                          Topology(settings.cluster.prefix), self.node_id),
            LineStateReader(self.redis, settings.cluster.prefix),
            command_ttl_seconds=settings.cluster.command_ttl_seconds,
        )
        self.draining = False
        security = settings.security
        self.hub = ConnectionHub(
            self.feed,
            self.redis,
            settings.cluster.prefix,
            max_backlog_frames=options.max_backlog_frames,
            session_options=SessionOptions(
                asterisk=settings.asterisk, security=security,
                debug_budget=DebugBudget(security.debug_lines_per_minute, security.debug_max_chars, time.monotonic),
                agent_codes=settings.agent_states,
                line_protocols=tuple(t.strip() for t in settings.asterisk.protocol.split(",") if t.strip()),
            ),
            security=security,
            command_limiter=CommandLimiter(parse_command_limits(options.command_limits), time.monotonic),
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
        self.status = StatusCollector(self.redis, settings.cluster.prefix, self.node_id, own_record=self._describe)
        self.heartbeat = Heartbeat(self.redis, settings.cluster.prefix, "node", self.node_id, self._describe)
        self._port: Any = None
        self._advertised: str | None = None

    def _base_url(self) -> str:
        # Computed once: getfqdn() may ask DNS, and the heartbeat runs on the reactor's loop.
        if self._advertised is None:
            host = self.options.advertise_host or self.options.host
            if host in ("", "0.0.0.0", "::"):
                host = socket.getfqdn()
            self._advertised = f"http://{f'[{host}]' if ':' in host else host}:{self.listening_port}"
        return self._advertised

    def _describe(self) -> dict[str, Any]:
        """This node's heartbeat record (services/heartbeat.py): where its metrics are, and its state."""
        base = self._base_url()
        return {"metrics_url": f"{base}/metrics", "health_url": f"{base}/health", "status_url": f"{base}/status",
                "draining": self.draining}

    def health(self) -> tuple[bool, dict[str, Any]]:
        """200 unless this node itself cannot serve: draining, not started yet (no broker
        connection ever), or its feed stopped. A broker or Redis outage later is shared by every
        node: answering 503 then would make HAProxy mark all nodes down and cut every agent's
        tunnel, for nothing. Sessions stay open, the feed reconnects and repairs; the body and
        metrics say so."""
        ok = self.feed.ever_connected and self.feed.running and not self.draining
        NODE_READY.set(1 if ok else 0)
        return ok, {
            "node": self.node_id,
            "broker": "connected" if self.feed.connected.is_set() else "down",
            "redis": "ok" if self.feed.redis_available else "failing",
            "draining": self.draining,
            "feed": "running" if self.feed.running else "stopped",
            "clients": len(self.hub.connections),
            "sockets": len(self.factory.live),
        }

    async def start(self) -> None:
        from twisted.internet import reactor as _reactor

        reactor: Any = _reactor

        await self.feed.start()
        status = StatusPageResource(self.status, self.options.admin_token, self.options.admission.deployment_key)
        front = build_front_door(self.factory, build_site(self.factory, self.health, self.negotiate, status=status))
        self._port = reactor.listenTCP(self.options.port, front, interface=self.options.host,
                                       backlog=self.options.listen_backlog)
        self.factory.start_sweeping()
        self.heartbeat.start()
        self.status.start()
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
        await self.status.stop()
        await self.heartbeat.stop()
        if self._port is not None:
            stopped = self._port.stopListening()
            if stopped is not None:
                # A Deferred: awaited directly in an asyncio task it failed the drain ("Task got bad yield"),
                # and the feed and Redis were never closed.
                await stopped.asFuture(asyncio.get_running_loop())
        await self.feed.stop()
        await self.redis.aclose()
