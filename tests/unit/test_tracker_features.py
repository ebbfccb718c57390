"""The tracker on flows driven by AMI actions: Atxfer consultations (completed, cancelled) and hold by parking.

The transcripts are raw captures of the simulator carrying the actions out (``Atxfer``, ``Hangup`` of the
transferer, ``CancelAtxfer``, ``Park``, ``Redirect`` into the parking context), as a plain TCP client read them.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from ami.protocol import AmiMessage
from ami.scenario import IdAllocator
from ami_gateway.tracker import CallTracker
from ami_simulator import features
from ami_simulator.builtin import builtin_scenario
from ami_simulator.model import PbxModel, event
from services.wire import CallState, Direction, EventType, LineEvent
from tests.unit.test_tracker import assert_clean, by_line, load, matcher, play


def view(events: list, line: str) -> list[tuple[str, str, str]]:  # type: ignore[type-arg]
    return [(e.type.value, e.call.id, e.call.state.value) for e in by_line(events).get(line, []) if e.call]


def until(msgs: list[AmiMessage], name: str, **match: str) -> int:
    """Index just after the first message called ``name`` whose headers match."""
    for i, m in enumerate(msgs):
        if m.event == name and all((m.get(k) or "").startswith(v) for k, v in match.items()):
            return i + 1
    raise AssertionError(f"no {name} {match}")


def test_atxfer_consultation_then_completion() -> None:
    msgs = load("atxfer-complete.ami")
    tracker, events = play(msgs)
    linked = events[0].call.linked_id  # type: ignore[union-attr]
    first, consult = f"{linked}:305", f"{linked}:305:2"
    assert view(events, "305") == [
        ("ring_started", first, "ringing"),
        ("commutation_started", first, "connected"),
        ("hold_started", first, "held"),  # the transferee hears music while the agent consults
        ("ring_started", consult, "ringing"),  # the consultation is a second call of the line
        ("commutation_started", consult, "connected"),
        ("call_info_changed", first, "held"),  # transferred: 305 -> 306
        ("ring_finished", first, "finished"),  # the transferer hung up: that completes the transfer
        ("ring_finished", consult, "finished"),
    ]
    line305 = by_line(events)["305"]
    leg = next(e.call for e in line305 if e.call and e.call.id == consult)
    assert leg is not None and leg.channel.startswith("Local/306@from-internal-") and leg.channel.endswith(";1")
    assert (leg.caller_number, leg.called_number, leg.direction) == ("305", "306", Direction.INTERNAL)
    assert view(events, "306") == [
        ("ring_started", f"{linked}:306", "ringing"),
        ("commutation_started", f"{linked}:306", "connected"),
        ("call_info_changed", f"{linked}:306", "connected"),
        ("ring_finished", f"{linked}:306", "finished"),
    ]
    before, after = (e.call for e in by_line(events)["306"][1:3])
    assert before is not None and after is not None
    assert (before.caller_number, before.direction) == ("305", Direction.INTERNAL)  # the agent consulting
    assert (after.caller_number, after.caller_name) == ("79161234567", "Ivan Petrov")  # then the caller
    assert (after.redirecting_number, after.redirection_number) == ("305", "306")
    completed = next(e.call for e in line305 if e.type is EventType.CALL_INFO_CHANGED)
    assert completed is not None and (completed.redirecting_number, completed.redirection_number) == ("305", "306")
    assert_clean(tracker)


def test_atxfer_control_names_the_transferer_and_the_target() -> None:
    msgs = load("atxfer-complete.ami")
    cut = until(msgs, "AttendedTransfer")
    tracker, events = play(msgs[: cut - 1])
    linked = events[0].call.linked_id  # type: ignore[union-attr]
    original = tracker.control("305", f"{linked}:305")
    consult = tracker.control("305", f"{linked}:305:2")
    assert original is not None and consult is not None
    assert original.call.state is CallState.HELD and original.transferer == ""
    assert consult.transferer == original.channel  # hang it up to complete
    assert consult.peer.startswith("SIP/306-")  # the target, for DTMF during the consultation
    assert consult.tech == "SIP"
    assert [c.call.id for c in tracker.controls("305")] == [f"{linked}:305", f"{linked}:305:2"]
    assert tracker.control("306", f"{linked}:305") is None  # never another line's call


def test_atxfer_cancelled_brings_the_agent_back() -> None:
    tracker, events = play(load("atxfer-cancel.ami"))
    linked = events[0].call.linked_id  # type: ignore[union-attr]
    first, consult = f"{linked}:305", f"{linked}:305:2"
    assert view(events, "305") == [
        ("ring_started", first, "ringing"),
        ("commutation_started", first, "connected"),
        ("hold_started", first, "held"),
        ("ring_started", consult, "ringing"),
        ("commutation_started", consult, "connected"),
        ("ring_finished", consult, "finished"),
        ("hold_ended", first, "connected"),
        ("ring_finished", first, "finished"),
    ]
    assert [e.type for e in by_line(events)["306"]] == [
        EventType.RING_STARTED, EventType.COMMUTATION_STARTED, EventType.RING_FINISHED
    ]
    assert_clean(tracker)


def test_atxfer_cancel_ends_the_hold_even_when_the_pbx_reports_holds_natively() -> None:
    """Without the music-on-hold heuristic (a Hold event was seen), the bridge tells the hold is over."""
    tracker = CallTracker(matcher())
    tracker._native_hold = True
    tracker, events = play(load("atxfer-cancel.ami"), tracker)
    kinds = [(e.type.value, e.call.id.count(":")) for e in by_line(events)["305"] if e.call]
    assert kinds.count(("hold_started", 1)) == 1 and kinds.count(("hold_ended", 1)) == 1
    assert kinds.index(("hold_ended", 1)) > kinds.index(("ring_finished", 2))
    assert_clean(tracker)


def test_hold_by_parking_and_resume() -> None:
    msgs = load("park-resume.ami")
    tracker, events = play(msgs)
    linked = events[0].call.linked_id  # type: ignore[union-attr]
    call_id = f"{linked}:305"
    assert view(events, "305") == [
        ("ring_started", call_id, "ringing"),
        ("commutation_started", call_id, "connected"),
        ("hold_started", call_id, "held"),
        ("hold_ended", call_id, "connected"),
        ("ring_finished", call_id, "finished"),
    ]
    assert_clean(tracker)


def test_parking_is_remembered_for_the_resume_command() -> None:
    msgs = load("park-resume.ami")
    tracker, _ = play(msgs[: until(msgs, "ParkedCall")])
    [control] = tracker.controls("305")
    trunk = next(m for m in msgs if m.event == "ParkedCall")["ParkeeChannel"]
    assert control.call.state is CallState.HELD
    assert (control.parked_space, control.parking_lot, control.parked_channel) == ("701", "default", trunk)
    assert control.peer == ""  # the agent's phone is alone in its bridge while the far end is parked
    tracker2, _ = play(msgs[: until(msgs, "UnParkedCall")])
    [after] = tracker2.controls("305")
    assert after.parked_space == "" and after.call.state is CallState.CONNECTED


def test_connected_call_control_gives_the_party_the_line_talks_to() -> None:
    msgs = load("park-resume.ami")
    tracker, _ = play(msgs[: until(msgs, "BridgeEnter", Channel="SIP/trunk-in")])
    [control] = tracker.controls("305")
    assert control.channel.startswith("SIP/305-") and control.peer.startswith("SIP/trunk-in-")
    assert tracker.tech_of("305") == "SIP" and tracker.tech_of("399") is None


def test_a_second_call_while_the_first_is_on_hold() -> None:
    """Call A is held from the phone; call B rings, is answered and ends; A is resumed and ends."""
    first = load("hold-resume.ami")
    held = until(first, "Hold")
    tracker, events = play(first[:held])
    tracker, during = play(load("inbound-direct.ami"), tracker)
    a, b = "1700000600.1:305", "1795685548.7:305"
    assert [c.id for c in tracker.calls_of("305")] == [a]
    tracker, rest = play(first[held:], tracker)
    assert view(events + during + rest, "305") == [
        ("ring_started", a, "ringing"),
        ("commutation_started", a, "connected"),
        ("hold_started", a, "held"),
        ("ring_started", b, "ringing"),
        ("commutation_started", b, "connected"),
        ("ring_finished", b, "finished"),
        ("hold_ended", a, "connected"),
        ("ring_finished", a, "finished"),
    ]
    assert_clean(tracker)


def test_both_calls_are_live_while_the_second_one_rings() -> None:
    first = load("hold-resume.ami")
    second = load("inbound-direct.ami")
    tracker, _ = play(first[: until(first, "Hold")])
    tracker, _ = play(second[: until(second, "DialEnd")], tracker)
    states = [(c.id, c.state) for c in tracker.calls_of("305")]
    assert states == [("1700000600.1:305", CallState.HELD), ("1795685548.7:305", CallState.CONNECTED)]


def test_a_phone_that_rejects_as_busy_before_ringing_still_shows_busy() -> None:
    """The simulator's inbound-busy flow: DialBegin, then DialEnd BUSY with no Ringing state in between."""
    rendered = builtin_scenario("inbound-busy").render(IdAllocator(), {"line": "305"})
    msgs = [s.item for s in rendered.steps if isinstance(s.item, AmiMessage)]
    assert not any(m.event == "Newstate" and m.get("ChannelState") == "5" for m in msgs)
    for ring_on_ringing in (True, False):
        tracker, events = play(msgs, ring_on_ringing=ring_on_ringing)
        evs = by_line(events)["305"]
        assert [e.type for e in evs] == [EventType.RING_STARTED, EventType.ABONENT_BUSY, EventType.RING_FINISHED]
        assert evs[-1].call is not None and evs[-1].call.hangup_cause_text == "BUSY"
        assert_clean(tracker)




def test_the_simulators_internal_call_is_one_call_on_each_line() -> None:
    """Agent to agent: the caller's line has an outgoing internal call, the called line an incoming one, both
    naming the two lines (the e2e call records test checks the rows Creatio gets from these)."""
    from ami.scenario import IdAllocator
    from ami_simulator.builtin import builtin_scenario

    rendered = builtin_scenario("internal").render(IdAllocator(), {"line": "305", "agent2": "306"})
    tracker, events = play([s.item for s in rendered.steps if isinstance(s.item, AmiMessage)])
    lines = by_line(events)
    for line in ("305", "306"):
        assert [e.type for e in lines[line]] == [EventType.RING_STARTED, EventType.COMMUTATION_STARTED,
                                                 EventType.RING_FINISHED]
        call = lines[line][-1].call
        assert call is not None
        assert (call.direction, call.caller_number, call.called_number) == (Direction.INTERNAL, "305", "306")
        assert call.hangup_cause == 16 and call.answered_at is not None
    assert_clean(tracker)

# ---- hold by parking as res_parking does it: the agent's phone leaves the call ----------------------------


class Pbx:
    """The simulator's pure parts (scenarios, model, feature sequences) driven by hand: transcripts of parking as
    Asterisk 12+ produces it - the parkee moves to the parking bridge, the two-party bridge dissolves behind it,
    the agent's phone hangs up; the phone is called back into the lot (Originate with a ChannelId) to resume."""

    def __init__(self) -> None:
        self.model = PbxModel()
        self.ids = IdAllocator()
        self.msgs: list[AmiMessage] = []
        self.parked: dict[str, features.Parked] = {}

    def emit(self, msgs: list[AmiMessage]) -> None:
        for m in msgs:
            self.msgs.extend(self.model.apply(m))

    def play(self, scenario: str, stop_before: str = "", stop_after: str = "", **variables: str) -> list[str]:
        """Play a built-in scenario, cut before the first ``stop_before`` / after the first ``stop_after``."""
        rendered = builtin_scenario(scenario).render(self.ids, variables)
        msgs = [s.item for s in rendered.steps if isinstance(s.item, AmiMessage)]
        if stop_before:
            msgs = msgs[: next(i for i, m in enumerate(msgs) if m.event == stop_before)]
        if stop_after:
            msgs = msgs[: next(i for i, m in enumerate(msgs) if m.event == stop_after) + 1]
        self.emit(msgs)
        return list(rendered.channels)

    def hangup(self, name: str, cause: str = "16") -> None:
        ch = self.model.channels[name]
        self.emit([event("Hangup", "call,all", ch.block(), Cause=cause, Cause_txt="Normal Clearing")])

    def park(self, name: str, space: str = "701", timeout_channel: str = "") -> None:
        parkee = self.model.channels[name]
        parked = features.Parked(space, "default", name, f"parking-{space}", 0.0)
        self.parked[space] = parked
        partners = features.left_behind(self.model, parkee)
        dissolve = features.dissolve_events(self.model, parkee, partners)
        self.emit(features.park_events(self.model, parkee, parked, features.dial_string(timeout_channel)))
        self.emit(dissolve)
        for partner in partners:
            self.hangup(partner.name)

    def unpark(self, retriever: str, space: str = "701") -> None:
        parked = self.parked.pop(space)
        self.emit(features.unpark_events(self.model, parked, self.model.channels[retriever], 3))

    def ring_into_the_lot(self, line: str, channel_id: str, space: str = "701", answer: bool = True) -> str:
        """Originate <line> into parkedcalls/<space> with a ChannelId: the phone rings and (if told) answers."""
        variables = {"line": line, "number": space, "context": "parkedcalls", "actionid": "a1", "uid:1": channel_id}
        phone = self.play("outbound-originate", stop_after="DialEnd" if answer else "DialState", **variables)[0]
        return phone


def parked_call(before_the_bridge: bool = False) -> tuple[Pbx, CallTracker, list[LineEvent], str, str]:
    """An answered inbound call on 305 whose far end was just parked (TimeoutChannel = the agent's phone)."""
    pbx = Pbx()
    trunk, agent = pbx.play("inbound-direct-long", line="305",
                            **({"stop_after": "DialEnd"} if before_the_bridge else {"stop_before": "HangupRequest"}))
    pbx.park(trunk, timeout_channel=agent)
    tracker, events = play(pbx.msgs)
    return pbx, tracker, events, trunk, agent


def more(pbx: Pbx, tracker: CallTracker, step: Callable[[], object]) -> tuple[object, list[LineEvent]]:
    """Run ``step`` on the PBX and feed what it emitted to the tracker: (what ``step`` returned, the events)."""
    start = len(pbx.msgs)
    result = step()
    return result, play(pbx.msgs[start:], tracker)[1]


@pytest.mark.parametrize("before_the_bridge", [False, True])
def test_a_parked_call_stays_held_when_asterisk_hangs_the_agents_phone_up(before_the_bridge: bool) -> None:
    pbx, tracker, events, trunk, agent = parked_call(before_the_bridge)
    parked = next(m for m in pbx.msgs if m.event == "ParkedCall")
    assert parked["ParkerDialString"] == "SIP/305"
    assert any(m.event == "Hangup" and m["Channel"] == agent for m in pbx.msgs)  # Asterisk's doing, not ours
    call_id = events[0].call.id  # type: ignore[union-attr]
    assert view(events, "305") == [
        ("ring_started", call_id, "ringing"),
        ("commutation_started", call_id, "connected"),
        ("hold_started", call_id, "held"),
    ]
    [control] = tracker.controls("305")
    assert control.call.state is CallState.HELD and control.channel == "" and control.peer == ""
    assert (control.parked_space, control.parking_lot, control.parked_channel) == ("701", "default", trunk)
    assert control.tech == "SIP"


def test_the_phone_called_into_the_lot_picks_the_held_call_up() -> None:
    pbx, tracker, events, trunk, agent = parked_call()
    call_id = events[0].call.id  # type: ignore[union-attr]
    tracker.expect_retriever("305", call_id, "cms-resume-1")
    start = len(pbx.msgs)
    phone, ringing = more(pbx, tracker, lambda: pbx.ring_into_the_lot("305", "cms-resume-1"))
    assert isinstance(phone, str) and phone.startswith("SIP/305-") and phone != agent
    assert ringing == []  # the phone rings and answers for the held call, not as a call of its own
    unexpected = play(pbx.msgs[start:])[1]
    assert ("ring_started", "cms-resume-1:305", "ringing") in view(unexpected, "305")  # as it would otherwise
    _, resumed = more(pbx, tracker, lambda: pbx.unpark(phone))
    assert view(resumed, "305") == [("hold_ended", call_id, "connected")]
    call = resumed[0].call
    assert call is not None and call.channel == phone
    assert (call.caller_number, call.caller_name) == ("79161234567", "Ivan Petrov")  # still the caller
    [control] = tracker.controls("305")
    assert control.channel == phone and control.peer == trunk and control.parked_space == ""
    _, ended = more(pbx, tracker, lambda: (pbx.hangup(phone), pbx.hangup(trunk)))
    assert view(ended, "305") == [("ring_finished", call_id, "finished")]
    assert ended[0].call is not None and ended[0].call.hangup_cause == 16
    assert_clean(tracker)


def test_a_resume_the_agent_does_not_answer_leaves_the_call_parked() -> None:
    pbx, tracker, events, trunk, _ = parked_call()
    call_id = events[0].call.id  # type: ignore[union-attr]
    tracker.expect_retriever("305", call_id, "cms-resume-2")
    phone, ringing = more(pbx, tracker, lambda: pbx.ring_into_the_lot("305", "cms-resume-2", answer=False))
    assert ringing == [] and isinstance(phone, str)
    assert more(pbx, tracker, lambda: pbx.hangup(phone, "19"))[1] == []
    [control] = tracker.controls("305")
    assert control.call.state is CallState.HELD and control.parked_channel == trunk
    _, gave_up = more(pbx, tracker, lambda: pbx.hangup(trunk))
    assert view(gave_up, "305") == [("ring_finished", call_id, "finished")]
    assert gave_up[0].call is not None and gave_up[0].call.hangup_cause_text == "PARKED_GIVEUP"
    assert_clean(tracker)


@pytest.mark.parametrize("event_name", ["ParkedCallGiveUp", "ParkedCallTimeOut"])
def test_a_detached_parked_call_ends_when_the_lot_lets_it_go(event_name: str) -> None:
    pbx, tracker, events, trunk, _ = parked_call()
    call_id = events[0].call.id  # type: ignore[union-attr]
    parkee = pbx.model.channels[trunk]
    gone = event(event_name, "call,all", parkee.block("Parkee"), ParkerDialString="SIP/305", Parkinglot="default",
                 ParkingSpace="701", ParkingTimeout="0", ParkingDuration="45")
    ended = play([gone], tracker)[1]
    assert view(ended, "305") == [("ring_finished", call_id, "finished")]
    expected = "PARKED_TIMEOUT" if event_name == "ParkedCallTimeOut" else "PARKED_GIVEUP"
    assert ended[0].call is not None and ended[0].call.hangup_cause_text == expected


def test_picked_up_from_the_lot_by_another_line_the_held_call_ends() -> None:
    pbx, tracker, events, trunk, _ = parked_call()
    call_id = events[0].call.id  # type: ignore[union-attr]
    # Not announced to the tracker: 306's phone picking the call up has a call of its own.
    other, ringing = more(pbx, tracker, lambda: pbx.ring_into_the_lot("306", "someone-else"))
    assert [e.type for e in by_line(ringing)["306"]][:1] == [EventType.RING_STARTED]
    assert isinstance(other, str)
    _, picked = more(pbx, tracker, lambda: pbx.unpark(other))
    assert view(picked, "305") == [("ring_finished", call_id, "finished")]
    finished = by_line(picked)["305"][0].call
    assert finished is not None and finished.hangup_cause_text == "PARKED_PICKUP"
    assert [c.id for c in tracker.calls_of("305")] == [] and len(tracker.calls_of("306")) == 1


def test_a_phone_that_survives_the_park_is_not_detached() -> None:
    """Resume by Redirect (park-resume.ami: the agent's channel stayed, as a dialplan after Dial may keep it)."""
    msgs = load("park-resume.ami")
    tracker, _ = play(msgs[: until(msgs, "ParkedCall")])
    [control] = tracker.controls("305")
    assert control.channel.startswith("SIP/305-") and control.parked_space == "701"
