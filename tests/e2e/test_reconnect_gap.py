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
import urllib.parse
from pathlib import Path
from typing import Any

import pytest
import redis

from local_cluster.infra import Infrastructure
from local_cluster.launcher import ClusterOptions, LocalCluster, http_get
from ops.chaos.fault_proxy import CUT, PASS, ProxyThread
from services.wire import EventType, LineEvent
from tests.e2e.test_signalr import SignalRAgent, content, ensure_signalr_client, opened
from tests.support.creatio_client import (
    ABONENT_BUSY,
    ACTIVE_CALL_SNAPSHOT,
    CALL_INFO_CHANGED,
    COMMUTATION_STARTED,
    END_HOLD_ACTION,
    ERROR,
    PUT_HOLD_ACTION,
    RING_FINISHED,
    RING_STARTED,
    CreatioAgent,
    Received,
    calls_in_snapshot,
)

pytestmark = pytest.mark.e2e

CALLER = "79160001122"
#: every event that tells the client about a call
CALL_EVENTS = frozenset({RING_STARTED, COMMUTATION_STARTED, RING_FINISHED, PUT_HOLD_ACTION, END_HOLD_ACTION,
                         CALL_INFO_CHANGED, ABONENT_BUSY})


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

            # a second reconnect with nothing new in between finds nothing missed and replays nothing
            await asyncio.sleep(1.0)  # the node writes the position the first catch-up reached every 0.5 s
            nothing_missed = metric(cluster, "cms_node_reconnect_catchups_total", outcome="nothing_missed")
            replayed_before = metric(cluster, "cms_node_replayed_events_total")
            await agent.reconnect()
            gap, snapshot = before_snapshot(agent)
            assert [e.event_type for e in gap if e.event_type in CALL_EVENTS] == []
            assert calls_in_snapshot(snapshot) == []
            assert metric(cluster, "cms_node_reconnect_catchups_total", outcome="nothing_missed") == nothing_missed + 1
            assert metric(cluster, "cms_node_replayed_events_total") == replayed_before
        finally:
            await agent.close()

    asyncio.run(main())


def test_calls_that_rang_and_ended_during_a_drop_are_not_replayed_over_signalr(cluster: LocalCluster) -> None:
    """Creatio 8.x (Microsoft's SignalR client): the panel comes back as the same tab (its libraryInstanceUId)
    and user; the node reads the gap, yet the agent sees no ring of the call that came and went, only the
    snapshot."""
    script = ensure_signalr_client()
    url = f"http://127.0.0.1:{cluster.options.haproxy_port}/"
    user = "0e110000-0000-4000-8000-000000000403"

    async def main() -> None:
        first = SignalRAgent(script, url, "403", "--user", user)
        await first.start()
        try:
            assert content(await opened(first)) == {"ActiveCalls": [], "CurrentCall": None}
            [library] = [i["envelope"]["content"] for i in first.events(1)]  # LIBRARY_INITIALIZED
            await asyncio.sleep(1.0)  # the node writes delivery positions every 0.5 s
            start_seq = line_seq(cluster, "403")
        finally:
            await first.stop()  # the browser lost its network

        await asyncio.to_thread(cluster.play, "inbound-direct-answered", line="403", caller=CALLER)
        await wait_line_idle_after(cluster, "403", start_seq + 3)
        read_before = metric(cluster, "cms_node_reconnect_catchups_total", outcome="replayed")

        again = SignalRAgent(script, url, "403", "--user", user, "--library", library)
        await again.start()
        try:
            snapshot = await opened(again)
            assert content(snapshot) == {"ActiveCalls": [], "CurrentCall": None}
            assert [i["envelope"]["content"] for i in again.events(1)] == [library]  # the same tab
            calls = {RING_STARTED, COMMUTATION_STARTED, RING_FINISHED}
            assert not [i for i in again.events() if i["eventType"] in calls], again.events()  # no phantom call
            assert metric(cluster, "cms_node_reconnect_catchups_total", outcome="replayed") >= read_before + 1
        finally:
            await again.stop()

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


# ---- lifecycle: gateway restart, broker outage (issue 10.1, 10.2) -----------------------------------


def seed_earlier_run(redis_url: str, prefix: str, line: str, calls: int = 3) -> None:
    """What an earlier run of the cluster left in the namespace: a line's history, position and
    state under an old epoch, every call over (its gateway is long gone)."""
    client = redis.Redis.from_url(redis_url)
    epoch = str(int(time.time() * 1000) - 3_600_000)
    try:
        pipe = client.pipeline(transaction=True)
        seq = 0
        for kind in (EventType.RING_STARTED, EventType.RING_FINISHED) * calls:
            seq += 1
            event = LineEvent(line=line, type=kind, epoch=epoch, seq=seq)
            pipe.xadd(f"{prefix}:line:{line}:events", {"e": event.encode()}, id=f"{epoch}-{seq}")
        pipe.hset(f"{prefix}:line:{line}:pos", mapping={"epoch": epoch, "seq": seq})
        pipe.sadd(f"{prefix}:lines", line)
        pipe.set(f"{prefix}:epoch", epoch)
        pipe.execute()
    finally:
        client.close()


def active_epoch(cluster: LocalCluster) -> str:
    """The epoch of the gateway that holds the lease and has resynced ('' when none does)."""
    for port in cluster.gateway_ports:
        status, body = http_get(f"http://127.0.0.1:{port}/health")
        details = json.loads(body) if status == 200 else {}
        if details.get("role") == "active" and details.get("epoch"):
            return str(details["epoch"])
    return ""


def wait_for_an_active_gateway(cluster: LocalCluster, timeout: float, not_epoch: str = "") -> None:
    """Until a gateway holds the lease in an epoch other than ``not_epoch`` and has resynced."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if active_epoch(cluster) not in ("", not_epoch):
            return
        time.sleep(0.1)
    raise AssertionError(f"no gateway active in a new epoch within {timeout:.0f}s")


def call_events(agent: CreatioAgent, caller: str, after: int) -> list[int]:
    return [
        e.event_type
        for e in agent.events[after:]
        if e.event_type in (RING_STARTED, COMMUTATION_STARTED, RING_FINISHED)
        and isinstance(e.content, dict)
        and e.content.get("callerId") == caller
    ]


async def wait_call_over(agent: CreatioAgent, caller: str, after: int, timeout: float = 30.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while RING_FINISHED not in call_events(agent, caller, after):
        if time.monotonic() > deadline:
            seen = [(e.event_type, e.content) for e in agent.events[after:]][-8:]
            raise AssertionError(f"line {agent.line}: call from {caller} not over in {timeout:.0f}s; saw {seen}")
        await asyncio.sleep(0.1)
    return call_events(agent, caller, after)


def test_first_call_after_a_gateway_restart_rings_over_an_earlier_runs_namespace(
    infra: Infrastructure, tmp_path: Path
) -> None:
    """Issue 10.1 reproduced: line 407 starts from an earlier run's state (old epoch in Redis when
    the agent opens); line 404 lives through a gateway restart. Each agent's first call after
    either must arrive as RING_STARTED, COMMUTATION_STARTED, RING_FINISHED. And an agent away
    during the restart (line 408) gets the call it missed replayed, across the epochs."""
    options = ClusterOptions.ephemeral(tmp_path / "run", amqp_url=infra.amqp_url, redis_url=infra.redis_url)
    seed_earlier_run(infra.redis_url, options.prefix, "407")
    cluster = LocalCluster(options)
    cluster.start(timeout=60)

    async def main() -> None:
        agents = {line: CreatioAgent(cluster.client_url, line) for line in ("404", "407")}
        away = CreatioAgent(cluster.client_url, "408")
        for agent in (*agents.values(), away):
            await agent.connect()
            await agent.open()
        try:
            await asyncio.to_thread(cluster.play, "inbound-direct-answered", line="408", caller="79160000408")
            await wait_call_over(away, "79160000408", 0)  # 408 has a history in the first epoch
            for round_ in ("first run", "after restart"):
                marks = {line: len(agent.events) for line, agent in agents.items()}
                callers = {line: f"7916{line}{len(round_):04d}" for line in agents}
                for line in agents:
                    await asyncio.to_thread(cluster.play, "inbound-direct-answered", line=line, caller=callers[line])
                for line, agent in agents.items():
                    types = await wait_call_over(agent, callers[line], marks[line])
                    assert types == [RING_STARTED, COMMUTATION_STARTED, RING_FINISHED], (round_, line, types)
                if round_ == "first run":
                    await asyncio.sleep(1.0)  # the node writes delivery positions every 0.5 s
                    await away.close()
                    await asyncio.to_thread(cluster.restart, "gateway")
                    await asyncio.to_thread(cluster.play, "inbound-direct-answered", line="408", caller=CALLER)
                    await wait_line_idle_after(cluster, "408", 3)
            assert all(not agent.closed for agent in agents.values())

            # The agent that was away during the restart: the call that rang and ended meanwhile is not
            # replayed (issue 11: Creatio would pop it up as a new call; it is in the call records), and
            # the snapshot across the epoch change is right: nothing is live on 408.
            await away.reconnect()
            gap, snapshot = before_snapshot(away)
            types = [e.event_type for e in gap if e.event_type in (RING_STARTED, COMMUTATION_STARTED, RING_FINISHED)]
            assert types == [], types
            assert calls_in_snapshot(snapshot) == []
            assert not away.closed
        finally:
            for agent in (*agents.values(), away):
                await agent.close()

    try:
        asyncio.run(main())
    finally:
        cluster.stop()


def node_health(cluster: LocalCluster) -> list[tuple[int, dict[str, Any]]]:
    answers = []
    for port in cluster.node_ports:
        status, body = http_get(f"http://127.0.0.1:{port}/health")
        answers.append((status, json.loads(body)))
    return answers


def haproxy_up(cluster: LocalCluster) -> int:
    status, body = http_get(f"http://127.0.0.1:{cluster.options.stats_port}/stats;csv")
    return sum(1 for row in body.decode().splitlines() if row.startswith("ws_nodes,node") and ",UP," in row)


async def wait_broker(cluster: LocalCluster, state: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        health = node_health(cluster)
        if all(body.get("broker") == state for _status, body in health):
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"nodes' broker not {state} within {timeout:.0f}s: {health}")
        await asyncio.sleep(0.2)


def test_broker_outage_keeps_every_agent_connected_and_calls_ring_after(infra: Infrastructure, tmp_path: Path) -> None:
    """Issue 10.2: the broker goes away for 5 s, then for 30 s (every process's link to it cut, as
    a restart does). Nodes stay UP in HAProxy, no agent is disconnected (raw WebSocket and SignalR),
    a command meanwhile gets a clear ERROR, a call that rang during the outage reaches its agent,
    and calls ring after."""
    signalr_script = ensure_signalr_client()
    target = urllib.parse.urlsplit(infra.amqp_url)
    proxy = ProxyThread("broker", target.hostname or "127.0.0.1", target.port or 5672)
    proxy.start()
    credentials = target.netloc.rpartition("@")[0]
    proxied = target._replace(netloc=f"{credentials}@127.0.0.1:{proxy.port}").geturl()
    cluster = LocalCluster(
        ClusterOptions.ephemeral(
            tmp_path / "run", amqp_url=proxied, redis_url=infra.redis_url,
            extra_env={"CMS_NODE_SIGNALR_TOKEN_SECRET": "outage-test-secret"},
        )
    )
    cluster.start(timeout=60)
    lines = ("421", "422", "423", "424")

    async def main() -> None:
        agents = [CreatioAgent(cluster.client_url, line) for line in lines]
        for agent in agents:
            await agent.connect()
            await agent.open()
        # and one Creatio 8.x agent: Microsoft's SignalR client, through HAProxy too
        signalr = SignalRAgent(signalr_script, f"http://127.0.0.1:{cluster.options.haproxy_port}/", "425")
        await signalr.start()
        await opened(signalr)
        try:
            for outage in (5.0, 30.0):
                proxy.set_fault(CUT)
                cut_at = time.monotonic()
                await wait_broker(cluster, "down", timeout=20)
                assert all(status == 200 for status, _body in node_health(cluster))

                mark = len(agents[0].events)
                await agents[0].send("MakeCall", {"targetAddress": "5550100"})
                error = await agents[0].wait_for(ERROR, after=mark, timeout=15)
                assert "broker" in json.dumps(error.content), error.content

                during = f"7917{int(outage):03d}0001"
                during_mark = len(agents[1].events)
                await asyncio.to_thread(cluster.play, "inbound-direct-answered", line=lines[1], caller=during)

                while time.monotonic() - cut_at < outage:
                    assert haproxy_up(cluster) == len(cluster.node_ports)
                    assert not any(agent.closed for agent in agents)
                    await asyncio.sleep(0.5)
                proxy.set_fault(PASS)
                await wait_broker(cluster, "connected")

                # the call of the outage reaches its agent whole (republished or repaired from Redis)
                types = await wait_call_over(agents[1], during, during_mark, timeout=45)
                assert types[0] == RING_STARTED and types[-1] == RING_FINISHED, types

                marks = [len(agent.events) for agent in agents]
                callers = [f"7918{int(outage):03d}{line}" for line in lines]
                for line, caller in zip(lines, callers, strict=True):
                    await asyncio.to_thread(cluster.play, "inbound-direct-answered", line=line, caller=caller)
                signalr_mark = len(signalr.lines)
                signalr_caller = f"7919{int(outage):03d}0425"
                await asyncio.to_thread(cluster.play, "inbound-direct-answered", line="425", caller=signalr_caller)
                for agent, caller, mark in zip(agents, callers, marks, strict=True):
                    types = await wait_call_over(agent, caller, mark, timeout=45)
                    assert types == [RING_STARTED, COMMUTATION_STARTED, RING_FINISHED], (outage, agent.line, types)
                ring = await signalr.event(RING_STARTED, timeout=45, after=signalr_mark)
                assert content(ring)["callerId"] == signalr_caller
                await signalr.event(RING_FINISHED, timeout=45, after=signalr_mark)
                assert not any(agent.closed for agent in agents)
                assert not [i for i in signalr.lines if i["kind"] == "closed"], signalr.lines[-5:]
            assert metric(cluster, "cms_broker_reconnects_total") >= 2 * len(cluster.node_ports)
        finally:
            for agent in agents:
                await agent.close()
            await signalr.stop()

    try:
        asyncio.run(main())
    finally:
        cluster.stop()
        proxy.stop()


def test_redis_emptied_under_a_connected_agent_the_next_call_still_rings(cluster: LocalCluster) -> None:
    """Issue 10.3 at the node: every key of the namespace vanishes (Redis restarted empty). The
    agent stays connected, its next call arrives whole, and a reconnect gets a true snapshot."""

    async def main() -> None:
        agent = CreatioAgent(cluster.client_url, "409")
        await agent.connect()
        await agent.open()
        try:
            await asyncio.to_thread(cluster.play, "inbound-direct-answered", line="409", caller="79160000409")
            await wait_call_over(agent, "79160000409", 0)

            client = redis.Redis.from_url(cluster.redis_url)
            try:
                before = active_epoch(cluster)
                keys = list(client.scan_iter(f"{cluster.prefix}:*", count=1000))
                client.delete(*keys)
            finally:
                client.close()

            # The lease went with the keys: a gateway takes it again, in a new epoch, and restates from
            # AMI. A call that rings inside that takeover (about 2 s) is make chaos's business; this is
            # the next one.
            await asyncio.to_thread(wait_for_an_active_gateway, cluster, 20.0, before)
            mark = len(agent.events)
            await asyncio.to_thread(cluster.play, "inbound-direct-answered", line="409", caller=CALLER)
            types = await wait_call_over(agent, CALLER, mark)
            assert types == [RING_STARTED, COMMUTATION_STARTED, RING_FINISHED], types
            assert not agent.closed

            await asyncio.sleep(1.0)
            snapshot = await agent.reconnect()
            assert calls_in_snapshot(snapshot) == []
        finally:
            await agent.close()

    asyncio.run(main())


def test_a_call_ringing_across_a_gateway_restart_rings_once_and_ends(cluster: LocalCluster) -> None:
    """The restarted gateway restates the live call in its new epoch (same call id): the agent's
    panel must not pop it up a second time, and must still see it end."""

    async def main() -> None:
        agent = CreatioAgent(cluster.client_url, "410")
        await agent.connect()
        await agent.open()
        try:
            await asyncio.to_thread(cluster.play, "inbound-direct-noanswer", line="410", caller=CALLER)  # rings 15 s
            await agent.wait_for(RING_STARTED, lambda r: r.content.get("callerId") == CALLER, timeout=15)
            await asyncio.to_thread(cluster.restart, "gateway")
            types = await wait_call_over(agent, CALLER, 0, timeout=40)
            assert types == [RING_STARTED, RING_FINISHED], types
            assert not agent.closed
        finally:
            await agent.close()

    asyncio.run(main())
