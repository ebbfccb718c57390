"""The simulated PBX's state: live channels, bridges, calls, queues and their members.

The model is driven by the events the simulator emits: every event a scenario plays goes through
:meth:`PbxModel.apply` before it reaches the AMI clients, so ``CoreShowChannels``, ``Status`` and
``QueueStatus`` answer from exactly what the clients were told. ``apply`` may also rewrite an event: the
``QueueMemberStatus`` events written in scenarios are re-stamped with the model's member state (pause,
calls taken...) and fanned out to every queue the line belongs to, or dropped if it belongs to none, as
Asterisk only reports real members.

No I/O and no asyncio here; the server owns the clock and the tasks.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ami.protocol import AmiMessage

# The channel snapshot every channel event carries, in Asterisk's order.
CHANNEL_FIELDS = (
    "Channel",
    "ChannelState",
    "ChannelStateDesc",
    "CallerIDNum",
    "CallerIDName",
    "ConnectedLineNum",
    "ConnectedLineName",
    "Language",
    "AccountCode",
    "Context",
    "Exten",
    "Priority",
    "Uniqueid",
    "Linkedid",
)
BRIDGE_FIELDS = (
    "BridgeUniqueid",
    "BridgeType",
    "BridgeTechnology",
    "BridgeCreator",
    "BridgeName",
    "BridgeNumChannels",
    "BridgeVideoSourceMode",
)
STATE_DESC = {"0": "Down", "4": "Ring", "5": "Ringing", "6": "Up"}
CAUSE_TEXT = {
    "16": "Normal Clearing",
    "17": "User busy",
    "19": "User alerting, no answer",
    "21": "Call Rejected",
    "26": "Answered elsewhere",
}
_DEVICE_TECHS = ("SIP/", "PJSIP/", "IAX2/", "DAHDI/")


@dataclass
class Channel:
    snapshot: dict[str, str]
    created: float
    call_id: str | None
    bridge: str = ""
    application: str = ""
    application_data: str = ""
    dialed_by: str = ""  # name of the channel whose Dial created this one ("" if none)

    @property
    def name(self) -> str:
        return self.snapshot["Channel"]

    def block(self, prefix: str = "") -> list[tuple[str, str]]:
        return [(prefix + k, self.snapshot.get(k, "")) for k in CHANNEL_FIELDS]

    @staticmethod
    def block_keys() -> tuple[str, ...]:
        return CHANNEL_FIELDS

    @property
    def device(self) -> str | None:
        """``SIP/305`` for ``SIP/305-0000001a``; None for Local and other non-device channels."""
        name = self.name
        if not name.startswith(_DEVICE_TECHS):
            return None
        return name.rsplit("-", 1)[0]


@dataclass
class Bridge:
    uniqueid: str
    headers: dict[str, str]
    channels: list[str] = field(default_factory=list)
    call_id: str | None = None


@dataclass
class QueueMember:
    queue: str
    interface: str
    name: str
    state_interface: str
    penalty: int = 0
    calls_taken: int = 0
    last_call: int = 0
    last_pause: int = 0
    login_time: int = field(default_factory=lambda: int(time.time()))
    in_call: int = 0
    status: int = 1
    paused: bool = False
    paused_reason: str = ""
    membership: str = "static"

    def headers(self, legacy_reason: bool = False) -> list[tuple[str, str]]:
        result = [
            ("Queue", self.queue),
            ("MemberName", self.name),
            ("Interface", self.interface),
            ("StateInterface", self.state_interface),
            ("Membership", self.membership),
            ("Penalty", str(self.penalty)),
            ("CallsTaken", str(self.calls_taken)),
            ("LastCall", str(self.last_call)),
            ("LastPause", str(self.last_pause)),
            ("LoginTime", str(self.login_time)),
            ("InCall", str(self.in_call)),
            ("Status", str(self.status)),
            ("Paused", "1" if self.paused else "0"),
            ("PausedReason", self.paused_reason),
            ("Ringinuse", "0"),
            ("Wrapuptime", "0"),
        ]
        if legacy_reason:
            result.append(("Reason", self.paused_reason))
        return result


@dataclass
class Queue:
    name: str
    strategy: str = "ringall"
    members: dict[str, QueueMember] = field(default_factory=dict)  # by interface
    callers: list[str] = field(default_factory=list)  # channel names waiting, in order
    completed: int = 0
    abandoned: int = 0


@dataclass
class Call:
    """One play of a scenario (or one Originate): the unit ``/calls`` reports and ``Hangup`` ends."""

    id: str
    scenario: str
    variables: dict[str, str]
    started: float
    channels: list[str] = field(default_factory=list)  # created so far
    planned: list[str] = field(default_factory=list)  # what the scenario will create
    live: set[str] = field(default_factory=set)
    state: str = "playing"  # playing -> finished | hungup | transferred ...
    ended: float | None = None
    playing: bool = True
    #: channel name -> when its leg ended for its user: it hung up, or, first, the dial to it ended unanswered
    #: (a queue's other member answered: the PBX cancels the ring, and the phone's Hangup follows a little
    #: later). One leg can end long before its call (a phone refusing busy)
    channels_ended: dict[str, float] = field(default_factory=dict)
    #: channel name -> when it was created (a queue member's phone rings seconds after the call began)
    channels_started: dict[str, float] = field(default_factory=dict)
    #: channel name -> when it first alerted its user: off hook dialling (Ring), ringing, or up. A phone channel
    #: created a moment before the PBX died (or the caller gave up) may never have rung at all.
    channels_alerted: dict[str, float] = field(default_factory=dict)
    #: channel name -> when it first went Up (a phone: its user answered). A verdict needs it to tell an answer no
    #: AMI client could hear (the link was cut) from one it could
    channels_answered: dict[str, float] = field(default_factory=dict)
    #: the digits PlayDTMF played into the call, in order (what a test checks the PBX was asked for)
    dtmf: str = ""

    def to_json(self) -> dict[str, Any]:
        return {
            "linkedid": self.id,
            "scenario": self.scenario,
            "vars": self.variables,
            "state": self.state,
            "started": self.started,
            "ended": self.ended,
            "dtmf": self.dtmf,
            "channels": list(dict.fromkeys([*self.planned, *self.channels])),
            "liveChannels": sorted(self.live),
            "channelsEnded": dict(self.channels_ended),
            "channelsStarted": dict(self.channels_started),
            "channelsAlerted": dict(self.channels_alerted),
            "channelsAnswered": dict(self.channels_answered),
        }


def member_interface(line: str) -> str:
    return f"Local/{line}@from-queue/n"


class PbxModel:
    """Live channels, bridges, queues and calls, kept in step with the emitted events."""

    def __init__(self, tech: str = "SIP", legacy_pause_reason: bool = False) -> None:
        self.tech = tech
        self.legacy_pause_reason = legacy_pause_reason
        self.channels: dict[str, Channel] = {}
        self.by_uniqueid: dict[str, Channel] = {}
        self.bridges: dict[str, Bridge] = {}
        self.queues: dict[str, Queue] = {}
        self.calls: dict[str, Call] = {}
        self.finished: list[Call] = []
        self.max_finished = 1000
        self.variables: dict[str, dict[str, str]] = {}  # per channel name; "" = global

    # ---- queues -------------------------------------------------------------------------------------
    def add_member(self, queue: str, line: str, *, name: str | None = None, paused: bool = False) -> QueueMember:
        q = self.queues.setdefault(queue, Queue(queue))
        interface = member_interface(line)
        member = QueueMember(
            queue=queue,
            interface=interface,
            name=name or f"Agent {line}",
            state_interface=f"{self.tech}/{line}",
            paused=paused,
        )
        q.members[interface] = member
        return member

    def find_members(self, interface: str, queue: str | None = None) -> list[QueueMember]:
        """Members matching an interface given as ``Local/305@from-queue/n``, ``SIP/305`` or ``305``."""
        found = []
        for q in self.queues.values():
            if queue is not None and q.name != queue:
                continue
            for m in q.members.values():
                if interface in (m.interface, m.state_interface) or m.interface == member_interface(interface):
                    found.append(m)
        return found

    # ---- calls --------------------------------------------------------------------------------------
    def new_call(self, call_id: str, scenario: str, variables: Mapping[str, str]) -> Call:
        call = Call(call_id, scenario, dict(variables), time.time())
        self.calls[call_id] = call
        return call

    def maybe_finish(self, call: Call, state: str = "finished") -> None:
        if call.playing or call.live or call.ended is not None:
            return
        if call.state == "playing":
            call.state = state
        call.ended = time.time()
        self.calls.pop(call.id, None)
        self.finished.append(call)
        if len(self.finished) > self.max_finished:
            del self.finished[: len(self.finished) - self.max_finished]

    def call_of(self, channel: Channel) -> Call | None:
        return self.calls.get(channel.call_id) if channel.call_id else None

    # ---- events -------------------------------------------------------------------------------------
    def apply(self, msg: AmiMessage, call: Call | None = None) -> list[AmiMessage]:
        """Update the state from an event about to be emitted; return what to emit instead."""
        event = msg.event
        if event == "QueueMemberStatus":
            return self._member_status(msg)
        if event == "Newchannel":
            snapshot = {k: v for k, v in msg.headers if k in CHANNEL_FIELDS}
            if "Channel" in snapshot:
                channel = Channel(snapshot, time.monotonic(), call.id if call else None)
                self.channels[channel.name] = channel
                if "Uniqueid" in snapshot:
                    self.by_uniqueid[snapshot["Uniqueid"]] = channel
                if call is not None:
                    call.channels.append(channel.name)
                    call.live.add(channel.name)
                    call.channels_started[channel.name] = time.time()
                    self._note_alerted(channel, call)
            return [msg]
        self._update_snapshot(msg, "")
        self._update_snapshot(msg, "Dest")
        if event == "Newstate":
            changed = self.by_uniqueid.get(msg.get("Uniqueid") or "")
            if changed is not None:
                owner = call or self.call_of(changed)
                self._note_alerted(changed, owner)
                if owner is not None and changed.snapshot.get("ChannelState") == "6":
                    owner.channels_answered.setdefault(changed.name, time.time())
        if event == "Hangup":
            self._remove_channel(msg.get("Channel", "") or "")
        elif event == "BridgeCreate":
            uid = msg.get("BridgeUniqueid", "") or ""
            headers = {k: v for k, v in msg.headers if k in BRIDGE_FIELDS}
            self.bridges[uid] = Bridge(uid, headers, call_id=call.id if call else None)
        elif event == "BridgeDestroy":
            self.bridges.pop(msg.get("BridgeUniqueid", "") or "", None)
        elif event == "BridgeEnter":
            self._bridge_enter(msg, call)
        elif event == "BridgeLeave":
            self._bridge_leave(msg)
        elif event == "DialBegin":
            caller = self.channels.get(msg.get("Channel", "") or "")
            if caller is not None and caller.application != "Queue":
                caller.application = "Dial"
                caller.application_data = msg.get("DialString", "") or ""
            dest = self.channels.get(msg.get("DestChannel", "") or "")
            if dest is not None:
                # Asterisk: app_dial's outgoing channels run "AppDial"; those of the dial API (Originate) "AppDial2"
                dest.application = "AppDial" if caller is not None else "AppDial2"
                dest.application_data = "(Outgoing Line)"
                dest.dialed_by = caller.name if caller is not None else ""
        elif event == "DialEnd" and (msg.get("DialStatus") or "").upper() != "ANSWER":
            dest = self.channels.get(msg.get("DestChannel", "") or "")
            ended = call or (self.call_of(dest) if dest is not None else None)
            if dest is not None and ended is not None:
                ended.channels_ended.setdefault(dest.name, time.time())
        elif event == "QueueCallerJoin":
            q = self.queues.setdefault(msg.get("Queue", "") or "", Queue(msg.get("Queue", "") or ""))
            ch = msg.get("Channel", "") or ""
            q.callers.append(ch)
            waiting = self.channels.get(ch)
            if waiting is not None:
                waiting.application, waiting.application_data = "Queue", q.name
        elif event == "QueueCallerLeave":
            q2 = self.queues.get(msg.get("Queue", "") or "")
            ch = msg.get("Channel", "") or ""
            if q2 is not None and ch in q2.callers:
                q2.callers.remove(ch)
        elif event == "AgentConnect":
            for m in self.find_members(msg.get("Interface", "") or "", msg.get("Queue")):
                m.in_call = 1
        elif event == "AgentComplete":
            for m in self.find_members(msg.get("Interface", "") or "", msg.get("Queue")):
                m.in_call = 0
                m.calls_taken += 1
                m.last_call = int(time.time())
            q3 = self.queues.get(msg.get("Queue", "") or "")
            if q3 is not None:
                q3.completed += 1
        elif event == "QueueCallerAbandon":
            q4 = self.queues.get(msg.get("Queue", "") or "")
            if q4 is not None:
                q4.abandoned += 1
        return [msg]

    def _update_snapshot(self, msg: AmiMessage, prefix: str) -> None:
        uid = msg.get(prefix + "Uniqueid")
        if uid is None:
            return
        channel = self.by_uniqueid.get(uid)
        if channel is None:
            return
        for k in CHANNEL_FIELDS:
            value = msg.get(prefix + k)
            if value is not None and k != "Uniqueid":
                channel.snapshot[k] = value

    @staticmethod
    def _note_alerted(channel: Channel, call: Call | None) -> None:
        # ChannelState 4 Ring (off hook, dialling), 5 Ringing, 6 Up: the user has been told of the call
        if call is not None and channel.snapshot.get("ChannelState") in ("4", "5", "6"):
            call.channels_alerted.setdefault(channel.name, time.time())

    def _remove_channel(self, name: str) -> None:
        channel = self.channels.pop(name, None)
        if channel is None:
            return
        self.by_uniqueid.pop(channel.snapshot.get("Uniqueid", ""), None)
        self.variables.pop(name, None)
        for q in self.queues.values():
            if name in q.callers:
                q.callers.remove(name)
        call = self.call_of(channel)
        if call is not None:
            call.live.discard(name)
            call.channels_ended.setdefault(name, time.time())
            self.maybe_finish(call)

    def _bridge_enter(self, msg: AmiMessage, call: Call | None) -> None:
        uid = msg.get("BridgeUniqueid", "") or ""
        bridge = self.bridges.get(uid)
        if bridge is None:
            headers = {k: v for k, v in msg.headers if k in BRIDGE_FIELDS}
            bridge = self.bridges[uid] = Bridge(uid, headers, call_id=call.id if call else None)
        name = msg.get("Channel", "") or ""
        if name not in bridge.channels:
            bridge.channels.append(name)
        bridge.headers["BridgeNumChannels"] = str(len(bridge.channels))
        channel = self.channels.get(name)
        if channel is not None:
            channel.bridge = uid

    def _bridge_leave(self, msg: AmiMessage) -> None:
        uid = msg.get("BridgeUniqueid", "") or ""
        name = msg.get("Channel", "") or ""
        bridge = self.bridges.get(uid)
        if bridge is not None and name in bridge.channels:
            bridge.channels.remove(name)
            bridge.headers["BridgeNumChannels"] = str(len(bridge.channels))
        channel = self.channels.get(name)
        if channel is not None and channel.bridge == uid:
            channel.bridge = ""

    def _member_status(self, msg: AmiMessage) -> list[AmiMessage]:
        interface = msg.get("Interface") or msg.get("StateInterface") or ""
        members = self.find_members(interface)
        if not members:
            return []
        status = msg.get("Status")
        result = []
        for m in members:
            if status is not None and status.isdigit():
                m.status = int(status)
            result.append(_event("QueueMemberStatus", "agent,all", m.headers()))
        return result

    # ---- helpers for synthesised events ---------------------------------------------------------------
    def bridge_partners(self, channel: Channel) -> list[Channel]:
        bridge = self.bridges.get(channel.bridge)
        if bridge is None:
            return []
        return [self.channels[n] for n in bridge.channels if n != channel.name and n in self.channels]

    def call_channels(self, call_id: str) -> list[Channel]:
        return [c for c in self.channels.values() if c.call_id == call_id]


def _event(name: str, privilege: str, headers: Iterable[tuple[str, str]]) -> AmiMessage:
    return AmiMessage((("Event", name), ("Privilege", privilege), *headers))


def event(name: str, privilege: str, *blocks: Iterable[tuple[str, str]], **extra: str) -> AmiMessage:
    """Build an event; ``extra`` keys use ``_`` for ``-`` (``Cause_txt`` -> ``Cause-txt``)."""
    headers: list[tuple[str, str]] = []
    for block in blocks:
        headers.extend(block)
    headers.extend((k.replace("_", "-"), v) for k, v in extra.items())
    return _event(name, privilege, headers)
