"""The gateway's event outbox over the in-memory stores: what it does while Redis or the broker is
away, and that every line's stream leaves in order, stored once, with nothing skipped.

A node's queue watches the wire (``NodeEnd``): duplicates may appear there after a broker retry
(nodes drop them by sequence number), a gap never may. tests/integration/test_outbox_window.py
plays the broker cut against the real services.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable

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


def test_while_redis_is_down_nothing_leaves_then_everything_does_in_order_once() -> None:
    async def body(world: MemoryWorld) -> None:
        gateway, node = await Gateway.started(world, batch_size=8, window=4)
        async with _draining(gateway):
            gateway.writer.link.fail()
            failures = _metric("cms_redis_errors_total")
            gateway.outbox.put(_batch(1, 20))
            await until(lambda: _metric("cms_redis_errors_total") >= failures + 2, what="two failed writes")
            assert node.events == [] and gateway.publisher.sent == [] and gateway.outbox.depth == 60

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
            # the refused batch was never published (the store comes first), and nothing is sent after
            assert {e.seq for e in gateway.publisher.sent} == {1, 2}
            await until(lambda: len(node.events) == 6)
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
