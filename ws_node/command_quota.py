"""Command budgets shared by every node, in Redis: the cluster-wide half of the per-line and per-user
limits (``admission.CommandLimiter`` is the node-local half, which also holds while Redis is away).

One token bucket per (kind, line) and per (kind, user), as a Redis hash ``{tokens, at}``; one Lua
script refills and takes from all of a command's buckets at once (all or none), on Redis's own
clock, so sockets of one line spread over many nodes share one budget.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import redis.asyncio as aioredis
from prometheus_client import Counter

from services.wire import CommandName
from ws_node.admission import COMMAND_KINDS, COMMANDS_LIMITED, CommandLimit

log = logging.getLogger(__name__)

QUOTA_STORE_ERRORS = Counter(
    "cms_node_command_quota_errors_total",
    "Cluster-wide command budget checks that failed (Redis unreachable): only the node's own budget applied",
)

# KEYS: the buckets; ARGV: rate per second, burst. Returns {0, 0} when taken, else
# {index of the first empty bucket, milliseconds until it has a token}.
_TAKE = """
local time = redis.call('TIME')
local now = tonumber(time[1]) + tonumber(time[2]) / 1000000
local rate, burst = tonumber(ARGV[1]), tonumber(ARGV[2])
local levels = {}
for i, key in ipairs(KEYS) do
  local state = redis.call('HMGET', key, 'tokens', 'at')
  local tokens = tonumber(state[1]) or burst
  local at = tonumber(state[2]) or now
  tokens = math.min(burst, tokens + math.max(0, now - at) * rate)
  if tokens < 1 then return {i, math.ceil((1 - tokens) / rate * 1000)} end
  levels[i] = tokens
end
local ttl = math.ceil(burst / rate * 1000) + 1000
for i, key in ipairs(KEYS) do
  redis.call('HSET', key, 'tokens', tostring(levels[i] - 1), 'at', tostring(now))
  redis.call('PEXPIRE', key, ttl)
end
return {0, 0}
"""


class CommandQuota:
    def __init__(self, redis: aioredis.Redis, prefix: str, limits: dict[str, CommandLimit]) -> None:
        self._redis = redis
        self._prefix = prefix
        self.limits = limits

    async def check(self, line: str, user: str, name: CommandName) -> str | None:
        """``None`` admits the command (and takes its tokens); otherwise the message for the agent."""
        kind = COMMAND_KINDS.get(name)
        limit = self.limits.get(kind) if kind is not None else None
        if kind is None or limit is None or limit.burst == 0:
            return None
        scopes = [("line", line)] + ([("user", user.lower())] if user else [])
        keys = [f"{self._prefix}:command-budget:{kind}:{scope}:{who}" for scope, who in scopes]
        try:
            rate = f"{limit.per_minute / 60.0}"
            answer: Any = await self._redis.eval(_TAKE, len(keys), *keys, rate, str(limit.burst))
        except (OSError, aioredis.RedisError) as exc:
            QUOTA_STORE_ERRORS.inc()
            log.warning("line %s: cluster-wide command budget unknown (%s); the node's own applies", line, exc)
            return None
        refused, wait_ms = int(answer[0]), int(answer[1])
        if not refused:
            return None
        scope = scopes[refused - 1][0]
        COMMANDS_LIMITED.labels(kind=kind, scope=scope).inc()
        whose = f"line {line}" if scope == "line" else "this user"
        return (f"too many {kind} commands from {whose} (limit {limit.burst} at once, "
                f"{limit.per_minute:g} a minute): try again in {max(1, math.ceil(wait_ms / 1000))} s")
