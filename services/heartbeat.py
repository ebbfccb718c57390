"""Who is in the cluster: every gateway and node keeps a small record in Redis, so any node's
status page can find every process and read its ``/metrics`` and ``/health``.

Layout (all under the deployment's prefix):

* ``<prefix>:procs`` - a sorted set, member ``<kind>:<id>``, score = last heartbeat (unix time);
* ``<prefix>:proc:<kind>:<id>`` - the record (JSON), expiring ``ttl`` seconds after the last beat.

A process that stops cleanly deletes both; one that is killed stops beating, so its record
expires and its member's score ages: the page shows it as lost for ``forget_after`` seconds
(what an operator wants to see after a crash), then forgets it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from prometheus_client import Counter

from services.backoff import Backoff
from services.infra_metrics import RedisHealth
from services.tasks import stop_tasks

log = logging.getLogger(__name__)

HEARTBEATS = Counter("cms_heartbeats_total", "Heartbeat records written to Redis", ["outcome"])
for _outcome in ("ok", "error"):
    HEARTBEATS.labels(outcome=_outcome)

INTERVAL_SECONDS = 5.0
FORGET_AFTER_SECONDS = 600.0


def registry_key(prefix: str) -> str:
    return f"{prefix}:procs"


def record_key(prefix: str, member: str) -> str:
    return f"{prefix}:proc:{member}"


@dataclass(frozen=True, slots=True)
class ProcessRecord:
    """One process as the registry shows it; ``record`` is None when it stopped beating."""

    kind: str
    id: str
    last_seen: float
    record: dict[str, Any] | None

    @property
    def member(self) -> str:
        return f"{self.kind}:{self.id}"


class Heartbeat:
    """Writes this process's record every ``interval`` seconds until stopped; ``describe()`` says
    what goes in it (URLs and a few live facts) and must be cheap and in-memory."""

    def __init__(
        self,
        redis: aioredis.Redis,
        prefix: str,
        kind: str,
        process_id: str,
        describe: Callable[[], dict[str, Any]],
        *,
        interval: float = INTERVAL_SECONDS,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._redis = redis
        self._prefix = prefix
        self._member = f"{kind}:{process_id}"
        self._kind = kind
        self._id = process_id
        self._describe = describe
        self._interval = interval
        self._clock = clock
        self._started = clock()
        self._task: asyncio.Task[None] | None = None
        self._health = RedisHealth()

    async def beat(self) -> None:
        now = self._clock()
        record = {"kind": self._kind, "id": self._id, "started_at": self._started, "updated_at": now,
                  **self._describe()}
        ttl_ms = int(self._interval * 3 * 1000)
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.set(record_key(self._prefix, self._member), json.dumps(record), px=ttl_ms)
            pipe.zadd(registry_key(self._prefix), {self._member: now})
            pipe.zremrangebyscore(registry_key(self._prefix), "-inf", now - FORGET_AFTER_SECONDS)
            await pipe.execute()

    async def run(self) -> None:
        backoff = Backoff(initial=min(0.5, self._interval), maximum=max(0.5, self._interval) * 2)
        while True:
            try:
                await self.beat()
            except (aioredis.RedisError, OSError) as exc:
                HEARTBEATS.labels(outcome="error").inc()
                self._health.failed()
                delay = backoff.next_delay()
                log.warning("heartbeat of %s not written (%s); retry in %.1fs", self._member, exc, delay)
                await asyncio.sleep(delay)
                continue
            HEARTBEATS.labels(outcome="ok").inc()
            self._health.succeeded()
            backoff.reset()
            await asyncio.sleep(self._interval)

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self.run(), name=f"heartbeat-{self._member}")

    async def stop(self) -> None:
        """Stop beating and leave the registry at once (a clean stop is not a lost process)."""
        await stop_tasks([self._task])
        self._task = None
        try:
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.delete(record_key(self._prefix, self._member))
                pipe.zrem(registry_key(self._prefix), self._member)
                await pipe.execute()
        except (aioredis.RedisError, OSError) as exc:
            log.warning("heartbeat of %s not removed (%s); it expires by itself", self._member, exc)


async def read_registry(redis: aioredis.Redis, prefix: str, now: float | None = None) -> list[ProcessRecord]:
    """Every process seen within ``FORGET_AFTER_SECONDS``, newest records included, sorted by kind and id."""
    now = time.time() if now is None else now
    members = await redis.zrangebyscore(registry_key(prefix), now - FORGET_AFTER_SECONDS, "+inf", withscores=True)
    if not members:
        return []
    pairs: list[tuple[str, float]] = []
    for item in members:
        member, score = item[0], item[1]
        pairs.append((member.decode() if isinstance(member, bytes) else str(member), float(score)))
    raw = await redis.mget([record_key(prefix, name) for name, _ in pairs])
    out = []
    for (name, score), blob in zip(pairs, raw, strict=True):
        kind, _, process_id = name.partition(":")
        record: dict[str, Any] | None = None
        if blob:
            try:
                loaded = json.loads(blob)
                record = loaded if isinstance(loaded, dict) else None
            except ValueError:
                record = None
        out.append(ProcessRecord(kind, process_id, score, record))
    return sorted(out, key=lambda p: (p.kind, p.id))
