"""Hold by parking, one of the call tracker's features (ami_gateway/tracker.py).

Rule 8 - parking. ``ParkedCall`` about a channel that just left a bridge holds the calls of the phones that
were in that bridge with it (HOLD_STARTED); parked between answer and bridge, those of its Dial partner. The
space and lot are kept for :meth:`CallTracker.control`, so a resume command knows where to pick the call up.
Asterisk does not leave the agent's phone in the call: the two-party bridge dissolves behind the parkee and the
phone's channel hangs up (or runs on in the dialplan after ``Dial``). While its far end is parked, that
``Hangup`` does not finish the call: the call stays held, *detached* from any channel. ``UnParkedCall`` ends
the hold (HOLD_ENDED): the retriever becomes the call's channel when it is a phone of the same line (the
channel announced by :meth:`CallTracker.expect_retriever` is never announced as a call of its own, even when
the call it was meant for ended before it appeared, and once that call ends - picked up by someone else, given
up - its answer and hangup no longer touch it); picked up by anyone else, or given up (``ParkedCallGiveUp``),
or timed out (``ParkedCallTimeOut``: Asterisk then calls the parker back, a new call), a detached call
finishes. res_parking's events and the bridging core's reach AMI interleaved in any order: a ``ParkedCall``
before or after the parkee's ``BridgeLeave``, its ``BridgeEnter`` into the lot or its partner's leaving finds
the same partners (each channel keeps the peers of the last talking bridge it was in; holding bridges do not
count), and an ``UnParkedCall`` anywhere among the retrieving phone's events gives the same result. Not
covered: a ``ParkedCall`` after the phone's ``Hangup`` (res_parking hangs the parker up only after reading it
the space, which the same ``ParkedCall`` starts).
"""

from __future__ import annotations

import logging

from ami.protocol import AmiMessage
from ami_gateway.call_moments import CallMoments
from ami_gateway.channel_graph import Channel, ChannelGraph, LineCall, Role
from services.wire import CallState, LineEvent

__all__ = ["Parking"]

log = logging.getLogger(__name__)


class Parking:
    """Rule 8; see the module docstring."""

    def __init__(self, graph: ChannelGraph, moments: CallMoments) -> None:
        self._graph = graph
        self._moments = moments

    def on_parked_call(self, msg: AmiMessage, event: str, at: float, out: list[LineEvent]) -> None:
        parkee = self._graph.snap(msg, "Parkee", event)
        if parkee is None:
            return
        space = (msg.get("ParkingSpace") or "").strip()
        lot = (msg.get("Parkinglot") or msg.get("ParkingLot") or "").strip()
        for phone in self.partners(parkee):
            lc = phone.call
            if lc is None or lc.state not in (CallState.CONNECTED, CallState.HELD):
                continue
            lc.parked = (space, lot, parkee.key)
            self._graph.parked_calls.add(lc)
            self._moments.set_held(lc, True, at, out)

    def partners(self, parkee: Channel) -> list[Channel]:
        """The phones a parked channel was talking to: the peers of the last talking bridge it was in, else its
        Dial partner (parked between the answer and the bridge). Asterisk publishes ParkedCall from res_parking
        and the bridge events from the bridging core, and AMI interleaves the two as they come: the ParkedCall may
        arrive while the parkee is still in its bridge, after it left, after it entered the lot, or after the
        phone left the dissolving bridge. The peers kept at the last BridgeEnter are the same in every case."""
        dial = set(parkee.children) | ({parkee.dialed_by} if parkee.dialed_by is not None else set())
        for keys in (parkee.last_peers, dial):
            chans = [self._graph.chans[k] for k in sorted(keys) if k in self._graph.chans and k != parkee.key]
            phones = [c for c in chans if c.line is not None and c.consult_of is None and c.call is not None]
            if phones:
                return phones
        return []

    def on_unparked_call(self, msg: AmiMessage, event: str, at: float, out: list[LineEvent]) -> None:
        parkee = self._graph.snap(msg, "Parkee", event)
        if parkee is None:
            return
        retriever = self._graph.snap(msg, "Retriever", event)
        for lc in self._graph.calls_parking(parkee):
            self.unparked(lc, retriever, event, at, out)

    def unparked(
        self, lc: LineCall, retriever: Channel | None, event: str, at: float, out: list[LineEvent]
    ) -> None:
        lc.parked = None
        self._graph.parked_calls.discard(lc)
        attached = lc.uid in self._graph.chans
        if event != "unparkedcall":
            if not attached:
                why = "PARKED_TIMEOUT" if event == "parkedcalltimeout" else "PARKED_GIVEUP"
                self._moments.finish(lc, at, out, None, why)
            return
        if attached:
            self._moments.set_held(lc, False, at, out)
            return
        if retriever is not None and retriever.line == lc.line and retriever.call in (None, lc):
            # The line's phone picked its call up again: it is the call's channel from now on.
            retriever.call = lc
            lc.uid = retriever.key
            lc.retriever = ""
            self._moments.refresh(lc, at, out, announce=False)
            self._moments.set_held(lc, False, at, out)
            return
        self._moments.finish(lc, at, out, None, "PARKED_PICKUP")  # picked up by someone else

    def phone_gone(
        self, ch: Channel, lc: LineCall, at: float, out: list[LineEvent], cause: int | None, text: str
    ) -> None:
        """The call's phone channel hung up: the call is over, unless its far end is parked (Rule 8)."""
        if not self._graph.parked_alive(lc):
            self._moments.finish(lc, at, out, cause, text)
            return
        ch.call = None
        if lc.retriever == ch.key:
            lc.retriever = ""  # the phone called into the lot was not answered: the call stays parked
        if lc.uid == ch.key:
            # Keep showing the party the agent talked to, whatever the channel that picks the call up says.
            call = lc.call
            if lc.role is Role.INCOMING:
                lc.remote = (call.caller_number, call.caller_name)
            else:
                lc.remote = (call.called_number, call.called_name)
            lc.uid = ""
        log.debug("call %s on line %s stays held while parked; its phone channel %s is gone", lc.id, lc.line,
                  ch.name)
