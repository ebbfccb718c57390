"""The store contracts (tests/support/store_contracts.py) on the real Redis and RabbitMQ.

Each test gets its own prefix, and reaches the server through a proxy the test can cut (the
test's own clean-up goes direct)."""

from __future__ import annotations

import asyncio
import contextlib
import urllib.parse
from collections.abc import AsyncIterator

import aio_pika
import pytest
import redis.asyncio as aioredis

from ami_gateway.command_queue import CommandQueue, RabbitCommandQueue
from ami_gateway.event_outbox import EventPublisher, EventSink
from local_cluster.infra import Infrastructure
from ops.chaos.fault_proxy import FaultProxy, LinkFault
from services.broker import Broker
from services.delivery_log import DeliveryStore, RedisDeliveryStore
from services.line_state import LineReader, LineStateReader, LineStateWriter, LineWriter
from services.topology import Topology
from tests.integration.test_outbox_window import _via
from tests.support.store_contracts import (
    BrokerContract,
    BrokerWorld,
    DeliveryContract,
    DeliveryWorld,
    LineStateContract,
    LineStateWorld,
)
from ws_node.line_feed import NodeBus, RabbitNodeBus

pytestmark = pytest.mark.integration


@contextlib.asynccontextmanager
async def _proxy(url: str, default_port: int) -> AsyncIterator[FaultProxy]:
    target = urllib.parse.urlsplit(url)
    proxy = FaultProxy("store", target.hostname or "127.0.0.1", target.port or default_port)
    await proxy.start()
    try:
        yield proxy
    finally:
        await proxy.close()
        # its connection handlers end on their own once aborted; let them, before the loop closes
        for _ in range(200):
            if not proxy.stats.open:
                break
            await asyncio.sleep(0.01)


class _Services:
    infra: Infrastructure
    prefix: str

    @pytest.fixture(autouse=True)
    def _services(self, infra: Infrastructure, prefix: str) -> None:
        self.infra = infra
        self.prefix = prefix


class _RedisWorld:
    def __init__(self, client: aioredis.Redis, direct: aioredis.Redis, proxy: FaultProxy, prefix: str) -> None:
        self.client = client
        self.direct = direct
        self.proxy = proxy
        self.prefix = prefix
        self.fence_key = f"{prefix}:gateway:lease"

    async def cut(self) -> None:
        await self.proxy.set_fault(LinkFault(mode="cut"))

    async def restore(self) -> None:
        await self.proxy.set_fault(LinkFault())


@contextlib.asynccontextmanager
async def _redis(
    infra: Infrastructure, prefix: str
) -> AsyncIterator[tuple[aioredis.Redis, aioredis.Redis, FaultProxy]]:
    direct = aioredis.from_url(infra.redis_url)
    async with _proxy(infra.redis_url, 6379) as proxy:
        client = aioredis.from_url(_via(infra.redis_url, proxy.port), socket_timeout=3.0, socket_connect_timeout=3.0)
        try:
            yield client, direct, proxy
        finally:
            await client.aclose()
            keys = [k async for k in direct.scan_iter(f"{prefix}:*")]
            if keys:
                await direct.delete(*keys)
            await direct.aclose()


class RedisLineStateWorld(_RedisWorld, LineStateWorld):
    def writer(self, history_length: int = 1000) -> LineWriter:
        return LineStateWriter(self.client, self.prefix, history_length)

    def reader(self) -> LineReader:
        return LineStateReader(self.client, self.prefix)

    async def hold(self, key: str, value: str | None) -> None:
        if value is None:
            await self.direct.delete(key)
        else:
            await self.direct.set(key, value)

    async def drop_history(self, line: str) -> None:
        await self.direct.delete(f"{self.prefix}:line:{line}:events")


class TestRedisLineState(_Services, LineStateContract):
    @contextlib.asynccontextmanager
    async def world(self) -> AsyncIterator[RedisLineStateWorld]:
        async with _redis(self.infra, self.prefix) as (client, direct, proxy):
            yield RedisLineStateWorld(client, direct, proxy, self.prefix)


class RedisDeliveryWorld(_RedisWorld, DeliveryWorld):
    def store(self) -> DeliveryStore:
        return RedisDeliveryStore(self.client, self.prefix)

    async def advance(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


class TestRedisDelivery(_Services, DeliveryContract):
    @contextlib.asynccontextmanager
    async def world(self) -> AsyncIterator[RedisDeliveryWorld]:
        async with _redis(self.infra, self.prefix) as (client, direct, proxy):
            yield RedisDeliveryWorld(client, direct, proxy, self.prefix)


class RabbitWorld(BrokerWorld):
    def __init__(self, amqp_url: str, proxy: FaultProxy, prefix: str) -> None:
        self.url = _via(amqp_url, proxy.port)
        self.proxy = proxy
        self.topology = Topology(prefix)

    def node_bus(self, node_id: str) -> NodeBus:
        return RabbitNodeBus(Broker([self.url], name=f"node {node_id}"), self.topology, node_id)

    def publisher(self) -> EventSink:
        return EventPublisher(Broker([self.url], name="events"), self.topology)

    def command_queue(self) -> CommandQueue:
        return RabbitCommandQueue(Broker([self.url], name="commands"), self.topology)

    async def cut(self) -> None:
        await self.proxy.set_fault(LinkFault(mode="cut"))

    async def restore(self) -> None:
        await self.proxy.set_fault(LinkFault())


class TestRabbitBroker(_Services, BrokerContract):
    @contextlib.asynccontextmanager
    async def world(self) -> AsyncIterator[RabbitWorld]:
        async with _proxy(self.infra.amqp_url, 5672) as proxy:
            world = RabbitWorld(self.infra.amqp_url, proxy, self.prefix)
            try:
                yield world
            finally:
                connection = await aio_pika.connect(self.infra.amqp_url)
                async with connection:
                    channel = await connection.channel()
                    await channel.queue_delete(world.topology.commands_queue)
                    await channel.exchange_delete(world.topology.events_exchange)
