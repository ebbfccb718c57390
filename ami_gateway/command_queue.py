"""The gateway's side of the commands queue: agents' commands in, answers back to their nodes.

The nodes publish each command to one durable queue with a per-message expiration and a reply
queue; the lease holder consumes it (at most ``prefetch`` commands in flight, so a click-to-dial
waiting for a phone never holds up another agent's hangup). A :class:`CommandDelivery` is one
message: it is acknowledged when handled, answered on the sender's reply queue, handed back to the
queue as a new message (this gateway may not act on it: the next holder takes it), or requeued
(stepping down mid-command: the next holder gets it marked *redelivered*, which tells it the
command may have been carried out).

:class:`RabbitCommandQueue` is the RabbitMQ implementation; ami_gateway/command_queue_memory.py is
its in-memory sibling. Both reconnect the same way (:func:`consume_with_reconnects`), with backoff
and jitter, forever: while the broker is away the queue keeps the commands and their deadlines.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from typing import Protocol

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage

from services.backoff import Backoff
from services.broker import BROKER_FAILURES, Broker, close_quietly, declare_commands_queue
from services.infra_metrics import BROKER_ERRORS
from services.topology import Topology
from services.wire import CommandResult

log = logging.getLogger(__name__)

#: what a lost or refusing broker connection raises, over RabbitMQ or in memory
QUEUE_FAILURES: tuple[type[BaseException], ...] = BROKER_FAILURES


class CommandDelivery(Protocol):
    """One command message, delivered to this gateway and not settled yet. Settling raises one of
    :data:`QUEUE_FAILURES` when the connection it came on is gone (the broker then redelivers it)."""

    @property
    def body(self) -> bytes: ...

    @property
    def redelivered(self) -> bool:
        """The broker delivered it before, to a consumer that did not acknowledge it."""
        ...

    def processing(self) -> AbstractAsyncContextManager[None]:
        """Around the handling: acknowledges at the end unless settled meanwhile; an exception
        rejects it without requeue (a command that broke its handler is not retried)."""
        ...

    async def reply(self, result: CommandResult) -> None:
        """Answer the sender, if it gave a reply queue, correlated by ``result.command_id``."""
        ...

    async def hand_back(self) -> None:
        """Publish the same command again as a new message (not marked redelivered); it is then
        acknowledged by :meth:`processing`."""
        ...

    async def requeue(self) -> None:
        """Reject it back to the queue: the next consumer gets it marked redelivered."""
        ...


class CommandQueue(Protocol):
    def deliveries(self) -> AsyncIterator[CommandDelivery]:
        """Every command message as it arrives, across reconnects, until the caller is cancelled."""
        ...


class SubscribingQueue(CommandQueue):
    """A queue whose deliveries come from successive subscriptions (see :func:`consume_with_reconnects`)."""

    def deliveries(self) -> AsyncIterator[CommandDelivery]:
        return consume_with_reconnects(self._subscribe)

    def _subscribe(self) -> AbstractAsyncContextManager[asyncio.Queue[CommandDelivery | None]]:
        """One connection's subscription: its deliveries, then None once the connection is lost."""
        raise NotImplementedError


async def consume_with_reconnects(
    subscribe: Callable[[], AbstractAsyncContextManager[asyncio.Queue[CommandDelivery | None]]],
) -> AsyncIterator[CommandDelivery]:
    """Deliveries from successive subscriptions: each one puts its deliveries in the queue it yields,
    then ``None`` when its connection is lost; a failed or lost one is retried with backoff."""
    backoff = Backoff(initial=0.2, maximum=10.0)
    while True:
        try:
            async with subscribe() as deliveries:
                backoff.reset()
                while (delivery := await deliveries.get()) is not None:
                    yield delivery
                raise ConnectionError("the commands channel or its connection closed")
        except asyncio.CancelledError:
            raise
        except QUEUE_FAILURES as exc:
            BROKER_ERRORS.inc()
            delay = backoff.next_delay()
            log.warning("command queue unavailable (%s); retry in %.1fs", exc, delay)
            await asyncio.sleep(delay)


class _RabbitDelivery(CommandDelivery):
    def __init__(self, channel: AbstractChannel, message: AbstractIncomingMessage, topology: Topology) -> None:
        self._channel = channel
        self._message = message
        self._topology = topology

    @property
    def body(self) -> bytes:
        return self._message.body

    @property
    def redelivered(self) -> bool:
        return bool(self._message.redelivered)

    @contextlib.asynccontextmanager
    async def processing(self) -> AsyncIterator[None]:
        async with self._message.process(ignore_processed=True):
            yield

    async def reply(self, result: CommandResult) -> None:
        if self._message.reply_to:
            await self._channel.default_exchange.publish(
                aio_pika.Message(
                    body=result.encode(), correlation_id=result.command_id, content_type="application/json"
                ),
                routing_key=self._message.reply_to,
                mandatory=False,
            )

    async def hand_back(self) -> None:
        message = self._message
        await self._channel.default_exchange.publish(
            aio_pika.Message(body=message.body, reply_to=message.reply_to, correlation_id=message.correlation_id,
                             expiration=message.expiration, content_type=message.content_type),
            routing_key=self._topology.commands_queue, mandatory=False,
        )

    async def requeue(self) -> None:
        await self._message.reject(requeue=True)


class RabbitCommandQueue(SubscribingQueue):
    def __init__(self, broker: Broker, topology: Topology, *, prefetch_count: int = 64) -> None:
        self._broker = broker
        self._topology = topology
        self._prefetch = prefetch_count

    @contextlib.asynccontextmanager
    async def _subscribe(self) -> AsyncIterator[asyncio.Queue[CommandDelivery | None]]:
        connection = await self._broker.connect()
        try:
            channel, queue = await declare_commands_queue(connection, self._topology, prefetch_count=self._prefetch)
            # Not queue.iterator(): leaving it waits for a basic.cancel answer, and a quorum queue that
            # lost its majority never answers, which would hold up a stop or a step-down forever.
            deliveries: asyncio.Queue[CommandDelivery | None] = asyncio.Queue()
            connection.close_callbacks.add(lambda *_: deliveries.put_nowait(None))
            channel.close_callbacks.add(lambda *_: deliveries.put_nowait(None))

            async def deliver(message: AbstractIncomingMessage) -> None:
                deliveries.put_nowait(_RabbitDelivery(channel, message, self._topology))

            await queue.consume(deliver)
            yield deliveries
        finally:
            await close_quietly(connection)  # bounded, for the same reason
