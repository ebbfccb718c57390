"""The outbox encodes each line event once for Redis and the broker: the bytes must be exactly what the
event's own encoding gives, or nodes reading the history and nodes reading the broker would disagree."""

from __future__ import annotations

import json

from services.line_state import EncodedEvent
from services.wire import AgentState, Call, CallState, Direction, EventType, LineEvent


def _call(state: CallState) -> Call:
    return Call(id="c-1", line="201", linked_id="1.0", channel="SIP/201-1", direction=Direction.INBOUND,
                state=state, caller_number="100", caller_name="Анна", started_at=1.5)


def test_body_is_the_events_own_encoding_and_call_is_the_calls_json() -> None:
    event = LineEvent(line="201", type=EventType.RING_STARTED, call=_call(CallState.RINGING),
                      ami_received_at=2.0).positioned("17", 4)
    encoded = EncodedEvent.of(event)
    assert encoded.body == event.encode()
    assert LineEvent.decode(encoded.body) == event
    assert encoded.call is not None and event.call is not None
    assert json.loads(encoded.call) == event.call.to_dict()


def test_an_event_without_a_call_has_no_call_json() -> None:
    event = LineEvent(line="201", type=EventType.AGENT_STATE_CHANGED,
                      agent=AgentState(line="201", paused=True, reason="lunch")).positioned("17", 5)
    encoded = EncodedEvent.of(event)
    assert encoded.call is None
    assert encoded.body == event.encode()
