"""Figures, ratios, verdicts, the table and the JSON document of a bench run."""

from __future__ import annotations

import json

import pytest

from bench.failover import figures_from_drill
from bench.report import Figure, StageResult, Target, render_table, report_document, validate_document


def test_ratio_and_verdicts() -> None:
    fast = Figure("events/s", 30_000.0, "ev/s", baseline=150_000.0, target=Target(">=", 20_000))
    assert fast.ratio == 0.2
    assert fast.verdict == "PASS"
    slow = Figure("latency p99", 0.020, "s", baseline=0.004, target=Target("<=", 0.015))
    assert slow.ratio == 5.0
    assert slow.verdict == "FAIL"
    edge = Figure("latency p50", 0.003, "s", target=Target("<=", 0.003))
    assert edge.verdict == "PASS"
    missing = Figure("p99.9", None, "s", target=Target("<=", 0.05), note="no observations")
    assert missing.ratio is None and missing.verdict == "not measured"
    info = Figure("cores", 0.5, "cores")
    assert info.verdict == "" and info.ratio is None
    assert Figure("x", 1.0, "", baseline=0.0).ratio is None


def _stages() -> list[StageResult]:
    ok = StageResult("gateway")
    ok.add(Figure("parse+track", 12_000.0, "ev/s", 150_000.0, Target(">=", 20_000), samples=[11_000.0, 12_000.0]))
    ok.add(Figure("p99", 0.0074, "s", 0.0011, Target("<=", 0.015)))
    skipped = StageResult("failover", "not run", "not measured: ops.drill has no bench_figures() hook")
    return [ok, skipped]


def test_table_shows_values_ratios_verdicts_and_reasons() -> None:
    table = render_table(_stages())
    assert "12,000 ev/s" in table and "150,000 ev/s" in table and "0.08x" in table
    assert "FAIL" in table and "PASS" in table
    assert "7.40 ms" in table
    assert "not measured" in table and "bench_figures" in table


def test_document_is_valid_and_round_trips() -> None:
    doc = report_document(_stages(), started_at=1.0, finished_at=2.0, machine={"cpus": 2}, options={"quick": True})
    assert validate_document(doc) == []
    again = json.loads(json.dumps(doc))
    assert validate_document(again) == []
    assert again["summary"] == {"pass": 1, "fail": 1, "not_measured": 1}
    figure = again["stages"][0]["figures"][0]
    assert figure["ratio"] == 0.08 and figure["verdict"] == "FAIL"
    assert figure["target"] == {"op": ">=", "threshold": 20_000}


def test_validate_document_names_the_problems() -> None:
    doc = report_document(_stages(), started_at=1.0, finished_at=2.0, machine={}, options={})
    doc["schema"] = "other"
    doc["stages"][1]["reason"] = ""
    doc["stages"][0]["figures"][0]["value"] = None  # a verdict without a value
    doc["stages"][0]["figures"][1]["target"] = {"op": "==", "threshold": 1}
    problems = validate_document(doc)
    assert any("schema" in p for p in problems)
    assert any("must say why" in p for p in problems)
    assert any("verdict without a value" in p for p in problems)
    assert any("target" in p for p in problems)
    assert validate_document([]) == ["document is not an object"]


def test_failover_figures_from_the_drill_hook() -> None:
    figures = figures_from_drill({"reconnected_within_5s_fraction": 0.995, "calls_lost": 1, "extra_thing": 3})
    by_name = {f.name: f for f in figures}
    assert by_name["agents reconnected within 5 s of first retry"].verdict == "PASS"
    assert by_name["calls lost"].verdict == "FAIL"
    assert by_name["reconnected agents with a correct snapshot"].verdict == "not measured"
    assert by_name["extra_thing"].value == 3.0


def test_ratio_target_and_spread() -> None:
    publish = Figure("publish", 5_200.0, "ev/s", 7_000.0, Target(">=", 5_000), ratio_target=Target(">=", 0.8),
                     samples=[5_600.0, 5_200.0, 4_900.0])
    assert publish.ratio == pytest.approx(0.743, abs=1e-3)
    assert publish.verdict == "FAIL"  # the absolute target holds, the ratio to bare does not
    fine = Figure("cpu/frame", 50.0, "us", 45.0, ratio_target=Target("<=", 1.15))
    assert fine.verdict == "PASS"
    no_base = Figure("cpu/frame", 50.0, "us", None, ratio_target=Target("<=", 1.15))
    assert no_base.verdict == "not measured"
    sp = publish.spread
    assert sp is not None and (sp.minimum, sp.median, sp.maximum) == (4_900.0, 5_200.0, 5_600.0)
    assert Figure("one", 1.0, "s", samples=[1.0]).spread is None
    stage = StageResult("publish")
    stage.add(publish)
    table = render_table([stage])
    assert "4,900-5,600 ev/s (3)" in table
    assert ">= 5,000 ev/s, >= 0.80x" in table
    doc = report_document([stage], started_at=0.0, finished_at=1.0, machine={}, options={})
    assert validate_document(doc) == []
    fig = doc["stages"][0]["figures"][0]
    assert fig["spread"]["n"] == 3 and fig["ratio_target"] == {"op": ">=", "threshold": 0.8}
    fig["spread"]["min"] = 9e9
    assert any("not ordered" in p for p in validate_document(doc))


def test_verdict_is_taken_on_the_median_not_the_best_repeat() -> None:
    p99 = Figure("p99", 0.006, "s", target=Target("<=", 0.005), samples=[0.004, 0.006, 0.020])
    assert p99.verdict == "FAIL"  # one repeat passed; the median did not
