"""Line events are encoded once and calls without dataclasses.asdict (the outbox's hot path), with the same bytes."""

from __future__ import annotations

import dataclasses
import json

from services.wire import AgentState, Call, CallState, Direction, EventType, LineEvent

FULL_CALL = Call(
    id="c1", line="301", linked_id="1.1", channel="SIP/301-0001", direction=Direction.INBOUND,
    state=CallState.CONNECTED, caller_number="79160000001", caller_name="Ivan", called_number="301",
    called_name="Support", queue="support", redirecting_number="302", redirection_number="303", started_at=1.5,
    answered_at=2.5, ended_at=3.5, hangup_cause=16, hangup_cause_text="Normal Clearing", extra={"k": "v"},
    database_uid="db-1",
)


def test_call_to_dict_is_what_asdict_gives_for_every_field() -> None:
    # A field added to Call and not to to_dict fails here.
    assert FULL_CALL.to_dict() == dataclasses.asdict(FULL_CALL)
    assert list(FULL_CALL.to_dict()) == [f.name for f in dataclasses.fields(Call)]
    assert Call.from_dict(FULL_CALL.to_dict()) == FULL_CALL
    # the dict is the caller's: changing it leaves the (frozen) call alone
    FULL_CALL.to_dict()["extra"]["k"] = "changed"
    assert FULL_CALL.extra == {"k": "v"}


def test_an_event_is_encoded_once_and_a_positioned_copy_anew() -> None:
    event = LineEvent(line="301", type=EventType.RING_STARTED, call=FULL_CALL,
                      agent=AgentState(line="301", paused=False), ami_received_at=1.0)
    first = event.positioned("7", 1)
    body = first.encode()
    assert first.encode() is body  # the history entry and the broker body are the same bytes
    assert json.loads(body)["seq"] == 1
    assert LineEvent.decode(body) == first
    second = first.positioned("7", 2)
    assert json.loads(second.encode())["seq"] == 2 and first.encode() is body
    # the cached body is not part of the event's identity
    assert first == LineEvent.decode(body)
    assert "_body" not in repr(first)
