"""Rules 10 and 13 of AgentSession: a restatement of a live call is not a new call, and an ended call stays ended."""

from __future__ import annotations

import gc
import tracemalloc

from services.wire import CallState, EventType, LineEvent
from tests.unit.test_agent_session import LINE, content, make_call, opened, with_calls
from ws_node import agent_session
from ws_node import creatio_protocol as cp


def test_a_ringing_call_restated_in_a_new_epoch_does_not_ring_again() -> None:
    ringing = make_call()
    session, env = opened()
    session.on_line_event(LineEvent(line=LINE, type=EventType.RING_STARTED, call=ringing, epoch="100", seq=1))
    assert [m["eventType"] for m in env.take()][0] == 5  # RING_STARTED, the first time
    # the gateway restarted: epoch 200 announces the same live call again
    session.on_line_event(LineEvent(line=LINE, type=EventType.RING_STARTED, call=ringing, epoch="200", seq=1))
    assert env.take() == []
    answered = ringing.evolve(state=CallState.CONNECTED)
    session.on_line_event(LineEvent(line=LINE, type=EventType.COMMUTATION_STARTED, call=answered, epoch="200", seq=2))
    frames = env.take()
    assert frames and frames[0]["eventType"] == 7 and content(frames[0])["state"] == 2


def test_a_connected_call_restated_is_silent_and_a_new_call_still_rings() -> None:
    talking = make_call(state=CallState.CONNECTED)
    session, env = with_calls(talking)
    session.on_line_event(LineEvent(line=LINE, type=EventType.COMMUTATION_STARTED, call=talking, epoch="200", seq=1))
    assert env.take() == []
    other = make_call(id="b2", linked_id="b2", caller_number="+70000000002")
    session.on_line_event(LineEvent(line=LINE, type=EventType.RING_STARTED, call=other, epoch="200", seq=2))
    frames = env.take()
    assert frames and frames[0]["eventType"] == 5 and content(frames[0])["callerId"] == "+70000000002"


def test_a_new_leg_with_the_ended_calls_id_rings() -> None:
    # a gateway that started cold after the first leg ended numbers a second leg of the same call on this line
    # with the first one's id; its phone channel is new
    ringing = make_call()
    session, env = with_calls(ringing)
    ended = ringing.evolve(state=CallState.FINISHED)
    session.on_line_event(LineEvent(line=LINE, type=EventType.RING_FINISHED, call=ended, epoch="100", seq=1))
    env.take()
    second = ringing.evolve(channel="PJSIP/101-2")
    session.on_line_event(LineEvent(line=LINE, type=EventType.RING_STARTED, call=second, epoch="100", seq=2))
    assert [m["eventType"] for m in env.take()][0] == 5


def test_a_call_published_whole_again_after_its_end_is_not_sent_again() -> None:
    """Rule 13: a takeover without an earlier term publishes whole the calls that began and ended while no term
    was known to publish (chaos redis-restart-empty: a busy call reached its agent twice, RS BUSY RF RS BUSY RF)."""
    ringing = make_call()
    session, env = opened()
    busy = ringing.evolve(state=CallState.BUSY)
    ended = ringing.evolve(state=CallState.FINISHED)
    story = [(EventType.RING_STARTED, ringing), (EventType.ABONENT_BUSY, busy), (EventType.RING_FINISHED, ended)]
    for seq, (kind, call) in enumerate(story, 1):
        session.on_line_event(LineEvent(line=LINE, type=kind, call=call, epoch="100", seq=seq))
    assert [m["eventType"] for m in env.take()][0] == 5
    for seq, (kind, call) in enumerate(story, 1):  # the new term, its own epoch
        session.on_line_event(LineEvent(line=LINE, type=kind, call=call, epoch="200", seq=seq))
    assert env.take() == []
    # the record saved in Creatio after the end still reaches the panel (a busy call's save comes after its end)
    saved = ended.evolve(database_uid="6f1c0f0e-0000-4000-8000-000000000001")
    session.on_line_event(LineEvent(line=LINE, type=EventType.CALL_SAVED, call=saved, epoch="200", seq=4))
    assert [m["eventType"] for m in env.take()] == [15]
    # other calls are untouched
    other = make_call(id="b2", linked_id="b2", channel="PJSIP/101-3")
    session.on_line_event(LineEvent(line=LINE, type=EventType.RING_STARTED, call=other, epoch="200", seq=5))
    assert [m["eventType"] for m in env.take()][0] == 5


def test_a_snapshot_from_a_lagging_redis_does_not_bring_an_ended_call_back() -> None:
    """Rule 13: right after a Redis stall a snapshot can be read before Redis got the end the broker already
    delivered (chaos redis-stall: the panel showed the ended call again for 2 s, then got a second end)."""
    talking = make_call(state=CallState.CONNECTED)
    live = make_call(id="b2", linked_id="b2", channel="PJSIP/101-3", state=CallState.CONNECTED)
    session, env = with_calls(talking, live)
    ended = talking.evolve(state=CallState.FINISHED)
    session.on_line_event(LineEvent(line=LINE, type=EventType.RING_FINISHED, call=ended, epoch="100", seq=9))
    env.take()
    session.on_snapshot([talking, live], epoch="100")
    snapshot = env.take()
    assert [c["id"] for c in content(snapshot[0])["ActiveCalls"]] == [cp.call_guid("b2")]
    session.on_line_event(LineEvent(line=LINE, type=EventType.RING_FINISHED, call=ended, epoch="100", seq=9))
    assert env.take() == []


def test_a_call_a_snapshot_showed_before_its_ring_started_arrived_still_rings() -> None:
    """Redis holds the call before its event is published (always so while the broker is away):
    a snapshot of the same epoch shows it ringing, then its RING_STARTED arrives and is news."""
    ringing = make_call()
    session, env = opened()
    session.on_snapshot([ringing], epoch="100")
    env.take()
    session.on_line_event(LineEvent(line=LINE, type=EventType.RING_STARTED, call=ringing, epoch="100", seq=7))
    assert [m["eventType"] for m in env.take()][0] == 5
    # and once announced, the next gateway's restatement of it is silent again
    session.on_line_event(LineEvent(line=LINE, type=EventType.RING_STARTED, call=ringing, epoch="200", seq=1))
    assert env.take() == []


def test_a_call_seeded_at_the_claim_gets_its_in_flight_ring_started() -> None:
    ringing = make_call()
    session, env = opened()
    session.on_calls_known([ringing], epoch="100")
    session.on_line_event(LineEvent(line=LINE, type=EventType.RING_STARTED, call=ringing, epoch="100", seq=3))
    assert [m["eventType"] for m in env.take()][0] == 5


def test_a_call_a_snapshot_of_an_earlier_epoch_showed_is_restated_silently() -> None:
    talking = make_call(state=CallState.CONNECTED)
    session, env = opened()
    session.on_snapshot([talking], epoch="100")
    env.take()
    session.on_line_event(LineEvent(line=LINE, type=EventType.COMMUTATION_STARTED, call=talking, epoch="200", seq=1))
    assert env.take() == []


def test_an_end_of_a_call_the_client_does_not_show_is_not_sent() -> None:
    """A new gateway term may publish ends it cannot prove were published: the second RING_FINISHED of a
    call, or one of a call this tab never saw, must not reach the client; hold or info of such a call neither."""
    ringing = make_call()
    session, env = opened()
    session.on_line_event(LineEvent(line=LINE, type=EventType.RING_STARTED, call=ringing, epoch="100", seq=1))
    ended = ringing.evolve(state=CallState.FINISHED)
    session.on_line_event(LineEvent(line=LINE, type=EventType.RING_FINISHED, call=ended, epoch="100", seq=2))
    assert [m["eventType"] for m in env.take()][0:2] == [5, 6]
    session.on_line_event(LineEvent(line=LINE, type=EventType.RING_FINISHED, call=ended, epoch="200", seq=1))
    stranger = make_call(id="s1", linked_id="s1", state=CallState.CONNECTED)
    session.on_line_event(LineEvent(line=LINE, type=EventType.HOLD_STARTED, call=stranger, epoch="200", seq=2))
    session.on_line_event(LineEvent(line=LINE, type=EventType.RING_FINISHED, call=stranger, epoch="200", seq=3))
    assert env.take() == []
    assert session.calls == []


def test_a_snapshot_behind_the_events_does_not_take_the_panel_back() -> None:
    """Rule 14 (chaos redis-stall: the term was fenced before its write of the answer landed; the snapshot after
    the stall showed the talking call ringing, and the next term's restatement of the answer reached the panel
    as news: a second COMMUTATION_STARTED)."""
    ringing = make_call()
    session, env = opened()
    session.on_line_event(LineEvent(line=LINE, type=EventType.RING_STARTED, call=ringing, epoch="100", seq=1))
    answered = ringing.evolve(state=CallState.CONNECTED)
    session.on_line_event(LineEvent(line=LINE, type=EventType.COMMUTATION_STARTED, call=answered, epoch="100", seq=2))
    newer = make_call(id="b2", linked_id="b2", channel="PJSIP/101-3")
    session.on_line_event(LineEvent(line=LINE, type=EventType.RING_STARTED, call=newer, epoch="100", seq=3))
    env.take()
    session.on_snapshot([ringing], epoch="100", behind=True)  # the store still at seq 1
    (snapshot,) = [m for m in env.take() if m["eventType"] == 10]
    shown = {c["id"]: c["state"] for c in content(snapshot)["ActiveCalls"]}
    assert shown == {cp.call_guid("a1"): 2, cp.call_guid("b2"): 1}  # talking, and the newer call still ringing
    # the next term restates the answered call: not news
    session.on_line_event(LineEvent(line=LINE, type=EventType.COMMUTATION_STARTED, call=answered, epoch="200", seq=1))
    assert env.take() == []
    # a snapshot that is not behind is taken as it is
    session.on_snapshot([answered], epoch="200")
    (snapshot,) = [m for m in env.take() if m["eventType"] == 10]
    assert [c["id"] for c in content(snapshot)["ActiveCalls"]] == [cp.call_guid("a1")]


def test_what_a_session_keeps_of_its_ended_calls_is_small() -> None:
    """Rule 13 keeps the last 32 ended calls of every session: 32,000 entries on a node of 1,000 agents, filling
    over hours at a contact centre's rate (the soak's slow creep of a node's RSS). Per call a pair of channel
    names is enough; a frozenset cost 216 bytes even for one name."""
    session, env = opened()

    def one_call(i: int) -> None:
        ringing = make_call(id=f"c{i}", linked_id=f"c{i}", channel=f"PJSIP/101-{i}")
        session.on_line_event(LineEvent(line=LINE, type=EventType.RING_STARTED, call=ringing, epoch="100", seq=2 * i))
        ended = ringing.evolve(state=CallState.FINISHED)
        session.on_line_event(LineEvent(line=LINE, type=EventType.RING_FINISHED, call=ended, epoch="100",
                                        seq=2 * i + 1))

    one_call(0)  # the table exists
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.take_snapshot()
        for i in range(1, 33):
            one_call(i)
        env.take()
        gc.collect()
        after = tracemalloc.take_snapshot()
    finally:
        tracemalloc.stop()
    only_session = [tracemalloc.Filter(True, agent_session.__file__)]
    kept = sum(s.size_diff for s in after.filter_traces(only_session).compare_to(
        before.filter_traces(only_session), "filename"))
    assert kept <= 6 * 1024, f"{kept} bytes for 32 ended calls"  # 10,240 with frozensets, 4,864 with tuples
    # and the rule still holds for the oldest call kept and the newest
    for i in (1, 32):
        again = make_call(id=f"c{i}", linked_id=f"c{i}", channel=f"PJSIP/101-{i}")
        session.on_line_event(LineEvent(line=LINE, type=EventType.RING_STARTED, call=again, epoch="200", seq=i))
        assert env.take() == []
