"""ami_gateway.takeover: what a standby publishes when it takes over, from its shadow log and Redis."""

from __future__ import annotations

import dataclasses
from typing import Any

from ami_gateway.takeover import ShadowLog, after_lost_term, finished_ids, reconcile, unpublished
from services.wire import Call, CallState, Direction, EventType, LineEvent


def call(cid: str = "c1", line: str = "305", state: CallState = CallState.RINGING, **kw: Any) -> Call:
    return Call(id=cid, line=line, linked_id=cid.split(":")[0], channel=f"SIP/{line}-1", direction=Direction.INBOUND,
                state=state, caller_number="79160000000", called_number=line, **kw)


def ev(kind: EventType, c: Call, epoch: str = "", seq: int = 0) -> LineEvent:
    state = {EventType.RING_FINISHED: CallState.FINISHED, EventType.ABONENT_BUSY: CallState.BUSY,
             EventType.COMMUTATION_STARTED: CallState.CONNECTED}.get(kind, c.state)
    return LineEvent(line=c.line, type=kind, call=c.evolve(state=state), epoch=epoch, seq=seq)


def test_a_busy_call_that_rang_and_ended_while_no_gateway_published_is_published_whole() -> None:
    busy = call("b1")
    window = [ev(EventType.RING_STARTED, busy), ev(EventType.ABONENT_BUSY, busy), ev(EventType.RING_FINISHED, busy)]
    assert unpublished(window, {"305": []}) == window


def test_what_the_earlier_term_published_is_not_repeated_and_its_finished_calls_stay_over() -> None:
    answered, over = call("a1"), call("o1")
    history = {"305": [ev(EventType.RING_STARTED, answered, "100", 1), ev(EventType.RING_STARTED, over, "100", 2),
                       ev(EventType.RING_FINISHED, over, "100", 3)]}
    window = [ev(EventType.RING_STARTED, answered), ev(EventType.RING_STARTED, over),
              ev(EventType.COMMUTATION_STARTED, answered), ev(EventType.RING_FINISHED, over),
              ev(EventType.CALL_INFO_CHANGED, over)]
    assert [(e.type, e.call.id if e.call else "") for e in unpublished(window, history)] == [
        (EventType.COMMUTATION_STARTED, "a1")]  # the answer it never published; nothing of the finished call


def test_repeatable_events_and_agent_states_pass_and_lines_are_kept_apart() -> None:
    held = call("h1", state=CallState.CONNECTED)
    other_line = call("h1", line="306")  # same linked call, another line: its own history
    history = {"305": [ev(EventType.RING_FINISHED, held, "100", 9)], "306": []}
    window = [ev(EventType.RING_FINISHED, other_line), ev(EventType.HOLD_STARTED, call("x", state=CallState.HELD))]
    assert unpublished(window, history) == window


def test_the_shadow_log_keeps_only_its_window_and_empties_when_taken() -> None:
    log = ShadowLog(window=5.0, max_events=3)
    old, new = ev(EventType.RING_STARTED, call("old")), ev(EventType.RING_STARTED, call("new"))
    log.add([old], now=100.0)
    log.add([new], now=104.0)
    assert log.take(now=106.0) == [new]
    assert log.take(now=106.0) == []
    log.add([ev(EventType.RING_STARTED, call(str(i))) for i in range(5)], now=200.0)
    assert [e.call.id for e in log.take(now=200.0) if e.call] == ["2", "3", "4"]


def test_reconcile_restates_live_calls_and_rings_the_ones_agents_never_heard_of() -> None:
    ringing, talking, unseen, busy = (call("r1"), call("t1", state=CallState.CONNECTED),
                                      call("u1", state=CallState.CONNECTED), call("b1", state=CallState.BUSY))
    stored = {"305": [ringing, talking.evolve(state=CallState.RINGING)]}
    live = {"305": [ringing, talking, unseen, busy]}
    out = reconcile(live, stored, [], 1.0, agents_knew_stored=True)
    assert [(e.type, e.call.id if e.call else "") for e in out] == [
        (EventType.RING_STARTED, "r1"), (EventType.COMMUTATION_STARTED, "t1"),
        (EventType.RING_STARTED, "u1"), (EventType.COMMUTATION_STARTED, "u1")]
    # first start: what agents saw is unknown, so a connected call is announced connected only
    first = reconcile({"305": [unseen]}, {}, [], 1.0, agents_knew_stored=False)
    assert [e.type for e in first] == [EventType.COMMUTATION_STARTED]
    # a call this takeover already announced (shadow log, resync) is not stated twice
    assert reconcile(live, stored, [ev(EventType.RING_STARTED, ringing), ev(EventType.COMMUTATION_STARTED, talking),
                                    ev(EventType.COMMUTATION_STARTED, unseen)], 1.0, agents_knew_stored=True) == []


def test_finished_ids_names_line_and_call() -> None:
    c = call("f1")
    assert finished_ids([ev(EventType.RING_STARTED, c), ev(EventType.RING_FINISHED, c)]) == {("305", "f1")}


def at(event: LineEvent, when: float) -> LineEvent:
    return LineEvent(line=event.line, type=event.type, call=event.call, epoch=event.epoch, seq=event.seq,
                     ami_received_at=when)


def test_what_the_standby_saw_well_before_the_last_stored_event_of_its_line_was_stored() -> None:
    """The earlier term stored each line in order: a hold from long before its last stored event is not told
    again, nor is the same hold around that moment; a hold after it is (the Redis outage swallowed it)."""
    live = call("l1", state=CallState.CONNECTED)
    history = {"305": [at(ev(EventType.HOLD_STARTED, live, "100", 7), 1000.0),
                       at(ev(EventType.HOLD_ENDED, live, "100", 8), 1010.0)]}
    old_hold = at(ev(EventType.HOLD_STARTED, live), 999.9)
    same_end = at(ev(EventType.HOLD_ENDED, live), 1010.3)
    later = at(ev(EventType.HOLD_STARTED, live), 1030.0)
    other_line = at(ev(EventType.HOLD_STARTED, call("x", line="306", state=CallState.CONNECTED)), 999.0)
    assert unpublished([old_hold, same_end, later, other_line], history) == [later, other_line]


def test_a_stepped_down_term_hands_what_it_never_got_out_to_the_standby_that_replaces_it(tmp_path: Any) -> None:
    """Chaos redis-stall: the active gateway, cut off from Redis past its lease, held the outage's calls in its
    outbox and was replaced in its process by a fresh standby, which took over with an empty shadow log."""
    from ami_gateway.app import Gateway
    from services.config import load_settings

    config = tmp_path / "appsettings.json"
    config.write_text('{"Asterisk": {"url": "127.0.0.1", "port": "1", "userName": "u", "secret": "s"}}')
    settings = load_settings(config, env={})
    held = ev(EventType.RING_STARTED, call("held"))
    old = Gateway(settings, metrics_port=0)
    old.sequencer.restart("100")
    old.outbox.put([held])
    assert [e.call.id for e in old.handover() if e.call] == ["held"]
    new = Gateway(settings, metrics_port=0, inherited=old.handover())
    assert [e.call.id for e in new.handover() if e.call] == ["held"]


def _at(event: LineEvent, at: float) -> LineEvent:
    return dataclasses.replace(event, ami_received_at=at)


def test_without_an_earlier_term_a_call_that_began_after_the_holder_was_last_seen_and_ended_goes_out_whole() -> None:
    """Redis restarted empty: the earlier term's writes were refused from then on, and a phone that refused busy
    meanwhile may never have reached its agent; the standby heard it all."""
    busy, older, live = call("b1"), call("o1"), call("l1")
    window = [
        _at(ev(EventType.RING_STARTED, older), 90.0),
        _at(ev(EventType.RING_STARTED, busy), 101.0), _at(ev(EventType.ABONENT_BUSY, busy), 101.1),
        _at(ev(EventType.RING_STARTED, live), 101.2),
        _at(ev(EventType.RING_FINISHED, older), 101.3),
        _at(ev(EventType.RING_FINISHED, busy), 101.4),
    ]
    published = after_lost_term(window, unstored_since=100.0)
    assert [(e.type, e.call.id if e.call else "") for e in published] == [
        (EventType.RING_STARTED, "b1"), (EventType.ABONENT_BUSY, "b1"),  # whole, in order
        (EventType.RING_FINISHED, "o1"),  # began long before: its end only (a replayed ring pops up as new)
        (EventType.RING_FINISHED, "b1"),
    ]  # the live call is not replayed: the resync states it as it is now


def test_without_an_earlier_term_ever_seen_only_the_ends_go_out() -> None:
    busy = call("b1")
    window = [_at(ev(EventType.RING_STARTED, busy), 101.0), _at(ev(EventType.RING_FINISHED, busy), 101.4),
              _at(ev(EventType.HOLD_STARTED, call("x", state=CallState.HELD)), 101.5)]
    assert [e.type for e in after_lost_term(window, unstored_since=None)] == [EventType.RING_FINISHED]


def test_a_call_first_seen_by_its_end_or_an_update_is_not_replayed_from_there() -> None:
    """The shadow log keeps a window: a call whose ring fell out of it shows up first with a later event."""
    talking = call("t1", state=CallState.CONNECTED)
    window = [_at(ev(EventType.HOLD_STARTED, talking), 101.0), _at(ev(EventType.RING_FINISHED, talking), 102.0)]
    assert [e.type for e in after_lost_term(window, unstored_since=100.0)] == [EventType.RING_FINISHED]
