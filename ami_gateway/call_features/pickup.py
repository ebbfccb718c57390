"""Call pickup, one of the call tracker's features (ami_gateway/tracker.py).

Rule 9 - call pickup. Asterisk 12+ carries out a pickup (``Pickup()``, the ``*8``/``**<exten>`` feature codes) by
answering the picker's channel, giving it the ringing channel's connected line and *moving* it into the ringing
channel's place (a masquerade that swaps the two channels' Uniqueid and Linkedid): the picker's channel keeps its
Uniqueid and becomes the dialled party, the ringing channel's Uniqueid is left on a zombie that hangs up with cause
26 ("Answered elsewhere", set by the pickup so the ringing phone does not count a missed call). Then comes the
``Pickup`` event (``Channel`` = the picker, ``Target*`` = the ringing channel as it was) and the caller's
``DialEnd`` ``ANSWER`` naming the picker. The rung line's call therefore finishes, unanswered, with cause 26
"Answered elsewhere" (on that Hangup, or on ``Pickup`` if it comes first). On ``Pickup`` the picker, when it is a
line's phone, takes the ringing channel's place in the path (dialled by the same channel, in the same Linkedid):
its call is announced INCOMING from the original caller, with ``redirecting_number`` = the line it was meant for
and ``redirection_number`` = the picker's line, and is connected at once (the picker is already answered).
"""

from __future__ import annotations

import logging
from collections import OrderedDict

from ami.protocol import AmiMessage
from ami_gateway.call_moments import CallMoments
from ami_gateway.channel_graph import UP, Channel, ChannelGraph, Group, Role, meaningful
from services.wire import CallState, LineEvent

__all__ = ["Pickup"]

log = logging.getLogger(__name__)

# Q.850 cause 26, AST_CAUSE_ANSWERED_ELSEWHERE: set by Asterisk's pickup on the ringing channel it replaces.
_ANSWERED_ELSEWHERE = 26


class Pickup:
    """Rule 9; see the module docstring."""

    def __init__(self, graph: ChannelGraph, moments: CallMoments) -> None:
        self._graph = graph
        self._moments = moments
        # Uniqueid of a phone channel that hung up "answered elsewhere" -> (who dialled it, Linkedid), so a Pickup
        # that comes after that Hangup still knows whose place the picker takes.
        self._answered_elsewhere: OrderedDict[str, tuple[str | None, str]] = OrderedDict()

    def hung_up(self, ch: Channel, cause: int | None) -> None:
        """A channel hung up with ``cause``: remembered if it is a line's phone left behind by a pickup."""
        if cause == _ANSWERED_ELSEWHERE and ch.line is not None:
            self._answered_elsewhere[ch.key] = (ch.dialed_by, ch.linkedid)
            while len(self._answered_elsewhere) > 1000:
                self._answered_elsewhere.popitem(last=False)

    def on_pickup(self, msg: AmiMessage, event: str, at: float, out: list[LineEvent]) -> None:
        """Rule 9: the picker takes the ringing channel's place."""
        picker = self._graph.snap(msg, "", event)
        target = self._graph.find(msg, "Target")
        target_uid = (msg.get("TargetUniqueid") or "").strip()
        if target is not None:
            dialer, linkedid = target.dialed_by, target.linkedid
            target_line = target.line
            if target.call is not None and target.call.state is CallState.RINGING:
                self._moments.finish(target.call, at, out, _ANSWERED_ELSEWHERE, "Answered elsewhere")
                target.done = True
        else:
            dialer, linkedid = self._answered_elsewhere.get(target_uid, (None, ""))
            target_line = self._graph.matcher.line_of_channel((msg.get("TargetChannel") or "").strip())
        self._answered_elsewhere.pop(target_uid, None)
        linkedid = linkedid or (msg.get("TargetLinkedid") or "").strip()
        if picker is None or picker is target or picker.line is None or picker.done:
            return
        if picker.call is not None:
            log.debug("Pickup by %s, which already has call %s: ignored", picker.name, picker.call.id)
            return
        if meaningful(linkedid) and linkedid != picker.linkedid and not picker.children:
            # After the masquerade the picker carries the ringing channel's Linkedid: the call's id follows it.
            old = self._graph.groups.get(picker.linkedid)
            if old is not None:
                old.chans.discard(picker.key)
                if not old.chans and not old.calls:
                    del self._graph.groups[picker.linkedid]
            picker.linkedid = linkedid
            self._graph.groups.setdefault(linkedid, Group()).chans.add(picker.key)
        parent = self._graph.chans.get(dialer) if dialer is not None else None
        if parent is not None and parent is not picker and picker.dialed_by is None:
            picker.dialed_by = parent.key
            parent.children.add(picker.key)
        redirect = (target_line, picker.line) if target_line is not None and target_line != picker.line else ("", "")
        lc = self._moments.announce(picker, Role.INCOMING, at, out, redirect=redirect)
        if picker.state == UP:
            self._moments.connect(lc, at, out)
