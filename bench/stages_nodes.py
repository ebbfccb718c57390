"""Node-side stages on the real local cluster: end to end latency, fan-out, idle connections, handshakes."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections.abc import Iterator
from typing import Any

from bench.agents import ConnectResult, Swarm, raise_fd_limit
from bench.bare_server import due_count
from bench.baselines import BareServer
from bench.context import Context
from bench.probe import CpuWindow, rss_bytes, scrape, scrape_counter, wait_until
from bench.report import Figure, StageResult, Target
from bench.stages_gateway import agent_lines
from bench.stats import counter_value, median

E2E_HISTOGRAM = "cms_end_to_end_latency_seconds"


@contextlib.contextmanager
def local_cluster(ctx: Context, nodes: int = 2) -> Iterator[Any]:
    from local_cluster.launcher import ClusterOptions, LocalCluster

    options = ClusterOptions.ephemeral(ctx.run_dir / "cluster", amqp_url=ctx.amqp_url, redis_url=ctx.redis_url,
                                       nodes=nodes)
    cluster = LocalCluster(options)
    cluster.start(timeout=60)
    try:
        yield cluster
    finally:
        cluster.stop()


def _pid(cluster: Any, name: str) -> int:
    return int(cluster.child(name).process.pid)


def _node_verdicts(ports: list[int]) -> dict[str, float]:
    """What the nodes' routers said of each line event (deliver, duplicate, gap...), and gap repairs."""
    from bench.stats import parse_samples

    out: dict[str, float] = {}
    for port in ports:
        for sample in parse_samples(scrape(port)):
            if sample.name in ("cms_node_line_events_total", "cms_node_gap_repairs_total"):
                key = f"{sample.name}:{sample.label('verdict') or sample.label('outcome')}"
                out[key] = out.get(key, 0.0) + sample.value
    return out


# ---- 4. fan-out -----------------------------------------------------------------------------------


class _LineEventSource:
    """Ring -> answer -> hang up, over and over, on each of the given lines."""

    def __init__(self, lines: list[str]) -> None:
        self.lines = lines
        self._cycle = itertools.count()

    def next(self) -> Any:
        from services.wire import Call, CallState, Direction, EventType, LineEvent

        n = next(self._cycle)
        line = self.lines[n % len(self.lines)]
        step = (n // len(self.lines)) % 3
        call_no = n // (len(self.lines) * 3)
        kind, state = ((EventType.RING_STARTED, CallState.RINGING), (EventType.COMMUTATION_STARTED,
                       CallState.CONNECTED), (EventType.RING_FINISHED, CallState.FINISHED))[step]
        now = time.time()
        call = Call(id=f"{line}-{call_no}", line=line, linked_id=f"{line}-{call_no}", channel=f"SIP/{line}-0001",
                    direction=Direction.INBOUND, state=state, caller_number="79161234567",
                    caller_name="Ivan Petrov", called_number=line, started_at=now,
                    answered_at=now if step else None, ended_at=now if step == 2 else None)
        return LineEvent(line=line, type=kind, call=call, ami_received_at=now)


async def _publish_paced(ctx: Context, prefix: str, lines: list[str], rate: float, seconds: float,
                         state: dict[str, Any]) -> int:
    """Publish line events at ``rate``/s through the real outbox into the cluster's namespace."""
    import redis.asyncio as aioredis

    from ami_gateway.event_outbox import EventOutbox, EventPublisher, Sequencer
    from services.line_state import LineStateWriter
    from services.topology import Topology

    client = aioredis.from_url(ctx.redis_url)
    publisher = EventPublisher(ctx.amqp_url, Topology(prefix))
    if "epoch" not in state:
        state["epoch"] = await LineStateWriter(client, prefix).new_epoch()
        state["sequencer"] = Sequencer(state["epoch"])
        state["source"] = _LineEventSource(lines)
    outbox = EventOutbox(LineStateWriter(client, prefix), publisher, state["sequencer"])
    task = asyncio.create_task(outbox.run())
    sent = 0
    try:
        started = time.perf_counter()
        while (elapsed := time.perf_counter() - started) < seconds:
            due = due_count(rate, elapsed, sent)
            if due:
                outbox.put([state["source"].next() for _ in range(due)])
                sent += due
            await asyncio.sleep(0.005)
        await outbox.wait_idle(10)
        return sent
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await publisher.close()
        await client.aclose()


def stage_fanout(ctx: Context) -> StageResult:
    result = StageResult("fanout")
    groups = ctx.size(20, 8)
    per_line = ctx.size(100, 50)
    seconds = ctx.size(8.0, 2.0)
    target_frames = 10_000.0
    raise_fd_limit()
    lines = [f"9{i:03d}" for i in range(groups)]
    tabs = [line for line in lines for _ in range(per_line)]
    with local_cluster(ctx, nodes=1) as cluster, Swarm(2) as swarm, BareServer() as bare:
        node_port = cluster.node_ports[0]
        node_pid = _pid(cluster, "node1")
        ctx.say(f"{len(tabs):,} agents ({groups} lines x {per_line} tabs) on the node and on the bare server")
        on_node = swarm.connect("127.0.0.1", node_port, tabs, concurrency=64)
        on_bare = swarm.connect("127.0.0.1", bare.port, tabs, concurrency=64)
        if on_node.ok < len(tabs) or on_bare.ok < len(tabs):
            raise RuntimeError(f"agents did not all connect: node {on_node.ok}, bare {on_bare.ok} of {len(tabs)}; "
                               f"{on_node.errors or on_bare.errors}")
        wait_until(lambda: counter_value(scrape(node_port), "cms_node_lines_bound") >= groups, 20)
        state: dict[str, Any] = {}
        # Calibrate: one event per line (the first of an epoch makes the node resync the line), then a round.
        asyncio.run(_publish_paced(ctx, cluster.prefix, lines, 200.0, groups * 3 / 200.0 + 0.05, state))
        time.sleep(1.0)
        frames_0 = scrape_counter([node_port], "cms_node_frames_sent_total")
        calibration_events = asyncio.run(_publish_paced(ctx, cluster.prefix, lines, 200.0, groups * 3 / 200.0, state))
        time.sleep(1.0)
        frames_per_event = (scrape_counter([node_port], "cms_node_frames_sent_total") - frames_0) / max(
            1, calibration_events) / per_line
        frames_per_event = max(frames_per_event, 1.0)
        sample = swarm.stats()["sample"] or '{"eventType": 5, "content": "{}"}'
        event_rate = target_frames * 1.1 / (per_line * frames_per_event)
        bare_frames = [sample] * max(1, round(frames_per_event))
        system: list[float] = []
        system_cores: list[float] = []
        system_cost: list[float] = []
        base_rate: list[float] = []
        base_cost: list[float] = []
        for i in range(ctx.repeats):
            ctx.say(f"round {i + 1}: {event_rate:.0f} events/s x {per_line} tabs x {frames_per_event:.2f} frames")
            window = CpuWindow.of([node_pid]).start()
            before = scrape_counter([node_port], "cms_node_frames_sent_total")
            if ctx.profiler is not None and i == 0:
                ctx.profiler.attach("fanout-node", node_pid, seconds)
            asyncio.run(_publish_paced(ctx, cluster.prefix, lines, event_rate, seconds, state))
            window.stop()
            frames = scrape_counter([node_port], "cms_node_frames_sent_total") - before
            system.append(frames / window.wall)
            system_cores.append(window.cores)
            system_cost.append(window.total_cpu / frames * 1e6 if frames else float("nan"))
            bare_window = CpuWindow.of([bare.pid]).start()
            # Same frames/s on the same sockets: the node's average frames per event may be fractional.
            bare_rate = event_rate * frames_per_event / len(bare_frames)
            answer = bare.request({"cmd": "broadcast", "rate": bare_rate, "seconds": seconds, "frames": bare_frames})
            bare_window.stop()
            if "frames" not in answer:
                raise RuntimeError(f"bare server: {answer}")
            base_rate.append(answer["frames"] / bare_window.wall)
            base_cost.append(bare_window.total_cpu / answer["frames"] * 1e6 if answer["frames"] else float("nan"))
        if ctx.profiler is not None:
            ctx.profiler.collect()
        client_frames = swarm.stats()["frames"]
    result.add(Figure("frames/s sent by one node", median(system), "fr/s", median(base_rate),
                      Target(">=", target_frames), samples=system, baseline_samples=base_rate,
                      note=f"offered {event_rate * per_line * frames_per_event:,.0f}"))
    result.add(Figure("node cores used at that rate", median(system_cores), "cores", target=Target("<=", 1.0),
                      samples=system_cores))
    cost, base = median(system_cost), median(base_cost)
    result.add(Figure("node CPU per frame", cost, "us", base, samples=system_cost, baseline_samples=base_cost,
                      ratio_target=Target("<=", 1.15)))
    result.add(Figure("frames/s one core could send (1e6 / CPU per frame)", 1e6 / cost if cost else None, "fr/s",
                      1e6 / base if base else None))
    result.details = {"agents": len(tabs), "lines": groups, "tabs_per_line": per_line,
                      "frames_per_event": frames_per_event, "frame_bytes": len(sample.encode()),
                      "frames_received_by_clients": client_frames,
                      "how": "events published through the real EventOutbox into the cluster namespace; agents "
                             "connected straight to the node port (HAProxy is not what is measured)",
                      "baseline": "bench.bare_server: Autobahn on the Twisted asyncio reactor, prepareMessage once "
                                  "per frame, sendPreparedMessage per socket, same sockets, rate and frames"}
    return result


# ---- 5. idle connections ----------------------------------------------------------------------------


def _idle_measure(swarm: Swarm, port: int, pid: int, count: int, window_seconds: float,
                  settle: Any, profile: Any = None) -> dict[str, float]:
    rss_before = rss_bytes(pid)
    connected: ConnectResult = swarm.connect("127.0.0.1", port, agent_lines(count, 20000), concurrency=64,
                                             timeout=30)
    settle()
    time.sleep(2.0)
    rss_after = rss_bytes(pid)
    pings_before = swarm.stats()["pings"]
    if profile is not None:
        profile("idle-node", pid, window_seconds)
    window = CpuWindow.of([pid]).start()
    time.sleep(window_seconds)
    window.stop()
    pings = swarm.stats()["pings"] - pings_before
    swarm.close_all()
    return {"ok": connected.ok, "failed": connected.failed, "rss_before": rss_before, "rss_after": rss_after,
            "cores": window.cores, "pings": pings, "connect_seconds": connected.wall_seconds}


def stage_idle(ctx: Context) -> StageResult:
    result = StageResult("idle")
    count = ctx.size(10_000, 500)
    # The node pings every 30 s: a full window sees each agent's keepalive once.
    window_seconds = ctx.size(32.0, 3.0)
    soft, hard = raise_fd_limit()
    if hard < count + 500:
        return StageResult("idle", "not run", f"fd hard limit {hard} < {count + 500} (ulimit -Hn)")
    ctx.say(f"{count:,} idle agents (one line each) straight to the node (not via HAProxy: 2 fds each there), "
            f"then to bare Autobahn; {ctx.repeats} round(s), a fresh node and bare server each")
    nodes: list[dict[str, float]] = []
    bares: list[dict[str, float]] = []
    for i in range(ctx.repeats):
        # A fresh process each round: a heap that already held 10,000 connections is not a first start's.
        with local_cluster(ctx, nodes=1) as cluster, Swarm(2) as swarm:
            port, pid = cluster.node_ports[0], _pid(cluster, "node1")

            def lines_bound(port: int = port) -> None:
                if not wait_until(lambda: counter_value(scrape(port), "cms_node_lines_bound") >= count, 120, 0.5):
                    result.details["lines_bound_timeout"] = True

            profile = ctx.profiler.attach if ctx.profiler is not None and i == 0 else None
            nodes.append(_idle_measure(swarm, port, pid, count, window_seconds, lines_bound, profile))
            if ctx.profiler is not None and i == 0:
                ctx.profiler.collect()
        with BareServer() as bare, Swarm(2) as swarm:
            bares.append(_idle_measure(swarm, bare.port, bare.pid, count, window_seconds, lambda: None))
        ctx.say(f"round {i + 1}: node {nodes[-1]['rss_after'] / 2**20:.0f} MB, "
                f"bare {bares[-1]['rss_after'] / 2**20:.0f} MB")
    mb = 1024 * 1024
    rss = [n["rss_after"] / mb for n in nodes]
    base_rss = [b["rss_after"] / mb for b in bares]
    per_agent = [(n["rss_after"] - n["rss_before"]) / max(1, n["ok"]) / 1024 for n in nodes]
    base_per_agent = [(b["rss_after"] - b["rss_before"]) / max(1, b["ok"]) / 1024 for b in bares]
    start = [n["rss_before"] / mb for n in nodes]
    base_start = [b["rss_before"] / mb for b in bares]
    cores = [n["cores"] for n in nodes]
    base_cores = [b["cores"] for b in bares]
    result.add(Figure(f"node RSS with {count:,} idle agents", median(rss), "MB", median(base_rss),
                      Target("<=", 165.0), ratio_target=Target("<=", 1.1), samples=rss, baseline_samples=base_rss,
                      note="" if count == 10_000 else f"target is for 10,000; {count:,} here"))
    result.add(Figure("RSS per idle agent", median(per_agent), "KiB", median(base_per_agent), samples=per_agent,
                      baseline_samples=base_per_agent))
    result.add(Figure("RSS before the agents (the process alone)", median(start), "MB", median(base_start),
                      samples=start, baseline_samples=base_start))
    result.add(Figure("keepalive CPU, idle window", median(cores), "cores", median(base_cores), Target("<=", 0.05),
                      samples=cores, baseline_samples=base_cores,
                      note=f"{window_seconds:.0f} s window, {median([n['pings'] for n in nodes]):.0f} pings answered"))
    result.details |= {"node": nodes, "bare": bares, "fd_limit": [soft, hard],
                       "note": "connected straight to the node port; through HAProxy 10,000 agents need 20,000 "
                               "HAProxy fds, the hard limit here"}
    return result


# ---- 6. handshakes ------------------------------------------------------------------------------


def stage_handshake(ctx: Context) -> StageResult:
    result = StageResult("handshake")
    count = ctx.size(3000, 300)
    raise_fd_limit()
    lines = agent_lines(count, 40000)
    rates: list[float] = []
    costs: list[float] = []
    base_rates: list[float] = []
    base_costs: list[float] = []
    failures = 0
    with local_cluster(ctx, nodes=1) as cluster, Swarm(2) as swarm, BareServer() as bare:
        port, pid = cluster.node_ports[0], _pid(cluster, "node1")
        for i in range(ctx.repeats):
            ctx.say(f"round {i + 1}: {count:,} handshakes + LoadLibrary + OpenConnection, node then bare")
            window = CpuWindow.of([pid]).start()
            if ctx.profiler is not None and i == 0:
                ctx.profiler.attach("handshake-node", pid, 5)
            done = swarm.connect("127.0.0.1", port, lines, concurrency=128)
            window.stop()
            failures += done.failed
            rates.append(done.rate)
            costs.append(window.total_cpu / max(1, done.ok) * 1e3)
            swarm.close_all()
            time.sleep(1.0)
            bare_window = CpuWindow.of([bare.pid]).start()
            base = swarm.connect("127.0.0.1", bare.port, lines, concurrency=128)
            bare_window.stop()
            base_rates.append(base.rate)
            base_costs.append(bare_window.total_cpu / max(1, base.ok) * 1e3)
            swarm.close_all()
            time.sleep(1.0)
        if ctx.profiler is not None:
            ctx.profiler.collect()
    result.add(Figure("agent connections/s (handshake + LoadLibrary + OpenConnection)", median(rates), "conn/s",
                      median(base_rates), Target(">=", 1_500), samples=rates, baseline_samples=base_rates))
    cost, base_cost = median(costs), median(base_costs)
    result.add(Figure("node CPU per connection", cost, "ms", base_cost, samples=costs, baseline_samples=base_costs))
    result.add(Figure("connections/s one core could accept (1000 / CPU ms)", 1e3 / cost if cost else None, "conn/s",
                      1e3 / base_cost if base_cost else None))
    result.details = {"connections": count, "failed": failures, "concurrency": 128,
                      "note": "the clients share the 2 cores with the node: the measured rate is a floor; the "
                              "CPU-derived figure is what the node alone would do"}
    return result
