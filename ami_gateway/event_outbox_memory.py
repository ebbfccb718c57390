"""In-memory sibling of :class:`~ami_gateway.event_outbox.EventPublisher`: the outbox's broker side on a
:class:`~services.broker_memory.MemoryBroker`, for unit tests of the outbox and of the nodes it feeds."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from ami_gateway.event_outbox import EventSink
from services.broker_memory import MemoryBroker, MemoryClient, MemoryConnection
from services.wire import LineEvent


class MemoryEventPublisher(EventSink):
    def __init__(self, broker: MemoryBroker) -> None:
        self._broker = broker
        #: the gateway's own link to the broker: ``client.cut()`` cuts it alone
        self.client = MemoryClient(broker, "event publisher")
        self._connection: MemoryConnection | None = None
        #: every batch handed to :meth:`send`, in order (what went out on the wire, duplicates included)
        self.sent: list[LineEvent] = []

    async def send(self, events: Sequence[LineEvent]) -> asyncio.Future[list[Any]]:
        if self._connection is None or self._connection.is_closed:
            self._connection = await self.client.connect()
        confirm = self._broker.publish_events(self._connection, [(event.line, event.encode()) for event in events])
        self.sent.extend(events)
        return confirm

    async def publish(self, events: Sequence[LineEvent]) -> None:
        await (await self.send(events))

    async def close(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            connection.close()
