"""What every stage gets: sizes (full or quick), where RabbitMQ/Redis are, where to write, the profiler."""

from __future__ import annotations

import json
import logging
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from bench.profiling import Profiler

log = logging.getLogger("bench")

T = TypeVar("T")


@dataclass
class Context:
    quick: bool
    repeats: int
    run_dir: Path
    results_dir: Path
    amqp_url: str
    redis_url: str
    profiler: Profiler | None = None
    soak_seconds: float | None = None
    storm_agents: int | None = None

    def size(self, full: T, quick: T) -> T:
        return quick if self.quick else full

    def new_prefix(self) -> str:
        return f"bench{uuid.uuid4().hex[:8]}"

    def say(self, message: str) -> None:
        print(f"  .. {message}", flush=True)


def write_settings(path: Path, *, ami_port: int, amqp_url: str, redis_url: str, prefix: str) -> Path:
    """A CMS appsettings.json for a gateway talking to the simulator (the launcher writes the same)."""
    document: dict[str, Any] = {
        "Asterisk": {
            "url": "127.0.0.1", "port": str(ami_port), "userName": "cms", "secret": "simulator-secret",
            "originateContext": "from-internal", "queueExtensionFormat": "Local/{0}@from-queue/n",
            "protocol": "SIP", "asyncOriginate": "true", "sendRingStartedOnRingingState": "true",
            "autoPauseOnCommutationStart": "false", "traceQueuesState": "false", "packetInfoConfig": "",
            "filePath": "",
        },
        "Cluster": {"amqpUrl": amqp_url, "redisUrl": redis_url, "prefix": prefix},
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=2))
    path.chmod(0o600)
    return path


async def cleanup_namespace(amqp_url: str, redis_url: str, prefix: str) -> None:
    """Remove what a bench namespace left in the shared Redis and RabbitMQ (best effort)."""
    import aio_pika
    import redis.asyncio as aioredis

    from services.topology import Topology

    client = aioredis.from_url(redis_url)
    try:
        keys = [k async for k in client.scan_iter(f"{prefix}:*", count=1000)]
        for i in range(0, len(keys), 500):
            await client.delete(*keys[i : i + 500])
    except (OSError, aioredis.RedisError) as exc:
        log.warning("could not clean Redis namespace %s: %s", prefix, exc)
    finally:
        await client.aclose()
    topology = Topology(prefix)
    try:
        connection = await aio_pika.connect(amqp_url, timeout=5)
        async with connection:
            channel = await connection.channel()
            await channel.queue_delete(topology.commands_queue)
            await channel.exchange_delete(topology.events_exchange)
    except (TimeoutError, aio_pika.exceptions.AMQPError, OSError) as exc:
        log.warning("could not clean RabbitMQ namespace %s: %s", prefix, exc)
