"""The gateway's event outbox over the in-memory stores: what it does while Redis or the broker is
away, and that every line's stream leaves in order, stored once, with nothing skipped.

A node's queue watches the wire (``NodeEnd``): duplicates may appear there after a broker retry
(nodes drop them by sequence number), a gap never may. tests/integration/test_outbox_window.py
plays the broker cut against the real services.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence

from prometheus_client import REGISTRY

from ami_gateway.event_outbox import EventOutbox, Sequencer
from ami_gateway.event_outbox_memory import MemoryEventPublisher
from services.line_state_memory import MemoryLineStateReader, MemoryLineStateWriter
from services.wire import LINE_START, LineEvent
from tests.support.memory_world import MemoryWorld, ringing
from tests.support.store_contracts import NodeEnd
from tests.support.waiting import until
from ws_node.line_feed_memory import MemoryNodeBus

LINES = ("501", "502", "503")


class Gateway:
    def __init__(self, world: MemoryWorld, **options: int) -> None:
        self.world = world
        self.writer = MemoryLineStateWriter(world.store)
        self.publisher = MemoryEventPublisher(world.broker)
        self.sequencer = Sequencer("")
        self.fenced: list[str] = []
        self.restarts: list[str] = []
        self.outbox = EventOutbox(self.writer, self.publisher, self.sequencer, on_continuity_lost=self._new_epoch,
                                  on_fenced=self.fenced.append, **options)

    @classmethod
    async def started(cls, world: MemoryWorld, **options: int) -> tuple[Gateway, NodeEnd]:
        """A gateway in its first epoch, and a node's queue bound to every line."""
        gateway = cls(world, **options)
        gateway.sequencer.restart(await gateway.writer.new_epoch())
        return gateway, await NodeEnd.open(MemoryNodeBus(world.broker, world.topology, "n1"), *LINES)

    async def _new_epoch(self) -> None:
        self.sequencer.restart(await self.writer.new_epoch())
        self.restarts.append(self.sequencer.epoch)

    async def stored(self, line: str) -> list[LineEvent]:
        return list((await MemoryLineStateReader(self.world.store).history_since(line, LINE_START)).events)


def _metric(name: str) -> float:
    return REGISTRY.get_sample_value(name) or 0.0


def _batch(first: int, last: int) -> list[LineEvent]:
    return [ringing(line, n) for n in range(first, last + 1) for line in LINES]


def _accepted(node: NodeEnd, line: str) -> list[int]:
    """What a node keeps of a line's stream: duplicates dropped, and no gap allowed."""
    accepted: list[int] = []
    for seq in node.seqs(line):
        assert seq <= len(accepted) + 1, f"line {line}: gap, {seq} after {len(accepted)}"
        if seq == len(accepted) + 1:
            accepted.append(seq)
    return accepted


@contextlib.asynccontextmanager
async def _draining(gateway: Gateway) -> AsyncIterator[None]:
    task = asyncio.create_task(gateway.outbox.run())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await gateway.outbox.close()


def _run(body: Callable[[MemoryWorld], Awaitable[None]]) -> None:
    async def main() -> None:
        await body(MemoryWorld())

    asyncio.run(main())


def test_while_redis_is_down_at_most_a_window_leaves_and_nothing_is_done_then_everything_is_in_order_once() -> None:
    async def body(world: MemoryWorld) -> None:
        gateway, node = await Gateway.started(world, batch_size=8, window=4)
        async with _draining(gateway):
            gateway.writer.link.fail()
            failures = _metric("cms_redis_errors_total")
            gateway.outbox.put(_batch(1, 20))
            await until(lambda: _metric("cms_redis_errors_total") >= failures + 2, what="two failed writes")
            # Redis is written beside the publish: what went out before the first failed write was noticed
            # (at most the window) reaches nodes; nothing more does, and nothing counts as done without Redis.
            out = len(gateway.publisher.sent)
            assert out <= 4 * 8
            await until(lambda: _metric("cms_redis_errors_total") >= failures + 3, what="a third failed write")
            assert len(gateway.publisher.sent) == out
            assert gateway.outbox.depth == 60 and gateway.outbox.published == 0

            gateway.writer.link.recover()
            assert await gateway.outbox.wait_idle(10)
            await until(lambda: len(node.events) == 60)
            for line in LINES:
                assert node.seqs(line) == list(range(1, 21))
                assert [e.seq for e in await gateway.stored(line)] == list(range(1, 21))
            assert gateway.outbox.depth == 0 and gateway.outbox.published == 60

    _run(body)


def test_a_write_whose_reply_was_lost_is_stored_once_and_published_once() -> None:
    async def body(world: MemoryWorld) -> None:
        gateway, node = await Gateway.started(world, batch_size=8, window=4)
        async with _draining(gateway):
            gateway.writer.link.lose_replies(2)  # stored, but the outbox hears a failure: it retries
            gateway.outbox.put(_batch(1, 10))
            assert await gateway.outbox.wait_idle(10)
            await until(lambda: len(node.events) == 30)
            for line in LINES:
                assert node.seqs(line) == list(range(1, 11))
                assert [e.seq for e in await gateway.stored(line)] == list(range(1, 11))

    _run(body)


def test_a_broker_cut_mid_stream_leaves_every_line_in_order_without_gaps() -> None:
    async def body(world: MemoryWorld) -> None:
        gateway, node = await Gateway.started(world, batch_size=8, window=4)
        async with _draining(gateway):
            gateway.outbox.put(_batch(1, 100))
            await until(lambda: gateway.outbox.published >= 40, what="the first confirms")
            gateway.publisher.client.cut()  # the gateway's link only: the node keeps its queue
            failures = _metric("cms_broker_errors_total")
            gateway.outbox.put(_batch(101, 150))
            await until(lambda: _metric("cms_broker_errors_total") >= failures + 2, what="two failed publishes")
            gateway.publisher.client.restore()
            assert await gateway.outbox.wait_idle(15)
            await until(lambda: all(_accepted(node, line)[-1:] == [150] for line in LINES), what="every event")
            for line in LINES:
                assert _accepted(node, line) == list(range(1, 151))
                assert [e.seq for e in await gateway.stored(line)] == list(range(1, 151))  # stored once each

    _run(body)


def test_a_fenced_write_stops_the_outbox_for_good() -> None:
    async def body(world: MemoryWorld) -> None:
        gateway, node = await Gateway.started(world)
        gateway.writer.fence("lease", "gw-a 1")
        world.store.strings["lease"] = "gw-a 1"
        async with _draining(gateway):
            gateway.outbox.put(_batch(1, 2))
            assert await gateway.outbox.wait_idle(10)
            world.store.strings["lease"] = "gw-b 2"  # another gateway took over
            gateway.outbox.put(_batch(3, 3))
            await until(lambda: gateway.outbox.fenced)
            assert len(gateway.fenced) == 1 and "lease" in gateway.fenced[0]
            # the refused batch went out beside its write (the lease's local deadline allowed it), but nothing
            # is published once the write was refused, and Redis has none of it
            assert {e.seq for e in gateway.publisher.sent} <= {1, 2, 3}
            sent = len(gateway.publisher.sent)
            gateway.outbox.put(_batch(4, 6))
            await asyncio.sleep(0.05)
            assert len(gateway.publisher.sent) == sent
            assert [e.seq for e in await gateway.stored("501")] == [1, 2]

    _run(body)


def test_an_overflow_while_redis_is_down_restarts_every_line_under_a_new_epoch() -> None:
    async def body(world: MemoryWorld) -> None:
        gateway, node = await Gateway.started(world, capacity=20, batch_size=8)
        first = gateway.sequencer.epoch
        async with _draining(gateway):
            gateway.outbox.put(_batch(1, 2))
            assert await gateway.outbox.wait_idle(10)
            gateway.writer.link.fail()
            gateway.outbox.put(_batch(3, 10))  # 24 events: more than the outbox holds
            assert gateway.outbox.depth == 0
            gateway.writer.link.recover()
            await until(lambda: len(gateway.restarts) == 1, what="a new epoch")
            gateway.outbox.put(_batch(11, 11))
            assert await gateway.outbox.wait_idle(10)
            await until(lambda: len(node.events) == 9)
            assert gateway.restarts[0] != first
            assert [(e.epoch, e.seq) for e in node.events if e.line == "501"] == [
                (first, 1), (first, 2), (gateway.restarts[0], 1)
            ]

    _run(body)


def test_a_batch_the_writer_says_is_already_stored_is_published_not_retried() -> None:
    """The writer raises AlreadyStored (its own type, not a Redis message the outbox must parse) when a retried
    batch's entries are there: the outbox publishes the batch once and goes on."""
    from services.line_state import AlreadyStored

    async def body(world: MemoryWorld) -> None:
        gateway, node = await Gateway.started(world, batch_size=8, window=4)
        real_write = gateway.writer.write
        said = []

        async def write_then_say_stored(events):  # type: ignore[no-untyped-def]
            await real_write(events)
            if not said:
                said.append(True)
                raise AlreadyStored("entries at or below the stream top")

        gateway.writer.write = write_then_say_stored  # type: ignore[method-assign]
        async with _draining(gateway):
            gateway.outbox.put(_batch(1, 4))
            assert await gateway.outbox.wait_idle(10)
            await until(lambda: len(node.events) == 12)
            for line in LINES:
                assert node.seqs(line) == [1, 2, 3, 4]
        assert said

    _run(body)


class GatedWriter(MemoryLineStateWriter):
    """The memory writer, each write reaching the store only once ``gate`` is open (a slow or hung Redis)."""

    def __init__(self, world: MemoryWorld) -> None:
        super().__init__(world.store)
        self.gate = asyncio.Event()
        self.waiting = 0  # writes started and held at the gate

    async def write(self, events: Sequence[LineEvent]) -> None:
        self.waiting += 1
        try:
            await self.gate.wait()
        finally:
            self.waiting -= 1
        await super().write(events)


def _gated(world: MemoryWorld, **options: float) -> tuple[Gateway, GatedWriter]:
    gateway = Gateway(world, **options)  # type: ignore[arg-type]
    writer = GatedWriter(world)
    gateway.writer = writer
    gateway.outbox = EventOutbox(writer, gateway.publisher, gateway.sequencer, on_continuity_lost=gateway._new_epoch,
                                 on_fenced=gateway.fenced.append, **options)  # type: ignore[arg-type]
    return gateway, writer


async def _start(gateway: Gateway) -> NodeEnd:
    gateway.sequencer.restart(await gateway.writer.new_epoch())
    return await NodeEnd.open(MemoryNodeBus(gateway.world.broker, gateway.world.topology, "n1"), *LINES)


def test_redis_is_written_beside_the_publish_and_an_event_is_done_only_once_stored() -> None:
    """The publish does not wait for the Redis write; the event leaves the outbox (and its term's handover) only
    once both the broker confirmed it and Redis holds it."""
    async def body(world: MemoryWorld) -> None:
        gateway, writer = _gated(world, batch_size=8, window=4, store_stall_seconds=30)
        node = await _start(gateway)
        async with _draining(gateway):
            gateway.outbox.put(_batch(1, 2))
            await until(lambda: len(node.events) == 6, what="published while the write waits")
            assert writer.waiting == 1 and await gateway.stored("501") == []
            await asyncio.sleep(0.05)  # confirmed by now, yet not done without Redis
            assert gateway.outbox.published == 0 and not await gateway.outbox.wait_idle(0.01)
            assert [e.seq for e in gateway.outbox.unconfirmed() if e.line == "501"] == [1, 2]

            writer.gate.set()
            assert await gateway.outbox.wait_idle(5)
            assert gateway.outbox.published == 6 and gateway.outbox.unconfirmed() == []
            for line in LINES:
                assert [e.seq for e in await gateway.stored(line)] == [1, 2]

    _run(body)


def test_redis_never_falls_more_than_the_window_behind_and_a_hung_write_stops_publishing() -> None:
    async def body(world: MemoryWorld) -> None:
        gateway, writer = _gated(world, batch_size=3, window=4, store_stall_seconds=0.1)
        node = await _start(gateway)
        async with _draining(gateway):
            gateway.outbox.put(_batch(1, 20))  # 60 events, 20 batches of 3
            await until(lambda: len(node.events) == 12, what="the window published")
            await asyncio.sleep(0.2)  # past the stall: the write hangs
            assert len(gateway.publisher.sent) == 12  # the window, and not one batch more
            gateway.outbox.put(_batch(21, 22))
            await asyncio.sleep(0.05)
            assert len(gateway.publisher.sent) == 12 and gateway.outbox.published == 0

            writer.gate.set()
            assert await gateway.outbox.wait_idle(5)
            await until(lambda: len(node.events) == 66)
            for line in LINES:
                assert node.seqs(line) == list(range(1, 23))
                assert [e.seq for e in await gateway.stored(line)] == list(range(1, 23))

    _run(body)


def test_after_a_broker_cut_the_backlog_is_published_only_once_stored_then_beside_again() -> None:
    """A node rebinding after the same outage reads Redis once bound: a backlog batch that reached the broker
    before its write landed would be in neither its queue nor its read. Until the backlog is out, each batch
    goes to the broker only once Redis holds it; afterwards Redis is beside the publish again."""
    async def body(world: MemoryWorld) -> None:
        gateway, writer = _gated(world, batch_size=4, window=4, store_stall_seconds=30)
        node = await _start(gateway)
        writer.gate.set()
        async with _draining(gateway):
            gateway.publisher.client.cut()
            failures = _metric("cms_broker_errors_total")
            gateway.outbox.put(_batch(1, 10))
            await until(lambda: _metric("cms_broker_errors_total") >= failures + 1, what="a failed publish")
            writer.gate.clear()  # Redis slows down as the broker comes back
            gateway.publisher.client.restore()
            await until(lambda: writer.waiting == 1, what="a write waiting")
            await asyncio.sleep(0.3)  # past the retry: the broker is back
            for line in LINES:
                stored = len(await gateway.stored(line))
                assert all(seq <= stored for seq in node.seqs(line)), "published before it was stored"
            writer.gate.set()
            assert await gateway.outbox.wait_idle(10)
            await until(lambda: all(_accepted(node, line)[-1:] == [10] for line in LINES), what="every event")

            writer.gate.clear()  # backlog out: the next batch is published beside its write again
            gateway.outbox.put(_batch(11, 11))
            await until(lambda: all(11 in node.seqs(line) for line in LINES), what="published beside the write")
            assert writer.waiting == 1 and len(await gateway.stored("501")) == 10
            writer.gate.set()
            assert await gateway.outbox.wait_idle(5)

    _run(body)


def test_writes_paused_holds_the_store_task_and_the_publish_still_goes_out() -> None:
    async def body(world: MemoryWorld) -> None:
        gateway, node = await Gateway.started(world, batch_size=8, window=4)
        async with _draining(gateway):
            async with gateway.outbox.writes_paused():
                gateway.outbox.put(_batch(1, 1))
                await until(lambda: len(node.events) == 3, what="published while writes are paused")
                await asyncio.sleep(0.05)
                assert await gateway.stored("501") == [] and gateway.outbox.published == 0
            assert await gateway.outbox.wait_idle(5)
            assert [e.seq for e in await gateway.stored("501")] == [1]

    _run(body)


def test_a_slow_write_does_not_hold_small_batches_back_redis_lag_is_bounded_in_events() -> None:
    """At a low rate every batch is an event or two: a Redis write slower than ``window`` of them must not hold
    the publish back (Redis in series again). What bounds Redis's lag is ``window * batch_size`` events."""
    async def body(world: MemoryWorld) -> None:
        gateway, writer = _gated(world, batch_size=4, window=2, store_stall_seconds=30)
        node = await _start(gateway)
        async with _draining(gateway):
            for n in range(1, 6):  # one event at a time: five batches of one, while the first write hangs
                gateway.outbox.put([ringing("501", n)])
                await until(lambda n=n: len(node.events) == n, what=f"event {n} published beside the slow write")
            assert writer.waiting == 1 and gateway.outbox.published == 0
            for n in range(6, 11):
                gateway.outbox.put([ringing("501", n)])
            await asyncio.sleep(0.05)
            assert len(gateway.publisher.sent) == 2 * 4  # no more than window * batch_size events ahead of Redis
            writer.gate.set()
            assert await gateway.outbox.wait_idle(5)
            await until(lambda: len(node.events) == 10)
            assert node.seqs("501") == list(range(1, 11))
            assert [e.seq for e in await gateway.stored("501")] == list(range(1, 11))

    _run(body)
