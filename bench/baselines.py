"""The bare programs every figure is compared with, run in the same bench run on the same machine.

* :func:`bare_parse` -- split AMI bytes on blank lines and lines into dicts (no tracker, no checks).
* :func:`bare_publish` -- aio-pika publish with confirms (a window in flight) into a bound queue.
* :class:`BareServer` -- a bare Autobahn server in a subprocess (see :mod:`bench.bare_server`).
* :func:`bare_broker_latency` -- one broker hop, publish to consume, at a given rate.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import aio_pika

from bench.bare_server import due_count

ROOT = Path(__file__).resolve().parent.parent


def bare_parse(data: bytes) -> int:
    """The simplest AMI parse: blocks on blank lines, lines on CRLF, ``name: value`` into a dict."""
    count = 0
    for block in data.split(b"\r\n\r\n"):
        if not block:
            continue
        message = {}
        for line in block.split(b"\r\n"):
            name, _, value = line.partition(b": ")
            message[name] = value
        if message:
            count += 1
    return count


async def bare_publish(amqp_url: str, bodies: Sequence[tuple[str, bytes]], *, window: int = 256) -> dict[str, float]:
    """Publish ``(routing key, body)`` pairs with confirms (``window`` in flight, not mandatory) to a fresh
    direct exchange whose one queue is bound to every key; returns the time until the last confirm and
    how many messages the queue then holds (they must all be there: delivery, not just sending)."""
    name = f"bench-bare-{uuid.uuid4().hex[:8]}"
    connection = await aio_pika.connect(amqp_url, timeout=10)
    try:
        channel = await connection.channel(publisher_confirms=True)
        exchange = await channel.declare_exchange(name, aio_pika.ExchangeType.DIRECT, auto_delete=True)
        queue = await channel.declare_queue(name, exclusive=True)
        for key in sorted({k for k, _ in bodies}):
            await queue.bind(name, key)
        gate = asyncio.Semaphore(window)

        async def publish(key: str, body: bytes) -> None:
            try:
                await exchange.publish(
                    aio_pika.Message(body=body, content_type="application/json",
                                     delivery_mode=aio_pika.DeliveryMode.NOT_PERSISTENT),
                    routing_key=key, mandatory=False,
                )
            finally:
                gate.release()

        started = time.perf_counter()
        tasks = []
        for key, body in bodies:
            await gate.acquire()
            tasks.append(asyncio.ensure_future(publish(key, body)))
        await asyncio.gather(*tasks)
        confirmed = time.perf_counter() - started
        queued = await queued_messages(channel, name)
        await queue.delete(if_unused=False, if_empty=False)
        return {"confirmed_seconds": confirmed, "queued": float(queued), "events": float(len(bodies))}
    finally:
        await connection.close()


async def queued_messages(channel: aio_pika.abc.AbstractChannel, queue_name: str) -> int:
    """Messages ready in a queue (a passive declare asks the broker)."""
    declared = await channel.declare_queue(queue_name, passive=True)
    return int(declared.declaration_result.message_count or 0)


async def bare_broker_latency(amqp_url: str, body: bytes, rate: float, seconds: float) -> list[float]:
    """Latencies of one broker hop (publish with confirms -> consumer callback) at ``rate`` messages/s."""
    name = f"bench-hop-{uuid.uuid4().hex[:8]}"
    connection = await aio_pika.connect(amqp_url, timeout=10)
    consumer_connection = await aio_pika.connect(amqp_url, timeout=10)
    latencies: list[float] = []
    try:
        channel = await connection.channel(publisher_confirms=True)
        exchange = await channel.declare_exchange(name, aio_pika.ExchangeType.DIRECT, auto_delete=True)
        cchannel = await consumer_connection.channel()
        queue = await cchannel.declare_queue(name, exclusive=True, auto_delete=True)
        await queue.bind(name, "k")

        async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            # The send time rides in the body: AMQP header floats are 32-bit, far too coarse for epoch seconds.
            latencies.append(time.time() - float(message.body[:20]))

        await queue.consume(on_message, no_ack=True)
        started = time.perf_counter()
        sent = 0
        pending: set[asyncio.Future[Any]] = set()
        while (elapsed := time.perf_counter() - started) < seconds:
            for _ in range(due_count(rate, elapsed, sent)):
                future = asyncio.ensure_future(exchange.publish(
                    aio_pika.Message(body=f"{time.time():<20.6f}".encode() + body[20:],
                                     delivery_mode=aio_pika.DeliveryMode.NOT_PERSISTENT),
                    routing_key="k", mandatory=False,
                ))
                pending.add(future)
                future.add_done_callback(pending.discard)
                sent += 1
            await asyncio.sleep(0.002)
        if pending:
            await asyncio.gather(*pending)
        await asyncio.sleep(0.3)
        return latencies
    finally:
        await consumer_connection.close()
        await connection.close()


class BareServer:
    """The bare Autobahn baseline server as a subprocess; ``request()`` sends one control command."""

    def __init__(self, *, uvloop: bool = False) -> None:
        args = [sys.executable, "-m", "bench.bare_server", "--port", "0"] + (["--uvloop"] if uvloop else [])
        self.process = subprocess.Popen(
            args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=ROOT, start_new_session=True,
        )
        first = self._read(20)
        if "port" not in first:
            self.stop()
            raise RuntimeError(f"bare server did not start: {first}")
        self.port = int(first["port"])

    @property
    def pid(self) -> int:
        return self.process.pid

    def _read(self, timeout: float) -> dict[str, Any]:
        import selectors

        assert self.process.stdout is not None
        with selectors.DefaultSelector() as selector:
            selector.register(self.process.stdout, selectors.EVENT_READ)
            if not selector.select(timeout):
                raise TimeoutError(f"bare server gave no answer within {timeout:.0f}s")
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"bare server exited (code {self.process.poll()})")
        result: dict[str, Any] = json.loads(line)
        return result

    def request(self, obj: dict[str, Any], timeout: float = 60.0) -> dict[str, Any]:
        assert self.process.stdin is not None
        self.process.stdin.write((json.dumps(obj) + "\n").encode())
        self.process.stdin.flush()
        return self._read(timeout)

    def stop(self) -> None:
        if self.process.poll() is None:
            try:
                self.request({"cmd": "stop"}, timeout=5)
            except (OSError, TimeoutError, RuntimeError, ValueError):
                pass
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        for stream in (self.process.stdin, self.process.stdout):
            if stream is not None:
                stream.close()

    def __enter__(self) -> BareServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
