"""The whole pipeline under AMI traffic: end to end latency (repeated), the burst sweep, the soak.

All three run the local cluster (simulator, gateway, 2 nodes, HAProxy) with 2,000 raw-WebSocket agents
through HAProxy, drive calls with ``POST /play`` at a chosen AMI event rate, and measure windows: the
nodes' ``cms_end_to_end_latency_seconds`` buckets scraped before and after and diffed, the gateway's
counters, and, inside the gateway and the nodes, GC pauses and event-loop lag (:mod:`bench.pauses`),
printed next to the tail latencies they may explain.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from bench import pauses
from bench.agents import Swarm, raise_fd_limit
from bench.ami_load import mean_events_per_call
from bench.baselines import bare_broker_latency
from bench.context import Context
from bench.probe import CpuWindow, scrape_counter, scrape_histogram
from bench.report import Figure, StageResult, Target
from bench.side_probes import SideProbes
from bench.stages_gateway import _PlayDriver, agent_lines
from bench.stages_nodes import E2E_HISTOGRAM, _node_verdicts
from bench.stats import (
    PauseSummary,
    SweepStep,
    bucket_quantile,
    capacity_within,
    diff_buckets,
    exact_quantile,
    find_knee,
    median,
    rss_drift,
    segment_drifts,
    summarize_pauses,
)

GATEWAY_PUBLISH_HISTOGRAM = "cms_call_event_publish_latency_seconds"
REDIS_WRITE_HISTOGRAM = "cms_outbox_redis_write_seconds"
OUTBOX_WAIT_HISTOGRAM = "cms_call_event_outbox_wait_seconds"
NODE_ARRIVAL_HISTOGRAM = "cms_node_event_arrival_latency_seconds"

# Issue 15's end to end targets at 500 AMI events/s with 2,000 agents.
E2E_TARGETS = ((0.5, 0.002), (0.99, 0.005), (0.999, 0.015))
BURST_RATE = 5_000.0
BURST_P99 = 0.025
SOAK_RATE = 200.0
SOAK_FLAT = 0.05
LONG_SOAK_SECONDS = 3600.0
LOAD_GENERATORS = frozenset({"simulator"})
LOAD_DRIVERS = frozenset({"simulator", "agents", "bench driver"})

# What "dropped" adds up: events the outbox let go, frames a node did not send, clients dropped as stuck.
DROP_COUNTERS = (("gateway", "cms_call_events_dropped_total"), ("nodes", "cms_node_frames_dropped_total"),
                 ("nodes", "cms_node_slow_client_disconnects_total"))


@dataclass
class Pipeline:
    cluster: Any
    swarm: Swarm
    driver: _PlayDriver
    pause_dir: Path
    agents: int
    connected: int

    @property
    def gateway_port(self) -> int:
        return int(self.cluster.options.gateway_metrics_port)

    @property
    def node_ports(self) -> list[int]:
        return list(self.cluster.node_ports)

    def pids(self) -> dict[str, int]:
        """Every process of the cluster by child name (gateway, node1.., simulator, haproxy)."""
        return {c.name: int(c.process.pid) for c in self.cluster.children if c.alive()}

    def set_ami_rate(self, events_per_second: float) -> None:
        self.driver.set_rate(events_per_second / mean_events_per_call())


@contextlib.contextmanager
def pipeline(ctx: Context, agents: int, ami_rate: float) -> Iterator[Pipeline]:
    """The cluster with pause recording in every Python child, ``agents`` connected through HAProxy and
    calls driven at ``ami_rate`` AMI events/s (the driver runs until the block ends)."""
    from local_cluster.launcher import ClusterOptions, LocalCluster

    raise_fd_limit()
    options = ClusterOptions.ephemeral(ctx.run_dir / "cluster", amqp_url=ctx.amqp_url, redis_url=ctx.redis_url,
                                       nodes=2)
    pause_dir = ctx.run_dir / "pauses" / options.prefix
    options.extra_env = pauses.child_env(pause_dir)
    cluster = LocalCluster(options)
    cluster.start(timeout=60)
    try:
        with Swarm(2) as swarm:
            lines = agent_lines(agents)
            ctx.say(f"connecting {agents:,} agents through HAProxy (raw WebSocket)")
            connected = swarm.connect("127.0.0.1", options.haproxy_port, lines, concurrency=64)
            driver = _PlayDriver(options.simulator_control_port, ami_rate / mean_events_per_call(), lines)
            driver.start()
            try:
                yield Pipeline(cluster, swarm, driver, pause_dir, agents, connected.ok)
            finally:
                driver.stop()
    finally:
        cluster.stop()


def calibrate(ctx: Context, pipe: Pipeline, ami_rate: float, seconds: float) -> float:
    """Calls last 2-15 s, so the event rate ramps up; correct the call rate to what the gateway read.
    Returns the AMI events/s measured in the second half."""
    pipe.set_ami_rate(ami_rate)
    time.sleep(seconds / 2)
    before = scrape_counter([pipe.gateway_port], "cms_ami_events_received_total")
    time.sleep(seconds / 2)
    measured = (scrape_counter([pipe.gateway_port], "cms_ami_events_received_total") - before) / (seconds / 2)
    # Shorter than about one call, the read rate is still ramping: correcting on it would double the offer.
    if measured > 0 and seconds >= 8:
        pipe.driver.set_rate(pipe.driver.rate * min(2.0, max(0.5, ami_rate / measured)))
    return measured


@dataclass
class Window:
    """One measured window of the pipeline."""

    seconds: float
    ami_rate: float
    line_event_rate: float
    frames_rate: float
    observed: dict[float, float]
    dropped: float
    verdicts: dict[str, float]
    cpu: dict[str, float]
    process_pauses: dict[str, pauses.WindowPauses]
    starved: int
    play_failures: int
    redis_probe: PauseSummary
    broker_probe: PauseSummary
    #: cores used by every process of the box over the window: the cluster's, the load generators' (simulator,
    #: agents, this process's driver), and "machine" (all of them plus the engines and anything else running)
    cores: dict[str, float] = field(default_factory=dict)
    #: inside the gateway: AMI bytes read -> broker confirm, and the Redis write each batch waits for
    gateway_publish: dict[float, float] = field(default_factory=dict)
    redis_write: dict[float, float] = field(default_factory=dict)
    #: the way an event goes, cut in three: AMI read -> handed to the broker (gateway), -> taken by a node's event
    #: task (broker), -> frame written (the nodes' end to end, ``observed``)
    outbox_wait: dict[float, float] = field(default_factory=dict)
    node_arrival: dict[float, float] = field(default_factory=dict)

    def quantile(self, q: float) -> float | None:
        found = bucket_quantile(q, self.observed)
        return None if found is None else found.value

    def above_range(self, q: float) -> bool:
        found = bucket_quantile(q, self.observed)
        return found is not None and found.above_range


def _drops(pipe: Pipeline) -> float:
    total = 0.0
    for where, name in DROP_COUNTERS:
        ports = [pipe.gateway_port] if where == "gateway" else pipe.node_ports
        total += scrape_counter(ports, name)
    return total


def measure(ctx: Context, pipe: Pipeline, seconds: float, profile_as: str = "") -> Window:
    gw, nodes = pipe.gateway_port, pipe.node_ports
    pids = pipe.pids()
    watched = {name: pid for name, pid in pids.items() if name == "gateway" or name.startswith("node")}
    before = scrape_histogram(nodes, E2E_HISTOGRAM)
    publish_before = scrape_histogram([gw], GATEWAY_PUBLISH_HISTOGRAM)
    redis_before = scrape_histogram([gw], REDIS_WRITE_HISTOGRAM)
    wait_before = scrape_histogram([gw], OUTBOX_WAIT_HISTOGRAM)
    arrival_before = scrape_histogram(nodes, NODE_ARRIVAL_HISTOGRAM)
    ami_before = scrape_counter([gw], "cms_ami_events_received_total")
    published_before = scrape_counter([gw], "cms_call_events_published_total")
    frames_before = scrape_counter(nodes, "cms_node_frames_sent_total")
    dropped_before = _drops(pipe)
    verdicts_before = _node_verdicts(nodes)
    starved_before, failures_before = pipe.driver.starved, pipe.driver.failures
    pauses_before = pauses.read_all(pipe.pause_dir)
    started_wall = time.time()
    window = CpuWindow.of(watched.values()).start()
    everyone = {**{name: pid for name, pid in pids.items() if name not in watched},
                **{f"agents{i + 1}": pid for i, pid in enumerate(pipe.swarm.pids)},
                "bench driver": os.getpid()}
    others = CpuWindow.of(everyone.values()).start()
    machine_before = psutil.cpu_times()
    if ctx.profiler is not None and profile_as:
        ctx.profiler.attach(f"{profile_as}-gateway", watched["gateway"], seconds)
        ctx.profiler.attach(f"{profile_as}-node1", watched["node1"], seconds)
    with SideProbes(ctx.amqp_url, ctx.redis_url) as side:
        time.sleep(seconds)
        window.stop()
        others.stop()
        machine_after = psutil.cpu_times()
        ended_wall = time.time()
    redis_rtts, broker_hops = side.within(started_wall, ended_wall)
    time.sleep(pauses.WRITE_INTERVAL * 2)  # the probes' next write covers the window's end
    wall = window.wall
    cores = {name: cpu / wall for name, cpu in zip(watched, window.cpu, strict=True)}
    cores |= {name: cpu / others.wall for name, cpu in zip(everyone, others.cpu, strict=True)}
    idle = (machine_after.idle + getattr(machine_after, "iowait", 0.0)) - (
        machine_before.idle + getattr(machine_before, "iowait", 0.0))
    cores["machine"] = max(0.0, (psutil.cpu_count() or 1) - idle / wall)
    return Window(
        seconds=wall,
        ami_rate=(scrape_counter([gw], "cms_ami_events_received_total") - ami_before) / wall,
        line_event_rate=(scrape_counter([gw], "cms_call_events_published_total") - published_before) / wall,
        frames_rate=(scrape_counter(nodes, "cms_node_frames_sent_total") - frames_before) / wall,
        observed=diff_buckets(scrape_histogram(nodes, E2E_HISTOGRAM), before),
        dropped=_drops(pipe) - dropped_before,
        verdicts={k: v - verdicts_before.get(k, 0.0) for k, v in _node_verdicts(nodes).items()},
        cpu=dict(zip(watched, window.cpu, strict=True)),
        process_pauses=pauses.window(pauses_before, pauses.read_all(pipe.pause_dir), started_wall, ended_wall),
        starved=pipe.driver.starved - starved_before,
        play_failures=pipe.driver.failures - failures_before,
        redis_probe=summarize_pauses(redis_rtts),
        broker_probe=summarize_pauses(broker_hops),
        gateway_publish=_diff_or_empty(scrape_histogram([gw], GATEWAY_PUBLISH_HISTOGRAM), publish_before),
        redis_write=_diff_or_empty(scrape_histogram([gw], REDIS_WRITE_HISTOGRAM), redis_before),
        outbox_wait=_diff_or_empty(scrape_histogram([gw], OUTBOX_WAIT_HISTOGRAM), wait_before),
        node_arrival=_diff_or_empty(scrape_histogram(nodes, NODE_ARRIVAL_HISTOGRAM), arrival_before),
        cores=cores,
    )


def _diff_or_empty(after: dict[float, float], before: dict[float, float]) -> dict[float, float]:
    """What a gateway histogram observed in the window; empty when the gateway does not export it."""
    return diff_buckets(after, before) if after else {}


def stage_figures(windows: list[Window]) -> list[Figure]:
    """Where an event's time goes (median over windows): in the gateway until it is handed to the broker, until a
    node's event task takes it, until the broker confirmed it to the gateway, and the Redis write beside it."""
    figures: list[Figure] = []
    for attribute, label in (("outbox_wait", "gateway: AMI read -> handed to the broker"),
                             ("node_arrival", "node: AMI read -> taken by the node's event task"),
                             ("gateway_publish", "gateway: AMI read -> broker confirm"),
                             ("redis_write", "gateway: Redis write beside the publish (per write)")):
        for q in (0.5, 0.99):
            values = [found.value for w in windows
                      if (found := bucket_quantile(q, getattr(w, attribute))) is not None]
            figures.append(Figure(f"{label} p{q * 100:g}", median(values), "s", samples=values,
                                  note="" if values else "not exported by this gateway"))
    return figures


def _bare_hop(ctx: Context, rate: float, seconds: float) -> list[float]:
    return asyncio.run(bare_broker_latency(ctx.amqp_url, b"x" * 700, max(rate, 10.0), seconds))


def pause_figures(windows: list[Window]) -> list[Figure]:
    """GC pauses and loop lag of the gateway and the nodes over the windows, as information figures
    (median over windows, every window in the samples): what the tail latencies can be laid at."""
    figures: list[Figure] = []
    for role, label in (("gateway", "gateway"), ("node", "nodes")):
        pairs = [(w.process_pauses[role], w) for w in windows if role in w.process_pauses]
        seen = [p for p, _ in pairs]
        if not seen:
            figures.append(Figure(f"{label}: GC pause max", None, "s",
                                  note="no pause records (bench/_site not loaded in the child)"))
            continue
        gc_max = [p.gc.maximum for p in seen]
        lag_max = [p.lag.maximum for p in seen]
        lag_over = [float(p.lag.over) for p in seen]
        gc_share = [p.gc_seconds / w.seconds / max(1, p.processes) for p, w in pairs]
        figures.append(Figure(f"{label}: GC pause max", median(gc_max), "s", samples=gc_max,
                              note=f"{median([float(p.gc_count) for p in seen]):.0f} GCs/window; "
                                   f"< {pauses.RECORD_GC_FROM * 1e6:.0f} us not itemised"))
        figures.append(Figure(f"{label}: time in GC (per process)", median(gc_share), "fraction",
                              samples=gc_share))
        figures.append(Figure(f"{label}: event-loop lag max", median(lag_max), "s", samples=lag_max))
        figures.append(Figure(f"{label}: event-loop stalls > 5 ms per window", median(lag_over), "stalls",
                              samples=lag_over))
    for name, label in (("redis_probe", "Redis PING beside the window (every 10 ms)"),
                        ("broker_probe", "broker hop beside the window (20/s)")):
        summaries: list[PauseSummary] = [getattr(w, name) for w in windows]
        worst = [s.maximum for s in summaries if s.count]
        p99 = [s.p99 for s in summaries if s.p99 is not None]
        figures.append(Figure(f"{label}: p99", median(p99), "s", samples=p99,
                              note="" if p99 else "no probe answered"))
        figures.append(Figure(f"{label}: max", median(worst), "s", samples=worst))
    return figures


def latency_figures(windows: list[Window], hops: list[list[float]],
                    targets: tuple[tuple[float, float], ...]) -> list[Figure]:
    figures = []
    for q, threshold in targets:
        values = [w.quantile(q) for w in windows]
        measured = [v for v in values if v is not None]
        base = [b for hop in hops if (b := exact_quantile(q, hop)) is not None]
        notes = []
        if any(w.above_range(q) for w in windows):
            notes.append("beyond the largest bucket in a window: a lower bound")
        if not measured:
            notes.append("no observations")
        figures.append(Figure(f"end to end p{q * 100:g}", median(measured), "s", median(base),
                              Target("<=", threshold), note="; ".join(notes), samples=measured,
                              baseline_samples=base))
    return figures


# ---- e2e -----------------------------------------------------------------------------------------


def stage_e2e(ctx: Context) -> StageResult:
    result = StageResult("e2e")
    agents = ctx.size(2000, 200)
    rate = 500.0
    seconds = ctx.size(30.0, 3.0)
    warmup = ctx.size(10.0, 2.0)
    windows: list[Window] = []
    hops: list[list[float]] = []
    with pipeline(ctx, agents, rate) as pipe:
        ctx.say(f"{rate:.0f} AMI events/s for {ctx.repeats} x {seconds:.0f} s after {warmup:.0f} s of warm-up; "
                "then as many bare broker hops at the same line-event rate")
        calibrate(ctx, pipe, rate, warmup)
        for i in range(ctx.repeats):
            window = measure(ctx, pipe, seconds, profile_as="e2e" if i == 0 else "")
            windows.append(window)
            ctx.say(f"window {i + 1}: {window.ami_rate:.0f} AMI ev/s, p50/p99/p99.9 "
                    + "/".join(f"{(window.quantile(q) or 0) * 1e3:.1f}" for q in (0.5, 0.99, 0.999)) + " ms")
        if ctx.profiler is not None:
            ctx.profiler.collect()
        # The baseline runs once no new calls start (as before repeats existed: calls in flight end meanwhile),
        # so that it measures the broker hop, not the hop competing with the pipeline for the two cores.
        pipe.driver.set_rate(0.0)
        for window in windows:
            hops.append(_bare_hop(ctx, window.line_event_rate, min(seconds, 10.0)))
            ctx.say(f"bare hop at {window.line_event_rate:.0f}/s: p50/p99/p99.9 "
                    + "/".join(f"{(exact_quantile(q, hops[-1]) or 0) * 1e3:.1f}" for q in (0.5, 0.99, 0.999))
                    + " ms")
        connected = pipe.connected
    ami = [w.ami_rate for w in windows]
    result.add(Figure("AMI events/s sustained by the gateway", median(ami), "ev/s", note=f"offered {rate:.0f}",
                      samples=ami))
    result.figures.extend(latency_figures(windows, hops, E2E_TARGETS))
    result.figures.extend(stage_figures(windows))
    result.figures.extend(pause_figures(windows))
    dropped = sum(w.dropped for w in windows)
    result.add(Figure("events/frames dropped", dropped, "", target=Target("<=", 0)))
    gw_cpu = [w.cpu["gateway"] / (w.ami_rate * w.seconds) * 1e6 for w in windows if w.ami_rate]
    result.add(Figure("gateway CPU per AMI event (whole process)", median(gw_cpu), "us", samples=gw_cpu))
    node_cpu = [sum(c for n, c in w.cpu.items() if n.startswith("node")) / (w.frames_rate * w.seconds) * 1e6
                for w in windows if w.frames_rate]
    result.add(Figure("node CPU per frame at this load (idle work included)", median(node_cpu), "us",
                      samples=node_cpu))
    result.details = {
        "agents": agents, "agents_connected": connected,
        "windows": [_window_details(w) for w in windows],
        "baseline": "one RabbitMQ hop (aio-pika publish with confirms -> consumer callback) at each window's "
                    "line-event rate, exact quantiles, measured after the windows once no new calls start",
        "transports": "raw WebSocket only (the bench client does not speak SignalR)",
    }
    return result


def _window_details(w: Window) -> dict[str, Any]:
    return {
        "seconds": w.seconds, "ami_rate": w.ami_rate, "line_event_rate": w.line_event_rate,
        "frames_rate": w.frames_rate, "observations": w.observed.get(float("inf"), 0.0),
        "p50": w.quantile(0.5), "p99": w.quantile(0.99), "p999": w.quantile(0.999), "dropped": w.dropped,
        "node_line_event_verdicts": w.verdicts, "cpu_seconds": w.cpu, "driver_starved": w.starved,
        "play_failures": w.play_failures, "cores": w.cores,
        "side_probes": {"redis_ping": {"count": w.redis_probe.count, "p99": w.redis_probe.p99,
                                       "max": w.redis_probe.maximum, "over_5ms": w.redis_probe.over},
                        "broker_hop": {"count": w.broker_probe.count, "p99": w.broker_probe.p99,
                                       "max": w.broker_probe.maximum, "over_5ms": w.broker_probe.over}},
        "pauses": {role: {"gc_count": p.gc_count, "gc_seconds": p.gc_seconds, "gc_max": p.gc.maximum,
                          "gc_over_5ms": p.gc.over, "lag_max": p.lag.maximum, "lag_p99_of_stalls": p.lag.p99,
                          "lag_over_5ms": p.lag.over} for role, p in w.process_pauses.items()},
    }


# ---- burst: step the rate up, find the knee --------------------------------------------------------


def sweep_rates(quick: bool) -> list[float]:
    return [250.0, 500.0, 1000.0] if quick else [500.0, 1000.0, 2000.0, 3000.0, 4000.0, 5000.0, 6000.0]


def stage_burst(ctx: Context) -> StageResult:
    result = StageResult("burst")
    agents = ctx.size(2000, 200)
    rates = sweep_rates(ctx.quick)
    # Calls last 2-15 s and spread their events over that time: a step reaches its rate only after
    # about one call length, so each step settles that long before its window.
    settle = ctx.size(8.0, 2.0)
    seconds = ctx.size(10.0, 2.0)
    sweeps: list[list[tuple[SweepStep, Window]]] = []
    hop_at_target: list[float] = []
    with pipeline(ctx, agents, rates[0]) as pipe:
        calibrate(ctx, pipe, rates[0], ctx.size(12.0, 2.0))
        # A quick run's calibration is shorter than one call: its correction would be noise.
        correction = 1.0 if ctx.quick else pipe.driver.rate / (rates[0] / mean_events_per_call())
        for i in range(ctx.repeats):
            ctx.say(f"sweep {i + 1}: " + ", ".join(f"{r:.0f}" for r in rates) + " AMI events/s, "
                    f"{settle:.0f} s settle + {seconds:.0f} s window each")
            steps: list[tuple[SweepStep, Window]] = []
            for rate in rates:
                pipe.set_ami_rate(rate * correction)
                time.sleep(settle)
                window = measure(ctx, pipe, seconds)
                step = SweepStep(rate, window.ami_rate, window.quantile(0.99), window.dropped)
                steps.append((step, window))
                ctx.say(f"  {rate:.0f}/s offered: {window.ami_rate:.0f} read, p99 "
                        f"{(step.p99 or 0) * 1e3:.1f} ms, dropped {window.dropped:.0f}, driver starved "
                        f"{window.starved}")
                if step.p99 is None or step.p99 > 0.5 or window.ami_rate < 0.5 * rate:
                    break  # far past the knee: higher steps only load the machine
            sweeps.append(steps)
            pipe.set_ami_rate(rates[0] * correction)
            time.sleep(settle)
        top = max(w.line_event_rate for steps in sweeps for _, w in steps)
        ctx.say(f"baseline: a bare broker hop at the highest line-event rate seen ({top:.0f}/s)")
        hop_at_target = _bare_hop(ctx, top, min(seconds, 10.0))
    # Per offered rate: the median over sweeps; the knee is taken on those medians.
    merged: list[SweepStep] = []
    for rate in rates:
        at = [s for steps in sweeps for s, _ in steps if s.offered == rate]
        if not at:
            continue
        p99s = [s.p99 for s in at if s.p99 is not None]
        merged.append(SweepStep(rate, median([s.sustained for s in at]) or 0.0, median(p99s),
                                median([s.dropped for s in at]) or 0.0))
    knee = find_knee(merged)
    capacity = capacity_within(merged, BURST_P99)
    capacities = [capacity_within([s for s, _ in steps], BURST_P99) or 0.0 for steps in sweeps]
    notes = [] if rates[-1] >= BURST_RATE else [f"quick sweep stops at {rates[-1]:.0f}/s"]
    if merged and capacity is None:
        notes.append(f"not even the {merged[0].offered:.0f}/s step held")
    result.add(Figure("AMI events/s held with p99 <= 25 ms, nothing dropped",
                      (capacity or 0.0) if merged else None, "ev/s", target=Target(">=", BURST_RATE),
                      samples=capacities, note="; ".join(notes)))
    result.add(Figure("knee: last step before latency turned up", None if knee.last_good is None
                      else knee.last_good.sustained, "ev/s", note=knee.reason))
    # Who used the two cores at the step where latency turned up: a saturated machine shows as "machine" near
    # the core count, and the rest says which process took what.
    if knee.first_bad is not None:
        rate = knee.first_bad.offered
        at_knee = [w for steps in sweeps for s, w in steps if s.offered == rate]
        for name in ("machine", "gateway", "node1", "node2", "haproxy", "simulator", "agents", "bench driver"):
            values = [sum(c for n, c in w.cores.items() if n.startswith(name)) for w in at_knee
                      if any(n.startswith(name) for n in w.cores)]
            result.add(Figure(f"cores used at the {rate:,.0f}/s step: {name}", median(values), "cores",
                              samples=values, note="load generator" if name in LOAD_DRIVERS else ""))
    at_target = next((s for s in merged if s.offered == BURST_RATE), None)
    result.add(Figure("end to end p99 at 5,000 AMI events/s", None if at_target is None else at_target.p99, "s",
                      exact_quantile(0.99, hop_at_target), Target("<=", BURST_P99),
                      note="" if at_target is not None else "step not reached"))
    result.details = {
        "agents": agents, "rates": rates, "settle_seconds": settle, "window_seconds": seconds,
        "steps_median": [{"offered": s.offered, "sustained": s.sustained, "p99": s.p99, "dropped": s.dropped}
                         for s in merged],
        "sweeps": [[_window_details(w) | {"offered": s.offered} for s, w in steps] for steps in sweeps],
        "knee": knee.reason,
        "baseline": "bare broker hop p99 at the highest line-event rate the sweep reached",
        "note": "the driver POSTs one call at a time to the simulator from one thread; 'driver_starved' > 0 "
                "means it found no free lines and the offer fell short",
    }
    return result


# ---- soak: RSS of every process over time ---------------------------------------------------------


@dataclass
class RssSeries:
    name: str
    pid: int
    samples: list[tuple[float, float]] = field(default_factory=list)


def stage_soak(ctx: Context) -> StageResult:
    result = StageResult("soak")
    agents = ctx.size(2000, 200)
    duration = ctx.soak_seconds if ctx.soak_seconds is not None else ctx.size(180.0, 20.0)
    warmup = min(60.0, duration * 0.25)
    interval = max(1.0, min(10.0, duration / 120))
    series: dict[str, RssSeries] = {}
    with pipeline(ctx, agents, SOAK_RATE) as pipe:
        calibrate(ctx, pipe, SOAK_RATE, ctx.size(8.0, 2.0))
        for name, pid in pipe.pids().items():
            series[name] = RssSeries(name, pid)
        ctx.say(f"soak: {SOAK_RATE:.0f} AMI events/s, {agents:,} agents, {duration:.0f} s; RSS of "
                f"{', '.join(series)} every {interval:.0f} s (first {warmup:.0f} s are warm-up)")
        started = time.monotonic()

        def sample_rss() -> None:
            now = time.monotonic() - started
            for s in series.values():
                with contextlib.suppress(psutil.Error):
                    s.samples.append((now, float(psutil.Process(s.pid).memory_info().rss)))

        # The whole soak is one measured window; a thread samples RSS meanwhile.
        stop = threading.Event()

        def sampler() -> None:
            while not stop.is_set():
                sample_rss()
                stop.wait(interval)

        thread = threading.Thread(target=sampler, name="bench-rss-sampler", daemon=True)
        thread.start()
        try:
            window = measure(ctx, pipe, duration)
        finally:
            stop.set()
            thread.join(interval + 5)
        sample_rss()
        dead = [name for name, s in series.items() if not psutil.pid_exists(s.pid)]
    drifts = {name: rss_drift(s.samples, warmup=warmup) for name, s in series.items()}
    measured = {name: d for name, d in drifts.items() if d is not None}
    # The simulator is the load generator (its memory follows the calls it plays): shown, not judged.
    judged = {name: d for name, d in measured.items() if name not in LOAD_GENERATORS}
    worst = max(judged.items(), key=lambda kv: abs(kv[1].relative), default=None)
    result.add(Figure("RSS drift, worst cluster process (|end - start| / start after warm-up)",
                      None if worst is None else abs(worst[1].relative), "fraction",
                      target=Target("<=", SOAK_FLAT),
                      note="" if worst is None else f"{worst[0]}: {worst[1].relative * 100:+.1f} %"
                      + ("" if duration >= LONG_SOAK_SECONDS else f"; {duration:.0f} s soak (long mode: 1 h)")))
    # Not a repeat of the soak (that is another run of it), but the same question asked of each third: a leak
    # grows in every third, a one-off step (a cache filling, a burst of reconnects) in one.
    thirds: list[float] = []
    for index in range(3):
        worst_third = [abs(parts[index].relative) for name, series_ in series.items()
                       if name not in LOAD_GENERATORS
                       and len(parts := segment_drifts(series_.samples, warmup=warmup, parts=3)) == 3]
        if worst_third:
            thirds.append(max(worst_third))
    result.add(Figure("RSS drift within each third of the soak, worst cluster process", median(thirds), "fraction",
                      samples=thirds, note="" if len(thirds) == 3 else "too few samples for thirds"))
    for name, drift in sorted(measured.items()):
        trend = f", trend {drift.slope_per_hour * 100:+.1f} %/h" if duration >= 600 else ""
        role = " (load generator, not judged)" if name in LOAD_GENERATORS else ""
        result.add(Figure(f"RSS {name}{role}: start -> end", drift.end / 1024 / 1024, "MB",
                          note=f"from {drift.start / 1024 / 1024:.1f} MB, {drift.relative * 100:+.1f} %{trend}"))
    result.add(Figure("AMI events/s over the soak", window.ami_rate, "ev/s", note=f"offered {SOAK_RATE:.0f}"))
    result.add(Figure("events/frames dropped", window.dropped, "", target=Target("<=", 0)))
    gaps = sum(v for k, v in window.verdicts.items() if "gap" in k and "repairs" not in k)
    result.add(Figure("line events a node saw out of sequence (gaps)", gaps, "", note="repaired from Redis"))
    result.add(Figure("processes that died during the soak", float(len(dead)), "", target=Target("<=", 0),
                      note=", ".join(dead)))
    result.add(Figure("end to end p99 over the soak", window.quantile(0.99), "s"))
    result.figures.extend(pause_figures([window]))
    result.details = {
        "seconds": duration, "warmup_seconds": warmup, "interval_seconds": interval, "agents": agents,
        "rss": {name: {"pid": s.pid, "samples": s.samples} for name, s in series.items()},
        "drift": {name: None if d is None else {"start": d.start, "end": d.end, "relative": d.relative,
                                                "slope_per_hour": d.slope_per_hour}
                  for name, d in drifts.items()},
        "window": _window_details(window),
    }
    return result
