"""The reconnect storm's sizing and verdicts (bench/storm.py), without a cluster."""

from __future__ import annotations

import math

from bench.storm import StormRun, storm_agents, storm_figures


def test_storm_size_follows_the_descriptor_limit() -> None:
    assert storm_agents(True, 1_000_000) == 200
    assert storm_agents(False, 20_000) == 9_500  # HAProxy: 2 descriptors per agent, 1,000 spare
    assert storm_agents(False, 1_000_000) == 20_000  # 10,000 on each of two nodes, as issue 15 asks
    assert storm_agents(False, 1_024) == 200


def test_storm_verdicts() -> None:
    run = StormRun([6.0, 7.5, 9.9], [1.0, 2.5, 4.9], 0, 0, 0, 6, bare_ready=[5.2, 5.4, 11.0])
    by_name = {f.name: f for f in storm_figures([run])}
    back = by_name["drops back (ready) within 10 s"]
    assert back.value == 1.0 and back.verdict == "PASS"
    assert back.baseline == 2 / 3  # the bare server's agents: one of three past 10 s
    assert "3 agents on the killed node" in back.note and "survivor" not in back.note
    assert by_name["reconnected agents with a correct snapshot"].verdict == "PASS"
    assert by_name["drop -> ready, max"].value == 9.9
    assert by_name["drop -> ready, p99"].baseline == 11.0

    late = {f.name: f for f in storm_figures([StormRun([6.0, 10.5], [1.0, 5.5], 1, 2, 1, 6)])}
    # one late, one never back: 1 of 3 affected agents within 10 s
    assert late["drops back (ready) within 10 s"].value == 1 / 3
    assert late["drops back (ready) within 10 s"].verdict == "FAIL"
    assert late["reconnected agents with a correct snapshot"].value == 0.5
    assert late["calls lost"].verdict == "FAIL"

    none = {f.name: f for f in storm_figures([StormRun([], [], 0, 0, 0, 6)])}
    assert none["drops back (ready) within 10 s"].verdict == "not measured"


def test_repeated_storms_take_the_median_and_pool_correctness() -> None:
    runs = [
        StormRun([6.0] * 9 + [12.0], [1.0] * 10, 0, 0, 0, 20),  # 90 % back
        StormRun([6.0] * 10, [1.0] * 10, 0, 0, 0, 20),  # 100 %
        StormRun([6.0] * 8 + [12.0] * 2, [1.0] * 10, 1, 1, 0, 20),  # 80 %, one wrong snapshot, one call lost
    ]
    by_name = {f.name: f for f in storm_figures(runs)}
    back = by_name["drops back (ready) within 10 s"]
    assert back.value == 0.9 and back.samples == [0.9, 1.0, 0.8] and back.verdict == "FAIL"
    assert back.spread is not None and back.spread.minimum == 0.8 and back.spread.maximum == 1.0
    # one wrong snapshot in any run fails the verdict, whatever the median run did
    snapshots = by_name["reconnected agents with a correct snapshot"]
    assert snapshots.value == 1 - 1 / 30 and snapshots.verdict == "FAIL"
    assert by_name["calls lost"].value == 1


def test_cores_after_the_kill() -> None:
    from bench.storm import cores_after

    samples = [(float(t), {"node2": 0.5 * t, "haproxy": 0.1 * t}) for t in range(0, 30)]
    busy = cores_after(samples, 10.0, 12.0)
    assert busy["node2"] == 0.5 and abs(busy["haproxy"] - 0.1) < 1e-9
    assert cores_after(samples, 100.0, 12.0) == {}
    # a process that vanished from the later samples is not reported
    assert "gone" not in cores_after([(0.0, {"gone": 1.0}), (1.0, {})], 0.0, 5.0)


def test_a_survivor_cut_off_too_is_said() -> None:
    run = StormRun([6.0] * 10, [1.0] * 10, 0, 0, 0, 6, agents_dropped=6)  # all 6 dropped, not just the 3 of node1
    back = {f.name: f for f in storm_figures([run])}["drops back (ready) within 10 s"]
    assert "agents dropped per run 6: the survivor's too" in back.note


def test_lines_taken_on_by_the_survivor() -> None:
    from bench.storm import taken_on

    samples = [(0.0, 100.0), (1.0, 100.0), (2.0, 140.0), (3.0, 180.0), (4.0, 195.0), (5.0, 200.0), (6.0, 200.0)]
    gained, seconds = taken_on(samples, 1.0) or (0.0, 0.0)
    assert gained == 100 and seconds == 3.0  # 95 of the 100 new lines were bound at t=4
    assert taken_on(samples, 10.0) is None
    assert taken_on([(0.0, 5.0), (2.0, 5.0)], 1.0) == (0.0, 0.0)


def test_drops_back_per_second() -> None:
    from bench.storm import per_second

    assert per_second([5.2, 4.9, 5.99, 10.5, math.inf]) == {"4": 1, "5": 2, "10": 1, "never": 1}
    assert list(per_second([12.0, 3.0])) == ["3", "12"]  # in order of time
    assert per_second([]) == {}
