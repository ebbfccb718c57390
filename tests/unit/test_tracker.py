"""The call tracker against real Asterisk 20 captures and hand-written transcripts of documented flows."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import pytest

from ami_gateway.ami_protocol import AmiMessage, AmiParser
from ami_gateway.lines import LineMatcher
from ami_gateway.packet_info import parse_packet_info
from ami_gateway.tracker import CallTracker, TrackerOptions
from services.wire import CallState, Direction, EventType, LineEvent

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
    msgs: list[AmiMessage], tracker: CallTracker | None = None, ring_on_ringing: bool = True
) -> tuple[CallTracker, list[LineEvent]]:
    tracker = tracker or CallTracker(matcher(), TrackerOptions(send_ring_started_on_ringing_state=ring_on_ringing))
    events: list[LineEvent] = []
    for i, msg in enumerate(msgs):
        events.extend(tracker.handle(msg, 1000.0 + i))
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
    assert not tracker._chans and not tracker._groups and not tracker._bridges and not tracker._locals
    assert not tracker._by_name and not tracker._calls


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
    tracker, events = play(load("inbound-queue.ami"), ring_on_ringing=ring_on_ringing)
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
    assert tracker.agent_state("305") is not None and tracker.agent_state("305").paused is False  # type: ignore[union-attr]
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
