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
import os
import threading
import time
from dataclasses import dataclass, field

import psutil

from bench.agents import raise_fd_limit
from bench.context import Context
from bench.report import Figure, StageResult, Target
from bench.stats import exact_quantile

STORM_TARGET_AGENTS = 10_000
BACK_WITHIN = 10.0
AFTER_KILL = 12.0  # seconds after the kill over which the processes' CPU is reported


@dataclass
class CpuSampler:
    """CPU seconds of some processes every 0.25 s, and when the first of ``watch_death`` disappeared: which
    process was busy during the storm (the survivor node, HAProxy, or the drill's own client)."""

    pids: dict[str, int]
    watch_death: str
    samples: list[tuple[float, dict[str, float]]] = field(default_factory=list)
    died_at: float | None = None
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> CpuSampler:
        self._thread = threading.Thread(target=self._run, name="bench-storm-cpu", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)

    def _run(self) -> None:
        processes = {}
        for name, pid in self.pids.items():
            try:
                processes[name] = psutil.Process(pid)
            except psutil.Error:
                continue
        while not self._stop.is_set():
            now = time.monotonic()
            row: dict[str, float] = {}
            for name, process in processes.items():
                try:
                    times = process.cpu_times()
                    row[name] = float(times.user + times.system)
                except psutil.Error:
                    if name == self.watch_death and self.died_at is None:
                        self.died_at = now
            self.samples.append((now, row))
            self._stop.wait(0.25)


def cores_after(samples: list[tuple[float, dict[str, float]]], start: float, seconds: float) -> dict[str, float]:
    """Average cores each process used from ``start`` to ``start + seconds`` (from the nearest samples)."""
    inside = [(t, row) for t, row in samples if start <= t <= start + seconds]
    if len(inside) < 2:
        return {}
    (t0, first), (t1, last) = inside[0], inside[-1]
    if t1 <= t0:
        return {}
    return {name: (last[name] - first[name]) / (t1 - t0) for name in last if name in first}


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
    pids = {c.name: int(c.process.pid) for c in cluster.children if c.alive()}
    pids["drill client (bench process)"] = os.getpid()
    sampler = CpuSampler({k: v for k, v in pids.items() if k != "simulator"}, watch_death="node1").start()
    try:
        import asyncio

        drill = asyncio.run(drill_main.Drill(options, cluster).run())
    finally:
        sampler.stop()
        cluster.stop()
    result = StageResult("storm")
    result.figures = storm_figures(list(drill.outage_seconds), list(drill.reconnect_seconds),
                                   len(drill.bad_snapshots), drill.lost, len(drill.not_reconnected), agents)
    busy = cores_after(sampler.samples, sampler.died_at, AFTER_KILL) if sampler.died_at is not None else {}
    for name in ("node2", "haproxy", "gateway", "drill client (bench process)"):
        result.add(Figure(f"{name}: cores used in the {AFTER_KILL:.0f} s after the kill", busy.get(name), "cores",
                          note="" if name in busy else "not sampled"))
    result.details = {"agents": agents, "fd_hard_limit": hard, "affected": drill.affected, "cores_after_kill": busy,
                      "not_reconnected": drill.not_reconnected[:20], "bad_snapshots": drill.bad_snapshots[:20],
                      "calls_played": drill.calls_played,
                      "how": "ops.drill.Drill: websockets clients in one process through HAProxy, Creatio's 5 s "
                             "first-retry delay, node1 SIGKILLed; truth from the simulator"}
    return result
