"""Gateway-side stages: parse+track speed, the AMI read under a slow broker/Redis, and publishing."""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Callable
from typing import Any

from bench.ami_load import mean_events_per_call, plan_calls, synthesize_ami
from bench.baselines import ROOT, bare_parse, bare_publish
from bench.context import Context, cleanup_namespace, write_settings
from bench.report import Figure, StageResult, Target
from bench.stats import median

# Asterisk drops a manager session whose writes block longer than manager.conf's writetimeout
# (100 ms by default); a read loop that stops that long risks exactly that.
MAX_READ_STALL = 0.100


def agent_lines(count: int, first: int = 7000) -> list[str]:
    return [str(first + i) for i in range(count)]


# ---- 1. parse + track ---------------------------------------------------------------------------


def _parse_and_track(data: bytes) -> tuple[int, int]:
    from ami.protocol import AmiMessage, AmiParser
    from ami_gateway.agent_tracker import AgentStateTracker
    from ami_gateway.lines import LineMatcher
    from ami_gateway.tracker import CallTracker, TrackerOptions

    matcher = LineMatcher(protocol="SIP", queue_extension_format="Local/{0}@from-queue/n")
    tracker = CallTracker(matcher, TrackerOptions(send_ring_started_on_ringing_state=True))
    parser = AmiParser(expect_banner=False)
    # the gateway's read path hands every message to both
    handle, handle_agents = tracker.handle, AgentStateTracker(matcher).handle
    events = produced = 0
    for i in range(0, len(data), 65536):  # what one read() of the gateway's loop hands over
        parser.receive_data(data[i : i + 65536])
        now = time.time()
        while (item := parser.next_event()) is not None:
            if isinstance(item, AmiMessage):
                events += 1
                produced += len(handle(item, now)) + len(handle_agents(item, now))
    return events, produced


def _parse_only(data: bytes) -> int:
    from ami.protocol import AmiParser

    parser = AmiParser(expect_banner=False)
    count = 0
    for i in range(0, len(data), 65536):
        parser.receive_data(data[i : i + 65536])
        while parser.next_event() is not None:
            count += 1
    return count


def _cpu(fn: Callable[[], Any]) -> tuple[float, Any]:
    started = time.process_time()
    result = fn()
    return time.process_time() - started, result


def stage_gateway(ctx: Context) -> StageResult:
    result = StageResult("gateway")
    size = ctx.size(100_000, 15_000)
    ctx.say(f"synthesizing {size:,} AMI events over 2,000 lines from the simulator's scenarios")
    data, count = synthesize_ami(size, agent_lines(2000))
    system: list[float] = []
    baseline: list[float] = []
    parse_only: list[float] = []
    produced = 0
    for i in range(ctx.repeats):
        base_cpu, parsed = _cpu(lambda: bare_parse(data))
        if parsed != count:
            raise RuntimeError(f"bare parse found {parsed} messages, expected {count}")
        baseline.append(count / base_cpu)
        if ctx.profiler is not None and i == 0:
            with ctx.profiler.in_process("gateway-parse-track"):
                sys_cpu, (events, produced) = _cpu(lambda: _parse_and_track(data))
        else:
            sys_cpu, (events, produced) = _cpu(lambda: _parse_and_track(data))
        if events != count:
            raise RuntimeError(f"AmiParser found {events} events, expected {count}")
        system.append(count / sys_cpu)
        parse_cpu, _ = _cpu(lambda: _parse_only(data))
        parse_only.append(count / parse_cpu)
    rate, base = median(system), median(baseline)
    result.add(Figure("parse+track, AMI events/s per core", rate, "ev/s", base, Target(">=", 20_000),
                      samples=system, baseline_samples=baseline))
    # Per-event CPU from each repeat's rate: the samples must be in the figure's unit, or the spread is nonsense.
    result.add(Figure("parse+track, CPU per event", 1e6 / rate if rate else None, "us",
                      1e6 / base if base else None, Target("<=", 50), samples=[1e6 / r for r in system],
                      baseline_samples=[1e6 / b for b in baseline]))
    parse_rate = median(parse_only)
    result.add(Figure("parse only (AmiParser), CPU per event", 1e6 / parse_rate if parse_rate else None, "us",
                      1e6 / base if base else None, samples=[1e6 / r for r in parse_only],
                      baseline_samples=[1e6 / b for b in baseline]))
    result.details = {"ami_events": count, "bytes": len(data), "line_events": produced,
                      "baseline": "bytes.split on CRLFCRLF, lines on CRLF, partition into a dict, whole buffer"}
    return result


# ---- 1b. the AMI read while RabbitMQ and Redis are slow ------------------------------------------------


def _free_port() -> int:
    from local_cluster.infra import free_port

    return free_port()


class _PlayDriver(threading.Thread):
    """POSTs /play to a simulator at a steady rate of calls, from threads (not the measured loop).

    A pacing thread decides when a call is due and which free lines it takes; a few sender threads do the
    HTTP requests (one at a time, a request's round trip caps a sender near 115 calls/s here, about 5,000
    AMI events/s). :meth:`set_rate` changes the rate from now on (a sweep's next step). ``starved`` counts
    the ticks on which a call was due but fewer than two lines were free, or every sender was busy: the
    offer fell short of the rate.
    """

    SENDERS = 4
    MAX_IN_FLIGHT = 64

    def __init__(self, control_port: int, calls_per_second: float, lines: list[str], seed: int = 11) -> None:
        super().__init__(name="bench-play-driver", daemon=True)
        self.url = f"http://127.0.0.1:{control_port}/play"
        self.rate = calls_per_second
        self.lines = lines
        self.rng = random.Random(seed)
        self.stop_event = threading.Event()
        self.played = 0
        self.failures = 0
        self.starved = 0
        self.submitted = 0
        self.last_error = ""
        self._busy: dict[str, float] = {}
        self._lock = threading.Lock()
        self._since = time.perf_counter()
        self._submitted_before = 0
        self._in_flight = 0

    def _free_lines(self, now: float) -> list[str]:
        return [line for line in self.lines if self._busy.get(line, 0.0) <= now]

    def set_rate(self, calls_per_second: float) -> None:
        with self._lock:
            self.rate = calls_per_second
            self._since = time.perf_counter()
            self._submitted_before = self.submitted

    def _post(self, body: bytes) -> None:
        request = urllib.request.Request(self.url, data=body, method="POST",
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=5) as response:  # noqa: S310 - loopback
                response.read()
        except OSError as exc:
            with self._lock:
                self.failures += 1
                self.last_error = str(exc)
        else:
            with self._lock:
                self.played += 1
        finally:
            with self._lock:
                self._in_flight -= 1

    def run(self) -> None:
        from concurrent.futures import ThreadPoolExecutor

        from ami_simulator.builtin import builtin_scenario

        with self._lock:
            self._since = time.perf_counter()
            self._submitted_before = self.submitted
        with ThreadPoolExecutor(self.SENDERS, thread_name_prefix="bench-play") as senders:
            while not self.stop_event.is_set():
                now = time.perf_counter()
                with self._lock:
                    due = int((now - self._since) * self.rate) - (self.submitted - self._submitted_before)
                    in_flight = self._in_flight
                for _ in range(max(0, due)):
                    free = self._free_lines(now)
                    if len(free) < 2 or in_flight >= self.MAX_IN_FLIGHT:
                        self.starved += 1
                        break
                    plan = next(plan_calls(1, free, self.rng))
                    body = json.dumps({"scenario": plan.scenario, "vars": plan.variables}).encode()
                    hold = builtin_scenario(plan.scenario).duration + 1.0
                    for line in plan.lines:
                        self._busy[line] = now + hold
                    with self._lock:
                        self.submitted += 1
                        self._in_flight += 1
                    in_flight += 1
                    senders.submit(self._post, body)
                self.stop_event.wait(0.01)

    def stop(self) -> None:
        self.stop_event.set()
        if self.is_alive():
            self.join(15)


def start_simulator(ami_port: int, control_port: int) -> subprocess.Popen[bytes]:
    from local_cluster.infra import port_open

    process = subprocess.Popen(
        [sys.executable, "-m", "ami_simulator", "--port", str(ami_port), "--control-port", str(control_port),
         "--username", "cms", "--secret", "simulator-secret", "--log-level", "WARNING"],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and not (port_open(ami_port) and port_open(control_port)):
        if process.poll() is not None:
            raise RuntimeError("the AMI simulator exited at start")
        time.sleep(0.1)
    return process


def stop_process(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)


def _host_port(url: str, default_port: int) -> tuple[str, int]:
    parts = urllib.parse.urlsplit(url)
    return parts.hostname or "127.0.0.1", parts.port or default_port


def _swap_port(url: str, port: int) -> str:
    parts = urllib.parse.urlsplit(url)
    netloc = parts.netloc.rsplit("@", 1)
    host = f"127.0.0.1:{port}"
    return urllib.parse.urlunsplit(parts._replace(netloc=f"{netloc[0]}@{host}" if len(netloc) == 2 else host))


class _Phase:
    def __init__(self) -> None:
        self.max_lag = 0.0
        self.max_gap = 0.0
        self.events = 0
        self.started = time.perf_counter()
        self.duration = 0.0
        self.last_received = 0.0


def stage_stall(ctx: Context) -> StageResult:
    return asyncio.run(_stall(ctx))


async def _stall(ctx: Context) -> StageResult:
    from ops.chaos.fault_proxy import BLACKHOLE, PASS, LinkFault, ProxyThread

    result = StageResult("stall")
    from ami_gateway.app import Gateway
    from services.config import load_settings

    ami_port, control_port = _free_port(), _free_port()
    prefix = ctx.new_prefix()
    broker = ProxyThread("broker", *_host_port(ctx.amqp_url, 5672)).start()
    redis_proxy = ProxyThread("redis", *_host_port(ctx.redis_url, 6379)).start()
    simulator = start_simulator(ami_port, control_port)
    settings_path = write_settings(ctx.run_dir / f"stall-{prefix}.json", ami_port=ami_port,
                                   amqp_url=_swap_port(ctx.amqp_url, broker.port),
                                   redis_url=_swap_port(ctx.redis_url, redis_proxy.port), prefix=prefix)
    gateway = Gateway(load_settings(settings_path), metrics_port=0)
    phase = _Phase()
    real_handle = gateway.tracker.handle

    def handle(msg: Any, received_at: float) -> Any:
        # received_at is when the read that carried the bytes returned: gaps between reads are stalls.
        if received_at != phase.last_received:
            if phase.last_received:
                phase.max_gap = max(phase.max_gap, received_at - phase.last_received)
            phase.last_received = received_at
        phase.events += 1
        return real_handle(msg, received_at)

    gateway.tracker.handle = handle  # type: ignore[method-assign]
    stop_monitor = asyncio.Event()

    async def monitor_loop_lag() -> None:
        loop = asyncio.get_running_loop()
        while not stop_monitor.is_set():
            before = loop.time()
            await asyncio.sleep(0.005)
            phase.max_lag = max(phase.max_lag, loop.time() - before - 0.005)

    events_per_second = ctx.size(1000.0, 500.0)
    calls_per_second = events_per_second / mean_events_per_call()
    seconds = ctx.size(6.0, 1.5)
    driver = _PlayDriver(control_port, calls_per_second, agent_lines(400))
    monitor: asyncio.Task[None] | None = None
    phases: dict[str, _Phase] = {}
    try:
        await gateway.start()
        async with asyncio.timeout(20):
            await gateway.ready.wait()
        monitor = asyncio.create_task(monitor_loop_lag())
        driver.start()
        await asyncio.sleep(1.0)  # warm-up: the first calls of the run
        for name, mode in (("healthy", "pass"), ("degraded", "hold")):
            phase = _Phase()
            if mode == "hold":
                # Not waited for: this loop is the gateway's, whose read gaps are being measured.
                broker.set_fault(BLACKHOLE, wait=False)
                redis_proxy.set_fault(LinkFault(latency=0.2), wait=False)
            await asyncio.sleep(seconds)
            phase.duration = time.perf_counter() - phase.started
            phases[name] = phase
        depth_when_degraded = gateway.outbox.depth
        broker.set_fault(PASS, wait=False)
        redis_proxy.set_fault(PASS, wait=False)
        driver.stop()
        released = time.perf_counter()
        drained = False
        while time.perf_counter() - released < 30:
            if gateway.outbox.depth == 0:
                drained = True
                break
            await asyncio.sleep(0.05)
        drain_seconds = time.perf_counter() - released
    finally:
        driver.stop()
        stop_monitor.set()
        if monitor is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await monitor
        broker.set_fault(PASS)
        redis_proxy.set_fault(PASS)
        with contextlib.suppress(Exception):
            async with asyncio.timeout(20):
                await gateway.stop(flush_timeout=5)
        stop_process(simulator)
        broker.stop()
        redis_proxy.stop()
        await cleanup_namespace(ctx.amqp_url, ctx.redis_url, prefix)
    healthy, degraded = phases["healthy"], phases["degraded"]
    result.add(Figure("max event-loop stall, broker held + Redis +200 ms", degraded.max_lag, "s", healthy.max_lag,
                      Target("<=", MAX_READ_STALL), note="baseline: same run, broker and Redis healthy"))
    result.add(Figure("max gap between AMI reads, degraded", degraded.max_gap, "s", healthy.max_gap,
                      Target("<=", MAX_READ_STALL)))
    result.add(Figure("AMI events read/s, degraded", degraded.events / degraded.duration, "ev/s",
                      healthy.events / healthy.duration))
    result.add(Figure("outbox drained after the broker came back", drain_seconds if drained else None, "s",
                      note="" if drained else "outbox not drained within 30 s"))
    result.details = {"offered_events_per_second": events_per_second, "phase_seconds": seconds,
                      "outbox_depth_when_released": depth_when_degraded, "calls_played": driver.played,
                      "play_failures": driver.failures, "last_play_error": driver.last_error,
                      "how": "in-process ami_gateway.app.Gateway, RabbitMQ and Redis behind TCP proxies; "
                             "simulator in a subprocess driven by POST /play"}
    return result


# ---- 2. publishing ------------------------------------------------------------------------------


def _line_events(count: int) -> list[Any]:
    """Line events the tracker makes from the synthesized mix (100 lines), repeated up to ``count``."""
    from ami.protocol import AmiMessage, AmiParser
    from ami_gateway.lines import LineMatcher
    from ami_gateway.tracker import CallTracker, TrackerOptions

    data, _ = synthesize_ami(30_000, agent_lines(100))
    tracker = CallTracker(LineMatcher(protocol="SIP", queue_extension_format="Local/{0}@from-queue/n"),
                          TrackerOptions(send_ring_started_on_ringing_state=True))
    parser = AmiParser(expect_banner=False)
    parser.receive_data(data)
    events: list[Any] = []
    now = time.time()
    while (item := parser.next_event()) is not None:
        if isinstance(item, AmiMessage):
            events.extend(tracker.handle(item, now))
    if not events:
        raise RuntimeError("the tracker produced no line events from the synthesized AMI")
    return [events[i % len(events)] for i in range(count)]


async def _outbox_run(ctx: Context, events: list[Any]) -> tuple[float, int]:
    """Put every event into a real EventOutbox at once; time until RabbitMQ confirmed the last one.
    Returns (seconds, messages the bound queue holds then)."""
    import aio_pika
    import redis.asyncio as aioredis

    from ami_gateway.event_outbox import EventOutbox, EventPublisher, Sequencer
    from bench.baselines import queued_messages
    from services.line_state import LineStateWriter
    from services.topology import Topology

    prefix = ctx.new_prefix()
    topology = Topology(prefix)
    client = aioredis.from_url(ctx.redis_url)
    admin = await aio_pika.connect(ctx.amqp_url, timeout=10)
    publisher = EventPublisher(ctx.amqp_url, topology)
    task: asyncio.Task[None] | None = None
    try:
        channel = await admin.channel()
        exchange = await channel.declare_exchange(topology.events_exchange, aio_pika.ExchangeType.DIRECT,
                                                  durable=True)
        queue = await channel.declare_queue(f"{prefix}.bench", exclusive=True)
        for line in sorted({e.line for e in events}):
            await queue.bind(exchange, topology.line_routing_key(line))
        writer = LineStateWriter(client, prefix)
        outbox = EventOutbox(writer, publisher, Sequencer(await writer.new_epoch()))
        task = asyncio.create_task(outbox.run())
        outbox.put(events[:1])  # connect the publisher before the clock starts, as a running gateway is
        await outbox.wait_idle(10)
        started = time.perf_counter()
        outbox.put(events[1:])
        while outbox.published < len(events):  # noqa: ASYNC110 - the outbox offers no "published" event
            await asyncio.sleep(0.001)
        confirmed = time.perf_counter() - started
        queued = await queued_messages(channel, f"{prefix}.bench")
        return confirmed * len(events) / max(1, len(events) - 1), queued
    finally:
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await publisher.close()
        await admin.close()
        await client.aclose()
        await cleanup_namespace(ctx.amqp_url, ctx.redis_url, prefix)


def stage_publish(ctx: Context) -> StageResult:
    from services.topology import Topology

    result = StageResult("publish")
    count = ctx.size(10_000, 3_000)
    ctx.say(f"{count:,} line events from the tracker; outbox (Redis + confirmed publish) vs bare aio-pika")
    events = _line_events(count)
    bodies = [(Topology.line_routing_key(e.line), e.positioned("1", i + 1).encode()) for i, e in enumerate(events)]
    system: list[float] = []
    baseline: list[float] = []
    lost = 0
    for i in range(ctx.repeats):
        base = asyncio.run(bare_publish(ctx.amqp_url, bodies))
        baseline.append(count / base["confirmed_seconds"])
        lost += count - int(base["queued"])
        if ctx.profiler is not None and i == 0:
            with ctx.profiler.in_process("publish-outbox"):
                seconds, queued = asyncio.run(_outbox_run(ctx, events))
        else:
            seconds, queued = asyncio.run(_outbox_run(ctx, events))
        system.append(count / seconds)
        lost += count - queued
    # Issue 15: at least 5,000/s and at least 0.8x bare aio-pika with confirms, same run.
    result.add(Figure("call events/s, outbox: Redis write + publish confirmed", median(system), "ev/s",
                      median(baseline), Target(">=", 5_000), samples=system, baseline_samples=baseline,
                      ratio_target=Target(">=", 0.8)))
    result.add(Figure("events missing from the bound queue", float(lost), "ev", target=Target("<=", 0)))
    result.details = {"events": count, "mean_body_bytes": sum(len(b) for _, b in bodies) / len(bodies),
                      "lines": len({k for k, _ in bodies}),
                      "baseline": "aio-pika, one confirming channel, 256 confirms in flight, mandatory=False, "
                                  "into the same kind of bound queue; no Redis"}
    return result
