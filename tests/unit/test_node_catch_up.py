"""The node's line feed over the in-memory stores: how a line catches up after gaps, gateway
restarts, broker and Redis outages (the same shell as in production; only the stores differ).

tests/integration/test_node_continuity.py plays the same situations against the real services.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable

from prometheus_client import REGISTRY

from ami_gateway.event_outbox_memory import MemoryEventPublisher
from services.line_state import LineHistory
from services.line_state_memory import MemoryLineStateWriter
from services.wire import Command, CommandName, StreamPosition
from tests.support.memory_world import Collector, HandGateway, MemoryWorld, ringing
from tests.support.waiting import until
from ws_node.line_feed import LineFeed

P = StreamPosition
Gateway = HandGateway[MemoryLineStateWriter, MemoryEventPublisher]


@contextlib.asynccontextmanager
async def _running(feed: LineFeed) -> AsyncIterator[LineFeed]:
    await feed.start()
    try:
        await asyncio.wait_for(feed.connected.wait(), 5)
        yield feed
    finally:
        await feed.stop()


def _run(body: Callable[[MemoryWorld, Gateway], Awaitable[None]]) -> None:
    async def main() -> None:
        world = MemoryWorld()
        gateway = world.gateway()
        await gateway.restart()
        await body(world, gateway)

    asyncio.run(main())


def test_an_event_in_order_is_delivered_in_the_consumers_own_turn() -> None:
    """No handoff to the event task for the usual case: each turn of a busy node's loop cost every event its
    wait (issue 15, e2e). The in-memory broker calls the consumer from the publish itself."""

    async def body(world: MemoryWorld, gateway: Gateway) -> None:
        feed, _, _ = world.node()
        async with _running(feed):
            tab = Collector()
            await feed.follow(tab, "311")
            await gateway.emit(ringing("311", 1))
            assert [e.seq for e in tab.events] == [1]  # no await between the publish and this line
            # behind a gap being repaired, later events wait their turn: the line's order holds
            await gateway.emit(ringing("311", 2), publish=False)
            await gateway.emit(ringing("311", 3))
            await gateway.emit(ringing("311", 4))
            await until(lambda: len(tab.events) == 4)
            assert [e.seq for e in tab.events] == [1, 2, 3, 4]

    _run(body)


def test_a_gap_is_repaired_from_the_history() -> None:
    async def body(world: MemoryWorld, gateway: Gateway) -> None:
        feed, _, _ = world.node()
        async with _running(feed):
            tab = Collector()
            await feed.follow(tab, "305")
            await gateway.emit(ringing("305", 1), ringing("305", 2))
            await gateway.emit(ringing("305", 3), publish=False)  # stored, never reaches the node
            await gateway.emit(ringing("305", 4))
            await until(lambda: len(tab.events) == 4)
            assert [e.seq for e in tab.events] == [1, 2, 3, 4]
            assert tab.resyncs == []

    _run(body)


def test_a_new_epoch_is_delivered_from_seq_one_and_stragglers_of_the_old_one_dropped() -> None:
    async def body(world: MemoryWorld, gateway: Gateway) -> None:
        feed, _, _ = world.node()
        async with _running(feed):
            tab = Collector()
            await feed.follow(tab, "305")
            old = gateway.sequencer.epoch
            await gateway.emit(ringing("305", 1), ringing("305", 2))
            new = await gateway.restart()
            await gateway.emit(ringing("305", 3), ringing("305", 4))
            await until(lambda: len(tab.events) == 4)
            assert tab.positions() == [P(old, 1), P(old, 2), P(new, 1), P(new, 2)]
            assert tab.resyncs == []
            await feed.handle_event(ringing("305", 9).positioned(old, 3))  # a replaced gateway's late publish
            assert len(tab.events) == 4

    _run(body)


def test_a_line_from_an_earlier_run_gets_the_restarted_gateways_first_event() -> None:
    """The namespace holds an earlier run's state; the node starts from its snapshot, and the new
    epoch's first event (usually a RING_STARTED) must reach the agent as an event."""

    async def body(world: MemoryWorld, gateway: Gateway) -> None:
        old = gateway.sequencer.epoch
        await gateway.emit(*(ringing("305", n) for n in (1, 2, 3)), publish=False)
        feed, _, _ = world.node()
        async with _running(feed):
            tab = Collector()
            snapshot = await feed.follow(tab, "305")
            assert snapshot.position == P(old, 3)
            new = await gateway.restart()
            await gateway.emit(ringing("305", 10))
            await until(lambda: len(tab.events) == 1)
            assert tab.positions() == [P(new, 1)] and tab.resyncs == []

    _run(body)


def test_an_earlier_run_whose_history_is_gone_gets_the_new_epoch_then_a_snapshot() -> None:
    async def body(world: MemoryWorld, gateway: Gateway) -> None:
        await gateway.emit(*(ringing("306", n) for n in (1, 2, 3)), publish=False)
        world.store.drop_history("306")
        feed, _, _ = world.node()
        async with _running(feed):
            tab = Collector()
            await feed.follow(tab, "306")
            new = await gateway.restart()
            await gateway.emit(ringing("306", 20), ringing("306", 21))
            await until(lambda: len(tab.events) == 2 and len(tab.resyncs) == 1)
            assert tab.positions() == [P(new, 1), P(new, 2)]
            assert tab.resyncs[0].position == P(new, 2)
            assert {c.caller_number for c in tab.resyncs[0].calls} >= {"1020", "1021"}

    _run(body)


def test_redis_restarted_empty_then_restated_in_a_new_epoch() -> None:
    async def body(world: MemoryWorld, gateway: Gateway) -> None:
        feed, _, _ = world.node()
        async with _running(feed):
            tab = Collector()
            await feed.follow(tab, "307")
            await gateway.emit(*(ringing("307", n) for n in (1, 2, 3)))
            await until(lambda: len(tab.events) == 3)
            world.store.clear()
            # An emptied store cannot remember the last epoch, and epochs count milliseconds: a real Redis restart
            # takes far longer than one, this test's restart might not (the same epoch again reads as duplicates).
            await asyncio.sleep(0.005)
            restated = await gateway.restart()
            await gateway.emit(ringing("307", 3), ringing("307", 4))  # the live calls, restated
            await until(lambda: len(tab.events) == 5 and len(tab.resyncs) == 1)
            assert tab.positions()[3:] == [P(restated, 1), P(restated, 2)]
            assert tab.resyncs[0].position == P(restated, 2)
            await gateway.emit(ringing("307", 5))
            await until(lambda: len(tab.events) == 6)
            assert tab.positions()[5] == P(restated, 3)

    _run(body)


def test_an_event_published_before_its_redis_write_is_waited_for_then_handed_once() -> None:
    async def body(world: MemoryWorld, gateway: Gateway) -> None:
        await gateway.emit(ringing("309", 1), publish=False)
        feed, _, _ = world.node(history_wait_seconds=2.0)
        async with _running(feed):
            tab = Collector()
            await feed.follow(tab, "309")
            new = await gateway.restart()
            (ring,) = await gateway.emit(ringing("309", 7), store=False)
            await asyncio.sleep(0.1)  # so that the write lands while the node is waiting for it
            await gateway.writer.write([ring])
            await until(lambda: len(tab.events) == 1)
            await gateway.emit(ringing("309", 8))  # the next one proves the first was not handed twice
            await until(lambda: len(tab.events) == 2)
            assert tab.positions() == [P(new, 1), P(new, 2)] and tab.resyncs == []

    _run(body)


def test_an_event_never_written_to_redis_is_still_handed_after_the_wait() -> None:
    async def body(world: MemoryWorld, gateway: Gateway) -> None:
        await gateway.emit(ringing("309", 1), publish=False)  # the line has a past: a new epoch means a catch-up
        feed, _, _ = world.node(history_wait_seconds=0.2)
        async with _running(feed):
            tab = Collector()
            await feed.follow(tab, "309")
            timeouts = REGISTRY.get_sample_value("cms_node_history_wait_timeouts_total") or 0.0
            await gateway.restart()
            (lost,) = await gateway.emit(ringing("309", 8), store=False)
            await until(lambda: len(tab.events) == 1)
            assert tab.events == [lost]
            assert REGISTRY.get_sample_value("cms_node_history_wait_timeouts_total") == timeouts + 1

    _run(body)


def test_after_a_broker_outage_what_was_published_meanwhile_comes_from_the_history() -> None:
    async def body(world: MemoryWorld, gateway: Gateway) -> None:
        feed, bus, _ = world.node()
        async with _running(feed):
            tab = Collector()
            await feed.follow(tab, "311")
            await gateway.emit(ringing("311", 1))
            await until(lambda: len(tab.events) == 1)

            bus.client.cut()
            await until(lambda: not feed.connected.is_set())
            started = time.monotonic()
            result = await feed.send_command(Command(id="c1", name=CommandName.HANGUP, line="311"))
            assert not result.ok and "broker" in result.error and time.monotonic() - started < 0.5
            new = await gateway.restart()  # the gateway restarts meanwhile, too
            await gateway.emit(ringing("311", 2), ringing("311", 3))  # published into the void for this node

            bus.client.restore()
            await asyncio.wait_for(feed.connected.wait(), 15)
            await until(lambda: len(tab.events) == 3)
            assert tab.positions()[1:] == [P(new, 1), P(new, 2)]
            await gateway.emit(ringing("311", 4))
            await until(lambda: len(tab.events) == 4)
            assert tab.positions()[3] == P(new, 3) and tab.resyncs == []

    _run(body)


def test_redis_away_for_the_node_live_events_still_flow_and_the_line_resyncs_after() -> None:
    async def body(world: MemoryWorld, gateway: Gateway) -> None:
        feed, _, reader = world.node()
        async with _running(feed):
            tab = Collector()
            await feed.follow(tab, "310")
            await gateway.emit(ringing("310", 1), ringing("310", 2))
            await until(lambda: len(tab.events) == 2)

            reader.link.fail()  # the node's link to Redis only: the gateway still writes
            await gateway.emit(ringing("310", 3))  # continues: no Redis needed
            await gateway.emit(ringing("310", 4), publish=False)  # missed by the node
            await gateway.emit(ringing("310", 5))  # a gap Redis cannot fill now: handed anyway
            await gateway.restart()
            await gateway.emit(ringing("310", 6))  # a new epoch, too
            await until(lambda: len(tab.events) == 5)
            assert [e.seq for e in tab.events] == [1, 2, 3, 5, 1]
            assert not feed.redis_available and tab.resyncs == []

            reader.link.recover()
            await until(lambda: len(tab.resyncs) == 1, what="the resync once Redis answers")
            assert feed.redis_available
            assert tab.resyncs[0].position == P(gateway.sequencer.epoch, 1)
            await gateway.emit(ringing("310", 7))
            await until(lambda: len(tab.events) == 6)
            assert tab.events[-1].seq == 2

    _run(body)


def test_broker_back_before_redis_the_line_catches_up_once_redis_answers() -> None:
    async def body(world: MemoryWorld, gateway: Gateway) -> None:
        feed, bus, reader = world.node()
        async with _running(feed):
            tab = Collector()
            await feed.follow(tab, "313")
            await gateway.emit(ringing("313", 1))
            await until(lambda: len(tab.events) == 1)

            bus.client.cut()
            reader.link.fail()
            await until(lambda: not feed.connected.is_set())
            await gateway.emit(ringing("313", 2), ringing("313", 3))  # into the void for this node
            bus.client.restore()
            await asyncio.wait_for(feed.connected.wait(), 15)
            await until(lambda: not feed.redis_available, what="the repair finding Redis away")
            assert len(tab.events) == 1

            reader.link.recover()
            await until(lambda: len(tab.events) == 3 and len(tab.resyncs) == 1)
            assert [e.seq for e in tab.events] == [1, 2, 3] and tab.resyncs[0].seq == 3
            await gateway.emit(ringing("313", 4))
            await until(lambda: len(tab.events) == 4)

    _run(body)


def test_two_nodes_each_get_only_the_lines_their_agents_follow() -> None:
    async def body(world: MemoryWorld, gateway: Gateway) -> None:
        feed_a, _, _ = world.node("a")
        feed_b, _, _ = world.node("b")
        async with _running(feed_a), _running(feed_b):
            tab_a, tab_b, tab_b2 = Collector(), Collector(), Collector()
            await feed_a.follow(tab_a, "401")
            await feed_b.follow(tab_b, "402")
            await feed_b.follow(tab_b2, "401")
            await gateway.emit(ringing("401", 1), ringing("402", 1), ringing("403", 1))
            await until(lambda: len(tab_a.events) == 1 and len(tab_b.events) == 1 and len(tab_b2.events) == 1)
            await feed_b.unfollow(tab_b2, "401")
            await gateway.emit(ringing("401", 2), ringing("402", 2))
            await until(lambda: len(tab_a.events) == 2 and len(tab_b.events) == 2)
            assert [e.line for e in tab_b.events] == ["402", "402"] and len(tab_b2.events) == 1

    _run(body)


def test_a_node_that_lost_its_bus_link_mid_follow_binds_the_line_on_reconnect() -> None:
    """A line followed while the broker is away is bound by the reconnect, and caught up."""

    async def body(world: MemoryWorld, gateway: Gateway) -> None:
        feed, bus, _ = world.node()
        async with _running(feed):
            bus.client.cut()
            await until(lambda: not feed.connected.is_set())
            tab = Collector()
            await feed.follow(tab, "314")
            await gateway.emit(ringing("314", 1))
            bus.client.restore()
            await until(lambda: len(tab.events) == 1)
            await gateway.emit(ringing("314", 2))
            await until(lambda: len(tab.events) == 2)
            assert [e.seq for e in tab.events] == [1, 2]

    _run(body)



def test_a_broker_connect_that_ends_with_stop_async_iteration_is_retried() -> None:
    """aiormq's reader ending under a call in flight surfaces as StopAsyncIteration (RabbitMQ stopping
    mid-handshake, chaos rabbitmq-restart): it ended the node's reconnect loop, and /health went 503."""
    async def body(world: MemoryWorld, gateway: Gateway) -> None:
        feed, bus, _ = world.node()
        real_connect = bus.connect
        failures = [StopAsyncIteration()]

        async def flaky_connect():  # type: ignore[no-untyped-def]
            if failures:
                raise failures.pop()
            return await real_connect()

        bus.connect = flaky_connect  # type: ignore[method-assign]
        async with _running(feed):
            tab = Collector()
            await feed.follow(tab, "305")
            await gateway.emit(ringing("305", 1))
            await until(lambda: len(tab.events) == 1)
        assert not failures

    _run(body)


def test_an_event_routed_before_the_bind_and_stored_after_the_snapshot_comes_from_a_second_look() -> None:
    """The gateway writes Redis beside the publish: a ring the broker routed just before this node bound the
    line is not in its queue, and its write may land just after the snapshot the node read once bound. A
    second look at the line, ``settle_seconds`` later, hands it over (nothing else would before the next event)."""
    async def body(world: MemoryWorld, gateway: Gateway) -> None:
        feed, _, _ = world.node()
        async with _running(feed):
            (ring,) = await gateway.emit(ringing("313", 1), store=False)  # routed to nobody: not bound yet
            tab = Collector()
            snapshot = await feed.follow(tab, "313")
            assert snapshot.position == P() and snapshot.calls == ()
            repairs = REGISTRY.get_sample_value("cms_node_settle_repairs_total") or 0.0
            await gateway.writer.write([ring])  # the write lands after the snapshot was read
            await until(lambda: len(tab.events) == 1, what="the ring from the second look")
            assert tab.events == [ring] and tab.resyncs == []
            assert REGISTRY.get_sample_value("cms_node_settle_repairs_total") == repairs + 1
            await gateway.emit(ringing("313", 2))
            await until(lambda: len(tab.events) == 2)
            assert tab.positions() == [ring.position, P(ring.epoch, 2)]

    _run(body)


def test_a_second_look_that_finds_nothing_new_hands_nothing() -> None:
    async def body(world: MemoryWorld, gateway: Gateway) -> None:
        feed, _, _ = world.node(history_wait_seconds=0.3)
        async with _running(feed):
            tab = Collector()
            await feed.follow(tab, "314")
            (ring,) = await gateway.emit(ringing("314", 1))
            await until(lambda: len(tab.events) == 1)
            await asyncio.sleep(0.5)  # past the second look
            assert tab.events == [ring] and tab.resyncs == []

    _run(body)


def test_a_repair_after_a_reconnect_waits_for_redis_to_reach_what_the_node_delivered() -> None:
    """Redis may stand a few events behind what a node delivered (written beside the publish). A repair after a
    broker reconnect waits for those writes, instead of taking Redis for one that lost them and resyncing the
    line to an older snapshot."""
    async def body(world: MemoryWorld, gateway: Gateway) -> None:
        feed, bus, _ = world.node(history_wait_seconds=2.0)
        async with _running(feed):
            tab = Collector()
            await feed.follow(tab, "315")
            await gateway.emit(ringing("315", 1))
            (late,) = await gateway.emit(ringing("315", 2), store=False)  # delivered; its write still on its way
            await until(lambda: len(tab.events) == 2)

            bus.client.cut()
            await until(lambda: not feed.connected.is_set())
            bus.client.restore()
            await asyncio.wait_for(feed.connected.wait(), 15)
            await asyncio.sleep(0.1)  # the repair is waiting for Redis to reach 2
            await gateway.writer.write([late])
            await gateway.emit(ringing("315", 3))
            await until(lambda: len(tab.events) == 3)
            assert [e.seq for e in tab.events] == [1, 2, 3] and tab.resyncs == []

    _run(body)


def test_a_second_look_that_cannot_reach_redis_resyncs_the_line_once_redis_is_back() -> None:
    async def body(world: MemoryWorld, gateway: Gateway) -> None:
        feed, _, reader = world.node()
        async with _running(feed):
            (ring,) = await gateway.emit(ringing("316", 1), store=False)  # routed before the bind
            tab = Collector()
            await feed.follow(tab, "316")
            reader.link.fail()  # the node's Redis goes away before its second look
            await gateway.writer.write([ring])
            await until(lambda: not feed.redis_available, what="the second look failing")
            reader.link.recover()
            await until(lambda: bool(tab.resyncs), timeout=10, what="the line resynced once Redis answers")
            assert ring.call is not None and [c.id for c in tab.resyncs[-1].calls] == [ring.call.id]

    _run(body)


def test_stop_ends_the_feed_when_a_redis_read_answers_in_the_same_turn_as_the_cancel() -> None:
    """Python 3.11's ``asyncio.wait_for`` hands back a result that arrives in the same loop turn as a cancel and
    drops the cancel (fixed in 3.12). The repair after a reconnect then went on to wait on the connection, and
    stop() waited for it for ever: a node that never finished draining."""

    async def body(world: MemoryWorld, gateway: Gateway) -> None:
        feed, bus, reader = world.node()
        await feed.start()
        await asyncio.wait_for(feed.connected.wait(), 5)
        tab = Collector()
        await feed.follow(tab, "317")
        await gateway.emit(ringing("317", 1))
        await until(lambda: len(tab.events) == 1)

        gate: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        held: list[str] = []
        read = reader.history_since

        async def history_since(line: str, position: StreamPosition, limit: int = 10_000) -> LineHistory:
            history = await read(line, position, limit)
            held.append(line)
            await gate  # answers the moment the gate opens, in the turn stop() cancels
            return history

        reader.history_since = history_since  # type: ignore[method-assign]
        bus.client.cut()
        await until(lambda: not feed.connected.is_set())
        bus.client.restore()
        await until(lambda: held == ["317"], what="the repair after the reconnect reading the history")
        gate.set_result(None)
        stopping = asyncio.create_task(feed.stop())
        done, _ = await asyncio.wait([stopping], timeout=5)
        assert stopping in done, "stop() hung: a task of the feed swallowed its cancel"

    _run(body)
