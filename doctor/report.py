"""The checklist: one result per check, printed with the fix for every failure.

A check ends PASS, WARN (works, but something the admin should know), FAIL (the cluster will not
work as configured: the exit code is non-zero) or SKIP (not configured, or an earlier check it
depends on failed).
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass


class Status(enum.Enum):
    PASS = "ok"
    WARN = "warn"
    FAIL = "FAIL"
    SKIP = "skip"


@dataclass(frozen=True, slots=True)
class Result:
    """What one check found. ``fix`` says what to change when the status is FAIL or WARN."""

    name: str
    status: Status
    detail: str = ""
    fix: str = ""


def passed(name: str, detail: str = "") -> Result:
    return Result(name, Status.PASS, detail)


def failed(name: str, detail: str, fix: str) -> Result:
    return Result(name, Status.FAIL, detail, fix)


def warned(name: str, detail: str, fix: str = "") -> Result:
    return Result(name, Status.WARN, detail, fix)


def skipped(name: str, detail: str) -> Result:
    return Result(name, Status.SKIP, detail)


_MARK = {Status.PASS: "[ ok ]", Status.WARN: "[warn]", Status.FAIL: "[FAIL]", Status.SKIP: "[skip]"}


def render_result(result: Result) -> str:
    """One check: its line, and the fix indented under a failure or a warning."""
    line = f"{_MARK[result.status]} {result.name}"
    if result.detail:
        line += f": {result.detail}"
    lines = [line]
    if result.fix and result.status in (Status.FAIL, Status.WARN):
        lines.extend(f"       fix: {part}" if i == 0 else f"            {part}"
                     for i, part in enumerate(result.fix.splitlines()))
    return "\n".join(lines) + "\n"


def summary(results: Iterable[Result]) -> str:
    counts = dict.fromkeys(Status, 0)
    for result in results:
        counts[result.status] += 1
    verdict = "NOT READY" if counts[Status.FAIL] else "ready"
    return (f"{verdict}: {counts[Status.PASS]} ok, {counts[Status.WARN]} warnings, {counts[Status.FAIL]} failed, "
            f"{counts[Status.SKIP]} skipped\n")


def render(results: Iterable[Result]) -> str:
    """The checklist as text, with the summary line last."""
    items = list(results)
    return "".join(render_result(r) for r in items) + "\n" + summary(items)


def exit_code(results: Iterable[Result]) -> int:
    """1 when any check failed, else 0 (warnings do not fail the run)."""
    return 1 if any(r.status is Status.FAIL for r in results) else 0
