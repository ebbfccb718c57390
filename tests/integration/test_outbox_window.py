"""EventOutbox's window of unconfirmed batches against the real RabbitMQ and Redis.

The outbox publishes batch n+1 before batch n is confirmed. These tests check what that must not cost: a broker
cut with a full window in flight leaves every line's stream gap-free and in order (duplicates allowed: nodes drop
them by sequence number), and no consumer ever sees an event that is not in Redis yet.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import urllib.parse
from collections.abc import Sequence

import aio_pika
import pytest
import redis.asyncio as aioredis
from aio_pika.abc import AbstractIncomingMessage

from ami_gateway.event_outbox import EventOutbox, EventPublisher, Sequencer
from local_cluster.infra import Infrastructure
from ops.chaos.fault_proxy import BLACKHOLE, CUT, PASS, FaultProxy
from services.line_state import LineKeys, LineStateWriter
from services.topology import Topology
from services.wire import Call, CallState, Direction, EventType, LineEvent
from tests.integration.test_gateway_proxy import cleanup, wait_until

pytestmark = pytest.mark.integration

LINES = [str(n) for n in range(501, 506)]


def _event(line: str, n: int) -> LineEvent:
    call = Call(id=f"call-{line}-{n}", line=line, linked_id=f"{n}.0", channel=f"SIP/{line}-{n}",
                direction=Direction.INBOUND, state=CallState.RINGING, caller_number=str(1000 + n),
                started_at=time.time())
    return LineEvent(line=line, type=EventType.RING_STARTED, call=call, ami_received_at=time.time())


def _via(url: str, port: int) -> str:
    parts = urllib.parse.urlsplit(url)
    netloc = f"{parts.username}:{parts.password}@127.0.0.1:{port}" if parts.username else f"127.0.0.1:{port}"
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


class Consumer:
    """A node's view of the events exchange; on each delivery it also reads the line's stored position in Redis."""

    def __init__(self, amqp_url: str, prefix: str, redis_client: aioredis.Redis | None = None) -> None:
        self._url = amqp_url
        self._topology = Topology(prefix)
        self._keys = LineKeys(prefix)
        self._redis = redis_client
        self.events: list[LineEvent] = []
        self.not_yet_stored: list[tuple[str, int, int]] = []  # (line, seq delivered, seq stored at that moment)
        self._connection: aio_pika.abc.AbstractConnection | None = None

    async def start(self, lines: Sequence[str]) -> Consumer:
        self._connection = await aio_pika.connect(self._url)
        channel = await self._connection.channel()
        exchange = await channel.declare_exchange(
            self._topology.events_exchange, aio_pika.ExchangeType.DIRECT, durable=True
        )
        queue = await channel.declare_queue(exclusive=True)
        for line in lines:
            await queue.bind(exchange, self._topology.line_routing_key(line))
        await queue.consume(self._on_message, no_ack=True)
        return self

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        event = LineEvent.decode(message.body)
        self.events.append(event)
        if self._redis is not None:
            stored = await self._redis.hget(self._keys.pos(event.line), "seq")
            stored_seq = int(stored) if stored is not None else 0
            if stored_seq < event.seq:
                self.not_yet_stored.append((event.line, event.seq, stored_seq))

    def seqs(self, line: str) -> list[int]:
        return [e.seq for e in self.events if e.line == line]

    async def close(self) -> None:
        if self._connection is not None:
            await self._connection.close()


def _assert_gap_free(raw: list[int], last: int) -> int:
    """What a node does: accept seq == last + 1, drop seq <= last; a seq beyond last + 1 would be a gap."""
    accepted = 0
    duplicates = 0
    for seq in raw:
        assert seq <= accepted + 1, f"gap: {seq} delivered after {accepted}"
        if seq == accepted + 1:
            accepted = seq
        else:
            duplicates += 1
    assert accepted == last
    return duplicates


async def _stored_total(redis_client: aioredis.Redis, prefix: str) -> int:
    keys = LineKeys(prefix)
    total = 0
    for line in LINES:
        value = await redis_client.hget(keys.pos(line), "seq")
        total += int(value) if value is not None else 0
    return total


async def _stop(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


def test_broker_cut_with_a_full_window_keeps_every_line_in_order_without_gaps(infra: Infrastructure,
                                                                              prefix: str) -> None:
    batch_size, window, per_line = 16, 8, 600

    async def main() -> None:
        amqp_port = urllib.parse.urlsplit(infra.amqp_url).port or 5672
        broker = FaultProxy("broker", "127.0.0.1", amqp_port)
        await broker.start()
        redis_client = aioredis.from_url(infra.redis_url)
        writer = LineStateWriter(redis_client, prefix)
        publisher = EventPublisher(_via(infra.amqp_url, broker.port), Topology(prefix))
        outbox = EventOutbox(writer, publisher, Sequencer(await writer.new_epoch()), batch_size=batch_size,
                             window=window)
        consumer = Consumer(infra.amqp_url, prefix)
        drain = asyncio.create_task(outbox.run())
        try:
            outbox.put([_event("999", 0)])  # declares the exchange before the consumer binds
            assert await outbox.wait_idle(10)
            await consumer.start(LINES)
            published_before = outbox.published

            # First cut: while events stream (confirms flowing, batches in flight).
            outbox.put([_event(line, n) for n in range(1, per_line // 2 + 1) for line in LINES])
            await wait_until(lambda: outbox.published - published_before >= 5 * batch_size, 10, "first confirms")
            await broker.set_fault(CUT)
            await asyncio.sleep(0.3)
            await broker.set_fault(PASS)
            assert await outbox.wait_idle(30)  # reconnected and caught up before the next phase

            # Second cut: hold the broker's bytes so that no confirm comes back and the window fills up.
            outbox.put([_event(line, n) for n in range(per_line // 2 + 1, per_line + 1) for line in LINES])
            await broker.set_fault(BLACKHOLE)
            published_at_pause = outbox.published
            await asyncio.sleep(0.5)
            stored = await _stored_total(redis_client, prefix)
            assert outbox.published == published_at_pause  # nothing confirmed while the broker is held ...
            # ... yet the outbox went on: several batches stored and published beyond the last confirm.
            unconfirmed = stored - (outbox.published - published_before)
            assert unconfirmed >= (window - 1) * batch_size, f"only {unconfirmed} events beyond the last confirm"
            assert unconfirmed <= window * batch_size + batch_size  # and it kept to its window
            await broker.set_fault(CUT)  # the window in flight is lost
            await asyncio.sleep(0.3)
            await broker.set_fault(PASS)

            assert await outbox.wait_idle(30)
            total = len(LINES) * per_line
            assert outbox.published - published_before == total
            await wait_until(lambda: all(per_line in consumer.seqs(line) for line in LINES), 15, "last events")
            assert broker.stats.accepted >= 3  # it reconnected after each cut
            for line in LINES:
                _assert_gap_free(consumer.seqs(line), per_line)
            assert outbox.depth == 0
        finally:
            await _stop(drain)
            await outbox.close()
            await consumer.close()
            await broker.close()
            await redis_client.aclose()
            await cleanup(infra, prefix)

    asyncio.run(main())


class SlowWriter(LineStateWriter):
    """The real writer behind a slow link: each MULTI reaches Redis only after ``delay`` seconds."""

    def __init__(self, client: aioredis.Redis, prefix: str, delay: float) -> None:
        super().__init__(client, prefix)
        self._delay = delay

    async def write(self, events: Sequence[LineEvent]) -> None:
        await asyncio.sleep(self._delay)
        await super().write(events)


def test_no_consumer_sees_an_event_before_it_is_in_redis(infra: Infrastructure, prefix: str) -> None:
    per_line = 200

    async def main() -> None:
        redis_client = aioredis.from_url(infra.redis_url)
        writer = SlowWriter(redis_client, prefix, delay=0.02)
        publisher = EventPublisher(infra.amqp_url, Topology(prefix))
        outbox = EventOutbox(writer, publisher, Sequencer(await writer.new_epoch()), batch_size=8, window=8)
        consumer = Consumer(infra.amqp_url, prefix, redis_client)
        drain = asyncio.create_task(outbox.run())
        try:
            outbox.put([_event("999", 0)])
            assert await outbox.wait_idle(10)
            await consumer.start(LINES)
            # Events trickle in while batches are in flight, so the Redis write of one batch overlaps the
            # confirms of the ones before it.
            for n in range(1, per_line + 1):
                outbox.put([_event(line, n) for line in LINES])
                if n % 10 == 0:
                    await asyncio.sleep(0.005)
            assert await outbox.wait_idle(30)
            await wait_until(lambda: all(per_line in consumer.seqs(line) for line in LINES), 15, "last events")
            assert consumer.not_yet_stored == []
            for line in LINES:
                assert consumer.seqs(line) == list(range(1, per_line + 1))  # no cut: exactly once, in order
        finally:
            await _stop(drain)
            await outbox.close()
            await consumer.close()
            await redis_client.aclose()
            await cleanup(infra, prefix)

    asyncio.run(main())


def test_window_must_hold_a_batch(infra: Infrastructure, prefix: str) -> None:
    async def main() -> None:
        redis_client = aioredis.from_url(infra.redis_url)
        try:
            with pytest.raises(ValueError, match="window"):
                EventOutbox(LineStateWriter(redis_client, prefix), EventPublisher(infra.amqp_url, Topology(prefix)),
                            Sequencer("1"), window=0)
        finally:
            await redis_client.aclose()

    asyncio.run(main())


def test_overflow_with_a_window_in_flight_restarts_cleanly_under_a_new_epoch(infra: Infrastructure,
                                                                              prefix: str) -> None:
    batch_size, window, capacity = 16, 8, 400

    async def main() -> None:
        amqp_port = urllib.parse.urlsplit(infra.amqp_url).port or 5672
        broker = FaultProxy("broker", "127.0.0.1", amqp_port)
        await broker.start()
        redis_client = aioredis.from_url(infra.redis_url)
        writer = LineStateWriter(redis_client, prefix)
        sequencer = Sequencer(await writer.new_epoch())
        first_epoch = sequencer.epoch
        restarts: list[str] = []

        async def continuity_lost() -> None:
            sequencer.restart(await writer.new_epoch())
            restarts.append(sequencer.epoch)

        publisher = EventPublisher(_via(infra.amqp_url, broker.port), Topology(prefix))
        outbox = EventOutbox(writer, publisher, sequencer, capacity=capacity, batch_size=batch_size, window=window,
                             on_continuity_lost=continuity_lost)
        consumer = Consumer(infra.amqp_url, prefix)
        drain = asyncio.create_task(outbox.run())
        try:
            outbox.put([_event("999", 0)])
            assert await outbox.wait_idle(10)
            await consumer.start(LINES)
            published_before = outbox.published

            await broker.set_fault(BLACKHOLE)  # confirms stop: the window fills, then the queue grows past its capacity
            outbox.put([_event(line, n) for n in range(1, 61) for line in LINES])  # 300 events
            await asyncio.sleep(0.3)
            assert outbox.published == published_before and outbox.depth == 300
            outbox.put([_event(line, n) for n in range(61, 82) for line in LINES])  # 300 + 105 > capacity
            assert outbox.depth == 0
            await wait_until(lambda: len(restarts) == 1, 5, "continuity restored under a new epoch")
            new_epoch = restarts[0]
            assert new_epoch != first_epoch
            outbox.put([_event(line, n) for n in range(1, 41) for line in LINES])  # positioned in the new epoch
            # The held bytes flow again: the old generation's window is confirmed late, and those confirms must
            # not be taken for the new events'.
            await broker.set_fault(PASS)

            assert await outbox.wait_idle(30)
            assert outbox.depth == 0
            assert outbox.published - published_before == 40 * len(LINES)  # only the new epoch's events count
            await wait_until(lambda: all(any(e.epoch == new_epoch and e.seq == 40 for e in consumer.events
                                             if e.line == line) for line in LINES), 15, "new epoch delivered")
            for line in LINES:
                _assert_gap_free([e.seq for e in consumer.events if e.line == line and e.epoch == new_epoch], 40)
        finally:
            await _stop(drain)
            await outbox.close()
            await consumer.close()
            await broker.close()
            await redis_client.aclose()
            await cleanup(infra, prefix)

    asyncio.run(main())
