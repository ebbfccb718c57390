"""Rule 8 (hold by parking) whatever order AMI delivers the events in.

Asterisk publishes ``ParkedCall`` / ``UnParkedCall`` / ``ParkedCallGiveUp`` from res_parking and the channel and
bridge events from the core, and the manager interleaves them as they come: the same park can reach the gateway
with its ``ParkedCall`` before or after the parkee leaves its bridge, enters the lot, or its partner leaves, and
the same retrieval with its ``UnParkedCall`` anywhere among the retrieving phone's own events. Each test plays
one such order, fixed, through the pure tracker (sequences from the simulator's feature code, then reordered as
Asterisk can deliver them) and expects the same calls for the agent every time.
"""

from __future__ import annotations

import pytest

from ami.protocol import AmiMessage
from ami_gateway.tracker import CallTracker
from services.wire import CallState, EventType, LineEvent
from tests.unit.test_tracker import assert_clean, by_line, play
from tests.unit.test_tracker_features import Pbx, more, parked_call, view

#: the park as the simulator emits it: the parkee leaves its bridge, the lot's bridge is made, ParkedCall, the
#: parkee enters the lot and hears music, the agent's phone leaves the dissolving bridge, the bridge goes, the phone
#: hangs up (res_parking hangs the parker up once it has heard the space).
PARK = ["BridgeLeave", "BridgeCreate", "ParkedCall", "BridgeEnter", "MusicOnHoldStart", "BridgeLeave",
        "BridgeDestroy", "Hangup"]
#: where ParkedCall can land: anywhere before the phone's Hangup, which res_parking only causes after the
#: ParkedCall (the phone first hears the space read out)
PARKED_CALL_POSITIONS = range(len(PARK) - 1)


def reorder(msgs: list[AmiMessage], name: str, position: int) -> list[AmiMessage]:
    """``msgs`` with the first ``name`` event moved to ``position`` among the others (their order kept)."""
    i = next(i for i, m in enumerate(msgs) if m.event == name)
    rest = msgs[:i] + msgs[i + 1:]
    return [*rest[:position], msgs[i], *rest[position:]]


def park_window(pbx: Pbx, trunk: str, phone: str) -> list[AmiMessage]:
    start = len(pbx.msgs)
    pbx.park(trunk, timeout_channel=phone)
    window = pbx.msgs[start:]
    assert [m.event for m in window] == PARK
    return window


def position_id(position: int) -> str:
    rest = [e for e in PARK if e != "ParkedCall"]
    return f"before-{rest[position]}-{position}"


@pytest.mark.parametrize("position", PARKED_CALL_POSITIONS, ids=position_id)
def test_a_park_holds_the_call_whenever_its_parked_call_event_comes(position: int) -> None:
    pbx = Pbx()
    trunk, agent = pbx.play("inbound-direct-long", line="305", stop_before="HangupRequest")
    tracker, events = play(pbx.msgs)
    call_id = events[0].call.id  # type: ignore[union-attr]
    _, parked = play(reorder(park_window(pbx, trunk, agent), "ParkedCall", position), tracker)
    assert view(parked, "305") == [("hold_started", call_id, "held")]
    [control] = tracker.controls("305")
    assert (control.channel, control.parked_space, control.parked_channel) == ("", "701", trunk)


@pytest.mark.parametrize("position", PARKED_CALL_POSITIONS, ids=position_id)
def test_a_resumed_call_parked_again_is_held_whenever_its_parked_call_event_comes(position: int) -> None:
    """The second park: the parkee's last bridge is the one it was resumed into, with the phone that called
    into the lot (before the fix, a ParkedCall ahead of its BridgeLeave found no partner, and the agent's call
    ended when the phone hung up)."""
    pbx, tracker, events, trunk, _ = parked_call()
    call_id = events[0].call.id  # type: ignore[union-attr]
    tracker.expect_retriever("305", call_id, "cms-resume-1")
    phone, _ = more(pbx, tracker, lambda: pbx.ring_into_the_lot("305", "cms-resume-1"))
    assert isinstance(phone, str)
    _, resumed = more(pbx, tracker, lambda: pbx.unpark(phone))
    assert view(resumed, "305") == [("hold_ended", call_id, "connected")]
    _, parked = play(reorder(park_window(pbx, trunk, phone), "ParkedCall", position), tracker)
    assert view(parked, "305") == [("hold_started", call_id, "held")]
    [control] = tracker.controls("305")
    assert (control.channel, control.parked_space, control.parked_channel) == ("", "701", trunk)
    _, gone = more(pbx, tracker, lambda: pbx.hangup(trunk))
    assert view(gone, "305") == [("ring_finished", call_id, "finished")]
    assert_clean(tracker)


def retrieval() -> tuple[CallTracker, list[AmiMessage], list[AmiMessage], str, str, str]:
    """A parked call, the resume announced, and what the PBX then emits: the phone rung into the lot up to its
    answer and the retrieval (``window``), then both ends hanging up (``after``)."""
    pbx, tracker, events, trunk, _ = parked_call()
    call_id = events[0].call.id  # type: ignore[union-attr]
    tracker.expect_retriever("305", call_id, "cms-resume-1")
    start = len(pbx.msgs)
    phone = pbx.ring_into_the_lot("305", "cms-resume-1")
    pbx.unpark(phone)
    middle = len(pbx.msgs)
    pbx.hangup(phone)
    pbx.hangup(trunk)
    return tracker, pbx.msgs[start:middle], pbx.msgs[middle:], call_id, phone, trunk


RETRIEVAL_LENGTH = len(retrieval()[1])


@pytest.mark.parametrize("position", range(RETRIEVAL_LENGTH))
def test_the_phone_called_into_the_lot_resumes_the_call_whenever_unparked_call_comes(position: int) -> None:
    """UnParkedCall before the phone's first event (it then names the phone first), while it rings, before or
    after its answer, before or after the bridge: the held call goes on, on the phone's new channel, and the
    phone is never a call of its own."""
    tracker, window, after, call_id, phone, trunk = retrieval()
    _, resumed = play(reorder(window, "UnParkedCall", position), tracker)
    assert view(resumed, "305") == [("hold_ended", call_id, "connected")]
    assert resumed[0].call is not None and resumed[0].call.channel == phone
    [control] = tracker.controls("305")
    assert (control.channel, control.peer, control.parked_space) == (phone, trunk, "")
    _, ended = play(after, tracker)
    assert view(ended, "305") == [("ring_finished", call_id, "finished")]
    assert_clean(tracker)


def only_events(events: list[LineEvent], line: str = "305") -> list[tuple[EventType, str]]:
    return [(e.type, e.call.id if e.call else "") for e in by_line(events).get(line, [])]


def test_the_caller_gives_up_before_the_phone_called_into_the_lot_appears() -> None:
    """The resume was sent, then the caller hung up in the lot: the phone Asterisk then rings is not a new call
    (before the fix the agent saw it ring as one, "cms-...:305", and got a call record for it)."""
    pbx, tracker, events, trunk, _ = parked_call()
    call_id = events[0].call.id  # type: ignore[union-attr]
    tracker.expect_retriever("305", call_id, "cms-resume-1")
    _, gave_up = more(pbx, tracker, lambda: pbx.hangup(trunk))
    assert only_events(gave_up) == [(EventType.RING_FINISHED, call_id)]
    phone, rung = more(pbx, tracker, lambda: pbx.ring_into_the_lot("305", "cms-resume-1"))
    assert isinstance(phone, str)
    _, hung_up = more(pbx, tracker, lambda: pbx.hangup(phone))  # ParkedCall() on an empty space
    assert rung == [] and hung_up == []
    assert_clean(tracker)


@pytest.mark.parametrize("answered", [False, True])
def test_the_caller_gives_up_while_the_phone_rings_into_the_lot(answered: bool) -> None:
    """Exactly one RING_FINISHED: the phone's own answer and hangup afterwards do not end the call again (before
    the fix the phone's hangup sent a second one)."""
    pbx, tracker, events, trunk, _ = parked_call()
    call_id = events[0].call.id  # type: ignore[union-attr]
    tracker.expect_retriever("305", call_id, "cms-resume-1")
    phone, rung = more(pbx, tracker, lambda: pbx.ring_into_the_lot("305", "cms-resume-1", answer=answered))
    assert isinstance(phone, str) and rung == []
    _, gave_up = more(pbx, tracker, lambda: pbx.hangup(trunk))
    assert only_events(gave_up) == [(EventType.RING_FINISHED, call_id)]
    _, rest = more(pbx, tracker, lambda: pbx.hangup(phone))
    assert rest == []
    assert_clean(tracker)


def test_another_line_takes_the_call_from_the_lot_while_the_agents_phone_rings_for_it() -> None:
    pbx, tracker, events, trunk, _ = parked_call()
    call_id = events[0].call.id  # type: ignore[union-attr]
    tracker.expect_retriever("305", call_id, "cms-resume-1")
    phone, _ = more(pbx, tracker, lambda: pbx.ring_into_the_lot("305", "cms-resume-1", answer=False))
    other, _ = more(pbx, tracker, lambda: pbx.ring_into_the_lot("306", "someone-else"))
    assert isinstance(other, str) and isinstance(phone, str)
    _, taken = more(pbx, tracker, lambda: pbx.unpark(other))
    assert only_events(taken) == [(EventType.RING_FINISHED, call_id)]
    assert taken[0].call is not None and taken[0].call.hangup_cause_text == "PARKED_PICKUP"
    _, rest = more(pbx, tracker, lambda: pbx.hangup(phone))
    assert by_line(rest).get("305", []) == []
    assert [c.state for c in tracker.calls_of("306")] == [CallState.CONNECTED]


def test_an_unanswered_resume_then_a_second_one() -> None:
    pbx, tracker, events, trunk, _ = parked_call()
    call_id = events[0].call.id  # type: ignore[union-attr]
    tracker.expect_retriever("305", call_id, "cms-resume-1")
    first, _ = more(pbx, tracker, lambda: pbx.ring_into_the_lot("305", "cms-resume-1", answer=False))
    assert isinstance(first, str)
    assert more(pbx, tracker, lambda: pbx.hangup(first, "19"))[1] == []
    tracker.expect_retriever("305", call_id, "cms-resume-2")
    second, rung = more(pbx, tracker, lambda: pbx.ring_into_the_lot("305", "cms-resume-2"))
    assert rung == [] and isinstance(second, str)
    _, resumed = more(pbx, tracker, lambda: pbx.unpark(second))
    assert view(resumed, "305") == [("hold_ended", call_id, "connected")]
    _, ended = more(pbx, tracker, lambda: (pbx.hangup(second), pbx.hangup(trunk)))
    assert view(ended, "305") == [("ring_finished", call_id, "finished")]
    assert_clean(tracker)
