"""Each line's state in Redis: current calls, agent state, stream position, recent history.

The gateway is the single writer (the one holding the lease). For every batch of events it
writes, in one script that first checks the lease: the calls hash, the agent state, the history
stream entries and the position. Writes are applied strictly in order. The write travels beside
the batch's publish, not before it (ami_gateway/event_outbox.py; issue 15): a node that receives
event (epoch, n) from RabbitMQ finds everything up to n in Redis a moment later at most, as the
gateway keeps at most its window of batches ahead of Redis and stops publishing once a write fails
or hangs. A node that repairs (a gap, a new epoch, a reconnect) therefore waits briefly for the
entry it needs, and looks at a line it has just bound once more a moment later, for an event
routed before its bind whose write landed after its read (ws_node/line_feed.py). After an outage
the gateway stores, then publishes, until its backlog is out.

Keys (``P`` = deployment prefix, ``L`` = line)::

    P:epoch              the current gateway epoch (milliseconds since 1970, strictly growing)
    P:gateway:lease      "<owner> <epoch>" of the active gateway (ami_gateway/lease.py); the fence
    P:lines              set of lines the gateway has ever written
    P:line:L:calls       hash  call id -> Call JSON (active calls only)
    P:line:L:agent       AgentState JSON
    P:line:L:pos         hash  epoch, seq
    P:line:L:events      stream, entry id "<epoch>-<seq>", field "e" = LineEvent JSON

Using ``<epoch>-<seq>`` as the stream id makes "everything after position (e, s)" a single
XRANGE, and makes ids grow across epochs because epochs are strictly growing.

Interfaces: the gateway writes through a :class:`LineWriter`, the nodes read through a
:class:`LineReader`. :class:`LineStateWriter` and :class:`LineStateReader` below are the Redis
implementations; ``services/line_state_memory.py`` holds their in-memory siblings, which follow the
same contract (tests/support/store_contracts.py runs one suite against both).
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import redis.asyncio as aioredis

from services.wire import AgentState, Call, LineEvent, StreamPosition, WireError


@dataclass(frozen=True, slots=True)
class LineSnapshot:
    line: str
    #: the last event the snapshot includes
    position: StreamPosition
    calls: tuple[Call, ...]
    agent: AgentState | None

    @property
    def epoch(self) -> str:
        return self.position.epoch

    @property
    def seq(self) -> int:
        return self.position.seq


@dataclass(frozen=True, slots=True)
class LineHistory:
    """A line's history after a position, and its snapshot, read in one transaction.

    ``anchored`` proves the history is complete from the position on: the entry at the position
    itself is still in the stream (trimming only removes the oldest entries), or the position is
    the start of the line (epoch ``""``, seq 0). Without it, events after the position may be gone.
    """

    events: tuple[LineEvent, ...]
    anchored: bool
    snapshot: LineSnapshot


class Fenced(Exception):
    """A fenced write found another gateway's lease (or none): this gateway must stop writing."""


class AlreadyStored(Exception):
    """A retried batch whose stream entries are already there (the reply of the first attempt was lost)."""


class HistoryUnavailable(Exception):
    """The requested position is no longer (or not yet) in the line's history: take a snapshot."""


class LineWriter(Protocol):
    """The gateway's side: one writer at a time (the lease holder), fenced by the lease.

    Storage failures raise ``OSError`` (``ConnectionError``) or ``redis.RedisError``; a refused fence
    raises :class:`Fenced` and writes nothing.
    """

    async def new_epoch(self, now_ms: int | None = None) -> str:
        """An epoch strictly greater than any claimed before in this namespace, even if the clock went back."""
        ...

    def fence(self, key: str, token: str) -> None:
        """From now on every write first checks, atomically, that ``key`` still holds ``token``."""
        ...

    async def write(self, events: Sequence[LineEvent]) -> None:
        """Store positioned events: history, calls, agent state and position, all or nothing.

        An event whose history entry is already there (a retry of a write whose reply was lost) is
        skipped; the rest of the batch is idempotent."""
        ...

    async def all_stored_calls(self, chunk: int = 500) -> dict[str, list[Call]]:
        """Every line ever written, with its active calls (what agents were last told)."""
        ...


class LineReader(Protocol):
    """The nodes' side: snapshots and history, never writes."""

    async def snapshot(self, line: str) -> LineSnapshot: ...

    async def history_since(self, line: str, position: StreamPosition, limit: int = 10_000) -> LineHistory:
        """Everything after ``position``, across epochs, with the snapshot it leads to (read together)."""
        ...

    async def positions(self, lines: Sequence[str]) -> dict[str, StreamPosition]:
        """Where each of ``lines`` stands in the store (the start of a line for one never written), in one
        round trip: a node's second look at lines it just bound (ws_node/line_feed.py, settling)."""
        ...


# KEYS[1] is the fence key; ARGV[1] the token it must hold ("" = no fence), ARGV[2] the history
# length; then groups of five: op, index into KEYS, three arguments.
_WRITE = """
if ARGV[1] ~= '' and redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
local maxlen = ARGV[2]
for i = 3, #ARGV, 5 do
  local op, key, a, b = ARGV[i], KEYS[tonumber(ARGV[i + 1])], ARGV[i + 2], ARGV[i + 3]
  if op == 'x' then
    local res = redis.pcall('XADD', key, 'MAXLEN', '~', maxlen, a, 'e', b)
    if type(res) == 'table' and res.err and not string.find(res.err, 'equal or smaller', 1, true) then
      return res
    end
  elseif op == 'h' then redis.call('HSET', key, a, b)
  elseif op == 'd' then redis.call('HDEL', key, a)
  elseif op == 's' then redis.call('SET', key, a)
  elseif op == 'p' then redis.call('HSET', key, 'epoch', a, 'seq', b)
  elseif op == 'a' then redis.call('SADD', key, a)
  end
end
return 1
"""


class LineKeys:
    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.epoch = f"{prefix}:epoch"
        self.lines = f"{prefix}:lines"

    def calls(self, line: str) -> str:
        return f"{self.prefix}:line:{line}:calls"

    def agent(self, line: str) -> str:
        return f"{self.prefix}:line:{line}:agent"

    def pos(self, line: str) -> str:
        return f"{self.prefix}:line:{line}:pos"

    def events(self, line: str) -> str:
        return f"{self.prefix}:line:{line}:events"


class LineStateWriter(LineWriter):
    """The gateway's side, on Redis. Not safe to share between two gateways: there is one writer."""

    def __init__(self, client: aioredis.Redis, prefix: str, history_length: int = 1000) -> None:
        self._redis = client
        self._keys = LineKeys(prefix)
        self._history_length = history_length
        self._fence: tuple[str, str] | None = None
        self._write_script = client.register_script(_WRITE)

    async def new_epoch(self, now_ms: int | None = None) -> str:
        """Claim an epoch strictly greater than any before it, even if the clock went back."""
        now_ms = int(time.time() * 1000) if now_ms is None else now_ms
        script = (
            "local cur = tonumber(redis.call('GET', KEYS[1]) or '0') "
            "local nxt = math.max(cur + 1, tonumber(ARGV[1])) "
            "redis.call('SET', KEYS[1], nxt) return nxt"
        )
        value = await self._redis.eval(script, 1, self._keys.epoch, now_ms)
        return str(int(value))

    def fence(self, key: str, token: str) -> None:
        """From now on every write first checks, atomically, that ``key`` still holds ``token``.

        The gateway's lease key and its "<owner> <epoch>": a gateway that lost the lease (paused,
        partitioned) cannot write a single event after its successor took over.
        """
        self._fence = (key, token)

    async def write(self, events: Sequence[LineEvent]) -> None:
        """Store positioned events, and apply each one's call to the line's active-calls hash.

        Deriving the hash from the events themselves keeps it exactly as of the last event
        written: a snapshot never shows a call whose events are not in the stream yet.

        One script does it all, so it is atomic and, when fenced, conditional on the lease. A stream
        entry that is already there (a retry after the reply of a stored batch was lost) is skipped;
        the rest of the batch is idempotent. Raises :class:`Fenced` when the fence does not hold.
        """
        if not events:
            return
        keys: dict[str, int] = {}

        def key(name: str) -> str:
            # Lua indexes KEYS from 1, and KEYS[1] is the fence key.
            return str(keys.setdefault(name, len(keys) + 2))

        ops: list[str | int | bytes] = []
        last: dict[str, LineEvent] = {}
        for event in events:
            line = event.line
            ops += ["x", key(self._keys.events(line)), f"{event.epoch}-{event.seq}", event.encode(), ""]
            if event.call is not None:
                if event.call.on_line:  # a busy call stays in snapshots until its RING_FINISHED
                    ops += ["h", key(self._keys.calls(line)), event.call.id, json.dumps(event.call.to_dict()), ""]
                else:
                    ops += ["d", key(self._keys.calls(line)), event.call.id, "", ""]
            if event.agent is not None:
                ops += ["s", key(self._keys.agent(line)), json.dumps(event.agent.to_dict()), "", ""]
            last[line] = event
        for line, event in last.items():
            ops += ["p", key(self._keys.pos(line)), event.epoch, event.seq, ""]
            ops += ["a", key(self._keys.lines), line, "", ""]
        fence_key, token = self._fence or (self._keys.epoch, "")
        try:
            written = await self._write_script(keys=[fence_key, *keys], args=[token, self._history_length, *ops])
        except aioredis.ResponseError as exc:
            # Stream ids only grow: Redis refuses an entry at or below the top one. The script skips those, so
            # this is a server that raised it anyway; the caller treats the batch as stored.
            if "equal or smaller than the target stream top item" in str(exc):
                raise AlreadyStored(str(exc)) from exc
            raise
        if not written:
            raise Fenced(f"{fence_key} no longer holds this gateway's lease; nothing written")

    async def known_lines(self) -> set[str]:
        return {_text(v) for v in await self._redis.smembers(self._keys.lines)}

    async def stored_calls(self, line: str) -> list[Call]:
        raw = await self._redis.hgetall(self._keys.calls(line))
        return [_call(v) for v in raw.values()]

    async def recent_events(self, lines: Sequence[str], count: int = 200) -> dict[str, list[LineEvent]]:
        """The last ``count`` events stored for each of ``lines``, oldest first, pipelined: what an earlier
        term published, so a takeover can tell what it must still publish."""
        pipe = self._redis.pipeline(transaction=False)
        for line in lines:
            pipe.xrevrange(self._keys.events(line), max="+", min="-", count=count)
        found: dict[str, list[LineEvent]] = {}
        for line, entries in zip(lines, await pipe.execute(), strict=True):
            found[line] = [LineEvent.decode(fields[b"e"]) for _id, fields in reversed(entries or []) if fields]
        return found

    async def all_stored_calls(self, chunk: int = 500) -> dict[str, list[Call]]:
        """Every known line's active calls, pipelined (a takeover reads thousands of lines at once)."""
        lines = sorted(await self.known_lines())
        found: dict[str, list[Call]] = {}
        for start in range(0, len(lines), chunk):
            part = lines[start:start + chunk]
            pipe = self._redis.pipeline(transaction=False)
            for line in part:
                pipe.hgetall(self._keys.calls(line))
            for line, raw in zip(part, await pipe.execute(), strict=True):
                found[line] = [_call(v) for v in raw.values()]
        return found


class LineStateReader(LineReader):
    """The nodes' side, on Redis: snapshots and gap repair, never writes."""

    def __init__(self, client: aioredis.Redis, prefix: str) -> None:
        self._redis = client
        self._keys = LineKeys(prefix)

    async def snapshot(self, line: str) -> LineSnapshot:
        pipe = self._redis.pipeline(transaction=True)
        pipe.hgetall(self._keys.calls(line))
        pipe.get(self._keys.agent(line))
        pipe.hgetall(self._keys.pos(line))
        raw_calls, raw_agent, raw_pos = await pipe.execute()
        return _snapshot(line, raw_calls, raw_agent, raw_pos)

    async def positions(self, lines: Sequence[str]) -> dict[str, StreamPosition]:
        pipe = self._redis.pipeline(transaction=False)
        for line in lines:
            pipe.hgetall(self._keys.pos(line))
        return {line: _position(raw) for line, raw in zip(lines, await pipe.execute() if lines else [], strict=True)}

    async def events_after(self, line: str, position: StreamPosition, limit: int = 10_000) -> list[LineEvent]:
        """Events of ``line`` after ``position``, in its epoch only.

        Raises HistoryUnavailable when the position is from another epoch or already trimmed,
        i.e. when "nothing missed" cannot be proven.
        """
        epoch, seq = position.epoch, position.seq
        key = self._keys.events(line)
        entries = await self._redis.xrange(key, min=f"({epoch}-{seq}", max="+", count=limit) or []
        events = [LineEvent.decode(fields[b"e"]) for _id, fields in entries if fields]
        if events and (events[0].epoch != epoch or events[0].seq != seq + 1):
            raise HistoryUnavailable(
                f"line {line}: history continues at {events[0].position}, not {epoch or '-'}/{seq + 1}"
            )
        if not events:
            current = _position(await self._redis.hgetall(self._keys.pos(line)))
            if current != position and not (current.epoch == "" and seq == 0):
                raise HistoryUnavailable(f"line {line}: at {current}, cannot continue {position}")
        return events

    async def history_since(self, line: str, position: StreamPosition, limit: int = 10_000) -> LineHistory:
        """Everything after ``position``, across epochs, with the snapshot it leads to.

        Read in one MULTI, so the snapshot stands exactly where the returned history ends (the
        gateway writes state, history and position together)."""
        epoch, seq = position.epoch, position.seq
        start = f"{epoch}-{seq}" if epoch and seq > 0 else "-"
        pipe = self._redis.pipeline(transaction=True)
        pipe.xrange(self._keys.events(line), min=start, max="+", count=limit + 1)
        pipe.hgetall(self._keys.calls(line))
        pipe.get(self._keys.agent(line))
        pipe.hgetall(self._keys.pos(line))
        raw_entries, raw_calls, raw_agent, raw_pos = await pipe.execute()
        entries = list(raw_entries or [])
        anchored = start == "-"
        if entries and _text(entries[0][0]) == start:
            anchored = True
            entries = entries[1:]
        events = tuple(LineEvent.decode(fields[b"e"]) for _id, fields in entries if fields)
        return LineHistory(events=events, anchored=anchored, snapshot=_snapshot(line, raw_calls, raw_agent, raw_pos))


def _snapshot(line: str, raw_calls: Any, raw_agent: Any, raw_pos: Any) -> LineSnapshot:
    calls = tuple(sorted((_call(v) for v in raw_calls.values()), key=lambda c: c.started_at))
    agent = AgentState.from_dict(json.loads(raw_agent)) if raw_agent else None
    return LineSnapshot(line=line, position=_position(raw_pos), calls=calls, agent=agent)


def _position(raw_pos: Any) -> StreamPosition:
    if not raw_pos:
        return StreamPosition()
    return StreamPosition(_text(raw_pos.get(b"epoch", b"")), int(raw_pos.get(b"seq", 0)))


def _call(raw: Any) -> Call:
    try:
        return Call.from_dict(json.loads(raw))
    except ValueError as exc:
        raise WireError(f"bad call in Redis: {exc}") from exc


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
