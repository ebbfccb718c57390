"""The store contracts (tests/support/store_contracts.py) on the in-memory siblings."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from ami_gateway.command_queue import CommandQueue
from ami_gateway.command_queue_memory import MemoryCommandQueue
from ami_gateway.event_outbox import EventSink
from ami_gateway.event_outbox_memory import MemoryEventPublisher
from services.broker_memory import MemoryBroker
from services.delivery_log import DeliveryStore
from services.delivery_log_memory import MemoryDeliveryStore
from services.line_state import LineReader, LineWriter
from services.line_state_memory import MemoryLineStateReader, MemoryLineStateWriter, MemoryLineStore
from services.topology import Topology
from tests.support.store_contracts import (
    BrokerContract,
    BrokerWorld,
    DeliveryContract,
    DeliveryWorld,
    LineStateContract,
    LineStateWorld,
)
from ws_node.line_feed import NodeBus
from ws_node.line_feed_memory import MemoryNodeBus


class MemoryLineStateWorld(LineStateWorld):
    fence_key = "lease"

    def __init__(self) -> None:
        self.store = MemoryLineStore()

    def writer(self, history_length: int = 1000) -> LineWriter:
        return MemoryLineStateWriter(self.store, history_length)

    def reader(self) -> LineReader:
        return MemoryLineStateReader(self.store)

    async def hold(self, key: str, value: str | None) -> None:
        if value is None:
            self.store.strings.pop(key, None)
        else:
            self.store.strings[key] = value

    async def drop_history(self, line: str) -> None:
        self.store.drop_history(line)

    async def cut(self) -> None:
        self.store.outage.fail()

    async def restore(self) -> None:
        self.store.outage.recover()


class TestMemoryLineState(LineStateContract):
    @contextlib.asynccontextmanager
    async def world(self) -> AsyncIterator[MemoryLineStateWorld]:
        yield MemoryLineStateWorld()


class MemoryDeliveryWorld(DeliveryWorld):
    def __init__(self) -> None:
        self.now = 1000.0
        self._store = MemoryDeliveryStore(clock=lambda: self.now)

    def store(self) -> DeliveryStore:
        return self._store

    async def advance(self, seconds: float) -> None:
        self.now += seconds

    async def cut(self) -> None:
        self._store.outage.fail()

    async def restore(self) -> None:
        self._store.outage.recover()


class TestMemoryDelivery(DeliveryContract):
    @contextlib.asynccontextmanager
    async def world(self) -> AsyncIterator[MemoryDeliveryWorld]:
        yield MemoryDeliveryWorld()


class MemoryBrokerWorld(BrokerWorld):
    def __init__(self) -> None:
        self.topology = Topology("mem")
        self.broker = MemoryBroker()

    def node_bus(self, node_id: str) -> NodeBus:
        return MemoryNodeBus(self.broker, self.topology, node_id)

    def publisher(self) -> EventSink:
        return MemoryEventPublisher(self.broker)

    def command_queue(self) -> CommandQueue:
        return MemoryCommandQueue(self.broker)

    async def cut(self) -> None:
        self.broker.fail()

    async def restore(self) -> None:
        self.broker.recover()


class TestMemoryBroker(BrokerContract):
    @contextlib.asynccontextmanager
    async def world(self) -> AsyncIterator[MemoryBrokerWorld]:
        yield MemoryBrokerWorld()
