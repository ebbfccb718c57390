"""The moments of a line's call and the view its agents see (Rules 3 to 5 of ami_gateway/tracker.py).

:class:`CallMoments` is what the call tracker and its features call when AMI says a moment came: a call is
announced (RING_STARTED, with its id and its role and direction), connected, busy, held or resumed, finished,
and its view (numbers, names, queue, redirections, extra) recomposed from the channel graph, with
CALL_INFO_CHANGED when a shown field changed. Each appends its :class:`~services.wire.LineEvent` to the list
it is given and keeps the graph's call tables up to date; none reads AMI.
"""

from __future__ import annotations

import logging

from ami_gateway.channel_graph import Channel, ChannelGraph, Group, LineCall, Role, dialled, meaningful
from ami_gateway.packet_info import PacketInfoSpec
from services.wire import Call, CallState, Direction, EventType, LineEvent

__all__ = ["CallMoments", "party"]

log = logging.getLogger(__name__)


class CallMoments:
    """See the module docstring. Not thread-safe; owned by one :class:`~ami_gateway.tracker.CallTracker`."""

    def __init__(self, graph: ChannelGraph, packet_info: PacketInfoSpec | None) -> None:
        self._graph = graph
        self._packet_info = packet_info

    # ---- calls -----------------------------------------------------------------------------------

    def role_of(self, ch: Channel) -> Role:
        origin, originated = self._graph.origin(ch)
        if origin is None and (originated or (ch.dialed_by is None and not ch.listed_as_dialled)):
            return Role.ORIGINATED
        return Role.INCOMING

    def direction_for(self, ch: Channel, role: Role, dest: Channel | None = None) -> Direction:
        if role is Role.INCOMING:
            origin, _ = self._graph.origin(ch)
            if origin is not None and origin.line is not None and origin.line != ch.line:
                return Direction.INTERNAL
            return Direction.INBOUND
        if dest is not None and self._graph.dest_line(dest) not in (None, ch.line):
            return Direction.INTERNAL
        return Direction.OUTBOUND

    def announce(
        self,
        ch: Channel,
        role: Role,
        at: float,
        out: list[LineEvent],
        dest: Channel | None = None,
        dial_exten: str = "",
        redirect: tuple[str, str] = ("", ""),
    ) -> LineCall:
        assert ch.line is not None
        group = self._graph.groups.setdefault(ch.linkedid, Group())
        base = f"{ch.linkedid}:{ch.line}"
        call_id, n = base, 1
        while call_id in group.used_ids:
            n += 1
            call_id = f"{base}:{n}"
        group.used_ids.add(call_id)
        direction = self.direction_for(ch, role, dest)
        if dial_exten and self._graph.matcher.is_line(dial_exten) and dial_exten != ch.line:
            direction = Direction.INTERNAL
        placeholder = Call(
            id=call_id,
            line=ch.line,
            linked_id=ch.linkedid,
            channel=ch.name,
            direction=direction,
            state=CallState.RINGING,
            started_at=at,
        )
        lc = LineCall(
            id=call_id,
            line=ch.line,
            uid=ch.key,
            linked_id=ch.linkedid,
            role=role,
            direction=direction,
            state=CallState.RINGING,
            started_at=at,
            call=placeholder,
        )
        if role is not Role.INCOMING and dest is not None and dialled(ch.exten):
            lc.dial_exten = ch.exten
        if dial_exten:
            lc.dial_exten = dial_exten
        lc.redirecting, lc.redirection = redirect
        lc.call = self.compose(lc)
        ch.call = lc
        group.calls.add(lc)
        self._graph.calls.setdefault(ch.line, {})[call_id] = lc
        out.append(LineEvent(line=ch.line, type=EventType.RING_STARTED, call=lc.call, ami_received_at=at))
        log.debug("call %s started on line %s (%s, %s)", call_id, ch.line, role.value, direction.value)
        return lc

    def ensure(self, ch: Channel, at: float, out: list[LineEvent]) -> LineCall | None:
        if ch.call is not None:
            return ch.call
        if ch.line is None or ch.done:
            return None
        return self.announce(ch, self.role_of(ch), at, out)

    def emit(self, lc: LineCall, kind: EventType, at: float, out: list[LineEvent]) -> None:
        lc.call = lc.call.evolve(state=lc.state, direction=lc.direction, answered_at=lc.answered_at)
        out.append(LineEvent(line=lc.line, type=kind, call=lc.call, ami_received_at=at))

    def connect(self, lc: LineCall, at: float, out: list[LineEvent]) -> None:
        if lc.answered_at is not None or lc.state is not CallState.RINGING:
            return
        lc.state = CallState.CONNECTED
        lc.answered_at = at
        self.refresh(lc, at, out, announce=False)
        self.emit(lc, EventType.COMMUTATION_STARTED, at, out)

    def busy(self, lc: LineCall, at: float, out: list[LineEvent]) -> None:
        if lc.state is CallState.BUSY:
            return
        lc.state = CallState.BUSY
        self.emit(lc, EventType.ABONENT_BUSY, at, out)

    def set_held(self, lc: LineCall, held: bool, at: float, out: list[LineEvent]) -> None:
        if held and lc.state is CallState.CONNECTED:
            lc.state = CallState.HELD
            self.emit(lc, EventType.HOLD_STARTED, at, out)
        elif not held and lc.state is CallState.HELD:
            lc.state = CallState.CONNECTED
            self.emit(lc, EventType.HOLD_ENDED, at, out)

    def finish(self, lc: LineCall, at: float, out: list[LineEvent], cause: int | None, text: str) -> None:
        lc.state = CallState.FINISHED
        lc.call = lc.call.evolve(
            state=CallState.FINISHED,
            direction=lc.direction,
            answered_at=lc.answered_at,
            ended_at=at,
            hangup_cause=cause,
            hangup_cause_text=text,
        )
        out.append(LineEvent(line=lc.line, type=EventType.RING_FINISHED, call=lc.call, ami_received_at=at))
        self._graph.forget(lc)
        log.debug("call %s finished on line %s (%s)", lc.id, lc.line, text or cause)

    # ---- the view the client sees ----------------------------------------------------------------

    def compose(self, lc: LineCall) -> Call:
        prev = lc.call
        ch = self._graph.chans.get(lc.uid)
        if ch is None:
            return prev
        chain = self._graph.chain(ch)
        origin = next((c for c in chain[1:] if not c.local_half), None)
        if lc.role is Role.INCOMING:
            if lc.remote is not None:
                caller_num, caller_name = lc.remote
            elif meaningful(ch.connected_num):
                caller_num = ch.connected_num
                caller_name = ch.connected_name if meaningful(ch.connected_name) else ""
            elif origin is not None:
                caller_num, caller_name = party(origin)
            else:
                caller_num, caller_name = "", ""
            called_num, called_name = lc.line, ch.own_name
        else:
            caller_num, caller_name = lc.line, ch.own_name
            if lc.remote is not None:
                called_num, called_name = lc.remote
            elif lc.dial_exten:
                called_num, called_name = lc.dial_exten, ""
            elif meaningful(ch.connected_num):
                called_num = ch.connected_num
                called_name = ch.connected_name if meaningful(ch.connected_name) else ""
            else:
                called_num, called_name = "", ""
        queue = next((c.queue for c in chain if c.queue), "")
        if not queue:
            group = self._graph.groups.get(lc.linked_id)
            queue = group.hints.get(lc.line, "") if group is not None else ""
        redirecting, redirection = lc.redirecting, lc.redirection
        if not redirecting:
            src = next((c for c in chain if c.transferred_by), None)
            if src is not None:
                redirecting, redirection = src.transferred_by, src.transfer_target
        extra = dict(prev.extra)
        if self._packet_info:
            for c in reversed(chain):
                extra.update(c.data)

        def keep(new: str, old: str) -> str:
            return new if new else old

        return prev.evolve(
            channel=ch.name,
            direction=lc.direction,
            state=lc.state,
            caller_number=keep(caller_num, prev.caller_number),
            caller_name=keep(caller_name, prev.caller_name),
            called_number=keep(called_num, prev.called_number),
            called_name=keep(called_name, prev.called_name),
            queue=keep(queue, prev.queue),
            redirecting_number=keep(redirecting, prev.redirecting_number),
            redirection_number=keep(redirection, prev.redirection_number),
            answered_at=lc.answered_at,
            extra=extra,
        )

    def refresh(self, lc: LineCall, at: float, out: list[LineEvent], announce: bool = True) -> None:
        new = self.compose(lc)
        changed = _shown(new) != _shown(lc.call)
        lc.call = new
        if changed and announce:
            out.append(LineEvent(line=lc.line, type=EventType.CALL_INFO_CHANGED, call=new, ami_received_at=at))

    def refresh_group(self, linkedid: str, at: float, out: list[LineEvent]) -> None:
        group = self._graph.groups.get(linkedid)
        if group is None:
            return
        for lc in sorted(group.calls, key=lambda c: (c.started_at, c.id)):
            self.refresh(lc, at, out)


def party(ch: Channel) -> tuple[str, str]:
    """How a channel is shown as the other party: a line by its number, anything else by its caller id."""
    if ch.line is not None:
        return ch.line, ch.own_name
    num = ch.caller_num if meaningful(ch.caller_num) else ""
    name = ch.caller_name if meaningful(ch.caller_name) else ""
    return num, name


def _shown(call: Call) -> tuple[object, ...]:
    return (
        call.channel,
        call.direction,
        call.caller_number,
        call.caller_name,
        call.called_number,
        call.called_name,
        call.queue,
        call.redirecting_number,
        call.redirection_number,
        tuple(sorted(call.extra.items())),
    )
