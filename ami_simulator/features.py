"""Event sequences for the call features the simulator carries out on request: attended transfer (``Atxfer``),
parking (``Park`` / picking a call up from the lot), ``Bridge``, answering a ringing phone, DTMF.

Each function reads the model (never changes it) and returns the events Asterisk 12+ would emit, in its order;
the server plays them through the model like scenario events, so the model follows. Pure: no I/O, no clock.

The shapes follow Asterisk's documented behaviour:

* ``Atxfer`` (bridge_basic.c): the transferer's channel leaves its bridge (the transferee hears music on hold),
  a Local channel ``Local/<exten>@<context>`` is called on the transferer's behalf (same Linkedid), the
  transferer is put in a new bridge with its ``;1`` half at once (it hears the ringing there) and the ``;2``
  half dials the target. The transferer hanging up completes the transfer (``AttendedTransfer``, the
  transferee joins the consultation bridge); the target leg hanging up, or ``CancelAtxfer``, brings the
  transferer back to the transferee.
* ``Park`` (res_parking, ``manager_park``): the parked channel leaves its bridge for the lot's parking bridge
  (``BridgeType: parking``, technology ``holding_bridge``), ``ParkedCall`` gives the space. The party it was
  talking to does not stay: without ``TimeoutChannel`` Asterisk steals the parkee with
  ``ast_bridge_add_channel`` and the two-party basic bridge dissolves (``bridge_dissolve_check_stolen``);
  with ``TimeoutChannel`` = the bridge peer the peer parks it (``manager_park_bridged``), hears the space and
  leaves (``hangup_after``). Either way the peer's channel leaves and - as the dialled party, or a caller whose
  dialplan ends after ``Dial`` - hangs up. Dialling the space in the lot's context (``ParkedCall()``: a
  ``Redirect`` of a live channel there, or an ``Originate`` of the agent's phone into it) retrieves the call:
  ``UnParkedCall``, then a bridge with the retriever.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field

from ami.protocol import AmiMessage
from ami_simulator.model import Bridge, Channel, PbxModel, event

__all__ = [
    "Consult",
    "Parked",
    "answer_events",
    "bridge_events",
    "cancel_consult_events",
    "complete_consult_events",
    "consult_prelude",
    "dtmf_events",
    "dial_string",
    "dissolve_events",
    "left_behind",
    "park_events",
    "unpark_events",
]


@dataclass
class Consult:
    """An attended transfer in progress (started by ``Atxfer``)."""

    transferer: str
    orig_bridge: str
    local1: str
    local2: str
    consult_bridge: str
    target: str = ""
    target_bridge: str = ""


@dataclass
class Parked:
    space: str
    lot: str
    channel: str
    holding_bridge: str
    parked_at: float
    timeout: int = 45
    extra: dict[str, str] = field(default_factory=dict)


def new_bridge(kind: str = "basic", technology: str = "simple_bridge", creator: str = "<unknown>",
               name: str = "<unknown>") -> dict[str, str]:
    return {
        "BridgeUniqueid": str(uuid.uuid4()),
        "BridgeType": kind,
        "BridgeTechnology": technology,
        "BridgeCreator": creator,
        "BridgeName": name,
        "BridgeNumChannels": "0",
        "BridgeVideoSourceMode": "none",
    }


def _leave(model: PbxModel, channel: Channel, remaining: dict[str, int]) -> list[AmiMessage]:
    """``channel`` leaves its bridge; ``remaining`` counts members per bridge as the sequence goes."""
    bridge = model.bridges.get(channel.bridge)
    if bridge is None:
        return []
    left = remaining.setdefault(bridge.uniqueid, len(bridge.channels)) - 1
    remaining[bridge.uniqueid] = left
    out = [event("BridgeLeave", "call,all", (bridge.headers | {"BridgeNumChannels": str(left)}).items(),
                 channel.block())]
    return out


def _destroy_if_empty(bridge: Bridge | None, remaining: dict[str, int]) -> list[AmiMessage]:
    if bridge is None or remaining.get(bridge.uniqueid, len(bridge.channels)) > 0:
        return []
    return [event("BridgeDestroy", "call,all", (bridge.headers | {"BridgeNumChannels": "0"}).items())]


def _enter(headers: dict[str, str], members: int, channel: Channel | dict[str, str]) -> AmiMessage:
    block = channel.block() if isinstance(channel, Channel) else list(channel.items())
    return event("BridgeEnter", "call,all", (headers | {"BridgeNumChannels": str(members)}).items(), block)


def consult_prelude(
    model: PbxModel, transferer: Channel, local1: dict[str, str], local2: dict[str, str], consult_bridge: dict[str, str]
) -> list[AmiMessage]:
    """Atxfer up to the target's dial: hold music, the Local pair, the transferer in the consultation bridge."""
    out: list[AmiMessage] = []
    for partner in model.bridge_partners(transferer):
        out.append(event("MusicOnHoldStart", "call,all", partner.block(), Class="default"))
    out.extend(_leave(model, transferer, {}))
    out.append(event("Newchannel", "call,all", local1.items()))
    out.append(event("Newchannel", "call,all", local2.items()))
    one = [("LocalOne" + k, v) for k, v in local1.items()]
    two = [("LocalTwo" + k, v) for k, v in local2.items()]
    out.append(event("LocalBridge", "call,all", one, two, Context=local1["Context"], Exten=local1["Exten"],
                     LocalOptimization="No"))
    out.append(event("BridgeCreate", "call,all", consult_bridge.items()))
    out.append(_enter(consult_bridge, 1, local1))
    out.append(_enter(consult_bridge, 2, transferer))
    return out


def complete_consult_events(model: PbxModel, consult: Consult) -> list[AmiMessage]:
    """The transferer hung up during the consultation: the transferee joins the target's side."""
    transferer = model.channels.get(consult.transferer)
    orig = model.bridges.get(consult.orig_bridge)
    second = model.bridges.get(consult.consult_bridge)
    local1 = model.channels.get(consult.local1)
    if transferer is None or orig is None or second is None or local1 is None:
        return []
    transferees = [model.channels[n] for n in orig.channels if n in model.channels and n != transferer.name]
    out: list[AmiMessage] = []
    headers: list[tuple[str, str]] = [("Result", "Success")]
    headers += transferer.block("OrigTransferer")
    headers += [("Orig" + k, v) for k, v in orig.headers.items()]
    headers += transferer.block("SecondTransferer")
    headers += [("Second" + k, v) for k, v in second.headers.items()]
    headers += [("DestType", "Bridge"), ("DestBridgeUniqueid", second.uniqueid)]
    if transferees:
        headers += transferees[0].block("Transferee")
    headers += local1.block("TransferTarget")
    headers += [("IsExternal", "No")]
    out.append(AmiMessage((("Event", "AttendedTransfer"), ("Privilege", "call,all"), *headers)))
    remaining: dict[str, int] = {}
    out.extend(_leave(model, transferer, remaining))
    members = remaining.get(second.uniqueid, len(second.channels))
    for t in transferees:
        out.append(event("MusicOnHoldStop", "call,all", t.block()))
        out.extend(_leave(model, t, remaining))
    out.extend(_destroy_if_empty(orig, remaining))
    for t in transferees:
        members += 1
        out.append(_enter(second.headers, members, t))
    return out


def cancel_consult_events(model: PbxModel, consult: Consult) -> list[AmiMessage]:
    """The target leg goes away (hung up, or CancelAtxfer): the transferer is back with the transferee."""
    out: list[AmiMessage] = []
    remaining: dict[str, int] = {}
    legs = [model.channels.get(n) for n in (consult.target, consult.local2, consult.local1) if n]
    for ch in legs:
        if ch is None:
            continue
        bridge = model.bridges.get(ch.bridge)
        out.extend(_leave(model, ch, remaining))
        if bridge is not None and bridge.uniqueid != consult.consult_bridge:
            out.extend(_destroy_if_empty(bridge, remaining))
        out.append(event("Hangup", "call,all", ch.block(), Cause="16", Cause_txt="Normal Clearing"))
    transferer = model.channels.get(consult.transferer)
    second = model.bridges.get(consult.consult_bridge)
    if transferer is not None and transferer.bridge == consult.consult_bridge:
        out.extend(_leave(model, transferer, remaining))
    out.extend(_destroy_if_empty(second, remaining))
    orig = model.bridges.get(consult.orig_bridge)
    if transferer is not None and orig is not None:
        out.append(_enter(orig.headers, len(orig.channels) + 1, transferer))
        for name in orig.channels:
            other = model.channels.get(name)
            if other is not None:
                out.append(event("MusicOnHoldStop", "call,all", other.block()))
    return out


def park_events(model: PbxModel, channel: Channel, parked: Parked, parker_dial_string: str = "") -> list[AmiMessage]:
    """``channel`` moves from its bridge (if any) into the lot's parking bridge; ``ParkedCall`` gives the space."""
    remaining: dict[str, int] = {}
    out = _leave(model, channel, remaining)
    holding = new_bridge("parking", "holding_bridge", "Parking", parked.lot)
    holding["BridgeUniqueid"] = parked.holding_bridge
    out.append(event("BridgeCreate", "call,all", holding.items()))
    snapshot: Channel | dict[str, str] = channel
    if channel.snapshot.get("ChannelState") != "6":
        # The parking bridge answers a channel that is not up yet (bridge_parking_push).
        up = channel.snapshot | {"ChannelState": "6", "ChannelStateDesc": "Up"}
        snapshot = {k: up.get(k, "") for k in channel.block_keys()}
        out.append(event("Newstate", "call,all", snapshot.items()))
    block = snapshot.block("Parkee") if isinstance(snapshot, Channel) else [("Parkee" + k, v) for k, v in
                                                                            snapshot.items()]
    # ParkedCall is published while the channel is pushed into the bridge, before its BridgeEnter.
    out.append(
        event(
            "ParkedCall",
            "call,all",
            block,
            ParkerDialString=parker_dial_string,
            Parkinglot=parked.lot,
            ParkingSpace=parked.space,
            ParkingTimeout=str(parked.timeout),
            ParkingDuration="0",
        )
    )
    out.append(_enter(holding, 1, snapshot))
    moh = snapshot.block() if isinstance(snapshot, Channel) else list(snapshot.items())
    out.append(event("MusicOnHoldStart", "call,all", moh, Class="default"))
    return out


def left_behind(model: PbxModel, parkee: Channel) -> list[Channel]:
    """Who loses the parkee: its bridge partners, or - parked between answer and bridge - its Dial partner."""
    partners = model.bridge_partners(parkee)
    if partners or parkee.bridge:
        return partners
    return [
        c for c in model.channels.values()
        if c is not parkee and (c.name == parkee.dialed_by or c.dialed_by == parkee.name)
    ]


def dissolve_events(model: PbxModel, parkee: Channel, partners: list[Channel]) -> list[AmiMessage]:
    """The parkee's old bridge dissolves behind it: the partners leave it (the bridge goes), then hang up.

    Only the leaving part; the caller appends each partner's ``Hangup`` (and device state).
    """
    bridge = model.bridges.get(parkee.bridge)
    out: list[AmiMessage] = []
    if bridge is None:
        return out
    left = len(bridge.channels) - 1  # the parkee has gone already
    for partner in partners:
        if partner.name in bridge.channels:
            left -= 1
            out.append(event("BridgeLeave", "call,all", (bridge.headers | {"BridgeNumChannels": str(left)}).items(),
                             partner.block()))
    if left <= 0:
        out.append(event("BridgeDestroy", "call,all", (bridge.headers | {"BridgeNumChannels": "0"}).items()))
    return out


def dial_string(channel_name: str) -> str:
    """``SIP/305-0000000a`` -> ``SIP/305``: how res_parking dials a parker back (``ParkerDialString``)."""
    return channel_name.rsplit("-", 1)[0] if "-" in channel_name else channel_name


def unpark_events(model: PbxModel, parked: Parked, retriever: Channel, duration: int) -> list[AmiMessage]:
    parkee = model.channels.get(parked.channel)
    if parkee is None:
        return []
    remaining: dict[str, int] = {}
    out = _leave(model, retriever, remaining)
    out.extend(_destroy_if_empty(model.bridges.get(retriever.bridge), remaining))
    out.extend(_leave(model, parkee, remaining))
    out.extend(_destroy_if_empty(model.bridges.get(parkee.bridge), remaining))
    out.append(event("MusicOnHoldStop", "call,all", parkee.block()))
    out.append(
        event(
            "UnParkedCall",
            "call,all",
            parkee.block("Parkee"),
            retriever.block("Retriever"),
            ParkerDialString="",
            Parkinglot=parked.lot,
            ParkingSpace=parked.space,
            ParkingTimeout=str(max(0, parked.timeout - duration)),
            ParkingDuration=str(duration),
        )
    )
    bridge = new_bridge()
    out.append(event("BridgeCreate", "call,all", bridge.items()))
    out.append(_enter(bridge, 1, parkee))
    out.append(_enter(bridge, 2, retriever))
    return out


def bridge_events(model: PbxModel, first: Channel, second: Channel) -> list[AmiMessage]:
    """The ``Bridge`` action: both channels leave wherever they are and meet in a new bridge."""
    remaining: dict[str, int] = {}
    out: list[AmiMessage] = []
    for ch in (first, second):
        bridge = model.bridges.get(ch.bridge)
        out.extend(_leave(model, ch, remaining))
        out.extend(_destroy_if_empty(bridge, remaining))
    bridge_headers = new_bridge()
    out.append(event("BridgeCreate", "call,all", bridge_headers.items()))
    out.append(_enter(bridge_headers, 1, first))
    out.append(_enter(bridge_headers, 2, second))
    return out


def answer_events(model: PbxModel, phone: Channel) -> list[AmiMessage]:
    """A ringing phone answers (what a NOTIFY Event: talk makes a supporting phone do); [] if it cannot."""
    caller = model.channels.get(phone.dialed_by) if phone.dialed_by else None
    if caller is None or phone.snapshot.get("ChannelState") != "5":
        return []
    up = phone.snapshot | {"ChannelState": "6", "ChannelStateDesc": "Up"}
    dest_block = [("Dest" + k, up.get(k, "")) for k in phone.block_keys()]
    out = [
        event("Newstate", "call,all", [(k, up.get(k, "")) for k in phone.block_keys()]),
        event("DialEnd", "call,all", caller.block(), dest_block, DialStatus="ANSWER"),
    ]
    if caller.snapshot.get("ChannelState") != "6":
        caller_up = caller.snapshot | {"ChannelState": "6", "ChannelStateDesc": "Up"}
        out.append(event("Newstate", "call,all", [(k, caller_up.get(k, "")) for k in caller.block_keys()]))
    bridge = new_bridge()
    out.append(event("BridgeCreate", "call,all", bridge.items()))
    out.append(_enter(bridge, 1, dict((k, up.get(k, "")) for k in phone.block_keys())))
    out.append(_enter(bridge, 2, caller))
    return out


def dtmf_events(channel: Channel, digit: str, duration_ms: int) -> list[AmiMessage]:
    """PlayDTMF: the digit is sent to the channel (Direction: Sent)."""
    return [
        event("DTMFBegin", "dtmf,all", channel.block(), Digit=digit, Direction="Sent"),
        event("DTMFEnd", "dtmf,all", channel.block(), Digit=digit, DurationMs=str(duration_ms), Direction="Sent"),
    ]
