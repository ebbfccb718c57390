"""The call tracker against real Asterisk 20 captures and hand-written transcripts of documented flows."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ami.protocol import AmiMessage, AmiParser
from ami_gateway.agent_tracker import AgentStateTracker
from ami_gateway.lines import LineMatcher
from ami_gateway.packet_info import parse_packet_info
from ami_gateway.tracker import CallTracker, TrackerOptions
from services.wire import AgentState, CallState, Direction, EventType, LineEvent

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "tracker"

RS = EventType.RING_STARTED
CS = EventType.COMMUTATION_STARTED
RF = EventType.RING_FINISHED
HS = EventType.HOLD_STARTED
HE = EventType.HOLD_ENDED
CI = EventType.CALL_INFO_CHANGED
AB = EventType.ABONENT_BUSY
AG = EventType.AGENT_STATE_CHANGED


def load(name: str) -> list[AmiMessage]:
    data = (FIXTURES / name).read_bytes()
    parser = AmiParser(expect_banner=data.startswith(b"Asterisk Call Manager"))
    parser.receive_data(data)
    parser.receive_data(b"")
    out: list[AmiMessage] = []
    while (item := parser.next_event()) is not None:
        if isinstance(item, AmiMessage) and item.event:
            out.append(item)
    return out


def matcher() -> LineMatcher:
    return LineMatcher(protocol="SIP,PJSIP", queue_extension_format="Local/{0}@from-queue/n")


def play(
    msgs: list[AmiMessage], tracker: CallTracker | None = None, ring_on_ringing: bool = True,
    agents: AgentStateTracker | None = None,
) -> tuple[CallTracker, list[LineEvent]]:
    """Each message to the call tracker, then to the agent states, as the gateway feeds them."""
    tracker = tracker or CallTracker(matcher(), TrackerOptions(send_ring_started_on_ringing_state=ring_on_ringing))
    agents = agents or AgentStateTracker(matcher())
    events: list[LineEvent] = []
    for i, msg in enumerate(msgs):
        events.extend(tracker.handle(msg, 1000.0 + i))
        events.extend(agents.handle(msg, 1000.0 + i))
    return tracker, events


def by_line(events: list[LineEvent]) -> dict[str, list[LineEvent]]:
    out: dict[str, list[LineEvent]] = defaultdict(list)
    for e in events:
        out[e.line].append(e)
    return dict(out)


def kinds(events: list[LineEvent]) -> list[EventType]:
    return [e.type for e in events]


def assert_clean(tracker: CallTracker) -> None:
    """Memory is bounded: nothing of a finished call stays behind."""
    for line in tracker.lines():
        assert tracker.calls_of(line) == []
    graph = tracker._graph
    assert not graph.chans and not graph.groups and not graph.bridges and not graph.local_pairs
    assert not graph.by_name and not graph.calls and not graph.parked_calls


# ---- the real captures --------------------------------------------------------------------------


@pytest.mark.parametrize("ring_on_ringing", [True, False])
def test_inbound_direct_capture(ring_on_ringing: bool) -> None:
    tracker, events = play(load("inbound-direct.ami"), ring_on_ringing=ring_on_ringing)
    lines = by_line(events)
    assert set(lines) == {"305"}
    evs = lines["305"]
    assert kinds(evs) == [RS, CS, RF]
    assert [e.call.state for e in evs if e.call] == [CallState.RINGING, CallState.CONNECTED, CallState.FINISHED]
    for e in evs:
        c = e.call
        assert c is not None
        assert c.id == "1795685548.7:305"
        assert c.linked_id == "1795685548.7"
        assert c.channel == "SIP/305-00000004"
        assert c.direction is Direction.INBOUND
        assert (c.caller_number, c.caller_name) == ("79161234567", "Ivan Petrov")
        assert c.called_number == "305"
    end = evs[-1].call
    assert end is not None
    assert (end.hangup_cause, end.hangup_cause_text) == (16, "Normal Clearing")
    assert end.answered_at is not None and end.ended_at is not None
    assert evs[0].ami_received_at < evs[1].ami_received_at < evs[2].ami_received_at
    assert evs[0].epoch == "" and evs[0].seq == 0
    assert_clean(tracker)


def test_ring_started_moment_depends_on_the_option() -> None:
    msgs = load("inbound-direct.ami")
    _, on_ringing = play(msgs, ring_on_ringing=True)
    _, on_dial = play(msgs, ring_on_ringing=False)
    assert msgs[int(on_ringing[0].ami_received_at - 1000)].event == "Newstate"
    assert msgs[int(on_dial[0].ami_received_at - 1000)].event == "DialBegin"


@pytest.mark.parametrize("ring_on_ringing", [True, False])
def test_inbound_queue_capture(ring_on_ringing: bool) -> None:
    agents = AgentStateTracker(matcher())
    tracker, events = play(load("inbound-queue.ami"), ring_on_ringing=ring_on_ringing, agents=agents)
    lines = by_line(events)
    assert set(lines) == {"305", "306"}
    assert kinds(lines["305"]) == [RS, CS, RF]
    assert kinds(lines["306"]) == [RS, RF]
    for e in lines["305"] + lines["306"]:
        assert e.call is not None
        assert e.call.queue == "support"
        assert e.call.direction is Direction.INBOUND
        assert e.call.caller_number == "79161234567"
        assert e.call.caller_name == "Ivan Petrov"
    assert lines["305"][0].call and lines["305"][0].call.id == "1795685537.0:305"
    assert lines["306"][0].call and lines["306"][0].call.id == "1795685537.0:306"
    assert lines["305"][0].call.channel == "SIP/305-00000002"
    rang_out = lines["306"][-1].call
    assert rang_out is not None
    assert rang_out.state is CallState.FINISHED and rang_out.answered_at is None
    assert rang_out.hangup_cause_text == "CANCEL"
    # 306's ring ends when 305 answers, before 305's call ends
    assert lines["306"][-1].ami_received_at < lines["305"][-1].ami_received_at
    end = lines["305"][-1].call
    assert end is not None and end.hangup_cause == 16
    assert agents.agent_state("305") is not None and agents.agent_state("305").paused is False  # type: ignore[union-attr]
    assert_clean(tracker)


@pytest.mark.parametrize("ring_on_ringing", [True, False])
def test_outbound_click_to_dial_capture(ring_on_ringing: bool) -> None:
    tracker, events = play(load("outbound.ami"), ring_on_ringing=ring_on_ringing)
    lines = by_line(events)
    assert set(lines) == {"305"}
    evs = lines["305"]
    assert kinds(evs) == [RS, CS, RF]
    for e in evs:
        c = e.call
        assert c is not None
        assert c.id == "1795685559.9:305"
        assert c.direction is Direction.OUTBOUND
        assert (c.caller_number, c.called_number) == ("305", "5551234")
        assert c.channel == "SIP/305-00000005"
    # commutation is the carrier's answer, not the agent picking up their own phone
    msgs = load("outbound.ami")
    cs_msg = msgs[int(evs[1].ami_received_at - 1000)]
    assert cs_msg.event == "DialEnd" and cs_msg.get("Channel") == "SIP/305-00000005"
    assert evs[-1].call is not None and evs[-1].call.hangup_cause == 16
    assert_clean(tracker)


def test_live_calls_while_in_progress() -> None:
    msgs = load("inbound-direct.ami")
    tracker = CallTracker(matcher())
    seen: list[int] = []
    for i, msg in enumerate(msgs):
        tracker.handle(msg, float(i))
        seen.append(len(tracker.calls_of("305")))
    assert max(seen) == 1 and seen[-1] == 0


def test_packet_info_fills_extra_from_the_call_channels() -> None:
    spec = parse_packet_info("header:Exten=did;header:Context=ctx;var:CRM_ID=crmId")
    tracker = CallTracker(matcher(), TrackerOptions(packet_info=spec))
    _, events = play(load("inbound-direct.ami"), tracker)
    first = events[0].call
    assert first is not None
    # the agent's own channel wins on a clash (Context), the remote side fills the rest
    assert first.extra == {"did": "4950000305", "ctx": "from-internal"}


# ---- hand-written transcripts of documented flows ------------------------------------------------
# Compact (only the headers the tracker reads), written after Asterisk's documented event sequences for
# app_dial (DialBegin/DialState/DialEnd), the bridging core (BridgeEnter/Leave), Hold/Unhold, and the
# BlindTransfer/AttendedTransfer events of Asterisk 12+.


def line_view(events: list[LineEvent], line: str) -> list[tuple[str, str, str]]:
    return [
        (e.type.value, e.call.id if e.call else "", e.call.state.value if e.call else "")
        for e in events
        if e.line == line
    ]


def test_direct_not_answered() -> None:
    tracker, events = play(load("direct-noanswer.ami"))
    evs = by_line(events)["305"]
    assert kinds(evs) == [RS, RF]
    assert evs[-1].call is not None and evs[-1].call.hangup_cause_text == "NOANSWER"
    assert evs[-1].call.answered_at is None
    assert_clean(tracker)


def test_caller_gave_up() -> None:
    tracker, events = play(load("caller-gave-up.ami"))
    evs = by_line(events)["305"]
    assert kinds(evs) == [RS, RF]
    assert evs[-1].call is not None and evs[-1].call.hangup_cause_text == "CANCEL"
    assert_clean(tracker)


def test_agent_phone_busy() -> None:
    tracker, events = play(load("agent-busy.ami"))
    evs = by_line(events)["305"]
    assert kinds(evs) == [RS, AB, RF]
    assert [e.call.state for e in evs if e.call] == [CallState.RINGING, CallState.BUSY, CallState.FINISHED]
    assert_clean(tracker)


def test_outbound_to_a_busy_number() -> None:
    tracker, events = play(load("outbound-busy.ami"))
    evs = by_line(events)["305"]
    assert kinds(evs) == [RS, AB, RF]
    assert [e.call.state for e in evs if e.call] == [CallState.RINGING, CallState.BUSY, CallState.FINISHED]
    last = evs[-1].call
    assert last is not None
    assert (last.direction, last.caller_number, last.called_number) == (Direction.OUTBOUND, "305", "5559999")
    assert (last.hangup_cause, last.hangup_cause_text) == (17, "User busy")
    assert_clean(tracker)


def test_agent_dials_out_from_the_phone() -> None:
    tracker, events = play(load("outbound-from-phone.ami"))
    evs = by_line(events)["305"]
    assert kinds(evs) == [RS, CS, RF]
    for e in evs:
        assert e.call is not None
        assert e.call.direction is Direction.OUTBOUND
        assert (e.call.caller_number, e.call.called_number) == ("305", "5551234")
        assert e.call.id == "1700000400.1:305"
    assert_clean(tracker)


def test_internal_call_both_views() -> None:
    tracker, events = play(load("internal.ami"))
    lines = by_line(events)
    assert kinds(lines["305"]) == [RS, CS, RF]
    assert kinds(lines["306"]) == [RS, CS, RF]
    for e in lines["305"] + lines["306"]:
        assert e.call is not None
        assert e.call.direction is Direction.INTERNAL
        assert (e.call.caller_number, e.call.called_number) == ("305", "306")
    assert lines["306"][0].call and lines["306"][0].call.caller_name == "Agent 305"
    assert {e.call.id for e in lines["305"] if e.call} == {"1700000500.1:305"}
    assert {e.call.id for e in lines["306"] if e.call} == {"1700000500.1:306"}
    assert_clean(tracker)


def test_hold_and_resume() -> None:
    tracker, events = play(load("hold-resume.ami"))
    evs = by_line(events)["305"]
    assert kinds(evs) == [RS, CS, HS, HE, RF]
    assert [e.call.state for e in evs if e.call][2:4] == [CallState.HELD, CallState.CONNECTED]
    assert_clean(tracker)


def test_hold_from_music_on_hold_when_the_pbx_has_no_hold_events() -> None:
    msgs = [m for m in load("hold-resume.ami") if m.event not in ("Hold", "Unhold")]
    tracker, events = play(msgs)
    assert kinds(by_line(events)["305"]) == [RS, CS, HS, HE, RF]
    assert_clean(tracker)


def test_blind_transfer() -> None:
    tracker, events = play(load("blind-transfer.ami"))
    lines = by_line(events)
    assert kinds(lines["305"]) == [RS, CS, CI, RF]
    info = lines["305"][2].call
    assert info is not None and (info.redirecting_number, info.redirection_number) == ("305", "306")
    assert kinds(lines["306"]) == [RS, CS, RF]
    for e in lines["306"]:
        c = e.call
        assert c is not None
        assert c.id == "1700000700.1:306"
        assert c.direction is Direction.INBOUND
        assert (c.caller_number, c.caller_name) == ("79161234567", "Ivan Petrov")
        assert (c.redirecting_number, c.redirection_number) == ("305", "306")
    assert_clean(tracker)


def test_attended_transfer_completed() -> None:
    tracker, events = play(load("attended-transfer.ami"))
    assert line_view(events, "305") == [
        ("ring_started", "1700000800.1:305", "ringing"),
        ("commutation_started", "1700000800.1:305", "connected"),
        ("hold_started", "1700000800.1:305", "held"),
        ("ring_started", "1700000810.3:305", "ringing"),  # the consultation call, its own id
        ("commutation_started", "1700000810.3:305", "connected"),
        ("call_info_changed", "1700000800.1:305", "held"),
        ("call_info_changed", "1700000810.3:305", "connected"),
        ("ring_finished", "1700000800.1:305", "finished"),
        ("ring_finished", "1700000810.3:305", "finished"),
    ]
    assert line_view(events, "306") == [
        ("ring_started", "1700000810.3:306", "ringing"),
        ("commutation_started", "1700000810.3:306", "connected"),
        ("call_info_changed", "1700000810.3:306", "connected"),
        ("ring_finished", "1700000810.3:306", "finished"),
    ]
    before, after = (e.call for e in by_line(events)["306"][1:3])
    assert before is not None and after is not None
    assert before.caller_number == "305"
    # 306 now talks to the external caller; 305 transferred the call to 306
    assert (after.caller_number, after.caller_name) == ("79161234567", "Ivan Petrov")
    assert (after.redirecting_number, after.redirection_number) == ("305", "306")
    assert after.id == before.id
    assert_clean(tracker)


def test_attended_transfer_cancelled() -> None:
    tracker, events = play(load("attended-transfer-cancel.ami"))
    assert line_view(events, "305") == [
        ("ring_started", "1700000800.1:305", "ringing"),
        ("commutation_started", "1700000800.1:305", "connected"),
        ("hold_started", "1700000800.1:305", "held"),
        ("ring_started", "1700000810.3:305", "ringing"),
        ("commutation_started", "1700000810.3:305", "connected"),
        ("ring_finished", "1700000810.3:305", "finished"),
        ("hold_ended", "1700000800.1:305", "connected"),
        ("ring_finished", "1700000800.1:305", "finished"),
    ]
    assert kinds(by_line(events)["306"]) == [RS, CS, RF]
    assert_clean(tracker)


def test_pjsip_direct_call() -> None:
    tracker, events = play(load("pjsip-direct.ami"))
    evs = by_line(events)["305"]
    assert kinds(evs) == [RS, CS, RF]
    assert evs[0].call is not None and evs[0].call.channel == "PJSIP/305-00000002"
    assert evs[0].call.caller_number == "79161234567"
    sip_only = CallTracker(LineMatcher(protocol="SIP"))
    assert play(load("pjsip-direct.ami"), sip_only)[1] == []
    assert_clean(tracker)


def test_asterisk_13_direct_call_and_pause_reason() -> None:
    agents = AgentStateTracker(matcher())
    tracker, events = play(load("asterisk13-direct.ami"), agents=agents)
    evs = by_line(events)["305"]
    assert kinds(evs) == [AG, AG, RS, CS, RF]
    assert evs[0].agent is not None and (evs[0].agent.paused, evs[0].agent.reason) == (True, "lunch")
    assert evs[1].agent is not None and not evs[1].agent.paused
    assert agents.agent_state("305") is not None
    assert_clean(tracker)


# ---- agent state ---------------------------------------------------------------------------------


def msg(event: str, **headers: str) -> AmiMessage:
    return AmiMessage((("Event", event), *((k.replace("_", "-"), v) for k, v in headers.items())))


def member(event: str, queue: str, paused: str, reason: str = "", iface: str = "Local/305@from-queue/n") -> AmiMessage:
    return msg(event, Queue=queue, Interface=iface, StateInterface=iface, Paused=paused, PausedReason=reason)


def test_agent_pause_changes_only() -> None:
    tracker = AgentStateTracker(matcher())
    assert tracker.handle(member("QueueMemberStatus", "support", "0"), 1.0) == []  # learning is not a change
    assert tracker.agent_state("305") == AgentState("305", False, "", ("support",), code="Active")
    [ev] = tracker.handle(member("QueueMemberPause", "support", "1", "break"), 2.0)
    assert ev.type is AG and ev.agent == AgentState("305", True, "break", ("support",), code="Paused", set_by="pbx")
    assert ev.call is None and ev.ami_received_at == 2.0
    assert tracker.handle(member("QueueMemberPause", "support", "1", "break"), 3.0) == []  # duplicate
    assert tracker.handle(member("QueueMemberStatus", "support", "1", "break"), 3.0) == []
    # joins a second queue unpaused: no longer paused in all its queues
    [ev] = tracker.handle(member("QueueMemberAdded", "sales", "0", iface="SIP/305"), 4.0)
    assert ev.agent == AgentState("305", False, "", ("sales", "support"), code="Active", set_by="pbx")
    [ev] = tracker.handle(member("QueueMemberRemoved", "sales", "0"), 5.0)
    assert ev.agent is not None and ev.agent.paused and ev.agent.reason == "break"
    assert tracker.handle(member("QueueMemberPause", "support", "1", iface="SIP/trunk-in"), 6.0) == []
    assert "305" in tracker.lines()


def test_the_call_tracker_and_the_agent_states_each_take_their_own_events() -> None:
    """The gateway feeds both every message: calls come only from the call tracker, agent states only from
    the agent tracker, so nothing is reported twice."""
    msgs = load("asterisk13-direct.ami")
    tracker, agents = CallTracker(matcher()), AgentStateTracker(matcher())
    calls = [e for i, m in enumerate(msgs) for e in tracker.handle(m, float(i))]
    states = [e for i, m in enumerate(msgs) for e in agents.handle(m, float(i))]
    assert kinds(calls) == [RS, CS, RF]
    assert kinds(states) == [AG, AG]
    assert "305" in agents.lines() and tracker.lines() == set()


def test_the_rules_are_numbered_in_order() -> None:
    """The tracker's docstring numbers its rules 1, 2, 3... in the order it states them, each feature module
    states the rule the index gives it, and no comment names a rule that does not exist."""
    import re

    from ami_gateway import tracker as tracker_module

    root = Path(tracker_module.__file__).parent
    heading = re.compile(r"^Rule (\d+) - ", re.M)
    numbers = [int(n) for n in heading.findall(tracker_module.__doc__ or "")]
    assert numbers == list(range(1, len(numbers) + 1))
    index = re.findall(r"^Rule (\d+) - [^\n]*\(``(\w+\.py)``\)", tracker_module.__doc__ or "", re.M)
    assert index
    for number, module in index:
        assert heading.findall((root / "call_features" / module).read_text()) == [number], module
    sources = [root / "tracker.py", root / "channel_graph.py", root / "call_moments.py",
               *sorted((root / "call_features").glob("*.py"))]
    named = {int(n) for path in sources for n in re.findall(r"\bRule (\d+)\b", path.read_text())}
    assert named <= set(numbers)


# ---- robustness ----------------------------------------------------------------------------------


def test_duplicated_events_change_nothing() -> None:
    doubled = [m for m in load("inbound-queue.ami") for _ in range(2)]
    tracker, events = play(doubled)
    lines = by_line(events)
    assert kinds(lines["305"]) == [RS, CS, RF]
    assert kinds(lines["306"]) == [RS, RF]
    assert_clean(tracker)


def test_late_events_about_a_hung_up_call_are_ignored() -> None:
    msgs = load("inbound-direct.ami")
    tracker, _ = play(msgs)
    _, late = play(msgs, tracker)  # the whole call again, same unique ids: all of it is history
    assert late == []
    assert_clean(tracker)


def test_unknown_channels_and_missing_headers() -> None:
    tracker = CallTracker(matcher())
    assert tracker.handle(msg("Hangup", Channel="SIP/305-00000099", Uniqueid="9.9", Cause="16"), 1.0) == []
    assert tracker.handle(msg("DialEnd", DialStatus="ANSWER"), 1.0) == []
    assert tracker.handle(msg("DialBegin", DestChannel="SIP/305-0000009a"), 1.0) == []
    assert tracker.handle(msg("Hold"), 1.0) == []
    assert tracker.handle(msg("AttendedTransfer", Result="Success"), 1.0) == []
    assert tracker.handle(AmiMessage((("Response", "Success"),)), 1.0) == []
    assert tracker.handle(msg("OriginateResponse", Channel="SIP/305", Uniqueid="<null>", Response="Failure"), 1.0) == []
    assert not tracker._graph.chans


# ---- resync --------------------------------------------------------------------------------------


def show(channel: str, uid: str, linkedid: str, state: str, app: str = "", bridge: str = "", **h: str) -> AmiMessage:
    return msg(
        "CoreShowChannel",
        Channel=channel,
        Uniqueid=uid,
        Linkedid=linkedid,
        ChannelState=state,
        Application=app,
        BridgeId=bridge,
        Duration="00:00:10",
        **h,
    )


def test_resync_finishes_calls_that_ended_while_away() -> None:
    msgs = load("inbound-direct.ami")
    cut = next(i for i, m in enumerate(msgs) if m.event == "BridgeEnter")
    tracker, events = play(msgs[:cut])
    assert kinds(events) == [RS, CS]
    [ev] = tracker.resync([], 5000.0)
    assert ev.type is RF and ev.call is not None and ev.call.state is CallState.FINISHED
    assert ev.call.id == "1795685548.7:305" and ev.call.ended_at == 5000.0
    assert_clean(tracker)
    assert play(msgs[cut:], tracker)[1] == []


def test_a_resync_call_in_the_old_shape_is_refused() -> None:
    """The queue members left ``resync`` for the AgentStateTracker: a call still written (channels, members,
    time) must fail, not run with the members as the time and the time as the announced calls."""
    with pytest.raises(TypeError):
        CallTracker(matcher()).resync([], [], 100.0)  # type: ignore[misc]


def test_resync_announces_calls_found_on_the_pbx() -> None:
    tracker = CallTracker(matcher())
    trunk = show(
        "SIP/trunk-in-00000003",
        "1.1",
        "1.1",
        "6",
        "Dial",
        "br-1",
        CallerIDNum="79161234567",
        CallerIDName="Ivan Petrov",
        Exten="4950000305",
    )
    phone = show(
        "SIP/305-00000004",
        "1.2",
        "1.1",
        "6",
        "AppDial",
        "br-1",
        CallerIDNum="305",
        CallerIDName="Agent 305",
        ConnectedLineNum="79161234567",
        ConnectedLineName="Ivan Petrov",
    )
    ringing = show(
        "SIP/306-00000005", "2.2", "2.1", "5", "AppDial", "", CallerIDNum="306", ConnectedLineNum="74950000000"
    )
    trunk2 = show("SIP/trunk-in-00000006", "2.1", "2.1", "4", "Dial", "", CallerIDNum="74950000000")
    events = tracker.resync([trunk, phone, trunk2, ringing], 100.0)
    assert [(e.line, e.type) for e in events] == [("305", CS), ("306", RS)]
    c305, c306 = events[0].call, events[1].call
    assert c305 is not None and c306 is not None
    assert (c305.state, c305.direction, c305.caller_number) == (CallState.CONNECTED, Direction.INBOUND, "79161234567")
    assert c305.started_at == 90.0 and c305.id == "1.1:305"
    assert (c306.state, c306.caller_number) == (CallState.RINGING, "74950000000")
    # a second resync with the same truth says nothing; the ringing call answered meanwhile is connected
    assert tracker.resync([trunk, phone, trunk2, ringing], 101.0) == []
    answered = show("SIP/306-00000005", "2.2", "2.1", "6", "AppDial", "br-2", CallerIDNum="306")
    trunk2_up = show("SIP/trunk-in-00000006", "2.1", "2.1", "6", "Dial", "br-2")
    events = tracker.resync([trunk, phone, trunk2_up, answered], 102.0)
    assert [(e.line, e.type) for e in events] == [("306", CS)]
    # later live events continue the resynced calls
    [end] = tracker.handle(msg("Hangup", Channel="SIP/305-00000004", Uniqueid="1.2", Cause="16"), 103.0)
    assert end.type is RF and end.call is not None and end.call.id == "1.1:305"


def test_a_call_answered_while_nobody_watched_rings_before_it_connects() -> None:
    """A takeover finds a call connected that no agent was told of (it rang between the old
    gateway's death and the new one's resync): RING_STARTED then COMMUTATION_STARTED, so Creatio
    pops it up; a call the previous term announced is restated connected only."""
    def resynced(announced: set[str]) -> list[tuple[str, EventType]]:
        tracker = CallTracker(matcher())
        trunk = show("SIP/trunk-00000003", "1.1", "1.1", "6", "Dial", "br-1", CallerIDNum="79161234567")
        phone = show("SIP/305-00000004", "1.2", "1.1", "6", "AppDial", "br-1", CallerIDNum="305",
                     ConnectedLineNum="79161234567")
        return [(e.line, e.type) for e in tracker.resync([trunk, phone], 100.0, announced=announced)]

    assert resynced(set()) == [("305", RS), ("305", CS)]
    assert resynced({"1.1:305"}) == [("305", CS)]


def test_a_phone_channel_found_just_created_is_announced_by_its_dial_not_guessed_at_the_resync() -> None:
    """A takeover's listing can show a queue member's phone before its DialBegin (still in the buffer): Down,
    no application. It is no call yet; guessed as the agent dialling out it was shown with the agent's own
    number as the caller. Its DialBegin then announces it INCOMING from the real caller."""
    tracker = CallTracker(matcher())
    trunk = show("SIP/trunk-in-00000003", "1.1", "1.1", "6", "Queue", "", CallerIDNum="79161234567")
    created = show("SIP/305-00000004", "1.2", "1.1", "0", "", "", CallerIDNum="305")
    assert tracker.resync([trunk, created], 100.0) == []
    dial = msg("DialBegin", Channel="SIP/trunk-in-00000003", Uniqueid="1.1", Linkedid="1.1",
               CallerIDNum="79161234567", DestChannel="SIP/305-00000004", DestUniqueid="1.2", DestLinkedid="1.1",
               DestChannelState="0", DestCallerIDNum="305", DestConnectedLineNum="79161234567")
    ring = msg("Newstate", Channel="SIP/305-00000004", Uniqueid="1.2", Linkedid="1.1", ChannelState="5",
               CallerIDNum="305", ConnectedLineNum="79161234567")
    events = tracker.handle(dial, 100.1) + tracker.handle(ring, 100.2)
    assert [(e.line, e.type) for e in events] == [("305", RS)]
    call = events[0].call
    assert call is not None and call.caller_number == "79161234567" and call.direction is Direction.INBOUND


def test_a_phone_refused_busy_whose_dial_began_before_the_resync_is_incoming_from_the_caller() -> None:
    """The listing found the phone just created (its DialBegin already gone by); its DialEnd BUSY names the
    dialler: the busy call is INCOMING from the caller, not the agent dialling out (chaos redis-restart-empty)."""
    tracker = CallTracker(matcher())
    trunk = show("SIP/trunk-in-00000003", "1.1", "1.1", "4", "Dial", "", CallerIDNum="79161234567")
    created = show("SIP/305-00000004", "1.2", "1.1", "0", "AppDial", "", CallerIDNum="305")
    assert tracker.resync([trunk, created], 100.0) == []
    busy = msg("DialEnd", Channel="SIP/trunk-in-00000003", Uniqueid="1.1", Linkedid="1.1", CallerIDNum="79161234567",
               DestChannel="SIP/305-00000004", DestUniqueid="1.2", DestLinkedid="1.1", DestChannelState="0",
               DestCallerIDNum="305", DialStatus="BUSY")
    events = tracker.handle(busy, 100.3)
    assert [(e.line, e.type) for e in events] == [("305", RS), ("305", EventType.ABONENT_BUSY), ("305", RF)]
    call = events[0].call
    assert call is not None and call.caller_number == "79161234567" and call.direction is Direction.INBOUND


def test_a_queue_members_phone_listed_before_it_rang_rings_incoming_from_the_caller() -> None:
    """After an AMI cut the listing shows a member's phone just created by its Local half's Dial (AppDial,
    Down), the DialBegin lost in the cut. When it rings it is INCOMING from the caller, not a click-to-dial
    showing the agent's own number (chaos ami-cut)."""
    tracker = CallTracker(matcher())
    trunk = show("SIP/trunk-in-00000003", "1.1", "1.1", "6", "Queue", "", CallerIDNum="79161234567")
    local2 = show("Local/305@from-queue-00000001;2", "1.3", "1.1", "4", "Dial", "", CallerIDNum="79161234567")
    phone = show("SIP/305-00000004", "1.4", "1.1", "0", "AppDial", "", CallerIDNum="305",
                 ConnectedLineNum="79161234567")
    assert tracker.resync([trunk, local2, phone], 100.0) == []
    ring = msg("Newstate", Channel="SIP/305-00000004", Uniqueid="1.4", Linkedid="1.1", ChannelState="5",
               CallerIDNum="305", ConnectedLineNum="79161234567")
    events = tracker.handle(ring, 100.2)
    assert [(e.line, e.type) for e in events] == [("305", RS)]
    call = events[0].call
    assert call is not None and call.caller_number == "79161234567" and call.direction is Direction.INBOUND


def test_resync_refreshes_pause_states() -> None:
    tracker = AgentStateTracker(matcher())
    qm = msg("QueueMember", Queue="support", Location="Local/305@from-queue/n", Paused="1", PausedReason="lunch")
    [ev] = tracker.resync([qm], 1.0)
    assert ev.type is AG and ev.agent == AgentState("305", True, "lunch", ("support",), code="Paused")
    assert tracker.resync([qm], 2.0) == []
    [ev] = tracker.resync([], 3.0)
    assert ev.agent == AgentState("305", False, "", ())


# ---- properties ----------------------------------------------------------------------------------


def _retag(msgs: list[AmiMessage], old: str, new: str) -> list[AmiMessage]:
    return [m.with_headers((k, v.replace(old, new)) for k, v in m.headers) for m in msgs]


CALL_A = load("inbound-direct.ami")  # line 305
CALL_B = _retag(load("outbound-from-phone.ami"), "305", "307")  # line 307, other Linkedid


def _per_line(stream: list[tuple[AmiMessage, float]]) -> dict[str, list[LineEvent]]:
    tracker = CallTracker(matcher())
    events: list[LineEvent] = []
    for m, t in stream:
        events.extend(tracker.handle(m, t))
    assert_clean(tracker)
    return by_line(events)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.booleans(), min_size=len(CALL_A) + len(CALL_B), max_size=len(CALL_A) + len(CALL_B)))
def test_interleaving_independent_calls_changes_nothing(choices: list[bool]) -> None:
    a = [(m, 1.0 + i) for i, m in enumerate(CALL_A)]
    b = [(m, 500.0 + i) for i, m in enumerate(CALL_B)]
    merged: list[tuple[AmiMessage, float]] = []
    ia = ib = 0
    for pick_a in choices:
        if (pick_a and ia < len(a)) or ib >= len(b):
            merged.append(a[ia])
            ia += 1
        else:
            merged.append(b[ib])
            ib += 1
    assert _per_line(merged) == _per_line(a + b)


_EVENTS = [
    "Newchannel",
    "Newstate",
    "NewCallerid",
    "NewConnectedLine",
    "DialBegin",
    "DialState",
    "DialEnd",
    "Hangup",
    "LocalBridge",
    "BridgeEnter",
    "BridgeLeave",
    "BridgeDestroy",
    "Hold",
    "Unhold",
    "MusicOnHoldStart",
    "MusicOnHoldStop",
    "QueueCallerJoin",
    "AgentCalled",
    "AgentConnect",
    "AgentComplete",
    "BlindTransfer",
    "AttendedTransfer",
    "QueueMemberStatus",
    "QueueMemberPause",
    "QueueMemberAdded",
    "QueueMemberRemoved",
    "Rename",
    "CoreShowChannel",
    "Cdr",
]
_PREFIXES = [
    "",
    "Dest",
    "LocalOne",
    "LocalTwo",
    "Transferer",
    "Transferee",
    "OrigTransferer",
    "SecondTransferer",
    "TransferTarget",
]
_FIELDS = [
    "Channel",
    "Uniqueid",
    "Linkedid",
    "ChannelState",
    "CallerIDNum",
    "ConnectedLineNum",
    "Exten",
    "ChanVariable",
]
_OTHER = [
    "DialStatus",
    "Cause",
    "Cause-txt",
    "BridgeUniqueid",
    "Queue",
    "Interface",
    "StateInterface",
    "Paused",
    "PausedReason",
    "Result",
    "Extension",
    "OrigBridgeUniqueid",
    "SecondBridgeUniqueid",
    "Newname",
    "Location",
]
_NAMES = st.sampled_from([p + f for p in _PREFIXES for f in _FIELDS] + _OTHER)
_VALUES = st.one_of(
    st.sampled_from(
        [
            "SIP/305-00000001",
            "SIP/306-00000002",
            "Local/305@from-queue-00000001;1",
            "Local/305@from-queue-00000001;2",
            "SIP/trunk-in-00000003",
            "1.1",
            "1.2",
            "1.3",
            "5",
            "6",
            "4",
            "ANSWER",
            "BUSY",
            "CANCEL",
            "Success",
            "1",
            "0",
            "support",
            "Local/305@from-queue/n",
            "16",
            "",
            "<unknown>",
            "b1",
            "X=1",
        ]
    ),
    st.text(max_size=12),
)
_MESSAGES = st.builds(
    lambda event, headers: AmiMessage((("Event", event), *headers)),
    st.sampled_from(_EVENTS) | st.text(max_size=8),
    st.lists(st.tuples(_NAMES | st.text(max_size=6), _VALUES), max_size=14),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(_MESSAGES, max_size=40), st.booleans())
def test_header_garbage_never_raises(msgs: list[AmiMessage], ring_on_ringing: bool) -> None:
    spec = parse_packet_info("header:Exten=did;var:X")
    tracker = CallTracker(
        matcher(), TrackerOptions(send_ring_started_on_ringing_state=ring_on_ringing, packet_info=spec)
    )
    agents = AgentStateTracker(matcher())
    for i, m in enumerate(msgs):
        for ev in tracker.handle(m, float(i)) + agents.handle(m, float(i)):
            assert isinstance(ev, LineEvent)
    tracker.resync(msgs[:5], 99.0)
    agents.resync(msgs[5:10], 99.0)
    for line in tracker.lines():
        for call in tracker.calls_of(line):
            assert call.state is not CallState.FINISHED
