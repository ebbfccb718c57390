"""What the in-memory store siblings share: one round trip's worth of waiting, and faults on demand.

The memory stores (``*_memory.py`` next to each store interface) stand in for Redis and RabbitMQ in
unit tests of the shells around them. Each operation first yields to the event loop once, as a
network round trip would (other tasks run in between, as they do against the real server), then
runs without yielding again, so it is atomic the way a Redis script or MULTI is.

Faults, each an :class:`Outage` (a store has one for the server, a client may have one for its own
link): while one is :meth:`~Outage.fail`-ed every operation through it raises :class:`StoreDown`, a
``ConnectionError``, which is what the shells already handle for a server that went away;
:meth:`~Outage.lose_replies` makes the next operations take effect and still fail, as when the
connection drops after the server acted but before its answer arrived.
"""

from __future__ import annotations

import asyncio


class StoreDown(ConnectionError):
    """The in-memory store (or the link to it) is in a simulated outage."""


class Outage:
    def __init__(self, name: str) -> None:
        self.name = name
        self.available = True
        self._lost_replies = 0

    def fail(self) -> None:
        self.available = False

    def recover(self) -> None:
        self.available = True

    def lose_replies(self, count: int = 1) -> None:
        self._lost_replies += count

    def check(self) -> None:
        if not self.available:
            raise StoreDown(f"{self.name} unavailable (simulated outage)")

    def answer(self) -> None:
        """After an operation took effect: raise if its reply is to be lost."""
        if self._lost_replies:
            self._lost_replies -= 1
            raise StoreDown(f"{self.name}: connection lost before the reply (simulated)")


async def round_trip(*outages: Outage) -> None:
    """Yield once (the request is in flight), failing before or after if any of ``outages`` is down."""
    for outage in outages:
        outage.check()
    await asyncio.sleep(0)
    for outage in outages:
        outage.check()
