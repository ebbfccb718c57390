"""In-memory sibling of :class:`~services.delivery_log.RedisDeliveryStore`, for unit tests.

Several :class:`~services.delivery_log.DeliveryLog` instances (nodes) share one store the way they
share Redis. Records and holder sets expire like Redis keys, by ``clock`` (seconds; pass a fake one
to move time without waiting). ``store.outage.fail()`` makes every operation raise, as a Redis that
went away does.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

from services.delivery_log import NO_USER, AgentKey, DeliveryStore, DeliveryWrite
from services.memory_store import Outage, round_trip
from services.wire import StreamPosition


class MemoryDeliveryStore(DeliveryStore):
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.outage = Outage("memory delivery store")
        self._clock = clock
        #: (line, user or NO_USER, tab or "") -> (position, expires at)
        self._records: dict[tuple[str, str, str], tuple[StreamPosition, float]] = {}
        #: line -> (user -> stamp, expires at)
        self._holders: dict[str, tuple[dict[str, str], float]] = {}

    async def read(self, agent: AgentKey) -> StreamPosition | None:
        await round_trip(self.outage)
        user = agent.user or NO_USER
        keys = [(agent.line, user, agent.tab), (agent.line, user, "")] if agent.tab else [(agent.line, user, "")]
        now = self._clock()
        for key in keys:
            record = self._records.get(key)
            if record is not None and record[1] > now:
                return record[0]
        return None

    async def write(self, batch: Sequence[DeliveryWrite], *, ttl: int, holder_ttl: int, stamp: str) -> None:
        await round_trip(self.outage)
        now = self._clock()
        touched: set[str] = set()
        for agent, position, holder in batch:
            if position is not None:
                user = agent.user or NO_USER
                self._records[(agent.line, user, "")] = (position, now + ttl)
                if agent.tab:
                    self._records[(agent.line, user, agent.tab)] = (position, now + ttl)
            if holder:
                self._live_holders(agent.line, now)[agent.user] = stamp
                touched.add(agent.line)
        for line in touched:
            self._holders[line] = (self._holders[line][0], now + holder_ttl)

    async def claim(self, agent: AgentKey, *, stamp: str, holder_ttl: int) -> dict[str, str]:
        await round_trip(self.outage)
        now = self._clock()
        holders = self._live_holders(agent.line, now)
        before = dict(holders)
        holders[agent.user] = stamp
        self._holders[agent.line] = (holders, now + holder_ttl)
        return before

    async def read_and_claim(
        self, agent: AgentKey, *, stamp: str, holder_ttl: int
    ) -> tuple[StreamPosition | None, dict[str, str]]:
        return await self.read(agent), await self.claim(agent, stamp=stamp, holder_ttl=holder_ttl)

    def _live_holders(self, line: str, now: float) -> dict[str, str]:
        """The line's holder set, a new empty one if it expired (as the Redis hash key would have)."""
        entry = self._holders.get(line)
        if entry is None or entry[1] <= now:
            entry = self._holders[line] = ({}, float("inf"))  # like HSET on a missing key: no TTL yet
        return entry[0]
