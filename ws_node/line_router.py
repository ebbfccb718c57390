"""Which sessions of this node follow which line, and where each line's stream stands.

Pure bookkeeping, no I/O: the feed asks it what to do with each incoming event.

For each line the node knows the last position it delivered, ``(epoch, seq)``. An incoming
event is, relative to that position:

* the next one (same epoch, seq + 1): deliver;
* old (same epoch, seq <= last): a duplicate from a publisher retry, or already covered by the
  snapshot the line started from: drop;
* ahead (same epoch, seq > last + 1): events were missed: repair from the Redis history first;
* of another epoch: continuity is lost on the gateway's side: resync every session of the line
  from a snapshot, then continue from this event's position.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from typing import Generic, TypeVar

from services.wire import LineEvent

S = TypeVar("S")


class Verdict(enum.Enum):
    DELIVER = "deliver"
    DUPLICATE = "duplicate"
    GAP = "gap"
    NEW_EPOCH = "new_epoch"
    NOBODY = "nobody"


class LineRouter(Generic[S]):
    def __init__(self) -> None:
        self._sessions: dict[str, set[S]] = {}
        self._positions: dict[str, tuple[str, int]] = {}

    # ---- membership ------------------------------------------------------------------------

    def attach(self, session: S, line: str) -> bool:
        """Add a session to a line. True when the line is new to this node (bind it)."""
        members = self._sessions.setdefault(line, set())
        first = not members
        members.add(session)
        return first

    def detach(self, session: S, line: str) -> bool:
        """Remove a session. True when nobody on this node follows the line any more (unbind)."""
        members = self._sessions.get(line)
        if not members or session not in members:
            return False
        members.discard(session)
        if members:
            return False
        del self._sessions[line]
        self._positions.pop(line, None)
        return True

    def sessions(self, line: str) -> Iterable[S]:
        return tuple(self._sessions.get(line, ()))

    def lines(self) -> list[str]:
        return list(self._sessions)

    def session_count(self) -> int:
        return sum(len(s) for s in self._sessions.values())

    # ---- stream positions ------------------------------------------------------------------

    def position(self, line: str) -> tuple[str, int] | None:
        return self._positions.get(line)

    def start_from(self, line: str, epoch: str, seq: int) -> None:
        """Set where a line stands (from a snapshot) unless the node is already further on.

        An empty epoch means the line has no history yet: its first event will be seq 1.
        """
        current = self._positions.get(line)
        if current is None or (epoch and (current[0] != epoch or current[1] < seq)):
            self._positions[line] = (epoch, seq)

    def reset(self, line: str, epoch: str, seq: int) -> None:
        """Forget the old position (a new epoch): the line continues from a fresh snapshot."""
        if line in self._sessions:
            self._positions[line] = (epoch, seq)

    def classify(self, event: LineEvent) -> Verdict:
        if event.line not in self._sessions:
            return Verdict.NOBODY
        current = self._positions.get(event.line)
        if current is None:
            return Verdict.DELIVER
        epoch, seq = current
        if epoch == "":
            # The line had never been written when we started following it: its first epoch
            # starts at seq 1, so anything later than 1 is still a detectable gap.
            epoch = event.epoch
        if event.epoch != epoch:
            return Verdict.NEW_EPOCH
        if event.seq <= seq:
            return Verdict.DUPLICATE
        if event.seq == seq + 1:
            return Verdict.DELIVER
        return Verdict.GAP

    def delivered(self, event: LineEvent) -> None:
        if event.line in self._sessions:
            self._positions[event.line] = (event.epoch, event.seq)
