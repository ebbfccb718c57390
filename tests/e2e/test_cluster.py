"""The whole production topology: simulator -> gateway -> RabbitMQ -> 2 nodes -> HAProxy -> agent.

Every process is a real subprocess started by the same launcher `make run` uses, on free
ports and under a namespace of its own.
"""

from __future__ import annotations

import asyncio
import json

import pytest

from local_cluster.launcher import LocalCluster, http_get
from tests.support.creatio_client import (
    COMMUTATION_STARTED,
    RING_FINISHED,
    RING_STARTED,
    CreatioAgent,
    calls_in_snapshot,
)

pytestmark = pytest.mark.e2e

CALLER = "79161234567"


def _call_of(content: object) -> dict[str, object]:
    assert isinstance(content, dict), content
    return content


def test_every_process_serves_metrics_and_health(cluster: LocalCluster) -> None:
    def at(port: int, health: str = "/health") -> tuple[str, str]:
        return f"http://127.0.0.1:{port}/metrics", f"http://127.0.0.1:{port}{health}"

    processes = {name: at(port) for name, port in zip(cluster.gateway_names, cluster.gateway_ports, strict=True)}
    processes |= {f"node{i + 1}": at(port) for i, port in enumerate(cluster.node_ports)}
    processes["simulator"] = at(cluster.options.simulator_control_port)
    processes["haproxy"] = at(cluster.options.stats_port, "/healthz")  # its monitor-uri
    assert sorted(processes) == sorted(c.name for c in cluster.children)  # every process the launcher started
    answers = {}
    for name, (metrics, health) in processes.items():
        status, body = http_get(metrics)
        assert status == 200 and b"# TYPE" in body, name
        status, body = http_get(health)
        assert status == 200, name
        answers[name] = body
    gateways = [json.loads(answers[name]) for name in cluster.gateway_names]
    assert sorted(g["role"] for g in gateways) == ["active", "standby"]
    assert all(g["ami"] == "connected" for g in gateways)  # the standby is logged in too, events off
    nodes = [json.loads(answers[f"node{i + 1}"]) for i in range(len(cluster.node_ports))]
    assert all(n["broker"] == "connected" and n["feed"] == "running" for n in nodes)


def test_inbound_call_rings_the_agent_through_haproxy(cluster: LocalCluster) -> None:
    async def main() -> None:
        agent = CreatioAgent(cluster.client_url, "305")
        await agent.connect()
        try:
            snapshot = await agent.open()
            assert calls_in_snapshot(snapshot) == []
            mark = len(agent.events)
            await asyncio.to_thread(cluster.play, "inbound-direct-answered", line="305", caller=CALLER)
            ring = await agent.wait_for(RING_STARTED, after=mark, timeout=15)
            call = _call_of(ring.content)
            assert call["callerId"] == CALLER
            assert call["calledId"] in ("305", "4950000305")
            talk = await agent.wait_for(COMMUTATION_STARTED, after=mark, timeout=15)
            assert _call_of(talk.content)["id"] == call["id"]
            end = await agent.wait_for(RING_FINISHED, after=mark, timeout=20)
            assert _call_of(end.content)["id"] == call["id"]
            assert _call_of(end.content)["callerId"] == CALLER
        finally:
            await agent.close()

    asyncio.run(main())


def _node_of_agent(cluster: LocalCluster) -> str:
    for index, port in enumerate(cluster.node_ports):
        status, body = http_get(f"http://127.0.0.1:{port}/health")
        if status == 200 and json.loads(body)["clients"] > 0:
            return f"node{index + 1}"
    raise AssertionError("no node reports the agent")


def test_killing_the_agents_node_mid_call_keeps_the_call_in_the_snapshot(cluster: LocalCluster) -> None:
    async def main() -> None:
        agent = CreatioAgent(cluster.client_url, "306")
        await agent.connect()
        await agent.open()
        mark = len(agent.events)
        await asyncio.to_thread(cluster.play, "inbound-direct-long", line="306", caller=CALLER)
        talk = await agent.wait_for(COMMUTATION_STARTED, after=mark, timeout=15)
        call_id = _call_of(talk.content)["id"]

        cluster.kill(_node_of_agent(cluster))
        for _ in range(100):
            if agent.closed:
                break
            await asyncio.sleep(0.05)
        assert agent.closed, "HAProxy should cut the tunnel of the dead node"
        await agent.close()

        # Creatio's client reconnects to the same URL, then LoadLibrary/OpenConnection/snapshot.
        again = CreatioAgent(cluster.client_url, "306", user_uid=agent.user_uid)  # the same user
        await again.connect()
        try:
            snapshot = await again.open()
            calls = calls_in_snapshot(snapshot)
            assert [c["id"] for c in calls] == [call_id]
            assert calls[0]["callerId"] == CALLER
            assert calls[0]["state"] == 2  # GeneralizedCallState.CONNECTED
        finally:
            await again.close()

    asyncio.run(main())
