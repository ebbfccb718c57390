"""A node's line streams across gateway restarts, Redis losing everything, Redis away, broker away.

Real RabbitMQ and Redis, a real node feed; the gateway's side is played with its own writer and
publisher (write to Redis, publish to the exchange), so each test can order, delay or skip those
steps the way a restart or an outage does. Each test starts from a namespace that already holds
an earlier run's state, as a restart on a real deployment does.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import urllib.parse
from collections.abc import AsyncIterator, Callable

import pytest
import redis.asyncio as aioredis
from prometheus_client import REGISTRY

from ami_gateway.event_outbox import EventPublisher, Sequencer
from local_cluster.infra import Infrastructure
from ops.chaos.fault_proxy import CUT, PASS, FaultProxy
from services.delivery_log import AgentKey, DeliveryLog, RedisDeliveryStore
from services.line_state import LineStateReader, LineStateWriter
from services.topology import Topology
from services.wire import Command, CommandName, EventType, LineEvent, StreamPosition
from tests.integration.test_event_pipeline import Collector, _cleanup, _event
from tests.support.hand_gateway import HandGateway
from tests.support.waiting import until
from ws_node.line_feed import LineFeed, RabbitNodeBus

pytestmark = pytest.mark.integration


async def _until(predicate: Callable[[], bool], timeout: float = 15.0, what: str = "condition") -> None:
    await until(predicate, timeout, what)


#: the gateway's two writes, done by hand: Redis first, then the broker (as the outbox does)
Gateway = HandGateway[LineStateWriter, EventPublisher]


def _proxied(url: str, proxy: FaultProxy) -> str:
    parts = urllib.parse.urlsplit(url)
    credentials = parts.netloc.rpartition("@")[0]
    netloc = f"{credentials}@127.0.0.1:{proxy.port}" if credentials else f"127.0.0.1:{proxy.port}"
    return parts._replace(netloc=netloc).geturl()


@contextlib.asynccontextmanager
async def _world(
    infra: Infrastructure, prefix: str, *, amqp_url: str | None = None, redis_url: str | None = None
) -> AsyncIterator[tuple[Gateway, LineFeed, aioredis.Redis]]:
    topology = Topology(prefix)
    redis_client = aioredis.from_url(infra.redis_url)
    node_redis = aioredis.from_url(redis_url or infra.redis_url, socket_timeout=2.0, socket_connect_timeout=2.0)
    writer = LineStateWriter(redis_client, prefix)
    publisher = EventPublisher(infra.amqp_url, topology)
    gateway = Gateway(writer, publisher, Sequencer(await writer.new_epoch()))
    bus = RabbitNodeBus(amqp_url or infra.amqp_url, topology, "n1")
    feed = LineFeed("n1", bus, LineStateReader(node_redis, prefix), redis_timeout_seconds=3.0)
    try:
        await gateway.emit(_event("999", 0))  # the gateway declares the exchange
        await feed.start()
        await asyncio.wait_for(feed.connected.wait(), 15)
        yield gateway, feed, redis_client
    finally:
        await feed.stop()
        await publisher.close()
        await _cleanup(infra, prefix, redis_client)
        await redis_client.aclose()
        await node_redis.aclose()


def _positions(events: list[LineEvent]) -> list[tuple[str, int]]:
    return [(e.epoch, e.seq) for e in events]


def test_gateway_restart_over_an_earlier_runs_namespace_delivers_the_new_epochs_first_event(
    infra: Infrastructure, prefix: str
) -> None:
    """Issue 10.1: the node reads the previous epoch's position at OpenConnection; the restarted
    gateway's first event on the line (its RING_STARTED) must reach the agent as an event."""

    async def main() -> None:
        async with _world(infra, prefix) as (gateway, feed, _redis):
            old_epoch = gateway.sequencer.epoch
            await gateway.emit(*(_event("305", n) for n in range(1, 4)), publish=False)  # an earlier run
            tab = Collector()
            snapshot = await feed.follow(tab, "305")
            assert (snapshot.epoch, snapshot.seq) == (old_epoch, 3)

            new_epoch = await gateway.restart()
            (ring,) = await gateway.emit(_event("305", 10))
            await _until(lambda: len(tab.events) == 1, what="the first event of the new epoch")
            assert tab.events[0].type is EventType.RING_STARTED
            assert (tab.events[0].epoch, tab.events[0].seq) == (new_epoch, 1)
            assert tab.resyncs == []  # continuity was provable: no snapshot on top

            more = await gateway.emit(_event("305", 11), _event("305", 12))
            await _until(lambda: len(tab.events) == 3)
            assert _positions(tab.events) == _positions([ring, *more])

            # A straggler of the old epoch (a replaced gateway's late publish) is dropped.
            await feed.handle_event(_event("305", 99).positioned(old_epoch, 4))
            assert len(tab.events) == 3

    asyncio.run(main())


def test_node_following_a_line_whose_old_history_is_gone_gets_the_new_epoch_then_a_snapshot(
    infra: Infrastructure, prefix: str
) -> None:
    """Position from an old run, its history trimmed away: the new epoch is delivered from seq 1
    and, since what happened in between cannot be proven, the snapshot follows."""

    async def main() -> None:
        async with _world(infra, prefix) as (gateway, feed, redis_client):
            await gateway.emit(*(_event("306", n) for n in range(1, 6)), publish=False)
            await redis_client.delete(f"{prefix}:line:306:events")  # trimmed; the position stays
            tab = Collector()
            await feed.follow(tab, "306")

            new_epoch = await gateway.restart()
            await gateway.emit(_event("306", 20), _event("306", 21))
            await _until(lambda: len(tab.events) == 2 and len(tab.resyncs) == 1)
            assert _positions(tab.events) == [(new_epoch, 1), (new_epoch, 2)]
            assert (tab.resyncs[0].epoch, tab.resyncs[0].seq) == (new_epoch, 2)
            assert {c.caller_number for c in tab.resyncs[0].calls} >= {"1020", "1021"}

    asyncio.run(main())


def test_redis_restarted_empty_then_restated_in_a_new_epoch(infra: Infrastructure, prefix: str) -> None:
    """Issue 10.3: every key of the namespace vanishes. The gateway restates in a new epoch; the
    node hands that epoch from seq 1 and then resyncs from the restated snapshot."""

    async def main() -> None:
        async with _world(infra, prefix) as (gateway, feed, redis_client):
            tab = Collector()
            await feed.follow(tab, "307")
            await gateway.emit(*(_event("307", n) for n in range(1, 4)))
            await _until(lambda: len(tab.events) == 3)

            keys = [k async for k in redis_client.scan_iter(f"{prefix}:*")]
            await redis_client.delete(*keys)
            restated = await gateway.restart()
            await gateway.emit(_event("307", 3), _event("307", 4))  # the live calls, restated
            await _until(lambda: len(tab.events) == 5 and len(tab.resyncs) == 1)
            assert _positions(tab.events[3:]) == [(restated, 1), (restated, 2)]
            assert (tab.resyncs[0].epoch, tab.resyncs[0].seq) == (restated, 2)

            await gateway.emit(_event("307", 5))  # and the line simply goes on
            await _until(lambda: len(tab.events) == 6)
            assert _positions(tab.events[5:]) == [(restated, 3)]

    asyncio.run(main())


def test_redis_emptied_and_the_gateway_goes_on_in_its_epoch_the_line_is_not_wedged(
    infra: Infrastructure, prefix: str
) -> None:
    async def main() -> None:
        async with _world(infra, prefix) as (gateway, feed, redis_client):
            tab = Collector()
            await feed.follow(tab, "308")
            await gateway.emit(*(_event("308", n) for n in range(1, 4)))
            await _until(lambda: len(tab.events) == 3)
            keys = [k async for k in redis_client.scan_iter(f"{prefix}:*")]
            await redis_client.delete(*keys)
            # The node misses 4 (stored, never published); 5 arrives. Redis holds 4 and 5 but not
            # 3 any more, so nothing proves 4 came right after 3: hand 4 and 5, then the snapshot.
            await gateway.emit(_event("308", 4), publish=False)
            await gateway.emit(_event("308", 5))
            await _until(lambda: len(tab.resyncs) == 1)
            assert [e.seq for e in tab.events] == [1, 2, 3, 4, 5]
            assert tab.resyncs[0].seq == 5
            # 6 is lost on both sides (neither stored nor published); 7 arrives: a hole Redis
            # cannot fill. Resync to the snapshot (which holds 7) and go on from there.
            await gateway.emit(_event("308", 6), store=False, publish=False)
            await gateway.emit(_event("308", 7))
            await _until(lambda: len(tab.resyncs) == 2)
            await gateway.emit(_event("308", 8))
            await _until(lambda: tab.events[-1].seq == 8)
            assert [e.seq for e in tab.events] == [1, 2, 3, 4, 5, 8]
            assert tab.resyncs[1].seq == 7

    asyncio.run(main())


def test_an_event_published_before_its_redis_write_is_waited_for(infra: Infrastructure, prefix: str) -> None:
    """If the gateway publishes and writes concurrently (issue 15), the new epoch's first event
    may reach the node before Redis has it: the node waits briefly, then delivers it once."""

    async def main() -> None:
        async with _world(infra, prefix) as (gateway, feed, _redis):
            await gateway.emit(*(_event("309", n) for n in range(1, 3)), publish=False)
            tab = Collector()
            await feed.follow(tab, "309")
            new_epoch = await gateway.restart()
            (ring,) = await gateway.emit(_event("309", 7), store=False)
            await asyncio.sleep(0.3)
            await gateway.writer.write([ring])
            await _until(lambda: len(tab.events) == 1)
            await asyncio.sleep(0.3)
            assert _positions(tab.events) == [(new_epoch, 1)]
            assert tab.resyncs == []

            # never written at all: after the wait it is still delivered, not swallowed
            timeouts = REGISTRY.get_sample_value("cms_node_history_wait_timeouts_total") or 0.0
            await gateway.restart()
            (lost,) = await gateway.emit(_event("309", 8), store=False)
            await _until(lambda: len(tab.events) == 2, timeout=10)
            assert tab.events[-1] == lost
            assert (REGISTRY.get_sample_value("cms_node_history_wait_timeouts_total") or 0.0) == timeouts + 1

    asyncio.run(main())


def test_redis_unreachable_live_events_still_flow_and_the_line_resyncs_after(
    infra: Infrastructure, prefix: str
) -> None:
    """Issue 10.3, second half: the node's Redis link is cut (the gateway's is not). Events from
    the broker keep reaching the agent, gaps included; once Redis answers again the line is put
    right from a snapshot."""

    async def main() -> None:
        target = urllib.parse.urlsplit(infra.redis_url)
        proxy = FaultProxy("proxy", target.hostname or "127.0.0.1", target.port or 6379)
        await proxy.start()
        node_redis_url = target._replace(netloc=f"127.0.0.1:{proxy.port}").geturl()
        try:
            async with _world(infra, prefix, redis_url=node_redis_url) as (gateway, feed, _redis):
                tab = Collector()
                await feed.follow(tab, "310")
                await gateway.emit(*(_event("310", n) for n in range(1, 3)))
                await _until(lambda: len(tab.events) == 2)

                await proxy.set_fault(CUT)
                await gateway.emit(_event("310", 3))  # continues: no Redis needed
                await _until(lambda: len(tab.events) == 3)
                await gateway.emit(_event("310", 4), publish=False)  # missed by the node
                await gateway.emit(_event("310", 5))  # a gap Redis cannot fill now: delivered anyway
                await _until(lambda: len(tab.events) == 4, timeout=20)
                await gateway.restart()
                await gateway.emit(_event("310", 6))  # a new epoch, too
                await _until(lambda: len(tab.events) == 5, timeout=20)
                assert [e.seq for e in tab.events] == [1, 2, 3, 5, 1]
                assert not feed.redis_available

                await proxy.set_fault(PASS)
                await _until(lambda: len(tab.resyncs) == 1, timeout=30, what="resync after Redis returned")
                assert feed.redis_available
                assert (tab.resyncs[0].epoch, tab.resyncs[0].seq) == (gateway.sequencer.epoch, 1)
                await gateway.emit(_event("310", 7))
                await _until(lambda: len(tab.events) == 6)
        finally:
            await proxy.set_fault(CUT)

    asyncio.run(main())


def test_broker_cut_commands_fail_fast_and_the_line_is_repaired_after(infra: Infrastructure, prefix: str) -> None:
    """Issue 10.2 at the feed: while the broker is away a command gets a clear error at once;
    after the reconnect the queue is bound again and what was published meanwhile is repaired."""

    async def main() -> None:
        target = urllib.parse.urlsplit(infra.amqp_url)
        proxy = FaultProxy("proxy", target.hostname or "127.0.0.1", target.port or 5672)
        await proxy.start()
        try:
            async with _world(infra, prefix, amqp_url=_proxied(infra.amqp_url, proxy)) as (gateway, feed, _redis):
                tab = Collector()
                await feed.follow(tab, "311")
                await gateway.emit(_event("311", 1))
                await _until(lambda: len(tab.events) == 1)

                await proxy.set_fault(CUT)
                await _until(lambda: not feed.connected.is_set())
                failures = REGISTRY.get_sample_value("cms_broker_errors_total") or 0.0
                started = time.monotonic()
                result = await feed.send_command(Command(id="c1", name=CommandName.HANGUP, line="311"))
                assert not result.ok and "broker" in (result.error or "")
                assert time.monotonic() - started < 1.0
                new_epoch = await gateway.restart()  # the gateway restarts meanwhile, too
                await gateway.emit(_event("311", 2), _event("311", 3))  # confirmed: published while away

                # the node tried again while the broker was away (and failed), before it comes back
                await _until(lambda: (REGISTRY.get_sample_value("cms_broker_errors_total") or 0.0) > failures,
                             what="a failed reconnect")
                await proxy.set_fault(PASS)
                await asyncio.wait_for(feed.connected.wait(), 30)
                await _until(lambda: len(tab.events) == 3)
                assert _positions(tab.events[1:]) == [(new_epoch, 1), (new_epoch, 2)]
                await gateway.emit(_event("311", 4))
                await _until(lambda: len(tab.events) == 4)
                assert tab.resyncs == []
        finally:
            await proxy.set_fault(CUT)

    asyncio.run(main())


def test_delivery_positions_survive_a_redis_outage_and_are_written_after(infra: Infrastructure, prefix: str) -> None:
    """Redis away: delivery goes on, positions wait in memory, writes back off (not a retry every
    flush), and once Redis answers the latest positions are written for the next node to read."""

    async def main() -> None:
        target = urllib.parse.urlsplit(infra.redis_url)
        proxy = FaultProxy("proxy", target.hostname or "127.0.0.1", target.port or 6379)
        await proxy.start()
        cut_client = aioredis.from_url(
            target._replace(netloc=f"127.0.0.1:{proxy.port}").geturl(), socket_timeout=1.0, socket_connect_timeout=1.0
        )
        direct = aioredis.from_url(infra.redis_url)
        log = DeliveryLog(RedisDeliveryStore(cut_client, prefix), ttl_seconds=60, flush_interval=0.05)
        agent = AgentKey("312", "user-1", "tab-1")
        try:
            log.attach(agent, StreamPosition("100", 1))
            await _until(lambda: (REGISTRY.get_sample_value("cms_node_delivery_log_flushes_total") or 0) > 0)
            await proxy.set_fault(CUT)
            errors = REGISTRY.get_sample_value("cms_node_delivery_log_errors_total") or 0.0
            for seq in range(2, 50):
                log.note(agent, StreamPosition("100", seq))  # the hot path never touches Redis
            await asyncio.sleep(3.0)
            failed = (REGISTRY.get_sample_value("cms_node_delivery_log_errors_total") or 0.0) - errors
            assert 1 <= failed < 20, failed  # backing off: far fewer than one try per 50 ms flush

            await proxy.set_fault(PASS)
            reader = DeliveryLog(RedisDeliveryStore(direct, prefix))
            deadline = time.monotonic() + 30
            while await reader.last(agent) != StreamPosition("100", 49):
                assert time.monotonic() < deadline, await reader.last(agent)
                await asyncio.sleep(0.1)
        finally:
            log.detach(agent)
            await log.close()
            await proxy.set_fault(CUT)
            keys = [k async for k in direct.scan_iter(f"{prefix}:*")]
            if keys:
                await direct.delete(*keys)
            await direct.aclose()
            await cut_client.aclose()

    asyncio.run(main())


def test_broker_back_before_redis_the_lines_catch_up_once_redis_answers(infra: Infrastructure, prefix: str) -> None:
    """Both of the node's links cut; the broker comes back first (the repair cannot read Redis),
    then Redis: what was published meanwhile reaches the agent from the history, then a snapshot."""

    async def main() -> None:
        amqp = urllib.parse.urlsplit(infra.amqp_url)
        broker_proxy = FaultProxy("broker_proxy", amqp.hostname or "127.0.0.1", amqp.port or 5672)
        await broker_proxy.start()
        target = urllib.parse.urlsplit(infra.redis_url)
        redis_proxy = FaultProxy("redis_proxy", target.hostname or "127.0.0.1", target.port or 6379)
        await redis_proxy.start()
        node_redis_url = target._replace(netloc=f"127.0.0.1:{redis_proxy.port}").geturl()
        try:
            async with _world(
                infra, prefix, amqp_url=_proxied(infra.amqp_url, broker_proxy), redis_url=node_redis_url
            ) as (gateway, feed, _redis):
                tab = Collector()
                await feed.follow(tab, "313")
                await gateway.emit(_event("313", 1))
                await _until(lambda: len(tab.events) == 1)

                await broker_proxy.set_fault(CUT)
                await redis_proxy.set_fault(CUT)
                await _until(lambda: not feed.connected.is_set())
                await gateway.emit(_event("313", 2), _event("313", 3))  # published into the void
                await broker_proxy.set_fault(PASS)
                await asyncio.wait_for(feed.connected.wait(), 30)
                await _until(lambda: not feed.redis_available, what="the repair finding Redis away")
                assert len(tab.events) == 1

                await redis_proxy.set_fault(PASS)
                await _until(lambda: len(tab.events) == 3 and len(tab.resyncs) == 1, timeout=30)
                assert [e.seq for e in tab.events] == [1, 2, 3]
                assert tab.resyncs[0].seq == 3
                await gateway.emit(_event("313", 4))
                await _until(lambda: len(tab.events) == 4)
        finally:
            await broker_proxy.set_fault(CUT)
            await redis_proxy.set_fault(CUT)

    asyncio.run(main())
