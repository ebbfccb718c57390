"""Reconnect storm: every agent of a killed node comes back, with a correct snapshot, within 10 s.

Runs the failover drill (``ops.drill``: simulated Creatio panels through HAProxy, calls from the
simulator, ground truth from its ``/calls``) with as many agents as this machine's descriptor limit
allows, kills node1 with SIGKILL under call traffic, and judges the agents that node held: time from
the drop to ready again (Creatio's panel waits 5 s before its first retry, so 10 s from the drop is
5 s of reconnecting), whether each snapshot matched the simulator's truth, and calls lost.
"""

from __future__ import annotations

import importlib
import math

from bench.agents import raise_fd_limit
from bench.context import Context
from bench.report import Figure, StageResult, Target
from bench.stats import exact_quantile

STORM_TARGET_AGENTS = 10_000
BACK_WITHIN = 10.0


def storm_agents(quick: bool, fd_hard_limit: int) -> int:
    """Agents the drill can run with here: HAProxy needs two descriptors per agent and the drill one,
    each under the same hard limit; keep 1,000 spare. Issue 15 asks 10,000 on the killed node, i.e.
    20,000 over two nodes."""
    if quick:
        return 200
    return max(200, min(2 * STORM_TARGET_AGENTS, (fd_hard_limit - 1000) // 2))


def storm_figures(outages: list[float], reconnects: list[float], bad_snapshots: int, lost: int,
                  never_back: int, agents: int) -> list[Figure]:
    """The verdict figures from what the drill saw (outages: drop -> ready, seconds)."""
    affected = len(outages) + never_back
    within = sum(1 for s in outages if s <= BACK_WITHIN)
    share = within / affected if affected else math.nan
    note = "" if affected >= STORM_TARGET_AGENTS else (
        f"{affected:,} agents on the killed node here (target is for {STORM_TARGET_AGENTS:,}: fd limit)")
    return [
        Figure("agents of the killed node back within 10 s of the drop", None if math.isnan(share) else share,
               "fraction", target=Target(">=", 1.0), note=note),
        Figure("reconnected agents with a correct snapshot",
               1.0 - bad_snapshots / len(outages) if outages else None, "fraction", target=Target(">=", 1.0)),
        Figure("calls lost", float(lost), "calls", target=Target("<=", 0)),
        Figure("drop -> ready, p99", exact_quantile(0.99, outages), "s"),
        Figure("drop -> ready, max", max(outages) if outages else None, "s"),
        Figure("first retry -> ready, p99", exact_quantile(0.99, reconnects), "s"),
        Figure("agents in the drill", float(agents), "agents"),
    ]


def stage_storm(ctx: Context) -> StageResult:
    try:
        drill_main = importlib.import_module("ops.drill.__main__")
    except ImportError as exc:
        return StageResult("storm", "not run", f"not measured: ops.drill is not importable ({exc})")
    from local_cluster.launcher import ClusterOptions, LocalCluster

    _soft, hard = raise_fd_limit()
    agents = ctx.storm_agents or storm_agents(ctx.quick, hard)
    ctx.say(f"drill with {agents:,} agents through HAProxy, node1 SIGKILLed under call traffic "
            f"(fd hard limit {hard})")
    options = drill_main.DrillOptions(agents=agents, cps=3.5, duration=ctx.size(40.0, 12.0),
                                      fault="kill", fault_at=ctx.size(15.0, 4.0), reconnect_delay=5.0,
                                      settle_timeout=ctx.size(120.0, 60.0))
    cluster = LocalCluster(ClusterOptions.ephemeral(ctx.run_dir / "storm", amqp_url=ctx.amqp_url,
                                                    redis_url=ctx.redis_url))
    cluster.start(timeout=90)
    try:
        import asyncio

        drill = asyncio.run(drill_main.Drill(options, cluster).run())
    finally:
        cluster.stop()
    result = StageResult("storm")
    result.figures = storm_figures(list(drill.outage_seconds), list(drill.reconnect_seconds),
                                   len(drill.bad_snapshots), drill.lost, len(drill.not_reconnected), agents)
    result.details = {"agents": agents, "fd_hard_limit": hard, "affected": drill.affected,
                      "not_reconnected": drill.not_reconnected[:20], "bad_snapshots": drill.bad_snapshots[:20],
                      "calls_played": drill.calls_played,
                      "how": "ops.drill.Drill: websockets clients in one process through HAProxy, Creatio's 5 s "
                             "first-retry delay, node1 SIGKILLed; truth from the simulator"}
    return result
