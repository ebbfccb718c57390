"""What each agent was last delivered, and who holds a line: the nodes' shared memory in Redis.

Creatio's client, after a drop, comes back about 5 s later (on any node) and only asks for a
snapshot: calls that rang and ended meanwhile would never reach the CRM. So every node records,
per agent, the stream position ``(epoch, seq)`` of the last line event it handed to that agent;
the node the agent comes back to reads it and replays the gap from the line's history.

Who is "the agent": Creatio sends no credentials, but its ``OpenConnection`` carries
``sessionServiceParams.UserUId`` (the Creatio user) and the line (``ExtensionName``), and every
``LoadLibrary`` after a reconnect carries the ``libraryInstanceUId`` we gave that browser tab
before. So an agent is ``(line, user, tab)``; two records are kept:

* ``P:delivered:L:U:T`` for the tab, exact across the client's automatic reconnects;
* ``P:delivered:L:U`` for the user, the fallback when the tab is new (a reloaded page).

Without a user id ``U`` is ``-``: the record is then per line (documented in
docs/creatio-protocol.md). Values are ``"<epoch> <seq>"`` strings with a TTL: a position
older than the TTL is useless anyway (the history is trimmed by then).

Writes are cheap: :meth:`DeliveryLog.note` only updates a dict (the per-event hot path); a
background task writes the changed records every ``flush_interval`` seconds. A node killed
outright loses at most ``flush_interval`` of positions: the agent then gets a few events twice
rather than missing any.

Connected agents whose position does not move still need their records kept alive (TTL) and
their holder entries fresh (``holder_window``). Rewriting all of them at once every few seconds
made a node with 10,000 idle agents spend most of its keepalive CPU here and stalled delivery
while one huge pipeline was built and parsed. So each kind of refresh is a *rotation*: the
connected agents are visited once per period, a slice at every flush, in proportion to the time
elapsed; records once per ``ttl / 4``, holder entries (agents with a user only) once per
``holder_window / 3``. Every write goes out in pipelines of at most ``max_batch`` agents, so
the loop is never held for long by one of them.

``P:line:L:holders`` (hash user -> last seen, unix seconds) tells a node claiming a line for one
user whether another user holds it (the shared-line policy lives in ws_node).

The storage is a :class:`DeliveryStore`: :class:`RedisDeliveryStore` (the keys above) or its
in-memory sibling in ``services/delivery_log_memory.py``; the batching, rotations and retries
stay here, the same over both.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Callable, Iterable, Sequence
from typing import NamedTuple, Protocol

import redis.asyncio as aioredis
from prometheus_client import Counter

from services.backoff import Backoff
from services.tasks import stop_tasks
from services.wire import StreamPosition

log = logging.getLogger(__name__)

FLUSHES = Counter("cms_node_delivery_log_flushes_total", "Batches of delivery positions written to Redis")
FLUSH_ERRORS = Counter("cms_node_delivery_log_errors_total", "Failed writes or reads of delivery positions")

_ID_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")
NO_USER = "-"


def clean_id(value: object) -> str:
    """An identifier safe to put in a Redis key, or ``""``."""
    return value if isinstance(value, str) and _ID_RE.fullmatch(value) else ""


class AgentKey(NamedTuple):
    """One agent's tab on one line. ``user`` and ``tab`` may be empty (not known).

    A tuple, not a dataclass: it is hashed for every event handed to every tab."""

    line: str
    user: str = ""
    tab: str = ""


class DeliveryWrite(NamedTuple):
    """One agent's share of a flush: its records (tab and user) at ``position`` unless None, and
    its user's holder entry on the line when ``holder``."""

    agent: AgentKey
    position: StreamPosition | None
    holder: bool


class DeliveryStore(Protocol):
    """Where delivery records and line holders are kept. Failures raise ``OSError`` (``ConnectionError``),
    ``redis.RedisError`` or ``TimeoutError``; a failed :meth:`write` may have written part of its batch
    (the caller writes all of it again)."""

    async def read(self, agent: AgentKey) -> StreamPosition | None:
        """The position of ``agent``'s tab record if there is one, else its user's record on the line."""
        ...

    async def write(self, batch: Sequence[DeliveryWrite], *, ttl: int, holder_ttl: int, stamp: str) -> None:
        """In one round trip: each record (tab and user keys) kept ``ttl`` seconds, each holder entry
        set to ``stamp``, and each touched line's holder set kept ``holder_ttl`` seconds."""
        ...

    async def claim(self, agent: AgentKey, *, stamp: str, holder_ttl: int) -> dict[str, str]:
        """Set ``agent.user``'s holder entry on the line to ``stamp``; returns every entry as it was before."""
        ...

    async def read_and_claim(
        self, agent: AgentKey, *, stamp: str, holder_ttl: int
    ) -> tuple[StreamPosition | None, dict[str, str]]:
        """:meth:`read` and :meth:`claim` in one round trip (an agent opening a line needs both)."""
        ...


class RedisDeliveryStore(DeliveryStore):
    """Delivery records as ``P:delivered:L:U[:T]`` strings, holders as the ``P:line:L:holders`` hash."""

    def __init__(self, client: aioredis.Redis, prefix: str) -> None:
        self._redis = client
        self._prefix = prefix

    def _user_key(self, agent: AgentKey) -> str:
        return f"{self._prefix}:delivered:{agent.line}:{agent.user or NO_USER}"

    def _tab_key(self, agent: AgentKey) -> str:
        return f"{self._user_key(agent)}:{agent.tab}"

    def _holders_key(self, line: str) -> str:
        return f"{self._prefix}:line:{line}:holders"

    def _record_keys(self, agent: AgentKey) -> list[str]:
        return [self._tab_key(agent), self._user_key(agent)] if agent.tab else [self._user_key(agent)]

    async def read(self, agent: AgentKey) -> StreamPosition | None:
        return _first_position(await self._redis.mget(self._record_keys(agent)))

    async def write(self, batch: Sequence[DeliveryWrite], *, ttl: int, holder_ttl: int, stamp: str) -> None:
        pipe = self._redis.pipeline(transaction=False)
        holder_lines: set[str] = set()
        for agent, position, holder in batch:
            if position is not None:
                value = position.encode()
                pipe.execute_command("SET", self._user_key(agent), value, "EX", ttl)
                if agent.tab:
                    pipe.execute_command("SET", self._tab_key(agent), value, "EX", ttl)
            if holder:
                pipe.execute_command("HSET", self._holders_key(agent.line), agent.user, stamp)
                holder_lines.add(agent.line)
        for line in holder_lines:
            pipe.execute_command("EXPIRE", self._holders_key(line), holder_ttl)
        if len(pipe):
            await pipe.execute()

    async def claim(self, agent: AgentKey, *, stamp: str, holder_ttl: int) -> dict[str, str]:
        key = self._holders_key(agent.line)
        pipe = self._redis.pipeline(transaction=False)
        pipe.hgetall(key)
        pipe.hset(key, agent.user, stamp)
        pipe.expire(key, holder_ttl)
        holders, _, _ = await pipe.execute()
        return {_text(user): _text(seen) for user, seen in holders.items()}

    async def read_and_claim(
        self, agent: AgentKey, *, stamp: str, holder_ttl: int
    ) -> tuple[StreamPosition | None, dict[str, str]]:
        key = self._holders_key(agent.line)
        pipe = self._redis.pipeline(transaction=False)
        pipe.mget(self._record_keys(agent))
        pipe.hgetall(key)
        pipe.hset(key, agent.user, stamp)
        pipe.expire(key, holder_ttl)
        values, holders, _, _ = await pipe.execute()
        return _first_position(values), {_text(user): _text(seen) for user, seen in holders.items()}


def _first_position(values: Sequence[bytes | str | None]) -> StreamPosition | None:
    for value in values:
        position = StreamPosition.decode(value)
        if position is not None:
            return position
    return None


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class _Rotation:
    """Visits every member of a changing population once per ``period`` seconds, a slice per call.

    A round starts with a copy of the population; each :meth:`due` returns the members whose turn
    has come by ``now`` (in proportion to the time elapsed since the round began). Members that
    joined during a round wait for the next one (they were just written when they joined); members
    that left are filtered by the caller. Every member is visited within two periods."""

    __slots__ = ("period", "_members", "_done", "_started")

    def __init__(self, period: float) -> None:
        self.period = max(0.001, period)
        self._members: list[AgentKey] = []
        self._done = 0
        self._started: float | None = None

    def due(self, now: float, population: Iterable[AgentKey]) -> list[AgentKey]:
        if self._started is None or (now - self._started >= self.period and self._done >= len(self._members)):
            self._members = list(population)
            self._done = 0
            self._started = now
            return []  # just written (attach) or just refreshed (end of the previous round)
        elapsed = (now - self._started) / self.period
        upto = len(self._members) if elapsed >= 1 else int(len(self._members) * elapsed)
        chunk = self._members[self._done : upto]
        self._done = upto
        if self._done >= len(self._members):
            self._members = []
        return chunk


class DeliveryLog:
    def __init__(
        self,
        store: DeliveryStore,
        *,
        ttl_seconds: float = 900.0,
        flush_interval: float = 0.5,
        holder_window: float = 60.0,
        max_batch: int = 256,
        write_timeout: float = 10.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._store = store
        self.ttl = max(10, int(ttl_seconds))
        self.flush_interval = flush_interval
        self.holder_window = holder_window
        #: agents per pipeline: bounds the time one write holds the loop
        self.max_batch = max(1, max_batch)
        #: a flush that hangs (Redis stalled, not refusing) is abandoned and retried
        self.write_timeout = write_timeout
        self._clock = clock
        #: agent -> the last position handed to it
        self._positions: dict[AgentKey, StreamPosition] = {}
        self._live: dict[AgentKey, int] = {}
        self._dirty: set[AgentKey] = set()
        #: connected agents' records are rewritten well before their TTL runs out ...
        self._record_refresh = _Rotation(self.ttl / 4)
        #: ... and their holder entries well within the holder window
        self._holder_refresh = _Rotation(holder_window / 3)
        self._task: asyncio.Task[None] | None = None

    # ---- the hot path ------------------------------------------------------------------------

    def note(self, agent: AgentKey, position: StreamPosition) -> None:
        """``agent`` was handed the event at ``position``. Only moves forward."""
        current = self._positions.get(agent)
        if current is not None:
            if current.epoch == position.epoch:
                if position.seq <= current.seq:
                    return
            elif position < current:
                return
        self._positions[agent] = position
        self._dirty.add(agent)

    # ---- membership --------------------------------------------------------------------------

    def attach(self, agent: AgentKey, position: StreamPosition) -> None:
        self._live[agent] = self._live.get(agent, 0) + 1
        self.note(agent, position)
        self._dirty.add(agent)
        self._ensure_task()

    def detach(self, agent: AgentKey) -> None:
        count = self._live.get(agent, 0) - 1
        if count > 0:
            self._live[agent] = count
            return
        self._live.pop(agent, None)
        if agent in self._positions:
            self._dirty.add(agent)  # final write; the record then ages out by its TTL
        self._ensure_task()

    def connected(self) -> int:
        return len(self._live)

    # ---- reads -------------------------------------------------------------------------------

    def _just_left(self, agent: AgentKey) -> StreamPosition | None:
        """Where ``agent`` stood if it left this node a moment ago (its record's write may still be pending)."""
        return self._positions.get(agent) if agent not in self._live else None

    async def last(self, agent: AgentKey) -> StreamPosition | None:
        """Where ``agent`` stood: its tab's record, else its user's record on that line."""
        local = self._just_left(agent)
        return local if local is not None else await self._store.read(agent)

    async def arrive(self, agent: AgentKey) -> tuple[StreamPosition | None, list[str]]:
        """An agent opens its line here: where it stood (:meth:`last`) and the *other* users seen on the line
        lately; ``agent.user`` is marked as holding it. One round trip."""
        if not agent.user:
            return await self.last(agent), []  # anonymous: not a holder
        now = self._clock()
        stamp, holder_ttl = f"{now:.0f}", int(self.holder_window * 2)
        local = self._just_left(agent)
        if local is not None:
            return local, self._others(agent, await self._store.claim(agent, stamp=stamp, holder_ttl=holder_ttl), now)
        last, holders = await self._store.read_and_claim(agent, stamp=stamp, holder_ttl=holder_ttl)
        return last, self._others(agent, holders, now)

    def _others(self, agent: AgentKey, holders: dict[str, str], now: float) -> list[str]:
        others = []
        for user, raw_seen in holders.items():
            try:
                seen = float(raw_seen)
            except ValueError:
                continue
            if user != agent.user and now - seen <= self.holder_window:
                others.append(user)
        return sorted(others)

    # ---- writes ------------------------------------------------------------------------------

    def _ensure_task(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.ensure_future(self._run())

    async def _run(self) -> None:
        # While Redis is away the positions stay in memory (``note`` keeps working, delivery never
        # waits for this) and the writes are retried with backoff; once a write succeeds,
        # everything that changed meanwhile goes out.
        backoff = Backoff(initial=max(self.flush_interval, 0.05), maximum=10.0)
        delay = self.flush_interval
        failing = False
        while self._live or self._dirty:
            await asyncio.sleep(delay)
            try:
                async with asyncio.timeout(self.write_timeout):
                    await self.flush()
            except (OSError, aioredis.RedisError, TimeoutError) as exc:
                FLUSH_ERRORS.inc()
                delay = backoff.next_delay()
                if not failing:
                    log.warning("delivery positions not written (%s); retrying with backoff", exc)
                failing = True
                continue
            if failing:
                log.info("delivery positions written again after %d failed attempts", backoff.attempts)
                failing = False
                backoff.reset()
            delay = self.flush_interval

    async def flush(self) -> None:
        """Write the changed records, and the slices of the refresh rotations that are due."""
        now = self._clock()
        refresh_holders = [a for a in self._holder_refresh.due(now, self._live) if a.user and a in self._live]
        refresh_records = [a for a in self._record_refresh.due(now, self._live) if a in self._live]
        if not (self._dirty or refresh_holders or refresh_records):
            return
        batch, self._dirty = self._dirty, set()
        # (agent, write its records, write its holder entry); a changed record is written in full
        work: list[tuple[AgentKey, bool, bool]] = [(a, True, bool(a.user) and a in self._live) for a in batch]
        work += [(a, True, bool(a.user)) for a in refresh_records if a not in batch]
        written = {a for a, _, _ in work}
        work += [(a, False, True) for a in refresh_holders if a not in written]
        stamp = f"{now:.0f}"
        holder_ttl = int(self.holder_window * 2)
        for first in range(0, len(work), self.max_batch):
            chunk = []
            for agent, records, holder in work[first : first + self.max_batch]:
                position = self._positions.get(agent) if records else None
                if position is not None or holder:
                    chunk.append(DeliveryWrite(agent, position, holder))
            if not chunk:
                continue
            try:
                await self._store.write(chunk, ttl=self.ttl, holder_ttl=holder_ttl, stamp=stamp)
            except BaseException:
                # what this chunk and the ones after it had to write is written next time
                self._dirty.update(a for a, records, _ in work[first:] if records and a in batch)
                self._forget_departed(batch)
                raise
            FLUSHES.inc()
        self._forget_departed(batch)

    def _forget_departed(self, written: set[AgentKey]) -> None:
        """Positions of agents that left and whose last record is written are no longer needed here."""
        for agent in written:
            if agent not in self._live and agent not in self._dirty:
                self._positions.pop(agent, None)

    async def close(self) -> None:
        """Write what is pending, then stop the background task."""
        task, self._task = self._task, None
        await stop_tasks([task])
        try:
            await self.flush()
        except (OSError, aioredis.RedisError) as exc:
            FLUSH_ERRORS.inc()
            log.warning("delivery positions lost at shutdown: %s", exc)


__all__ = ["NO_USER", "AgentKey", "DeliveryLog", "DeliveryStore", "DeliveryWrite", "RedisDeliveryStore", "clean_id"]
