"""Names of everything this deployment declares on RabbitMQ, in one place.

Events: one direct exchange; the routing key is the line, so a node binds its private queue
once per line its agents use and receives nothing else (Wazo websocketd's per-user binding).
Commands: one durable work queue that the single gateway consumes; each node gets answers on
its own exclusive reply queue (``reply_to``), correlated by ``correlation_id`` = command id.
Per-message ``expiration`` makes the broker drop a command that waited too long, so an agent's
click is never executed late.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Topology:
    prefix: str

    @property
    def events_exchange(self) -> str:
        return f"{self.prefix}.events"

    @property
    def commands_queue(self) -> str:
        return f"{self.prefix}.commands"

    def node_events_queue(self, node_id: str) -> str:
        return f"{self.prefix}.node.{node_id}.events"

    def node_replies_queue(self, node_id: str) -> str:
        return f"{self.prefix}.node.{node_id}.replies"

    @staticmethod
    def line_routing_key(line: str) -> str:
        return f"line.{line}"
