"""One way to reach RabbitMQ, for the gateway and the nodes: a list of broker addresses tried in
turn, and one declaration of the topology.

A deployment on a RabbitMQ cluster lists every member (``Cluster.amqpUrls``); each process stays on
the member it reached until that connection fails, then tries the next ones in turn, starting with
the member after the failed one, so a fleet that lost the same member spreads over the others
instead of all retrying the dead one first. :meth:`Broker.connect` is one round over the list; the
caller's loop waits with backoff and jitter (services/backoff.py) between rounds, because what a
caller must redo after a reconnect (declare, rebind, repair gaps, republish) is the caller's.

A login the broker refuses on the very first connect is a configuration error, not an outage:
:class:`BrokerLoginRefused` ends the caller instead of retrying forever. After the process has once
been connected, a refusal (e.g. a member that rejoined the cluster and has not synced its users
yet) is retried like any other failure.

Metrics: ``cms_broker_reconnects_total`` counts connections opened after the first,
``cms_broker_failovers_total`` those that landed on a different member than the previous one.

Topology: the events exchange (direct, durable), the per-node queues (exclusive, transient: they
die with their node, whose agents repair from Redis) and the commands queue. The commands queue is
a *quorum* queue (replicated over the cluster's members). RabbitMQ refuses to redeclare a queue with
another type, and a deployment that ran an earlier version has a classic one of the same name:
that queue is then used as it is, with one warning saying how to convert it.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import urllib.parse
from collections.abc import Sequence
from enum import Enum

import aio_pika
import aiormq.exceptions
from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractExchange, AbstractQueue
from prometheus_client import Counter

from services.config import redact_url
from services.infra_metrics import BROKER_RECONNECTS
from services.topology import Topology

log = logging.getLogger(__name__)

BROKER_FAILOVERS = Counter(
    "cms_broker_failovers_total", "RabbitMQ connections opened on another cluster member than the previous one"
)

#: A broker that vanishes without a reset (a dead host, a black-holed link) is noticed by
#: heartbeats only: 15 s rather than the broker's default 60, unless the URL says otherwise.
DEFAULT_HEARTBEAT_SECONDS = 15

QUORUM = "quorum"


#: What a broker operation raises when the broker or the link fails. StopAsyncIteration is aiormq's reader
#: ending under a call in flight (seen when RabbitMQ stops mid-handshake): it ended a node's reconnect loop.
BROKER_FAILURES: tuple[type[BaseException], ...] = (
    aio_pika.exceptions.AMQPError, OSError, RuntimeError, TimeoutError, StopAsyncIteration,
)


class BrokerLoginRefused(Exception):
    """The broker refused our login at the first connect: a configuration error, not an outage."""


class BrokerUnavailable(ConnectionError):
    """No broker in the list accepted a connection in this round."""


class Outcome(Enum):
    FIRST = "first"
    RECONNECT = "reconnect"  # the same member as before
    FAILOVER = "failover"  # another member than before


class MemberOrder:
    """Which member to try next (pure: no I/O). Starts at the member we are on; after it failed,
    the members after it come first, the failed one last."""

    def __init__(self, count: int, start: int = 0) -> None:
        if count < 1:
            raise ValueError("at least one broker address is needed")
        self._count = count
        self._next = start % count
        self._current: int | None = None

    @property
    def current(self) -> int | None:
        return self._current

    def round(self) -> list[int]:
        return [(self._next + i) % self._count for i in range(self._count)]

    def connected(self, index: int) -> Outcome:
        previous, self._current = self._current, index
        self._next = index
        if previous is None:
            return Outcome.FIRST
        return Outcome.RECONNECT if previous == index else Outcome.FAILOVER

    def lost(self) -> None:
        """The connection to the current member failed: the next round starts after it."""
        if self._current is not None:
            self._next = (self._current + 1) % self._count


class Broker:
    """Connections to one of several RabbitMQ members; see the module docstring."""

    def __init__(
        self,
        urls: Sequence[str],
        *,
        heartbeat_seconds: int | None = DEFAULT_HEARTBEAT_SECONDS,
        connect_timeout: float = 10.0,
        name: str = "broker",
    ) -> None:
        if not urls:
            raise ValueError("at least one broker address is needed")
        self.urls = [with_default_heartbeat(u, heartbeat_seconds) if heartbeat_seconds else u for u in urls]
        self._order = MemberOrder(len(self.urls))
        self._timeout = connect_timeout
        self._name = name
        self._ever_connected = False
        self._connection: AbstractConnection | None = None

    @property
    def current_url(self) -> str | None:
        index = self._order.current
        return None if index is None else self.urls[index]

    async def connect(self) -> AbstractConnection:
        """One round over the members, starting where :class:`MemberOrder` says; the first that accepts wins.

        Raises :class:`BrokerUnavailable` (a ``ConnectionError``) when none does, and
        :class:`BrokerLoginRefused` when a login is refused before this process was ever connected.
        """
        if self._connection is not None:
            # The caller asks again: whatever it had is gone (or it would not ask).
            self._order.lost()
            self._connection = None
        failures: list[str] = []
        for index in self._order.round():
            url = self.urls[index]
            try:
                connection = await aio_pika.connect(url, timeout=self._timeout)
            except (aiormq.exceptions.AuthenticationError, aiormq.exceptions.ProbableAuthenticationError) as exc:
                if not self._ever_connected:
                    raise BrokerLoginRefused(
                        f"RabbitMQ at {redact_url(url)} refused the login ({exc}): check the user and password "
                        "in Cluster.amqpUrl(s) / CMS_AMQP_URL and the user's permissions on the vhost"
                    ) from exc
                failures.append(f"{redact_url(url)}: login refused ({exc})")
                continue
            except BROKER_FAILURES as exc:
                failures.append(f"{redact_url(url)}: {exc or type(exc).__name__}")
                continue
            outcome = self._order.connected(index)
            self._ever_connected = True
            self._connection = connection
            if outcome is not Outcome.FIRST:
                BROKER_RECONNECTS.inc()
            if outcome is Outcome.FAILOVER:
                BROKER_FAILOVERS.inc()
            if outcome is not Outcome.RECONNECT or failures:
                log.info("%s connected to RabbitMQ %s (%s)%s", self._name, redact_url(url), outcome.value,
                         f"; unreachable: {'; '.join(failures)}" if failures else "")
            return connection
        self._order.lost()
        raise BrokerUnavailable("no RabbitMQ member answered: " + "; ".join(failures))


def with_default_heartbeat(amqp_url: str, seconds: int) -> str:
    parts = urllib.parse.urlsplit(amqp_url)
    if "heartbeat" in urllib.parse.parse_qs(parts.query):
        return amqp_url
    query = f"{parts.query}&heartbeat={seconds}" if parts.query else f"heartbeat={seconds}"
    return urllib.parse.urlunsplit(parts._replace(query=query))


# ---- topology: declared here only, so the gateway's and the nodes' arguments cannot drift ------------


async def declare_events_exchange(channel: AbstractChannel, topology: Topology) -> AbstractExchange:
    return await channel.declare_exchange(topology.events_exchange, aio_pika.ExchangeType.DIRECT, durable=True)


async def declare_node_queues(
    channel: AbstractChannel, topology: Topology, node_id: str
) -> tuple[AbstractQueue, AbstractQueue]:
    """The node's events queue and replies queue: exclusive and transient, never replicated."""
    events = await channel.declare_queue(topology.node_events_queue(node_id), exclusive=True, auto_delete=True)
    replies = await channel.declare_queue(topology.node_replies_queue(node_id), exclusive=True, auto_delete=True)
    return events, replies


_classic_warned: set[str] = set()


async def declare_commands_queue(
    connection: AbstractConnection, topology: Topology, *, prefetch_count: int | None = None
) -> tuple[AbstractChannel, AbstractQueue]:
    """The commands queue on a new channel: quorum, or the classic queue an earlier version left.

    Returns the channel (with ``prefetch_count`` set when given) and the queue.
    """
    name = topology.commands_queue
    channel = await connection.channel()
    try:
        if prefetch_count is not None:
            await channel.set_qos(prefetch_count=prefetch_count)
        queue = await channel.declare_queue(name, durable=True, arguments={"x-queue-type": QUORUM})
        return channel, queue
    except aiormq.exceptions.ChannelPreconditionFailed as exc:
        # The refusal closed that channel; the existing (classic) queue is declared as it is.
        if name not in _classic_warned:
            _classic_warned.add(name)
            log.warning(
                "commands queue %s exists as a classic queue (from an earlier version; %s): using it as it is. "
                "It is not replicated: to make it a quorum queue, stop every gateway and node, run "
                "`rabbitmqctl delete_queue %s` and start them again", name, exc.args[0] if exc.args else exc, name,
            )
    channel = await connection.channel()
    if prefetch_count is not None:
        await channel.set_qos(prefetch_count=prefetch_count)
    queue = await channel.declare_queue(name, durable=True)
    return channel, queue


async def close_quietly(connection: AbstractConnection | None) -> None:
    if connection is None or connection.is_closed:
        return
    try:
        async with asyncio.timeout(5):
            await connection.close()
    except BROKER_FAILURES:
        pass


def refused_login(urls: Sequence[str], timeout: float = 3.0) -> str | None:
    """At process start: the one-line error when the brokers refuse our login, None otherwise.

    A broker that does not answer is not an error here (the process starts and its loops retry); a refused
    login is, and a process that cannot ever log in should say so and exit instead of retrying forever.
    Runs on a thread of its own, so it neither needs nor disturbs the caller's event loop (the node's
    Twisted reactor runs on one).
    """
    result: list[str | None] = [None]

    async def attempt() -> None:
        try:
            connection = await Broker(urls, heartbeat_seconds=None, connect_timeout=timeout).connect()
        except BrokerLoginRefused as exc:
            result[0] = str(exc)
        except BrokerUnavailable as exc:
            log.warning("RabbitMQ not reachable at start (%s); connecting in the background", exc)
        else:
            await close_quietly(connection)

    thread = threading.Thread(target=lambda: asyncio.run(attempt()), name="broker-login-check", daemon=True)
    thread.start()
    thread.join(timeout * len(urls) + 10)
    return result[0]
