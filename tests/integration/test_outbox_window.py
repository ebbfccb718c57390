"""EventOutbox's window of unconfirmed batches against the real RabbitMQ and Redis.

The outbox publishes batch n+1 before batch n is confirmed, and writes Redis beside the publish rather than before
it. These tests check what that must not cost: a broker cut with a full window in flight leaves every line's stream
gap-free and in order (duplicates allowed: nodes drop them by sequence number); an event counts as done only once
Redis holds it; Redis never falls more than the window behind the broker; and a Redis outage after a publish ends
with every event any consumer saw in the history, in order.
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


async def _history(redis_client: aioredis.Redis, prefix: str, line: str) -> list[int]:
    entries = await redis_client.xrange(LineKeys(prefix).events(line), "-", "+")
    return [LineEvent.decode(fields[b"e"]).seq for _id, fields in entries]


def test_redis_is_written_beside_the_publish_and_an_event_is_done_only_once_stored(infra: Infrastructure,
                                                                                   prefix: str) -> None:
    """The publish does not wait for Redis (a consumer may see an event a moment before its write lands), yet
    the outbox counts an event done only when Redis holds it, and never runs more than its window ahead."""
    per_line, batch_size, window = 200, 8, 8

    async def main() -> None:
        redis_client = aioredis.from_url(infra.redis_url)
        writer = SlowWriter(redis_client, prefix, delay=0.02)
        publisher = EventPublisher(infra.amqp_url, Topology(prefix))
        outbox = EventOutbox(writer, publisher, Sequencer(await writer.new_epoch()), batch_size=batch_size,
                             window=window)
        consumer = Consumer(infra.amqp_url, prefix, redis_client)
        drain = asyncio.create_task(outbox.run())
        try:
            outbox.put([_event("999", 0)])
            assert await outbox.wait_idle(10)
            await consumer.start(LINES)
            published_before = outbox.published
            done_but_not_stored: list[tuple[int, int]] = []
            watching = True

            async def watch() -> None:
                # Its own client, and stopped by a flag: a command cancelled halfway must not hang the others.
                client = aioredis.from_url(infra.redis_url)
                try:
                    while watching:
                        done = outbox.published - published_before
                        stored = await _stored_total(client, prefix)
                        if done > stored:
                            done_but_not_stored.append((done, stored))
                        await asyncio.sleep(0.003)
                finally:
                    await client.aclose()

            watcher = asyncio.create_task(watch())
            for n in range(1, per_line + 1):
                outbox.put([_event(line, n) for line in LINES])
                if n % 10 == 0:
                    await asyncio.sleep(0.005)
            assert await outbox.wait_idle(30)
            watching = False
            await asyncio.wait_for(watcher, 10)
            await wait_until(lambda: all(per_line in consumer.seqs(line) for line in LINES), 15, "last events")
            assert done_but_not_stored == []
            # With a 20 ms write, consumers got events before Redis held them: Redis was not in series ...
            assert consumer.not_yet_stored, "every event waited for its Redis write before it was published"
            # ... and never more than the window ahead of it.
            assert max(seq - stored for _line, seq, stored in consumer.not_yet_stored) <= window * batch_size
            for line in LINES:
                assert consumer.seqs(line) == list(range(1, per_line + 1))  # no cut: exactly once, in order
                assert await _history(redis_client, prefix, line) == list(range(1, per_line + 1))
        finally:
            await _stop(drain)
            await outbox.close()
            await consumer.close()
            await redis_client.aclose()
            await cleanup(infra, prefix)

    asyncio.run(main())


def test_redis_lost_after_a_publish_holds_the_window_and_the_history_lands_complete(infra: Infrastructure,
                                                                                  prefix: str) -> None:
    """Redis goes silent, then its connections are cut, while batches are on the broker: nothing beyond the
    window is published, nothing counts as done, and once Redis answers again every event that any consumer
    saw is in the line's history, in order, without a gap."""
    per_line, batch_size, window = 120, 8, 4

    async def main() -> None:
        redis_port = urllib.parse.urlsplit(infra.redis_url).port or 6379
        proxy = FaultProxy("redis", "127.0.0.1", redis_port)
        await proxy.start()
        direct = aioredis.from_url(infra.redis_url)
        proxied = aioredis.from_url(_via(infra.redis_url, proxy.port), socket_timeout=2)
        writer = LineStateWriter(proxied, prefix)
        publisher = EventPublisher(infra.amqp_url, Topology(prefix))
        outbox = EventOutbox(writer, publisher, Sequencer(await writer.new_epoch()), batch_size=batch_size,
                             window=window)
        consumer = Consumer(infra.amqp_url, prefix)
        drain = asyncio.create_task(outbox.run())
        try:
            outbox.put([_event("999", 0)])
            assert await outbox.wait_idle(10)
            await consumer.start(LINES)
            published_before = outbox.published

            await proxy.set_fault(BLACKHOLE)  # writes hang: no answer, no error
            outbox.put([_event(line, n) for n in range(1, per_line + 1) for line in LINES])
            await wait_until(lambda: len(consumer.events) >= window * batch_size, 10, "the window published")
            await asyncio.sleep(0.5)
            assert outbox.published == published_before  # confirmed by the broker, but not in Redis: not done
            assert len(consumer.events) == window * batch_size  # and nothing beyond the window went out
            await proxy.set_fault(CUT)  # the hung write fails; the store task retries with backoff
            await asyncio.sleep(0.5)
            assert outbox.published == published_before
            await proxy.set_fault(PASS)

            assert await outbox.wait_idle(30)
            assert outbox.published - published_before == per_line * len(LINES)
            await wait_until(lambda: all(per_line in consumer.seqs(line) for line in LINES), 15, "last events")
            for line in LINES:
                _assert_gap_free(consumer.seqs(line), per_line)
                assert await _history(direct, prefix, line) == list(range(1, per_line + 1))
                assert int(await direct.hget(LineKeys(prefix).pos(line), "seq") or 0) == per_line
        finally:
            await _stop(drain)
            await outbox.close()
            await consumer.close()
            await proxy.close()
            await proxied.aclose()
            await direct.aclose()
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
