"""Stream-position decisions of a node: deliver, duplicate, gap, new epoch."""

from __future__ import annotations

from services.wire import LINE_START, EventType, LineEvent, StreamPosition
from ws_node.line_router import CatchUpPlan, LineRouter, Verdict, plan_catch_up

P = StreamPosition


def ev(seq: int, epoch: str = "100", line: str = "305") -> LineEvent:
    return LineEvent(line=line, type=EventType.RING_STARTED, epoch=epoch, seq=seq)


def test_membership_binds_on_first_and_unbinds_on_last() -> None:
    router: LineRouter[str] = LineRouter()
    assert router.attach("tab1", "305") is True
    assert router.attach("tab2", "305") is False
    assert router.detach("tab1", "305") is False
    assert router.detach("tab1", "305") is False
    assert router.detach("tab2", "305") is True
    assert router.lines() == []


def test_verdicts() -> None:
    router: LineRouter[str] = LineRouter()
    assert router.classify(ev(1)) is Verdict.NOBODY
    router.attach("tab", "305")
    router.start_from("305", P("100", 4))
    assert router.classify(ev(4)) is Verdict.DUPLICATE
    assert router.classify(ev(5)) is Verdict.DELIVER
    assert router.classify(ev(7)) is Verdict.GAP
    assert router.classify(ev(1, epoch="200")) is Verdict.NEW_EPOCH
    router.delivered(ev(5))
    assert router.position("305") == P("100", 5)
    router.start_from("305", P("100", 3))  # an older snapshot never moves the line back
    assert router.position("305") == P("100", 5)
    router.reset("305", P("200", 0))
    assert router.classify(ev(1, epoch="200")) is Verdict.DELIVER


def test_line_without_history_starts_at_one() -> None:
    router: LineRouter[str] = LineRouter()
    router.attach("tab", "305")
    router.start_from("305", LINE_START)
    assert router.classify(ev(1)) is Verdict.DELIVER
    assert router.classify(ev(3)) is Verdict.GAP


def test_older_epoch_is_stale_newer_is_new() -> None:
    router: LineRouter[str] = LineRouter()
    router.attach("tab", "305")
    router.start_from("305", P("200", 4))
    assert router.classify(ev(9, epoch="100")) is Verdict.STALE
    assert router.classify(ev(1, epoch="300")) is Verdict.NEW_EPOCH


# ---- catch-up plans: what a line's sessions get after a gap or a new epoch -------------------


def test_gateway_restart_the_new_epochs_first_event_is_delivered_not_swallowed() -> None:
    """Issue 10.1, from a namespace an earlier run left: the node stands at the old epoch's last
    event (read at OpenConnection); the restarted gateway's first event is (new epoch, 1)."""
    router: LineRouter[str] = LineRouter()
    router.attach("tab", "305")
    router.start_from("305", P("100", 57))  # previous run's position, still in Redis
    ring = ev(1, epoch="200")
    assert router.classify(ring) is Verdict.NEW_EPOCH
    # Redis: the old epoch's entry at our position is still there (anchored), then the new epoch.
    plan = plan_catch_up(router.position("305") or LINE_START, [ring], True, P("200", 1), live=ring)
    assert plan.events == (ring,)
    assert plan.resync_at is None  # nothing lost: no snapshot on top
    assert plan.live is None  # delivered from the history, once
    assert plan.position == P("200", 1)


def test_new_epoch_after_missed_tail_of_the_old_one_delivers_both_in_order() -> None:
    history = [ev(58, "100"), ev(59, "100"), ev(1, "200"), ev(2, "200")]
    plan = plan_catch_up(P("100", 57), history, True, P("200", 2), live=ev(2, "200"))
    assert [e.position for e in plan.events] == [P("100", 58), P("100", 59), P("200", 1), P("200", 2)]
    assert plan.resync_at is None and plan.live is None


def test_old_epoch_history_gone_new_epoch_from_one_then_the_snapshot() -> None:
    """Redis restarted empty (or trimmed past us): our position's entry is gone, so the old epoch
    may have ended calls we never heard of. The new epoch is delivered from seq 1 (the agent gets
    its RING_STARTED), then the snapshot puts every session right."""
    history = [ev(1, "300"), ev(2, "300")]
    plan = plan_catch_up(P("100", 57), history, False, P("300", 2), live=ev(1, "300"))
    assert [e.position for e in plan.events] == [P("300", 1), P("300", 2)]
    assert plan.resync_at == P("300", 2)
    assert plan.live is None
    assert plan.position == P("300", 2)


def test_history_not_written_yet_the_event_is_handed_after_the_snapshot() -> None:
    """The gateway published before its Redis write landed (and the brief wait ran out): the
    snapshot does not contain the event, so the event follows it rather than vanish."""
    plan = plan_catch_up(P("100", 57), [], True, P("100", 57), live=ev(1, "200"))
    assert plan.events == ()
    assert plan.resync_at is None
    assert plan.live == ev(1, "200")
    assert plan.position == P("200", 1)


def test_redis_emptied_no_new_state_yet_resyncs_to_the_empty_line() -> None:
    plan = plan_catch_up(P("100", 57), [], False, P("", 0), live=None)
    assert plan.resync_at == P("", 0)
    assert plan.position == P("", 0)  # the next event of any epoch at seq 1 continues the line


def test_redis_emptied_and_gateway_went_on_in_its_epoch_the_line_is_not_wedged() -> None:
    """Redis came back empty, the gateway (not restating) wrote 58 only: resync to the snapshot
    at 58 and go on; 59 is then simply the next one."""
    router: LineRouter[str] = LineRouter()
    router.attach("tab", "305")
    router.start_from("305", P("100", 50))
    plan = plan_catch_up(P("100", 50), [ev(58)], False, P("100", 58), live=ev(58))
    assert plan.events == ()
    assert plan.resync_at == P("100", 58)
    assert plan.live is None  # the snapshot includes it
    router.reset("305", plan.position)
    assert router.classify(ev(59)) is Verdict.DELIVER


def test_hole_in_the_history_skips_to_the_snapshot() -> None:
    plan = plan_catch_up(P("100", 5), [ev(6), ev(9), ev(10)], True, P("100", 10), live=ev(10))
    assert [e.seq for e in plan.events] == [6]
    assert plan.resync_at == P("100", 10)
    assert plan.live is None
    assert plan.position == P("100", 10)


def test_plain_gap_is_repaired_without_snapshot() -> None:
    plan = plan_catch_up(P("100", 5), [ev(6), ev(7), ev(8)], True, P("100", 8), live=ev(8))
    assert [e.seq for e in plan.events] == [6, 7, 8]
    assert plan.resync_at is None and plan.live is None


def test_history_short_of_the_snapshot_resyncs() -> None:
    plan = plan_catch_up(P("100", 5), [ev(6)], True, P("100", 9))
    assert [e.seq for e in plan.events] == [6]
    assert plan.resync_at == P("100", 9)


def test_history_read_from_an_earlier_position_skips_what_was_delivered() -> None:
    plan = plan_catch_up(P("100", 7), [ev(6), ev(7), ev(8)], True, P("100", 8))
    assert [e.seq for e in plan.events] == [8]
    assert plan.resync_at is None


def test_nothing_new_nothing_done_and_forced_resync_sends_the_snapshot() -> None:
    plan = plan_catch_up(P("100", 5), [], True, P("100", 5))
    assert plan == CatchUpPlan(events=(), resync_at=None, live=None, position=P("100", 5))
    forced = plan_catch_up(P("100", 5), [], True, P("100", 5), force_resync=True)
    assert forced.resync_at == P("100", 5)


def test_line_without_history_at_follow_gets_the_first_epoch_from_one() -> None:
    plan = plan_catch_up(P("", 0), [ev(1, "200"), ev(2, "200")], True, P("200", 2), live=ev(2, "200"))
    assert [e.seq for e in plan.events] == [1, 2]
    assert plan.resync_at is None
