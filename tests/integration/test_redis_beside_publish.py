"""Redis beside the hot path (issue 15): the real outbox publishes and writes Redis together, the real node feed
delivers. Real RabbitMQ and Redis; the only change from production is a writer that reaches Redis late, so that the
publish is sure to win the race.

What must still hold: a node that repairs (a new epoch, a gap) waits for the history it needs and hands every
event once, in order; a node that binds a line just after an event was routed, and reads Redis just before that
event's write lands, still gets it (its second look at the line); an event a node delivered that Redis never got
(the gateway was fenced after the publish) is superseded by the next term: the node takes the new epoch, then the
snapshot, with no ghost call.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

import pytest
import redis.asyncio as aioredis
from prometheus_client import REGISTRY

from ami_gateway.event_outbox import EventOutbox, EventPublisher, Sequencer
from local_cluster.infra import Infrastructure
from services.line_state import LineStateReader, LineStateWriter
from services.topology import Topology
from services.wire import CallState, LineEvent
from tests.integration.test_event_pipeline import Collector, _cleanup, _event
from ws_node.line_feed import LineFeed, RabbitNodeBus

pytestmark = pytest.mark.integration


class LateWriter(LineStateWriter):
    """The real writer, each script call reaching Redis ``delay`` seconds late (a busy Redis, a slow link)."""

    def __init__(self, client: aioredis.Redis, prefix: str, delay: float) -> None:
        super().__init__(client, prefix)
        self.delay = delay

    async def write(self, events: Sequence[LineEvent]) -> None:
        await asyncio.sleep(self.delay)
        await super().write(events)


async def _until(predicate: object, timeout: float = 15.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached in {timeout:.0f}s")
        await asyncio.sleep(0.01)


def _positions(events: list[LineEvent]) -> list[tuple[str, int]]:
    return [(e.epoch, e.seq) for e in events]


async def _stop(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


def _feed(infra: Infrastructure, topology: Topology, node_redis: aioredis.Redis) -> LineFeed:
    return LineFeed("n1", RabbitNodeBus(infra.amqp_url, topology, "n1"), LineStateReader(node_redis, topology.prefix),
                    redis_timeout_seconds=3.0)


@dataclass
class _Pipeline:
    """A gateway's outbox (its writer late on demand) and a node's feed, over the real services."""

    writer: LateWriter
    sequencer: Sequencer
    outbox: EventOutbox
    feed: LineFeed


@contextlib.asynccontextmanager
async def _pipeline(infra: Infrastructure, prefix: str, **outbox_options: int) -> AsyncIterator[_Pipeline]:
    topology = Topology(prefix)
    redis_client = aioredis.from_url(infra.redis_url)
    node_redis = aioredis.from_url(infra.redis_url, socket_timeout=2.0)
    writer = LateWriter(redis_client, prefix, delay=0.0)
    sequencer = Sequencer(await writer.new_epoch())
    outbox = EventOutbox(writer, EventPublisher(infra.amqp_url, topology), sequencer, **outbox_options)
    feed = _feed(infra, topology, node_redis)
    drain = asyncio.create_task(outbox.run())
    try:
        yield _Pipeline(writer, sequencer, outbox, feed)
    finally:
        await _stop(drain)
        await outbox.close()
        await feed.stop()
        await _cleanup(infra, prefix, redis_client)
        await redis_client.aclose()
        await node_redis.aclose()


def test_a_new_epoch_that_reaches_the_node_before_redis_is_waited_for_and_delivered_once_in_order(
    infra: Infrastructure, prefix: str
) -> None:
    async def main() -> None:
        async with _pipeline(infra, prefix, batch_size=4, window=4) as p:
            writer, sequencer, outbox, feed = p.writer, p.sequencer, p.outbox, p.feed
            # An earlier term left history on the line (a restart over an old namespace).
            outbox.put([_event("701", n) for n in range(1, 4)])
            assert await outbox.wait_idle(10)
            await feed.start()
            await asyncio.wait_for(feed.connected.wait(), 15)
            tab = Collector()
            await feed.follow(tab, "701")

            # The gateway restarts; from now on every write lands 80 ms after its publish.
            writer.delay = 0.08
            sequencer.restart(await writer.new_epoch())
            new_epoch = sequencer.epoch
            timeouts = REGISTRY.get_sample_value("cms_node_history_wait_timeouts_total") or 0.0
            outbox.put([_event("701", n) for n in range(1, 31)])
            await _until(lambda: len(tab.events) >= 30, what="the new epoch delivered")
            assert await outbox.wait_idle(10)
            await asyncio.sleep(0.5)  # anything late or duplicated (the second look included) would show now
            # The first event of the new epoch (the RING_STARTED after a restart) is neither swallowed nor doubled.
            assert _positions(tab.events) == [(new_epoch, n) for n in range(1, 31)]
            assert tab.resyncs == []
            assert (REGISTRY.get_sample_value("cms_node_history_wait_timeouts_total") or 0.0) == timeouts  # briefly

    asyncio.run(main())


def test_a_ring_routed_before_the_bind_and_stored_after_the_snapshot_reaches_the_agent(
    infra: Infrastructure, prefix: str
) -> None:
    async def main() -> None:
        async with _pipeline(infra, prefix) as p:
            writer, sequencer, outbox, feed = p.writer, p.sequencer, p.outbox, p.feed
            outbox.put([_event("999", 0)])  # the exchange exists
            assert await outbox.wait_idle(10)
            await feed.start()
            await asyncio.wait_for(feed.connected.wait(), 15)
            writer.delay = 0.15  # the write lands 150 ms after the publish
            outbox.put([_event("703", 1)])  # routed to nobody: no node has bound the line yet
            await asyncio.sleep(0.03)
            tab = Collector()
            snapshot = await feed.follow(tab, "703")
            assert snapshot.calls == () and tab.events == []  # bound after the publish, read before the write
            await _until(lambda: len(tab.events) == 1, 5, what="the ring from the node's second look")
            assert _positions(tab.events) == [(sequencer.epoch, 1)] and tab.resyncs == []

    asyncio.run(main())


def test_a_tabs_snapshot_waits_for_redis_to_reach_what_the_node_delivered(infra: Infrastructure, prefix: str) -> None:
    """An agent's snapshot read from a Redis behind the broker would show a call it saw end as live again (chaos
    redis-stall: an ended call back on the panel for 2 s after the stall). The node waits for Redis to reach
    what it delivered."""

    async def main() -> None:
        async with _pipeline(infra, prefix) as p:
            writer, outbox, feed = p.writer, p.outbox, p.feed
            outbox.put([_event("704", 1)])
            assert await outbox.wait_idle(10)
            await feed.start()
            await asyncio.wait_for(feed.connected.wait(), 15)
            tab = Collector()
            await feed.follow(tab, "704")
            writer.delay = 0.3  # each write lands 300 ms after its publish
            outbox.put([_event("704", 1, CallState.FINISHED)])
            await _until(lambda: len(tab.events) == 1, 5, what="the end delivered")
            ended_at = tab.events[0].position
            stale = await feed.reader.snapshot("704")
            assert stale.position < ended_at and [c.id for c in stale.calls] == ["call-1"]  # the race is there
            assert feed.behind("704", stale)  # what a tab is told along with such a snapshot (session rule 14)
            snapshot = await feed.snapshot("704")
            assert snapshot.position >= ended_at and snapshot.calls == ()
            assert not feed.behind("704", snapshot)

    asyncio.run(main())


def test_an_event_delivered_but_never_stored_is_superseded_by_the_next_terms_snapshot(
    infra: Infrastructure, prefix: str
) -> None:
    """The worst case of writing beside the publish: the lease moved on without this gateway knowing (a clock
    that lies, or a Redis that lost the lease key; ``may_publish`` says yes), so its batch goes out while the
    fenced write is refused. The node delivered a ringing call that Redis will never hold. The successor's
    epoch must put the agent right."""

    async def main() -> None:
        topology = Topology(prefix)
        lease_key = f"{prefix}:gateway:lease"
        redis_client = aioredis.from_url(infra.redis_url)
        node_redis = aioredis.from_url(infra.redis_url, socket_timeout=2.0)
        writer_a = LineStateWriter(redis_client, prefix)
        epoch_a = await writer_a.new_epoch()
        await redis_client.set(lease_key, f"a {epoch_a}")
        writer_a.fence(lease_key, f"a {epoch_a}")
        fenced: list[str] = []
        outbox_a = EventOutbox(writer_a, EventPublisher(infra.amqp_url, topology), Sequencer(epoch_a),
                               on_fenced=fenced.append)
        feed = _feed(infra, topology, node_redis)
        drain_a = asyncio.create_task(outbox_a.run())
        drain_b: asyncio.Task[None] | None = None
        outbox_b: EventOutbox | None = None
        try:
            outbox_a.put([_event("702", 1)])
            assert await outbox_a.wait_idle(10)
            await feed.start()
            await asyncio.wait_for(feed.connected.wait(), 15)
            tab = Collector()
            snapshot = await feed.follow(tab, "702")
            assert [c.id for c in snapshot.calls] == ["call-1"]

            # Gateway b takes the lease; a does not know yet.
            writer_b = LineStateWriter(redis_client, prefix)
            epoch_b = await writer_b.new_epoch()
            await redis_client.set(lease_key, f"b {epoch_b}")
            writer_b.fence(lease_key, f"b {epoch_b}")
            outbox_a.put([_event("702", 2)])  # call 2 rings: published, and its write refused
            await _until(lambda: len(tab.events) == 1 and bool(fenced), what="a's event delivered and a fenced")
            assert _positions(tab.events) == [(epoch_a, 2)] and tab.events[0].call is not None
            assert tab.events[0].call.id == "call-2"  # the agent saw call 2 ring ...
            assert outbox_a.fenced
            assert await redis_client.hget(f"{prefix}:line:702:calls", "call-2") is None  # ... Redis never will

            # b restates the line as it finds it in AMI: call 1 is still ringing, call 2 is long gone.
            outbox_b = EventOutbox(writer_b, EventPublisher(infra.amqp_url, topology), Sequencer(epoch_b))
            drain_b = asyncio.create_task(outbox_b.run())
            outbox_b.put([_event("702", 1)])
            assert await outbox_b.wait_idle(10)
            await _until(lambda: bool(tab.resyncs), what="the node resynced from the new term's snapshot")
            assert _positions(tab.events) == [(epoch_a, 2), (epoch_b, 1)]
            assert [c.id for c in tab.resyncs[-1].calls] == ["call-1"]  # no ghost call 2
            assert (tab.resyncs[-1].epoch, tab.resyncs[-1].seq) == (epoch_b, 1)
        finally:
            await _stop(drain_a)
            if drain_b is not None:
                await _stop(drain_b)
            await outbox_a.close()
            if outbox_b is not None:
                await outbox_b.close()
            await feed.stop()
            await _cleanup(infra, prefix, redis_client)
            await redis_client.aclose()
            await node_redis.aclose()

    asyncio.run(main())
