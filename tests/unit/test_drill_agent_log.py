"""A drill agent's record and reconnect schedule (ops/drill/swarm.py ``AgentLog``), shared by both agent pools."""

from __future__ import annotations

import json

import pytest

from ops.drill.__main__ import Drill, DrillOptions
from ops.drill.swarm import MAX_BACKOFF, AgentLog
from ops.drill.workers import split_url
from ws_node.creatio_protocol import MsgEventType


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def frame(event_type: int, content: object) -> bytes:
    # the node sends call contents as a JSON string inside the envelope, as Creatio expects
    return json.dumps({"eventType": event_type, "content": json.dumps(content)}).encode()


def test_first_retry_is_jittered_then_backs_off_to_a_cap_and_resets_when_ready() -> None:
    clock = Clock()
    log = AgentLog("4001", reconnect_delay=5.0, clock=clock, uniform=lambda low, high: high)
    assert log.dropped() == pytest.approx(5.5)  # 5 s x 1.1: the jitter's top
    delays = [log.dropped() for _ in range(8)]
    assert delays[:3] == [5.0, 7.5, 11.25]
    assert delays[-1] == MAX_BACKOFF and max(delays) == MAX_BACKOFF
    log.ready(())
    assert log.connected
    assert log.dropped() == pytest.approx(5.5)  # a new outage: Creatio's first-retry delay again
    assert log.dropped() == 5.0  # and the backoff starts over


def test_an_outage_records_its_retries_and_closes_on_the_snapshot() -> None:
    clock = Clock()
    log = AgentLog("4001", reconnect_delay=5.0, clock=clock, uniform=lambda low, high: low)
    log.attempt()
    log.reached()
    log.ready(())
    assert log.outages == []  # the first connection is no outage
    clock.now = 1010.0
    log.failed()  # the connection broke: not an attempt of any outage yet
    log.dropped()
    clock.now = 1014.5
    log.attempt()
    log.failed()  # refused
    log.dropped()
    clock.now = 1019.5
    log.attempt()
    log.reached()
    clock.now = 1020.0
    log.ready(("call-a",))
    [outage] = log.outages
    assert outage.dropped_at == 1010.0 and outage.first_retry_at == pytest.approx(1014.5)
    assert outage.retry_times == [1014.5, 1019.5]
    assert outage.attempts == 2
    assert outage.ready_at == outage.snapshot_at == 1020.0 and outage.snapshot_ids == ("call-a",)


def test_frames_note_call_events_and_snapshots_by_call_id() -> None:
    clock = Clock()
    log = AgentLog("4001", clock=clock)
    envelope, content = log.record(frame(MsgEventType.RING_STARTED, {"id": "c1", "callerId": "79160000001"}))
    assert envelope["eventType"] == MsgEventType.RING_STARTED and content["id"] == "c1"
    clock.now = 1001.0
    log.record(frame(MsgEventType.RING_FINISHED, {"id": "c1", "callerId": "79160000002"}))
    log.record(json.dumps({"eventType": MsgEventType.LINE_STATE_CHANGED, "content": "{}"}))  # no call: not noted
    ids = log.snapshot({"ActiveCalls": [json.dumps({"id": "c2", "callerId": "1"}), {"id": "c3"}]})
    assert ids == ("c2", "c3")
    assert log.frames == 3
    assert set(log.seen) == {"c1", "c2", "c3"}
    c1 = log.seen["c1"]
    assert c1.event_types == [MsgEventType.RING_STARTED, MsgEventType.RING_FINISHED] and c1.finished
    assert c1.arrived == [1000.0, 1001.0]
    assert c1.caller == "79160000001"  # the first caller number seen is kept
    assert log.seen["c2"].event_types == [MsgEventType.ACTIVE_CALL_SNAPSHOT]
    assert log.snapshot(None) == ()


def test_worker_pool_urls() -> None:
    assert split_url("ws://127.0.0.1:2013") == ("127.0.0.1", 2013, "/")
    assert split_url("ws://localhost:2013/ws?x=1") == ("localhost", 2013, "/ws?x=1")
    with pytest.raises(ValueError, match="plain ws"):
        split_url("wss://127.0.0.1:2014/")


def test_the_drill_refuses_an_unknown_pool() -> None:
    with pytest.raises(ValueError, match="pool must be one of"):
        Drill(DrillOptions(pool="threads", client_url="ws://127.0.0.1:1", simulator_url="http://127.0.0.1:1"))
