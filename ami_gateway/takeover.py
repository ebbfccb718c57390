"""What a standby publishes when it takes over: the part of the truth the earlier term never did.

A standby follows the PBX as the active gateway does (its AMI session has events on and its tracker is
fed) but publishes nothing: its tracker's output goes to a :class:`ShadowLog` that keeps only the last
few seconds. Between the active gateway's death and the standby's takeover (a lease ttl or so) calls
ring, are refused busy and end without anybody publishing them; a resync at takeover cannot see them,
as their channels are gone. At takeover the standby therefore publishes, from its shadow log, what the
earlier term did not (:func:`unpublished`, judged against the line histories that term left in Redis),
then brings every live call the agents were told of up to date (:func:`reconcile`).

Pure: events and calls in, events out.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Mapping, Sequence

from services.wire import Call, CallState, EventType, LineEvent

#: call events each call and line gets at most once per term: one already in the history is not repeated
ONCE_PER_CALL = frozenset(
    {EventType.RING_STARTED, EventType.COMMUTATION_STARTED, EventType.ABONENT_BUSY, EventType.RING_FINISHED}
)
ANNOUNCING = frozenset({EventType.RING_STARTED, EventType.COMMUTATION_STARTED})


class ShadowLog:
    """A standby's own tracker output, kept for ``window`` seconds (and at most ``max_events``)."""

    def __init__(self, window: float, max_events: int = 50_000) -> None:
        self.window = window
        self.max_events = max_events
        self._entries: deque[tuple[float, LineEvent]] = deque()

    def __len__(self) -> int:
        return len(self._entries)

    def add(self, events: Iterable[LineEvent], now: float) -> None:
        for event in events:
            self._entries.append((now, event))
        self._trim(now)

    def take(self, now: float) -> list[LineEvent]:
        """The events of the last ``window`` seconds, oldest first; the log is empty afterwards."""
        self._trim(now)
        taken = [event for _at, event in self._entries]
        self._entries.clear()
        return taken

    def _trim(self, now: float) -> None:
        horizon = now - self.window
        while self._entries and (self._entries[0][0] < horizon or len(self._entries) > self.max_events):
            self._entries.popleft()


#: how far apart two gateways' clocks (each stamps ``ami_received_at`` with its own) may be trusted to agree
CLOCK_SKEW = 1.0


def unpublished(window: Sequence[LineEvent], history: Mapping[str, Sequence[LineEvent]]) -> list[LineEvent]:
    """The events of ``window`` (a standby's shadow log) that the earlier term did not publish.

    ``history``: per line, the last events that term stored. A call it finished is over for the agents:
    nothing more of it. An event a call gets once (ring, answer, busy, finish) that is already there is
    not repeated. The earlier term stored each line's events in order, so what the standby saw on a line
    well before (more than :data:`CLOCK_SKEW`) the last event stored for it was stored too; around that
    moment a repeatable event (hold, info, agent state) already there is not repeated. Everything else (a
    call that rang and ended while no gateway published, the answer of a call the earlier term only saw
    ringing) is published, in the shadow's order.
    """
    finished: set[tuple[str, str]] = set()
    published: set[tuple[str, str, EventType]] = set()
    stored_until: dict[str, float] = {}
    for line, events in history.items():
        for event in events:
            stored_until[line] = max(stored_until.get(line, 0.0), event.ami_received_at)
            if event.call is None:
                continue
            published.add((line, event.call.id, event.type))
            if event.type is EventType.RING_FINISHED:
                finished.add((line, event.call.id))
    out: list[LineEvent] = []
    for event in window:
        until = stored_until.get(event.line, 0.0)
        if event.call is not None:
            key = (event.line, event.call.id)
            if key in finished:
                continue
            if event.type in ONCE_PER_CALL:
                if (*key, event.type) in published:
                    continue
                out.append(event)
                continue
            if 0 < event.ami_received_at <= until + CLOCK_SKEW and (*key, event.type) in published:
                continue
        if 0 < event.ami_received_at < until - CLOCK_SKEW:
            continue  # stored before the earlier term's last event on this line
        out.append(event)
    return out


def after_lost_term(window: Sequence[LineEvent], unstored_since: float | None) -> list[LineEvent]:
    """What of a standby's shadow log to publish at a takeover that finds no earlier term in Redis (it came back
    empty, or failed over without the term's last writes): what agents saw is unknown.

    Every call end the standby saw goes out: the earlier term may have lost it with Redis (a call would stay on a
    panel), and a node passes an end on only to a tab that shows the call. A call that began at or after
    ``unstored_since`` (when the standby last saw the earlier term hold the lease, less :data:`CLOCK_SKEW`) and
    ended inside the window goes out whole, in order: from the restart on that term's writes were refused, so
    its agents may never have heard of it (a phone refusing busy while Redis restarts). Its ring, when an
    agent did get it, is silenced by the agent's session (same call, same state: ws_node.agent_session, rule
    10). Older calls give their end only: replaying a ring that long ago, Creatio would pop it up as a new
    call (issue 11). Live calls are not replayed: the takeover's resync states them as they are now.
    ``unstored_since`` None (never saw an earlier holder): ends only."""
    first: dict[tuple[str, str], LineEvent] = {}
    ended: set[tuple[str, str]] = set()
    for event in window:
        if event.call is None:
            continue
        key = (event.line, event.call.id)
        first.setdefault(key, event)
        if event.type is EventType.RING_FINISHED:
            ended.add(key)
    whole = {
        key for key in ended
        if unstored_since is not None and first[key].type in ANNOUNCING
        and first[key].ami_received_at >= unstored_since - CLOCK_SKEW
    }
    return [e for e in window if e.call is not None and (
        (e.line, e.call.id) in whole or ((e.line, e.call.id) in ended and e.type is EventType.RING_FINISHED))]


def reconcile(
    live: Mapping[str, Sequence[Call]],
    stored: Mapping[str, Sequence[Call]],
    published: Sequence[LineEvent],
    now: float,
    *,
    agents_knew_stored: bool,
) -> list[LineEvent]:
    """The new term's statement of every live call that ``published`` (this takeover's events so far) did
    not announce, as the tracker sees it now.

    A call agents were told of (``stored``: the calls the earlier term left in Redis) is restated as it is
    now: RING_STARTED while ringing, COMMUTATION_STARTED once answered (nodes pass on only what changed,
    rule 10 of ws_node.agent_session). A live call agents were never told of rings, and is answered if it
    is. ``agents_knew_stored`` False (no earlier term: a first start) means what agents saw is unknown: a
    connected call is then announced connected only.
    """
    said: set[tuple[str, str]] = {
        (e.line, e.call.id) for e in published if e.call is not None and e.type in ANNOUNCING
    }
    out: list[LineEvent] = []
    for line in sorted(live):
        known = {c.id for c in stored.get(line, ())}
        for call in live[line]:
            if call.state is CallState.BUSY or (line, call.id) in said:
                continue  # a refused call's ring and busy come from the shadow log or not at all
            connected = call.state in (CallState.CONNECTED, CallState.HELD)
            unseen = call.id not in known
            if not connected or (unseen and agents_knew_stored):
                out.append(LineEvent(line=line, type=EventType.RING_STARTED, ami_received_at=now,
                                     call=call.evolve(state=CallState.RINGING)))
            if connected:
                out.append(LineEvent(line=line, type=EventType.COMMUTATION_STARTED, call=call, ami_received_at=now))
    return out


def finished_ids(events: Iterable[LineEvent]) -> set[tuple[str, str]]:
    """(line, call id) of the calls ``events`` finish."""
    return {(e.line, e.call.id) for e in events if e.call is not None and e.type is EventType.RING_FINISHED}
