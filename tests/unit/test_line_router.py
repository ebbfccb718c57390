"""Stream-position decisions of a node: deliver, duplicate, gap, new epoch."""

from __future__ import annotations

from services.wire import EventType, LineEvent
from ws_node.line_router import LineRouter, Verdict


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
    router.start_from("305", "100", 4)
    assert router.classify(ev(4)) is Verdict.DUPLICATE
    assert router.classify(ev(5)) is Verdict.DELIVER
    assert router.classify(ev(7)) is Verdict.GAP
    assert router.classify(ev(1, epoch="200")) is Verdict.NEW_EPOCH
    router.delivered(ev(5))
    assert router.position("305") == ("100", 5)
    router.start_from("305", "100", 3)  # an older snapshot never moves the line back
    assert router.position("305") == ("100", 5)
    router.reset("305", "200", 0)
    assert router.classify(ev(1, epoch="200")) is Verdict.DELIVER


def test_line_without_history_starts_at_one() -> None:
    router: LineRouter[str] = LineRouter()
    router.attach("tab", "305")
    router.start_from("305", "", 0)
    assert router.classify(ev(1)) is Verdict.DELIVER
    assert router.classify(ev(3)) is Verdict.GAP
