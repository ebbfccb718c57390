"""Each line's state in Redis: current calls, agent state, stream position, recent history.

The gateway is the single writer. For every batch of events it writes, in one MULTI/EXEC:
the calls hash, the agent state, the history stream entries and the position, *before* it
publishes the events. So a node that receives event (epoch, n) from RabbitMQ can always find
everything up to n in Redis, and a node that missed events can fill the gap from the stream.

Keys (``P`` = deployment prefix, ``L`` = line)::

    P:epoch              the current gateway epoch (milliseconds since 1970, strictly growing)
    P:lines              set of lines the gateway has ever written
    P:line:L:calls       hash  call id -> Call JSON (active calls only)
    P:line:L:agent       AgentState JSON
    P:line:L:pos         hash  epoch, seq
    P:line:L:events      stream, entry id "<epoch>-<seq>", field "e" = LineEvent JSON

Using ``<epoch>-<seq>`` as the stream id makes "everything after position (e, s)" a single
XRANGE, and makes ids grow across epochs because epochs are strictly growing.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis

from services.wire import AgentState, Call, LineEvent, WireError


@dataclass(frozen=True, slots=True)
class LineSnapshot:
    line: str
    epoch: str
    seq: int
    calls: tuple[Call, ...]
    agent: AgentState | None


class HistoryUnavailable(Exception):
    """The requested position is no longer (or not yet) in the line's history: take a snapshot."""


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


class LineStateWriter:
    """The gateway's side. Not safe to share between two gateways: there is one writer."""

    def __init__(self, client: aioredis.Redis, prefix: str, history_length: int = 1000) -> None:
        self._redis = client
        self._keys = LineKeys(prefix)
        self._history_length = history_length

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

    async def write(self, events: Sequence[LineEvent]) -> None:
        """Store positioned events, and apply each one's call to the line's active-calls hash.

        Deriving the hash from the events themselves keeps it exactly as of the last event
        written: a snapshot never shows a call whose events are not in the stream yet.
        """
        if not events:
            return
        pipe = self._redis.pipeline(transaction=True)
        last: dict[str, LineEvent] = {}
        for event in events:
            line = event.line
            pipe.xadd(
                self._keys.events(line),
                {"e": event.encode()},
                id=f"{event.epoch}-{event.seq}",
                maxlen=self._history_length,
                approximate=True,
            )
            if event.call is not None:
                if event.call.on_line:  # a busy call stays in snapshots until its RING_FINISHED
                    pipe.hset(self._keys.calls(line), event.call.id, json.dumps(event.call.to_dict()))
                else:
                    pipe.hdel(self._keys.calls(line), event.call.id)
            if event.agent is not None:
                pipe.set(self._keys.agent(line), json.dumps(event.agent.to_dict()))
            last[line] = event
        for line, event in last.items():
            pipe.hset(self._keys.pos(line), mapping={"epoch": event.epoch, "seq": event.seq})
            pipe.sadd(self._keys.lines, line)
        await pipe.execute()

    async def known_lines(self) -> set[str]:
        return {_text(v) for v in await self._redis.smembers(self._keys.lines)}

    async def stored_calls(self, line: str) -> list[Call]:
        raw = await self._redis.hgetall(self._keys.calls(line))
        return [_call(v) for v in raw.values()]

    async def clear_line(self, line: str) -> None:
        await self._redis.delete(
            self._keys.calls(line), self._keys.agent(line), self._keys.pos(line), self._keys.events(line)
        )


class LineStateReader:
    """The nodes' side: snapshots and gap repair, never writes."""

    def __init__(self, client: aioredis.Redis, prefix: str) -> None:
        self._redis = client
        self._keys = LineKeys(prefix)

    async def snapshot(self, line: str) -> LineSnapshot:
        pipe = self._redis.pipeline(transaction=True)
        pipe.hgetall(self._keys.calls(line))
        pipe.get(self._keys.agent(line))
        pipe.hgetall(self._keys.pos(line))
        raw_calls, raw_agent, raw_pos = await pipe.execute()
        calls = tuple(sorted((_call(v) for v in raw_calls.values()), key=lambda c: c.started_at))
        agent = AgentState.from_dict(json.loads(raw_agent)) if raw_agent else None
        epoch = _text(raw_pos.get(b"epoch", b"")) if raw_pos else ""
        seq = int(raw_pos.get(b"seq", 0)) if raw_pos else 0
        return LineSnapshot(line=line, epoch=epoch, seq=seq, calls=calls, agent=agent)

    async def events_after(self, line: str, epoch: str, seq: int, limit: int = 10_000) -> list[LineEvent]:
        """Events of ``line`` after position (epoch, seq), in order.

        Raises HistoryUnavailable when the position is from another epoch or already trimmed,
        i.e. when "nothing missed" cannot be proven.
        """
        key = self._keys.events(line)
        entries = await self._redis.xrange(key, min=f"({epoch}-{seq}", max="+", count=limit) or []
        events = [LineEvent.decode(fields[b"e"]) for _id, fields in entries if fields]
        if events and (events[0].epoch != epoch or events[0].seq != seq + 1):
            raise HistoryUnavailable(
                f"line {line}: history continues at {events[0].epoch}/{events[0].seq}, not {epoch}/{seq + 1}"
            )
        if not events:
            pos = await self._redis.hgetall(self._keys.pos(line))
            cur_epoch = _text(pos.get(b"epoch", b"")) if pos else ""
            cur_seq = int(pos.get(b"seq", 0)) if pos else 0
            if (cur_epoch, cur_seq) != (epoch, seq) and not (cur_epoch == "" and seq == 0):
                raise HistoryUnavailable(f"line {line}: at {cur_epoch}/{cur_seq}, cannot continue {epoch}/{seq}")
        return events


def _call(raw: Any) -> Call:
    try:
        return Call.from_dict(json.loads(raw))
    except ValueError as exc:
        raise WireError(f"bad call in Redis: {exc}") from exc


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
