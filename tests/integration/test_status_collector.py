"""The status collector over real sockets: processes registered in the real Redis, their /metrics
and /health served by the observability server every gateway runs (with a registry of its own
here), one of them gone, and Redis itself unreachable."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import redis.asyncio as aioredis
from prometheus_client import CollectorRegistry, Counter, Gauge

from local_cluster.infra import Infrastructure, free_port
from services.heartbeat import Heartbeat
from services.observability import ObservabilityServer
from ws_node.status_page import StatusCollector

pytestmark = pytest.mark.integration


def process_metrics(kind: str) -> CollectorRegistry:
    registry = CollectorRegistry()
    if kind == "gateway":
        Gauge("cms_ami_connected", "x", registry=registry).set(1)
        Gauge("cms_calls_in_progress", "x", registry=registry).set(2)
        Counter("cms_call_events_published_total", "x", registry=registry).inc(7)
    else:
        Gauge("cms_node_ready", "x", registry=registry).set(1)
        Gauge("cms_node_clients", "x", ["transport"], registry=registry).labels(transport="raw").set(4)
        Gauge("cms_node_lines_bound", "x", registry=registry).set(3)
        Counter("cms_broker_errors_total", "x", registry=registry).inc(1)
    return registry


async def serve(kind: str, healthy: bool = True) -> ObservabilityServer:
    details: dict[str, Any] = {"broker": "connected"} if kind == "node" else {"ami": "connected"}
    server = ObservabilityServer("127.0.0.1", 0, lambda: (healthy, details), process_metrics(kind))
    await server.start()
    return server


def urls(server: ObservabilityServer) -> dict[str, Any]:
    return {"metrics_url": f"http://127.0.0.1:{server.port}/metrics",
            "health_url": f"http://127.0.0.1:{server.port}/health"}


def test_collector_reads_every_registered_process(infra: Infrastructure, prefix: str) -> None:
    async def go() -> None:
        redis = aioredis.from_url(infra.redis_url)
        gateway, node_a, node_b = await serve("gateway"), await serve("node"), await serve("node", healthy=False)
        beats = [
            Heartbeat(redis, prefix, "gateway", "g1", lambda: {**urls(gateway), "role": "active"}, interval=0.2),
            Heartbeat(redis, prefix, "node", "a", lambda: urls(node_a), interval=0.2),
            Heartbeat(redis, prefix, "node", "b", lambda: urls(node_b), interval=0.2),
        ]
        try:
            for beat in beats:
                await beat.beat()
            collector = StatusCollector(redis, prefix, "a")
            data = await collector.snapshot()
            assert data["redis"]["state"] == "connected"
            [g] = data["gateways"]
            assert (g["id"], g["state"], g["ami"], g["calls_in_progress"]) == ("g1", "up", "connected", 2)
            nodes = {n["id"]: n for n in data["nodes"]}
            assert nodes["a"]["state"] == "up" and nodes["a"]["agents"] == 4 and nodes["a"]["lines"] == 3
            assert nodes["b"]["state"] == "unhealthy"
            assert data["totals"]["agents"] == 8 and data["totals"]["cms_broker_errors_total"] == 2
            assert data["warnings"] == []

            # node b's server goes away while its record is still fresh: unreachable, not up
            await node_b.stop()
            collector.reuse_seconds = 0
            data = await collector.snapshot()
            b = next(n for n in data["nodes"] if n["id"] == "b")
            assert b["state"] == "unreachable" and "/metrics" in b["error"]
        finally:
            for server in (gateway, node_a, node_b):
                await server.stop()
            keys = [k async for k in redis.scan_iter(f"{prefix}:*")]
            if keys:
                await redis.delete(*keys)
            await redis.aclose()

    asyncio.run(go())


def test_redis_unreachable_still_shows_this_node(prefix: str) -> None:
    async def go() -> None:
        own = await serve("node")
        redis = aioredis.from_url(f"redis://127.0.0.1:{free_port()}/0", socket_connect_timeout=0.5)
        try:
            collector = StatusCollector(redis, prefix, "me", own_record=lambda: urls(own))
            data = await collector.snapshot()
            assert data["redis"]["state"] == "unreachable"
            [me] = data["nodes"]
            assert me["id"] == "me" and me["state"] == "up" and me["agents"] == 4
            assert any(w.startswith("Redis unreachable") for w in data["warnings"])
        finally:
            await own.stop()
            await redis.aclose()

    asyncio.run(go())
