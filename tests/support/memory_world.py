"""A cluster's shared services in memory, for unit tests of the node's and gateway's shells.

One :class:`MemoryWorld` is what a deployment shares: the line state (Redis) and the broker
(RabbitMQ), in-memory siblings of both. A :class:`HandGateway` is the gateway's output played by
hand (number, store, publish: each step can be skipped or reordered the way a restart or an outage
does; tests/integration/test_node_continuity.py plays it over the real services); a
:class:`Collector` stands for a node's agent sessions.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from ami_gateway.event_outbox_memory import MemoryEventPublisher
from services.broker_memory import MemoryBroker
from services.line_state import LineSnapshot
from services.line_state_memory import MemoryLineStateReader, MemoryLineStateWriter, MemoryLineStore
from services.topology import Topology
from services.wire import Call, CallState, Direction, EventType, LineEvent, StreamPosition
from tests.support.hand_gateway import HandGateway
from ws_node.line_feed import LineFeed
from ws_node.line_feed_memory import MemoryNodeBus


def ringing(line: str, n: int) -> LineEvent:
    """An unnumbered event about call ``n`` of ``line`` (the gateway numbers it)."""
    call = Call(id=f"call-{n}", line=line, linked_id=f"{n}.0", channel=f"SIP/{line}-{n}", direction=Direction.INBOUND,
                state=CallState.RINGING, caller_number=str(1000 + n), started_at=time.time())
    return LineEvent(line=line, type=EventType.RING_STARTED, call=call)


@dataclass(eq=False)  # hashed by identity: a session
class Collector:
    events: list[LineEvent] = field(default_factory=list)
    resyncs: list[LineSnapshot] = field(default_factory=list)

    def deliver_event(self, event: LineEvent) -> None:
        self.events.append(event)

    def resync(self, snapshot: LineSnapshot) -> None:
        self.resyncs.append(snapshot)

    def positions(self) -> list[StreamPosition]:
        return [e.position for e in self.events]


class MemoryWorld:
    def __init__(self) -> None:
        self.topology = Topology("mem")
        self.store = MemoryLineStore()
        self.broker = MemoryBroker()

    def gateway(self) -> HandGateway[MemoryLineStateWriter, MemoryEventPublisher]:
        return HandGateway(MemoryLineStateWriter(self.store), MemoryEventPublisher(self.broker))

    def node(self, node_id: str = "n1", *, history_wait_seconds: float = 0.3) -> tuple[LineFeed, MemoryNodeBus,
                                                                                         MemoryLineStateReader]:
        """A node's line feed, its bus and its reader (``bus.client`` and ``reader.link`` cut its links)."""
        bus = MemoryNodeBus(self.broker, self.topology, node_id)
        reader = MemoryLineStateReader(self.store)
        feed = LineFeed(node_id, bus, reader, history_wait_seconds=history_wait_seconds, redis_timeout_seconds=2.0)
        return feed, bus, reader
