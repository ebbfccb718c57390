"""Which sessions of this node follow which line, and where each line's stream stands.

Pure bookkeeping, no I/O: the feed asks it what to do with each incoming event.

For each line the node knows the last position it delivered, ``(epoch, seq)``. Epochs are the
gateway's claim times (strictly growing numbers); ``seq`` counts a line's events from 1 within
an epoch. An incoming event is, relative to that position:

* the next one (same epoch, seq + 1): deliver;
* old (same epoch, seq <= last): a duplicate from a publisher retry, or already covered by the
  snapshot the line started from: drop;
* of an older epoch: a straggler from a gateway that has been replaced: drop (stale);
* ahead (same epoch, seq > last + 1): events were missed: catch up from the Redis history;
* of a newer epoch: the gateway restarted (or lost continuity) and numbers from 1 again: catch
  up too. The new epoch is a complete stream from seq 1, so the agents get every one of its
  events, the first included (that first event is usually the RING_STARTED of the first call
  after a gateway restart).

Catching up (:func:`plan_catch_up`) walks the line's history after the node's position, read
from Redis together with the snapshot it leads to, and returns what to hand to the sessions:

1. every event that continues the stream: the next seq of the same epoch, or seq 1 of a newer
   epoch (the start of a new epoch continues any older one: the gateway restates in it what the
   old one left behind);
2. when continuity cannot be proven (the history was trimmed, or Redis lost it: the entry at
   the node's position is gone; a hole; the history stops short of the snapshot),
   a resync from the snapshot *after* those events, so the sessions end up exactly at the
   snapshot's state even if the node missed something in between;
3. the event that triggered the catch-up, when the history does not hold it yet (the gateway
   may publish before its Redis write lands) and the snapshot does not include it. It is never
   swallowed by a snapshot that does not contain it.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

from services.wire import LineEvent, StreamPosition

S = TypeVar("S")


class Verdict(enum.Enum):
    DELIVER = "deliver"
    DUPLICATE = "duplicate"
    GAP = "gap"
    NEW_EPOCH = "new_epoch"
    STALE = "stale"
    NOBODY = "nobody"


def continues(position: StreamPosition, event: LineEvent) -> bool:
    """Whether ``event`` comes right after ``position`` with nothing missed in between."""
    if event.epoch == position.epoch or position.epoch == "":
        return event.seq == position.seq + 1
    return event.seq == 1 and event.position.newer_epoch_than(position)


@dataclass(frozen=True, slots=True)
class CatchUpPlan:
    """What to hand to a line's sessions, in this order: ``events``; then, if ``resync_at`` is
    set, the snapshot read with the history (it stands at ``resync_at``); then ``live``."""

    events: tuple[LineEvent, ...]
    resync_at: StreamPosition | None
    live: LineEvent | None
    #: where the line stands afterwards
    position: StreamPosition


def plan_catch_up(
    position: StreamPosition,
    history: Sequence[LineEvent],
    anchored: bool,
    snapshot_at: StreamPosition,
    live: LineEvent | None = None,
    *,
    force_resync: bool = False,
) -> CatchUpPlan:
    """Bring a line from ``position`` up to date (see the module docstring).

    ``history`` is what Redis holds after ``position`` (or after an earlier position of the same
    epoch: older entries are skipped), ``anchored`` whether it is provably complete from there,
    ``snapshot_at`` where the snapshot read in the same transaction stands, ``live`` the event
    whose arrival started the catch-up (None for a repair after a broker reconnect).
    ``force_resync``: end with the snapshot anyway (the node handed out events unchecked)."""
    current = position
    lost = not anchored
    events: list[LineEvent] = []
    for event in history:
        if continues(current, event):
            events.append(event)
            current = event.position
        elif event.position > current:
            lost = True  # a hole; a newer epoch's seq 1, if any, resumes the stream
    if snapshot_at > current:
        lost = True  # the history stops short of the snapshot: the snapshot knows more
    resync_at: StreamPosition | None = None
    if force_resync or (lost and (snapshot_at != position or events)):
        # Also when Redis stands *behind* the node (it restarted empty): the snapshot is the
        # truth from now on, and the line continues from its position.
        resync_at = current = snapshot_at
    handed: LineEvent | None = None
    if live is not None and live.position > current:
        handed = live
        current = live.position
    return CatchUpPlan(events=tuple(events), resync_at=resync_at, live=handed, position=current)


class LineRouter(Generic[S]):
    def __init__(self) -> None:
        self._sessions: dict[str, set[S]] = {}
        self._positions: dict[str, StreamPosition] = {}

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

    def follows(self, line: str) -> bool:
        """True while a session of this node follows ``line``."""
        return line in self._sessions

    # ---- stream positions ------------------------------------------------------------------

    def position(self, line: str) -> StreamPosition | None:
        return self._positions.get(line)

    def start_from(self, line: str, position: StreamPosition) -> None:
        """Set where a line stands (from a snapshot) unless the node is already further on.

        An empty epoch means the line has no history yet: its first event will be seq 1.
        """
        current = self._positions.get(line)
        if current is None or (position.epoch and (current.epoch != position.epoch or current.seq < position.seq)):
            self._positions[line] = position

    def reset(self, line: str, position: StreamPosition) -> None:
        """Set where a line stands, forwards or back (a resync from a snapshot)."""
        if line in self._sessions:
            self._positions[line] = position

    def classify(self, event: LineEvent) -> Verdict:
        if event.line not in self._sessions:
            return Verdict.NOBODY
        current = self._positions.get(event.line)
        if current is None:
            return Verdict.DELIVER
        epoch, seq = current.epoch, current.seq
        if epoch == "":
            # The line had never been written when we started following it: its first epoch
            # starts at seq 1, so anything later than 1 is still a detectable gap.
            epoch = event.epoch
        if event.epoch != epoch:
            return Verdict.NEW_EPOCH if event.position.newer_epoch_than(StreamPosition(epoch)) else Verdict.STALE
        if event.seq <= seq:
            return Verdict.DUPLICATE
        if event.seq == seq + 1:
            return Verdict.DELIVER
        return Verdict.GAP

    def delivered(self, event: LineEvent) -> None:
        if event.line in self._sessions:
            self._positions[event.line] = event.position
