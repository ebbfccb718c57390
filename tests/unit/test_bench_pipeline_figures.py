"""How the pipeline stages turn measured windows into figures: medians over windows, per-window spread,
the bare-hop baseline, pause and side-probe columns (bench/stages_pipeline.py), without a cluster."""

from __future__ import annotations

import math

import pytest

from bench.pauses import WindowPauses
from bench.stages_pipeline import E2E_TARGETS, Window, latency_figures, pause_figures, stage_figures
from bench.stats import summarize_pauses


def _window(p50_bucket: float, lag_max: float, gc_max: float, redis_max: float, over_range: bool = False) -> Window:
    # 100 observations: 50 up to p50_bucket, 49 more up to 10 ms, the last under 100 ms (or past every bucket)
    observed = {p50_bucket: 50.0, 0.010: 99.0, 0.1: 99.0 if over_range else 100.0, math.inf: 100.0}
    node = WindowPauses("node", 2, 10, 0.02, summarize_pauses([gc_max]), summarize_pauses([lag_max, 0.001]))
    gateway = WindowPauses("gateway", 1, 4, 0.01, summarize_pauses([gc_max / 2]), summarize_pauses([lag_max * 2]))
    return Window(seconds=10.0, ami_rate=500.0, line_event_rate=47.0, frames_rate=47.0, observed=observed,
                  dropped=0.0, verdicts={}, cpu={"gateway": 1.0, "node1": 0.5}, process_pauses={
                      "node": node, "gateway": gateway}, starved=0, play_failures=0,
                  redis_probe=summarize_pauses([0.0005, redis_max]), broker_probe=summarize_pauses([0.002]))


def test_latency_figures_take_medians_and_keep_every_window() -> None:
    windows = [_window(0.002, 0.004, 0.001, 0.001), _window(0.003, 0.030, 0.002, 0.050),
               _window(0.004, 0.008, 0.003, 0.002)]
    hops = [[0.001] * 99 + [0.004], [0.002] * 100, [0.0015] * 100]
    figures = {f.name: f for f in latency_figures(windows, hops, E2E_TARGETS)}
    p50 = figures["end to end p50"]
    assert p50.samples == pytest.approx([0.002, 0.003, 0.004])
    assert p50.value == pytest.approx(0.003)
    assert p50.baseline == pytest.approx(0.0015)  # median of the three hops' p50
    assert p50.verdict == "FAIL"  # 3 ms against 2 ms
    sp = p50.spread
    assert sp is not None and sp.minimum == pytest.approx(0.002) and sp.maximum == pytest.approx(0.004)
    assert figures["end to end p99.9"].note == ""


def test_a_quantile_past_the_buckets_is_called_a_lower_bound() -> None:
    figures = {f.name: f for f in latency_figures([_window(0.002, 0.004, 0.001, 0.001, over_range=True)], [[0.001]],
                                                  E2E_TARGETS)}
    assert "lower bound" in figures["end to end p99.9"].note


def test_pause_and_probe_figures_sit_beside_the_tails() -> None:
    windows = [_window(0.002, 0.004, 0.001, 0.001), _window(0.003, 0.030, 0.002, 0.050)]
    figures = {f.name: f for f in pause_figures(windows)}
    assert figures["nodes: event-loop lag max"].samples == pytest.approx([0.004, 0.030])
    assert figures["gateway: event-loop lag max"].value == pytest.approx((0.008 + 0.060) / 2)
    assert figures["nodes: GC pause max"].value == pytest.approx(0.0015)
    # time in GC: 0.02 s over a 10 s window, shared by 2 node processes
    assert figures["nodes: time in GC (per process)"].value == pytest.approx(0.001)
    assert figures["Redis PING beside the window (every 10 ms): max"].samples == pytest.approx([0.001, 0.050])
    assert all(f.verdict == "" for f in figures.values())  # information, not verdicts


def test_missing_pause_records_are_said_not_hidden() -> None:
    window = _window(0.002, 0.004, 0.001, 0.001)
    window.process_pauses = {}
    figures = {f.name: f for f in pause_figures([window])}
    assert figures["nodes: GC pause max"].value is None
    assert "no pause records" in figures["nodes: GC pause max"].note


def test_where_the_time_goes_inside_the_gateway() -> None:
    windows = [_window(0.002, 0.004, 0.001, 0.001), _window(0.003, 0.004, 0.001, 0.001)]
    # 100 events: half confirmed within 2 ms / 3 ms of their AMI read; batches stored in Redis within 1 ms
    windows[0].gateway_publish = {0.002: 50.0, 0.01: 100.0, math.inf: 100.0}
    windows[1].gateway_publish = {0.003: 50.0, 0.01: 100.0, math.inf: 100.0}
    for w in windows:
        w.redis_write = {0.001: 10.0, math.inf: 10.0}
    figures = {f.name: f for f in stage_figures(windows)}
    assert figures["gateway: AMI read -> broker confirm p50"].value == pytest.approx(0.0025)
    assert figures["gateway: AMI read -> broker confirm p50"].samples == pytest.approx([0.002, 0.003])
    assert figures["gateway: Redis write beside the publish (per write) p99"].value == pytest.approx(0.00099)
    # a gateway without the histograms: said, not a zero
    empty = {f.name: f for f in stage_figures([_window(0.002, 0.004, 0.001, 0.001)])}
    assert empty["gateway: AMI read -> broker confirm p50"].value is None
    assert "not exported" in empty["gateway: AMI read -> broker confirm p50"].note


def test_the_way_of_an_event_is_cut_at_the_broker_hand_off_and_the_nodes_arrival() -> None:
    window = _window(0.003, 0.004, 0.001, 0.001)
    window.outbox_wait = {0.0005: 60.0, 0.001: 100.0, math.inf: 100.0}
    window.node_arrival = {0.002: 40.0, 0.0025: 100.0, math.inf: 100.0}
    figures = {f.name: f for f in stage_figures([window])}
    assert figures["gateway: AMI read -> handed to the broker p50"].value == pytest.approx(0.0005 * 50 / 60)
    assert figures["node: AMI read -> taken by the node's event task p50"].value == pytest.approx(
        0.002 + 0.0005 * 10 / 60)
