"""Past one machine: the gateway and a node on a RabbitMQ cluster and a Sentinel-managed Redis, started here on
loopback, under call traffic. The broker member the node is attached to dies, then the Redis primary dies and
Sentinel promotes the replica: every call still reaches its agent (RING_STARTED and RING_FINISHED), no agent is
disconnected, the node moved to another member (cms_broker_failovers_total) and the gateway, seeing another Redis
server behind its lease, restated every line under a new epoch. With 3 members the quorum commands queue keeps
its majority, so an agent's command (a queue pause) still goes through after each failure; with 2 it cannot
(losing either member loses the majority), and commands are not checked.

The suite runs it with 3 RabbitMQ members, as issue 15 asks (``make engines-test`` runs this test alone);
CMS_ENGINES_BROKER_NODES=2 runs a lighter one.

Timing, measured on the 2-core machine (quiet / with three CPU-bound loops and another suite running): the engines
come up in 12-13 s / 18-19 s (RabbitMQ's boot is nearly all of it: see tests/support/engines.py), every step under
traffic takes 0-3 s (the broker member's loss is noticed in 0.2 s, Sentinel promotes in 1.8-2.6 s, the gateway
restates within 0.4 s of that), the whole test 30 s / 45 s. Each wait polls for its marker and fails at once if
the gateway stepped down or the node exited, so the deadlines (STEP, about 10x the slowest step seen) only bound a
failure. It once timed out here on "the gateway restated under a new epoch": the restate's new epoch raced an
outbox write, which was refused as fenced and stepped the gateway down (fixed in ami_gateway/app.py; see
tests/integration/test_gateway_restate_under_traffic.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from ami_gateway.app import Gateway
from ami_simulator.server import AmiSimulator
from local_cluster.infra import free_port
from services.config import AsteriskConfig, ClusterConfig, Settings
from tests.integration.test_gateway_proxy import SECRET, running_gateway
from tests.support.creatio_client import AGENT_STATE_CHANGED, RING_FINISHED, RING_STARTED, CreatioAgent
from tests.support.engines import RabbitCluster, SentinelSet

pytestmark = pytest.mark.integration

BROKER_NODES = int(os.environ.get("CMS_ENGINES_BROKER_NODES", "3"))
LINES = ("301", "302", "303")
#: a member of the simulator's "support" queue: its pause state is a command that goes through the commands queue
QUEUE_MEMBER = "305"
#: deadline of one step under traffic (slowest seen: 2.6 s for Sentinel to promote the replica on a busy machine)
STEP = 30.0
#: what would make every later wait time out: said at once instead
Trouble = Callable[[], "str | None"]


def _get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=3) as response:  # noqa: S310 - loopback
            return int(response.status), response.read()
    except OSError as exc:
        return getattr(exc, "code", 0) or 0, b""


def _metric(port: int, name: str) -> float:
    _, body = _get(f"http://127.0.0.1:{port}/metrics")
    for row in body.decode().splitlines():
        if row.startswith(name + " "):
            return float(row.split()[1])
    return 0.0


async def _until(predicate: object, timeout: float, what: str, trouble: Trouble | None = None) -> None:
    started = time.monotonic()
    while True:
        value = predicate() if callable(predicate) else predicate
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            _say(f"{what}: {time.monotonic() - started:.1f}s")
            return
        problem = trouble() if trouble is not None else None
        assert problem is None, f"waiting for {what}: {problem}"
        assert time.monotonic() - started < timeout, f"{what} not reached within {timeout:.0f}s"
        await asyncio.sleep(0.1)


async def _replica_known(group: SentinelSet) -> bool:
    """Every Sentinel knows the replica (it can fail over to it)."""
    for host, port in group.sentinel_addresses:
        client = aioredis.Redis(host=host, port=port)
        try:
            replicas = await client.sentinel_slaves(group.master_name)
        except (OSError, aioredis.RedisError):
            return False
        finally:
            await client.aclose()
        if not any("s_down" not in str(r.get("flags", "")) for r in replicas):
            return False
    return True


async def _primary_port(group: SentinelSet) -> int:
    host, port = group.sentinel_addresses[0]
    client = aioredis.Redis(host=host, port=port)
    try:
        address = await client.sentinel_get_master_addr_by_name(group.master_name)
    finally:
        await client.aclose()
    return int(address[1])


# Engines up in at most 19 s and the rest in at most 30 s when measured busy; the bound is for a machine far busier.
@pytest.mark.timeout(420)
def test_calls_ride_a_broker_member_loss_then_a_redis_primary_failover(tmp_path: Path) -> None:
    started = time.monotonic()
    rabbit = RabbitCluster.create(tmp_path / "rabbit", BROKER_NODES)
    redis_set = SentinelSet.create(tmp_path / "redis")
    node_process: subprocess.Popen[bytes] | None = None
    try:
        # Redis first: its Sentinels learn of the replica (from the primary's INFO, every 10 s) while RabbitMQ boots.
        redis_set.start()
        phases = rabbit.start()
        _say(f"engines up in {time.monotonic() - started:.1f}s ({BROKER_NODES} RabbitMQ members; "
             + ", ".join(f"{k} {v:.1f}s" for k, v in phases.items()) + ")")
        prefix = f"t{os.urandom(5).hex()}"
        node_port, ami_port = free_port(), free_port()
        # The gateway lists the members in order, the node in reverse: they sit on different members.
        config = tmp_path / "node.json"
        config.write_text(json.dumps({
            "Asterisk": {"url": "127.0.0.1", "port": ami_port, "userName": "admin", "secret": SECRET,
                         "protocol": "SIP,PJSIP"},
            "Cluster": {"amqpUrls": list(reversed(rabbit.urls)), "redisUrl": redis_set.url, "prefix": prefix},
        }))
        with open(tmp_path / "node.log", "ab") as log_file:
            node_process = subprocess.Popen(
                [sys.executable, "-m", "ws_node", "--config", str(config), "--port", str(node_port),
                 "--node-id", f"{prefix}-n1"],
                stdout=log_file, stderr=subprocess.STDOUT,
                env={**os.environ, "CMS_NODE_SIGNALR_TOKEN_SECRET": "x" * 32},
            )
        cluster = ClusterConfig(amqp_url=rabbit.urls[0], amqp_urls=tuple(rabbit.urls),
                                redis_url=redis_set.url, prefix=prefix, command_ttl_seconds=5.0)
        asterisk = AsteriskConfig(url="127.0.0.1", port=ami_port, user_name="admin", secret=SECRET,
                                  queue_extension_format="Local/{0}@from-queue/n", protocol="SIP,PJSIP")

        node = node_process

        async def main() -> None:
            await _until(lambda: _replica_known(redis_set), STEP, "Sentinels see the replica")
            async with AmiSimulator(port=ami_port, users={"admin": SECRET}, time_scale=0.4) as sim:
                async with running_gateway(Settings(asterisk=asterisk, cluster=cluster)) as gateway:

                    def trouble() -> str | None:
                        if gateway.stepped_down.is_set():
                            return "the gateway stepped down (its log says why)"
                        if node.poll() is not None:
                            return f"the node exited with {node.returncode}; see {tmp_path / 'node.log'}"
                        return None

                    await _until(gateway.ready.is_set, STEP, "gateway active and resynced", trouble)
                    await _until(lambda: _get(f"http://127.0.0.1:{node_port}/health")[0] == 200, STEP,
                                 "node healthy", trouble)
                    await _traffic(sim, gateway, rabbit, redis_set, node_port, trouble)

        asyncio.run(main())
        _say(f"whole test {time.monotonic() - started:.1f}s")
    finally:
        if node_process is not None:
            node_process.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                node_process.wait(15)
            if node_process.poll() is None:
                node_process.kill()
        redis_set.stop()
        rabbit.stop()


async def _traffic(sim: AmiSimulator, gateway: Gateway, rabbit: RabbitCluster, redis_set: SentinelSet,
                   node_port: int, trouble: Trouble) -> None:
    agents = {line: CreatioAgent(f"ws://127.0.0.1:{node_port}/", line) for line in LINES}
    member = CreatioAgent(f"ws://127.0.0.1:{node_port}/", QUEUE_MEMBER)
    for agent in [*agents.values(), member]:
        await agent.connect()
        await agent.open()
    await _pause_state_round_trip(member, "Paused")
    played: Counter[str] = Counter()
    stop = asyncio.Event()

    async def calls_on(line: str) -> None:
        number = 0
        while not stop.is_set():
            number += 1
            call = sim.play("inbound-direct-answered", line=line, caller=f"7916{line}{number:04d}")
            played[line] += 1
            await sim.wait_call(call, timeout=60)
            await asyncio.sleep(0.1)

    callers = [asyncio.create_task(calls_on(line)) for line in LINES]
    try:
        await _until(lambda: min(played.values(), default=0) >= 2, STEP, "calls before the broker loss", trouble)

        # 1. The RabbitMQ member the node is attached to (the last: its list is reversed) dies.
        failovers = _metric(node_port, "cms_broker_failovers_total")
        rabbit.stop_node(rabbit.nodes[-1])
        _say(f"broker member {rabbit.nodes[-1].name} killed after {dict(played)} calls")
        await _until(lambda: _metric(node_port, "cms_broker_failovers_total") > failovers, STEP,
                     "the node on another broker member", trouble)
        mark = sum(played.values())
        await _until(lambda: sum(played.values()) >= mark + 3, STEP, "calls after the broker loss", trouble)
        if len(rabbit.nodes) >= 3:
            # The quorum commands queue kept its majority: a command still goes node -> gateway -> PBX.
            await _pause_state_round_trip(member, "Active")

        # 2. The Redis primary dies; Sentinel promotes the replica.
        epoch, server = gateway.sequencer.epoch, gateway.lease.server.run_id
        assert server, "the gateway knows which Redis server holds its lease"
        old_primary = await _primary_port(redis_set)
        assert redis_set.primary is not None and old_primary == redis_set.primary.port
        redis_set.kill(redis_set.primary)
        _say(f"Redis primary :{old_primary} killed after {dict(played)} calls")
        await _until(lambda: _primary_changed(redis_set, old_primary), STEP, "Sentinel promoted the replica", trouble)
        await _until(lambda: gateway.sequencer.epoch != epoch, STEP, "the gateway restated under a new epoch", trouble)
        _say(f"gateway restated: epoch {epoch} -> {gateway.sequencer.epoch}")
        assert gateway.lease.server.run_id != server, "the restate came from seeing another Redis server"
        if len(rabbit.nodes) >= 3:
            await _pause_state_round_trip(member, "Paused")
        mark = sum(played.values())
        await _until(lambda: sum(played.values()) >= mark + 3, STEP, "calls after the Redis failover", trouble)
    finally:
        stop.set()
        await asyncio.gather(*callers, return_exceptions=True)

    _say(f"traffic stopped after {dict(played)} calls")
    # Every call played reached its agent, start and end, and no agent was cut off.
    for line, agent in agents.items():
        await _until(lambda a=agent, n=played[line]: _ended(a) >= n, STEP, f"every call on {line} ended at its agent")
        rings = {_call_id(r.content) for r in agent.events if r.event_type == RING_STARTED}
        assert len(rings) == played[line], f"line {line}: {len(rings)} RING_STARTED for {played[line]} calls"
        assert not agent.closed, f"agent {line} was disconnected"
    assert not member.closed, "the queue member's agent was disconnected"
    for agent in [*agents.values(), member]:
        await agent.close()


async def _pause_state_round_trip(agent: CreatioAgent, code: str) -> None:
    mark = len(agent.events)
    await agent.send("SetMsgUserState", {"code": code, "reason": ""})
    state = await agent.wait_for(AGENT_STATE_CHANGED, lambda r: r.content == code, after=mark, timeout=STEP)
    _say(f"command round trip: {agent.line} is {state.content}")


def _say(text: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {text}", flush=True)


async def _primary_changed(group: SentinelSet, old: int) -> bool:
    try:
        return await _primary_port(group) != old
    except (OSError, aioredis.RedisError):
        return False


def _ended(agent: CreatioAgent) -> int:
    return len({_call_id(r.content) for r in agent.events if r.event_type == RING_FINISHED})


def _call_id(content: object) -> str:
    assert isinstance(content, dict), content
    return str(content["id"])
