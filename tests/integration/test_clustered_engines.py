"""Past one machine: the gateway and a node on a RabbitMQ cluster and a Sentinel-managed Redis, started here on
loopback, under call traffic. The broker member the node is attached to dies, then the Redis primary dies and
Sentinel promotes the replica: every call still reaches its agent (RING_STARTED and RING_FINISHED), no agent is
disconnected, the node moved to another member (cms_broker_failovers_total) and the gateway, seeing another Redis
server behind its lease, restated every line under a new epoch. With 3 members the quorum commands queue keeps
its majority, so an agent's command (a queue pause) still goes through after each failure; with 2 it cannot
(losing either member loses the majority), and commands are not checked.

The suite runs it with 2 RabbitMQ members; ``make engines-test`` runs it with 3 (CMS_ENGINES_BROKER_NODES=3).
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

# A RabbitMQ cluster plus Sentinel on a 2-core machine: it timed out once in a full `make test` run
# (the gateway's restate after the Redis failover not seen within 60 s) and passed in others. Until
# that is understood it runs by `make engines-test`, not in every `make test`.
pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not os.environ.get("CMS_ENGINES_BROKER_NODES"),
                       reason="clustered engines: run `make engines-test` (CMS_ENGINES_BROKER_NODES=2 or 3)"),
]

BROKER_NODES = int(os.environ.get("CMS_ENGINES_BROKER_NODES", "2"))
LINES = ("301", "302", "303")
#: a member of the simulator's "support" queue: its pause state is a command that goes through the commands queue
QUEUE_MEMBER = "305"


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


async def _until(predicate: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate() if callable(predicate) else predicate
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return
        assert time.monotonic() < deadline, f"{what} not reached within {timeout:.0f}s"
        await asyncio.sleep(0.2)


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


@pytest.mark.timeout(900)
def test_calls_ride_a_broker_member_loss_then_a_redis_primary_failover(tmp_path: Path) -> None:
    started = time.monotonic()
    rabbit = RabbitCluster.create(tmp_path / "rabbit", BROKER_NODES)
    redis_set = SentinelSet.create(tmp_path / "redis")
    node_process: subprocess.Popen[bytes] | None = None
    try:
        rabbit.start()
        redis_set.start()
        print(f"engines up in {time.monotonic() - started:.1f}s ({BROKER_NODES} RabbitMQ members)")
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

        async def main() -> None:
            await _until(lambda: _replica_known(redis_set), 30, "Sentinels see the replica")
            async with AmiSimulator(port=ami_port, users={"admin": SECRET}, time_scale=0.4) as sim:
                async with running_gateway(Settings(asterisk=asterisk, cluster=cluster)) as gateway:
                    await _until(gateway.ready.is_set, 60, "gateway active and resynced")
                    await _until(lambda: _get(f"http://127.0.0.1:{node_port}/health")[0] == 200, 60, "node healthy")
                    await _traffic(sim, gateway, rabbit, redis_set, node_port)

        asyncio.run(main())
        print(f"whole test {time.monotonic() - started:.1f}s")
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
                   node_port: int) -> None:
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
        await _until(lambda: min(played.values(), default=0) >= 2, 60, "calls before the broker loss")

        # 1. The RabbitMQ member the node is attached to (the last: its list is reversed) dies.
        failovers = _metric(node_port, "cms_broker_failovers_total")
        rabbit.stop_node(rabbit.nodes[-1])
        _say(f"broker member {rabbit.nodes[-1].name} killed after {dict(played)} calls")
        await _until(lambda: _metric(node_port, "cms_broker_failovers_total") > failovers, 60,
                     "the node on another broker member")
        mark = sum(played.values())
        await _until(lambda: sum(played.values()) >= mark + 3, 60, "calls after the broker loss")
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
        await _until(lambda: _primary_changed(redis_set, old_primary), 60, "Sentinel promoted the replica")
        _say("Sentinel promoted the replica")
        await _until(lambda: gateway.sequencer.epoch != epoch, 60, "the gateway restated under a new epoch")
        _say(f"gateway restated: epoch {epoch} -> {gateway.sequencer.epoch}")
        assert gateway.lease.server.run_id != server, "the restate came from seeing another Redis server"
        if len(rabbit.nodes) >= 3:
            await _pause_state_round_trip(member, "Paused")
        mark = sum(played.values())
        await _until(lambda: sum(played.values()) >= mark + 3, 60, "calls after the Redis failover")
    finally:
        stop.set()
        await asyncio.gather(*callers, return_exceptions=True)

    _say(f"traffic stopped after {dict(played)} calls")
    # Every call played reached its agent, start and end, and no agent was cut off.
    for line, agent in agents.items():
        await _until(lambda a=agent, n=played[line]: _ended(a) >= n, 60, f"every call on {line} ended at its agent")
        rings = {_call_id(r.content) for r in agent.events if r.event_type == RING_STARTED}
        assert len(rings) == played[line], f"line {line}: {len(rings)} RING_STARTED for {played[line]} calls"
        assert not agent.closed, f"agent {line} was disconnected"
    assert not member.closed, "the queue member's agent was disconnected"
    for agent in [*agents.values(), member]:
        await agent.close()


async def _pause_state_round_trip(agent: CreatioAgent, code: str) -> None:
    mark = len(agent.events)
    await agent.send("SetMsgUserState", {"code": code, "reason": ""})
    state = await agent.wait_for(AGENT_STATE_CHANGED, lambda r: r.content == code, after=mark, timeout=30)
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
