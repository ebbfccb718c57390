"""A node's bindings against the real RabbitMQ: follows and unfollows racing each other and reconnects.

The feed reconciles: a follow or unfollow marks its line, and the binder brings the binding to what the
router wants, many lines per round trip. What must hold whatever the interleaving: a follow returns only
once its line's events reach the node (so nothing published after its snapshot is lost), and once things
settle a line is bound exactly while an agent of the node follows it.
"""

from __future__ import annotations

import asyncio
import contextlib
import urllib.parse
from collections.abc import AsyncIterator, Callable, Sequence

import aio_pika
import pytest
import redis.asyncio as aioredis
from prometheus_client import REGISTRY

from ami_gateway.event_outbox import EventPublisher, Sequencer
from local_cluster.infra import Infrastructure
from ops.chaos.fault_proxy import CUT, PASS, FaultProxy
from services.line_state import LineStateReader, LineStateWriter
from services.redis_client import redis_client as make_redis
from services.topology import Topology
from services.wire import Command
from tests.integration.test_event_pipeline import Collector, _cleanup, _event
from tests.support.hand_gateway import HandGateway
from tests.support.waiting import until
from ws_node.line_feed import LineFeed, NodeBus, NodeLink, RabbitNodeBus

pytestmark = pytest.mark.integration

Gateway = HandGateway[LineStateWriter, EventPublisher]


class CountingBus(NodeBus):
    """The real bus, noting the size of every batch of binding changes sent."""

    def __init__(self, inner: NodeBus) -> None:
        self.inner = inner
        self.batches: list[list[tuple[str, bool]]] = []

    async def connect(self) -> NodeLink:
        return _CountingLink(await self.inner.connect(), self.batches)


class _CountingLink(NodeLink):
    def __init__(self, inner: NodeLink, batches: list[list[tuple[str, bool]]]) -> None:
        self.inner = inner
        self.batches = batches

    async def declare(self, on_event: Callable[[bytes], None], on_reply: Callable[[bytes, str | None], None]) -> None:
        await self.inner.declare(on_event, on_reply)

    async def bind(self, line: str) -> None:
        await self.inner.bind(line)

    async def unbind(self, line: str) -> None:
        await self.inner.unbind(line)

    async def apply_bindings(self, changes: Sequence[tuple[str, bool]]) -> None:
        self.batches.append(list(changes))
        await self.inner.apply_bindings(changes)

    async def send_command(self, command: Command, ttl_seconds: float) -> None:
        await self.inner.send_command(command, ttl_seconds)

    async def wait_closed(self) -> None:
        await self.inner.wait_closed()

    async def close(self) -> None:
        await self.inner.close()


def _proxied(url: str, proxy: FaultProxy) -> str:
    parts = urllib.parse.urlsplit(url)
    credentials = parts.netloc.rpartition("@")[0]
    netloc = f"{credentials}@127.0.0.1:{proxy.port}" if credentials else f"127.0.0.1:{proxy.port}"
    return parts._replace(netloc=netloc).geturl()


@contextlib.asynccontextmanager
async def _world(
    infra: Infrastructure, prefix: str, *, amqp_url: str | None = None, bind_chunk: int = 500
) -> AsyncIterator[tuple[Gateway, LineFeed, CountingBus]]:
    topology = Topology(prefix)
    redis_client = aioredis.from_url(infra.redis_url)
    # As the node makes it: hundreds of follows at once wait for a connection instead of failing.
    node_redis = make_redis(infra.redis_url, max_connections=64, socket_timeout=2.0, socket_connect_timeout=2.0)
    writer = LineStateWriter(redis_client, prefix)
    publisher = EventPublisher(infra.amqp_url, topology)
    gateway = Gateway(writer, publisher, Sequencer(await writer.new_epoch()))
    bus = CountingBus(RabbitNodeBus(amqp_url or infra.amqp_url, topology, "n1"))
    feed = LineFeed("n1", bus, LineStateReader(node_redis, prefix), redis_timeout_seconds=3.0, bind_chunk=bind_chunk)
    try:
        await gateway.emit(_event("999", 0))  # the gateway declares the exchange
        await feed.start()
        await asyncio.wait_for(feed.connected.wait(), 15)
        yield gateway, feed, bus
    finally:
        await feed.stop()
        await publisher.close()
        await _cleanup(infra, prefix, redis_client)
        await redis_client.aclose()
        await node_redis.aclose()


def _nobody() -> float:
    """Events the node received for a line none of its agents follows (bound while it should not be)."""
    return REGISTRY.get_sample_value("cms_node_line_events_total", {"verdict": "nobody"}) or 0.0


async def _not_bound(gateway: Gateway, lines: Sequence[str], marker: Collector, marker_line: str) -> None:
    """Publish on ``lines``, then on ``marker_line`` (followed by ``marker``): once the marker is in, the
    node's queue would have received anything routed to it before (one queue, in order)."""
    before = _nobody()
    seen = len(marker.events)
    await gateway.emit(*(_event(line, 1) for line in lines))
    await gateway.emit(_event(marker_line, 1))
    await until(lambda: len(marker.events) > seen, 15, "the marker")
    assert _nobody() == before, "the node still receives a line nobody follows"


def test_a_follow_returns_only_once_its_line_reaches_the_node_even_behind_another_follower(
    infra: Infrastructure, prefix: str
) -> None:
    """Two tabs open the same line at once: the second follow must not return on the strength of the
    first one's bind still on its way (its first event after the snapshot would be lost)."""

    async def main() -> None:
        async with _world(infra, prefix) as (gateway, feed, _bus):
            lines = [f"5{n:03d}" for n in range(400)]
            firsts = {line: Collector() for line in lines}
            seconds = {line: Collector() for line in lines}
            pending = [asyncio.create_task(feed.follow(firsts[line], line)) for line in lines]
            await asyncio.sleep(0)  # every first follow has attached its line
            await asyncio.gather(*(feed.follow(seconds[line], line) for line in lines))
            await gateway.emit(*(_event(line, 1) for line in lines))  # right after the follows returned
            await asyncio.gather(*pending)
            await until(lambda: all(len(tab.events) == 1 for tab in seconds.values()), 15,
                        "every second tab's first event")
            await until(lambda: all(len(tab.events) == 1 for tab in firsts.values()), 15,
                        "every first tab's first event")

    asyncio.run(main())


def test_many_lines_opened_at_once_are_bound_in_few_round_trips_with_turns_between(
    infra: Infrastructure, prefix: str
) -> None:
    """A reconnect storm in small: 1,200 lines followed at once. Every follow returns with its line bound;
    the binds go in batches of at most the chunk size (not one round trip per line), and the event loop
    gets turns between batches (what keeps /health answering)."""

    async def main() -> None:
        async with _world(infra, prefix, bind_chunk=100) as (gateway, feed, bus):
            bus.batches.clear()
            ticks = 0
            turns_between: list[int] = []

            async def ticker() -> None:
                nonlocal ticks
                while True:
                    ticks += 1
                    await asyncio.sleep(0)

            original = feed._reconcile

            async def noting(binds: list[str], unbinds: list[str]) -> None:
                turns_between.append(ticks)
                await original(binds, unbinds)

            feed._reconcile = noting  # type: ignore[method-assign]
            ticking = asyncio.create_task(ticker())
            lines = [f"6{n:04d}" for n in range(1200)]
            tabs = {line: Collector() for line in lines}
            await asyncio.gather(*(feed.follow(tabs[line], line) for line in lines))
            ticking.cancel()
            await gateway.emit(*(_event(line, 1) for line in lines))
            await until(lambda: all(len(tab.events) == 1 for tab in tabs.values()), 20, "an event on every line")
            sizes = [len(batch) for batch in bus.batches]
            assert sum(sizes) == 1200
            assert max(sizes) <= 100 and len(sizes) <= 20, sizes
            assert all(b > a for a, b in zip(turns_between, turns_between[1:], strict=False)), turns_between

    asyncio.run(main())


def test_an_unfollow_racing_a_follow_ends_with_the_binding_the_router_wants(
    infra: Infrastructure, prefix: str
) -> None:
    async def main() -> None:
        async with _world(infra, prefix) as (gateway, feed, _bus):
            marker = Collector()
            await feed.follow(marker, "7000")
            # The last tab leaves as another opens the line: bound at the end.
            leaving, coming = Collector(), Collector()
            await feed.follow(leaving, "7001")
            await asyncio.gather(feed.unfollow(leaving, "7001"), feed.follow(coming, "7001"))
            await gateway.emit(_event("7001", 1))
            await until(lambda: len(coming.events) == 1, 15, "the event on the line still followed")
            assert leaving.events == []
            # The other way round: a follow, and the unfollow before its bind is even sent: unbound at the end.
            brief = Collector()
            await asyncio.gather(feed.follow(brief, "7002"), feed.unfollow(brief, "7002"))
            # And a line dropped and taken again several times over, ending dropped.
            flapping = Collector()
            for _ in range(5):
                await asyncio.gather(feed.follow(flapping, "7003"), feed.unfollow(flapping, "7003"))
            await asyncio.sleep(0.2)
            await _not_bound(gateway, ["7002", "7003"], marker, "7000")

    asyncio.run(main())


def test_a_follow_is_not_held_behind_a_pile_of_unbinds(infra: Infrastructure, prefix: str) -> None:
    """Unbinds cost a round trip each (AMQP has no unbind without an answer): hundreds of agents leaving must
    not make the next agent's OpenConnection wait for all of them."""

    async def main() -> None:
        async with _world(infra, prefix) as (gateway, feed, bus):
            leaving = [f"4{n:03d}" for n in range(300)]
            tabs = {line: Collector() for line in leaving}
            await asyncio.gather(*(feed.follow(tabs[line], line) for line in leaving))
            bus.batches.clear()
            unfollowing = asyncio.gather(*(feed.unfollow(tabs[line], line) for line in leaving))
            await asyncio.sleep(0)  # every unbind is marked before the new line
            newcomer = Collector()
            await feed.follow(newcomer, "4999")
            unbound_before = sum(1 for batch in bus.batches for _, bind in batch if not bind)
            assert unbound_before < len(leaving) // 2, unbound_before
            await gateway.emit(_event("4999", 1))
            await until(lambda: len(newcomer.events) == 1, 15, "the newcomer's event")
            await unfollowing
            assert sum(1 for batch in bus.batches for _, bind in batch if not bind) == len(leaving)

    asyncio.run(main())


def test_follows_and_unfollows_during_a_reconnect_are_bound_as_the_router_says_after_it(
    infra: Infrastructure, prefix: str
) -> None:
    """While the broker is away and while the reconnect rebinds: lines followed then are bound once it is
    back (and their events reach the agents), a line left then is not bound again."""

    async def main() -> None:
        target = urllib.parse.urlsplit(infra.amqp_url)
        proxy = FaultProxy("proxy", target.hostname or "127.0.0.1", target.port or 5672)
        await proxy.start()
        try:
            async with _world(infra, prefix, amqp_url=_proxied(infra.amqp_url, proxy), bind_chunk=50) as (
                gateway, feed, _bus,
            ):
                staying, leaving = Collector(), Collector()
                await feed.follow(staying, "8000")
                await feed.follow(leaving, "8001")
                old = [f"81{n:03d}" for n in range(300)]  # enough that the rebind takes several chunks
                old_tabs = {line: Collector() for line in old}
                await asyncio.gather(*(feed.follow(old_tabs[line], line) for line in old))

                await proxy.set_fault(CUT)
                await until(lambda: not feed.connected.is_set(), 15, "the node to see the broker gone")
                await feed.unfollow(leaving, "8001")
                away = Collector()
                await feed.follow(away, "8002")  # followed while away: returns, bound on reconnect
                await proxy.set_fault(PASS)
                # Follows and unfollows while the reconnect binds its lines chunk by chunk.
                during = [f"82{n:03d}" for n in range(100)]
                during_tabs = {line: Collector() for line in during}
                following = [asyncio.create_task(feed.follow(during_tabs[line], line)) for line in during]
                await asyncio.gather(*(feed.unfollow(old_tabs[line], line) for line in old[:20]))
                await asyncio.wait_for(feed.connected.wait(), 30)
                await asyncio.gather(*following)

                followed = ["8000", "8002", *old[20:], *during]
                tabs = {"8000": staying, "8002": away, **old_tabs, **during_tabs}
                counts = {line: len(tabs[line].events) for line in followed}
                await gateway.emit(*(_event(line, 1) for line in followed))
                await until(lambda: all(len(tabs[line].events) > counts[line] for line in followed), 20,
                            "an event on every followed line")
                await _not_bound(gateway, ["8001", *old[:20]], staying, "8000")
        finally:
            await proxy.set_fault(CUT)

    asyncio.run(main())


def test_a_refused_bind_closes_the_link_and_the_reconnect_binds_every_line(infra: Infrastructure, prefix: str) -> None:
    """Binds go without waiting for each answer, so the broker refuses one by closing the channel (the
    connection stays up). The node must take that for a lost link: reconnect, declare, bind every line."""

    async def main() -> None:
        async with _world(infra, prefix) as (gateway, feed, _bus):
            before = Collector()
            await feed.follow(before, "9000")
            connection = await aio_pika.connect(infra.amqp_url)
            async with connection:
                channel = await connection.channel()
                await channel.exchange_delete(Topology(prefix).events_exchange)  # every bind is refused now
            after = Collector()
            await feed.follow(after, "9001")  # refused: the channel goes, then the link
            await until(lambda: not feed.connected.is_set(), 15, "the node to drop its link")
            await asyncio.wait_for(feed.connected.wait(), 30)  # declared the exchange again, bound both
            await gateway.emit(_event("9000", 1), _event("9001", 1))
            await until(lambda: len(before.events) >= 1 and len(after.events) >= 1, 15, "events on both lines")
            assert [e.line for e in after.events] == ["9001"] * len(after.events)

    asyncio.run(main())
