"""In-memory sibling of the Redis line state (services/line_state.py), for unit tests of the shells.

A :class:`MemoryLineStore` is what Redis holds for one namespace: the epoch counter, plain string
keys (the lease a fenced writer checks), and per line the active calls, the agent state, the
position and the history. Gateways write through :class:`MemoryLineStateWriter`, nodes read through
:class:`MemoryLineStateReader`, all sharing one store, the way processes share one Redis.

Same contract as the Redis implementation (tests/support/store_contracts.py), with two
differences that only make it stricter: history is trimmed to exactly ``history_length`` entries
(Redis trims approximately, keeping more), and calls come back in the order they were written.
What Redis does on its own is done here on demand: :meth:`MemoryLineStore.clear` is a Redis that
restarted empty, :meth:`MemoryLineStore.drop_history` a history trimmed or lost,
``store.outage.fail()`` a Redis that does not answer, and ``writer.link`` / ``reader.link`` the
network between one client and Redis (``writer.link.lose_replies()``: a write that is stored but
whose answer never comes back).
"""

from __future__ import annotations

import bisect
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from services.line_state import Fenced, LineHistory, LineReader, LineSnapshot, LineWriter
from services.memory_store import Outage, round_trip
from services.wire import AgentState, Call, LineEvent, StreamPosition


@dataclass
class _Line:
    calls: dict[str, Call] = field(default_factory=dict)
    agent: AgentState | None = None
    position: StreamPosition | None = None
    #: (stream id, event), ids ascending: the history stream
    history: list[tuple[tuple[int, int], LineEvent]] = field(default_factory=list)


def _stream_id(position: StreamPosition) -> tuple[int, int]:
    if not position.epoch.isdigit() or position.seq < 1:
        # Redis refuses such an id in XADD too: only positioned events are stored.
        raise ValueError(f"not a positioned event: {position}")
    return (int(position.epoch), position.seq)


class MemoryLineStore:
    """One namespace's line state, shared by the writers and readers made on it."""

    def __init__(self) -> None:
        self.outage = Outage("memory line store")
        #: plain string keys, e.g. the gateway lease a fenced write checks
        self.strings: dict[str, str] = {}
        self._epoch = 0
        self._lines: dict[str, _Line] = {}

    def clear(self) -> None:
        """Everything vanishes, the epoch counter and the lease too: a Redis that restarted empty."""
        self.strings.clear()
        self._epoch = 0
        self._lines.clear()

    def drop_history(self, line: str) -> None:
        """The line's history is gone (trimmed away, or lost); its state and position stay."""
        state = self._lines.get(line)
        if state is not None:
            state.history.clear()

    def _line(self, line: str) -> _Line:
        return self._lines.setdefault(line, _Line())


class MemoryLineStateWriter(LineWriter):
    def __init__(self, store: MemoryLineStore, history_length: int = 1000) -> None:
        self._store = store
        self.link = Outage("link to the memory line store")
        self._history_length = history_length
        self._fence: tuple[str, str] | None = None

    async def new_epoch(self, now_ms: int | None = None) -> str:
        now_ms = int(time.time() * 1000) if now_ms is None else now_ms
        await round_trip(self._store.outage, self.link)
        self._store._epoch = max(self._store._epoch + 1, now_ms)
        return str(self._store._epoch)

    def fence(self, key: str, token: str) -> None:
        self._fence = (key, token)

    async def write(self, events: Sequence[LineEvent]) -> None:
        if not events:
            return
        await round_trip(self._store.outage, self.link)
        if self._fence is not None and self._store.strings.get(self._fence[0]) != self._fence[1]:
            raise Fenced(f"{self._fence[0]} no longer holds this gateway's lease; nothing written")
        for event in events:
            state = self._store._line(event.line)
            stream_id = _stream_id(event.position)
            if not state.history or stream_id > state.history[-1][0]:
                state.history.append((stream_id, event))
                del state.history[: max(0, len(state.history) - self._history_length)]
            # else: already stored (a retry whose reply was lost); Redis skips it the same way
            if event.call is not None:
                if event.call.on_line:
                    state.calls[event.call.id] = event.call
                else:
                    state.calls.pop(event.call.id, None)
            if event.agent is not None:
                state.agent = event.agent
            state.position = event.position
        self.link.answer()

    async def all_stored_calls(self, chunk: int = 500) -> dict[str, list[Call]]:
        await round_trip(self._store.outage, self.link)
        return {line: list(state.calls.values()) for line, state in sorted(self._store._lines.items())
                if state.position is not None}


class MemoryLineStateReader(LineReader):
    def __init__(self, store: MemoryLineStore) -> None:
        self._store = store
        self.link = Outage("link to the memory line store")

    async def snapshot(self, line: str) -> LineSnapshot:
        await round_trip(self._store.outage, self.link)
        return self._snapshot(line)

    async def history_since(self, line: str, position: StreamPosition, limit: int = 10_000) -> LineHistory:
        await round_trip(self._store.outage, self.link)
        history = self._store._lines[line].history if line in self._store._lines else []
        # XRANGE from the position itself, COUNT limit + 1: the entry at the position, when still
        # there, proves nothing after it was trimmed away, and is not handed out.
        if position.epoch and position.seq > 0:
            start = (int(position.epoch) if position.epoch.isdigit() else 0, position.seq)
            first = bisect.bisect_left(history, start, key=lambda entry: entry[0])
            entries = history[first : first + limit + 1]
            anchored = bool(entries) and entries[0][0] == start
            if anchored:
                entries = entries[1:]
        else:
            entries, anchored = history[: limit + 1], True
        events = tuple(event for _id, event in entries)
        return LineHistory(events=events, anchored=anchored, snapshot=self._snapshot(line))

    async def positions(self, lines: Sequence[str]) -> dict[str, StreamPosition]:
        await round_trip(self._store.outage, self.link)
        return {line: self._snapshot(line).position for line in lines}

    def _snapshot(self, line: str) -> LineSnapshot:
        state = self._store._lines.get(line)
        if state is None:
            return LineSnapshot(line=line, position=StreamPosition(), calls=(), agent=None)
        calls = tuple(sorted(state.calls.values(), key=lambda c: c.started_at))
        return LineSnapshot(line=line, position=state.position or StreamPosition(), calls=calls, agent=state.agent)
