"""The drill's verdicts: ground truth vs what agents saw."""

from __future__ import annotations

from ops.drill.truth import (
    SeenCall,
    TruthCall,
    judge,
    lost_evidence,
    owed_lines,
    parse_truth,
    percentile,
    snapshot_is_correct,
)

# Creatio's event numbers, written out here on purpose: the test checks the drill, not the codec.
RING_STARTED, RING_FINISHED = 5, 6


def guid(call_id: str) -> str:
    return f"g-{call_id}"


PAYLOAD = {
    "finished": [
        {"linkedid": "1.1", "scenario": "inbound-direct-answered", "vars": {"line": "4000", "caller": "79160000001"},
         "started": 100.0, "ended": 110.0},
        {"linkedid": "1.2", "scenario": "inbound-queue",
         "vars": {"line": "4001", "agent2": "4000", "caller": "79160000002"}, "started": 105.0, "ended": 115.0},
        {"linkedid": "1.3", "scenario": "inbound-direct-answered", "vars": {"line": "9999", "caller": "1"},
         "started": 100.0, "ended": 101.0},
    ],
    "live": [
        {"linkedid": "1.4", "scenario": "inbound-direct-long", "vars": {"line": "4001", "caller": "79160000004"},
         "started": 120.0, "ended": None},
    ],
}


def test_truth_keeps_only_the_agents_lines() -> None:
    truth = parse_truth(PAYLOAD, ["4000", "4001"])
    assert {c.linkedid: c.lines for c in truth} == {"1.1": ("4000",), "1.2": ("4001", "4000"), "1.4": ("4001",)}


def test_missing_unfinished_and_wrong_are_told_apart() -> None:
    truth = parse_truth(PAYLOAD, ["4000", "4001"])
    seen = {
        "4000": {
            "g-1.1:4000": SeenCall("79160000001", [RING_STARTED, RING_FINISHED]),
            "g-1.2:4000": SeenCall("79160000002", [RING_STARTED]),  # its end never arrived
        },
        "4001": {
            "g-1.2:4001": SeenCall("79169999999", [RING_STARTED, RING_FINISHED]),  # wrong caller
            # 1.4 never seen at all
        },
    }
    verdicts = {v.line: v for v in judge(truth, seen, guid)}
    assert verdicts["4000"].unfinished == ("1.2",) and not verdicts["4000"].missing
    assert verdicts["4001"].wrong == ("1.2",) and verdicts["4001"].missing == ("1.4",)
    everything = {
        "4000": {"g-1.1:4000": SeenCall("79160000001", [5, 6]), "g-1.2:4000": SeenCall("79160000002", [5, 6])},
        "4001": {"g-1.2:4001": SeenCall("79160000002", [5, 7, 6]), "g-1.4:4001": SeenCall("79160000004", [5])},
    }
    assert all(v.ok for v in judge(truth, everything, guid))


def test_each_loss_comes_with_its_truth_outages_and_what_the_agent_got() -> None:
    truth = parse_truth(PAYLOAD, ["4000", "4001"])
    seen = {"4000": {"g-1.2:4000": SeenCall("79160000002", [RING_STARTED], [106.0])}}
    verdicts = judge(truth, seen, guid)
    evidence = lost_evidence(verdicts, truth, seen, {"4000": [(107.0, 116.0)]}, guid)
    by_kind = {(e["line"], e["linkedid"]): e for e in evidence}
    assert set(by_kind) == {("4000", "1.1"), ("4000", "1.2"), ("4001", "1.2"), ("4001", "1.4")}
    unfinished = by_kind[("4000", "1.2")]
    assert unfinished["kind"] == "unfinished" and unfinished["seen"] == [(RING_STARTED, 106.0)]
    assert unfinished["outages"] == [[107.0, 116.0]] and unfinished["ended"] == 115.0
    assert by_kind[("4001", "1.4")]["kind"] == "missing" and by_kind[("4001", "1.4")]["seen"] == []
    assert len(lost_evidence(verdicts, truth, seen, {}, guid, limit=2)) == 2


def test_snapshot_check_allows_slack_but_not_errors() -> None:
    truth = [TruthCall("2.1", ("4000",), "1", 100.0, None, "inbound-direct-long"),
             TruthCall("2.2", ("4000",), "1", 90.0, 95.0, "inbound-direct-answered")]
    assert snapshot_is_correct(["g-2.1:4000"], truth, "4000", at=110.0, guid=guid)
    assert not snapshot_is_correct([], truth, "4000", at=110.0, guid=guid)  # a live call is missing
    assert not snapshot_is_correct(["g-2.1:4000", "g-2.2:4000"], truth, "4000", at=110.0, guid=guid)  # a dead one
    assert snapshot_is_correct([], truth, "4000", at=100.5, guid=guid)  # too close to the start to judge


def test_percentile() -> None:
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    assert percentile([5.0], 99) == 5.0


def test_each_lines_leg_ends_when_its_phone_channel_hung_up() -> None:
    payload = {"finished": [{
        "linkedid": "9.1", "scenario": "inbound-queue", "vars": {"line": "4000", "agent2": "4001", "caller": "1"},
        "started": 100.0, "ended": 130.0,
        "channelsStarted": {"SIP/4001-00000003": 101.5, "SIP/4000-00000002": 101.0, "SIP/4000-00000007": 120.0},
        "channelsEnded": {"SIP/trunk-in-00000001": 130.0, "SIP/4001-00000003": 104.0, "SIP/4000-00000002": 129.9,
                          "SIP/40001-00000009": 101.0, "Local/4000@from-queue-00000004;1": 103.0},
    }]}
    (call,) = parse_truth(payload, ["4000", "4001"])
    assert call.leg_end("4000") == 129.9 and call.leg_end("4001") == 104.0
    assert call.leg_end("4002") == 130.0  # no channel of its own: the call's end
    assert call.leg_start("4000") == 101.0 and call.leg_start("4001") == 101.5 and call.leg_start("4002") == 100.0


def test_each_agents_leg_is_owed_unless_it_rang_and_ended_while_that_agent_was_away() -> None:
    queue_call = TruthCall("2.1", ("4000", "4001"), "7916", started=105.0, ended=108.0)
    both_down = {"4000": [(100.0, 109.0)], "4001": [(104.0, 110.0)]}
    assert owed_lines(queue_call, both_down) == ()
    # judged per line: the queue's second agent was away, the first was back before the call ended
    assert owed_lines(queue_call, {"4000": [(100.0, 107.0)], "4001": [(104.0, 110.0)]}) == ("4000",)
    assert owed_lines(queue_call, {"4000": [(100.0, 109.0)]}) == ("4001",)
    # the second member's phone rang only after its agent dropped: that leg is not owed, the first is
    late_leg = TruthCall("2.4", ("4000", "4001"), "7916", 105.0, 108.0, leg_starts={"4001": 106.5},
                         leg_ends={"4001": 107.0})
    assert owed_lines(late_leg, {"4001": [(106.0, 110.0)]}) == ("4000",)
    # a leg that began just before the drop: its frames died with the connection
    assert owed_lines(TruthCall("2.5", ("4000",), "", 105.8, 107.0), {"4000": [(106.0, 110.0)]}) == ()
    assert owed_lines(TruthCall("2.6", ("4000",), "", 105.0, 107.0), {"4000": [(106.0, 110.0)]}) == ("4000",)
    # still live, or ended after the agent was back: owed
    assert owed_lines(TruthCall("2.2", ("4000",), "", 105.0, None), both_down) == ("4000",)
    # an agent that never came back (ready 0) misses everything after its drop
    assert owed_lines(TruthCall("2.3", ("4000",), "", 105.0, 200.0), {"4000": [(100.0, 0.0)]}) == ()
    # a phone the PBX lost before it rang is owed nothing, connected agent or not
    lost = TruthCall("2.7", ("4000",), "", 105.0, 106.0, leg_starts={"4000": 105.9}, legs_reported=True,
                     leg_alerts={})
    assert owed_lines(lost, {}) == ()
