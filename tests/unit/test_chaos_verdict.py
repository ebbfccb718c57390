"""Chaos verdicts: ground truth against what agents saw, per fault phase (no cluster needed)."""

from __future__ import annotations

from dataclasses import replace

from ops.chaos.verdict import (
    COMMUTATION_STARTED,
    RING_FINISHED,
    RING_STARTED,
    Drop,
    Observation,
    Originate,
    Phase,
    TruthLog,
    format_table,
    judge_phase,
    parse_originates,
    snapshot_errors,
)
from ops.drill.truth import TruthCall


def guid(key: str) -> str:
    return f"g-{key}"


PHASE = Phase("redis-restart-empty", start=100.0, fault_start=110.0, fault_end=112.0, end=130.0)


def answered(linkedid: str, line: str, started: float, ended: float | None = None) -> TruthCall:
    return TruthCall(linkedid, (line,), "7916", started, ended if ended is not None else started + 5,
                     "inbound-direct-answered")


def full(call_id: str, at: float) -> list[tuple[int, float]]:
    return [(RING_STARTED, at), (COMMUTATION_STARTED, at + 1.5), (RING_FINISHED, at + 5)]


Snapshots = list[tuple[float, float, tuple[str, ...]]]


def snaps(*ids_by_time: tuple[float, tuple[str, ...]], rtt: float = 0.01) -> Snapshots:
    """Snapshots asked for at each time and answered ``rtt`` later."""
    return [(at, at + rtt, ids) for at, ids in ids_by_time]


def quiet_probes(start: float = 112.0, end: float = 130.0) -> Snapshots:
    return snaps(*[(float(t), ()) for t in range(int(start), int(end))])


def test_clean_phase_passes() -> None:
    truth = [answered("1", "500", 114.0)]
    obs = Observation("500", {"g-1:500": full("g-1:500", 114.1)}, {"g-1:500": "7916"},
                      snaps(*[(t, ("g-1:500",) if 115.5 < t < 118.5 else ()) for t, _, _ in quiet_probes()]))
    report = judge_phase(PHASE, truth, [obs], [], guid)
    assert report.calls == 1 and report.lost == 0 and not report.missed
    assert report.duplicates == 0 and report.out_of_order == 0 and report.ghosts == 0
    assert report.consistent_seconds == [0.0]
    assert report.passed, report.targets()


def test_first_event_swallowed_after_recovery_is_missed_but_not_lost() -> None:
    """Issue 10 (1): the call arrives as COMMUTATION_STARTED, RING_FINISHED only."""
    truth = [answered("1", "500", 115.0)]
    obs = Observation("500", {"g-1:500": [(COMMUTATION_STARTED, 116.5), (RING_FINISHED, 120.0)]}, {},
                      quiet_probes())
    report = judge_phase(PHASE, truth, [obs], [], guid)
    assert report.lost == 0
    assert report.missed[RING_STARTED] == 1 and sum(report.missed.values()) == 1
    assert "500:1:inbound-direct-answered:-RING_STARTED" in report.missed_calls
    assert not report.passed and not report.targets()["0 missed after recovery"]


def test_calls_before_recovery_are_not_judged_for_missed_events_but_for_loss() -> None:
    truth = [answered("1", "500", 111.0, 111.5)]  # during the fault
    obs = Observation("500", {}, {}, quiet_probes())
    report = judge_phase(PHASE, truth, [obs], [], guid)
    assert not report.missed
    assert report.lost == 1 and report.lost_calls == ["500:1"]


def test_an_agent_that_dropped_recovers_when_it_is_back() -> None:
    node = Phase("node-kill", 100.0, 110.0, 110.0, 130.0, node_fault=True)
    truth = [answered("1", "500", 113.0, 125.0)]  # rang while the agent was away: in its snapshot only
    obs = Observation("500", {"g-1:500": [(RING_FINISHED, 125.0)]}, {},
                      snaps((116.2, ("g-1:500",)), *[(float(t), ("g-1:500",)) for t in range(117, 124)],
                            *[(float(t), ()) for t in range(127, 130)]),
                      drops=[Drop(110.0, 115.0, 116.2)])
    report = judge_phase(node, truth, [obs], [], guid)
    assert report.agents_disconnected == 1 and report.not_reconnected == 0
    assert report.lost == 0 and not report.missed
    assert abs(report.consistent_seconds[0] - 1.2) < 1e-9  # from its first retry (115.0) to its snapshot
    assert report.targets()["disconnects only for a node fault"]
    assert report.passed, report.targets()


def test_a_call_wholly_inside_the_agents_gap_is_not_expected_one_overlapping_it_is() -> None:
    """Issue 11: a call that rang and ended while the agent was away is not replayed after the
    reconnect (Creatio's call records hold it); one that ends after the agent is back must end."""
    node = Phase("node-kill", 100.0, 110.0, 110.0, 130.0, node_fault=True)
    inside = answered("1", "500", 111.0, 113.0)
    overlapping = answered("2", "500", 112.0, 120.0)
    obs = Observation("500", {}, {}, quiet_probes(117.0), drops=[Drop(110.0, 115.0, 116.2)])
    report = judge_phase(node, [inside, overlapping], [obs], [], guid)
    assert report.lost_calls == ["500:2"], report.lost_calls  # the overlapping call: never seen, never ended
    assert not any(c.startswith("500:1") for c in report.lost_calls)


def test_a_leg_that_ended_inside_the_gap_is_not_expected_even_if_its_call_went_on() -> None:
    """A phone refusing busy hangs up at once; the caller's trunk plays the busy tone for seconds more.
    What the agent could have seen is its own leg: over while it was away, nothing is owed."""
    node = Phase("cluster-restart", 100.0, 110.0, 111.0, 130.0, node_fault=True)
    busy = TruthCall("1", ("500",), "7916", 112.0, 116.5, "inbound-busy", leg_ends={"500": 112.1})
    still_ringing = TruthCall("2", ("500",), "7916", 112.0, 116.5, "inbound-direct-noanswer",
                              leg_ends={"500": 116.5})
    obs = Observation("500", {}, {}, quiet_probes(117.0), drops=[Drop(110.0, 112.0, 116.2)])
    report = judge_phase(node, [busy, still_ringing], [obs], [], guid)
    assert report.lost_calls == ["500:2"], report.lost_calls


def test_a_queue_members_leg_that_began_after_the_agent_dropped_is_judged_by_its_own_start() -> None:
    node = Phase("cluster-restart", 100.0, 110.0, 111.0, 130.0, node_fault=True)
    queue = TruthCall("1", ("501",), "7916", 109.0, 118.0, "inbound-queue",
                      leg_starts={"501": 110.5}, leg_ends={"501": 113.0})
    obs = Observation("501", {}, {}, quiet_probes(117.0), drops=[Drop(110.2, 112.0, 116.2)])
    assert judge_phase(node, [queue], [obs], [], guid).lost_calls == []
    rang_before = TruthCall("2", ("501",), "7916", 109.0, 118.0, "inbound-queue",
                            leg_starts={"501": 109.5}, leg_ends={"501": 113.0})
    assert judge_phase(node, [rang_before], [obs], [], guid).lost_calls == ["501:2"]


def test_a_line_whose_phone_never_rang_is_not_owed_the_call() -> None:
    """Asterisk died while the queue call was still in the queue: the members' phones never rang."""
    crash = Phase("asterisk-restart", 100.0, 110.0, 112.0, 130.0)
    queued = TruthCall("1", ("500", "501"), "7916", 109.5, 110.0, "inbound-queue",
                       leg_starts={"500": 109.9}, leg_ends={"500": 110.0}, legs_reported=True)
    nobody = TruthCall("2", ("500", "501"), "7916", 109.6, 110.0, "inbound-queue", legs_reported=True)
    obs = [Observation("500", {}, {}, quiet_probes(112.0)), Observation("501", {}, {}, quiet_probes(112.0))]
    assert judge_phase(crash, [queued, nobody], obs, [], guid).lost_calls == ["500:1"]


def test_a_phone_created_but_gone_with_the_pbx_before_it_rang_is_not_owed_one_that_rang_or_refused_is() -> None:
    """Chaos run, asterisk-restart: the queue created both members' phone channels 0.1 s before Asterisk died;
    neither reached Ringing (sendRingStartedOnRingingState announces on the ring), and neither hung up: they vanished
    with the PBX. Nothing rang, nothing is owed. A phone that rang, or refused busy (hung up), is owed its call."""
    crash = Phase("asterisk-restart", 100.0, 110.0, 112.0, 130.0)
    vanished = TruthCall("1", ("500", "501"), "7916", 109.0, 110.1, "inbound-queue",
                         leg_starts={"500": 110.0, "501": 110.0}, legs_reported=True, leg_alerts={})
    rang = TruthCall("2", ("500",), "7916", 109.0, 110.1, "inbound-direct-answered",
                     leg_starts={"500": 109.2}, legs_reported=True, leg_alerts={"500": 109.3})
    busy = TruthCall("3", ("501",), "7916", 109.0, 110.1, "inbound-busy",
                     leg_starts={"501": 109.2}, leg_ends={"501": 109.3}, legs_reported=True, leg_alerts={})
    older = TruthCall("4", ("501",), "7916", 109.0, 110.1, "inbound-queue", leg_starts={"501": 110.0},
                      legs_reported=True)  # a simulator that does not report rings: owed, as before
    obs = [Observation("500", {}, {}, quiet_probes(112.0)), Observation("501", {}, {}, quiet_probes(112.0))]
    assert judge_phase(crash, [vanished, rang, busy, older], obs, [], guid).lost_calls == ["500:2", "501:3", "501:4"]


def test_a_leg_wholly_inside_an_ami_outage_left_nothing_to_report_one_outliving_it_is_expected() -> None:
    cut = Phase("ami-cut", 100.0, 110.0, 112.0, 130.0, pbx_unheard=True)
    unheard = TruthCall("1", ("500",), "7916", 110.5, 114.0, "inbound-busy", leg_ends={"500": 110.6})
    heard = TruthCall("2", ("500",), "7916", 111.0, 119.0, "inbound-direct-answered", leg_ends={"500": 119.0})
    obs = Observation("500", {}, {}, quiet_probes(112.0))
    report = judge_phase(cut, [unheard, heard], [obs], [], guid)
    assert report.lost_calls == ["500:2"], report.lost_calls
    # the gateway logged in again only at 115 (its reconnect backoff): a leg over by then was not heard either
    late = Phase("ami-cut", 100.0, 110.0, 112.0, 130.0, pbx_unheard=True, pbx_heard_at=115.0)
    deaf = TruthCall("3", ("500",), "7916", 112.5, 118.0, "inbound-direct-answered", leg_ends={"500": 114.8})
    assert judge_phase(late, [deaf, heard], [obs], [], guid).lost_calls == ["500:2"]
    assert judge_phase(cut, [deaf], [obs], [], guid).lost_calls == ["500:3"]
    # the same leg in a phase where the PBX was heard is owed
    heard_phase = Phase("slow-ami", 100.0, 110.0, 112.0, 130.0)
    assert judge_phase(heard_phase, [unheard], [obs], [], guid).lost_calls == ["500:1"]


def test_a_leg_that_rang_only_inside_an_ami_outage_is_not_owed_though_its_phone_was_created_before() -> None:
    """Short chaos, ami-cut: a queue's second member's phone channel was created 37 ms before the AMI link was cut,
    rang 94 ms after and was cancelled inside the cut; a busy phone created before the cut refused inside it. The
    gateway announces on the ring (sendRingStartedOnRingingState) or the busy: it heard neither, and its resync found
    both gone. Nothing to report; a phone that rang before the cut (its ring heard) is owed."""
    cut = Phase("ami-cut", 100.0, 110.0, 112.0, 130.0, pbx_unheard=True, pbx_heard_at=113.2)
    member = TruthCall("1", ("500", "501"), "7916", 108.7, 114.2, "inbound-queue",
                       leg_starts={"500": 109.97, "501": 109.96}, leg_ends={"500": 114.1, "501": 111.9},
                       legs_reported=True, leg_alerts={"500": 110.17, "501": 110.09})
    busy = TruthCall("2", ("501",), "7916", 109.76, 112.1, "inbound-busy", leg_starts={"501": 109.78},
                     leg_ends={"501": 110.1}, legs_reported=True, leg_alerts={})
    heard = TruthCall("3", ("501",), "7916", 108.0, 113.0, "inbound-direct-noanswer", leg_starts={"501": 108.02},
                      leg_ends={"501": 111.0}, legs_reported=True, leg_alerts={"501": 108.1})
    restated = {"g-1:500": [(RING_STARTED, 113.2), (COMMUTATION_STARTED, 113.2), (RING_FINISHED, 114.1)]}
    obs = [Observation("500", restated, {}, quiet_probes(112.0)), Observation("501", {}, {}, quiet_probes(112.0))]
    report = judge_phase(cut, [member, busy, heard], obs, [], guid)
    assert report.lost_calls == ["501:3"], report.lost_calls
    assert report.missed_calls == ["501:3:inbound-direct-noanswer:-RING_FINISHED"], report.missed_calls


def test_an_answer_no_gateway_heard_is_not_owed_even_when_the_call_began_in_the_phase_before() -> None:
    """Short chaos: a queue call started at the very end of cluster-restart's phase; its phone rang (heard) and was
    answered just as the next phase's AMI cut began, and hung up inside the cut. Nobody could hear the answer and the
    resync found the call over: RING_FINISHED is owed, COMMUTATION_STARTED is not. An answer heard is owed."""
    restart = Phase("cluster-restart", 80.0, 83.0, 87.0, 100.0, node_fault=True)
    cut = Phase("ami-cut", 100.0, 103.0, 105.0, 120.0, pbx_unheard=True, pbx_heard_at=106.0)
    call = TruthCall("1", ("500", "501"), "7916", 99.99, 105.5, "inbound-queue",
                     leg_starts={"500": 101.2, "501": 101.2}, leg_ends={"500": 105.4, "501": 103.1},
                     legs_reported=True, leg_alerts={"500": 101.4, "501": 101.3}, leg_answers={"500": 102.9})
    seen = {"g-1:500": [(RING_STARTED, 101.4), (RING_FINISHED, 106.0)],
            "g-1:501": [(RING_STARTED, 101.3), (RING_FINISHED, 103.1)]}
    obs = [Observation(line, seen, {}, quiet_probes(87.0, 120.0)) for line in ("500", "501")]
    report = judge_phase(restart, [call], obs, [], guid, run_phases=[restart, cut])
    assert not report.missed and report.lost == 0, (report.missed_calls, report.lost_calls)
    # judged without the run's later phases (as before), or answered well before the cut: the answer is owed
    alone = judge_phase(restart, [call], obs, [], guid)
    assert alone.missed_calls == ["500:1:inbound-queue:-COMMUTATION_STARTED"]
    early = replace(call, leg_answers={"500": 101.9})
    before = judge_phase(restart, [early], obs, [], guid, run_phases=[restart, cut])
    assert before.missed_calls == ["500:1:inbound-queue:-COMMUTATION_STARTED"]


def test_a_disconnect_fails_a_broker_fault_and_a_lost_agent_fails_any() -> None:
    obs = Observation("500", {}, {}, quiet_probes(), drops=[Drop(111.0, 116.0, 117.0)])
    assert not judge_phase(PHASE, [], [obs], [], guid).targets()["disconnects only for a node fault"]
    never = Observation("500", {}, {}, [], drops=[Drop(111.0, 116.0, 0.0)])
    node = Phase("node-stop", 100.0, 110.0, 112.0, 130.0, node_fault=True)
    report = judge_phase(node, [], [never], [], guid)
    assert report.not_reconnected == 1 and report.never_consistent == 1
    assert not report.targets()["disconnects only for a node fault"]


def test_duplicates_and_out_of_order() -> None:
    truth = [answered("1", "500", 114.0), answered("2", "500", 115.0)]
    events = {
        "g-1:500": [(RING_STARTED, 114.1), (RING_STARTED, 114.2), (COMMUTATION_STARTED, 115.6),
                    (RING_FINISHED, 119.0)],
        "g-2:500": [(RING_STARTED, 115.1), (RING_FINISHED, 116.0), (COMMUTATION_STARTED, 116.1),
                    (RING_FINISHED, 120.0)],
    }
    report = judge_phase(PHASE, truth, [Observation("500", events, {}, quiet_probes())], [], guid)
    assert report.duplicates == 2
    assert report.out_of_order == 1


def test_ghosts_after_the_deadline_and_consistency_time() -> None:
    truth = [answered("1", "500", 100.0, 111.0)]  # over before recovery began
    snapshots = snaps(*[(float(t), ("g-1:500",) if t < 120 else ()) for t in range(112, 130)])
    report = judge_phase(PHASE, truth, [Observation("500", {"g-1:500": full("", 100.0)}, {}, snapshots)], [], guid)
    # shown from 112 to 119; counted as ghosts from 117 (5 s after recovery) on
    assert report.ghosts == 3
    assert report.consistent_seconds == [8.0]
    assert not report.targets()["0 ghost calls after recovery"]
    assert not report.targets()["consistent within 5 s"]


def test_a_call_that_never_rang_the_line_is_a_ghost_and_a_live_call_must_be_shown() -> None:
    live = TruthCall("1", ("500",), "7916", 100.0, None, "inbound-direct-long")
    calls = {"g-1:500": live}
    assert snapshot_errors(("g-1:500",), calls, "500", 120.0) == (0, 0)
    assert snapshot_errors((), calls, "500", 120.0) == (0, 1)
    assert snapshot_errors(("g-1:500", "g-9:500"), calls, "500", 120.0) == (1, 0)
    # a call that starts within the slack may be on either side
    fresh = {"g-2:500": TruthCall("2", ("500",), "", 119.5, None, "inbound-direct-long")}
    assert snapshot_errors((), fresh, "500", 120.0) == (0, 0)
    assert snapshot_errors(("g-2:500",), fresh, "500", 120.0) == (0, 0)


def test_a_snapshot_read_late_is_judged_by_when_it_was_asked_for() -> None:
    """On a loaded machine the harness may read an answer seconds after the node sent it."""
    ended = {"g-1:500": TruthCall("1", ("500",), "", 100.0, 121.0, "inbound-direct-long")}
    assert snapshot_errors(("g-1:500",), ended, "500", 120.5, 124.0) == (0, 0)  # not a ghost
    assert snapshot_errors((), ended, "500", 120.5, 124.0) == (0, 0)  # nor surely live throughout
    assert snapshot_errors(("g-1:500",), ended, "500", 122.5, 124.0) == (1, 0)


def test_commands_executed_twice_stale_or_not_at_all() -> None:
    originates = [Originate("55501", 115.1), Originate("55502", 116.0), Originate("55502", 116.5),
                  Originate("55503", 125.0)]
    commands = [("55501", 115.0), ("55502", 115.9), ("55503", 118.0), ("55504", 119.0), ("55505", 99.0)]
    report = judge_phase(PHASE, [], [], originates, guid, commands, command_ttl=5.0)
    assert report.commands == 4
    assert report.commands_twice == 1 and report.commands_stale == 1 and report.commands_not_executed == 1
    assert not report.targets()["0 commands twice or stale"]


def test_queue_second_member_expects_no_commutation() -> None:
    call = TruthCall("1", ("500", "501"), "7916", 114.0, 118.0, "inbound-queue")
    first = Observation("500", {"g-1:500": full("", 114.0)}, {}, quiet_probes())
    second = Observation("501", {"g-1:501": [(RING_STARTED, 114.1), (RING_FINISHED, 115.6)]}, {}, quiet_probes())
    report = judge_phase(PHASE, [call], [first, second], [], guid)
    assert not report.missed and report.lost == 0


def test_truth_kept_over_reads_and_simulator_lifetimes() -> None:
    log = TruthLog()
    log.add({"finished": [{"linkedid": "a", "started": 1, "ended": 2}],
             "live": [{"linkedid": "b", "started": 3, "ended": None}, {"linkedid": "d", "started": 4}]})
    # the simulator dropped "a" from its bounded list; "d" ended in the meantime
    log.add({"finished": [{"linkedid": "d", "started": 4, "ended": 6}], "live": [{"linkedid": "b", "started": 3}]})
    log.crashed({"finished": [], "live": [{"linkedid": "b", "started": 3, "ended": None}]}, at=10.0)
    log.add({"finished": [{"linkedid": "c", "started": 20, "ended": 25}], "live": [{"linkedid": "e", "started": 30}]})
    merged = log.payload()
    by_id = {c["linkedid"]: c for c in merged["finished"]}
    assert set(by_id) == {"a", "b", "c", "d"} and [c["linkedid"] for c in merged["live"]] == ["e"]
    assert by_id["b"]["ended"] == 10.0 and by_id["b"]["state"] == "crashed"
    assert by_id["d"]["ended"] == 6


def test_originates_from_truth() -> None:
    payload = {"finished": [{"scenario": "outbound-originate", "vars": {"number": "555", "line": "9"},
                             "started": 5.0}, {"scenario": "inbound-busy", "vars": {}}], "live": []}
    assert parse_originates(payload) == [Originate("555", 5.0)]


def test_table_marks_not_applicable_and_failures() -> None:
    skipped = Phase("gateway-kill", 1.0, 2.0, 2.0, 2.0, applicable=False, note="no standby gateway")
    bad = judge_phase(PHASE, [answered("1", "500", 111.0)], [Observation("500", {}, {}, quiet_probes())], [], guid)
    good = judge_phase(Phase("baseline", 0.0, 1.0, 1.0, 10.0), [], [Observation("500", {}, {}, snaps((2.0, ())))],
                       [], guid)
    table = format_table([good, judge_phase(skipped, [], [], [], guid), bad])
    lines = table.splitlines()
    assert lines[0].startswith("fault")
    assert "PASS" in lines[2]
    assert "n/a: no standby gateway" in lines[3]
    assert "FAIL: 0 calls lost" in lines[4]


def test_a_calls_end_is_judged_in_the_phase_where_it_ended() -> None:
    """A long call starts in one fault's phase and ends in the next one's."""
    first = Phase("ami-cut", 100.0, 104.0, 106.0, 130.0)
    second = Phase("redis-restart-empty", 130.0, 134.0, 135.0, 160.0, open_ended=True)
    long_call = TruthCall("1", ("500",), "7916", 110.0, 150.0, "inbound-direct-long")
    hung_up_at_the_end = TruthCall("2", ("500",), "7916", 140.0, 200.0, "inbound-direct-long")
    events = {"g-1:500": [(RING_STARTED, 110.1), (COMMUTATION_STARTED, 111.6)],
              "g-2:500": [(RING_STARTED, 140.1), (COMMUTATION_STARTED, 141.6)]}
    obs = Observation("500", events, {}, snaps(*[(float(t), ()) for t in range(106, 160)]))
    one = judge_phase(first, [long_call, hung_up_at_the_end], [obs], [], guid)
    two = judge_phase(second, [long_call, hung_up_at_the_end], [obs], [], guid)
    assert one.lost == 0 and not one.missed
    assert two.lost == 2 and two.lost_calls == ["500:1:no end", "500:2:no end"]
    assert two.missed[RING_FINISHED] == 2


def test_after_a_cluster_restart_an_agent_is_timed_from_its_first_retry_that_found_the_cluster_back() -> None:
    """cluster-restart on a loaded machine: the cluster served again 11.8 s after the stop; the agents' retries at
    +2, +4, +7 and +11.5 s found it down, and their backoff made the next one at +18.25 s (6.65 s after it was back).
    Issue 10 times a node fault's agents from their first retry: the first one that could find the cluster. An
    agent whose retry after that failed is still timed from that retry."""
    restart = Phase("cluster-restart", 97.0, 100.0, 111.8, 130.0, node_fault=True)
    retries = (102.2, 104.2, 107.2, 111.7, 118.45)
    probes = snaps(*[(118.6 + i, ()) for i in range(11)])
    backed_off = Observation("500", {}, {}, probes, drops=[Drop(100.2, 102.2, 118.6, retries)])
    report = judge_phase(restart, [], [backed_off], [], guid)
    assert [round(s, 2) for s in report.consistent_dropped] == [0.15] and report.passed, report.consistent_dropped
    # evidence without retry times is judged as before: from the moment the cluster served again
    unrecorded = Observation("500", {}, {}, probes, drops=[Drop(100.2, 102.2, 118.6)])
    assert not judge_phase(restart, [], [unrecorded], [], guid).targets()["consistent within 5 s"]
    # a retry once the cluster was back that still failed is the cluster's: timed from it
    refused = Observation("500", {}, {}, probes, drops=[Drop(100.2, 102.2, 118.6, (102.2, 112.0, 118.45))])
    assert not judge_phase(restart, [], [refused], [], guid).targets()["consistent within 5 s"]


def test_node_fault_needs_99_percent_of_its_agents_consistent_within_5s_of_their_first_retry() -> None:
    node = Phase("node-kill", 100.0, 110.0, 110.0, 130.0, node_fault=True)

    def agents(late: int) -> list[Observation]:
        result = []
        for i in range(150):
            line = str(600 + i)
            if i < 100:  # on the killed node: back at 116 (first retry 115), or (late ones) after the phase
                ready = 135.0 if i < late else 116.0
                snapshots = snaps(*[(float(t), ()) for t in range(116, 130)]) if i >= late else []
                result.append(Observation(line, {}, {}, snapshots, drops=[Drop(110.0, 115.0, ready)]))
            else:
                result.append(Observation(line, {}, {}, quiet_probes(110.0)))
        return result

    one_late = judge_phase(node, [], agents(1), [], guid)
    assert one_late.never_consistent == 1 and one_late.targets()["consistent within 5 s"]
    two_late = judge_phase(node, [], agents(2), [], guid)
    assert not two_late.targets()["consistent within 5 s"]
