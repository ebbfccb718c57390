"""Probes beside a measured window: is it Redis or the broker that stalled, rather than our processes?

While a window runs, a thread of the bench (its own event loop, so the probes never wait on the bench's
main thread) keeps two light probes going against the same Redis and RabbitMQ the cluster uses:

* Redis: one ``PING`` every 10 ms on its own connection; the round trip, kept with its wall-clock time.
* RabbitMQ: one small message every 50 ms through a private exchange and exclusive queue (publish with
  confirms -> consumer), the same hop the pipeline makes; the latency, kept with its time. A broker in flow
  control or stalled by the machine shows here too.

If the pipeline's p99.9 moves together with these, the engines (or the machine under them) are where the
tail comes from; if these stay flat while the processes' loop lag jumps, it is our processes.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
import uuid
from dataclasses import dataclass, field

REDIS_INTERVAL = 0.010
BROKER_INTERVAL = 0.050

__all__ = ["SideProbes"]


@dataclass
class SideProbes:
    amqp_url: str
    redis_url: str
    redis: list[tuple[float, float]] = field(default_factory=list)
    broker: list[tuple[float, float]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def __enter__(self) -> SideProbes:
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), name="bench-side-probes",
                                        daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(15)

    async def _run(self) -> None:
        tasks = [asyncio.create_task(self._redis()), asyncio.create_task(self._broker())]
        await asyncio.to_thread(self._stop.wait)
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _redis(self) -> None:
        import redis.asyncio as aioredis

        client = aioredis.from_url(self.redis_url)
        try:
            while True:
                started = time.perf_counter()
                try:
                    await client.ping()
                except (OSError, aioredis.RedisError) as exc:
                    self.errors.append(f"redis: {exc}")
                    await asyncio.sleep(0.5)
                    continue
                self.redis.append((time.time(), time.perf_counter() - started))
                await asyncio.sleep(REDIS_INTERVAL)
        finally:
            await client.aclose()

    async def _broker(self) -> None:
        import aio_pika

        name = f"bench-probe-{uuid.uuid4().hex[:8]}"
        try:
            connection = await aio_pika.connect(self.amqp_url, timeout=10)
        except (OSError, TimeoutError, aio_pika.exceptions.AMQPError) as exc:
            self.errors.append(f"broker: {exc}")
            return
        sent: dict[str, float] = {}
        try:
            channel = await connection.channel(publisher_confirms=True)
            exchange = await channel.declare_exchange(name, aio_pika.ExchangeType.DIRECT, auto_delete=True)
            queue = await channel.declare_queue(name, exclusive=True, auto_delete=True)
            await queue.bind(exchange, "probe")

            async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
                started = sent.pop(message.body.decode(), None)
                if started is not None:
                    self.broker.append((time.time(), time.perf_counter() - started))

            await queue.consume(on_message, no_ack=True)
            n = 0
            while True:
                n += 1
                key = str(n)
                sent[key] = time.perf_counter()
                try:
                    await exchange.publish(aio_pika.Message(body=key.encode()), routing_key="probe", mandatory=False)
                except aio_pika.exceptions.AMQPError as exc:
                    self.errors.append(f"broker: {exc}")
                await asyncio.sleep(BROKER_INTERVAL)
        finally:
            with contextlib.suppress(Exception):
                await connection.close()

    def within(self, start: float, end: float) -> tuple[list[float], list[float]]:
        """Redis and broker latencies whose probe ended inside ``[start, end]`` (wall clock)."""
        return ([d for t, d in self.redis if start <= t <= end], [d for t, d in self.broker if start <= t <= end])
