"""Consultation by ``Atxfer``, one of the call tracker's features (ami_gateway/tracker.py).

Rule 7 - consultation by ``Atxfer``. Asterisk 12+ carries out the AMI ``Atxfer`` action by calling a Local
channel ``Local/<exten>@<context>-<seq>;1`` on behalf of the transferer (same Linkedid) and moving the
transferer's phone channel out of its bridge into a new one with that ``;1`` half; the ``;2`` half runs the
dialplan and dials the target. A phone channel that enters a bridge with a ``;1`` half nobody dialled, of its own
Linkedid, is therefore consulting: the ``;1`` half becomes the line's *consultation leg* and carries a second
call on the line (its own id, ``<linkedid>:<line>:2``, role DIALING, called number = the target), the
original call is held (HOLD_STARTED) until the phone is back in a bridge with another party (HOLD_ENDED, the
transfer was cancelled) or hangs up (the transfer completed: the consultation leg's call finishes with it).
The target's view follows the ``;1`` half back to the transferer, so it is an internal call from the line.
"""

from __future__ import annotations

import logging

from ami_gateway.call_moments import CallMoments
from ami_gateway.channel_graph import Channel, ChannelGraph, Role, dialled
from services.wire import CallState, LineEvent

__all__ = ["Consultation"]

log = logging.getLogger(__name__)


class Consultation:
    """Rule 7; see the module docstring."""

    def __init__(self, graph: ChannelGraph, moments: CallMoments) -> None:
        self._graph = graph
        self._moments = moments

    def detect(self, members: set[str], at: float, out: list[LineEvent]) -> None:
        """Rule 7: a phone bridged with a Local ;1 half nobody dialled, of its own call, is consulting."""
        chans = [self._graph.chans[k] for k in sorted(members) if k in self._graph.chans]
        phones = [c for c in chans if c.line is not None and c.consult_of is None and c.call is not None]
        for leg in chans:
            if leg.local_half != ";1" or leg.consult_of is not None or leg.dialed_by is not None or leg.originated:
                continue
            if leg.call is not None or leg.done:
                continue
            phone = next((p for p in phones if p.linkedid == leg.linkedid), None)
            if phone is None or phone.call is None or phone.call.state not in (CallState.CONNECTED, CallState.HELD):
                continue
            original = phone.call
            leg.consult_of = phone.key
            leg.line = phone.line
            leg.own_name = phone.own_name
            if original.state is CallState.CONNECTED:
                original.held_by_consult = True
                self._moments.set_held(original, True, at, out)
            target = _local_exten(leg.name)
            self._moments.announce(leg, Role.DIALING, at, out, dial_exten=target if dialled(target) else "")
            log.debug("line %s consults %s in call %s", leg.line, target, original.id)

    def phone_bridged(self, phone: Channel, members: set[str], at: float, out: list[LineEvent]) -> None:
        """A consulting phone back in a bridge with another party than its consultation leg: the consultation was
        cancelled, the original call is resumed."""
        lc = phone.call
        if lc is not None and lc.held_by_consult and phone.line is not None and phone.consult_of is None:
            others = [self._graph.chans[k] for k in members if k != phone.key and k in self._graph.chans]
            if any(o.consult_of is None for o in others):
                # Back with the other party: the consultation was cancelled.
                lc.held_by_consult = False
                self._moments.set_held(lc, False, at, out)

    def transferer_gone(self, ch: Channel, cause: int | None, text: str, at: float, out: list[LineEvent]) -> None:
        """A line's phone hung up: its consultation legs are over for this line (the transfer completed)."""
        if ch.line is not None and ch.consult_of is None:
            for leg in [c for c in self._graph.chans.values() if c.consult_of == ch.key]:
                if leg.call is not None:
                    self._moments.finish(leg.call, at, out, cause, text)
                leg.consult_of = None
                leg.line = None


def _local_exten(name: str) -> str:
    """``Local/306@from-internal-0000000a;1`` -> ``306``."""
    rest = name.split("/", 1)[1] if "/" in name else name
    return rest.split("@", 1)[0]
