"""Which gateway may speak for the PBX: a Redis lease with fencing by epoch.

Two (or more) gateways run with the same configuration. Each logs in to AMI at once (a warm
standby: events off), but only the holder of the lease turns events on, writes line state,
publishes events and sends AMI actions that change anything. The lease is one Redis key::

    P:gateway:lease   "<owner> <epoch>"   (SET ... PX ttl)

Taking the lease and claiming a new epoch are one script, so the epoch *is* the fencing token:
every Redis write of the active gateway checks, in the same script, that the lease still holds
its own "<owner> <epoch>" (see :class:`services.line_state.LineStateWriter`), and every command
is claimed under the same check before it is carried out. A gateway that was paused (SIGSTOP, a
long GC, a VM freeze) past its lease finds the key changed and writes nothing.

Locally, the holder trusts its lease only until ``sent + ttl`` of the last successful renew, where
``sent`` is taken *before* the renew was sent; publishing and AMI actions check that deadline, so
a gateway that wakes up from a pause stops before its next publish, even before it has talked to
Redis again.

Redis unreachable: nobody can take the lease meanwhile (taking it needs Redis), so the holder keeps
reading AMI into its outbox and, once Redis answers again, *resumes* its term if the epoch key
still holds its epoch (nobody claimed one since); the standby waits ``ttl`` of Redis being
reachable before it tries, which gives the holder that chance. If Redis came back empty (a restart
without persistence) the epoch key is gone: the term cannot be resumed, and the next holder starts
a new epoch and restates every line from AMI. If the lease survived but the server behind it changed
(a Sentinel failover to a replica that may lack the old primary's last writes; a restart from a
snapshot), the renew says :attr:`RenewOutcome.MOVED` and the holder restates every line under a new
epoch.

The timing rules are in :class:`LeaseClock` (pure, tested without Redis); :class:`GatewayLease`
is the Redis side.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import os
import socket
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

import redis.asyncio as aioredis
from prometheus_client import Counter, Gauge

from services.redis_client import ServerIdentity

log = logging.getLogger(__name__)

LEASE_STATE = Gauge("cms_gateway_lease_state", "1 for the gateway's current lease state", ["state"])
TAKEOVERS = Counter("cms_gateway_takeovers_total", "Times this gateway took the lease and started a new epoch")
LEASE_RENEW_FAILURES = Counter(
    "cms_gateway_lease_renew_failures_total", "Lease renewals that failed, by reason", ["reason"]
)
FENCED = Counter("cms_gateway_fenced_total", "Outputs refused because this gateway does not hold the lease",
                 ["what"])
for _state in ("active", "standby", "suspended"):
    LEASE_STATE.labels(state=_state)
for _reason in ("unreachable", "lost"):
    LEASE_RENEW_FAILURES.labels(reason=_reason)
for _what in ("redis_write", "publish", "ami_action", "command"):
    FENCED.labels(what=_what)


def set_lease_state(state: str) -> None:
    for name in ("active", "standby", "suspended"):
        LEASE_STATE.labels(state=name).set(1 if name == state else 0)


class LeaseLost(Exception):
    """Another gateway holds the lease now (or Redis forgot ours): this one must stop speaking."""


@dataclass(frozen=True, slots=True)
class Term:
    """One holder's time with the lease: the epoch it claimed is its fencing token."""

    owner: str
    epoch: str

    @property
    def token(self) -> str:
        return f"{self.owner} {self.epoch}"


class RenewOutcome(enum.Enum):
    RENEWED = "renewed"
    RESUMED = "resumed"  # the key had expired (Redis away, or we were paused) and nobody took it
    #: renewed, but another Redis server answers than before (a failover, or a restart that kept the
    #: lease): what the old server had and the new one lacks (asynchronous replication) must be restated
    MOVED = "moved"
    LOST = "lost"
    UNREACHABLE = "unreachable"


class LeaseClock:
    """The lease's timing, without I/O: when the holder may act, when a standby may try to take over."""

    def __init__(self, ttl: float, *, clock: Callable[[], float] = time.monotonic) -> None:
        if ttl <= 0:
            raise ValueError("lease ttl must be positive")
        self.ttl = ttl
        self._clock = clock
        self._valid_until = 0.0
        self._reachable_since: float | None = None
        self._ever_failed = False

    def now(self) -> float:
        return self._clock()

    def granted(self, sent_at: float) -> None:
        """Redis granted (or renewed) the lease for a request sent at ``sent_at``."""
        self._valid_until = max(self._valid_until, sent_at + self.ttl)

    def revoke(self) -> None:
        self._valid_until = 0.0

    def valid(self) -> bool:
        return self._clock() < self._valid_until

    def reachable(self) -> None:
        if self._reachable_since is None:
            self._reachable_since = self._clock()

    def unreachable(self) -> None:
        self._reachable_since = None
        self._ever_failed = True

    def may_try_to_take(self) -> bool:
        """A standby that lost Redis waits one ttl of it being back before it tries: the holder may resume."""
        if not self._ever_failed:
            return True
        return self._reachable_since is not None and self._clock() - self._reachable_since >= self.ttl


_ACQUIRE = """
if redis.call('EXISTS', KEYS[1]) == 1 then return false end
local cur = tonumber(redis.call('GET', KEYS[2]) or '0')
local nxt = math.max(cur + 1, tonumber(ARGV[2]))
local epoch = string.format('%d', nxt)
redis.call('SET', KEYS[2], epoch)
redis.call('SET', KEYS[1], ARGV[1] .. ' ' .. epoch, 'PX', ARGV[3])
if cur > 0 then return {epoch, 1} end
return {epoch, 0}
"""

_RENEW = """
local cur = redis.call('GET', KEYS[1])
if cur == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
if not cur and redis.call('GET', KEYS[2]) == ARGV[3] then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 2
end
return 0
"""

_ADVANCE = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return false end
local cur = tonumber(redis.call('GET', KEYS[2]) or '0')
local epoch = string.format('%d', math.max(cur + 1, tonumber(ARGV[3])))
redis.call('SET', KEYS[2], epoch)
redis.call('SET', KEYS[1], ARGV[2] .. ' ' .. epoch, 'KEEPTTL')
return epoch
"""

_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

_CLAIM = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return -1 end
if redis.call('SET', KEYS[2], ARGV[1], 'NX', 'PX', ARGV[2]) then return 1 end
return 0
"""


def new_owner_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


class GatewayLease:
    """The Redis side of the lease. ``term`` is set while this gateway holds (or may resume) it."""

    def __init__(
        self,
        client: aioredis.Redis,
        prefix: str,
        *,
        owner: str | None = None,
        ttl: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._redis = client
        self.owner = owner or new_owner_id()
        self.key = f"{prefix}:gateway:lease"
        self.epoch_key = f"{prefix}:epoch"
        self._command_prefix = f"{prefix}:gateway:command:"
        self.clock = LeaseClock(ttl, clock=clock)
        self.term: Term | None = None
        self.server = ServerIdentity()
        self._serial = asyncio.Lock()
        self._acquire = client.register_script(_ACQUIRE)
        self._renew = client.register_script(_RENEW)
        self._advance = client.register_script(_ADVANCE)
        self._release = client.register_script(_RELEASE)
        self._claim = client.register_script(_CLAIM)

    @property
    def ttl_ms(self) -> int:
        return max(1, int(self.clock.ttl * 1000))

    def held(self) -> bool:
        """May this gateway publish and act right now? (No I/O: the local deadline of the last renew.)"""
        return self.term is not None and self.clock.valid()

    async def try_acquire(self) -> tuple[Term, bool] | None:
        """Take the lease if nobody holds it: the new term, and whether an earlier term existed."""
        sent = self.clock.now()
        try:
            answer = await self._acquire(keys=[self.key, self.epoch_key],
                                         args=[self.owner, int(time.time() * 1000), self.ttl_ms])
        except (OSError, aioredis.RedisError):
            self.clock.unreachable()
            raise
        self.clock.reachable()
        if not answer:
            return None
        epoch, had_earlier = answer
        self.term = Term(self.owner, _text(epoch))
        self.clock.granted(sent)
        self.server.forget()
        await self._server_moved()  # the server this term starts on
        return self.term, bool(int(had_earlier))

    async def _server_moved(self) -> bool:
        try:
            return await self.server.changed(self._redis)
        except (OSError, aioredis.RedisError):
            return False  # asked again at the next renew

    async def probe(self) -> None:
        """Tell the clock whether Redis answers (a standby waiting out its grace after an outage)."""
        try:
            await self._redis.exists(self.key)
        except (OSError, aioredis.RedisError):
            self.clock.unreachable()
            raise
        self.clock.reachable()

    async def renew(self) -> RenewOutcome:
        # One at a time with advance_epoch: a renew sent with the old token after a new epoch was claimed
        # would find the key changed and report the lease lost (seen after a Redis failover, where the
        # restate that claims the new epoch follows a renew at once).
        async with self._serial:
            return await self._renew_once()

    async def _renew_once(self) -> RenewOutcome:
        term = self.term
        if term is None:
            return RenewOutcome.LOST
        sent = self.clock.now()
        try:
            answer = int(await self._renew(keys=[self.key, self.epoch_key],
                                           args=[term.token, self.ttl_ms, term.epoch]))
        except (OSError, aioredis.RedisError):
            self.clock.unreachable()
            LEASE_RENEW_FAILURES.labels(reason="unreachable").inc()
            return RenewOutcome.UNREACHABLE
        self.clock.reachable()
        if answer == 0:
            LEASE_RENEW_FAILURES.labels(reason="lost").inc()
            with contextlib.suppress(OSError, aioredis.RedisError):
                holder, epoch = await self._redis.mget([self.key, self.epoch_key])
                log.warning("lease lost: term %s, Redis now holds lease %r and epoch %r", term.token,
                            _text(holder) if holder is not None else None, _text(epoch) if epoch is not None else None)
            self.term = None
            self.clock.revoke()
            return RenewOutcome.LOST
        self.clock.granted(sent)
        if await self._server_moved():
            return RenewOutcome.MOVED
        return RenewOutcome.RENEWED if answer == 1 else RenewOutcome.RESUMED

    async def advance_epoch(self) -> Term:
        """A new epoch within this term (the outbox lost events): the fencing token changes with it."""
        async with self._serial:
            return await self._advance_once()

    async def _advance_once(self) -> Term:
        term = self.term
        if term is None:
            raise LeaseLost("no lease held")
        answer = await self._advance(keys=[self.key, self.epoch_key],
                                     args=[term.token, self.owner, int(time.time() * 1000)])
        if not answer:
            self.term = None
            self.clock.revoke()
            raise LeaseLost("the lease changed hands")
        self.term = Term(self.owner, _text(answer))
        return self.term

    async def release(self) -> None:
        """Give the lease up at a clean stop, so a standby takes over now instead of after the ttl."""
        term, self.term = self.term, None
        self.clock.revoke()
        if term is not None:
            await self._release(keys=[self.key], args=[term.token])

    async def claim_command(self, command_id: str, keep_seconds: float = 120.0) -> bool:
        """Record that this term carries out ``command_id``; False if someone already did.

        Raises :class:`LeaseLost` when the lease is not ours, so a command delivered to a gateway
        that lost the lease is never carried out by it.
        """
        term = self.term
        if term is None:
            raise LeaseLost("no lease held")
        answer = int(await self._claim(keys=[self.key, self._command_prefix + command_id],
                                       args=[term.token, int(keep_seconds * 1000)]))
        if answer < 0:
            raise LeaseLost("the lease changed hands")
        return answer == 1


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
