"""In-memory sibling of :class:`~ws_node.line_feed.RabbitNodeBus`: a node's side of a
:class:`~services.broker_memory.MemoryBroker`, for unit tests of the :class:`~ws_node.line_feed.LineFeed`."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from services.broker_memory import CommandMessage, MemoryBroker, MemoryClient, MemoryConnection
from services.memory_store import round_trip
from services.topology import Topology
from services.wire import Command
from ws_node.line_feed import NodeBus, NodeLink


class MemoryNodeBus(NodeBus):
    def __init__(self, broker: MemoryBroker, topology: Topology, node_id: str) -> None:
        self._broker = broker
        self._reply_queue = topology.node_replies_queue(node_id)
        #: this node's own link to the broker: ``client.cut()`` cuts it alone
        self.client = MemoryClient(broker, f"node {node_id}")

    async def connect(self) -> NodeLink:
        return _MemoryNodeLink(self._broker, await self.client.connect(), self._reply_queue)


class _MemoryNodeLink(NodeLink):
    def __init__(self, broker: MemoryBroker, connection: MemoryConnection, reply_queue: str) -> None:
        self._broker = broker
        self._connection = connection
        self._reply_queue = reply_queue
        self._on_event: Callable[[bytes], None] | None = None

    def _declared(self) -> Callable[[bytes], None]:
        if self._on_event is None:
            raise RuntimeError("the node's queues are not declared on this connection")
        return self._on_event

    async def declare(self, on_event: Callable[[bytes], None], on_reply: Callable[[bytes, str | None], None]) -> None:
        await round_trip(self._broker.outage)
        self._broker.open_reply_queue(self._connection, self._reply_queue, on_reply)
        # One callable per connection: the node's exclusive queue, bound per line.
        self._on_event = lambda body: on_event(body)

    async def bind(self, line: str) -> None:
        await round_trip(self._broker.outage)
        self._broker.bind(self._connection, line, self._declared())

    async def unbind(self, line: str) -> None:
        await round_trip(self._broker.outage)
        self._broker.unbind(self._connection, line, self._declared())

    async def apply_bindings(self, changes: Sequence[tuple[str, bool]]) -> None:
        # One round trip for the lot, as over RabbitMQ.
        await round_trip(self._broker.outage)
        deliver = self._declared()
        for line, bind in changes:
            if bind:
                self._broker.bind(self._connection, line, deliver)
            else:
                self._broker.unbind(self._connection, line, deliver)

    async def send_command(self, command: Command, ttl_seconds: float) -> None:
        self._declared()
        await round_trip(self._broker.outage)
        self._broker.publish_command(self._connection, CommandMessage(
            body=command.encode(), reply_to=self._reply_queue, correlation_id=command.id,
            expires_at=self._broker.expires_at(ttl_seconds),
        ))

    async def wait_closed(self) -> None:
        await self._connection.closed.wait()

    async def close(self) -> None:
        self._connection.close()
