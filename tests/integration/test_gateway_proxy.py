"""Test rig for the gateway's integration tests: a TCP proxy the test controls, an in-process gateway on the real
RabbitMQ and Redis, a line-event listener and a command client speaking the nodes' side of the bus.

The tests at the bottom check the proxy itself (forward, pause, cut, restore), since the outage tests lean on it.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from typing import Any

import aio_pika
import pytest
import redis.asyncio as aioredis
from aio_pika.abc import AbstractIncomingMessage

from ami_gateway.app import Gateway
from local_cluster.infra import Infrastructure
from services.broker import QUORUM
from services.config import AsteriskConfig, ClusterConfig, Settings
from services.topology import Topology
from services.wire import Command, CommandName, CommandResult, LineEvent, command_args

pytestmark = pytest.mark.integration

SECRET = "s3cret"
TIMEOUT = 15.0


def gateway_settings(infra: Infrastructure, prefix: str, ami_port: int, *, amqp_url: str | None = None,
                     **asterisk: Any) -> Settings:
    base = AsteriskConfig(url="127.0.0.1", port=ami_port, user_name="admin", secret=SECRET,
                          queue_extension_format="Local/{0}@from-queue/n", protocol="SIP,PJSIP")
    return Settings(
        asterisk=replace(base, **asterisk),
        cluster=ClusterConfig(amqp_url=amqp_url or infra.amqp_url, redis_url=infra.redis_url, prefix=prefix,
                              command_ttl_seconds=5.0),
    )


@contextlib.asynccontextmanager
async def running_gateway(settings: Settings, **options: Any) -> AsyncIterator[Gateway]:
    gateway = Gateway(settings, metrics_port=0, **options)
    await gateway.start()
    try:
        yield gateway
    finally:
        await gateway.stop(flush_timeout=2.0)


async def wait_until(predicate: Callable[[], bool], timeout: float = TIMEOUT, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {timeout}s")
        await asyncio.sleep(0.02)


class EventListener:
    """A node's view of the events exchange: one private queue bound to the given lines."""

    def __init__(self, amqp_url: str, prefix: str) -> None:
        self._url = amqp_url
        self._topology = Topology(prefix)
        self.events: list[LineEvent] = []
        self._connection: aio_pika.abc.AbstractConnection | None = None

    async def start(self, lines: list[str]) -> EventListener:
        self._connection = await aio_pika.connect(self._url)
        channel = await self._connection.channel()
        exchange = await channel.declare_exchange(
            self._topology.events_exchange, aio_pika.ExchangeType.DIRECT, durable=True
        )
        queue = await channel.declare_queue(f"{self._topology.prefix}.test.{uuid.uuid4().hex[:8]}", exclusive=True)
        for line in lines:
            await queue.bind(exchange, self._topology.line_routing_key(line))
        await queue.consume(self._on_message, no_ack=True)
        return self

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        self.events.append(LineEvent.decode(message.body))

    def of_line(self, line: str) -> list[LineEvent]:
        return [e for e in self.events if e.line == line]

    async def wait_for(self, predicate: Callable[[LineEvent], bool], timeout: float = TIMEOUT,
                       what: str = "event") -> LineEvent:
        await wait_until(lambda: any(predicate(e) for e in self.events), timeout, what)
        return next(e for e in self.events if predicate(e))

    async def close(self) -> None:
        if self._connection is not None:
            await self._connection.close()


class CommandClient:
    """The nodes' side of commands: publish to the gateway's queue, await the answer on a reply queue."""

    def __init__(self, amqp_url: str, prefix: str) -> None:
        self._url = amqp_url
        self._topology = Topology(prefix)
        self._answers: dict[str, asyncio.Future[CommandResult]] = {}
        self._connection: aio_pika.abc.AbstractConnection | None = None
        self._channel: aio_pika.abc.AbstractChannel | None = None
        self._reply_queue = ""

    async def start(self) -> CommandClient:
        self._connection = await aio_pika.connect(self._url)
        self._channel = await self._connection.channel()
        await self._channel.declare_queue(self._topology.commands_queue, durable=True,
                                            arguments={"x-queue-type": QUORUM})
        queue = await self._channel.declare_queue(exclusive=True)
        self._reply_queue = queue.name
        await queue.consume(self._on_reply, no_ack=True)
        return self

    async def _on_reply(self, message: AbstractIncomingMessage) -> None:
        result = CommandResult.decode(message.body)
        future = self._answers.get(result.command_id)
        if future is not None and not future.done():
            future.set_result(result)

    async def send(self, line: str, name: CommandName, timeout: float = TIMEOUT, issued_at: float | None = None,
                   **args: str) -> CommandResult:
        command = Command(id=uuid.uuid4().hex, line=line, name=name, args=command_args(name, args),
                          issued_at=time.time() if issued_at is None else issued_at)
        return await self.send_body(command.id, command.encode(), timeout)

    async def send_body(self, command_id: str, body: bytes, timeout: float = TIMEOUT) -> CommandResult:
        """Publish ``body`` as it is (a command of another version, a broken one) and await its answer."""
        assert self._channel is not None
        future: asyncio.Future[CommandResult] = asyncio.get_running_loop().create_future()
        self._answers[command_id] = future
        await self._channel.default_exchange.publish(
            aio_pika.Message(body=body, reply_to=self._reply_queue, correlation_id=command_id),
            routing_key=self._topology.commands_queue,
        )
        try:
            return await asyncio.wait_for(future, timeout)
        finally:
            self._answers.pop(command_id, None)

    async def close(self) -> None:
        if self._connection is not None:
            await self._connection.close()


async def cleanup(infra: Infrastructure, prefix: str) -> None:
    client = aioredis.from_url(infra.redis_url)
    try:
        keys = [k async for k in client.scan_iter(f"{prefix}:*")]
        if keys:
            await client.delete(*keys)
    finally:
        await client.aclose()
    connection = await aio_pika.connect(infra.amqp_url)
    async with connection:
        channel = await connection.channel()
        topology = Topology(prefix)
        await channel.queue_delete(topology.commands_queue)
        await channel.exchange_delete(topology.events_exchange)


# ---- the proxy itself ---------------------------------------------------------------------------------


async def _echo_server() -> asyncio.Server:
    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            while data := await reader.read(1024):
                writer.write(data)
                await writer.drain()
        writer.close()

    return await asyncio.start_server(echo, "127.0.0.1", 0)


