"""`python -m bench.compare`: two runs' verdicts side by side, flips and whether the spreads overlap."""

from __future__ import annotations

import json
from pathlib import Path

from bench.compare import compare_documents, main, render_comparison
from bench.report import Figure, StageResult, Target, report_document


def _run(p99_samples: list[float], publish: float) -> dict[str, object]:
    e2e = StageResult("e2e")
    e2e.add(Figure("end to end p99", sorted(p99_samples)[len(p99_samples) // 2], "s", target=Target("<=", 0.005),
                   samples=p99_samples))
    e2e.add(Figure("gateway cores used", 0.2, "cores"))  # no target: not compared
    pub = StageResult("publish")
    pub.add(Figure("events/s", publish, "ev/s", target=Target(">=", 5_000)))
    return report_document([e2e, pub], started_at=0.0, finished_at=1.0, machine={}, options={})


def test_flips_with_overlapping_and_disjoint_spreads() -> None:
    a = _run([0.004, 0.0045, 0.006], 5_100.0)
    b = _run([0.0048, 0.0052, 0.0055], 4_000.0)
    comparisons = {c.figure: c for c in compare_documents(a, b)}
    assert set(comparisons) == {"end to end p99", "events/s"}
    p99 = comparisons["end to end p99"]
    assert p99.verdict_a == "PASS" and p99.verdict_b == "FAIL" and p99.flipped and p99.overlap is True
    publish = comparisons["events/s"]
    assert publish.flipped and publish.overlap is None  # one measurement each: no spread to compare
    c = _run([0.010, 0.011, 0.012], 5_100.0)
    assert {x.figure: x for x in compare_documents(a, c)}["end to end p99"].overlap is False
    text = render_comparison(compare_documents(a, b))
    assert "PASS -> FAIL  FLIPPED" in text and "2 judged figures, 2 verdicts flipped (1 of them with overlap" in text


def test_figures_only_one_run_has() -> None:
    a = _run([0.004, 0.004, 0.004], 5_100.0)
    b = _run([0.004, 0.004, 0.004], 5_100.0)
    b["stages"][1]["figures"] = []  # type: ignore[index]
    comparisons = {c.figure: c for c in compare_documents(a, b)}
    assert comparisons["events/s"].verdict_b == "absent" and not comparisons["events/s"].flipped


def test_cli_reads_files_and_refuses_bad_ones(tmp_path: Path) -> None:
    first, second, bad = tmp_path / "a.json", tmp_path / "b.json", tmp_path / "bad.json"
    first.write_text(json.dumps(_run([0.004, 0.005, 0.006], 5_100.0)))
    second.write_text(json.dumps(_run([0.004, 0.005, 0.006], 5_200.0)))
    bad.write_text(json.dumps({"schema": "other"}))
    assert main([str(first), str(second)]) == 0
    assert main([str(first), str(bad)]) == 2
    assert main([str(first), str(tmp_path / "missing.json")]) == 2
