"""The call tracker's memory: live channels, how they hang together, and the calls they carry.

Pure, no events of its own: :class:`ChannelGraph` keeps the tables the call tracker (ami_gateway/tracker.py)
reads and changes as AMI events come - channels by Uniqueid and name, Local ``;1``/``;2`` pairs, bridges and
their members, who dialled whom, the channels and calls of each Linkedid, each line's live calls - and keeps
them consistent when a channel goes. The rules it serves (lines, the path back, robustness) are in the
tracker's module docstring; this module is where a channel is created from a snapshot, found, paired, bridged,
walked upstream and forgotten.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass, field
from enum import Enum

from ami.protocol import AmiMessage
from ami_gateway.lines import LineMatcher
from ami_gateway.packet_info import PacketInfoSpec, Source
from services.wire import Call, CallState, Direction

__all__ = ["RINGING", "UP", "Channel", "ChannelGraph", "Group", "LineCall", "Role", "as_int", "dialled", "meaningful"]

log = logging.getLogger(__name__)

#: ChannelState values the tracker acts on
RINGING = 5
UP = 6
_UNKNOWN = frozenset({"", "<unknown>", "unknown", "<null>", "(null)"})
# Events that may describe a channel we never saw: anything else only updates known channels, so an event
# about a dead channel (OriginateResponse of a failed call, a late Hangup...) cannot create a phantom.
_CREATING = frozenset(
    {
        "newchannel",
        "newstate",
        "newcallerid",
        "newconnectedline",
        "newexten",
        "dialbegin",
        "dialstate",
        "dialend",
        "localbridge",
        "bridgeenter",
        "hold",
        "unhold",
        "musiconholdstart",
        "queuecallerjoin",
        "agentcalled",
        "agentconnect",
        "blindtransfer",
        "attendedtransfer",
        "coreshowchannel",
        "parkedcall",
        "unparkedcall",
        "pickup",
    }
)


def meaningful(value: str | None) -> bool:
    return value is not None and value.strip().lower() not in _UNKNOWN


def dialled(exten: str) -> bool:
    """An Exten that is a number someone dialled (not the "s" start extension)."""
    return meaningful(exten) and exten not in ("s", "h", "i", "t")


def as_int(value: str | None) -> int | None:
    if value is None:
        return None
    value = value.strip()
    return int(value) if value.isdigit() and len(value) < 10 else None


class Role(Enum):
    """A phone channel's part in its call (Rule 3 of the tracker)."""

    INCOMING = "incoming"
    ORIGINATED = "originated"
    DIALING = "dialing"


@dataclass(eq=False, slots=True)
class LineCall:
    """One call of one line as the tracker follows it; ``call`` is what the line's agents were last shown."""

    id: str
    line: str
    uid: str
    linked_id: str
    role: Role
    direction: Direction
    state: CallState
    started_at: float
    call: Call
    answered_at: float | None = None
    dial_exten: str = ""
    remote: tuple[str, str] | None = None  # set by a transfer: who the agent now talks to
    held_by_consult: bool = False  # held because the line's phone is consulting (Atxfer), not by Hold
    parked: tuple[str, str, str] | None = None  # (space, lot, parkee channel key) while its far end is parked
    retriever: str = ""  # key of the phone channel called into the lot for it, until UnParkedCall (Rule 8)
    redirecting: str = ""
    redirection: str = ""


@dataclass(eq=False, slots=True)
class Channel:
    """One live channel, updated from every snapshot of it an event carries."""

    key: str
    name: str
    linkedid: str
    line: str | None = None
    local_half: str = ""  # ";1" / ";2" for Local channels
    state: int = -1
    caller_num: str = ""
    caller_name: str = ""
    own_name: str = ""  # CallerIDName when first seen: the phone's own name
    connected_num: str = ""
    connected_name: str = ""
    exten: str = ""
    pair: str | None = None
    dialed_by: str | None = None
    originated: bool = False
    children: set[str] = field(default_factory=set)
    queue: str = ""
    bridge: str = ""
    transferred_by: str = ""
    transfer_target: str = ""
    data: dict[str, str] = field(default_factory=dict)
    call: LineCall | None = None
    done: bool = False  # its call is over: never announce another one on this channel
    # A resync listed it as a Dial's or Queue's outgoing channel (Application AppDial/AppQueue) whose DialBegin
    # this tracker never saw (it came before the listing): dialled by someone, not the agent's click-to-dial.
    listed_as_dialled: bool = False
    consult_of: str | None = None  # for an Atxfer consultation leg (Local ;1): the transferer phone's key
    # Who it last shared a talking bridge with (not a parking lot's holding bridge), kept after it leaves: a
    # ParkedCall may come before or after the parkee's BridgeLeave and its partner's (Rule 8).
    last_peers: frozenset[str] = frozenset()


@dataclass(eq=False, slots=True)
class Group:
    """What the tracker keeps per Linkedid; dropped with the last channel."""

    chans: set[str] = field(default_factory=set)
    hints: dict[str, str] = field(default_factory=dict)  # line -> queue (from AgentCalled & co)
    used_ids: set[str] = field(default_factory=set)
    calls: set[LineCall] = field(default_factory=set)


class ChannelGraph:
    """See the module docstring. Not thread-safe; owned by one :class:`~ami_gateway.tracker.CallTracker`."""

    def __init__(
        self, matcher: LineMatcher, packet_info: PacketInfoSpec | None, max_channels: int, remember_hangups: int
    ) -> None:
        self.matcher = matcher
        self._packet_info = packet_info
        self._max_channels = max_channels
        self._remember_hangups = remember_hangups
        self.chans: dict[str, Channel] = {}
        self.by_name: dict[str, str] = {}
        self.local_pairs: dict[str, dict[str, str]] = {}
        self.bridges: dict[str, set[str]] = {}
        self.groups: dict[str, Group] = {}
        self.calls: dict[str, dict[str, LineCall]] = {}
        self.gone: OrderedDict[str, None] = OrderedDict()
        self.line_tech: dict[str, str] = {}  # line -> technology of its last phone channel (SIP, PJSIP)
        # Channel Uniqueid -> (line, call id): a phone the gateway calls into the parking lot to resume a call.
        self.retrievers: OrderedDict[str, tuple[str, str]] = OrderedDict()
        # Calls whose far end is parked (Rule 8), so a Hangup needs no scan of every call.
        self.parked_calls: set[LineCall] = set()

    # ---- channel table ---------------------------------------------------------------------------

    def find(self, msg: AmiMessage, prefix: str) -> Channel | None:
        uid = msg.get(prefix + "Uniqueid")
        if meaningful(uid):
            assert uid is not None
            ch = self.chans.get(uid.strip())
            if ch is not None:
                return ch
        name = msg.get(prefix + "Channel")
        if meaningful(name):
            assert name is not None
            key = self.by_name.get(name.strip())
            if key is not None:
                return self.chans.get(key)
        return None

    def snap(self, msg: AmiMessage, prefix: str, event: str) -> Channel | None:
        """Create or update a channel from the snapshot headers with ``prefix``; None if there is none."""
        ch = self.find(msg, prefix)
        if ch is None:
            ch = self._create(msg, prefix, event)
            if ch is None:
                return None
        p = prefix
        state = as_int(msg.get(p + "ChannelState"))
        if state is not None:
            ch.state = state
        for attr, header in (
            ("caller_num", "CallerIDNum"),
            ("caller_name", "CallerIDName"),
            ("connected_num", "ConnectedLineNum"),
            ("connected_name", "ConnectedLineName"),
            ("exten", "Exten"),
        ):
            value = msg.get(p + header)
            if value is not None:
                setattr(ch, attr, value.strip())
        if not ch.own_name and meaningful(ch.caller_name):
            ch.own_name = ch.caller_name
        spec = self._packet_info
        if spec:
            self._capture(ch, msg, prefix, spec)
        return ch

    def _create(self, msg: AmiMessage, prefix: str, event: str) -> Channel | None:
        if event not in _CREATING:
            return None
        name = (msg.get(prefix + "Channel") or "").strip()
        uid = (msg.get(prefix + "Uniqueid") or "").strip()
        if not meaningful(name) or not meaningful(uid):
            return None  # every channel snapshot since Asterisk 1.8 has a Uniqueid: without one it is garbage
        key = uid
        if key in self.gone:
            log.debug("ignoring %s about hung-up channel %s", event, name)
            return None
        linkedid = (msg.get(prefix + "Linkedid") or "").strip() or key
        ch = Channel(key=key, name=name, linkedid=linkedid, line=self.matcher.line_of_channel(name))
        if ch.line is not None and len(self.line_tech) < self._max_channels:
            self.line_tech[ch.line] = name.split("/", 1)[0]
        if self.matcher.is_local(name) and name[-2:] in (";1", ";2"):
            ch.local_half = name[-2:]
            halves = self.local_pairs.setdefault(name[:-2], {})
            halves[ch.local_half] = key
            other = halves.get(";2" if ch.local_half == ";1" else ";1")
            if other is not None and other in self.chans:
                self.pair(key, other, ch, self.chans[other])
        if len(self.chans) >= self._max_channels:
            oldest = next(iter(self.chans.values()))
            log.warning("channel table full (%d): dropping %s", len(self.chans), oldest.name)
            self.drop(oldest)
        self.chans[key] = ch
        self.by_name[name] = key
        self.groups.setdefault(linkedid, Group()).chans.add(key)
        resumes = self.retrievers.pop(key, None)
        if resumes is not None and ch.line == resumes[0]:
            # Rule 8: it rings and answers for the held call, which it picks up; whether that call is still
            # parked when the phone appears (the caller may have given up a moment before), it is never a call
            # of its own.
            ch.done = True
            held = self.calls.get(resumes[0], {}).get(resumes[1])
            if held is not None and held.parked is not None:
                ch.call = held
                held.retriever = key
        return ch

    @staticmethod
    def pair(key_a: str, key_b: str, a: Channel, b: Channel) -> None:
        a.pair = key_b
        b.pair = key_a

    def drop(self, ch: Channel) -> None:
        """Forget a channel (hung up) and everything only it kept alive."""
        self.chans.pop(ch.key, None)
        if self.by_name.get(ch.name) == ch.key:
            del self.by_name[ch.name]
        if ch.local_half:
            halves = self.local_pairs.get(ch.name[:-2])
            if halves is not None and halves.get(ch.local_half) == ch.key:
                del halves[ch.local_half]
                if not halves:
                    del self.local_pairs[ch.name[:-2]]
        self.leave_bridge(ch)
        if ch.dialed_by is not None:
            parent = self.chans.get(ch.dialed_by)
            if parent is not None:
                parent.children.discard(ch.key)
        if ch.call is not None:
            self.forget(ch.call)
        group = self.groups.get(ch.linkedid)
        if group is not None:
            group.chans.discard(ch.key)
            if not group.chans:
                for lc in list(group.calls):
                    if not self.parked_alive(lc):
                        self.forget(lc)
                del self.groups[ch.linkedid]
        self.gone[ch.key] = None
        while len(self.gone) > self._remember_hangups:
            self.gone.popitem(last=False)

    def leave_bridge(self, ch: Channel) -> None:
        if ch.bridge:
            members = self.bridges.get(ch.bridge)
            if members is not None:
                members.discard(ch.key)
                if not members:
                    del self.bridges[ch.bridge]
            ch.bridge = ""

    def _capture(self, ch: Channel, msg: AmiMessage, prefix: str, spec: PacketInfoSpec) -> None:
        variables: dict[str, str] | None = None
        for item in spec.items:
            if item.source is Source.HEADER:
                value = msg.get(prefix + item.name)
            else:
                if variables is None:
                    variables = msg.variables() if not prefix else _prefixed_vars(msg, prefix)
                value = variables.get(item.name)
            if value is not None and value.strip():
                ch.data[item.key] = value.strip()

    # ---- paths -----------------------------------------------------------------------------------

    def up(self, ch: Channel) -> Channel | None:
        if ch.dialed_by is not None:
            return self.chans.get(ch.dialed_by)
        if ch.local_half == ";2" and ch.pair is not None:
            return self.chans.get(ch.pair)
        if ch.consult_of is not None:
            return self.chans.get(ch.consult_of)
        return None

    def chain(self, ch: Channel) -> list[Channel]:
        """The channel, then each channel upstream of it (bounded; cycles cannot loop)."""
        chain = [ch]
        seen = {ch.key}
        cur = self.up(ch)
        while cur is not None and cur.key not in seen and len(chain) < 32:
            chain.append(cur)
            seen.add(cur.key)
            cur = self.up(cur)
        return chain

    def origin(self, ch: Channel) -> tuple[Channel | None, bool]:
        """(first real channel upstream, None if none) and whether the path starts with an Originate."""
        chain = self.chain(ch)
        for c in chain[1:]:
            if not c.local_half:
                return c, False
        return None, chain[-1].originated

    def lines_behind(self, ch: Channel) -> list[Channel]:
        """Phone channels that place a call made by ``ch``: itself, or the phone behind a Local ``;1``.

        A consultation leg's ``;2`` half dials for the consultation leg (Rule 7).
        """
        if ch.line is not None:
            return [ch]
        if ch.local_half == ";2" and ch.pair is not None:
            one = self.chans.get(ch.pair)
            return [one] if one is not None and one.consult_of is not None else []
        if ch.local_half == ";1" and ch.pair is not None:
            two = self.chans.get(ch.pair)
            if two is not None:
                return [c for k in sorted(two.children) if (c := self.chans.get(k)) is not None and c.line]
        return []

    def dest_line(self, dest: Channel) -> str | None:
        return dest.line or self.matcher.line_of_local(dest.name)

    def bridge_peer(self, ch: Channel, bridge: str | None) -> Channel | None:
        members = self.bridges.get((bridge or ch.bridge).strip(), set())
        for key in sorted(members):
            if key != ch.key and key in self.chans:
                return self.chans[key]
        return None

    def consult_target(self, leg: Channel) -> Channel | None:
        """The channel a consultation leg's ``;2`` half dialled (the transfer target), if any."""
        two = self.chans.get(leg.pair) if leg.pair is not None else None
        if two is None:
            return None
        children = [self.chans[k] for k in sorted(two.children) if k in self.chans]
        return children[0] if children else None

    # ---- the calls channels carry ----------------------------------------------------------------

    def forget(self, lc: LineCall) -> None:
        self.parked_calls.discard(lc)
        calls = self.calls.get(lc.line)
        if calls is not None:
            calls.pop(lc.id, None)
            if not calls:
                del self.calls[lc.line]
        group = self.groups.get(lc.linked_id)
        if group is not None:
            group.calls.discard(lc)
        ch = self.chans.get(lc.uid)
        if ch is not None and ch.call is lc:
            ch.call = None
            ch.done = True
        retriever = self.chans.get(lc.retriever) if lc.retriever else None
        if retriever is not None and retriever.call is lc:
            # Rule 8: the call ended (picked up by someone else, given up) while the phone was being called
            # into the lot for it: that phone's own events (answer, hangup) must not touch it again.
            retriever.call = None

    def parked_alive(self, lc: LineCall) -> bool:
        return lc.parked is not None and lc.parked[2] in self.chans

    def calls_parking(self, parkee: Channel) -> list[LineCall]:
        if not self.parked_calls:
            return []
        return sorted(
            (lc for lc in self.parked_calls if lc.parked is not None and lc.parked[2] == parkee.key),
            key=lambda c: c.id,
        )


def _prefixed_vars(msg: AmiMessage, prefix: str) -> dict[str, str]:
    result: dict[str, str] = {}
    for value in msg.getall(prefix + "ChanVariable"):
        name, sep, val = value.partition("=")
        if sep:
            result[name] = val
    return result
