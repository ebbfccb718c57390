"""One RabbitMQ namespace in memory: what the gateway and the nodes rely on the broker for.

The in-memory siblings of the broker-side stores (ws_node/line_feed_memory.py,
ami_gateway/event_outbox_memory.py, ami_gateway/command_queue_memory.py) are thin adapters over
one :class:`MemoryBroker`, shared by every gateway and node of a test the way they share RabbitMQ.
It keeps the semantics services/broker.py and services/topology.py declare:

* **Line events**: a direct exchange; a node's queue is bound per line, and belongs to the node's
  connection (exclusive): it and its bindings vanish when the connection closes, and whatever is
  published meanwhile goes nowhere for that node. Messages reach each queue in publish order.
* **Confirms**: a publish is confirmed once routed; a connection lost first fails its confirms.
* **Commands**: one durable queue that outlives connections and outages. Each message may carry an
  expiration: once it has passed, the message is dropped instead of delivered. A consumer takes
  at most ``prefetch`` unacknowledged messages; a message rejected with requeue, or held by a
  consumer whose connection closed, goes back to the head of the queue marked ``redelivered``.
* **Replies**: a node's reply queue exists while its connection is open; replies to a queue that
  is gone are dropped.

Deliveries are scheduled on the event loop (``call_soon``), never made inside the publisher's call,
as they would arrive over a socket. :meth:`MemoryBroker.fail` is an outage: every connection closes
and nothing can be opened until :meth:`MemoryBroker.recover`.
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from services.memory_store import Outage, round_trip

Deliver = Callable[[bytes], None]
DeliverReply = Callable[[bytes, str | None], None]


class MemoryConnection:
    """A client's connection: what it declared lives and dies with it."""

    def __init__(self, broker: MemoryBroker) -> None:
        self._broker = broker
        self.closed = asyncio.Event()
        self._on_close: list[Callable[[], None]] = []

    @property
    def is_closed(self) -> bool:
        return self.closed.is_set()

    def check(self) -> None:
        """Raise when the connection is gone (what a channel operation on a dead socket does)."""
        if self.closed.is_set():
            raise ConnectionError("memory broker connection closed")
        self._broker.outage.check()

    def on_close(self, callback: Callable[[], None]) -> None:
        self._on_close.append(callback)

    def close(self) -> None:
        if self.closed.is_set():
            return
        self.closed.set()
        self._broker._connections.discard(self)
        for callback in self._on_close:
            callback()


class MemoryClient:
    """One process's network link to the broker: its connections, and a fault of that link alone."""

    def __init__(self, broker: MemoryBroker, name: str) -> None:
        self.broker = broker
        self.link = Outage(f"{name}'s link to the memory broker")
        self._connections: list[MemoryConnection] = []

    async def connect(self) -> MemoryConnection:
        connection = await self.broker.connect(self.link)
        self._connections = [c for c in self._connections if not c.is_closed] + [connection]
        return connection

    def cut(self) -> None:
        """The link goes down: its connections close, new ones fail until :meth:`restore`."""
        self.link.fail()
        for connection in self._connections:
            connection.close()

    def restore(self) -> None:
        self.link.recover()


@dataclass(eq=False)
class CommandMessage:
    body: bytes
    reply_to: str | None
    correlation_id: str | None
    #: loop time after which the broker drops it undelivered; None = never
    expires_at: float | None
    redelivered: bool = False


@dataclass(eq=False)
class _Consumer:
    connection: MemoryConnection
    prefetch: int
    deliver: Callable[[CommandMessage], None]
    unacked: list[CommandMessage] = field(default_factory=list)


class MemoryBroker:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.outage = Outage("memory broker")
        self._clock = clock
        self._connections: set[MemoryConnection] = set()
        #: line -> the node queues bound to it (each a delivery callback of an open connection)
        self._bindings: dict[str, set[Deliver]] = collections.defaultdict(set)
        self._commands: collections.deque[CommandMessage] = collections.deque()
        self._consumers: list[_Consumer] = []
        self._replies: dict[str, DeliverReply] = {}
        self._dispatch_scheduled = False

    # ---- outages -----------------------------------------------------------------------------

    def fail(self) -> None:
        """The broker goes away: every connection closes; nothing connects until :meth:`recover`."""
        self.outage.fail()
        for connection in list(self._connections):
            connection.close()

    def recover(self) -> None:
        self.outage.recover()

    def drop_connections(self) -> None:
        """Every connection is cut once (a network blip); new ones are accepted at once."""
        for connection in list(self._connections):
            connection.close()

    async def connect(self, link: Outage | None = None) -> MemoryConnection:
        """A new connection, over the client's own ``link`` if it has one (a fault of that link alone)."""
        await round_trip(self.outage, *([link] if link is not None else []))
        connection = MemoryConnection(self)
        self._connections.add(connection)
        return connection

    # ---- line events -------------------------------------------------------------------------

    def bind(self, connection: MemoryConnection, line: str, deliver: Deliver) -> None:
        connection.check()
        if deliver not in self._bindings[line]:
            self._bindings[line].add(deliver)
            connection.on_close(lambda: self._bindings[line].discard(deliver))

    def unbind(self, connection: MemoryConnection, line: str, deliver: Deliver) -> None:
        connection.check()
        self._bindings[line].discard(deliver)

    def publish_events(
        self, connection: MemoryConnection, messages: Sequence[tuple[str, bytes]]
    ) -> asyncio.Future[list[Any]]:
        """Route ``(line, body)`` messages; the future is their confirms."""
        connection.check()
        loop = asyncio.get_running_loop()
        confirm: asyncio.Future[list[Any]] = loop.create_future()

        def route() -> None:
            if confirm.done():
                return
            if connection.is_closed:
                confirm.set_exception(ConnectionError("connection closed before the broker confirmed"))
                return
            for line, body in messages:
                for deliver in tuple(self._bindings.get(line, ())):
                    loop.call_soon(deliver, body)
            confirm.set_result([True] * len(messages))

        loop.call_soon(route)
        return confirm

    # ---- commands ----------------------------------------------------------------------------

    def publish_command(self, connection: MemoryConnection, message: CommandMessage) -> None:
        connection.check()
        self._commands.append(message)
        self._schedule_dispatch()

    def expires_at(self, ttl: float | None) -> float | None:
        return None if ttl is None else self._clock() + ttl

    def consume_commands(
        self, connection: MemoryConnection, prefetch: int, deliver: Callable[[CommandMessage], None]
    ) -> None:
        connection.check()
        consumer = _Consumer(connection, max(1, prefetch), deliver)
        self._consumers.append(consumer)
        connection.on_close(lambda: self._consumer_gone(consumer))
        self._schedule_dispatch()

    def settle(self, connection: MemoryConnection, message: CommandMessage, *, requeue: bool) -> None:
        """Ack (``requeue=False``) or reject back to the head of the queue (``requeue=True``)."""
        connection.check()
        for consumer in self._consumers:
            if consumer.connection is connection and message in consumer.unacked:
                consumer.unacked.remove(message)
                if requeue:
                    message.redelivered = True
                    self._commands.appendleft(message)
                self._schedule_dispatch()
                return
        raise RuntimeError("message already settled, or not delivered on this connection")

    def _consumer_gone(self, consumer: _Consumer) -> None:
        self._consumers.remove(consumer)
        for message in reversed(consumer.unacked):
            message.redelivered = True
            self._commands.appendleft(message)
        consumer.unacked.clear()
        self._schedule_dispatch()

    def _schedule_dispatch(self) -> None:
        if not self._dispatch_scheduled:
            self._dispatch_scheduled = True
            asyncio.get_running_loop().call_soon(self._dispatch)

    def _dispatch(self) -> None:
        self._dispatch_scheduled = False
        while self._commands:
            consumer = next((c for c in self._consumers if len(c.unacked) < c.prefetch), None)
            if consumer is None:
                return
            message = self._commands.popleft()
            if message.expires_at is not None and message.expires_at <= self._clock():
                continue  # expired while it waited: dropped, as RabbitMQ drops it
            consumer.unacked.append(message)
            consumer.deliver(message)
            # round robin, as RabbitMQ spreads over consumers
            self._consumers.remove(consumer)
            self._consumers.append(consumer)

    # ---- replies -----------------------------------------------------------------------------

    def open_reply_queue(self, connection: MemoryConnection, name: str, deliver: DeliverReply) -> None:
        connection.check()
        self._replies[name] = deliver

        def gone() -> None:
            if self._replies.get(name) is deliver:
                del self._replies[name]

        connection.on_close(gone)

    def publish_reply(
        self, connection: MemoryConnection, reply_to: str, body: bytes, correlation_id: str | None
    ) -> None:
        connection.check()
        deliver = self._replies.get(reply_to)
        if deliver is not None:
            asyncio.get_running_loop().call_soon(deliver, body, correlation_id)
