"""Reconnects without phantom calls, through the real cluster.

Creatio's client, after a drop, reconnects about 5 s later and only asks for a snapshot. It gets the
calls live now, in their current state, whichever node it lands on; calls that rang and ended
meanwhile are not replayed (Creatio would show each replayed ring as a new incoming call; they are in
Creatio's call records instead, issue 11). The node still reads the gap (metrics, log), and when the
line's history no longer covers it, says so.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from typing import Any

import pytest
import redis

from local_cluster.launcher import LocalCluster, http_get
from tests.support.creatio_client import (
    ACTIVE_CALL_SNAPSHOT,
    COMMUTATION_STARTED,
    RING_FINISHED,
    RING_STARTED,
    CreatioAgent,
    Received,
    calls_in_snapshot,
)

pytestmark = pytest.mark.e2e

CALLER = "79160001122"


def metric(cluster: LocalCluster, name: str, **labels: str) -> float:
    """Sum of a metric over the nodes still running."""
    total = 0.0
    wanted = [f'{k}="{v}"' for k, v in labels.items()]
    for port in cluster.node_ports:
        try:
            status, body = http_get(f"http://127.0.0.1:{port}/metrics")
        except OSError:
            continue
        for line in body.decode().splitlines():
            if line.startswith(name) and all(w in line for w in wanted):
                total += float(line.rsplit(" ", 1)[1])
    return total


def node_of_agents(cluster: LocalCluster) -> list[str]:
    names = []
    for index, port in enumerate(cluster.node_ports):
        try:
            status, body = http_get(f"http://127.0.0.1:{port}/health")
        except OSError:  # a node we killed
            continue
        if status == 200 and json.loads(body).get("clients", 0) > 0:
            names.append(f"node{index + 1}")
    return names


async def wait_line_idle_after(cluster: LocalCluster, line: str, min_seq: int, timeout: float = 30.0) -> int:
    """Wait until the gateway has written at least ``min_seq`` events for ``line`` and no call is active."""
    client = redis.Redis.from_url(cluster.redis_url)
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pos = client.hgetall(f"{cluster.prefix}:line:{line}:pos")
            seq = int(pos.get(b"seq", 0)) if pos else 0
            if seq >= min_seq and client.hlen(f"{cluster.prefix}:line:{line}:calls") == 0:
                return seq
            await asyncio.sleep(0.1)
        entries: Any = client.xrange(f"{cluster.prefix}:line:{line}:events")
        history = [fields[b"e"][:300] for _id, fields in entries]
        raise AssertionError(f"line {line} did not settle: {pos}, history {history}")
    finally:
        client.close()


def line_seq(cluster: LocalCluster, line: str) -> int:
    client = redis.Redis.from_url(cluster.redis_url)
    try:
        pos = client.hgetall(f"{cluster.prefix}:line:{line}:pos")
        return int(pos.get(b"seq", 0)) if pos else 0
    finally:
        client.close()


def before_snapshot(agent: CreatioAgent) -> tuple[list[Received], Received]:
    """Events between the last CONNECTION_CREATED and the snapshot that followed it."""
    tail = agent.events[agent.opened_at:]
    for index, item in enumerate(tail):
        if item.event_type == ACTIVE_CALL_SNAPSHOT:
            return tail[:index], item
    raise AssertionError("no snapshot after the reconnect")


def call_id(item: Received) -> Any:
    assert isinstance(item.content, dict), item.content
    return item.content["id"]


def test_calls_that_rang_and_ended_during_a_drop_are_not_replayed(cluster: LocalCluster) -> None:
    async def main() -> None:
        agent = CreatioAgent(cluster.client_url, "401")
        await agent.connect()
        snapshot = await agent.open()
        assert calls_in_snapshot(snapshot) == []
        await asyncio.sleep(1.0)  # the node writes delivery positions every 0.5 s
        start_seq = line_seq(cluster, "401")
        await agent.close()  # the browser lost its network

        await asyncio.to_thread(cluster.play, "inbound-direct-answered", line="401", caller=CALLER)
        await wait_line_idle_after(cluster, "401", start_seq + 3)
        replayed_before = metric(cluster, "cms_node_replayed_events_total")

        snapshot = await agent.reconnect()
        try:
            gap, snapshot = before_snapshot(agent)
            types = [e.event_type for e in gap]
            assert not {RING_STARTED, COMMUTATION_STARTED, RING_FINISHED} & set(types), types  # no phantom call
            assert calls_in_snapshot(snapshot) == []
            assert metric(cluster, "cms_node_replayed_events_total") == replayed_before
            assert metric(cluster, "cms_node_reconnect_catchups_total", outcome="replayed") >= 1  # gap was read

            # a second reconnect with nothing new in between replays nothing
            await asyncio.sleep(1.0)
            await agent.reconnect()
            gap, snapshot = before_snapshot(agent)
            assert gap == [] or all(e.event_type not in (RING_STARTED, RING_FINISHED) for e in gap)
        finally:
            await agent.close()

    asyncio.run(main())


def test_node_killed_the_agent_comes_back_on_the_other_node_with_the_gap(cluster: LocalCluster) -> None:
    async def main() -> None:
        agent = CreatioAgent(cluster.client_url, "402")
        await agent.connect()
        await agent.open()
        await asyncio.sleep(1.0)
        (node,) = node_of_agents(cluster)
        start_seq = line_seq(cluster, "402")
        cluster.kill(node)
        for _ in range(100):
            if agent.closed:
                break
            await asyncio.sleep(0.05)
        assert agent.closed
        await agent.close()

        # in the gap: a call nobody answered, over, then a call still going on at the reconnect
        await asyncio.to_thread(cluster.play, "inbound-direct-abandoned", line="402", caller=CALLER)
        await wait_line_idle_after(cluster, "402", start_seq + 2)
        await asyncio.to_thread(cluster.play, "inbound-direct-long", line="402", caller="79995550000")
        client = redis.Redis.from_url(cluster.redis_url)
        try:
            for _ in range(150):
                if client.hlen(f"{cluster.prefix}:line:402:calls"):
                    break
                await asyncio.sleep(0.1)
        finally:
            client.close()

        snapshot = await agent.reconnect()
        try:
            assert node_of_agents(cluster) != [node]
            gap, snapshot = before_snapshot(agent)
            types = [e.event_type for e in gap]
            assert not {RING_STARTED, COMMUTATION_STARTED, RING_FINISHED} & set(types), types  # not replayed ...
            live = calls_in_snapshot(snapshot)
            assert [c["callerId"] for c in live] == ["79995550000"]  # ... it is in the snapshot
        finally:
            await agent.close()

    asyncio.run(main())


def test_gap_older_than_the_history_is_reported_and_the_snapshot_sent(cluster: LocalCluster) -> None:
    async def main() -> None:
        agent = CreatioAgent(cluster.client_url, "403")
        await agent.connect()
        await agent.open()
        await asyncio.sleep(1.0)
        start_seq = line_seq(cluster, "403")
        await agent.close()

        await asyncio.to_thread(cluster.play, "inbound-direct-answered", line="403", caller=CALLER)
        await wait_line_idle_after(cluster, "403", start_seq + 3)
        # the history was trimmed past the agent's position (MAXLEN, or a long absence)
        client = redis.Redis.from_url(cluster.redis_url)
        try:
            client.delete(f"{cluster.prefix}:line:403:events")
        finally:
            client.close()
        gone_before = metric(cluster, "cms_node_reconnect_catchups_total", outcome="history_gone")

        snapshot = await agent.reconnect()
        try:
            gap, snapshot = before_snapshot(agent)
            assert [e for e in gap if e.event_type in (RING_STARTED, COMMUTATION_STARTED, RING_FINISHED)] == []
            assert calls_in_snapshot(snapshot) == []
            assert metric(cluster, "cms_node_reconnect_catchups_total", outcome="history_gone") == gone_before + 1
            logs = "".join(cluster.child(n).log_path.read_text(errors="replace") for n in ("node1", "node2"))
            assert re.search(r"line 403 user \S+: the history no longer covers the gap", logs)
        finally:
            await agent.close()

    asyncio.run(main())
