"""In-memory sibling of :class:`~ami_gateway.command_queue.RabbitCommandQueue`: the commands queue of a
:class:`~services.broker_memory.MemoryBroker`, for unit tests of the gateway's command handling."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from ami_gateway.command_queue import CommandDelivery, SubscribingQueue
from services.broker_memory import CommandMessage, MemoryBroker, MemoryConnection
from services.memory_store import round_trip
from services.wire import CommandResult


class _MemoryDelivery(CommandDelivery):
    def __init__(self, broker: MemoryBroker, connection: MemoryConnection, message: CommandMessage) -> None:
        self._broker = broker
        self._connection = connection
        self._message = message
        self._redelivered = message.redelivered  # as delivered; a later requeue marks the message itself
        self._settled = False

    @property
    def body(self) -> bytes:
        return self._message.body

    @property
    def redelivered(self) -> bool:
        return self._redelivered

    @contextlib.asynccontextmanager
    async def processing(self) -> AsyncIterator[None]:
        try:
            yield
        except BaseException:
            if not self._settled:
                with contextlib.suppress(ConnectionError):  # a closed channel cannot reject: it is redelivered
                    self._settle(requeue=False)
            raise
        if not self._settled:
            await round_trip(self._broker.outage)
            self._settle(requeue=False)

    def _settle(self, *, requeue: bool) -> None:
        self._broker.settle(self._connection, self._message, requeue=requeue)
        self._settled = True

    async def reply(self, result: CommandResult) -> None:
        if self._message.reply_to:
            await round_trip(self._broker.outage)
            self._broker.publish_reply(self._connection, self._message.reply_to, result.encode(), result.command_id)

    async def hand_back(self) -> None:
        await round_trip(self._broker.outage)
        message = self._message
        self._broker.publish_command(self._connection, CommandMessage(
            body=message.body, reply_to=message.reply_to, correlation_id=message.correlation_id,
            expires_at=message.expires_at,
        ))

    async def requeue(self) -> None:
        await round_trip(self._broker.outage)
        self._settle(requeue=True)


class MemoryCommandQueue(SubscribingQueue):
    def __init__(self, broker: MemoryBroker, *, prefetch_count: int = 64) -> None:
        self._broker = broker
        self._prefetch = prefetch_count

    @contextlib.asynccontextmanager
    async def _subscribe(self) -> AsyncIterator[asyncio.Queue[CommandDelivery | None]]:
        connection = await self._broker.connect()
        try:
            deliveries: asyncio.Queue[CommandDelivery | None] = asyncio.Queue()
            connection.on_close(lambda: deliveries.put_nowait(None))
            self._broker.consume_commands(
                connection, self._prefetch,
                lambda message: deliveries.put_nowait(_MemoryDelivery(self._broker, connection, message)),
            )
            yield deliveries
        finally:
            connection.close()
