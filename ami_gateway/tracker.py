"""The call tracker: raw AMI events in, one clean call model per agent line out.

Pure: no sockets, no clock reads of its own, no asyncio. :meth:`CallTracker.handle` takes one parsed AMI
message and returns the :class:`~services.wire.LineEvent` values it causes (without stream positions; the
sequencer numbers them later). Replaying a recorded transcript therefore reproduces the exact events.

Theory of operation
-------------------
Asterisk (12+) describes a call as *channels* (one per leg: the caller's trunk, Local ``;1``/``;2`` halves,
the agent's phone) that are created, dialled, bridged and hung up. All legs of one call share a
``Linkedid``. Every channel event carries a full snapshot of its channel (``Channel``, ``Uniqueid``,
``Linkedid``, ``ChannelState``, caller id, connected line...), Dial events carry a second one prefixed
``Dest``. The tracker keeps a table of live channels, updated from every snapshot it sees, so it never
depends on having seen ``Newchannel``.

Where each part lives: :class:`CallTracker` (this module) reads each AMI event and applies the core rules
(1 to 6) and the resync (11). Its tables - channels, Local pairs, bridges, who dialled whom, the channels and
calls of each Linkedid, each line's live calls - are a ``ChannelGraph`` (ami_gateway/channel_graph.py); the
moments of a call and the view its agents see are ``CallMoments`` (ami_gateway/call_moments.py); the features
(rules 7 to 10) are one class each in ami_gateway/call_features/.

Rule 1 - lines. A channel is an agent line's *phone channel* when :class:`~ami_gateway.lines.LineMatcher`
says so (``SIP/305-00000004`` -> ``305``). Only phone channels get calls. Trunks are remote parties; Local
channels are hops.

Rule 2 - the path back. ``DialBegin`` records who dialled whom (``dialed_by``); a ``DialBegin`` without a
``Channel`` is an ``Originate`` (click-to-dial). A Local ``;2`` half leads back to its ``;1`` half (paired
by ``LocalBridge`` and by name). Walking that path upwards from a phone channel, through any number of Local
hops, gives the call's *origin*: the first real channel (the caller), or "originated".

Rule 3 - roles and direction. A phone channel has one of three roles:

* INCOMING - it was dialled by someone: the agent is the called party. Direction ``internal`` if the origin
  is another line's phone, else ``inbound``.
* ORIGINATED - click-to-dial: the agent's own phone is rung first, then the dialplan dials the number.
  Direction ``outbound`` (``internal`` once it turns out to dial a line).
* DIALING - the agent dialled from the phone (its channel runs ``Dial``). ``outbound`` or ``internal``.

Rule 4 - the moments. Per line and call, exactly this order, each at most once:

* RING_STARTED. INCOMING/ORIGINATED: on the phone channel's ``Newstate`` Ringing (state 5) if
  ``send_ring_started_on_ringing_state`` (the default), else on the ``DialBegin`` that dials it. DIALING: on
  the phone channel's first ``DialBegin`` as the caller. Any later moment (an answer without ringing, a
  resync) announces the call first if it was not announced.
* COMMUTATION_STARTED. The agent's leg is answered *and connected to the other party*: ``DialEnd`` with
  ``DialStatus: ANSWER`` for the agent's leg (as the dialled party when INCOMING, as the dialler when
  DIALING/ORIGINATED - the answer of an Originate only means the agent picked up their own phone). Fallback:
  the phone channel, Up, entering a bridge with another channel.
* HOLD_STARTED / HOLD_ENDED on ``Hold``/``Unhold`` of the phone channel; for Asterisk without those events,
  ``MusicOnHoldStart``/``Stop`` on a channel bridged with the agent's phone (only until the first
  ``Hold``/``Unhold`` shows the PBX reports holds itself).
* CALL_INFO_CHANGED when a field the client shows (numbers, names, queue, redirecting/redirection numbers,
  direction, extra) changes: ``NewCallerid``, ``NewConnectedLine``, queue events, ``BlindTransfer``,
  ``AttendedTransfer``. View fields are sticky: information is never replaced by an empty value, so the
  Local halves hanging up before the phone does not blank the queue or the caller.
* ABONENT_BUSY (state ``busy``) on ``DialEnd`` ``BUSY`` of the agent's leg.
* RING_FINISHED (state ``finished``), exactly once, last: on ``Hangup`` of the phone channel with its cause,
  or at once on ``DialEnd`` ``CANCEL``/``NOANSWER``/``BUSY``/... when the agent was the dialled party (the
  ring is over; ``hangup_cause_text`` is then the dial status). The call then leaves the live tables.

Rule 5 - ids. A call's id is ``"<linkedid>:<line>"`` (``":2"``, ``":3"``... if the same line is rung again
in the same call, e.g. a queue retry). It is fixed when the call is announced, so it survives transfers and
Local hops.

Rule 6 - robustness. Events about unknown or already hung-up channels, duplicates, missing or garbage
headers are ignored (debug log); a hung-up channel is remembered for a while so a late event cannot bring
it back. Channels, bridges and Local pairs are dropped on ``Hangup``; per-call data when the last channel
of a Linkedid goes; a hard cap bounds the channel table if Hangups were lost.

The features, each in its own module of ami_gateway/call_features (its docstring has the rule in full):

Rule 7 - consultation by ``Atxfer`` (``consultation.py``): the Local ``;1`` leg of an Atxfer is a second call
of the transferer's line; the original call is held until the transfer completes or is cancelled.

Rule 8 - parking (``parking.py``): a parked far end holds the calls it talked to; a call whose phone hung up
while its far end waits in the lot stays held, detached, until it is picked up again, given up or times out.

Rule 9 - call pickup (``pickup.py``): the picker takes the ringing channel's place; the rung line's call
finishes "Answered elsewhere".

Rule 10 - DTMF (``dtmf.py``): a key the agent pressed on the phone is DTMF_ENTERED for the line's current call.

Rule 11 - resync. After an AMI (re)connect, the ``CoreShowChannel`` list is the truth: calls whose phone
channel is gone are finished, new phone channels are announced as their state says (one still Down, Rsrvd,
OffHook or Dialing is no call yet: its own events announce it), a ringing call found answered gets its
COMMUTATION_STARTED.

Agent state (queue membership and pause) is not the tracker's: see ami_gateway/agent_tracker.py.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection
from dataclasses import dataclass

from ami.protocol import AmiMessage
from ami_gateway.agent_tracker import MEMBER_EVENTS
from ami_gateway.call_features.consultation import Consultation
from ami_gateway.call_features.dtmf import Dtmf
from ami_gateway.call_features.parking import Parking
from ami_gateway.call_features.pickup import Pickup
from ami_gateway.call_moments import CallMoments, party
from ami_gateway.channel_graph import RINGING, UP, Channel, ChannelGraph, LineCall, Role, as_int, dialled, meaningful
from ami_gateway.lines import LineMatcher
from ami_gateway.packet_info import PacketInfoSpec
from services.wire import Call, CallState, Direction, EventType, LineEvent

__all__ = ["CallControl", "CallTracker", "TrackerOptions"]

log = logging.getLogger(__name__)

#: Down, Rsrvd, OffHook, Dialing: a phone channel in these states is not in a call yet (the live rules announce
#: it when it rings or dials out); a resync that finds one must not guess a call from it (Rule 11)
_NOT_A_CALL_YET = frozenset({0, 1, 2, 3})
_FAILED_DIAL = frozenset({"CANCEL", "NOANSWER", "BUSY", "CONGESTION", "CHANUNAVAIL", "DONTCALL", "TORTURE"})
_QUEUE_AGENT_EVENTS = frozenset({"agentcalled", "agentconnect", "agentcomplete", "agentringnoanswer", "agentdump"})
_Handler = Callable[[AmiMessage, str, float, list[LineEvent]], None]


def _holding(msg: AmiMessage) -> bool:
    """A BridgeEnter into a holding bridge (a parking lot's): its members wait, they do not talk to each other."""
    kind = (msg.get("BridgeType") or "").strip().lower()
    return kind in ("parking", "holding") or (msg.get("BridgeTechnology") or "").strip().lower() == "holding_bridge"


@dataclass(frozen=True)
class TrackerOptions:
    #: CMS's sendRingStartedOnRingingState: announce an incoming call when the phone rings (state 5), not
    #: when Asterisk starts dialling it.
    send_ring_started_on_ringing_state: bool = True
    packet_info: PacketInfoSpec | None = None
    #: hard cap on tracked channels (only reached if Hangup events were lost); the oldest are dropped.
    max_channels: int = 50_000
    #: how many hung-up channel ids are remembered to ignore late events about them.
    remember_hangups: int = 10_000


@dataclass(frozen=True, slots=True)
class CallControl:
    """What a command needs to act on one call of a line (see :meth:`CallTracker.control`)."""

    call: Call
    #: the line's own channel of this call: the phone channel, or the Local ;1 leg of an Atxfer consultation.
    channel: str
    #: the channel the line talks to (bridged with ``channel``; for a consultation, the dialled target), or "".
    peer: str = ""
    #: for an Atxfer consultation: the phone channel that is transferring (hang it up to complete the transfer).
    transferer: str = ""
    #: while the far end is parked (hold by parking): the parking space and lot.
    parked_space: str = ""
    parking_lot: str = ""
    #: the parked channel (the party the line talked to) while parked.
    parked_channel: str = ""
    #: the phone channel's technology (SIP, PJSIP...).
    tech: str = ""


class CallTracker:
    """See the module docstring. Not thread-safe; one instance per AMI connection's event stream.

    Every timestamp in a :class:`~services.wire.Call` comes from the ``received_at`` given with the message
    (it reads no clock), so replaying a transcript is deterministic.
    """

    def __init__(
        self,
        matcher: LineMatcher,
        options: TrackerOptions = TrackerOptions(),  # noqa: B008 - frozen, safe to share
    ) -> None:
        self._matcher = matcher
        self._opts = options
        self._graph = ChannelGraph(matcher, options.packet_info, options.max_channels, options.remember_hangups)
        self._moments = CallMoments(self._graph, options.packet_info)
        # Set by the first Hold/Unhold event: this PBX reports holds natively, music on hold is then only
        # a consequence (and stops when a held call is transferred away, which is not an unhold).
        self._native_hold = False
        self._consultation = Consultation(self._graph, self._moments)
        self._parking = Parking(self._graph, self._moments)
        self._pickup = Pickup(self._graph, self._moments)
        dtmf = Dtmf(self._graph)
        self._handlers: dict[str, _Handler] = {
            "newchannel": self._on_snapshot,
            "newstate": self._on_snapshot,
            "newcallerid": self._on_snapshot,
            "newconnectedline": self._on_snapshot,
            "dialbegin": self._on_dial_begin,
            "dialstate": self._on_dial_state,
            "dialend": self._on_dial_end,
            "hangup": self._on_hangup,
            "localbridge": self._on_local_bridge,
            "bridgeenter": self._on_bridge_enter,
            "bridgeleave": self._on_bridge_leave,
            "bridgedestroy": self._on_bridge_destroy,
            "hold": self._on_hold,
            "unhold": self._on_hold,
            "musiconholdstart": self._on_moh,
            "musiconholdstop": self._on_moh,
            "queuecallerjoin": self._on_queue_caller_join,
            "blindtransfer": self._on_blind_transfer,
            "attendedtransfer": self._on_attended_transfer,
            "rename": self._on_rename,
            "parkedcall": self._parking.on_parked_call,
            "unparkedcall": self._parking.on_unparked_call,
            "parkedcallgiveup": self._parking.on_unparked_call,
            "parkedcalltimeout": self._parking.on_unparked_call,
            "pickup": self._pickup.on_pickup,
            "dtmfbegin": dtmf.on_dtmf,
            "dtmfend": dtmf.on_dtmf,
        }

    # ---- queries ---------------------------------------------------------------------------------

    def calls_of(self, line: str) -> list[Call]:
        """The line's live calls (announced, not finished), oldest first."""
        return [lc.call for lc in self._graph.calls.get(line, {}).values()]

    def lines(self) -> set[str]:
        """Lines with a live call."""
        return {line for line, calls in self._graph.calls.items() if calls}

    def control(self, line: str, call_id: str) -> CallControl | None:
        """The channels behind a live call of ``line`` (``None`` if the line has no such call)."""
        lc = self._graph.calls.get(line, {}).get(call_id)
        if lc is None:
            return None
        ch = self._graph.chans.get(lc.uid)
        if ch is None:
            if lc.parked is None:
                return None
            # Detached (Rule 8): the far end waits in the lot, the line's phone has left the call.
            space, lot, parkee_key = lc.parked
            parkee = self._graph.chans.get(parkee_key)
            return CallControl(lc.call, "", "", "", space, lot, parkee.name if parkee is not None else "",
                               self._graph.line_tech.get(line, ""))
        peer = ""
        transferer = ""
        if ch.consult_of is not None:
            phone = self._graph.chans.get(ch.consult_of)
            transferer = phone.name if phone is not None else ""
            target = self._graph.consult_target(ch)
            peer = target.name if target is not None else ""
        else:
            other = self._graph.bridge_peer(ch, None) if ch.bridge else None
            if other is None and lc.state is CallState.CONNECTED:
                # Answered a moment ago, not bridged yet: the party is the one dialling it, or the one it dials.
                if ch.dialed_by is not None:
                    other = self._graph.chans.get(ch.dialed_by)
                else:
                    other = next((self._graph.chans[k] for k in sorted(ch.children) if k in self._graph.chans), None)
            peer = other.name if other is not None else ""
        space, lot, parked = "", "", ""
        if lc.parked is not None:
            space, lot, parkee_key = lc.parked
            parkee = self._graph.chans.get(parkee_key)
            parked = parkee.name if parkee is not None else ""
        tech = ch.name.split("/", 1)[0] if ch.consult_of is None else transferer.split("/", 1)[0]
        return CallControl(lc.call, ch.name, peer, transferer, space, lot, parked, tech)

    def expect_retriever(self, line: str, call_id: str, uniqueid: str) -> None:
        """The channel with ``uniqueid`` (an ``Originate`` ``ChannelId``) is ``line``'s phone called into the
        parking lot to resume ``call_id``: it carries that call, it is not announced as a new one."""
        self._graph.retrievers[uniqueid] = (line, call_id)
        while len(self._graph.retrievers) > 1000:
            self._graph.retrievers.popitem(last=False)

    def tech_of(self, line: str) -> str | None:
        """The channel technology the line's phone last used (``PJSIP``), ``None`` if never seen."""
        return self._graph.line_tech.get(line)

    def controls(self, line: str) -> list[CallControl]:
        """:meth:`control` for every live call of the line, oldest first."""
        calls = list(self._graph.calls.get(line, {}).values())
        return [c for lc in calls if (c := self.control(line, lc.id)) is not None]

    # ---- input -----------------------------------------------------------------------------------

    def handle(self, msg: AmiMessage, received_at: float) -> list[LineEvent]:
        """Feed one AMI message; returns the line events it causes, in order."""
        event = (msg.event or "").strip().lower()
        if not event:
            return []
        out: list[LineEvent] = []
        handler = self._handlers.get(event)
        if handler is not None:
            handler(msg, event, received_at, out)
        elif event in _QUEUE_AGENT_EVENTS:
            self._on_queue_agent(msg, event, received_at, out)
        elif event not in MEMBER_EVENTS and "channel" in msg and "uniqueid" in msg:
            # a queue member event describes no channel (it is the AgentStateTracker's)
            self._graph.snap(msg, "", event)
        return out

    # ---- event handlers --------------------------------------------------------------------------

    def _on_snapshot(self, msg: AmiMessage, event: str, at: float, out: list[LineEvent]) -> None:
        ch = self._graph.snap(msg, "", event)
        if ch is None:
            return
        if event == "newstate" and ch.state == RINGING:
            self._on_ringing(ch, at, out)
        elif event in ("newcallerid", "newconnectedline"):
            self._moments.refresh_group(ch.linkedid, at, out)

    def _on_ringing(self, ch: Channel, at: float, out: list[LineEvent]) -> None:
        if ch.line is not None and ch.call is None and not ch.done and self._opts.send_ring_started_on_ringing_state:
            self._moments.ensure(ch, at, out)

    def _on_dial_begin(self, msg: AmiMessage, event: str, at: float, out: list[LineEvent]) -> None:
        caller = self._graph.snap(msg, "", event)
        dest = self._graph.snap(msg, "Dest", event)
        if dest is None:
            log.debug("DialBegin without a destination channel ignored")
            return
        if caller is not None and caller is not dest:
            if dest.dialed_by is None and not dest.originated:
                dest.dialed_by = caller.key
                caller.children.add(dest.key)
            exten = (msg.get("Exten") or "").strip()
            for phone in self._graph.lines_behind(caller):
                lc = phone.call
                if lc is None and phone is caller and not phone.done:
                    lc = self._moments.announce(phone, Role.DIALING, at, out, dest=dest)
                elif lc is not None and lc.role is not Role.INCOMING:
                    if dialled(exten) and not lc.dial_exten:
                        lc.dial_exten = exten
                    if self._graph.dest_line(dest) not in (None, lc.line):
                        lc.direction = Direction.INTERNAL
                    self._moments.refresh(lc, at, out)
        elif caller is None and dest.dialed_by is None:
            dest.originated = True
        if dest.line is not None and dest.call is None and not dest.done:
            if not self._opts.send_ring_started_on_ringing_state or dest.state == RINGING:
                self._moments.ensure(dest, at, out)
        if dest.line is not None:
            # A line rung by another line: the other line's outbound call is in fact internal.
            origin, _ = self._graph.origin(dest)
            if origin is not None and origin.call is not None and origin.line != dest.line:
                lc = origin.call
                if lc.role is not Role.INCOMING and lc.direction is Direction.OUTBOUND:
                    lc.direction = Direction.INTERNAL
                    self._moments.refresh(lc, at, out)

    def _on_dial_state(self, msg: AmiMessage, event: str, at: float, out: list[LineEvent]) -> None:
        self._graph.snap(msg, "", event)
        dest = self._graph.snap(msg, "Dest", event)
        if dest is not None and (msg.get("DialStatus") or "").strip().upper() == "RINGING":
            self._on_ringing(dest, at, out)

    def _on_dial_end(self, msg: AmiMessage, event: str, at: float, out: list[LineEvent]) -> None:
        caller = self._graph.snap(msg, "", event)
        dest = self._graph.snap(msg, "Dest", event)
        status = (msg.get("DialStatus") or "").strip().upper()
        if caller is not None and dest is not None and caller is not dest and dest.dialed_by is None \
                and not dest.originated and dest.call is None:
            # Its DialBegin came before this tracker looked (a takeover's listing found it just created): the
            # DialEnd names the same dialler, so the call is still INCOMING from the caller (Rule 2).
            dest.dialed_by = caller.key
            caller.children.add(dest.key)
        if dest is not None and dest.line is not None:
            lc = dest.call
            if status == "ANSWER":
                lc = self._moments.ensure(dest, at, out)
                if lc is not None and lc.role is Role.INCOMING:
                    self._moments.connect(lc, at, out)
            elif status == "BUSY" and lc is None and not dest.done and dest.call is None:
                # Rejected as busy before it ever rang (DND, call waiting off): still the line's call, busy.
                lc = self._moments.ensure(dest, at, out)
                if lc is not None:
                    self._moments.busy(lc, at, out)
                    self._moments.finish(lc, at, out, None, status)
            elif status in _FAILED_DIAL and lc is not None:
                # The agent was the dialled party: its ring is over now, whatever the dialplan does next.
                if status == "BUSY":
                    self._moments.busy(lc, at, out)
                self._moments.finish(lc, at, out, None, status)
        if caller is not None and caller is not dest:
            for phone in self._graph.lines_behind(caller):
                lc = phone.call
                if lc is None or lc.role is Role.INCOMING:
                    continue
                if status == "ANSWER":
                    self._moments.connect(lc, at, out)
                elif status == "BUSY":
                    self._moments.busy(lc, at, out)

    def _on_hangup(self, msg: AmiMessage, event: str, at: float, out: list[LineEvent]) -> None:
        ch = self._graph.find(msg, "")
        if ch is None:
            log.debug("Hangup of unknown channel %s ignored", msg.get("Channel"))
            return
        cause = as_int(msg.get("Cause"))
        cause_text = (msg.get("Cause-txt") or "").strip()
        self._pickup.hung_up(ch, cause)
        if ch.call is not None:
            self._parking.phone_gone(ch, ch.call, at, out, cause, cause_text)
        for lc in self._graph.calls_parking(ch):
            # The parked party hung up without a ParkedCallGiveUp (or it was lost).
            self._parking.unparked(lc, None, "parkedcallgiveup", at, out)
        self._consultation.transferer_gone(ch, cause, cause_text, at, out)
        self._graph.drop(ch)

    def _on_local_bridge(self, msg: AmiMessage, event: str, at: float, out: list[LineEvent]) -> None:
        one = self._graph.snap(msg, "LocalOne", event)
        two = self._graph.snap(msg, "LocalTwo", event)
        if one is not None and two is not None and one is not two:
            self._graph.pair(one.key, two.key, one, two)

    def _on_bridge_enter(self, msg: AmiMessage, event: str, at: float, out: list[LineEvent]) -> None:
        ch = self._graph.snap(msg, "", event)
        bridge = (msg.get("BridgeUniqueid") or "").strip()
        if ch is None or not bridge:
            return
        if ch.bridge != bridge:
            self._graph.leave_bridge(ch)
            self._graph.bridges.setdefault(bridge, set()).add(ch.key)
            ch.bridge = bridge
        members = self._graph.bridges.get(bridge, set())
        if len(members) < 2:
            return
        if not _holding(msg):
            for key in members:
                m = self._graph.chans.get(key)
                if m is not None:
                    m.last_peers = frozenset(members - {key})
        self._consultation.detect(members, at, out)
        for key in sorted(members):
            m = self._graph.chans.get(key)
            if m is None or m.call is None:
                continue
            if m.state == UP:
                self._moments.connect(m.call, at, out)
            self._consultation.phone_bridged(m, members, at, out)

    def _on_bridge_leave(self, msg: AmiMessage, event: str, at: float, out: list[LineEvent]) -> None:
        ch = self._graph.snap(msg, "", event)
        if ch is not None and ch.bridge == (msg.get("BridgeUniqueid") or "").strip():
            self._graph.leave_bridge(ch)

    def _on_bridge_destroy(self, msg: AmiMessage, event: str, at: float, out: list[LineEvent]) -> None:
        bridge = (msg.get("BridgeUniqueid") or "").strip()
        for key in self._graph.bridges.pop(bridge, set()):
            ch = self._graph.chans.get(key)
            if ch is not None and ch.bridge == bridge:
                ch.bridge = ""

    def _on_hold(self, msg: AmiMessage, event: str, at: float, out: list[LineEvent]) -> None:
        self._native_hold = True
        ch = self._graph.snap(msg, "", event)
        if ch is None or ch.call is None:
            return
        self._moments.set_held(ch.call, event == "hold", at, out)

    def _on_moh(self, msg: AmiMessage, event: str, at: float, out: list[LineEvent]) -> None:
        """Older Asterisk: music on hold on X while bridged with the agent's phone means the agent holds."""
        ch = self._graph.snap(msg, "", event)
        if ch is None or not ch.bridge or self._native_hold:
            return
        for key in sorted(self._graph.bridges.get(ch.bridge, ())):
            m = self._graph.chans.get(key)
            if m is not None and m is not ch and m.call is not None:
                self._moments.set_held(m.call, event == "musiconholdstart", at, out)

    def _on_queue_caller_join(self, msg: AmiMessage, event: str, at: float, out: list[LineEvent]) -> None:
        ch = self._graph.snap(msg, "", event)
        queue = (msg.get("Queue") or "").strip()
        if ch is not None and queue:
            ch.queue = queue
            self._moments.refresh_group(ch.linkedid, at, out)

    def _on_queue_agent(self, msg: AmiMessage, event: str, at: float, out: list[LineEvent]) -> None:
        caller = self._graph.snap(msg, "", event)
        dest = self._graph.snap(msg, "Dest", event)
        queue = (msg.get("Queue") or "").strip()
        if not queue:
            return
        if dest is not None and not dest.queue:
            dest.queue = queue
        line = self._matcher.line_of_interface(msg.get("Interface") or "")
        if line is None and dest is not None:
            line = dest.line or self._matcher.line_of_local(dest.name)
        linkedid = (msg.get("Linkedid") or msg.get("DestLinkedid") or "").strip()
        if not linkedid and caller is not None:
            linkedid = caller.linkedid
        group = self._graph.groups.get(linkedid)
        if group is not None and line is not None:
            group.hints.setdefault(line, queue)
        self._moments.refresh_group(linkedid, at, out)

    def _on_blind_transfer(self, msg: AmiMessage, event: str, at: float, out: list[LineEvent]) -> None:
        transferer = self._graph.snap(msg, "Transferer", event)
        transferee = self._graph.snap(msg, "Transferee", event)
        if (msg.get("Result") or "").strip().lower() != "success":
            return
        target = (msg.get("Extension") or "").strip()
        by = party(transferer)[0] if transferer is not None else ""
        if transferer is not None and transferer.call is not None:
            lc = transferer.call
            lc.redirecting, lc.redirection = lc.line, target
            self._moments.refresh(lc, at, out)
        if transferee is not None:
            transferee.transferred_by, transferee.transfer_target = by, target
            if transferee.call is not None:
                lc = transferee.call
                lc.redirecting, lc.redirection = by, target
                self._moments.refresh(lc, at, out)

    def _on_attended_transfer(self, msg: AmiMessage, event: str, at: float, out: list[LineEvent]) -> None:
        first = self._graph.snap(msg, "OrigTransferer", event)
        second = self._graph.snap(msg, "SecondTransferer", event)
        transferee = self._graph.snap(msg, "Transferee", event)
        target = self._graph.snap(msg, "TransferTarget", event)
        if (msg.get("Result") or "").strip().lower() != "success":
            return
        if transferee is None and first is not None:
            transferee = self._graph.bridge_peer(first, msg.get("OrigBridgeUniqueid"))
        if target is None and second is not None:
            target = self._graph.bridge_peer(second, msg.get("SecondBridgeUniqueid"))
        if target is not None and target.local_half == ";1":
            # Atxfer's consultation leg (Rule 7) or any Local hop: the party is what its ;2 half dialled.
            target = self._graph.consult_target(target) or target
        if target is not None and target.consult_of is not None:
            target = None
        by = next((c.line for c in (first, second) if c is not None and c.line), "")
        if not by and first is not None:
            by = party(first)[0]
        target_party = party(target) if target is not None else ("", "")
        transferee_party = party(transferee) if transferee is not None else ("", "")
        for c in (first, second):
            if c is not None and c.call is not None:
                c.call.redirecting, c.call.redirection = by, target_party[0]
                self._moments.refresh(c.call, at, out)
        if target is not None and target.call is not None and meaningful(transferee_party[0]):
            lc = target.call
            lc.remote = transferee_party
            lc.redirecting, lc.redirection = by, target_party[0]
            self._moments.refresh(lc, at, out)
        if transferee is not None:
            transferee.transferred_by, transferee.transfer_target = by, target_party[0]
            if transferee.call is not None and meaningful(target_party[0]):
                lc = transferee.call
                lc.remote = target_party
                lc.redirecting, lc.redirection = by, target_party[0]
                self._moments.refresh(lc, at, out)

    def _on_rename(self, msg: AmiMessage, event: str, at: float, out: list[LineEvent]) -> None:
        ch = self._graph.find(msg, "")
        new = (msg.get("Newname") or "").strip()
        if ch is None or not meaningful(new):
            return
        if self._graph.by_name.get(ch.name) == ch.key:
            del self._graph.by_name[ch.name]
        ch.name = new
        self._graph.by_name[new] = ch.key
        if ch.call is not None:
            self._moments.refresh(ch.call, at, out)

    # ---- resync ----------------------------------------------------------------------------------

    def resync(
        self, channels: list[AmiMessage], received_at: float, *, announced: Collection[str] | None = None,
    ) -> list[LineEvent]:
        """Align with the PBX after an AMI (re)connect; see Rule 11 of the module docstring.

        ``announced``: ids of the calls the agents were already told of (the previous term's calls).
        A call found connected that is not among them rang while nobody watched: it is announced
        RING_STARTED then COMMUTATION_STARTED, so the agent's panel pops it up like any call. None:
        unknown, a connected call is announced connected only."""
        at = received_at
        out: list[LineEvent] = []
        present: dict[str, AmiMessage] = {}
        for msg in channels:
            uid = (msg.get("Uniqueid") or "").strip()
            if meaningful(uid) and meaningful(msg.get("Channel")):
                present[uid] = msg
        # 1. what ended while we were away
        gone = [old for old in self._graph.chans.values() if old.key not in present]
        for old in gone:
            if old.call is not None and old.call.parked is not None and old.call.parked[2] in present:
                self._parking.phone_gone(old, old.call, at, out, None, "")
        for old in gone:
            if old.call is not None:
                self._moments.finish(old.call, at, out, None, "")
            for waiting in self._graph.calls_parking(old):
                self._parking.unparked(waiting, None, "parkedcallgiveup", at, out)
            self._graph.drop(old)
        for key in present:
            self._graph.gone.pop(key, None)
        # 2. the channel table as the PBX sees it
        self._graph.bridges.clear()
        for msg in present.values():
            ch = self._graph.snap(msg, "", "coreshowchannel")
            if ch is None:
                continue
            ch.bridge = ""
            if ch.dialed_by is None and (msg.get("Application") or "").strip().lower() in ("appdial", "appqueue"):
                ch.listed_as_dialled = True
            bridge = (msg.get("BridgeId") or msg.get("BridgeUniqueid") or "").strip()
            if bridge:
                self._graph.bridges.setdefault(bridge, set()).add(ch.key)
                ch.bridge = bridge
        # 3. calls: announce the new, bring the known up to date
        for uid, msg in present.items():
            ch = self._graph.chans.get(uid)
            if ch is None or ch.line is None or ch.done:
                continue
            app = (msg.get("Application") or "").strip().lower()
            bridged = bool(ch.bridge) and len(self._graph.bridges.get(ch.bridge, ())) > 1
            lc = ch.call
            if lc is None and ch.state in _NOT_A_CALL_YET and not bridged:
                # Just created (its Dial events are still on their way, e.g. in the takeover's buffer): announced
                # by them, as INCOMING with the caller, not guessed now as the agent dialling out.
                continue
            if lc is None:
                lc = self._resync_announce(ch, app, bridged, msg, at, out, announced)
            elif lc.state is CallState.RINGING and ch.state == UP and (bridged or lc.role is Role.INCOMING):
                self._moments.connect(lc, at, out)
        return out

    def _resync_announce(
        self, ch: Channel, app: str, bridged: bool, msg: AmiMessage, at: float, out: list[LineEvent],
        announced: Collection[str] | None = None,
    ) -> LineCall:
        group = self._graph.groups.get(ch.linkedid)
        chans = self._graph.chans
        others = [chans[k] for k in sorted(group.chans) if k != ch.key and k in chans] if group else []
        other_line = any(o.line is not None and o.line != ch.line for o in others)
        if app == "appdial2" or (ch.state == RINGING and not others):
            role = Role.ORIGINATED
        elif app in ("appdial", "appqueue") or ch.state == RINGING:
            role = Role.INCOMING
        else:
            role = Role.DIALING
        lc = self._announce_quiet(ch, role, at)
        lc.direction = (
            Direction.INTERNAL if other_line else (Direction.INBOUND if role is Role.INCOMING else Direction.OUTBOUND)
        )
        if role is Role.DIALING and dialled(ch.exten):
            lc.dial_exten = ch.exten
        duration = _duration(msg.get("Duration"))
        if duration is not None:
            lc.started_at = at - duration
            lc.call = lc.call.evolve(started_at=lc.started_at)
        connected = ch.state == UP and (bridged or role is Role.INCOMING)
        if connected and announced is not None and lc.call.id not in announced:
            lc.call = self._moments.compose(lc)
            self._moments.emit(lc, EventType.RING_STARTED, at, out)
        if connected:
            lc.state = CallState.CONNECTED
            lc.answered_at = at
        lc.call = self._moments.compose(lc)
        kind = EventType.COMMUTATION_STARTED if connected else EventType.RING_STARTED
        self._moments.emit(lc, kind, at, out)
        return lc

    def _announce_quiet(self, ch: Channel, role: Role, at: float) -> LineCall:
        sink: list[LineEvent] = []
        return self._moments.announce(ch, role, at, sink)


def _duration(value: str | None) -> float | None:
    """CoreShowChannel's Duration, ``HH:MM:SS`` (or plain seconds)."""
    if not value:
        return None
    parts = value.strip().split(":")
    if not all(p.isdigit() and len(p) < 9 for p in parts) or len(parts) > 3:
        return None
    seconds = 0
    for p in parts:
        seconds = seconds * 60 + int(p)
    return float(seconds)
