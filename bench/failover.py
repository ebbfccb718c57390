"""Failover figures, from the failover drill (``ops/drill``), through one function it exposes.

Contract (what the drill provides, what the bench calls)::

    # ops/drill/__init__.py (or anything ops.drill imports at top level)
    def bench_figures(*, quick: bool, amqp_url: str, redis_url: str, run_dir: pathlib.Path) -> Mapping[str, float]

It runs the drill's "kill -9 one of two nodes" scenario (1,000 agents under 100 events/s; fewer
when ``quick``) on the real local cluster, against the given RabbitMQ/Redis, and returns plain
numbers. Keys the bench knows get their target (issue 6); any other key is printed as information:

``reconnected_within_5s_fraction``  share of the dropped agents ready again within 5 s of their first retry
                                   (0..1; target >= 0.99)
``snapshot_correct_fraction``       share of reconnected agents whose snapshot matched the truth (target 1.0)
``calls_lost``                      calls missing or unfinished at some agent (target 0)
``reconnect_p99_seconds``           p99 of first retry -> ready (no target; for trends)
``agents``                          agents the drill ran with (no target)

When ``ops.drill`` cannot be imported or has no ``bench_figures``, the stage says so ("not measured").
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping

from bench.context import Context
from bench.report import Figure, StageResult, Target

KNOWN: dict[str, tuple[str, str, Target | None]] = {
    "reconnected_within_5s_fraction": ("agents reconnected within 5 s of first retry", "fraction",
                                       Target(">=", 0.99)),
    "snapshot_correct_fraction": ("reconnected agents with a correct snapshot", "fraction", Target(">=", 1.0)),
    "calls_lost": ("calls lost", "calls", Target("<=", 0)),
    "reconnect_p99_seconds": ("reconnect p99 (first retry -> ready)", "s", None),
    "agents": ("agents in the drill", "agents", None),
}


def figures_from_drill(values: Mapping[str, float]) -> list[Figure]:
    """The drill's numbers as figures: known keys with their targets, first; the rest as information."""
    figures = []
    for key, (label, unit, target) in KNOWN.items():
        if key in values:
            figures.append(Figure(label, float(values[key]), unit, target=target))
        elif target is not None:
            figures.append(Figure(label, None, unit, target=target, note=f"the drill did not report {key!r}"))
    for key in sorted(set(values) - set(KNOWN)):
        figures.append(Figure(key, float(values[key]), ""))
    return figures


def stage_failover(ctx: Context) -> StageResult:
    try:
        drill = importlib.import_module("ops.drill")
    except ImportError as exc:
        return StageResult("failover", "not run", f"not measured: ops.drill is not importable ({exc})")
    hook = getattr(drill, "bench_figures", None)
    if not callable(hook):
        return StageResult("failover", "not run",
                           "not measured: ops.drill has no bench_figures() hook yet (see bench/failover.py)")
    values = hook(quick=ctx.quick, amqp_url=ctx.amqp_url, redis_url=ctx.redis_url, run_dir=ctx.run_dir / "drill")
    result = StageResult("failover")
    result.figures = figures_from_drill(values)
    result.details = {"source": "ops.drill.bench_figures", "raw": dict(values)}
    return result
