"""The tracker on call pickup (Rule 9) and DTMF digits (Rule 10).

``pickup.ami`` is hand-written from Asterisk 12+'s documented sequence (``ast_do_pickup``: the picker is given the
ringing channel's connected line, answered, and moved into the ringing channel's place, which swaps the two
Uniqueids; then the ``Pickup`` event; the zombie left with the ringing channel's Uniqueid hangs up with cause 26),
with the caller pressing 1 and the agent pressing 5 once connected (``read = dtmf``).
"""

from __future__ import annotations

from ami.protocol import AmiMessage
from ami_gateway.tracker import CallTracker
from services.wire import CallState, Direction, EventType
from tests.unit.test_tracker import assert_clean, by_line, load, play
from tests.unit.test_tracker_features import until

CALLER = ("79161234567", "Ivan Petrov")
LINKED = "1795690000.20"


def view(events: list, line: str) -> list[tuple[str, str, str]]:  # type: ignore[type-arg]
    return [(e.type.value, e.call.id, e.call.state.value) for e in by_line(events).get(line, []) if e.call]


def check_pickup(msgs: list[AmiMessage]) -> None:
    tracker, events = play(msgs)
    lines = by_line(events)
    assert view(events, "305") == [
        ("ring_started", f"{LINKED}:305", "ringing"),
        ("ring_finished", f"{LINKED}:305", "finished"),
    ]
    rung = lines["305"][-1].call
    assert rung is not None and rung.answered_at is None  # 305 never answered
    assert (rung.hangup_cause, rung.hangup_cause_text) == (26, "Answered elsewhere")
    assert view(events, "306") == [
        ("ring_started", f"{LINKED}:306", "ringing"),
        ("commutation_started", f"{LINKED}:306", "connected"),
        ("dtmf_entered", f"{LINKED}:306", "connected"),
        ("ring_finished", f"{LINKED}:306", "finished"),
    ]
    picked = lines["306"][1].call
    assert picked is not None
    assert (picked.caller_number, picked.caller_name) == CALLER
    assert picked.direction is Direction.INBOUND
    assert (picked.redirecting_number, picked.redirection_number) == ("305", "306")
    assert picked.channel == "SIP/306-00000012"
    dtmf = [e for e in events if e.type is EventType.DTMF_ENTERED]
    assert [(e.line, e.digits) for e in dtmf] == [("306", "5")]  # the agent's own 5; the caller's 1 is not
    end = lines["306"][-1].call
    assert end is not None and end.hangup_cause == 16 and end.answered_at is not None
    assert_clean(tracker)


def test_pickup_the_rung_line_finishes_and_the_picker_gets_the_call() -> None:
    check_pickup(load("pickup.ami"))


def test_pickup_when_the_zombie_hangs_up_before_the_pickup_event() -> None:
    """The order of the zombie's Hangup and the Pickup event is not fixed (two threads): same result."""
    msgs = load("pickup.ami")
    pickup = until(msgs, "Pickup") - 1
    hangup = until(msgs, "Hangup") - 1
    assert pickup < hangup
    reordered = msgs[:pickup] + [msgs[hangup], msgs[pickup]] + msgs[pickup + 1 : hangup] + msgs[hangup + 1 :]
    check_pickup(reordered)


def test_pickup_by_a_channel_that_is_not_a_line_only_finishes_the_rung_call() -> None:
    msgs = load("pickup.ami")
    pickup = until(msgs, "Pickup") - 1
    tracker, events = play(msgs[:pickup])
    fields = {k: v for k, v in msgs[pickup].headers if k not in ("Channel", "Uniqueid", "Linkedid")}
    stranger = AmiMessage(
        [*fields.items(), ("Channel", "SIP/trunk-out-00000001"), ("Uniqueid", "1795690000.99"),
         ("Linkedid", "1795690000.99")]
    )
    out = tracker.handle(stranger, 2000.0)
    assert [(e.line, e.type) for e in out] == [("305", EventType.RING_FINISHED)]
    assert tracker.calls_of("305") == [] and tracker.calls_of("306") == []


def dtmf(channel: str, uid: str, digit: str, direction: str, event: str = "DTMFEnd") -> AmiMessage:
    return AmiMessage([("Event", event), ("Privilege", "dtmf,all"), ("Channel", channel), ("Uniqueid", uid),
                       ("Digit", digit), ("DurationMs", "100"), ("Direction", direction)])


def connected_tracker() -> CallTracker:
    msgs = load("inbound-direct.ami")
    tracker, events = play(msgs[: until(msgs, "HangupRequest") - 1])
    (call,) = tracker.calls_of("305")
    assert call.state is CallState.CONNECTED
    return tracker


def test_dtmf_the_agent_presses_is_entered_on_the_agent_line_the_callers_is_not() -> None:
    tracker = connected_tracker()
    phone = ("SIP/305-00000004", "1795685548.8")
    out = tracker.handle(dtmf(*phone, "5", "Received"), 2000.0)  # the agent's own key on the desk phone
    assert [(e.line, e.type, e.digits) for e in out] == [("305", EventType.DTMF_ENTERED, "5")]
    assert out[0].call == tracker.calls_of("305")[0] and out[0].ami_received_at == 2000.0
    assert tracker.handle(dtmf(*phone, "5", "Received", event="DTMFBegin"), 2001.0) == []  # End only: once
    assert tracker.handle(dtmf(*phone, "7", "Sent"), 2002.0) == []  # PlayDTMF / passed on: not pressed here
    trunk = ("SIP/trunk-in-00000003", "1795685548.7")
    assert tracker.handle(dtmf(*trunk, "#", "Received"), 2003.0) == []  # the caller's keys: not the agent's
    assert tracker.handle(dtmf(*phone, "12", "Received"), 2004.0) == []  # garbage digit
    assert tracker.handle(dtmf("SIP/nobody-1", "1.1", "3", "Received"), 2005.0) == []  # unknown channel


def test_dtmf_between_two_lines_is_entered_on_the_line_that_pressed_it() -> None:
    msgs = load("internal.ami")
    tracker, _ = play(msgs[: until(msgs, "BridgeLeave") - 1])  # 305 and 306 talking
    enter = [m for m in msgs if m.event == "BridgeEnter"]
    bridged = [m for m in enter if (m.get("Channel") or "").startswith("SIP/30")]
    lines = {(m.get("Channel") or "")[4:7]: ((m.get("Channel") or ""), (m.get("Uniqueid") or "")) for m in bridged}
    assert set(lines) == {"305", "306"}
    out = tracker.handle(dtmf(*lines["305"], "9", "Received"), 2000.0)
    assert [(e.line, e.digits) for e in out] == [("305", "9")]
    out = tracker.handle(dtmf(*lines["306"], "4", "Received"), 2001.0)
    assert [(e.line, e.digits) for e in out] == [("306", "4")]
