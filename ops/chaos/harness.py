"""The chaos run: a whole cluster on private RabbitMQ and Redis, every link behind a fault proxy,
hundreds of simulated agents on both transports, call traffic and click-to-dial commands, and
one fault after another.

    simulator <-[ami proxy]- gateway -[amqp proxy]-> RabbitMQ (private) <-[amqp proxy]- nodes
                                     -[redis proxy]-> Redis (private)   <-[redis proxy]-
    agents -[client proxy]-> HAProxy -> nodes

Each fault is a phase: traffic before it, the fault, then an observation window in which every
agent asks for a snapshot each second. Verdicts come afterwards, from the simulator's ground truth
(ops/chaos/verdict.py); nothing here decides a PASS.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import random
import signal
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from local_cluster.infra import InfrastructureError, port_open
from local_cluster.launcher import ClusterOptions, LocalCluster, http_get
from ops.chaos.agents import ChaosAgent, Transport
from ops.chaos.fault_proxy import PASS, LinkFault, ProxyHost
from ops.chaos.servers import PrivateRabbit, PrivateRedis, PrivateServer
from ops.chaos.verdict import Drop, Observation, Phase, PhaseReport, TruthLog, judge_evidence
from ops.drill.__main__ import TRAFFIC_MIX, _get, _post
from ws_node.creatio_protocol import call_guid

log = logging.getLogger(__name__)

LINKS = ("ami", "amqp", "redis", "client")
ALL_FAULTS = (
    "baseline", "node-kill", "node-stop", "gateway-kill", "gateway-restart", "cluster-restart", "rabbitmq-restart",
    "rabbitmq-unreachable", "redis-restart-empty", "redis-unreachable", "ami-cut", "asterisk-restart",
    *(f"slow-{link}" for link in LINKS), "rabbitmq-stall", "redis-stall",
)
QUICK_FAULTS = ("baseline", "node-kill", "rabbitmq-unreachable", "redis-restart-empty")


@dataclass
class ChaosOptions:
    agents: int = 300
    #: share of the agents on SignalR (Creatio 8.x); the rest on the raw WebSocket (7.x)
    signalr_share: float = 0.5
    command_agents: int = 10
    cps: float = 4.0
    faults: tuple[str, ...] = ALL_FAULTS
    lead_seconds: float = 4.0
    observe_seconds: float = 12.0
    outage_seconds: float = 30.0
    stop_seconds: float = 10.0
    stall_seconds: float = 15.0
    link_fault_seconds: float = 15.0
    latency: float = 0.05
    loss: float = 0.02
    reconnect_delay: float = 5.0
    command_interval: float = 3.0
    settle_timeout: float = 60.0
    first_line: int = 5000
    seed: int = 1
    run_dir: Path = Path(".run/chaos")


@dataclass
class ChaosResult:
    reports: list[PhaseReport]
    agents: int
    signalr_agents: int
    calls_played: int
    standby: bool
    seconds: float
    notes: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(r.passed for r in self.reports if r.phase.applicable)


class ChaosCluster(LocalCluster):
    """The local cluster with the gateway's AMI connection going through the AMI fault proxy."""

    def __init__(self, options: ClusterOptions, ami_connect_port: int) -> None:
        super().__init__(options)
        self.ami_connect_port = ami_connect_port

    def _write_settings(self) -> None:
        super()._write_settings()
        document = json.loads(self.settings_path.read_text())
        document["Asterisk"]["port"] = str(self.ami_connect_port)
        self.settings_path.write_text(json.dumps(document, indent=2))


def standby_supported() -> bool:
    """Whether the launcher can run a hot-standby gateway (a ``gateways`` count option)."""
    return "gateways" in {f.name for f in dataclasses.fields(ClusterOptions)}


class ChaosRun:
    def __init__(self, options: ChaosOptions) -> None:
        self.options = options
        self.random = random.Random(options.seed)
        self.proxies = ProxyHost()
        self.rabbit = PrivateRabbit(options.run_dir / "rabbitmq")
        self.redis = PrivateRedis(options.run_dir / "redis")
        #: servers this run could not start privately (name -> why): never restarted
        self.shared: dict[str, str] = {}
        self.cluster: ChaosCluster | None = None
        self.agents: list[ChaosAgent] = []
        self.command_agents: list[ChaosAgent] = []
        self.phases: list[Phase] = []
        self.truth = TruthLog()
        #: (time, seconds late) of the harness's own event loop, to tell its lag from the cluster's
        self.lag: list[tuple[float, float]] = []
        self.calls_played = 0
        self.standby = False
        self.notes: list[str] = []
        #: fault name -> when a gateway heard the PBX again after it (see Phase.pbx_heard_at)
        self.pbx_heard_at: dict[str, float] = {}
        self._traffic_open = asyncio.Event()
        self._running = True
        self._number = 0

    # ---- set up and tear down ------------------------------------------------------------------

    def start(self) -> None:
        opts = self.options
        opts.run_dir.mkdir(parents=True, exist_ok=True)
        self.proxies.start()
        amqp_target = self._private_or_shared(self.rabbit, 5672)
        redis_target = self._private_or_shared(self.redis, 6379)
        amqp_port = self.proxies.add("amqp", "127.0.0.1", amqp_target)
        redis_port = self.proxies.add("redis", "127.0.0.1", redis_target)
        cluster_options = ClusterOptions.ephemeral(
            opts.run_dir / "cluster",
            amqp_url=f"amqp://guest:guest@127.0.0.1:{amqp_port}/",
            redis_url=f"redis://127.0.0.1:{redis_port}/0",
        )
        self.standby = standby_supported()
        if self.standby:
            setattr(cluster_options, "gateways", 2)  # noqa: B010 - an option other branches add
        ami_port = self.proxies.add("ami", "127.0.0.1", cluster_options.ami_port)
        self.proxies.add("client", "127.0.0.1", cluster_options.haproxy_port)
        self.cluster = ChaosCluster(cluster_options, ami_port)
        self.cluster.start(timeout=120)

    def _private_or_shared(self, server: PrivateServer, shared_port: int) -> int:
        """A private server when this machine can run one; else the shared one, behind the proxy only
        (its outage faults still work through the proxy; its restart faults are then not applicable)."""
        try:
            server.start()
            return server.port
        except InfrastructureError as exc:
            if not port_open(shared_port):
                raise
            self.shared[server.name] = str(exc)
            self.notes.append(f"{server.name}: {exc}; using the shared one on {shared_port} behind the proxy "
                              "(never restarted)")
            return shared_port

    def stop(self) -> None:
        if self.cluster is not None:
            self._resume_all()  # a node left SIGSTOPped by an interrupted run must be able to stop
            self.cluster.stop()
            self.cluster = None
        self.proxies.stop()
        self.redis.stop()
        self.rabbit.stop()

    def _resume_all(self) -> None:
        assert self.cluster is not None
        for child in self.cluster.children:
            if child.alive():
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(child.process.pid, signal.SIGCONT)

    @property
    def client_url(self) -> str:
        return f"ws://127.0.0.1:{self.proxies.ports['client']}/"

    @property
    def simulator_url(self) -> str:
        assert self.cluster is not None
        return f"http://127.0.0.1:{self.cluster.options.simulator_control_port}"

    # ---- the run -------------------------------------------------------------------------------

    async def run(self) -> ChaosResult:
        opts = self.options
        began = time.monotonic()
        lines = [str(opts.first_line + i) for i in range(opts.agents + opts.command_agents)]
        signalr_every = round(1 / opts.signalr_share) if opts.signalr_share > 0 else 0
        for index, line in enumerate(lines):
            transport: Transport = "signalr" if signalr_every and index % signalr_every == 1 else "ws"
            agent = ChaosAgent(self.client_url, line, transport, reconnect_delay=opts.reconnect_delay)
            (self.agents if index < opts.agents else self.command_agents).append(agent)
        everyone = self.agents + self.command_agents
        tasks = []
        for first in range(0, len(everyone), 50):  # in waves: a burst of handshakes is its own test
            batch = everyone[first:first + 50]
            tasks += [asyncio.create_task(a.run()) for a in batch]
            async with asyncio.timeout(90):
                await asyncio.gather(*(a.connected.wait() for a in batch))
        await asyncio.to_thread(self._check_links)
        signalr = sum(a.transport == "signalr" for a in everyone)
        print(f"{len(everyone)} agents connected ({signalr} SignalR, {len(everyone) - signalr} WebSocket, "
              f"{len(self.command_agents)} sending click-to-dial); traffic {opts.cps}/s", flush=True)
        self._traffic_open.set()
        background = [asyncio.create_task(self._traffic()), asyncio.create_task(self._commands()),
                      asyncio.create_task(self._harvest_truth()), asyncio.create_task(self._watch_lag())]
        start: float = time.time()
        try:
            for name in opts.faults:
                start = await self._phase(name, start)
        finally:
            self._running = False
            self._traffic_open.set()
            await asyncio.gather(*background, return_exceptions=True)
        await self._settle()
        self.truth.add(await asyncio.to_thread(_get, f"{self.simulator_url}/calls"))
        for agent in everyone:
            agent.stop()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        reports = self._judge()
        self._save_evidence()
        for phase in self.phases:
            lag = self.lag_in(phase)
            if lag > 0.5:
                self.notes.append(f"{phase.name}: this harness's event loop ran up to {lag:.1f}s late "
                                  "(machine load); snapshots are judged by when they were asked for")
        return ChaosResult(reports, len(everyone), signalr, self.calls_played, self.standby,
                           time.monotonic() - began, self.notes)

    def _judge(self) -> list[PhaseReport]:
        return judge_evidence(self.evidence(), call_guid)

    def _check_links(self) -> None:
        """Every link must go through its proxy, or its faults would silently test nothing."""
        unused = [name for name, stats in self.proxies.stats().items() if stats["accepted"] == 0]
        if unused:
            raise RuntimeError(f"no connection went through the {', '.join(unused)} fault proxy; "
                               "the cluster's settings do not point at it")

    def evidence(self) -> dict[str, Any]:
        """What the verdicts are computed from; saved, so anyone can check one by hand or judge again."""
        return {
            "phases": [dataclasses.asdict(p) for p in self.phases],
            "truth": self.truth.payload(),
            "harness_lag": self.lag,
            "agents": [{**dataclasses.asdict(observe(a)), "transport": a.transport} for a in self.agents],
            "commands": [{"line": a.line, "number": c.number, "at": c.at}
                         for a in self.command_agents for c in a.commands],
        }

    def _save_evidence(self) -> None:
        (self.options.run_dir / "evidence.json").write_text(json.dumps(self.evidence()))

    async def _phase(self, name: str, start: float) -> float:
        opts = self.options
        print(f"[{time.strftime('%H:%M:%S')}] {name}", flush=True)
        await asyncio.sleep(opts.lead_seconds)
        fault_start = time.time()
        fault = FAULTS[name]
        outcome = await fault(self)
        if isinstance(outcome, str):  # not applicable: keep the slot, judge nothing
            end = time.time()
            self.phases.append(Phase(name, start, fault_start, end, end, applicable=False, note=outcome))
            print(f"    not applicable: {outcome}", flush=True)
            return end
        fault_end, node_fault, repair = outcome
        probe = asyncio.create_task(self._probe(opts.observe_seconds))
        await probe
        end = time.time()
        self.phases.append(Phase(name, start, fault_start, fault_end, end, node_fault=node_fault,
                                 pbx_unheard=name in PBX_UNHEARD, pbx_heard_at=self.pbx_heard_at.pop(name, 0.0)))
        if repair is not None:
            await repair()
        return end

    async def _probe(self, seconds: float) -> None:
        """Every agent asks for a snapshot each second: when each is right again is the consistency time.

        The questions are spread over the second, ten slices of agents, as independent panels would
        spread them: a burst of hundreds at once would measure the burst, not the fault.
        """
        deadline = time.monotonic() + seconds
        slices = [self.agents[i::10] for i in range(10)]
        while time.monotonic() < deadline:
            for group in slices:
                await asyncio.gather(*(a.query_snapshot() for a in group))
                await asyncio.sleep(0.1)

    async def _harvest_truth(self) -> None:
        """The simulator keeps its last 1,000 calls only: read them often enough to keep every one."""
        while self._running:
            await self._traffic_open.wait()
            try:
                self.truth.add(await asyncio.to_thread(_get, f"{self.simulator_url}/calls"))
            except OSError as exc:
                log.info("truth not read: %s", exc)
            await asyncio.sleep(10.0)

    async def _watch_lag(self) -> None:
        loop = asyncio.get_running_loop()
        while self._running:
            due = loop.time() + 0.1
            await asyncio.sleep(0.1)
            late = loop.time() - due
            if late > 0.05:
                self.lag.append((time.time(), late))

    def lag_in(self, phase: Phase) -> float:
        return max((late for at, late in self.lag if phase.start <= at < phase.end), default=0.0)

    async def _traffic(self) -> None:
        opts = self.options
        names = [name for name, _ in TRAFFIC_MIX]
        weights = [weight for _, weight in TRAFFIC_MIX]
        lines = [a.line for a in self.agents]
        interval = 1.0 / opts.cps
        while self._running:
            await self._traffic_open.wait()
            if not self._running:
                return
            scenario = self.random.choices(names, weights)[0]
            line, other = self.random.sample(lines, 2)
            variables = {"line": line, "caller": f"7916{self.random.randrange(10**7):07d}"}
            if scenario == "inbound-queue":
                variables["agent2"] = other
            try:
                await asyncio.to_thread(_post, f"{self.simulator_url}/play", {"scenario": scenario, "vars": variables})
                self.calls_played += 1
            except OSError as exc:  # the simulator is restarting: no call was started
                log.info("play refused: %s", exc)
            await asyncio.sleep(interval)

    async def _commands(self) -> None:
        """Each command agent dials a unique number now and then; the simulator's Originates are the truth."""
        if not self.command_agents:
            return
        pause = self.options.command_interval / len(self.command_agents)
        while self._running:
            for agent in self.command_agents:
                await self._traffic_open.wait()
                if not self._running:
                    return
                self._number += 1
                await agent.make_call(f"555{self.options.seed:02d}{self._number:05d}")
                await asyncio.sleep(pause)

    async def _settle(self) -> None:
        """Let short calls end, hang up the rest; their ends must reach the agents too."""
        deadline = time.monotonic() + 20.0
        while time.monotonic() < deadline:
            live = (await asyncio.to_thread(_get, f"{self.simulator_url}/calls")).get("live", [])
            if all(c.get("scenario") == "inbound-direct-long" for c in live):
                break
            await asyncio.sleep(0.5)
        await asyncio.to_thread(_post, f"{self.simulator_url}/hangup-all", {})
        deadline = time.monotonic() + self.options.settle_timeout
        everyone = self.agents + self.command_agents
        while time.monotonic() < deadline:
            live = (await asyncio.to_thread(_get, f"{self.simulator_url}/calls")).get("live", [])
            if not live and all(a.connected.is_set() for a in everyone):
                break
            await asyncio.sleep(0.5)
        await asyncio.sleep(3.0)  # the last events on their way

    # ---- helpers the faults use ----------------------------------------------------------------

    async def wait_node_serving(self, name: str, timeout: float = 60.0) -> None:
        assert self.cluster is not None
        index = int(name.removeprefix("node")) - 1
        port = self.cluster.node_ports[index]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if await asyncio.to_thread(_healthy, port) and await asyncio.to_thread(self._haproxy_up, name):
                return
            await asyncio.sleep(0.5)
        self.notes.append(f"{name} not serving again within {timeout:.0f}s")

    def _haproxy_up(self, name: str) -> bool:
        assert self.cluster is not None
        try:
            status, body = http_get(f"http://127.0.0.1:{self.cluster.options.stats_port}/stats;csv", timeout=1)
        except OSError:
            return False
        return status == 200 and any(row.startswith(f"ws_nodes,{name},") and ",UP," in row
                                     for row in body.decode().splitlines())

    async def wait_pbx_heard(self, timeout: float = 60.0) -> None:
        """Until a gateway is active with the PBX listed again: what happens on the PBX before then leaves
        nothing any gateway could report (AMI does not replay events)."""
        assert self.cluster is not None
        ports = self.cluster.gateway_ports
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for port in ports:
                if await asyncio.to_thread(_active_and_ready, port):
                    return
            await asyncio.sleep(0.1)
        self.notes.append(f"no gateway active and ready within {timeout:.0f}s")

    async def wait_gateway_ready(self, timeout: float = 60.0) -> None:
        assert self.cluster is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if await asyncio.to_thread(_healthy, self.cluster.options.gateway_metrics_port):
                return
            await asyncio.sleep(0.2)
        self.notes.append(f"gateway not healthy within {timeout:.0f}s")

    def gateways(self) -> list[str]:
        assert self.cluster is not None
        return [c.name for c in self.cluster.children if c.name.startswith("gateway")]

    async def pause_traffic(self) -> None:
        self._traffic_open.clear()
        await asyncio.sleep(0.3)  # a play already posted lands first

    def resume_traffic(self) -> None:
        self._traffic_open.set()


def _active_and_ready(port: int) -> bool:
    """The gateway at ``port`` holds the lease and has resynced with the PBX (a standby answers 200 too)."""
    try:
        status, body = http_get(f"http://127.0.0.1:{port}/health", timeout=1)
        return status == 200 and json.loads(body).get("role") == "active"
    except (OSError, ValueError, AttributeError):
        return False


def _healthy(port: int) -> bool:
    try:
        status, _ = http_get(f"http://127.0.0.1:{port}/health", timeout=1)
    except OSError:
        return False
    return status == 200


def _wait_ports(*ports: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not all(port_open(p) for p in ports):
        time.sleep(0.2)


def observe(agent: ChaosAgent) -> Observation:
    return Observation(
        line=agent.line,
        events={k: list(v) for k, v in agent.events.items()},
        callers=dict(agent.callers),
        snapshots=[(s.asked, s.at, s.call_ids) for s in agent.snapshots],
        drops=[Drop(o.dropped_at, o.first_retry_at, o.ready_at, tuple(o.retry_times)) for o in agent.outages],
    )


# ---- the faults -----------------------------------------------------------------------------------
# Each returns (moment recovery began, is it a node fault, repair to run after the observation) or a
# sentence saying why it does not apply to this cluster.

Repair = Callable[[], Awaitable[None]]
Outcome = tuple[float, bool, Repair | None] | str


async def fault_baseline(run: ChaosRun) -> Outcome:
    return time.time(), False, None


async def fault_node_kill(run: ChaosRun) -> Outcome:
    assert run.cluster is not None
    await asyncio.to_thread(run.cluster.kill, "node1", signal.SIGKILL)
    killed = time.time()

    async def repair() -> None:
        assert run.cluster is not None
        await asyncio.to_thread(run.cluster.restart, "node1")
        await run.wait_node_serving("node1")

    return killed, True, repair


async def fault_node_stop(run: ChaosRun) -> Outcome:
    assert run.cluster is not None
    pid = run.cluster.child("node1").process.pid
    os.killpg(pid, signal.SIGSTOP)
    try:
        await asyncio.sleep(run.options.stop_seconds)
    finally:
        os.killpg(pid, signal.SIGCONT)
    resumed = time.time()

    async def repair() -> None:
        await run.wait_node_serving("node1")

    return resumed, True, repair


async def fault_gateway_kill(run: ChaosRun) -> Outcome:
    assert run.cluster is not None
    names = run.gateways()
    if not run.standby or len(names) < 2:
        return "no standby gateway (the launcher has no 'gateways' option yet)"
    victim = names[0]
    await asyncio.to_thread(run.cluster.kill, victim, signal.SIGKILL)
    killed = time.time()

    async def repair() -> None:
        assert run.cluster is not None
        await asyncio.to_thread(run.cluster.restart, victim)

    return killed, False, repair


async def fault_gateway_restart(run: ChaosRun) -> Outcome:
    assert run.cluster is not None
    await asyncio.to_thread(run.cluster.restart, run.gateways()[0], 60.0)
    await run.wait_gateway_ready()
    return time.time(), False, None


async def fault_cluster_restart(run: ChaosRun) -> Outcome:
    """What an operator's restart of `make run` does: every cluster process stops (SIGTERM) and starts
    again over the namespace the previous ones left in Redis; the PBX and the agents stay."""
    assert run.cluster is not None
    names = [c.name for c in run.cluster.children if c.name != "simulator"]
    for name in reversed(names):  # HAProxy and the nodes first, as LocalCluster.stop does
        await asyncio.to_thread(run.cluster.kill, name, signal.SIGTERM)
    # The gateways last, all started before waiting for one: LocalCluster's wait for a gateway's /health
    # gives up if any other child is down (with two gateways the second was still stopped).
    ordered = sorted(names, key=lambda n: n.startswith("gateway"))
    for name in ordered:
        await asyncio.to_thread(run.cluster.restart, name, wait=name == ordered[-1])
    for name in names:
        if name.startswith("node"):
            await run.wait_node_serving(name)
    await run.wait_gateway_ready()
    # Recovery begins when the cluster serves again (an agent's retry before that only finds it down): consistency
    # is timed from then, or from the agent's first retry if later; every call of the phase is judged for loss.
    return time.time(), True, None


async def fault_rabbitmq_restart(run: ChaosRun) -> Outcome:
    if run.rabbit.name in run.shared:
        return "RabbitMQ is the machine's shared one (no rabbitmq-server to run a private one)"
    await asyncio.to_thread(run.rabbit.restart)
    return time.time(), False, None


async def fault_redis_restart_empty(run: ChaosRun) -> Outcome:
    if run.redis.name in run.shared:
        return "Redis is the machine's shared one (no redis-server to run a private one)"
    await asyncio.to_thread(run.redis.restart)
    return time.time(), False, None


async def _link_outage(run: ChaosRun, link: str, seconds: float, fault: LinkFault) -> float:
    await asyncio.to_thread(run.proxies.set_fault, link, fault)
    try:
        await asyncio.sleep(seconds)
    finally:
        await asyncio.to_thread(run.proxies.set_fault, link, PASS)
    return time.time()


async def fault_rabbitmq_unreachable(run: ChaosRun) -> Outcome:
    return await _link_outage(run, "amqp", run.options.outage_seconds, LinkFault("cut")), False, None


async def fault_redis_unreachable(run: ChaosRun) -> Outcome:
    return await _link_outage(run, "redis", run.options.outage_seconds, LinkFault("cut")), False, None


async def fault_rabbitmq_stall(run: ChaosRun) -> Outcome:
    """The broker stops answering but every TCP connection stays up: only heartbeats can tell."""
    return await _link_outage(run, "amqp", run.options.stall_seconds, LinkFault("blackhole")), False, None


async def fault_redis_stall(run: ChaosRun) -> Outcome:
    return await _link_outage(run, "redis", run.options.stall_seconds, LinkFault("blackhole")), False, None


#: faults during which no gateway hears the PBX (every gateway's AMI link goes through the cut proxy)
PBX_UNHEARD = frozenset({"ami-cut"})


async def fault_ami_cut(run: ChaosRun) -> Outcome:
    healed = await _link_outage(run, "ami", 2.0, LinkFault("cut"))
    # Deaf until a gateway is logged in and resynced again (its reconnect backoff): legs of that time are unheard.
    await run.wait_pbx_heard()
    run.pbx_heard_at["ami-cut"] = time.time()
    return healed, False, None


async def fault_asterisk_restart(run: ChaosRun) -> Outcome:
    """Asterisk crashes and comes back (kill -9 of the simulator, started again): every call is gone
    without a Hangup event; the truth of the old lifetime ends its live calls at the crash."""
    assert run.cluster is not None
    await run.pause_traffic()
    try:
        last = await asyncio.to_thread(_get, f"{run.simulator_url}/calls")
        await asyncio.to_thread(run.cluster.kill, "simulator", signal.SIGKILL)
        run.truth.crashed(last, time.time())
        await asyncio.sleep(2.0)
        await asyncio.to_thread(run.cluster.restart, "simulator")
        await asyncio.to_thread(_wait_ports, run.cluster.options.ami_port, run.cluster.options.simulator_control_port)
        # Calls resume once a gateway hears the PBX again: a call on a PBX no gateway is logged in to leaves no
        # trace to report (the run's ami-cut measures that window on its own, pbx_unheard).
        await asyncio.sleep(1.0)  # the gateways notice the dead session first
        await run.wait_pbx_heard()
    finally:
        run.resume_traffic()
    return time.time(), False, None


def _slow(link: str) -> Callable[[ChaosRun], Awaitable[Outcome]]:
    async def fault(run: ChaosRun) -> Outcome:
        slow = LinkFault("pass", latency=run.options.latency, loss=run.options.loss)
        return await _link_outage(run, link, run.options.link_fault_seconds, slow), False, None

    return fault


FAULTS: dict[str, Callable[[ChaosRun], Awaitable[Outcome]]] = {
    "baseline": fault_baseline,
    "node-kill": fault_node_kill,
    "node-stop": fault_node_stop,
    "gateway-kill": fault_gateway_kill,
    "gateway-restart": fault_gateway_restart,
    "cluster-restart": fault_cluster_restart,
    "rabbitmq-restart": fault_rabbitmq_restart,
    "rabbitmq-unreachable": fault_rabbitmq_unreachable,
    "redis-restart-empty": fault_redis_restart_empty,
    "redis-unreachable": fault_redis_unreachable,
    "rabbitmq-stall": fault_rabbitmq_stall,
    "redis-stall": fault_redis_stall,
    "ami-cut": fault_ami_cut,
    "asterisk-restart": fault_asterisk_restart,
    **{f"slow-{link}": _slow(link) for link in LINKS},
}
