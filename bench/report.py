"""What a benchmark run produces: figures with their baseline, ratio and verdict; the table; the JSON.

A figure that could not be measured keeps ``value=None`` and says why in ``note``; it is shown as
``not measured``, never dropped, so a missing number cannot pass for a good one.

A figure measured several times carries every repeat in ``samples``; ``value`` is their median and
the verdict is taken on it. The table prints the spread (min-max) beside it, so a verdict that one
lucky or unlucky repeat decided is visible as such. A target may also bound the ratio to the
same-run baseline (``ratio_target``, e.g. "at most 1.15x bare Autobahn"); both must hold.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from bench.stats import Spread, spread

__all__ = [
    "SCHEMA",
    "Figure",
    "StageResult",
    "Target",
    "render_table",
    "report_document",
    "validate_document",
]

SCHEMA = "cms-bench/2"

Verdict = Literal["PASS", "FAIL", "not measured", ""]


@dataclass(frozen=True, slots=True)
class Target:
    """``value op threshold`` must hold: ``Target(">=", 20000)`` or ``Target("<=", 0.003)``."""

    op: Literal[">=", "<="]
    threshold: float

    def met(self, value: float) -> bool:
        return value >= self.threshold if self.op == ">=" else value <= self.threshold


@dataclass
class Figure:
    """One measured number. ``baseline`` is the same quantity for the bare program, same run, same sizes."""

    name: str
    value: float | None
    unit: str
    baseline: float | None = None
    target: Target | None = None
    note: str = ""
    samples: list[float] = field(default_factory=list)
    baseline_samples: list[float] = field(default_factory=list)
    ratio_target: Target | None = None

    @property
    def ratio(self) -> float | None:
        """value / baseline (how many times the bare program's figure)."""
        if self.value is None or self.baseline is None or self.baseline == 0:
            return None
        return self.value / self.baseline

    @property
    def spread(self) -> Spread | None:
        """Spread of the repeats (``None`` with fewer than two)."""
        measured = spread(self.samples)
        return measured if measured is not None and measured.n >= 2 else None

    @property
    def verdict(self) -> Verdict:
        if self.target is None and self.ratio_target is None:
            return ""
        if self.value is None or math.isnan(self.value):
            return "not measured"
        if self.target is not None and not self.target.met(self.value):
            return "FAIL"
        if self.ratio_target is not None:
            ratio = self.ratio
            if ratio is None:
                return "not measured"
            if not self.ratio_target.met(ratio):
                return "FAIL"
        return "PASS"

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "value": _finite(self.value),
            "unit": self.unit,
            "baseline": _finite(self.baseline),
            "ratio": _finite(self.ratio),
            "target": None if self.target is None else {"op": self.target.op, "threshold": self.target.threshold},
            "ratio_target": None if self.ratio_target is None else {"op": self.ratio_target.op,
                                                                    "threshold": self.ratio_target.threshold},
            "verdict": self.verdict,
            "spread": None if (sp := self.spread) is None else {
                "n": sp.n, "min": sp.minimum, "q1": sp.q1, "median": sp.median, "q3": sp.q3, "max": sp.maximum},
            "note": self.note,
            "samples": [_finite(s) for s in self.samples],
            "baseline_samples": [_finite(s) for s in self.baseline_samples],
        }


@dataclass
class StageResult:
    """A stage's outcome. ``status``: ``ok``; ``not run`` (with the reason: a missing part, a skipped
    option); ``error`` (it crashed: the reason holds the exception)."""

    name: str
    status: Literal["ok", "not run", "error"] = "ok"
    reason: str = ""
    seconds: float = 0.0
    figures: list[Figure] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)

    def add(self, figure: Figure) -> Figure:
        self.figures.append(figure)
        return figure

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "status": self.status,
            "reason": self.reason,
            "seconds": round(self.seconds, 3),
            "figures": [f.to_json() for f in self.figures],
            "details": self.details,
        }


def _finite(value: float | None) -> float | None:
    if value is None or math.isnan(value) or math.isinf(value):
        return None
    return value


def format_value(value: float | None, unit: str) -> str:
    if value is None:
        return "-"
    if unit == "s":
        return _si_seconds(value)
    if unit in ("fraction", "cores"):
        return f"{value:.3f}" if unit == "cores" else f"{value * 100:.1f} %"
    magnitude = abs(value)
    if magnitude < 100 and float(value).is_integer():  # counts: "44 stalls", not "44.0 stalls"
        return f"{int(value)} {unit}".strip()
    if magnitude >= 100_000:
        text = f"{value:,.0f}"
    elif magnitude >= 100:
        text = f"{value:,.0f}"
    elif magnitude >= 10:
        text = f"{value:.1f}"
    else:
        text = f"{value:.3g}"
    return f"{text} {unit}".strip()


def _si_seconds(value: float) -> str:
    magnitude = abs(value)
    if magnitude >= 1:
        return f"{value:.2f} s"
    if magnitude >= 1e-3:
        return f"{value * 1e3:.2f} ms"
    return f"{value * 1e6:.1f} us"


def _format_target(figure: Figure) -> str:
    parts = []
    if figure.target is not None:
        parts.append(f"{figure.target.op} {format_value(figure.target.threshold, figure.unit)}")
    if figure.ratio_target is not None:
        parts.append(f"{figure.ratio_target.op} {figure.ratio_target.threshold:.2f}x")
    return ", ".join(parts)


def format_spread(figure: Figure) -> str:
    """``min-max (n)`` of the repeats in the figure's unit (said once when both ends share it), ``-`` for a
    single measurement."""
    sp = figure.spread
    if sp is None:
        return "-"
    low, high = format_value(sp.minimum, figure.unit), format_value(sp.maximum, figure.unit)
    low_number, _, low_unit = low.partition(" ")
    if low_unit and high.partition(" ")[2] == low_unit:
        low = low_number
    return f"{low}-{high} ({sp.n})"


def render_table(stages: Sequence[StageResult]) -> str:
    """The human table: one row per figure, a row with the reason for every stage that did not run."""
    header = ("stage", "figure", "median", "spread (n)", "baseline", "ratio", "target", "verdict")
    rows: list[tuple[str, ...]] = []
    for stage in stages:
        if stage.status != "ok" and not stage.figures:
            rows.append((stage.name, f"({stage.status}) {stage.reason}", "", "", "", "", "", "not measured"))
            continue
        for figure in stage.figures:
            ratio = figure.ratio
            verdict = figure.verdict
            if figure.value is None and figure.note:
                verdict = verdict or "not measured"
            rows.append(
                (
                    stage.name,
                    figure.name + (f"  [{figure.note}]" if figure.note else ""),
                    format_value(figure.value, figure.unit),
                    format_spread(figure),
                    format_value(figure.baseline, figure.unit),
                    "-" if ratio is None else f"{ratio:.2f}x",
                    _format_target(figure),
                    verdict,
                )
            )
        if stage.status != "ok":
            rows.append((stage.name, f"({stage.status}) {stage.reason}", "", "", "", "", "", ""))
    widths = [len(h) for h in header]
    for row in rows:
        for i, cell in enumerate(row):
            if i != 1:
                widths[i] = max(widths[i], len(cell))
    widths[1] = min(72, max([len(header[1])] + [len(r[1]) for r in rows]))

    def line(cells: Sequence[str]) -> str:
        out = []
        for i, cell in enumerate(cells):
            text = cell if len(cell) <= widths[i] else cell[: widths[i] - 1] + "~"
            out.append(text.rjust(widths[i]) if i in (2, 3, 4, 5) else text.ljust(widths[i]))
        return "  ".join(out).rstrip()

    lines = [line(header), line(["-" * w for w in widths])]
    lines.extend(line(row) for row in rows)
    return "\n".join(lines)


def report_document(stages: Sequence[StageResult], *, started_at: float, finished_at: float,
                    machine: dict[str, Any], options: dict[str, Any]) -> dict[str, Any]:
    """The JSON written to ``bench-results/<timestamp>.json``."""
    figures = [f for s in stages for f in s.figures]
    return {
        "schema": SCHEMA,
        "started_at": started_at,
        "finished_at": finished_at,
        "machine": machine,
        "options": options,
        "summary": {
            "pass": sum(1 for f in figures if f.verdict == "PASS"),
            "fail": sum(1 for f in figures if f.verdict == "FAIL"),
            "not_measured": sum(1 for f in figures if f.verdict == "not measured")
            + sum(1 for s in stages if s.status != "ok" and not s.figures),
        },
        "stages": [s.to_json() for s in stages],
    }


_FIGURE_KEYS = {"name": str, "unit": str, "verdict": str, "note": str, "samples": list, "baseline_samples": list}


def validate_document(doc: Any) -> list[str]:
    """Problems with a results document (empty list = valid), so a run can be compared with another."""
    problems: list[str] = []
    if not isinstance(doc, dict):
        return ["document is not an object"]
    if doc.get("schema") != SCHEMA:
        problems.append(f"schema is {doc.get('schema')!r}, expected {SCHEMA!r}")
    for key in ("started_at", "finished_at"):
        if not isinstance(doc.get(key), int | float):
            problems.append(f"{key} must be a number")
    for key in ("machine", "options", "summary"):
        if not isinstance(doc.get(key), dict):
            problems.append(f"{key} must be an object")
    stages = doc.get("stages")
    if not isinstance(stages, list):
        return problems + ["stages must be a list"]
    for i, stage in enumerate(stages):
        where = f"stages[{i}]"
        if not isinstance(stage, dict):
            problems.append(f"{where} is not an object")
            continue
        if not isinstance(stage.get("name"), str) or not stage["name"]:
            problems.append(f"{where}.name must be a non-empty string")
        if stage.get("status") not in ("ok", "not run", "error"):
            problems.append(f"{where}.status is {stage.get('status')!r}")
        if stage.get("status") != "ok" and not stage.get("reason"):
            problems.append(f"{where}: a stage that did not run must say why")
        figures = stage.get("figures")
        if not isinstance(figures, list):
            problems.append(f"{where}.figures must be a list")
            continue
        for j, figure in enumerate(figures):
            fwhere = f"{where}.figures[{j}]"
            if not isinstance(figure, dict):
                problems.append(f"{fwhere} is not an object")
                continue
            for key, kind in _FIGURE_KEYS.items():
                if not isinstance(figure.get(key), kind):
                    problems.append(f"{fwhere}.{key} must be {kind.__name__}")
            for key in ("value", "baseline", "ratio"):
                if figure.get(key) is not None and not isinstance(figure.get(key), int | float):
                    problems.append(f"{fwhere}.{key} must be a number or null")
            if figure.get("value") is None and figure.get("verdict") in ("PASS", "FAIL"):
                problems.append(f"{fwhere}: a verdict without a value")
            if figure.get("verdict") not in ("PASS", "FAIL", "not measured", ""):
                problems.append(f"{fwhere}.verdict is {figure.get('verdict')!r}")
            for key in ("target", "ratio_target"):
                target = figure.get(key)
                if target is not None and (
                    not isinstance(target, dict) or target.get("op") not in (">=", "<=")
                    or not isinstance(target.get("threshold"), int | float)
                ):
                    problems.append(f"{fwhere}.{key} must be null or {{op, threshold}}")
            sp = figure.get("spread")
            if sp is not None and (not isinstance(sp, dict) or not all(
                    isinstance(sp.get(k), int | float) for k in ("n", "min", "q1", "median", "q3", "max"))):
                problems.append(f"{fwhere}.spread must be null or {{n, min, q1, median, q3, max}}")
            elif sp is not None and not sp["min"] <= sp["median"] <= sp["max"]:
                problems.append(f"{fwhere}.spread is not ordered (min <= median <= max)")
    json.dumps(doc)  # raises if anything is not serialisable
    return problems
