"""The node process: Twisted's asyncio reactor, so Autobahn, aio-pika and redis.asyncio share
one loop. Start: Redis client, line feed (broker), HTTP+WebSocket listener; ready once the
broker is connected. Stop (SIGTERM): drain first: /health turns 503 so HAProxy sends no new
agents, then open connections are closed with 1001 so their clients reconnect elsewhere."""

from __future__ import annotations

import asyncio
import logging
import uuid
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from prometheus_client import Gauge

from services.config import Settings, redact_url
from services.topology import Topology
from ws_node.agent_connection import ConnectionHub
from ws_node.line_feed import LineFeed
from ws_node.web import build_site
from ws_node.websocket import AgentServerFactory

log = logging.getLogger(__name__)

NODE_READY = Gauge("cms_node_ready", "1 when the node accepts agents (broker connected, not draining)")


@dataclass(frozen=True, slots=True)
class NodeOptions:
    host: str = "127.0.0.1"
    port: int = 2013
    node_id: str = ""
    deployment_key: str = ""
    allowed_origins: tuple[str, ...] = ()
    drain_seconds: float = 3.0


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
        self.hub = ConnectionHub(self.feed, session_options={"originate_context": settings.asterisk.originate_context})
        self.factory = AgentServerFactory(
            self.hub,
            url=f"ws://{options.host}:{options.port}",
            deployment_key=options.deployment_key,
            allowed_origins=options.allowed_origins,
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
        }

    async def start(self) -> None:
        from twisted.internet import reactor as _reactor

        reactor: Any = _reactor

        await self.feed.start()
        site = build_site(self.factory, self.health)
        self._port = reactor.listenTCP(self.options.port, site, interface=self.options.host)
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
        if self.hub.connections:
            await asyncio.sleep(self.options.drain_seconds)
        self.hub.close_all(1001, "node restarting, reconnect")
        await asyncio.sleep(0.5)
        if self._port is not None:
            await self._port.stopListening()
        await self.feed.stop()
        await self.redis.aclose()
