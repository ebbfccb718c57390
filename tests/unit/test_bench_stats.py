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
