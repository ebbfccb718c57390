"""Agents' commands turned into AMI actions: pure planning, no I/O.

:func:`plan_command` takes a :class:`~services.wire.Command`, what the tracker knows about the agent's line
(:class:`LineView`) and CMS's settings, and returns the AMI actions that carry the command out, in order, or
raises :class:`CommandRefused` with a message for the agent. The executor (``command_executor.py``) sends them
and judges the answers. Keeping the decision here makes every rule testable with plain data.

The command list, with the AMI action each one uses and the write class it needs:

================= ================================================================== ==================
command           AMI action(s)                                                      write class
================= ================================================================== ==================
make_call         ``Originate`` Channel=<tech>/<line>, Context=args.context or         originate
                  originateContext, Exten=number; Async per asyncOriginate, then
                  ``OriginateResponse`` (same ActionID) tells whether it started
hangup            ``Hangup`` of the line's channel (and of its parked party)          call (or system)
answer            ``SIPnotify`` (SIP) / ``PJSIPNotify`` (PJSIP) ``Event=talk``         system
                  to the line's phone; phones that support it answer
hold              ``Park`` of the party the line talks to, TimeoutChannel = the        call
                  line's channel (parkingLotContext set)
unhold            the line's phone is called into <space>@parkingLotContext:          originate (call)
                  ``Originate`` (ChannelId announced to the tracker); ``Redirect``
                  of the line's channel there if it is still alive (the
                  ``Originate`` if that channel is gone when it arrives)
blind_transfer    ``BlindTransfer`` Channel=<line's channel>                          call
consult_call      ``Atxfer`` Channel=<line's channel>                                 call
complete_transfer ``Hangup`` of the transferer (Atxfer), else ``Bridge`` of the two  call
                  far ends and ``Hangup`` of the line's two channels
cancel_transfer   ``CancelAtxfer`` (fallback ``Hangup`` of the consultation leg),     call
                  else ``Hangup`` of the consultation call (+ unpark the first)
dtmf              ``PlayDTMF`` on the party the line talks to, one per digit           call
set_dnd           ``DBGet``/``DBPut``/``DBDel`` DND/<line> (FreePBX's key) and         system, call
                  ``SetVar`` DEVICE_STATE(Custom:DND<line>)
agent_pause       ``QueuePause`` Interface=queueExtensionFormat(line), Paused=true,    agent
                  Reason; no Queue = every queue of the interface
agent_unpause     ``QueuePause`` Paused=false                                         agent
wrap_up           ``QueuePause`` Paused=true Reason=Wrap-up / Paused=false             agent
================= ================================================================== ==================
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from ami_gateway.lines import LineMatcher
from ami_gateway.tracker import CallControl
from services.agent_states import WRAP_UP_REASON  # the QueuePause reason of after-call work
from services.config import AsteriskConfig
from services.line_access import originate_context_refusal
from services.wire import (
    Call,
    CallArgs,
    CallState,
    Command,
    CommandName,
    DialArgs,
    DndArgs,
    DndMode,
    DtmfArgs,
    PauseArgs,
    TransferArgs,
    TransferPairArgs,
    WrapUpArgs,
)

__all__ = [
    "AmiAction",
    "CommandPlan",
    "CommandRefused",
    "LineView",
    "WRAP_UP_REASON",
    "check_fresh",
    "plan_command",
    "queue_pause",
]

#: How long the agent's phone rings for a click-to-dial before Asterisk gives up (Originate Timeout).
ORIGINATE_RING_SECONDS = 30

_NUMBER_RE = re.compile(r"^\+?[0-9A-Za-z*#._-]{1,64}$")
_DTMF_RE = re.compile(r"^[0-9*#A-D]{1,32}$")
REASON_MAX = 200


class CommandRefused(Exception):
    """The command cannot be carried out; the message is shown to the agent."""


class LineView(Protocol):
    """What the planner needs from the tracker."""

    def controls(self, line: str) -> list[CallControl]: ...

    def tech_of(self, line: str) -> str | None: ...

    def expect_retriever(self, line: str, call_id: str, uniqueid: str) -> None: ...


@dataclass(frozen=True, slots=True)
class AmiAction:
    name: str
    fields: tuple[tuple[str, str], ...]
    #: an event that completes the action after its response (``OriginateResponse``), matched by ActionID.
    until_event: str = ""
    timeout: float = 10.0
    #: error messages that mean "already so" and are not a failure (DBDel of a missing key...).
    tolerated: tuple[str, ...] = ()
    #: tried instead when this action fails (CancelAtxfer without the atxferabort feature...).
    fallback: AmiAction | None = None
    #: the error messages (their beginning, any case) that lead to ``fallback``; empty: any failure does.
    fallback_when: tuple[str, ...] = ()

    def field(self, name: str) -> str:
        return next((v for k, v in self.fields if k == name), "")


@dataclass(frozen=True, slots=True)
class CommandPlan:
    actions: tuple[AmiAction, ...]
    #: returned to the node with a success (what the command did: the channel parked, the DND state...).
    data: dict[str, str] = field(default_factory=dict)
    #: (call id, ChannelId) of a phone called into the parking lot to resume that call: the executor tells
    #: the tracker before it sends the ``Originate`` (so the ringing phone is not announced as a new call).
    retriever: tuple[str, str] | None = None


def _action(name: str, *fields: tuple[str, str], **options: object) -> AmiAction:
    return AmiAction(name, tuple(fields), **options)  # type: ignore[arg-type]


def check_fresh(command: Command, now: float, ttl: float) -> None:
    age = now - command.issued_at
    if age > ttl:
        raise CommandRefused(f"command expired: it reached the gateway {age:.1f}s after it was sent (limit {ttl:g}s)")


def _own_call(command: Command, view: LineView, call_id: str, key: str = "call_id") -> CallControl:
    controls = view.controls(command.line)
    if not call_id:
        if len(controls) == 1 and key == "call_id":
            return controls[0]
        raise CommandRefused(
            f"{command.name.value}: say which call ({key}); line {command.line} has {len(controls)} calls"
        )
    for control in controls:
        if control.call.id == call_id:
            return control
    raise CommandRefused(f"no call {call_id} on line {command.line}")


def _number(command: Command, number: str) -> str:
    number = number.strip()
    if not _NUMBER_RE.fullmatch(number):
        raise CommandRefused(f"{command.name.value} needs a valid number (digits, * # +), got {number!r}")
    return number


def _context(command: Command, requested: str, config: AsteriskConfig) -> str:
    """The node sends only a user's own context; this gateway owns the default (originateContext)."""
    context = requested.strip() or config.originate_context
    refusal = originate_context_refusal(context, config)
    if refusal is not None:
        raise CommandRefused(f"{command.name.value}: {refusal}")
    return context


def _require(control: CallControl, states: Sequence[CallState], what: str) -> None:
    if control.call.state not in states:
        raise CommandRefused(f"{what}: the call is {control.call.state.value}")


def _peer_name(channel: str) -> str:
    """``SIP/305-0000000a`` -> ``305`` (the SIP peer / PJSIP endpoint of a phone channel)."""
    resource = channel.split("/", 1)[1] if "/" in channel else channel
    return resource.rsplit("-", 1)[0] if "-" in resource else resource


def _far_party(call: Call) -> tuple[str, str]:
    """The number and name of the party the line talks to (the caller of an incoming call, else the called)."""
    if call.caller_number and call.caller_number != call.line:
        return call.caller_number, call.caller_name
    return call.called_number, call.called_name


def _caller_id(number: str, name: str) -> str:
    clean_name = re.sub(r'[<>"\r\n]', "", name).strip()
    clean_number = re.sub(r"[^0-9A-Za-z*#+]", "", number)
    return f'"{clean_name}" <{clean_number}>' if clean_name else f"<{clean_number}>"


def _pick_up(command: Command, control: CallControl, config: AsteriskConfig, matcher: LineMatcher,
             view: LineView) -> CommandPlan:
    """Bring the line back to its parked far end: ``ParkedCall(<space>)`` in the lot's context (Rule 8 of the
    tracker). A live channel of the line is redirected there; after Asterisk hung the phone's channel up (the
    usual case: the bridge dissolves when its peer is parked), the phone is called into the lot.

    The gateway's view trails the PBX: a channel it still sees may hang up (res_parking hangs the parker up
    once it has heard the space) before the Redirect reaches Asterisk. Then the Redirect finds no channel and
    the phone is called into the lot instead, so the resume does not depend on which came first."""
    lot_context = config.parking_lot_context
    space = control.parked_space
    call_back = _call_into_lot(command, control, config, matcher, view)
    if control.channel:
        redirect = _action(
            "Redirect",
            ("Channel", control.channel),
            ("Context", lot_context),
            ("Exten", space),
            ("Priority", "1"),
            fallback=call_back.actions[0],
            fallback_when=CHANNEL_GONE,
        )
        return CommandPlan((redirect,), {"parking_space": space}, retriever=call_back.retriever)
    return call_back


#: how Asterisk (and the simulator) answer an action on a channel that is gone or going
CHANNEL_GONE = ("No such channel", "Channel does not exist", "Redirect failed")


def _call_into_lot(command: Command, control: CallControl, config: AsteriskConfig, matcher: LineMatcher,
                   view: LineView) -> CommandPlan:
    """Ring the line's phone into the parking space of its held call (``Originate`` with our ChannelId)."""
    lot_context = config.parking_lot_context
    space = control.parked_space
    tech = control.tech or view.tech_of(command.line) or matcher.protocols[0]
    # A Uniqueid of our own (Originate ChannelId, Asterisk 12+), so the tracker knows the ringing phone is
    # this call coming back. 28 characters: fits the 32 of common CDR uniqueid columns.
    channel_id = "cms-" + hashlib.sha256(f"{command.id}|{control.call.id}".encode()).hexdigest()[:24]
    number, name = _far_party(control.call)
    fields: list[tuple[str, str]] = [
        ("Channel", f"{tech}/{command.line}"),
        ("Context", lot_context),
        ("Exten", space),
        ("Priority", "1"),
        ("Timeout", str(ORIGINATE_RING_SECONDS * 1000)),
        ("ChannelId", channel_id),
        ("Async", "true" if config.async_originate else "false"),
    ]
    if number:
        fields.insert(4, ("CallerID", _caller_id(number, name)))
    return CommandPlan(
        (
            _action(
                "Originate",
                *fields,
                until_event="OriginateResponse" if config.async_originate else "",
                timeout=float(ORIGINATE_RING_SECONDS + 10),
            ),
        ),
        {"parking_space": space, "retriever": channel_id},
        retriever=(control.call.id, channel_id),
    )


def queue_pause(matcher: LineMatcher, line: str, paused: bool, reason: str = "") -> CommandPlan:
    """``QueuePause`` of the line's queue interface in every queue it is in: the agent's pause, unpause and
    wrap-up, and autoPauseOnCommutationStart's own (ami_gateway/queue_policy.py)."""
    reason = reason.strip()[:REASON_MAX]
    if any(c in reason for c in "\r\n"):
        raise CommandRefused("agent_pause: the reason must be one line")
    interface = matcher.interface_for(line)
    fields: list[tuple[str, str]] = [("Interface", interface), ("Paused", "true" if paused else "false")]
    if paused and reason:
        fields.append(("Reason", reason))
    return CommandPlan((_action("QueuePause", *fields),), {"interface": interface, "paused": str(paused).lower()})


def plan_command(
    command: Command,
    view: LineView,
    config: AsteriskConfig,
    matcher: LineMatcher,
    *,
    dnd_now: bool | None = None,
) -> CommandPlan:
    """The AMI actions for ``command`` (see the module docstring); raises :class:`CommandRefused`.

    ``set_dnd`` with ``mode=toggle`` needs the current state: the executor reads it (``DBGet``) and passes it
    as ``dnd_now``.
    """
    name = command.name
    line = command.line
    if not matcher.is_line(line):
        raise CommandRefused(f"{line!r} is not an agent line")

    if name is CommandName.MAKE_CALL:
        dial = command.args_as(DialArgs)
        number = _number(command, dial.number)
        context = _context(command, dial.context, config)
        tech = view.tech_of(line) or matcher.protocols[0]
        wait = float(ORIGINATE_RING_SECONDS + 10)
        return CommandPlan(
            (
                _action(
                    "Originate",
                    ("Channel", f"{tech}/{line}"),
                    ("Context", context),
                    ("Exten", number),
                    ("Priority", "1"),
                    ("CallerID", f"{number} <{number}>"),
                    ("Timeout", str(ORIGINATE_RING_SECONDS * 1000)),
                    ("Async", "true" if config.async_originate else "false"),
                    until_event="OriginateResponse" if config.async_originate else "",
                    timeout=wait,
                ),
            ),
            {"number": number, "context": context},
        )

    if name is CommandName.HANGUP:
        control = _own_call(command, view, command.args_as(CallArgs).call_id)
        actions = []
        if control.channel:
            actions.append(_action("Hangup", ("Channel", control.channel), ("Cause", "16")))
        if control.parked_channel:
            # A parked far end would otherwise wait in the lot for nobody.
            actions.append(_action("Hangup", ("Channel", control.parked_channel), ("Cause", "16"),
                                   tolerated=("No such channel",) if control.channel else ()))
        if not actions:
            raise CommandRefused("hangup: the call has no channel left to hang up")
        return CommandPlan(tuple(actions))

    if name is CommandName.ANSWER:
        control = _own_call(command, view, command.args_as(CallArgs).call_id)
        _require(control, (CallState.RINGING,), "answer")
        if control.transferer:
            raise CommandRefused("answer: a consultation call is answered by the other party")
        peer = _peer_name(control.channel)
        tech = control.tech.upper()
        if tech == "SIP":
            return CommandPlan((_action("SIPnotify", ("Channel", peer), ("Variable", "Event=talk")),))
        if tech == "PJSIP":
            return CommandPlan((_action("PJSIPNotify", ("Endpoint", peer), ("Variable", "Event=talk")),))
        raise CommandRefused(f"answer: only SIP and PJSIP phones can be told to answer, not {control.tech}")

    if name in (CommandName.HOLD, CommandName.UNHOLD):
        control = _own_call(command, view, command.args_as(CallArgs).call_id)
        lot_context = config.parking_lot_context
        if not lot_context:
            raise CommandRefused(
                "hold is not supported: set parkingLotContext to hold calls by parking them "
                "(or hold from the phone)"
            )
        if name is CommandName.HOLD:
            _require(control, (CallState.CONNECTED,), "hold")
            if control.transferer:
                raise CommandRefused("hold: a consultation call cannot be parked; cancel or complete the transfer")
            if not control.peer:
                raise CommandRefused("hold: the call has no other party to park")
            # TimeoutChannel: when parkingtime runs out, Asterisk calls the line's phone back with the call
            # (ParkerDialString); without it, it would try to call the parked party itself.
            return CommandPlan(
                (_action("Park", ("Channel", control.peer), ("TimeoutChannel", control.channel)),),
                {"parked_channel": control.peer},
            )
        _require(control, (CallState.HELD,), "resume")
        if not control.parked_space:
            raise CommandRefused("resume: the call was held from the phone; resume it from the phone")
        return _pick_up(command, control, config, matcher, view)

    if name is CommandName.BLIND_TRANSFER:
        transfer = command.args_as(TransferArgs)
        control = _own_call(command, view, transfer.call_id)
        number = _number(command, transfer.number)
        _require(control, (CallState.CONNECTED,), "blind_transfer")
        if control.transferer:
            raise CommandRefused("blind_transfer: complete or cancel the consultation first")
        context = _context(command, transfer.context, config)
        return CommandPlan(
            (_action("BlindTransfer", ("Channel", control.channel), ("Exten", number), ("Context", context)),)
        )

    if name is CommandName.CONSULT_CALL:
        transfer = command.args_as(TransferArgs)
        control = _own_call(command, view, transfer.call_id)
        number = _number(command, transfer.number)
        _require(control, (CallState.CONNECTED,), "consult_call")
        if control.transferer:
            raise CommandRefused("consult_call: already consulting; complete or cancel that transfer first")
        context = _context(command, transfer.context, config)
        return CommandPlan(
            (_action("Atxfer", ("Channel", control.channel), ("Exten", number), ("Context", context)),),
            {"transferer": control.channel},
        )

    if name in (CommandName.COMPLETE_TRANSFER, CommandName.CANCEL_TRANSFER):
        pair = command.args_as(TransferPairArgs)
        original = _own_call(command, view, pair.call_id)
        consult = _own_call(command, view, pair.consult_call_id, "consult_call_id")
        if consult.call.id == original.call.id:
            raise CommandRefused(f"{name.value}: the consultation call is the call itself")
        atxfer = bool(consult.transferer) and consult.transferer == original.channel
        if name is CommandName.COMPLETE_TRANSFER:
            if atxfer:
                # Asterisk completes an attended transfer when the transferer hangs up.
                return CommandPlan((_action("Hangup", ("Channel", original.channel), ("Cause", "16")),))
            first = original.parked_channel or original.peer
            second = consult.peer
            if not first or not second:
                raise CommandRefused("complete_transfer: both calls need another party to connect together")
            tolerate = ("No such channel",)
            bridge = [_action("Bridge", ("Channel1", first), ("Channel2", second), ("Tone", "no"))]
            bridge += [
                _action("Hangup", ("Channel", own), ("Cause", "16"), tolerated=tolerate)
                for own in (original.channel, consult.channel)
                if own  # a parked call's phone channel may be gone already
            ]
            return CommandPlan(tuple(bridge))
        if atxfer:
            return CommandPlan(
                (
                    _action(
                        "CancelAtxfer",
                        ("Channel", original.channel),
                        fallback=_action("Hangup", ("Channel", consult.channel), ("Cause", "16")),
                    ),
                )
            )
        hangup = _action("Hangup", ("Channel", consult.channel), ("Cause", "16"))
        if original.parked_space and config.parking_lot_context:
            back = _pick_up(command, original, config, matcher, view)
            return CommandPlan((hangup, *back.actions), back.data, back.retriever)
        return CommandPlan((hangup,))

    if name is CommandName.DTMF:
        dtmf = command.args_as(DtmfArgs)
        control = _own_call(command, view, dtmf.call_id)
        digits = dtmf.digits
        if not _DTMF_RE.fullmatch(digits):
            raise CommandRefused("dtmf needs 1-32 digits among 0-9, *, #, A-D")
        _require(control, (CallState.CONNECTED,), "dtmf")
        if not control.peer:
            raise CommandRefused("dtmf: the call has no other party yet")
        return CommandPlan(
            tuple(_action("PlayDTMF", ("Channel", control.peer), ("Digit", d), ("Duration", "250")) for d in digits)
        )

    if name is CommandName.SET_DND:
        mode = command.args_as(DndArgs).mode
        if mode is DndMode.TOGGLE:
            if dnd_now is None:
                raise CommandRefused("set_dnd: the current DND state is unknown")
            turn_on = not dnd_now
        else:
            turn_on = mode is DndMode.ON
        device_state = ("Variable", f"DEVICE_STATE(Custom:DND{line})")
        dnd_actions: tuple[AmiAction, ...]
        if turn_on:
            dnd_actions = (
                _action("DBPut", ("Family", "DND"), ("Key", line), ("Val", "YES")),
                _action("SetVar", device_state, ("Value", "BUSY")),
            )
        else:
            dnd_actions = (
                _action("DBDel", ("Family", "DND"), ("Key", line), tolerated=("Database entry not found",)),
                _action("SetVar", device_state, ("Value", "NOT_INUSE")),
            )
        return CommandPlan(dnd_actions, {"dnd": "on" if turn_on else "off"})

    if name is CommandName.WRAP_UP:
        return queue_pause(matcher, line, command.args_as(WrapUpArgs).active, WRAP_UP_REASON)
    if name is CommandName.AGENT_PAUSE:
        return queue_pause(matcher, line, True, command.args_as(PauseArgs).reason)
    if name is CommandName.AGENT_UNPAUSE:
        return queue_pause(matcher, line, False)

    raise CommandRefused(f"{name.value} is not supported")
