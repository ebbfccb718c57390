"""The bench's arithmetic: Prometheus text, quantiles from buckets, medians, profile top costs."""

from __future__ import annotations

import math

import pytest

from bench.stats import (
    bucket_quantile,
    counter_value,
    diff_buckets,
    exact_quantile,
    histogram_buckets,
    median,
    parse_samples,
    top_costs,
)

METRICS = """\
# HELP cms_end_to_end_latency_seconds From AMI bytes to frame
# TYPE cms_end_to_end_latency_seconds histogram
cms_end_to_end_latency_seconds_bucket{le="0.001"} 10.0
cms_end_to_end_latency_seconds_bucket{le="0.002"} 50.0
cms_end_to_end_latency_seconds_bucket{le="0.005"} 90.0
cms_end_to_end_latency_seconds_bucket{le="+Inf"} 100.0
cms_end_to_end_latency_seconds_count 100.0
cms_end_to_end_latency_seconds_sum 0.3
cms_ami_events_received_total{event="Newchannel"} 7.0
cms_ami_events_received_total{event="other"} 3.0
cms_node_lines_bound 12.0
weird line without value
"""


def test_parse_samples_reads_names_labels_and_values() -> None:
    samples = parse_samples(METRICS)
    assert len(samples) == 9
    first = samples[0]
    assert first.name == "cms_end_to_end_latency_seconds_bucket"
    assert first.label("le") == "0.001"
    assert first.value == 10.0


def test_counter_value_sums_label_sets_and_filters() -> None:
    assert counter_value(METRICS, "cms_ami_events_received_total") == 10.0
    assert counter_value(METRICS, "cms_ami_events_received") == 10.0
    assert counter_value(METRICS, "cms_ami_events_received_total", event="other") == 3.0
    assert counter_value(METRICS, "cms_node_lines_bound") == 12.0
    assert counter_value(METRICS, "absent_total") == 0.0


def test_histogram_buckets_and_diff() -> None:
    after = histogram_buckets(METRICS, "cms_end_to_end_latency_seconds")
    assert after == {0.001: 10.0, 0.002: 50.0, 0.005: 90.0, math.inf: 100.0}
    before = {0.001: 4.0, 0.002: 20.0, 0.005: 40.0, math.inf: 40.0}
    assert diff_buckets(after, before) == {0.001: 6.0, 0.002: 30.0, 0.005: 50.0, math.inf: 60.0}
    with pytest.raises(ValueError, match="restarted"):
        diff_buckets(before, after)


def test_bucket_quantile_interpolates_like_prometheus() -> None:
    buckets = {0.001: 10.0, 0.002: 50.0, 0.005: 90.0, math.inf: 100.0}
    # rank 50 is the top of the 1-2 ms bucket
    p50 = bucket_quantile(0.5, buckets)
    assert p50 is not None and p50.value == pytest.approx(0.002)
    # rank 30 is half-way through the 40 observations of 1-2 ms
    p30 = bucket_quantile(0.3, buckets)
    assert p30 is not None and p30.value == pytest.approx(0.0015)
    # the first bucket starts at 0
    p5 = bucket_quantile(0.05, buckets)
    assert p5 is not None and p5.value == pytest.approx(0.0005)
    # rank 99 lies in +Inf: only a lower bound can be given, and it says so
    p99 = bucket_quantile(0.99, buckets)
    assert p99 is not None and p99.above_range and p99.value == 0.005


def test_bucket_quantile_edge_cases() -> None:
    assert bucket_quantile(0.5, {}) is None
    assert bucket_quantile(0.5, {0.001: 0.0, math.inf: 0.0}) is None
    with pytest.raises(ValueError):
        bucket_quantile(1.5, {math.inf: 1.0})
    with pytest.raises(ValueError, match=r"\+Inf"):
        bucket_quantile(0.5, {0.001: 1.0})
    with pytest.raises(ValueError, match="cumulative"):
        bucket_quantile(0.9, {0.001: 5.0, 0.002: 3.0, math.inf: 5.0})


def test_exact_quantile_and_median() -> None:
    values = [float(v) for v in range(1, 1001)]
    assert exact_quantile(0.5, values) == 500.0
    assert exact_quantile(0.99, values) == 990.0
    assert exact_quantile(0.999, values) == 999.0
    assert exact_quantile(0.5, []) is None
    assert median([3.0, 1.0, 2.0]) == 2.0
    assert median([4.0, 1.0, None, 2.0, 3.0]) == 2.5
    assert median([None]) is None


def test_top_costs_from_collapsed_stacks() -> None:
    collapsed = "main;loop;parse 60\nmain;loop;track 30\nmain;loop 10\n\nbroken line\n"
    costs = top_costs(collapsed)
    assert [c.frame for c in costs] == ["parse", "track", "loop"]
    assert costs[0].self_fraction == pytest.approx(0.6)
    assert costs[2].total_fraction == pytest.approx(1.0)  # every sample passes through loop
    assert top_costs("") == []


def test_interpolated_quantile_and_spread() -> None:
    from bench.stats import interpolated_quantile, spread

    assert interpolated_quantile(0.25, [1.0, 2.0, 3.0, 4.0, 5.0]) == 2.0
    assert interpolated_quantile(0.75, [4.0, 1.0]) == pytest.approx(3.25)
    assert interpolated_quantile(0.5, []) is None
    with pytest.raises(ValueError):
        interpolated_quantile(-0.1, [1.0])
    sp = spread([3.0, None, 1.0, 2.0, float("nan"), 10.0])
    assert sp is not None
    assert (sp.n, sp.minimum, sp.median, sp.maximum) == (4, 1.0, 2.5, 10.0)
    assert sp.q1 == pytest.approx(1.75) and sp.q3 == pytest.approx(4.75)
    assert sp.iqr == pytest.approx(3.0)
    assert sp.relative == pytest.approx(9.0 / 2.5)
    assert spread([None]) is None
    one = spread([7.0])
    assert one is not None and one.minimum == one.median == one.maximum == 7.0


def test_knee_is_where_the_tail_turns_up() -> None:
    from bench.stats import SweepStep, capacity_within, find_knee

    steps = [
        SweepStep(500, 500, 0.002),
        SweepStep(1000, 1000, 0.003),
        SweepStep(2000, 1990, 0.004),  # 4 ms: under the 5 ms floor, not a knee although 2x the first
        SweepStep(3000, 2990, 0.009),  # 4.5x the first step's p99: the knee
        SweepStep(4000, 3100, 0.200),
    ]
    knee = find_knee(list(reversed(steps)))  # order of the input does not matter
    assert knee.last_good is not None and knee.last_good.offered == 2000
    assert knee.first_bad is not None and knee.first_bad.offered == 3000
    assert "p99 9.0 ms" in knee.reason
    # within 25 ms every step up to 3,000 held; 4,000 carried only 3,100 of the offer
    assert capacity_within(steps, 0.025) == 2990
    assert capacity_within(steps, 0.0025) == 500
    assert capacity_within(steps, 0.001) is None


def test_knee_from_throughput_and_drops_and_no_knee() -> None:
    from bench.stats import SweepStep, capacity_within, find_knee

    short = find_knee([SweepStep(1000, 1000, 0.002), SweepStep(2000, 1500, 0.002)])
    assert short.first_bad is not None and "carried 1500 of 2000" in short.reason
    dropped = find_knee([SweepStep(1000, 1000, 0.002, dropped=3)])
    assert dropped.last_good is None and "3 dropped" in dropped.reason
    flat = find_knee([SweepStep(1000, 1000, 0.002), SweepStep(2000, 2000, 0.0021)])
    assert flat.first_bad is None and flat.last_good is not None and flat.last_good.offered == 2000
    assert find_knee([]).reason == "no steps"
    # a lucky step past a failing one does not count as capacity
    assert capacity_within([SweepStep(1000, 1000, 0.030), SweepStep(2000, 2000, 0.010)], 0.025) is None


def test_rss_drift_flat_growing_and_warmup() -> None:
    from bench.stats import rss_drift

    mb = 1024.0 * 1024.0
    # warm-up growth 50 -> 100 MB in the first 60 s, then flat with noise
    samples = [(float(t), (50 + t * 50 / 60) * mb) for t in range(0, 60, 5)]
    samples += [(float(t), (100 + (1 if t % 20 else -1)) * mb) for t in range(60, 3600, 10)]
    flat = rss_drift(samples, warmup=60)
    assert flat is not None and flat.flat_within(0.05)
    assert abs(flat.slope_per_hour) < 0.01
    with_warmup = rss_drift(samples)
    # warm-up counted: the trend points up, although the edge medians shrug off a short ramp
    assert with_warmup is not None and with_warmup.slope_per_hour > 0.04
    # a leak of 10 % an hour
    leak = rss_drift([(float(t), 100 * mb * (1 + 0.1 * t / 3600)) for t in range(0, 3601, 30)])
    assert leak is not None and not leak.flat_within(0.05)
    assert leak.slope_per_hour == pytest.approx(0.1, rel=0.05)
    assert rss_drift([(0.0, 1.0), (1.0, 1.0)]) is None
    with pytest.raises(ValueError):
        rss_drift(samples, edge=0.0)


def test_summarize_pauses() -> None:
    from bench.stats import summarize_pauses

    summary = summarize_pauses([0.001, 0.002, 0.030, 0.006])
    assert summary.count == 4 and summary.maximum == 0.030 and summary.over == 2
    assert summary.total == pytest.approx(0.039) and summary.mean == pytest.approx(0.00975)
    empty = summarize_pauses([])
    assert empty.count == 0 and empty.maximum == 0.0 and empty.p99 is None and empty.mean == 0.0


def test_segment_drifts_tell_a_steady_leak_from_one_step() -> None:
    from bench.stats import segment_drifts

    mb = 1024 * 1024
    leak = [(float(t), 100 * mb * (1 + 0.09 * t / 900)) for t in range(0, 901, 5)]
    steady = segment_drifts(leak, parts=3)
    assert len(steady) == 3 and all(0.02 < d.relative < 0.035 for d in steady)
    step = [(float(t), 100 * mb if t < 450 else 109 * mb) for t in range(0, 901, 5)]
    drifts = [d.relative for d in segment_drifts(step, parts=3)]
    assert drifts[0] == 0 and drifts[2] == 0 and drifts[1] > 0.08
    # warm-up is left out, and a stretch with fewer than 4 samples is not reported
    assert len(segment_drifts([(0.0, 1.0), (100.0, 5.0), (101.0, 5.0)], warmup=50, parts=1)) == 0
    assert segment_drifts([], parts=3) == []
