"""The node's link to the gateway: line events from RabbitMQ, truth from Redis, commands out.

* One exclusive queue per node, bound to the routing key of each line an agent of this node
  follows, and nothing else; bindings follow the agents (first agent of a line binds, last
  one leaving unbinds).
* Events are handled one at a time, in order. The :class:`LineRouter` says whether an event is
  next (delivered without touching Redis), a duplicate or from an older epoch (dropped), or
  after a gap or of a newer epoch: then the line catches up from its Redis history and snapshot
  (read together) as :func:`plan_catch_up` says, so a new epoch reaches the agents from seq 1.
* Bindings are reconciled, not replayed: a follow or unfollow marks its line, and one binder task
  brings each marked line's binding to what the router says *now* (followed: bound; not: unbound),
  many lines per broker round trip (see :meth:`NodeLink.apply_bindings`). A follow returns once its
  line's binding is in effect, so no event published after its snapshot can miss the node. An
  unfollow racing a follow of the same line, in any order, ends with the binding the router wants.
* After a broker reconnect (backoff with jitter) the queue is declared and every followed line
  bound again, and every line caught up from the history, since events published while we were
  away went nowhere. Sessions are never closed for a broker or Redis outage. A channel the broker
  closed (a refused bind) counts as a lost connection: the reconnect binds everything again.
* Redis away: events keep flowing; a line that got events without a catch-up is resynced from
  a snapshot once Redis answers again (retried with backoff).
* Commands go to the gateway's work queue with a per-message expiration; answers come back on
  this node's reply queue, matched by correlation id.

The broker is reached through a :class:`NodeBus` (:class:`RabbitNodeBus` here; its in-memory
sibling is ws_node/line_feed_memory.py) and Redis through a
:class:`~services.line_state.LineReader`, so everything above runs unchanged over the memory
stores in unit tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Protocol

import aio_pika
import aiormq.abc
import redis.asyncio as aioredis
from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractIncomingMessage, AbstractQueue
from prometheus_client import Counter, Gauge, Histogram

from services.backoff import Backoff
from services.broker import (
    BROKER_FAILURES,
    Broker,
    declare_commands_queue,
    declare_events_exchange,
    declare_node_queues,
)
from services.infra_metrics import BROKER_ERRORS, EVENT_LATENCY_BUCKETS, RedisHealth
from services.line_state import LineHistory, LineReader, LineSnapshot
from services.tasks import stop_tasks
from services.topology import Topology
from services.wire import LINE_START, Command, CommandResult, LineEvent, WireError
from ws_node.line_router import LineRouter, Verdict, plan_catch_up

log = logging.getLogger(__name__)

LINE_EVENTS = Counter("cms_node_line_events_total", "Line events received by a node", ["verdict"])
GAP_REPAIRS = Counter("cms_node_gap_repairs_total", "Gaps in a line's stream repaired from Redis", ["outcome"])
for _verdict in (*(v.value for v in Verdict), "undecodable"):
    LINE_EVENTS.labels(verdict=_verdict)
for _outcome in ("repaired", "resync"):
    GAP_REPAIRS.labels(outcome=_outcome)
EVENT_ARRIVAL = Histogram(
    "cms_node_event_arrival_latency_seconds",
    "From the AMI bytes that caused a line event to the node's event task taking it from the broker",
    buckets=EVENT_LATENCY_BUCKETS,
)
LINES_BOUND = Gauge("cms_node_lines_bound", "Lines this node receives events for")
BROKER_CONNECTED = Gauge("cms_node_broker_connected", "1 while the node's RabbitMQ connection is up")
CATCH_UP_EVENTS = Counter("cms_node_catch_up_events_total", "Line events handed to agents from the Redis history")
SETTLE_REPAIRS = Counter(
    "cms_node_settle_repairs_total",
    "Lines whose second look after a bind found Redis ahead of what the node had (an event stored after its read)",
)
HISTORY_WAIT_TIMEOUTS = Counter(
    "cms_node_history_wait_timeouts_total",
    "Catch-ups and snapshots that gave up waiting for Redis to reach what the node had from the broker",
)


#: unbinds per round of the binder: each is its own round trip, and binds marked meanwhile wait for the round
UNBIND_CHUNK = 32


class LineSubscriber(Protocol):
    def deliver_event(self, event: LineEvent) -> None: ...

    def resync(self, snapshot: LineSnapshot) -> None: ...


#: what a lost or refusing broker connection raises, over RabbitMQ or in memory



class NodeLink(Protocol):
    """One connection of a node to the broker. Every operation raises one of :data:`BROKER_FAILURES`
    (or ``TimeoutError``) once the connection is gone."""

    async def declare(self, on_event: Callable[[bytes], None], on_reply: Callable[[bytes, str | None], None]) -> None:
        """Declare the node's events queue (no bindings yet) and reply queue, and start consuming both:
        each line event's body goes to ``on_event``, each reply's body and correlation id to ``on_reply``,
        in the order the broker delivers them."""
        ...

    async def bind(self, line: str) -> None: ...

    async def unbind(self, line: str) -> None: ...

    async def apply_bindings(self, changes: Sequence[tuple[str, bool]]) -> None:
        """Bind (``True``) or unbind (``False``) each line, in this order; return once all are in effect.
        A failure leaves the link unusable (its :meth:`wait_closed` returns)."""
        ...

    async def send_command(self, command: Command, ttl_seconds: float) -> None:
        """Put ``command`` on the gateway's queue, to be dropped unless taken within ``ttl_seconds``;
        its answer comes to ``on_reply``."""
        ...

    async def wait_closed(self) -> None:
        """Return once the connection is lost (or closed)."""
        ...

    async def close(self) -> None:
        """Close the connection; quiet if it is already gone."""
        ...


class NodeBus(Protocol):
    async def connect(self) -> NodeLink:
        """One attempt at a connection. A refused login at the very first connect raises
        :class:`~services.broker.BrokerLoginRefused`, which ends the feed: a configuration error."""
        ...


class RabbitNodeBus(NodeBus):
    """The node's side of RabbitMQ: its exclusive events and reply queues, the commands queue."""

    def __init__(self, broker: Broker | str, topology: Topology, node_id: str) -> None:
        # One or several RabbitMQ members, with a 15 s heartbeat unless the URL says otherwise (services/broker.py).
        self._broker = broker if isinstance(broker, Broker) else Broker([broker], name=f"node {node_id}")
        self._topology = topology
        self._node_id = node_id

    async def connect(self) -> NodeLink:
        return _RabbitNodeLink(await self._broker.connect(), self._topology, self._node_id)


class _RabbitNodeLink(NodeLink):
    def __init__(self, connection: AbstractConnection, topology: Topology, node_id: str) -> None:
        self._connection = connection
        self._topology = topology
        self._node_id = node_id
        self._closed = asyncio.Event()
        connection.close_callbacks.add(lambda *_: self._closed.set())
        self._channel: AbstractChannel | None = None
        self._queue: AbstractQueue | None = None
        self._underlay: aiormq.abc.AbstractChannel | None = None

    async def declare(self, on_event: Callable[[bytes], None], on_reply: Callable[[bytes, str | None], None]) -> None:
        # The commands queue exists before this node's first command, whichever process started first.
        commands_channel, _ = await declare_commands_queue(self._connection, self._topology)
        await commands_channel.close()
        channel = await self._connection.channel()
        await channel.set_qos(prefetch_count=512)
        await declare_events_exchange(channel, self._topology)
        queue, replies = await declare_node_queues(channel, self._topology, self._node_id)

        # Events are consumed on the channel under aio-pika: aio-pika's consumer wraps each delivery in a task of
        # its own, after aiormq's, one more turn of a busy loop between the broker and the agent (issue 15:
        # e2e). aiormq runs each consumer call as a task in delivery order, and on_event does not await.
        async def event(message: aiormq.abc.DeliveredMessage) -> None:
            on_event(message.body)

        async def reply(message: AbstractIncomingMessage) -> None:
            on_reply(message.body, message.correlation_id)

        underlay = await channel.get_underlay_channel()
        await underlay.basic_consume(queue.name, event, no_ack=True)
        await replies.consume(reply, no_ack=True)
        # A bind sent without waiting is refused by the broker closing the channel, connection still up:
        # the queue is no longer consumed, so the link is as good as lost.
        channel.close_callbacks.add(lambda *_: self._closed.set())
        self._channel = channel
        self._queue = queue
        self._underlay = underlay

    def _declared(self) -> tuple[AbstractChannel, AbstractQueue]:
        if self._channel is None or self._queue is None:
            raise RuntimeError("the node's queues are not declared on this connection")
        return self._channel, self._queue

    async def bind(self, line: str) -> None:
        _, queue = self._declared()
        await queue.bind(self._topology.events_exchange, self._topology.line_routing_key(line))

    async def unbind(self, line: str) -> None:
        _, queue = self._declared()
        await queue.unbind(self._topology.events_exchange, self._topology.line_routing_key(line))

    async def apply_bindings(self, changes: Sequence[tuple[str, bool]]) -> None:
        # One round trip for the lot: every change but the last goes without waiting (queue.bind one
        # at a time ran at ~150-1,000/s; pipelined, several thousand), the last one waits, and as a
        # channel handles its methods in order, its answer means every earlier one is in effect.
        # A refused one closes the channel, which fails the last and closes this link.
        _, queue = self._declared()
        channel = self._underlay
        if channel is None or not changes:
            return
        exchange = self._topology.events_exchange
        last = len(changes) - 1
        for index, (line, bind) in enumerate(changes):
            key = self._topology.line_routing_key(line)
            if bind and index < last:
                await channel.queue_bind(queue.name, exchange, key, nowait=True)
            elif bind:
                await channel.queue_bind(queue.name, exchange, key)
            else:
                await channel.queue_unbind(queue.name, exchange, key)  # queue.unbind has no nowait in AMQP

    async def send_command(self, command: Command, ttl_seconds: float) -> None:
        channel, _ = self._declared()
        await channel.default_exchange.publish(
            aio_pika.Message(
                body=command.encode(),
                content_type="application/json",
                correlation_id=command.id,
                reply_to=self._topology.node_replies_queue(self._node_id),
                expiration=ttl_seconds,
            ),
            routing_key=self._topology.commands_queue,
            mandatory=False,
        )

    async def wait_closed(self) -> None:
        await self._closed.wait()

    async def close(self) -> None:
        if not self._connection.is_closed:
            try:
                await self._connection.close()
            except BROKER_FAILURES:
                pass


class LineFeed:
    def __init__(
        self,
        node_id: str,
        bus: NodeBus,
        reader: LineReader,
        *,
        command_ttl_seconds: float = 5.0,
        history_wait_seconds: float = 1.0,
        redis_timeout_seconds: float = 5.0,
        bind_chunk: int = 500,
        bind_timeout_seconds: float = 15.0,
        settle_seconds: float = 0.3,
    ) -> None:
        self.node_id = node_id
        self._bus = bus
        self.reader = reader
        self._redis_health = RedisHealth()
        #: awaited first thing in :meth:`stop` (e.g. the delivery log's last write)
        self.before_stop: list[Callable[[], Awaitable[None]]] = []
        self.router: LineRouter[LineSubscriber] = LineRouter()
        self._command_ttl = command_ttl_seconds
        #: the current connection, declared or not (closed at stop)
        self._connection: NodeLink | None = None
        #: the current connection once its queues are declared: binds and commands go here
        self._link: NodeLink | None = None
        #: lines bound on the current link, as of the changes sent on it
        self._bound: set[str] = set()
        #: lines whose binding may differ from what the router wants, with the follows waiting on them;
        #: in the order they were marked
        self._dirty: dict[str, list[asyncio.Future[None]]] = {}
        self._dirty_marked = asyncio.Event()
        #: held while changes are sent: by the binder, and by a reconnect binding every line
        self._binding_lock = asyncio.Lock()
        self._bind_chunk = bind_chunk
        self._bind_timeout = bind_timeout_seconds
        self._pending: dict[str, asyncio.Future[CommandResult]] = {}
        #: what the event task has to do, in arrival order: bodies, or events already decoded that need a repair
        self._events: asyncio.Queue[bytes | LineEvent] = asyncio.Queue()
        self._handling = False  # the event task is working on one (it may be awaiting Redis)
        self.connected = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._catch_up_lock = asyncio.Lock()
        self._history_wait = history_wait_seconds
        self._redis_timeout = redis_timeout_seconds
        #: lines handed events without a catch-up while Redis was away
        self._unsynced: set[str] = set()
        self._resync_task: asyncio.Task[None] | None = None
        #: lines just bound, with when to look at them again (see _settle_later)
        self._settle = settle_seconds
        self._settling: dict[str, float] = {}
        self._settle_task: asyncio.Task[None] | None = None
        #: set once the first broker connection is up (start-up is over)
        self.ever_connected = False
        #: False after a Redis operation failed, until one succeeds again (for /health)
        self.redis_available = True

    # ---- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        self._tasks.append(asyncio.create_task(self._connection_loop(), name="broker"))
        self._tasks.append(asyncio.create_task(self._process_events(), name="events"))
        self._tasks.append(asyncio.create_task(self._binder(), name="binder"))
        for task in self._tasks:
            task.add_done_callback(_log_end)

    @property
    def running(self) -> bool:
        """False once a task of the feed has ended: this node would no longer deliver anything."""
        return bool(self._tasks) and not any(task.done() for task in self._tasks)

    async def stop(self) -> None:
        for hook in self.before_stop:
            try:
                await hook()
            except (OSError, aioredis.RedisError) as exc:
                log.warning("stop hook failed: %s", exc)
        await stop_tasks([*self._tasks, self._resync_task, self._settle_task])
        for waiters in self._dirty.values():
            for future in waiters:
                if not future.done():
                    future.set_result(None)
        self._dirty.clear()
        if self._connection is not None:
            await self._connection.close()

    async def _connection_loop(self) -> None:
        backoff = Backoff(initial=0.2, maximum=10.0)
        while True:
            try:
                # One round over the broker members (counts reconnects and failovers); a refused first login
                # raises BrokerLoginRefused, which ends this task: /health says 503 and the log says why.
                connection = await self._bus.connect()
                self._connection = connection
                try:
                    async with asyncio.timeout(30):
                        await self._declare(connection)
                except BaseException:
                    with contextlib.suppress(Exception):
                        await connection.close()
                    raise
                backoff.reset()
                self.connected.set()
                self.ever_connected = True
                BROKER_CONNECTED.set(1)
                log.info("node %s connected to the broker; %d lines bound", self.node_id, len(self._bound))
                # Events published while we were away (or before the queue existed) went nowhere:
                # the history has them. A Redis failure here is retried by _resync_later.
                await self._repair_all()
                await connection.wait_closed()
                raise ConnectionError("broker connection closed")
            except asyncio.CancelledError:
                raise
            except BROKER_FAILURES as exc:
                BROKER_ERRORS.inc()
                BROKER_CONNECTED.set(0)
                self.connected.clear()
                self._link = None
                self._bound = set()
                LINES_BOUND.set(0)
                if self._connection is not None:
                    # Its channel may be gone with the connection still up (a refused bind).
                    await self._connection.close()
                for future in self._pending.values():
                    if not future.done():
                        future.set_result(CommandResult("", ok=False, error="messaging broker connection lost"))
                delay = backoff.next_delay()
                log.warning("node %s: broker unavailable (%s); retry in %.1fs", self.node_id, exc, delay)
                await asyncio.sleep(delay)

    async def _declare(self, link: NodeLink) -> None:
        await link.declare(self._receive, self._on_reply)
        async with self._binding_lock:
            self._link = link
            self._bound = set()
        # Every followed line, including those followed while this ran: loop until nothing is left
        # unbound. In chunks, each its own round trip, so the binder's follows and /health get turns.
        while missing := [line for line in self.router.lines() if line not in self._bound]:
            for start in range(0, len(missing), self._bind_chunk):
                async with self._binding_lock:
                    chunk = [line for line in missing[start:start + self._bind_chunk]
                             if line not in self._bound and self.router.follows(line)]
                    async with asyncio.timeout(self._bind_timeout):
                        await link.apply_bindings([(line, True) for line in chunk])
                    self._bound.update(chunk)
                LINES_BOUND.set(len(self._bound))

    # ---- membership ------------------------------------------------------------------------

    async def follow(self, subscriber: LineSubscriber, line: str) -> LineSnapshot:
        """Start delivering ``line`` to ``subscriber``; returns the line's snapshot to start from."""
        if self.router.attach(subscriber, line) or line not in self._bound:
            # The first follower, or one more while the first one's bind is still on its way: wait for
            # the binding, so that every event after the snapshot below reaches this node.
            await self._mark(line)
        snapshot = await self.reader.snapshot(line)
        self.router.start_from(line, snapshot.position)
        self._settle_later([line])
        return snapshot

    async def unfollow(self, subscriber: LineSubscriber, line: str) -> None:
        if self.router.detach(subscriber, line):
            await self._mark(line)

    def _mark(self, line: str) -> asyncio.Future[None]:
        """Have the binder bring ``line``'s binding to what the router wants; the future is done once it is
        (or once there is no connection: the reconnect binds every followed line)."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if self._link is None:
            future.set_result(None)
            return future
        self._dirty.setdefault(line, []).append(future)
        self._dirty_marked.set()
        return future

    async def _binder(self) -> None:
        """Applies marked lines' bindings, many per round trip.

        Binds go first, whatever was marked before them: an agent waits on each (its OpenConnection), while
        an unbind only spares the node events nobody here wants, and RabbitMQ has no unbind without an
        answer, so unbinds cost a round trip each. A line already as wanted releases its waiters at once."""
        while True:
            await self._dirty_marked.wait()
            self._dirty_marked.clear()
            while self._dirty:
                binds: list[str] = []
                unbinds: list[str] = []
                settled: list[str] = []
                for line in self._dirty:
                    follows, bound = self.router.follows(line), line in self._bound
                    if follows and not bound:
                        if len(binds) < self._bind_chunk:
                            binds.append(line)
                    elif bound and not follows:
                        if len(unbinds) < UNBIND_CHUNK:
                            unbinds.append(line)
                    else:
                        settled.append(line)
                taken = [*settled, *(binds or unbinds)]
                waiters = [future for line in taken for future in self._dirty.pop(line)]
                try:
                    if binds or unbinds:
                        async with self._binding_lock:
                            await self._reconcile(binds, unbinds if not binds else [])
                finally:
                    for future in waiters:
                        if not future.done():
                            future.set_result(None)
                # Let the loop serve sockets, events and /health between chunks.
                await asyncio.sleep(0)

    async def _reconcile(self, binds: list[str], unbinds: list[str]) -> None:
        """Bind and unbind what still needs it (the router may have changed while the lock was awaited)."""
        link = self._link
        if link is None:
            return  # the reconnect binds every followed line
        to_bind = [line for line in binds if self.router.follows(line) and line not in self._bound]
        to_unbind = [line for line in unbinds if not self.router.follows(line) and line in self._bound]
        if not to_bind and not to_unbind:
            return
        try:
            async with asyncio.timeout(self._bind_timeout):
                await link.apply_bindings([(line, True) for line in to_bind] + [(line, False) for line in to_unbind])
        except BROKER_FAILURES as exc:  # a timeout among them
            # The link is unusable now; the reconnect loop binds every followed line again.
            BROKER_ERRORS.inc()
            log.warning("binding %d lines failed (%s); they are bound again on reconnect",
                        len(to_bind) + len(to_unbind), exc)
            if self._link is link:
                await link.close()
            return
        if self._link is link:
            self._bound.update(to_bind)
            self._bound.difference_update(to_unbind)
            LINES_BOUND.set(len(self._bound))

    # ---- events ----------------------------------------------------------------------------

    def _receive(self, body: bytes) -> None:
        """A line event from the broker. In order and nothing ahead of it (the usual case): delivered at once,
        in the consumer's own turn of the loop; a handoff to the event task cost every event one more turn of a
        busy node's loop (issue 15: e2e). Anything that needs Redis (a gap, a new epoch), or that arrives while
        the task has events queued or is repairing, goes through the task, so a line's events keep their order."""
        if self._handling or not self._events.empty():
            self._events.put_nowait(body)
            return
        event = self._decode(body)
        if event is None:
            return
        verdict = self.router.classify(event)
        if verdict in (Verdict.GAP, Verdict.NEW_EPOCH):
            self._events.put_nowait(event)
            return
        self._handle_in_order(event, verdict)

    def _decode(self, body: bytes) -> LineEvent | None:
        try:
            event = LineEvent.decode(body)
        except WireError as exc:
            LINE_EVENTS.labels(verdict="undecodable").inc()
            log.warning("dropping undecodable line event: %s", exc)
            return None
        if event.ami_received_at:
            EVENT_ARRIVAL.observe(max(0.0, time.time() - event.ami_received_at))
        return event

    def _handle_in_order(self, event: LineEvent, verdict: Verdict) -> None:
        LINE_EVENTS.labels(verdict=verdict.value).inc()
        if verdict is Verdict.DELIVER:
            self._deliver(event)

    async def _process_events(self) -> None:
        while True:
            item = await self._events.get()
            self._handling = True
            try:
                event = self._decode(item) if isinstance(item, bytes) else item
                if event is None:
                    continue
                try:
                    await self.handle_event(event)
                except (OSError, aioredis.RedisError, WireError, TimeoutError) as exc:
                    self._redis_state(False)
                    log.warning("line %s: cannot reach Redis (%s); delivering without repair", event.line, exc)
                    self._deliver_unchecked(event)
            finally:
                self._handling = False

    async def handle_event(self, event: LineEvent) -> None:
        verdict = self.router.classify(event)
        if verdict not in (Verdict.GAP, Verdict.NEW_EPOCH):
            self._handle_in_order(event, verdict)
        else:
            LINE_EVENTS.labels(verdict=verdict.value).inc()
            if not self.redis_available:
                # Known to be away: do not make every such event wait for a Redis timeout.
                self._deliver_unchecked(event)
                return
            await self._catch_up(event.line, live=event)

    def _deliver_unchecked(self, event: LineEvent) -> None:
        """Redis is away: the broker still brings events, and an agent must see its calls ring.
        Hand the event on; the line is resynced from a snapshot once Redis is back."""
        if self.router.classify(event) not in (Verdict.DUPLICATE, Verdict.STALE, Verdict.NOBODY):
            self._deliver(event)
        self._resync_later(event.line)

    def _redis_state(self, ok: bool) -> None:
        if ok:
            self._redis_health.succeeded()
        else:
            self._redis_health.failed()
        self.redis_available = ok

    def _deliver(self, event: LineEvent) -> None:
        self.router.delivered(event)
        for subscriber in self.router.sessions(event.line):
            subscriber.deliver_event(event)

    async def _catch_up(self, line: str, live: LineEvent | None = None, *, resync: bool = False) -> None:
        """Bring ``line`` up to date from Redis (gap, new epoch, reconnect); see line_router.

        One catch-up at a time: the event task and the reconnect repair must not interleave
        their deliveries on a line."""
        async with self._catch_up_lock:
            if live is not None and self.router.classify(live) not in (Verdict.GAP, Verdict.NEW_EPOCH):
                if self.router.classify(live) is Verdict.DELIVER:  # repaired meanwhile up to it
                    self._deliver(live)
                return
            if self.router.position(line) is None:
                return
            history = await self._read_history(line, live)
            self._redis_state(True)
            position = self.router.position(line)
            if position is None:
                return  # the last session left meanwhile
            snapshot = history.snapshot
            plan = plan_catch_up(position, history.events, history.anchored, snapshot.position, live,
                                 force_resync=resync)
            for event in plan.events:
                self._deliver(event)
            if plan.resync_at is not None:
                GAP_REPAIRS.labels(outcome="resync").inc()
                log.info(
                    "line %s: continuity from %s not provable; %d events from history, then the snapshot at %s",
                    line, position, len(plan.events), snapshot.position,
                )
                self.router.reset(line, plan.resync_at)
                for subscriber in self.router.sessions(line):
                    subscriber.resync(snapshot)
            elif plan.events:
                GAP_REPAIRS.labels(outcome="repaired").inc()
            if plan.live is not None:
                self._deliver(plan.live)
            CATCH_UP_EVENTS.inc(len(plan.events))

    async def _read_history(self, line: str, live: LineEvent | None) -> LineHistory:
        """The line's history after our position, waiting briefly for ``live`` to be in it: the
        gateway writes Redis beside the publish, so an event may arrive before its write lands.

        Without ``live`` (a repair after a reconnect), Redis may likewise stand a few events behind
        what this node already delivered in the same epoch: that is waited for too, not taken for a
        Redis that lost them (which the catch-up answers with a resync to its snapshot)."""
        deadline = time.monotonic() + self._history_wait
        pause = 0.001  # the write is usually well under a millisecond behind
        while True:
            position = self.router.position(line) or LINE_START
            async with asyncio.timeout(self._redis_timeout):
                history = await self.reader.history_since(line, position)
            at = history.snapshot.position
            if live is not None:
                if at >= live.position:
                    return history
            elif at.epoch != position.epoch or at >= position:
                return history
            if time.monotonic() >= deadline:
                HISTORY_WAIT_TIMEOUTS.inc()
                log.warning(
                    "line %s: Redis has no %s after %.1fs (at %s)",
                    line, live.position if live is not None else position, self._history_wait, at,
                )
                return history
            await asyncio.sleep(pause)
            pause = min(pause * 2, 0.02)

    async def snapshot(self, line: str) -> LineSnapshot:
        """``line``'s state for a tab's snapshot, waiting briefly for Redis to reach what this node already
        delivered on the line in the same epoch. Redis is written beside the publish and may stand behind the
        broker (seconds, right after a Redis stall): a snapshot read from it then would show a call the tab
        has seen end as live again, or one it has seen answered as ringing. Past the wait it is served as read.
        """
        deadline = time.monotonic() + self._history_wait
        pause = 0.001
        while True:
            snapshot = await self.reader.snapshot(line)
            if not self.behind(line, snapshot):
                return snapshot
            if time.monotonic() >= deadline:
                HISTORY_WAIT_TIMEOUTS.inc()
                log.warning("line %s: snapshot served at %s, behind %s delivered (Redis lags the broker)",
                            line, snapshot.position, self.router.position(line))
                return snapshot
            await asyncio.sleep(pause)
            pause = min(pause * 2, 0.02)

    def behind(self, line: str, snapshot: LineSnapshot) -> bool:
        """Whether ``snapshot`` stands behind what this node delivered on ``line`` in the same epoch."""
        delivered = self.router.position(line)
        at = snapshot.position
        return delivered is not None and at.epoch == delivered.epoch and at < delivered

    def _settle_later(self, lines: Sequence[str]) -> None:
        """Look at ``lines`` once more in ``settle_seconds``. The gateway writes Redis beside the publish:
        an event the broker routed just before our bind never reached our queue, and its write may land
        just after the read that followed the bind. Nothing else would show it before the line's next
        event; a second look, one round trip for all the lines due, does."""
        due = time.monotonic() + self._settle
        for line in lines:
            self._settling.setdefault(line, due)
        if self._settling and (self._settle_task is None or self._settle_task.done()):
            self._settle_task = asyncio.create_task(self._settle_lines(), name="settle")

    async def _settle_lines(self) -> None:
        while self._settling:
            now = time.monotonic()
            wait = min(self._settling.values()) - now
            if wait > 0:
                await asyncio.sleep(wait)
                continue
            due = [line for line, at in self._settling.items() if at <= now]
            for line in due:
                del self._settling[line]
            due = [line for line in due if self.router.position(line) is not None]
            if not due:
                continue
            try:
                async with asyncio.timeout(self._redis_timeout):
                    stored = await self.reader.positions(due)
                for line in due:
                    position = self.router.position(line)
                    if position is not None and stored[line] > position:
                        SETTLE_REPAIRS.inc()
                        await self._catch_up(line)
            except (OSError, aioredis.RedisError, WireError, TimeoutError) as exc:
                self._redis_state(False)
                log.warning("second look at %d lines failed (%s); they are resynced once Redis answers",
                            len(due), exc)
                for line in due:
                    self._resync_later(line)

    async def _repair_all(self) -> None:
        """After a broker reconnect: events published while we were away went nowhere."""
        lines = self.router.lines()
        for index, line in enumerate(lines):
            try:
                if not self.redis_available:
                    raise ConnectionError("Redis unavailable")
                await self._catch_up(line)
            except (OSError, aioredis.RedisError, WireError, TimeoutError) as exc:
                # Not one timeout per line: every line left is resynced once Redis answers.
                self._redis_state(False)
                log.warning("repair after reconnect failed at line %s (%s); %d lines wait for Redis",
                            line, exc, len(lines) - index)
                for rest in lines[index:]:
                    self._resync_later(rest)
                return
        self._settle_later(lines)

    def _resync_later(self, line: str) -> None:
        self._unsynced.add(line)
        if self._resync_task is None or self._resync_task.done():
            self._resync_task = asyncio.create_task(self._resync_when_redis_returns(), name="resync")

    async def _resync_when_redis_returns(self) -> None:
        """Lines that got events without a catch-up (Redis away) are brought back to the truth:
        whatever history continues them, then a snapshot. Retries with backoff until it works."""
        backoff = Backoff(initial=0.5, maximum=10.0)
        while self._unsynced:
            await asyncio.sleep(backoff.next_delay())
            for line in sorted(self._unsynced):
                try:
                    await self._catch_up(line, resync=True)
                except (OSError, aioredis.RedisError, WireError, TimeoutError) as exc:
                    self._redis_state(False)
                    log.info("line %s: Redis still unavailable (%s)", line, exc)
                    break
                self._unsynced.discard(line)
                log.info("line %s: resynced after Redis came back", line)
            else:
                backoff.reset()

    # ---- commands --------------------------------------------------------------------------

    async def send_command(self, command: Command, timeout: float = 10.0) -> CommandResult:
        link = self._link
        if link is None or not self.connected.is_set():
            return CommandResult(command.id, ok=False, error="messaging broker unavailable; try again")
        future: asyncio.Future[CommandResult] = asyncio.get_running_loop().create_future()
        self._pending[command.id] = future
        try:
            await link.send_command(command, self._command_ttl)
            async with asyncio.timeout(timeout):
                return await future
        except TimeoutError:
            return CommandResult(command.id, ok=False, error="the telephony gateway did not answer in time")
        except BROKER_FAILURES as exc:
            BROKER_ERRORS.inc()
            return CommandResult(command.id, ok=False, error=f"messaging broker error: {exc}")
        finally:
            self._pending.pop(command.id, None)

    def _on_reply(self, body: bytes, correlation_id: str | None) -> None:
        try:
            result = CommandResult.decode(body)
        except WireError as exc:
            log.warning("dropping undecodable command result: %s", exc)
            return
        future = self._pending.get(correlation_id or result.command_id)
        if future is not None and not future.done():
            future.set_result(result)


def _log_end(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        # /health turns 503 (the node stops taking agents); say why, once.
        log.error("line feed task %s ended: %r", task.get_name(), task.exception())

