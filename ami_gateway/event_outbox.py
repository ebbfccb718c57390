"""Between the AMI read path and the outside world: sequence, buffer, store, publish.

The read path calls :meth:`EventOutbox.put` synchronously; it only assigns each event its
line position and appends it to a bounded in-memory queue, so a slow or absent Redis or
RabbitMQ never delays reading AMI.

Redis is written beside the publish, not before it (issue 15: a Redis write in series cost every
event its round trip). The drain task takes batches in order and, for each, hands it to the store
task (Redis: state + history + position, one fenced script) *and* publishes it to RabbitMQ with
publisher confirms, in the same step, awaiting neither: an event pays the broker hop only, while its
Redis write travels at the same time. Up to ``window`` batches await the broker's confirms at once. A batch is
done, and its events leave the outbox, only when the broker confirmed it *and* Redis holds it. The
store task writes strictly in order (the calls hash and the position are "last write wins"), merges
what waits into one script call, and retries a failed write with backoff; a nack, a lost channel or
a failed publish closes the connection and republishes everything not yet confirmed from the oldest
batch, in order, while each event is written to Redis once whatever happens to its publish. So
events leave in the order Asterisk produced them and none is skipped; a node may see an event twice
after a retry and drops duplicates by sequence number.

What this gives up, and why it is safe (docs/performance.md, "Redis beside the publish"):

* A node may receive event (epoch, n) a moment before Redis holds it. A node reads the history only
  when it repairs (a gap, a new epoch, a reconnect), and then waits briefly for the entry it needs
  (ws_node/line_feed.py); an event in order is delivered without touching Redis.
* Redis is never more than ``window * batch_size`` events behind the broker: a published batch stays in
  the outbox until its write lands. Once a write has failed, or one has been outstanding for
  ``store_stall_seconds``, nothing more is published until Redis answers, so an outage costs only the
  batches already out when it began and the outbox is back to "store, then publish". The write is
  retried until it lands (Redis back with its data: the history is complete), or the outbox overflows
  (new epoch, every line restated), or it is refused because the lease vanished with Redis's data:
  this term stops and the next one restates every line in a new epoch, publishing from its shadow
  log what the histories lack. An event a node delivered that Redis never got is superseded by that
  restatement; the events it held are handed on (:meth:`EventOutbox.unconfirmed`) as before.
* Fencing no longer runs before each publish: ``may_publish`` (the lease's local deadline, taken
  before the renew was sent) is what keeps a gateway whose lease ran out from publishing, as it was
  for a batch stored before a pause. Only when Redis loses the lease key itself (restarted empty, a
  failover that lost writes) can a term publish up to one window after a successor could have taken
  the lease: its next write is refused and it stops, and nodes drop an older epoch's events once
  they have the newer one.

If the buffer overflows (the broker or Redis away for very long), the oldest events are
dropped and continuity is declared lost: the next events start a new epoch, which tells every
reader to take a fresh snapshot instead of trusting its history. Until that epoch is claimed
(Redis may still be away), further events are dropped too: the restate that opens the new epoch
carries every line's state as of then.

Fencing (ami_gateway/lease.py): every Redis write checks the lease in the same script; a refused
write stops this outbox for good (``on_fenced``: the gateway steps down). Before each batch goes out
and before each Redis write (a retry included) ``may_publish`` is asked, so a gateway that wakes from
a pause, or whose Redis comes back after an outage, writes and publishes nothing until it has proved
the lease is still its own.

The outbox's two outputs are interfaces: the line state through a
:class:`~services.line_state.LineWriter` (Redis: :class:`~services.line_state.LineStateWriter`) and
the broker through an :class:`EventSink` (RabbitMQ: :class:`EventPublisher`); their in-memory
siblings (services/line_state_memory.py, ami_gateway/event_outbox_memory.py) let unit tests drive
it through outages.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import aio_pika
import redis.asyncio as aioredis
from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractExchange
from prometheus_client import Counter, Gauge, Histogram

from ami_gateway.lease import FENCED
from services.backoff import Backoff
from services.broker import BROKER_FAILURES, Broker, declare_events_exchange
from services.config import redact_url
from services.infra_metrics import BROKER_ERRORS, EVENT_LATENCY_BUCKETS, RedisHealth
from services.line_state import AlreadyStored, Fenced, LineWriter
from services.tasks import stop_tasks
from services.topology import Topology
from services.wire import LineEvent

log = logging.getLogger(__name__)

EVENTS_PUBLISHED = Counter("cms_call_events_published_total", "Line events confirmed by RabbitMQ")
EVENTS_DROPPED = Counter("cms_call_events_dropped_total", "Line events dropped because the outbox overflowed")
OUTBOX_DEPTH = Gauge("cms_outbox_events", "Line events waiting to be stored and published")
PUBLISH_SECONDS = Histogram(
    "cms_publish_batch_seconds",
    "Time for a batch to be both stored in Redis and confirmed by RabbitMQ (the two travel at once)",
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
)
REDIS_WRITE_SECONDS = Histogram(
    "cms_outbox_redis_write_seconds",
    "Time of one Redis write of the outbox (state + history of one or more batches), made beside their publish",
    buckets=(0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
)
EVENT_PUBLISH_LATENCY = Histogram(
    "cms_call_event_publish_latency_seconds",
    "From the AMI bytes that caused a line event to RabbitMQ confirming it (tracker, outbox wait, Redis, broker)",
    buckets=EVENT_LATENCY_BUCKETS,
)
OUTBOX_WAIT = Histogram(
    "cms_call_event_outbox_wait_seconds",
    "From the AMI bytes that caused a line event to its batch being handed to RabbitMQ (tracker and outbox queue)",
    buckets=EVENT_LATENCY_BUCKETS,
)


class Sequencer:
    """Per-line gap-free numbering within an epoch."""

    def __init__(self, epoch: str) -> None:
        self.epoch = epoch
        self._seq: dict[str, int] = collections.defaultdict(int)

    def position(self, event: LineEvent) -> LineEvent:
        self._seq[event.line] += 1
        return event.positioned(self.epoch, self._seq[event.line])

    def restart(self, epoch: str) -> None:
        self.epoch = epoch
        self._seq.clear()


class EventSink(Protocol):
    """Where the outbox publishes: one ordered channel with publisher confirms, (re)opened on demand.

    A publish that cannot start raises ``aio_pika.exceptions.AMQPError``, ``OSError``, ``RuntimeError``
    or ``TimeoutError``; one the broker refuses or loses fails its confirms future instead."""

    async def send(self, events: Sequence[LineEvent]) -> asyncio.Future[list[Any]]:
        """Start publishing ``events``, in order and after everything sent before, and return the
        future of their confirms without waiting for it."""
        ...

    async def publish(self, events: Sequence[LineEvent]) -> None:
        """Publish and wait for the confirms."""
        ...

    async def close(self) -> None:
        """Drop the connection (quietly); the next send opens a new one."""
        ...


class EventPublisher(EventSink):
    """RabbitMQ side of the outbox: one connection, one confirming channel, reconnects on demand."""

    def __init__(self, broker: Broker | str, topology: Topology) -> None:
        self._broker = broker if isinstance(broker, Broker) else Broker([broker], name="event publisher")
        self._topology = topology
        self._connection: AbstractConnection | None = None
        self._channel: AbstractChannel | None = None
        self._exchange: AbstractExchange | None = None
        self._connected_once = False

    async def _ensure(self) -> AbstractExchange:
        if self._exchange is not None and self._connection is not None and not self._connection.is_closed:
            return self._exchange
        await self.close()
        self._connection = await self._broker.connect()
        self._connected_once = True
        self._channel = await self._connection.channel(publisher_confirms=True)
        self._exchange = await declare_events_exchange(self._channel, self._topology)
        log.info("publishing events to %s on %s", self._topology.events_exchange,
                 redact_url(self._broker.current_url or ""))
        return self._exchange

    async def publish(self, events: Sequence[LineEvent]) -> None:
        await (await self.send(events))

    async def send(self, events: Sequence[LineEvent]) -> asyncio.Future[list[Any]]:
        """Start publishing ``events`` and return the future of their confirms, without waiting for them.

        Each message becomes a task at once, in order, and the tasks take the channel's (FIFO) lock in
        the order they were created: frames reach the broker in the order of ``events``, and after the
        frames of every earlier call. The future fails on a nack or when the channel is lost.
        """
        exchange = await self._ensure()
        # One channel keeps frames in order; awaiting the confirms together (a window as large as
        # the batch) is what lifts throughput above one round trip per event.
        return asyncio.gather(
            *(
                exchange.publish(
                    aio_pika.Message(
                        body=event.encode(),
                        content_type="application/json",
                        delivery_mode=aio_pika.DeliveryMode.NOT_PERSISTENT,
                    ),
                    routing_key=self._topology.line_routing_key(event.line),
                    mandatory=False,
                )
                for event in events
            )
        )

    async def close(self) -> None:
        connection, self._connection, self._channel, self._exchange = self._connection, None, None, None
        if connection is not None and not connection.is_closed:
            try:
                await connection.close()
            except BROKER_FAILURES:
                pass


@dataclass(eq=False)
class _InFlight:
    """A batch published and not yet done: the events at the head of the queue it stands for.

    Done when the broker confirmed it *and* the store task has written Redis up to ``end`` (an absolute
    event index, see :class:`EventOutbox`)."""

    events: list[LineEvent]
    confirms: asyncio.Future[list[Any]]
    generation: int
    end: int
    started: float  # perf_counter when it was handed to Redis and the broker
    sent_at: float = 0.0  # wall clock of the same moment (events carry the wall clock of their AMI read)
    confirmed_at: float = 0.0  # wall clock, set when the broker's last confirm for it arrived

    def failed(self) -> bool:
        return self.confirms.done() and (self.confirms.cancelled() or self.confirms.exception() is not None)


@dataclass(eq=False)
class _ToStore:
    """Events handed to the store task, in queue order; ``end`` is the absolute index after the last one."""

    events: list[LineEvent]
    end: int


class EventOutbox:
    """See the module docstring. Positions in the queue are absolute event indexes (``_base`` is the index
    of ``_queue[0]``), so the drain loop, the store task and the confirms each say how far they got without
    renumbering when the head of the queue is taken off, and a late answer about events an overflow dropped
    cannot be misread as one about the events that replaced them."""

    def __init__(
        self,
        writer: LineWriter,
        publisher: EventSink,
        sequencer: Sequencer,
        *,
        capacity: int = 200_000,
        batch_size: int = 256,
        window: int = 8,
        store_chunk: int = 1024,
        store_stall_seconds: float = 0.25,
        on_continuity_lost: Callable[[], Awaitable[None]] | None = None,
        may_publish: Callable[[], bool] = lambda: True,
        on_fenced: Callable[[str], None] | None = None,
    ) -> None:
        self._redis_health = RedisHealth()
        self._writer = writer
        self._publisher = publisher
        self._sequencer = sequencer
        self._capacity = capacity
        self._batch_size = batch_size
        if window < 1:
            raise ValueError(f"window must be at least 1 batch, not {window}")
        self._window_size = window
        self._store_chunk = max(1, store_chunk)
        self._store_stall = store_stall_seconds
        # Redis trouble seen by the store task: its last write failed, or one has been outstanding since then.
        self._store_failing = False
        self._writing_since: float | None = None
        # "Store, then publish" until the queue is empty again: set by any outage (broker or Redis). A backlog
        # goes out in large writes while nodes rebind after the same outage; each batch then reaches the broker
        # only once Redis holds it, so a node's repair read after its bind finds everything published before.
        self._serial = False
        self._queue: collections.deque[LineEvent] = collections.deque()
        self._wakeup = asyncio.Event()
        self._store_wakeup = asyncio.Event()
        self._continuity_lost = False
        self._lost_epoch: str | None = None  # set from an overflow until the sequencer has a new epoch
        self._on_continuity_lost = on_continuity_lost
        self._may_publish = may_publish
        self._on_fenced = on_fenced
        #: set when a write was refused by the lease fence: this outbox never writes or publishes again
        self.fenced = False
        self._holding = False  # publishing held back because the lease is not confirmed
        self._idle = asyncio.Event()
        self._idle.set()
        self.published = 0
        # Absolute event indexes, never reset (see the class docstring):
        self._base = 0  # index of _queue[0]
        self._handed = 0  # events before it are handed to the store task (written, or waiting to be)
        self._stored = 0  # events before it are in Redis
        self._sent = 0  # events before it are published (confirmed, or waiting for their confirms)
        self._in_flight: collections.deque[_InFlight] = collections.deque()  # oldest first
        self._generation = 0  # bumped when an overflow clears the queue under a batch in flight
        self._to_store: collections.deque[_ToStore] = collections.deque()
        # Held around each Redis write; see writes_paused.
        self._write_lock = asyncio.Lock()

    def put(self, events: Sequence[LineEvent]) -> None:
        """Never blocks: the AMI read path calls this."""
        if not events:
            return
        if self._lost_epoch is not None:
            if self._sequencer.epoch == self._lost_epoch:
                # Continuity is lost and the new epoch is not claimed yet (Redis may be away): numbering
                # on in the old epoch would publish a gap. The restate that opens the new epoch is taken
                # from the tracker's state at that moment, so it covers what is dropped here.
                EVENTS_DROPPED.inc(len(events))
                return
            self._lost_epoch = None
        for event in events:
            self._queue.append(self._sequencer.position(event))
        if len(self._queue) > self._capacity:
            # A partial history would have a hole readers cannot see; drop it all and restate
            # every line under a new epoch instead (see on_continuity_lost).
            dropped = len(self._queue)
            self._base += dropped
            self._queue.clear()
            self._handed = self._stored = self._sent = self._base
            self._to_store.clear()
            self._generation += 1
            EVENTS_DROPPED.inc(dropped)
            self._continuity_lost = True
            self._lost_epoch = self._sequencer.epoch
            log.error("outbox overflow: dropped %d events; every line restarts under a new epoch", dropped)
        OUTBOX_DEPTH.set(len(self._queue))
        self._idle.clear()
        self._wakeup.set()

    @contextlib.asynccontextmanager
    async def writes_paused(self) -> AsyncIterator[None]:
        """No Redis write of this outbox is in flight or starts while the block runs.

        The gateway claims a new epoch (which changes the lease's token) and re-fences the writer inside
        one: a write sent with the old token that reached Redis just after the new epoch was claimed would
        be refused as fenced, and a refused write makes the gateway step down (seen after a Sentinel
        failover, where the restate runs beside a busy outbox).
        """
        async with self._write_lock:
            yield

    @property
    def depth(self) -> int:
        return len(self._queue)

    def unconfirmed(self) -> list[LineEvent]:
        """The events put that are not both confirmed by the broker and stored in Redis, oldest first (a term
        that stops or is fenced hands them to the next one, which publishes what the line histories show was
        not: an event published but never stored is published again, and nodes silence a repeated ring)."""
        return list(self._queue)

    async def wait_idle(self, timeout: float) -> bool:
        try:
            async with asyncio.timeout(timeout):
                await self._idle.wait()
            return True
        except TimeoutError:
            return False

    async def close(self) -> None:
        """Close the broker connection (after :meth:`run` was cancelled)."""
        await self._publisher.close()

    async def run(self) -> None:
        backoff = Backoff(initial=0.1, maximum=2.0)
        store = asyncio.create_task(self._store_loop(), name="outbox-store")
        store.add_done_callback(lambda _: self._wakeup.set())  # an error in it must not go unnoticed here
        try:
            while not self.fenced:
                if store.done():
                    store.result()  # the store task ends by itself only when fenced: re-raise anything else
                # Cleared before looking at the state and awaited only when there is nothing to do: a put(), a
                # confirm or a Redis write that lands while this loop works is seen by the checks below.
                self._wakeup.clear()
                if self._continuity_lost and self._on_continuity_lost is not None:
                    self._continuity_lost = False
                    await self._on_continuity_lost()
                    continue
                while self._in_flight and self._in_flight[0].generation != self._generation:
                    self._in_flight.popleft()  # its events were dropped from the queue by an overflow
                if any(batch.failed() for batch in self._in_flight):
                    await self._republish_from_oldest(backoff)
                    continue
                head = self._in_flight[0] if self._in_flight else None
                if head is not None and head.confirms.done() and self._stored >= head.end:
                    self._done(self._in_flight.popleft())
                    backoff.reset()
                    continue
                if not self._queue:
                    self._serial = False  # the backlog of an outage is out: Redis goes beside the publish again
                    self._idle.set()
                    await self._wakeup.wait()
                    continue
                if self._sent < self._base + len(self._queue) and self._room() and not self.redis_in_trouble:
                    if await self._store_and_send(backoff):
                        continue
                # Window full, everything sent, Redis failing, or (after an outage) a batch waiting for its
                # write: wait for a confirm, a write or more events.
                await self._wakeup.wait()
        finally:
            await stop_tasks([store])
            for batch in self._in_flight:
                batch.confirms.cancel()
            self._in_flight.clear()

    async def _store_and_send(self, backoff: Backoff) -> bool:
        """Hand the next batch to the store task and publish it, together, awaiting neither; after an outage
        (``_serial``), publish it only once it is stored. False when there is nothing to do until a write lands.

        The lease is checked once, before either goes out (the store task checks it again before writing)."""
        if not self._may_publish():
            # The lease is not confirmed (Redis away, or we were paused): write and publish nothing until
            # it is renewed or resumed; if it was lost, the gateway stops this outbox.
            await self._held_back()
            return True
        self._holding = False
        # _room() said Redis is less than window * batch_size events behind: the batch keeps it so.
        end = min(self._sent + self._batch_size, self._base + len(self._queue),
                  self._stored + self._window_size * self._batch_size)
        if self._handed < end:
            # After a failed publish the same events go out again; each is written once.
            self._to_store.append(_ToStore([self._queue[i - self._base] for i in range(self._handed, end)], end))
            self._handed = end
            self._store_wakeup.set()
        if self._serial and self._stored < end:
            return False
        batch = [self._queue[i - self._base] for i in range(self._sent, end)]
        generation = self._generation
        started, sent_at = time.perf_counter(), time.time()
        try:
            confirms = await self._publisher.send(batch)
        except BROKER_FAILURES as exc:
            await self._republish_from_oldest(backoff, exc)
            return True
        in_flight = _InFlight(batch, confirms, generation, end, started, sent_at)
        confirms.add_done_callback(lambda _: self._on_confirms(in_flight))
        if generation != self._generation:
            return True  # an overflow dropped these events while the channel opened; their confirms are of no use
        self._sent = end
        self._in_flight.append(in_flight)
        return True

    def _room(self) -> bool:
        """Whether another batch may go out: at most ``window`` batches unconfirmed by the broker, and Redis at
        most ``window * batch_size`` events behind the broker. Redis's lag is counted in events, not batches: at
        a low rate each batch is an event or two, and a write slower than a few of them would otherwise hold
        the publish back, Redis in series again at the tail."""
        if self._sent - self._stored >= self._window_size * self._batch_size:
            return False
        if len(self._in_flight) < self._window_size:
            return True
        return sum(1 for batch in self._in_flight if not batch.confirms.done()) < self._window_size

    @property
    def redis_in_trouble(self) -> bool:
        """Whether to stop publishing beside Redis: its last write failed, or one hangs. The batches already
        out then wait for their writes, and nothing more goes out until Redis answers again, so an outage
        costs at most the batches that were published before it was noticed."""
        if self._store_failing:
            return True
        since = self._writing_since
        return since is not None and time.perf_counter() - since > self._store_stall

    async def _store_loop(self) -> None:
        """Write handed batches to Redis, strictly in order (the calls hash and the position are "last write
        wins"), merging what waits into one script call, retrying a failed write with backoff.

        A batch may be on the broker already while its write waits or is retried: it keeps its place in the
        outbox until the write lands, and at most ``window * batch_size`` events are ever ahead of Redis."""
        backoff = Backoff(initial=0.1, maximum=2.0)
        while not self.fenced:
            if not self._to_store:
                # Nothing owed to Redis (an overflow may have dropped what a failing write was retrying): no
                # trouble to hold publishing for. The next write tells again whether Redis answers.
                self._store_failing = False
                self._writing_since = None
                self._store_wakeup.clear()
                await self._store_wakeup.wait()
                continue
            if not self._may_publish():
                # The lease is not confirmed: a write now could meet a fence that has only expired (Redis was
                # away) and stop a term that is about to resume. Wait until it is renewed or resumed.
                await asyncio.sleep(0.05)
                continue
            chunk: list[LineEvent] = []
            end = self._stored
            for part in self._to_store:
                if chunk and len(chunk) + len(part.events) > self._store_chunk:
                    break
                chunk.extend(part.events)
                end = part.end
            generation = self._generation
            try:
                async with self._write_lock:
                    writing = self._writing_since = time.perf_counter()
                    try:
                        await self._writer.write(chunk)
                    except AlreadyStored:
                        # The previous attempt was stored but its reply was lost: the stream already holds these
                        # ids (stream ids only grow). The rest of that transaction is idempotent.
                        log.warning("batch of %d events was already stored", len(chunk))
                    REDIS_WRITE_SECONDS.observe(time.perf_counter() - writing)
            except Fenced as exc:
                self._fence(str(exc))
                return
            except (OSError, ConnectionError, aioredis.RedisError) as exc:  # redis errors share no base with OSError
                self._store_failing = generation == self._generation  # else what failed was dropped meanwhile
                self._writing_since = None
                self._serial = True
                await self._failed("redis", exc, backoff)
                continue
            self._redis_health.succeeded()
            backoff.reset()
            self._writing_since = None
            self._store_failing = False
            self._wakeup.set()  # a batch may be done, or publishing may resume
            if generation != self._generation:
                continue  # an overflow dropped these events meanwhile (and cleared what was left to store)
            while self._to_store and self._to_store[0].end <= end:
                self._to_store.popleft()
            self._stored = end

    def _on_confirms(self, batch: _InFlight) -> None:
        batch.confirmed_at = time.time()
        if not batch.confirms.cancelled():
            batch.confirms.exception()  # retrieved here: a batch abandoned after an overflow is never awaited
        self._wakeup.set()

    def _done(self, batch: _InFlight) -> None:
        PUBLISH_SECONDS.observe(time.perf_counter() - batch.started)
        for event in batch.events:
            if event.ami_received_at:
                OUTBOX_WAIT.observe(max(0.0, batch.sent_at - event.ami_received_at))
                EVENT_PUBLISH_LATENCY.observe(batch.confirmed_at - event.ami_received_at)
        for _ in batch.events:
            self._queue.popleft()
        self._base += len(batch.events)
        self.published += len(batch.events)
        EVENTS_PUBLISHED.inc(len(batch.events))
        OUTBOX_DEPTH.set(len(self._queue))

    async def _held_back(self) -> None:
        if not self._holding:
            self._holding = True
            FENCED.labels(what="publish").inc()  # once per hold, not per wait
            log.warning("lease not confirmed: %d events held back until it is", len(self._queue))
        await asyncio.sleep(0.05)

    def _fence(self, reason: str) -> None:
        FENCED.labels(what="redis_write").inc()
        log.error("outbox stopped: %s; %d events of this term are discarded", reason, len(self._queue))
        self.fenced = True
        self._idle.set()
        self._wakeup.set()
        if self._on_fenced is not None:
            self._on_fenced(reason)

    async def _republish_from_oldest(self, backoff: Backoff, exc: BaseException | None = None) -> None:
        """A nack, a lost channel or a failed publish: drop the connection and everything in flight; the
        loop then publishes again from the oldest unconfirmed event, in order, each batch once it is stored
        (``_serial``). Redis writes go on meanwhile: each event is written once, whatever its publish."""
        if exc is None:
            failed = next(batch for batch in self._in_flight if batch.failed())
            exc = asyncio.CancelledError() if failed.confirms.cancelled() else failed.confirms.exception()
        await self._publisher.close()
        for batch in self._in_flight:
            batch.confirms.cancel()  # closing the connection fails them already; cancelling covers a hung one
        await asyncio.gather(*(batch.confirms for batch in self._in_flight), return_exceptions=True)
        self._in_flight.clear()
        self._sent = self._base
        self._serial = True
        await self._failed("rabbitmq", exc or RuntimeError("publish failed"), backoff)

    async def _failed(self, what: str, exc: BaseException, backoff: Backoff) -> None:
        if what == "redis":
            self._redis_health.failed()
        else:
            BROKER_ERRORS.inc()
        delay = backoff.next_delay()
        log.warning("%s unavailable (%s); %d events wait; retry in %.1fs", what, exc, len(self._queue), delay)
        await asyncio.sleep(delay)
