"""Gateway outbox -> Redis + RabbitMQ -> node line feed, all real, in a private namespace."""

from __future__ import annotations

import asyncio
import contextlib
import time
import urllib.parse

import aio_pika
import pytest
import redis.asyncio as aioredis
from prometheus_client import REGISTRY

from ami_gateway.event_outbox import EventOutbox, EventPublisher, Sequencer
from local_cluster.infra import Infrastructure
from ops.chaos.fault_proxy import CUT, PASS, FaultProxy
from services.broker import QUORUM
from services.line_state import LineSnapshot, LineStateReader, LineStateWriter
from services.topology import Topology
from services.wire import (
    Call,
    CallState,
    Command,
    CommandName,
    CommandResult,
    DialArgs,
    Direction,
    EventType,
    LineEvent,
)
from ws_node.line_feed import LineFeed, RabbitNodeBus

pytestmark = pytest.mark.integration


class Collector:
    def __init__(self) -> None:
        self.events: list[LineEvent] = []
        self.resyncs: list[LineSnapshot] = []

    def deliver_event(self, event: LineEvent) -> None:
        self.events.append(event)

    def resync(self, snapshot: LineSnapshot) -> None:
        self.resyncs.append(snapshot)


def _event(line: str, n: int, state: CallState = CallState.RINGING) -> LineEvent:
    call = Call(id=f"call-{n}", line=line, linked_id=f"{n}.0", channel=f"SIP/{line}-{n}", direction=Direction.INBOUND,
                state=state, caller_number=str(1000 + n), started_at=time.time())
    return LineEvent(line=line, type=EventType.RING_STARTED, call=call, ami_received_at=time.time())


async def _wait_until(predicate: object, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.02)


async def _cleanup(infra: Infrastructure, prefix: str, redis_client: aioredis.Redis) -> None:
    keys = [k async for k in redis_client.scan_iter(f"{prefix}:*")]
    if keys:
        await redis_client.delete(*keys)
    connection = await aio_pika.connect(infra.amqp_url)
    async with connection:
        channel = await connection.channel()
        topology = Topology(prefix)
        await channel.queue_delete(topology.commands_queue)
        await channel.exchange_delete(topology.events_exchange)


def test_events_arrive_in_order_and_gaps_are_repaired_from_history(infra: Infrastructure, prefix: str) -> None:
    async def main() -> None:
        topology = Topology(prefix)
        redis_client = aioredis.from_url(infra.redis_url)
        writer = LineStateWriter(redis_client, prefix)
        sequencer = Sequencer(await writer.new_epoch())
        publisher = EventPublisher(infra.amqp_url, topology)
        outbox = EventOutbox(writer, publisher, sequencer)
        feed = LineFeed("n1", RabbitNodeBus(infra.amqp_url, topology, "n1"), LineStateReader(redis_client, prefix))
        collector = Collector()
        drain = asyncio.create_task(outbox.run())
        try:
            await feed.start()
            await asyncio.wait_for(feed.connected.wait(), 10)
            # the exchange must exist before the node binds: the gateway declares it on first publish
            outbox.put([_event("999", 0)])
            assert await outbox.wait_idle(10)
            snapshot = await feed.follow(collector, "305")
            assert snapshot.calls == ()

            outbox.put([_event("305", n) for n in range(1, 201)])
            await _wait_until(lambda: len(collector.events) == 200)
            assert [e.seq for e in collector.events] == list(range(1, 201))
            assert [e.call.caller_number for e in collector.events if e.call] == [str(1000 + n) for n in range(1, 201)]

            # A gap: events 201-202 reach Redis but never the broker; 203 arrives normally.
            lost = [sequencer.position(_event("305", n)) for n in (201, 202)]
            await writer.write(lost)
            outbox.put([_event("305", 203)])
            await _wait_until(lambda: len(collector.events) == 203)
            assert [e.seq for e in collector.events[-3:]] == [201, 202, 203]

            # A duplicate delivery (publisher retry) is dropped.
            await feed.handle_event(collector.events[-1])
            assert len(collector.events) == 203

            # Lines nobody follows on this node are not delivered.
            outbox.put([_event("306", 1)])
            assert await outbox.wait_idle(10)
            await asyncio.sleep(0.2)
            assert all(e.line == "305" for e in collector.events)
        finally:
            drain.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await drain
            await feed.stop()
            await publisher.close()
            await _cleanup(infra, prefix, redis_client)
            await redis_client.aclose()

    asyncio.run(main())


def test_commands_round_trip_and_stale_commands_expire(infra: Infrastructure, prefix: str) -> None:
    async def main() -> None:
        topology = Topology(prefix)
        redis_client = aioredis.from_url(infra.redis_url)
        feed = LineFeed("n1", RabbitNodeBus(infra.amqp_url, topology, "n1"), LineStateReader(redis_client, prefix),
                        command_ttl_seconds=1.0)
        connection = await aio_pika.connect(infra.amqp_url)
        try:
            await feed.start()
            await asyncio.wait_for(feed.connected.wait(), 10)
            channel = await connection.channel()
            queue = await channel.declare_queue(topology.commands_queue, durable=True,
                                            arguments={"x-queue-type": QUORUM})

            async def answer_one() -> None:
                async with queue.iterator() as messages:
                    async for message in messages:
                        async with message.process():
                            command = Command.decode(message.body)
                            result = CommandResult(command.id, ok=True, data={"echo": command.args_as(DialArgs).number})
                            await channel.default_exchange.publish(
                                aio_pika.Message(result.encode(), correlation_id=command.id),
                                routing_key=message.reply_to or "",
                            )
                        return

            # Stale: nobody consumes for longer than the TTL, so the broker drops it.
            stale = Command("old", "305", CommandName.MAKE_CALL, DialArgs("1"), issued_at=time.time())
            result = await feed.send_command(stale, timeout=1.5)
            assert not result.ok and "did not answer" in result.error
            answerer = asyncio.create_task(answer_one())
            fresh = Command("new", "305", CommandName.MAKE_CALL, DialArgs("5551234"), issued_at=time.time())
            result = await feed.send_command(fresh, timeout=5)
            assert result.ok and result.data == {"echo": "5551234"}
            await answerer
            assert (await channel.declare_queue(topology.commands_queue, durable=True, passive=True)) is not None
        finally:
            await feed.stop()
            await connection.close()
            await _cleanup(infra, prefix, redis_client)
            await redis_client.aclose()

    asyncio.run(main())


def test_broker_link_cut_events_published_meanwhile_arrive_in_order(infra: Infrastructure, prefix: str) -> None:
    async def main() -> None:
        topology = Topology(prefix)
        redis_client = aioredis.from_url(infra.redis_url)
        writer = LineStateWriter(redis_client, prefix)
        sequencer = Sequencer(await writer.new_epoch())
        publisher = EventPublisher(infra.amqp_url, topology)  # the gateway's link is not cut
        outbox = EventOutbox(writer, publisher, sequencer)
        amqp = urllib.parse.urlsplit(infra.amqp_url)
        proxy = FaultProxy("proxy", amqp.hostname or "127.0.0.1", amqp.port or 5672)
        await proxy.start()
        credentials = amqp.netloc.rpartition("@")[0]
        proxied_url = amqp._replace(netloc=f"{credentials}@127.0.0.1:{proxy.port}").geturl()
        feed = LineFeed("n1", RabbitNodeBus(proxied_url, topology, "n1"), LineStateReader(redis_client, prefix))
        collector = Collector()
        drain = asyncio.create_task(outbox.run())
        reconnects = REGISTRY.get_sample_value("cms_broker_reconnects_total") or 0.0
        repaired = REGISTRY.get_sample_value("cms_node_gap_repairs_total", {"outcome": "repaired"}) or 0.0
        try:
            await feed.start()
            await asyncio.wait_for(feed.connected.wait(), 10)
            outbox.put([_event("999", 0)])  # the gateway declares the exchange
            assert await outbox.wait_idle(10)
            await feed.follow(collector, "305")
            outbox.put([_event("305", n) for n in range(1, 4)])
            await _wait_until(lambda: len(collector.events) == 3)
            await asyncio.sleep(0.5)  # past the node's second look at the line it bound (settle_seconds)

            await proxy.set_fault(CUT)
            await _wait_until(lambda: not feed.connected.is_set())
            outbox.put([_event("305", n) for n in range(4, 31)])  # published while the node is away
            assert await outbox.wait_idle(10)
            await asyncio.sleep(0.5)
            assert len(collector.events) == 3

            await proxy.set_fault(PASS)
            await asyncio.wait_for(feed.connected.wait(), 20)
            await _wait_until(lambda: len(collector.events) == 30)
            outbox.put([_event("305", n) for n in range(31, 36)])  # and live again after
            await _wait_until(lambda: len(collector.events) == 35)
            await asyncio.sleep(0.2)
            assert [e.seq for e in collector.events] == list(range(1, 36))
            assert [e.call.caller_number for e in collector.events if e.call] == [str(1000 + n) for n in range(1, 36)]
            assert (REGISTRY.get_sample_value("cms_broker_reconnects_total") or 0.0) > reconnects
            assert (REGISTRY.get_sample_value("cms_node_gap_repairs_total", {"outcome": "repaired"}) or 0.0) > repaired
        finally:
            drain.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await drain
            await feed.stop()
            await proxy.set_fault(CUT)
            await publisher.close()
            await _cleanup(infra, prefix, redis_client)
            await redis_client.aclose()

    asyncio.run(main())
