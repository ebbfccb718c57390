"""``python -m bench.compare A.json B.json``: do two bench runs agree on their verdicts?

Issue 15 started from two runs on one day that disagreed (16/17 and 14/17 targets met). This lines up
every judged figure of two results files and says, per figure, the median of each run, both verdicts,
whether the verdict flipped, and whether the two runs' spreads (min-max of their repeats) overlap: a
verdict that flips while the spreads overlap is noise around the threshold; one that flips with disjoint
spreads means something changed between the runs.

Exit status: 0 when both files are valid (whatever they say), 2 when one is not.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.report import format_value, validate_document

__all__ = ["Comparison", "compare_documents", "render_comparison"]


@dataclass(frozen=True)
class Comparison:
    stage: str
    figure: str
    unit: str
    value_a: float | None
    value_b: float | None
    verdict_a: str
    verdict_b: str
    overlap: bool | None  # None when a run has no spread (one repeat)

    @property
    def flipped(self) -> bool:
        judged = {"PASS", "FAIL"}
        return self.verdict_a in judged and self.verdict_b in judged and self.verdict_a != self.verdict_b


def _range(figure: Mapping[str, Any]) -> tuple[float, float] | None:
    spread = figure.get("spread")
    if isinstance(spread, dict):
        return float(spread["min"]), float(spread["max"])
    return None


def compare_documents(a: Mapping[str, Any], b: Mapping[str, Any]) -> list[Comparison]:
    """Every figure with a verdict in either run, in run A's order (then figures only B has)."""

    def judged(doc: Mapping[str, Any]) -> dict[tuple[str, str], Mapping[str, Any]]:
        out: dict[tuple[str, str], Mapping[str, Any]] = {}
        for stage in doc["stages"]:
            for figure in stage["figures"]:
                if figure.get("verdict"):
                    out[(stage["name"], figure["name"])] = figure
        return out

    first, second = judged(a), judged(b)
    keys = list(first) + [k for k in second if k not in first]
    comparisons = []
    for key in keys:
        fa, fb = first.get(key), second.get(key)
        range_a, range_b = (_range(fa) if fa else None), (_range(fb) if fb else None)
        overlap = None
        if range_a is not None and range_b is not None:
            overlap = range_a[0] <= range_b[1] and range_b[0] <= range_a[1]
        comparisons.append(Comparison(
            key[0], key[1], str((fa or fb or {}).get("unit", "")),
            fa.get("value") if fa else None, fb.get("value") if fb else None,
            str(fa.get("verdict", "")) if fa else "absent", str(fb.get("verdict", "")) if fb else "absent",
            overlap,
        ))
    return comparisons


def render_comparison(comparisons: Sequence[Comparison]) -> str:
    header = ("stage", "figure", "run A", "run B", "verdicts", "spreads")
    rows = []
    for c in comparisons:
        verdicts = f"{c.verdict_a} -> {c.verdict_b}" + ("  FLIPPED" if c.flipped else "")
        spreads = "-" if c.overlap is None else ("overlap" if c.overlap else "disjoint")
        rows.append((c.stage, c.figure[:60], format_value(c.value_a, c.unit), format_value(c.value_b, c.unit),
                     verdicts, spreads))
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows]
    flipped = [c for c in comparisons if c.flipped]
    noise = [c for c in flipped if c.overlap]
    lines.append("")
    lines.append(f"{len(comparisons)} judged figures, {len(flipped)} verdicts flipped"
                 + (f" ({len(noise)} of them with overlapping spreads: noise around the threshold)" if flipped
                    else ""))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.compare", description=__doc__.split("\n\n")[0])
    parser.add_argument("a", type=Path)
    parser.add_argument("b", type=Path)
    args = parser.parse_args(argv)
    docs = []
    for path in (args.a, args.b):
        try:
            doc = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            print(f"{path}: {exc}", file=sys.stderr)
            return 2
        problems = validate_document(doc)
        if problems:
            print(f"{path}: not a bench results file: {problems[0]}", file=sys.stderr)
            return 2
        docs.append(doc)
    print(render_comparison(compare_documents(docs[0], docs[1])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
