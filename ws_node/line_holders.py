"""Which users hold a line right now, cluster-wide, in Redis: the store behind first come, first served.

One sorted set per line, ``<prefix>:line-holders:<line>``; each open connection on the line is
one member, ``<claim id>|<user>``, scored with the time it expires. A claim, in one Lua script
(atomic, so two users racing for a free line cannot both win): drop expired members; if a member
of another user remains, answer that user; else add ours. Every node refreshes the expiry of its
members every third of the TTL; closing a connection removes its member; a node that dies leaves
members that expire after the TTL. The set itself expires with its last member.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable
from typing import Any

import redis.asyncio as aioredis
from prometheus_client import Counter

from services.tasks import stop_tasks

log = logging.getLogger(__name__)

HOLDER_STORE_ERRORS = Counter(
    "cms_node_line_holder_store_errors_total",
    "Line holder checks or refreshes that failed (Redis unreachable): first come is not enforced meanwhile",
)

_CLAIM = """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
if ARGV[5] == '1' then
  for _, member in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
    local bar = string.find(member, '|', 1, true)
    local user = string.sub(member, bar + 1)
    if string.lower(user) ~= ARGV[4] then return user end
  end
end
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[3])
redis.call('PEXPIRE', KEYS[1], ARGV[6])
return false
"""


class LineHolders:
    def __init__(
        self, redis: aioredis.Redis, prefix: str, *, ttl_seconds: float = 60.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._redis = redis
        self._prefix = prefix
        self.ttl = ttl_seconds
        self._clock = clock
        #: our members: claim id -> (line, member)
        self._mine: dict[str, tuple[str, str]] = {}
        self._refresher: asyncio.Task[None] | None = None

    def _key(self, line: str) -> str:
        return f"{self._prefix}:line-holders:{line}"

    async def claim(self, line: str, user: str, *, exclusive: bool) -> tuple[str, str | None]:
        """Hold ``line`` for ``user``: (claim id, ``None``) or, when ``exclusive`` and another user
        holds it, ("", that user). Raises ``OSError``/``RedisError`` when Redis is unreachable."""
        claim_id = uuid.uuid4().hex
        member = f"{claim_id}|{user}"
        now = self._clock()
        other: Any = await self._redis.eval(
            _CLAIM, 1, self._key(line), f"{now:.3f}", f"{now + self.ttl:.3f}", member, user.lower(),
            "1" if exclusive else "0", str(int(self.ttl * 1000)),
        )
        if other:
            return "", other.decode("utf-8", "replace") if isinstance(other, bytes) else str(other)
        self._mine[claim_id] = (line, member)
        self._ensure_refresher()
        return claim_id, None

    async def release(self, claim_id: str) -> None:
        held = self._mine.pop(claim_id, None)
        if held is None:
            return
        line, member = held
        try:
            await self._redis.zrem(self._key(line), member)
        except (OSError, aioredis.RedisError) as exc:  # it expires by itself after the TTL
            HOLDER_STORE_ERRORS.inc()
            log.info("line %s: holder not released (%s); it expires in %.0f s", line, exc, self.ttl)

    def _ensure_refresher(self) -> None:
        if self._refresher is None or self._refresher.done():
            self._refresher = asyncio.ensure_future(self._refresh_forever())

    async def _refresh_forever(self) -> None:
        while self._mine:
            await asyncio.sleep(self.ttl / 3)
            await self.refresh()

    async def refresh(self) -> None:
        """Push the expiry of every member this node holds (one pipeline)."""
        if not self._mine:
            return
        expires = self._clock() + self.ttl
        pipe = self._redis.pipeline(transaction=False)
        for line, member in list(self._mine.values()):
            pipe.zadd(self._key(line), {member: expires})
            pipe.pexpire(self._key(line), int(self.ttl * 1000))
        try:
            await pipe.execute()
        except (OSError, aioredis.RedisError) as exc:
            HOLDER_STORE_ERRORS.inc()
            log.warning("line holders not refreshed (%s)", exc)

    async def close(self) -> None:
        """Release everything this node holds (on drain: the agents reconnect elsewhere)."""
        await stop_tasks([self._refresher])
        for claim_id in list(self._mine):
            await self.release(claim_id)
